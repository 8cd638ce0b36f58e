//! Rootfs synchronisation by content hash.
//!
//! The source lists its rootfs (regular files, directories, symlinks; never crossing into
//! another filesystem or mount), the destination answers which paths differ from its copy,
//! and the source sends those. The final round, during the freeze, also deletes on the
//! destination what the source no longer has. Paths from the peer are relative, checked
//! component by component, and never written through a symlink.
//!
//! Both sides keep a [`HashCache`] for the session: the final round runs while the container
//! is frozen, and re-reading a rootfs of a few hundred MiB there would cost seconds. A file
//! whose stamp (device, inode, size, mtime, ctime) is unchanged since it was hashed keeps its
//! hash; ctime moves on every write and cannot be set, and a file changed shortly before it
//! was hashed ("racy": a later change could keep the same coarse timestamps) is read again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::Metadata;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use super::auth::hex;
use super::wire::Entry;
use super::MigrateError;

/// Most entries a manifest may have.
pub const MAX_ENTRIES: usize = 1_000_000;

fn err(what: impl std::fmt::Display) -> MigrateError {
    MigrateError::Rootfs(what.to_string())
}

/// sha256 of a file's content.
pub fn hash_file(p: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hash_bytes(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

/// What identifies a file's content without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    fn of(m: &Metadata) -> Stamp {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        }
    }
}

/// A change this close before hashing may share its timestamps with a later one.
const RACY: Duration = Duration::from_secs(2);

/// Content hashes of files by path, valid while their [`Stamp`] is unchanged.
#[derive(Debug, Default)]
pub struct HashCache {
    map: HashMap<PathBuf, (Stamp, String)>,
    /// Files read to hash them (for tests and logs).
    pub reads: u64,
}

impl HashCache {
    /// The sha256 of `p`, whose metadata is `m`: from the cache when the file is unchanged
    /// since it was hashed, else read.
    pub fn hash(&mut self, p: &Path, m: &Metadata) -> std::io::Result<String> {
        let stamp = Stamp::of(m);
        if let Some((s, h)) = self.map.get(p) {
            if *s == stamp {
                return Ok(h.clone());
            }
        }
        let before = SystemTime::now();
        let h = hash_file(p)?;
        self.reads += 1;
        self.remember(p, m, h.clone(), before);
        Ok(h)
    }

    /// Records `hash` for `p` (metadata `m`), read or written at `at`; a file changed within
    /// [`RACY`] of that is not remembered.
    fn remember(&mut self, p: &Path, m: &Metadata, hash: String, at: SystemTime) {
        let stamp = Stamp::of(m);
        let changed = SystemTime::UNIX_EPOCH
            + Duration::from_nanos(u64::try_from(stamp.ctime_ns.max(0)).unwrap_or(u64::MAX));
        if changed + RACY < at {
            self.map.insert(p.to_path_buf(), (stamp, hash));
        } else {
            self.map.remove(p);
        }
    }

    /// Remembers `hash` (taken while it was written) for a file this side just wrote. No racy
    /// rule here: ferry is the only writer of the copy it receives, and it learns each file
    /// again after writing it.
    pub fn learn(&mut self, p: &Path, hash: String) -> std::io::Result<()> {
        let m = std::fs::symlink_metadata(p)?;
        self.map.insert(p.to_path_buf(), (Stamp::of(&m), hash));
        Ok(())
    }
}

/// Lists `root` (paths relative to it, parents before children) with content hashes.
pub fn manifest(root: &Path, cache: &mut HashCache) -> Result<Vec<Entry>, MigrateError> {
    walk(root, &mut |p, m| cache.hash(p, m))
}

/// Lists `root` like [`manifest`], hashing files with `hash_of`.
fn walk(
    root: &Path,
    hash_of: &mut dyn FnMut(&Path, &Metadata) -> std::io::Result<String>,
) -> Result<Vec<Entry>, MigrateError> {
    let dev = std::fs::symlink_metadata(root)
        .map_err(|e| err(format!("{}: {e}", root.display())))?
        .dev();
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| err(format!("{}: {e}", dir.display())))?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for name in names {
            let r = rel.join(&name);
            let p = root.join(&r);
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.dev() != dev {
                continue; // a mount inside the rootfs (bind mounts are restored as external mounts)
            }
            let path = r.to_string_lossy().into_owned();
            let mode = m.permissions().mode() & 0o7777;
            let ft = m.file_type();
            let entry = if ft.is_dir() {
                stack.push(r.clone());
                Entry {
                    path,
                    kind: "d".into(),
                    mode,
                    size: 0,
                    hash: String::new(),
                }
            } else if ft.is_symlink() {
                let target = match std::fs::read_link(&p) {
                    Ok(t) => t,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // gone
                    Err(e) => return Err(err(format!("{}: {e}", p.display()))),
                };
                let t = target.to_string_lossy().into_owned();
                Entry {
                    path,
                    kind: "l".into(),
                    mode,
                    size: t.len() as u64,
                    hash: hash_bytes(t.as_bytes()),
                }
            } else if ft.is_file() {
                let hash = match hash_of(&p, &m) {
                    Ok(h) => h,
                    // Deleted since it was listed (the container runs during the first round).
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(err(format!("{}: {e}", p.display()))),
                };
                Entry {
                    path,
                    kind: "f".into(),
                    mode,
                    size: m.len(),
                    hash,
                }
            } else {
                continue; // device nodes, fifos, sockets are not copied
            };
            out.push(entry);
            if out.len() > MAX_ENTRIES {
                return Err(err(format!(
                    "more than {MAX_ENTRIES} entries in {}",
                    root.display()
                )));
            }
        }
    }
    Ok(out)
}

/// Checks a relative path from the peer: no root, no `..`, no empty or `.` components.
pub fn check_rel(rel: &str) -> Result<PathBuf, MigrateError> {
    let p = Path::new(rel);
    if rel.is_empty() || rel.len() > 4096 || p.is_absolute() {
        return Err(err(format!("bad path {rel:?}")));
    }
    for c in p.components() {
        if !matches!(c, Component::Normal(_)) {
            return Err(err(format!("bad path {rel:?}")));
        }
    }
    Ok(p.to_path_buf())
}

/// Makes sure every parent of `rel` under `root` is a real directory (not a symlink), creating
/// missing ones, and returns the full path.
pub fn safe_target(root: &Path, rel: &str) -> Result<PathBuf, MigrateError> {
    let rel = check_rel(rel)?;
    let mut cur = root.to_path_buf();
    let comps: Vec<_> = rel.components().collect();
    for c in &comps[..comps.len().saturating_sub(1)] {
        cur.push(c);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(err(format!("{} is not a directory", cur.display()))),
            Err(_) => {
                std::fs::create_dir(&cur).map_err(|e| err(format!("{}: {e}", cur.display())))?
            }
        }
    }
    Ok(root.join(rel))
}

/// What the destination needs of `entries`, given its copy at `root`; directories are
/// created here with their modes.
pub fn needed(
    root: &Path,
    entries: &[Entry],
    cache: &mut HashCache,
) -> Result<Vec<String>, MigrateError> {
    let mut need = Vec::new();
    for e in entries {
        let target = safe_target(root, &e.path)?;
        let local = std::fs::symlink_metadata(&target).ok();
        match e.kind.as_str() {
            "d" => {
                match &local {
                    Some(m) if m.is_dir() => {}
                    Some(_) => {
                        std::fs::remove_file(&target)
                            .map_err(|x| err(format!("{}: {x}", target.display())))?;
                        std::fs::create_dir(&target)
                            .map_err(|x| err(format!("{}: {x}", target.display())))?;
                    }
                    None => std::fs::create_dir(&target)
                        .map_err(|x| err(format!("{}: {x}", target.display())))?,
                }
                let _ = std::fs::set_permissions(&target, std::fs::Permissions::from_mode(e.mode));
            }
            "l" => {
                let same = local.as_ref().is_some_and(|m| m.file_type().is_symlink())
                    && std::fs::read_link(&target)
                        .map(|t| hash_bytes(t.to_string_lossy().as_bytes()) == e.hash)
                        .unwrap_or(false);
                if !same {
                    need.push(e.path.clone());
                }
            }
            "f" => {
                let same = local.as_ref().is_some_and(|m| {
                    m.is_file()
                        && m.len() == e.size
                        && cache.hash(&target, m).map(|h| h == e.hash).unwrap_or(false)
                });
                if !same {
                    need.push(e.path.clone());
                } else if local
                    .as_ref()
                    .is_some_and(|m| m.permissions().mode() & 0o7777 != e.mode)
                {
                    let _ =
                        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(e.mode));
                }
            }
            other => return Err(err(format!("unknown entry kind {other:?}"))),
        }
    }
    Ok(need)
}

/// Where a received file is written before it replaces `e.path` (same directory).
pub fn staging_path(root: &Path, e: &Entry) -> Result<(PathBuf, PathBuf), MigrateError> {
    let target = safe_target(root, &e.path)?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = target.with_file_name(format!(".{name}.ferry-tmp"));
    let _ = std::fs::remove_file(&tmp);
    Ok((target, tmp))
}

/// Replaces `e.path` with the staged file (or, for a symlink, a link to `link_target`).
pub fn install(
    root: &Path,
    e: &Entry,
    staged: &Path,
    link_target: Option<&str>,
) -> Result<(), MigrateError> {
    let (target, tmp) = (safe_target(root, &e.path)?, staged);
    if let Ok(m) = std::fs::symlink_metadata(&target) {
        if m.is_dir() {
            remove_local_tree(&target)?;
        }
    }
    if let Some(t) = link_target {
        let _ = std::fs::remove_file(tmp);
        std::os::unix::fs::symlink(t, tmp).map_err(|x| err(format!("{}: {x}", tmp.display())))?;
    } else {
        std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(e.mode))
            .map_err(|x| err(format!("{}: {x}", tmp.display())))?;
    }
    std::fs::rename(tmp, &target).map_err(|x| err(format!("{}: {x}", target.display())))
}

fn remove_local_tree(p: &Path) -> Result<(), MigrateError> {
    crate::runtime::mounts::remove_tree(p).map_err(|e| err(e.to_string()))
}

/// Deletes what `root` has beyond `entries` (the final round). Refuses to touch mounts.
pub fn delete_extra(root: &Path, entries: &[Entry]) -> Result<Vec<String>, MigrateError> {
    let keep: BTreeSet<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    // Only the paths matter here: nothing is hashed.
    let local = walk(root, &mut |_, _| Ok(String::new()))?;
    let mut gone = Vec::new();
    // Deepest first, so a directory is empty by the time it is considered.
    let mut extra: Vec<&Entry> = local
        .iter()
        .filter(|e| !keep.contains(e.path.as_str()))
        .collect();
    extra.sort_by_key(|e| std::cmp::Reverse(e.path.matches('/').count()));
    for e in extra {
        let p = root.join(check_rel(&e.path)?);
        let r = if e.kind == "d" {
            remove_local_tree(&p)
        } else {
            std::fs::remove_file(&p).map_err(err)
        };
        r?;
        gone.push(e.path.clone());
    }
    Ok(gone)
}

/// Index of a manifest by path.
pub fn index(entries: &[Entry]) -> BTreeMap<&str, &Entry> {
    entries.iter().map(|e| (e.path.as_str(), e)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_copies_differences_and_deletes_extras() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("bin")).unwrap();
        std::fs::write(src.path().join("bin/app"), b"v2").unwrap();
        std::os::unix::fs::symlink("app", src.path().join("bin/sh")).unwrap();
        std::fs::write(src.path().join("same"), b"x").unwrap();
        std::fs::write(dst.path().join("same"), b"x").unwrap();
        std::fs::write(dst.path().join("stale"), b"old").unwrap();

        let mut cache = HashCache::default();
        let m = manifest(src.path(), &mut cache).unwrap();
        let need = needed(dst.path(), &m, &mut cache).unwrap();
        assert_eq!(need, vec!["bin/app".to_string(), "bin/sh".to_string()]);
        let idx = index(&m);
        let (_, tmp) = staging_path(dst.path(), idx["bin/app"]).unwrap();
        std::fs::write(&tmp, b"v2").unwrap();
        install(dst.path(), idx["bin/app"], &tmp, None).unwrap();
        let (_, tmp) = staging_path(dst.path(), idx["bin/sh"]).unwrap();
        install(dst.path(), idx["bin/sh"], &tmp, Some("app")).unwrap();
        assert_eq!(
            delete_extra(dst.path(), &m).unwrap(),
            vec!["stale".to_string()]
        );
        assert!(needed(dst.path(), &m, &mut cache).unwrap().is_empty());
        assert_eq!(
            std::fs::read_link(dst.path().join("bin/sh")).unwrap(),
            PathBuf::from("app")
        );
    }

    /// A file is read again only when its stamp changed or when it had changed just before it
    /// was hashed; a rewrite keeping size and mtime is still caught (ctime moves).
    #[test]
    fn unchanged_files_are_not_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old");
        let fresh = dir.path().join("fresh");
        std::fs::write(&old, b"aaaa").unwrap();
        std::fs::write(&fresh, b"bbbb").unwrap();
        // `old` last changed well before it is hashed; `fresh` just now (racy).
        let long_ago = SystemTime::now() - Duration::from_secs(3600);
        let backdate = |p: &Path| {
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(long_ago)
                .unwrap()
        };
        backdate(&old);
        let mut cache = HashCache::default();
        // ctime cannot be set back: remember `old` as if hashed an hour later than it moved.
        let m = std::fs::symlink_metadata(&old).unwrap();
        cache.remember(
            &old,
            &m,
            hash_file(&old).unwrap(),
            SystemTime::now() + RACY * 2,
        );
        let h1 = manifest(dir.path(), &mut cache).unwrap();
        assert_eq!(cache.reads, 1, "only the racy file is read");
        let h2 = manifest(dir.path(), &mut cache).unwrap();
        assert_eq!(
            cache.reads, 2,
            "the racy file is read again, the other is not"
        );
        assert_eq!(h1, h2);

        // Same size, mtime put back: ctime moved, so it is read and the new hash seen.
        std::fs::write(&old, b"cccc").unwrap();
        backdate(&old);
        let h3 = manifest(dir.path(), &mut cache).unwrap();
        assert_eq!(cache.reads, 4);
        let e = |m: &[Entry]| m.iter().find(|e| e.path == "old").unwrap().hash.clone();
        assert_ne!(e(&h1), e(&h3));
        assert_eq!(e(&h3), hash_bytes(b"cccc"));

        // What this side wrote itself is learned and not read again when compared.
        let mut dst = HashCache::default();
        dst.learn(&fresh, hash_bytes(b"bbbb")).unwrap();
        let m = std::fs::symlink_metadata(&fresh).unwrap();
        assert_eq!(dst.hash(&fresh, &m).unwrap(), hash_bytes(b"bbbb"));
        assert_eq!(dst.reads, 0);
    }

    #[test]
    fn hostile_paths_are_refused() {
        let dst = tempfile::tempdir().unwrap();
        for bad in ["../etc/passwd", "/etc/passwd", "a/../../b", "", "./x"] {
            assert!(check_rel(bad).is_err(), "{bad}");
        }
        // never through a symlinked parent
        std::os::unix::fs::symlink("/etc", dst.path().join("evil")).unwrap();
        assert!(safe_target(dst.path(), "evil/passwd").is_err());
    }
}
