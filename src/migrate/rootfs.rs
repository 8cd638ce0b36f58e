//! Rootfs synchronisation by content hash.
//!
//! The source lists its rootfs (regular files, directories, symlinks; never crossing into
//! another filesystem or mount), the destination answers which paths differ from its copy,
//! and the source sends those. The final round, during the freeze, also deletes on the
//! destination what the source no longer has. Paths from the peer are relative, checked
//! component by component, and never written through a symlink.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

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

/// Lists `root` (paths relative to it, parents before children).
pub fn manifest(root: &Path) -> Result<Vec<Entry>, MigrateError> {
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
                let target =
                    std::fs::read_link(&p).map_err(|e| err(format!("{}: {e}", p.display())))?;
                let t = target.to_string_lossy().into_owned();
                Entry {
                    path,
                    kind: "l".into(),
                    mode,
                    size: t.len() as u64,
                    hash: hash_bytes(t.as_bytes()),
                }
            } else if ft.is_file() {
                let hash = hash_file(&p).map_err(|e| err(format!("{}: {e}", p.display())))?;
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
pub fn needed(root: &Path, entries: &[Entry]) -> Result<Vec<String>, MigrateError> {
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
                let same = local
                    .as_ref()
                    .is_some_and(|m| m.is_file() && m.len() == e.size)
                    && hash_file(&target).map(|h| h == e.hash).unwrap_or(false);
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
    let local = manifest(root)?;
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

        let m = manifest(src.path()).unwrap();
        let need = needed(dst.path(), &m).unwrap();
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
        assert!(needed(dst.path(), &m).unwrap().is_empty());
        assert_eq!(
            std::fs::read_link(dst.path().join("bin/sh")).unwrap(),
            PathBuf::from("app")
        );
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
