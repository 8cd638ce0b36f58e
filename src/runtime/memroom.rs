//! Whether a host has room for a container's memory: checked on a migration's destination
//! when it prepares, before the source freezes.
//!
//! A restore allocates the container's anonymous and shared memory again. Where the
//! destination has no room for it, a stop-copy restore is killed by the OOM killer after the
//! freeze and the whole transfer (the source then resumes), and a post-copy one once the
//! container already runs there and its pages arrive: after the commit, when the source is
//! gone. A dump that writes its pages into the destination's work dir (all modes but
//! post-copy) needs room on that filesystem too, or it fails after the freeze.

use std::path::{Path, PathBuf};

use super::cgroups::{check_path, existing_up_from, is_unlimited, CGROUP_FS};

/// Longest memory.stat or /proc/meminfo read (each is 1–3 KiB).
const MAX_STAT: u64 = 64 * 1024;

fn read_text(path: &Path) -> Option<String> {
    crate::capped::read_capped(path, MAX_STAT)
        .ok()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// The number on the line `key N` of a cgroup's memory.stat.
fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// The host's free memory, from /proc/meminfo: MemAvailable (None where the kernel does not
/// show it) and SwapFree, which counts as room too.
struct HostFree {
    available: Option<u64>,
    swap: u64,
}

impl HostFree {
    fn read() -> HostFree {
        let meminfo = read_text(Path::new("/proc/meminfo")).unwrap_or_default();
        HostFree {
            available: meminfo_bytes(&meminfo, "MemAvailable"),
            swap: meminfo_bytes(&meminfo, "SwapFree").unwrap_or(0),
        }
    }

    /// MemAvailable and free swap together, when the kernel shows the former.
    fn room(&self) -> Option<u64> {
        self.available.map(|a| a.saturating_add(self.swap))
    }

    /// What [`Self::room`] counts, as its message names it.
    fn counted(&self) -> &'static str {
        if self.swap > 0 {
            "MemAvailable + SwapFree"
        } else {
            "MemAvailable"
        }
    }
}

/// The bytes on the line `Key:   N kB` of /proc/meminfo.
fn meminfo_bytes(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        let kib: u64 =
            (k == key).then(|| v.trim().trim_end_matches("kB").trim().parse().ok())??;
        Some(kib.saturating_mul(1024))
    })
}

/// Bytes the tasks of the container whose memory cgroup is `dir` hold that a restore
/// allocates again: anonymous and shared memory (memory.stat: v1 `total_rss` +
/// `total_shmem`, v2 `anon` + `shmem`). None where the cgroup shows neither.
pub fn held(dir: &Path) -> Option<u64> {
    let text = read_text(&dir.join("memory.stat"))?;
    let sum = |anon, shmem| {
        Some(stat_value(&text, anon)?.saturating_add(stat_value(&text, shmem).unwrap_or(0)))
    };
    sum("total_rss", "total_shmem").or_else(|| sum("anon", "shmem"))
}

/// What a migration's dumps write into the destination's work dir, besides CRIU's small
/// images: the container's memory (every mode but post-copy, whose pages stay at the
/// source until fetched) and its ghost files (see [`ghost_bytes`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DumpBytes {
    pub memory: u64,
    pub ghosts: u64,
}

impl DumpBytes {
    pub fn total(&self) -> u64 {
        self.memory.saturating_add(self.ghosts)
    }

    /// The start of a refusal: what the container has that the dump writes.
    fn what(&self) -> String {
        match (self.memory, self.ghosts) {
            (m, 0) => format!(
                "the container holds {} of memory, which its dump writes",
                size(m)
            ),
            (0, g) => format!(
                "the container keeps {} of deleted files open, which its dump copies",
                size(g)
            ),
            (m, g) => format!(
                "the container holds {} of memory and keeps {} of deleted files open, which its \
                 dump writes",
                size(m),
                size(g)
            ),
        }
    }
}

/// Most open files [`ghost_bytes`] looks at, over all the processes.
const MAX_FDS: usize = 1 << 20;

/// Bytes of the deleted files that the processes `pids` keep open, which a dump copies into
/// its images (CRIU's ghost files): those of at most `limit` bytes (a larger one fails the
/// dump anyway), each counted once and by the blocks it has (a sparse file's holes are not
/// copied). memfd files are left out: their memory is the cgroup's shmem, counted already.
pub fn ghost_bytes(pids: &[i32], limit: u64) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let (mut total, mut looked) = (0u64, 0usize);
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            looked += 1;
            if looked > MAX_FDS {
                return total;
            }
            let path = fd.path();
            // The open file itself (the magic link leads to it even when deleted).
            let Ok(m) = std::fs::metadata(&path) else {
                continue;
            };
            if !m.is_file() || m.nlink() != 0 || m.len() > limit {
                continue;
            }
            let memfd = std::fs::read_link(&path)
                .is_ok_and(|t| t.as_os_str().as_bytes().starts_with(b"/memfd:"));
            if !memfd && seen.insert((m.dev(), m.ino())) {
                total = total.saturating_add(m.len().min(m.blocks().saturating_mul(512)));
            }
        }
    }
    total
}

/// A memory cgroup's limit and the part of it in use that its kernel cannot reclaim without
/// swapping (the charge minus file pages that are not shared memory).
struct Limit {
    file: &'static str,
    limit: u64,
    used: u64,
}

impl Limit {
    /// What is left under it (free swap counting as room), less `claimed` bytes.
    fn room(&self, swap: u64, claimed: u64) -> u64 {
        self.limit
            .saturating_sub(self.used)
            .saturating_add(swap)
            .saturating_sub(claimed)
    }
}

/// The limit of the memory cgroup `dir` (v1 `memory.limit_in_bytes`, v2 `memory.max`), None
/// where it has none.
fn limit_of(dir: &Path) -> Option<Limit> {
    let layouts = [
        (
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
            "total_cache",
            "total_shmem",
        ),
        ("memory.max", "memory.current", "file", "shmem"),
    ];
    for (file, usage, cache, shmem) in layouts {
        let Some(limit) = read_text(&dir.join(file)) else {
            continue;
        };
        let limit = limit.trim();
        if is_unlimited(limit) {
            return None;
        }
        let limit: u64 = limit.parse().ok()?;
        let usage: u64 = read_text(&dir.join(usage))?.trim().parse().ok()?;
        let stat = read_text(&dir.join("memory.stat")).unwrap_or_default();
        let file_pages = stat_value(&stat, cache)
            .unwrap_or(0)
            .saturating_sub(stat_value(&stat, shmem).unwrap_or(0));
        return Some(Limit {
            file,
            limit,
            used: usage.saturating_sub(file_pages),
        });
    }
    None
}

/// "64.0 MiB", "1.5 GiB", "512 KiB".
pub(crate) fn size(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if b >= KIB * KIB * KIB {
        format!("{:.1} GiB", b / (KIB * KIB * KIB))
    } else if b >= KIB * KIB {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else {
        format!("{} KiB", bytes / 1024)
    }
}

/// Room a host gave a migration under way for its container's memory: the memory cgroup
/// its container will have (`dir`) and the bytes it holds. Until they arrive there, the same
/// room cannot be given to another migration.
#[derive(Debug, Clone)]
pub struct Claim {
    pub dir: PathBuf,
    pub bytes: u64,
}

impl Claim {
    /// What has not arrived yet: the bytes less what the container's memory cgroup holds
    /// already (all of them before its restore made it).
    fn outstanding(&self) -> u64 {
        self.bytes.saturating_sub(held(&self.dir).unwrap_or(0))
    }
}

/// The outstanding bytes of `claims` (those under `within`, where given) and their count.
fn claimed(claims: &[Claim], within: Option<&Path>) -> (u64, usize) {
    tally(
        claims
            .iter()
            .filter(|c| within.map_or(true, |w| c.dir.starts_with(w)))
            .map(Claim::outstanding),
    )
}

/// The sum of the non-zero `outstanding` bytes and their count.
fn tally(outstanding: impl Iterator<Item = u64>) -> (u64, usize) {
    outstanding
        .filter(|&b| b > 0)
        .fold((0, 0), |(sum, n), b| (sum.saturating_add(b), n + 1))
}

/// ", 64.0 MiB claimed by 1 migration under way" for a non-zero claim; "" for none.
fn claimed_note((bytes, n): (u64, usize)) -> String {
    match n {
        0 => String::new(),
        1 => format!(", {} claimed by 1 migration under way", size(bytes)),
        n => format!(", {} claimed by {n} migrations under way", size(bytes)),
    }
}

/// Whether this host has room for `bytes` of a container's memory in a memory cgroup to be
/// made at `dir`: room in the host (MemAvailable) and under every limit of the existing
/// ancestors of `dir` (cgroup limits are hierarchical), less what `claims` of other
/// migrations under way still need there. Free swap counts as room, for the host and for
/// each limit alike (a v1 memory+swap limit is not looked at), so only a host that clearly
/// lacks the room is refused.
pub fn check(dir: &Path, bytes: u64, claims: &[Claim]) -> Result<(), String> {
    check_path(dir).map_err(|e| e.to_string())?;
    let host = HostFree::read();
    if let Some(free) = host.room() {
        let others = claimed(claims, None);
        let room = free.saturating_sub(others.0);
        if bytes > room {
            return Err(format!(
                "the container holds {} of memory and this host has only {} available ({} in \
                 /proc/meminfo{})",
                size(bytes),
                size(room),
                host.counted(),
                claimed_note(others)
            ));
        }
    }
    let ancestors = existing_up_from(dir).filter(|a| *a != dir);
    fits_limits(ancestors, bytes, host.swap, claims)
}

/// [`check`]'s test of the limits of the cgroup directories `dirs`.
fn fits_limits<'a>(
    dirs: impl Iterator<Item = &'a Path>,
    bytes: u64,
    swap: u64,
    claims: &[Claim],
) -> Result<(), String> {
    for dir in dirs {
        let Some(l) = limit_of(dir) else { continue };
        let others = claimed(claims, Some(dir));
        let room = l.room(swap, others.0);
        if bytes > room {
            return Err(format!(
                "the container holds {} of memory and the memory cgroup {} has room for only \
                 {} ({} {}, {} of it in use{})",
                size(bytes),
                dir.display(),
                size(room),
                l.file,
                size(l.limit),
                size(l.used),
                claimed_note(others)
            ));
        }
    }
    Ok(())
}

/// Whether `work` is on a tmpfs, whose files are held in memory (Debian's `/run`, where
/// `ferry serve`'s default work dir is).
pub fn in_memory(work: &Path) -> bool {
    use nix::sys::statfs::{statfs, TMPFS_MAGIC};
    statfs(work).is_ok_and(|st| st.filesystem_type() == TMPFS_MAGIC)
}

/// This process's memory cgroup directory, from `/proc/self/cgroup` (the v1 `memory` line,
/// else the v2 one on a v2-only host).
fn own_memory_cgroup() -> Option<PathBuf> {
    let text = read_text(Path::new("/proc/self/cgroup"))?;
    let v2_only = Path::new(CGROUP_FS).join("cgroup.controllers").exists();
    text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        let rel = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            Some(Path::new(CGROUP_FS).join("memory").join(rel))
        } else if v2_only && controllers.is_empty() {
            Some(Path::new(CGROUP_FS).join(rel))
        } else {
            None
        }
    })
}

/// Whether the `bytes` of pages a dump writes into the work dir `work`, a tmpfs (see
/// [`in_memory`]), fit in memory besides the container's own `bytes` (which [`check`]
/// counted): the host needs room for both (MemAvailable, less what `claims` and the
/// `disk` claims of other migrations under way still need), and the files are charged to
/// `ferry serve`'s own memory cgroup, so its limits (and its ancestors') must hold them.
pub fn check_pages_in_memory(
    work: &Path,
    dump: &DumpBytes,
    claims: &[Claim],
    disk: &[DiskClaim],
) -> Result<(), String> {
    let pages = pending(disk);
    let bytes = dump.total();
    let refuse = |where_: String| {
        format!(
            "{} into the work dir {}, a tmpfs (its files are held in memory), and {where_}",
            dump.what(),
            work.display(),
        )
    };
    let host = HostFree::read();
    if let Some(free) = host.room() {
        let others = claimed(claims, None);
        let room = free
            .saturating_sub(others.0)
            .saturating_sub(pages.0)
            .saturating_sub(bytes);
        if bytes > room {
            return Err(refuse(format!(
                "this host has only {} available for them besides the restored memory ({} in \
                 /proc/meminfo{})",
                size(room),
                host.counted(),
                claimed_note((others.0.saturating_add(pages.0), others.1.max(pages.1))),
            )));
        }
    }
    let Some(own) = own_memory_cgroup() else {
        return Ok(());
    };
    for dir in existing_up_from(&own) {
        let Some(l) = limit_of(dir) else { continue };
        let room = l.room(host.swap, pages.0);
        if bytes > room {
            return Err(refuse(format!(
                "ferry serve's memory cgroup {}, which they are charged to, has room for only \
                 {} ({} {}, {} of it in use{})",
                dir.display(),
                size(room),
                l.file,
                size(l.limit),
                size(l.used),
                claimed_note(pages)
            )));
        }
    }
    Ok(())
}

/// Room a migration under way was given on the destination's disk for the pages its dumps
/// write there: its session's work dir and the container's memory in bytes. Until they are
/// written, the same room cannot be given to another migration.
#[derive(Debug, Clone)]
pub struct DiskClaim {
    pub dir: PathBuf,
    pub bytes: u64,
}

impl DiskClaim {
    /// What has not been written yet.
    fn outstanding(&self) -> u64 {
        self.bytes.saturating_sub(bytes_under(&self.dir))
    }
}

/// What `claims` have still to write, and how many of them have something left.
fn pending(claims: &[DiskClaim]) -> (u64, usize) {
    tally(claims.iter().map(DiskClaim::outstanding))
}

/// Most directory entries [`bytes_under`] looks at (a session's images are a few hundred).
const MAX_WALK: usize = 1 << 16;

/// The bytes of the files under `dir` (0 where it does not exist).
fn bytes_under(dir: &Path) -> u64 {
    let (mut total, mut seen) = (0u64, 0usize);
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            seen += 1;
            if seen > MAX_WALK {
                return total;
            }
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                todo.push(e.path());
            } else if m.is_file() {
                total = total.saturating_add(m.len());
            }
        }
    }
    total
}

/// Whether the filesystem of the work dir `work` has room for `bytes` of page images (free
/// space an unprivileged writer may use), less what `claims` of other migrations under way
/// have still to write there.
pub fn check_disk(work: &Path, dump: &DumpBytes, claims: &[DiskClaim]) -> Result<(), String> {
    match free_on(work) {
        Some(free) => fits_disk(work, free, dump, claims),
        None => Ok(()),
    }
}

/// Less than this free on a filesystem after a failed write: it ran full.
const FULL_BELOW: u64 = 1 << 20;

/// The bytes free (to root) on the filesystem of `dir` when that is less than 1 MiB: after a
/// failed dump into it, the likely cause. `None` when there is more, or it cannot be told.
pub fn ran_full(dir: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    let free = st.blocks_free().saturating_mul(st.fragment_size());
    (free < FULL_BELOW).then_some(free)
}

/// Free space an unprivileged writer may use on the filesystem of `dir`.
fn free_on(dir: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(st.blocks_available().saturating_mul(st.fragment_size()))
}

/// The bytes the filesystem of the work dir `work` can still take, less what `claims` of
/// other migrations have still to write there; `None` when it cannot be told.
pub fn disk_room(work: &Path, claims: &[DiskClaim]) -> Option<u64> {
    Some(room_left(free_on(work)?, claims).0)
}

/// `free` less what `claims` have still to write; and those claims' tally.
fn room_left(free: u64, claims: &[DiskClaim]) -> (u64, (u64, usize)) {
    let others = pending(claims);
    (free.saturating_sub(others.0), others)
}

/// Whether the filesystem of the bundles dir `bundles` has room for `bytes` of rootfs files
/// to copy, besides the page images `claims` (this migration's and others') have still to
/// write into the work dir `work` when that is on the same filesystem.
pub fn check_rootfs(
    bundles: &Path,
    files: RootfsBytes,
    work: &Path,
    claims: &[DiskClaim],
) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let Some(free) = free_on(bundles) else {
        return Ok(());
    };
    let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
    let shared = matches!((dev(bundles), dev(work)), (Some(b), Some(w)) if b == w);
    let kept = if shared { pending(claims).0 } else { 0 };
    fits_rootfs(bundles, free, files, kept)
}

/// What a migration writes into the destination's bundles dir: the rootfs files to copy,
/// and the ghost files (see [`ghost_bytes`]), which the restore writes back into the rootfs
/// and which stay there, deleted, as long as the container keeps them open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RootfsBytes {
    pub copy: u64,
    pub ghosts: u64,
}

/// [`check_rootfs`] with the free bytes and the bytes kept for page images given.
fn fits_rootfs(bundles: &Path, free: u64, files: RootfsBytes, kept: u64) -> Result<(), String> {
    let room = free.saturating_sub(kept);
    if files.copy.saturating_add(files.ghosts) <= room {
        return Ok(());
    }
    let ghosts = if files.ghosts > 0 {
        format!(
            ", and the deleted files it keeps open, which its restore writes back there, take {}",
            size(files.ghosts)
        )
    } else {
        String::new()
    };
    let note = if kept > 0 {
        format!(
            ", {} of it kept for the page images still to come into the work dir on the same \
             filesystem",
            size(kept)
        )
    } else {
        String::new()
    };
    Err(format!(
        "the container's rootfs files to copy take {}{ghosts}, and the filesystem of the \
         bundles dir {} has room for only {} ({} free{note})",
        size(files.copy),
        bundles.display(),
        size(room),
        size(free),
    ))
}

/// [`check_disk`] with the free bytes given.
fn fits_disk(work: &Path, free: u64, dump: &DumpBytes, claims: &[DiskClaim]) -> Result<(), String> {
    let (room, others) = room_left(free, claims);
    if dump.total() > room {
        return Err(format!(
            "{} into the work dir {}, and that filesystem has room for only {} ({} free{})",
            dump.what(),
            work.display(),
            size(room),
            size(free),
            claimed_note(others)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn held_is_anonymous_plus_shared_memory_in_either_layout() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "memory.stat",
            "cache 4096\nrss 8192\nshmem 4096\ntotal_cache 1048576\ntotal_rss 67108864\n\
             total_shmem 4096\n",
        );
        assert_eq!(held(d.path()), Some(64 * MIB + 4096));
        write(
            d.path(),
            "memory.stat",
            "anon 67108864\nfile 9000\nshmem 0\n",
        );
        assert_eq!(held(d.path()), Some(64 * MIB));
        write(d.path(), "memory.stat", "pgfault 3\n");
        assert_eq!(held(d.path()), None);
        assert_eq!(held(&d.path().join("gone")), None);
    }

    #[test]
    fn meminfo_is_read_in_bytes() {
        let text = "MemTotal:       24000000 kB\nMemAvailable:   1000 kB\nSwapFree: 0 kB\n";
        assert_eq!(meminfo_bytes(text, "MemAvailable"), Some(1_024_000));
        assert_eq!(meminfo_bytes(text, "SwapFree"), Some(0));
        assert_eq!(meminfo_bytes(text, "Mem"), None);
    }

    #[test]
    fn limits_count_what_cannot_be_reclaimed() {
        let top = tempfile::tempdir().unwrap();
        let v1 = top.path().join("v1");
        std::fs::create_dir(&v1).unwrap();
        write(&v1, "memory.limit_in_bytes", &(64 * MIB).to_string());
        write(&v1, "memory.usage_in_bytes", &(40 * MIB).to_string());
        // 24 MiB of cache of which 4 MiB shared memory: 20 MiB reclaimable, 20 MiB used.
        write(
            &v1,
            "memory.stat",
            &format!("total_cache {}\ntotal_shmem {}\n", 24 * MIB, 4 * MIB),
        );
        let fits = |dir: &Path, bytes, swap| fits_limits(std::iter::once(dir), bytes, swap, &[]);
        assert!(fits(&v1, 44 * MIB, 0).is_ok());
        let e = fits(&v1, 45 * MIB, 0).unwrap_err();
        assert!(
            e.ends_with(&format!(
                "the memory cgroup {} has room for only 44.0 MiB (memory.limit_in_bytes 64.0 \
                 MiB, 20.0 MiB of it in use)",
                v1.display()
            )),
            "{e}"
        );
        assert!(
            e.starts_with("the container holds 45.0 MiB of memory"),
            "{e}"
        );
        // Free swap is room.
        assert!(fits(&v1, 45 * MIB, MIB).is_ok());

        let v2 = top.path().join("v2");
        std::fs::create_dir(&v2).unwrap();
        write(&v2, "memory.max", &(32 * MIB).to_string());
        write(&v2, "memory.current", &(8 * MIB).to_string());
        write(&v2, "memory.stat", "anon 1\nfile 0\nshmem 0\n");
        assert!(fits(&v2, 24 * MIB, 0).is_ok());
        assert!(fits(&v2, 24 * MIB + 1, 0)
            .unwrap_err()
            .contains("(memory.max 32.0 MiB, 8.0 MiB of it in use)"));
        // No limit: no refusal, whatever the size.
        write(&v2, "memory.max", "max");
        assert!(fits(&v2, u64::MAX, 0).is_ok());
        write(&v1, "memory.limit_in_bytes", "9223372036854771712");
        assert!(fits(&v1, u64::MAX, 0).is_ok());
        // The tightest of several ancestors refuses.
        let dirs = [v2.as_path(), v1.as_path()];
        write(&v1, "memory.limit_in_bytes", &(21 * MIB).to_string());
        let e = fits_limits(dirs.into_iter(), 2 * MIB, 0, &[]).unwrap_err();
        assert!(e.contains(&v1.display().to_string()), "{e}");
    }

    #[test]
    fn room_claimed_by_migrations_under_way_is_not_given_again() {
        let top = tempfile::tempdir().unwrap();
        let limited = top.path().join("prefix");
        std::fs::create_dir(&limited).unwrap();
        write(&limited, "memory.limit_in_bytes", &(100 * MIB).to_string());
        write(&limited, "memory.usage_in_bytes", "0");
        let fits = |bytes, claims: &[Claim]| {
            fits_limits(std::iter::once(limited.as_path()), bytes, 0, claims)
        };
        // A migration into this cgroup was given room for 64 MiB; its container's memory
        // cgroup does not exist yet.
        let a = Claim {
            dir: limited.join("a"),
            bytes: 64 * MIB,
        };
        assert!(fits(64 * MIB, &[]).is_ok());
        let e = fits(64 * MIB, std::slice::from_ref(&a)).unwrap_err();
        assert!(
            e.ends_with(
                "has room for only 36.0 MiB (memory.limit_in_bytes 100.0 MiB, 0 KiB of it in \
                 use, 64.0 MiB claimed by 1 migration under way)"
            ),
            "{e}"
        );
        assert!(fits(36 * MIB, std::slice::from_ref(&a)).is_ok());
        // A claim elsewhere does not take room here.
        let elsewhere = Claim {
            dir: top.path().join("other/b"),
            bytes: 64 * MIB,
        };
        assert!(fits(64 * MIB, std::slice::from_ref(&elsewhere)).is_ok());
        // Once its memory arrived, it is in the cgroup's usage and no longer claimed.
        std::fs::create_dir(&a.dir).unwrap();
        write(&a.dir, "memory.stat", &format!("total_rss {}\n", 64 * MIB));
        write(&limited, "memory.usage_in_bytes", &(64 * MIB).to_string());
        assert!(fits(36 * MIB, std::slice::from_ref(&a)).is_ok());
        let e = fits(37 * MIB, std::slice::from_ref(&a)).unwrap_err();
        assert!(e.ends_with("64.0 MiB of it in use)"), "{e}");
        // Half arrived: half still claimed.
        write(&a.dir, "memory.stat", &format!("total_rss {}\n", 32 * MIB));
        write(&limited, "memory.usage_in_bytes", &(32 * MIB).to_string());
        assert!(fits(36 * MIB, std::slice::from_ref(&a)).is_ok());
        let e = fits(37 * MIB, &[a.clone(), a]).unwrap_err();
        assert!(
            e.contains(", 64.0 MiB claimed by 2 migrations under way)"),
            "{e}"
        );
    }

    fn mem(memory: u64) -> DumpBytes {
        DumpBytes { memory, ghosts: 0 }
    }

    #[test]
    fn a_refusal_names_the_memory_and_the_deleted_files_the_dump_writes() {
        let d = tempfile::tempdir().unwrap();
        let work = d.path();
        let both = DumpBytes {
            memory: 64 * MIB,
            ghosts: 3 * MIB,
        };
        assert_eq!(both.total(), 67 * MIB);
        assert!(fits_disk(work, 67 * MIB, &both, &[]).is_ok());
        let e = fits_disk(work, 66 * MIB, &both, &[]).unwrap_err();
        assert!(
            e.starts_with(
                "the container holds 64.0 MiB of memory and keeps 3.0 MiB of deleted files open, \
                 which its dump writes into the work dir "
            ),
            "{e}"
        );
        let ghosts = DumpBytes {
            memory: 0,
            ghosts: 3 * MIB,
        };
        let e = fits_disk(work, 2 * MIB, &ghosts, &[]).unwrap_err();
        assert!(
            e.starts_with(
                "the container keeps 3.0 MiB of deleted files open, which its dump copies into \
                 the work dir "
            ),
            "{e}"
        );
    }

    /// A child holding a deleted file, a deleted sparse file, a deleted (sparse) file whose
    /// size is over the limit, a linked file and a memfd: only the first two count, the
    /// sparse one by its data, and a file open twice once.
    #[test]
    fn ghost_bytes_are_the_deleted_files_a_dump_copies() {
        use std::os::unix::process::CommandExt;
        let d = tempfile::tempdir().unwrap();
        let open = |name: &str, len: u64, data: usize| {
            let p = d.path().join(name);
            let f = std::fs::File::create(&p).unwrap();
            f.set_len(len).unwrap();
            std::io::Write::write_all(&mut &f, &vec![1u8; data]).unwrap();
            (p, f)
        };
        let (p1, deleted) = open("deleted", 40 * 1024, 40 * 1024);
        let (p2, sparse) = open("sparse", 8 * MIB, 8 * 1024);
        let (p3, big) = open("big", 20 * MIB, 4096);
        let (_p4, linked) = open("linked", 64 * 1024, 64 * 1024);
        for p in [p1, p2, p3] {
            std::fs::remove_file(p).unwrap();
        }
        // SAFETY: a valid C string and flags; the result is checked before use.
        let raw = unsafe { libc::memfd_create(c"ghost-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(
            raw >= 0,
            "memfd_create: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` is a new fd that nothing else owns.
        let memfd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        let mut m = std::fs::File::from(memfd.try_clone().unwrap());
        std::io::Write::write_all(&mut m, &[1u8; 64 * 1024]).unwrap();
        let fds: Vec<std::os::fd::OwnedFd> = vec![
            deleted.try_clone().unwrap().into(),
            deleted.into(),
            sparse.into(),
            big.into(),
            linked.into(),
            memfd,
        ];
        let keep: Vec<i32> = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: the closure only calls fcntl, which is async-signal-safe, on fds this test
        // owns (alive until after spawn), to clear their close-on-exec flag in the child.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &keep {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        drop(fds);
        let pid = i32::try_from(child.id()).unwrap();
        let got = ghost_bytes(&[pid], 16 * MIB);
        let _ = child.kill();
        let _ = child.wait();
        // 40 KiB once, and the sparse file's data: its 8 KiB, not its 8 MiB size. Counting
        // the deleted file twice, the linked file or the memfd (64 KiB each) goes past 80.
        assert!((48 * 1024..80 * 1024).contains(&got), "{got} bytes counted");
        assert_eq!(ghost_bytes(&[], 16 * MIB), 0);
    }

    #[test]
    fn disk_room_counts_what_other_migrations_have_still_to_write() {
        let top = tempfile::tempdir().unwrap();
        let work = top.path();
        assert!(fits_disk(work, 100 * MIB, &mem(100 * MIB), &[]).is_ok());
        let e = fits_disk(work, 100 * MIB, &mem(101 * MIB), &[]).unwrap_err();
        assert_eq!(
            e,
            format!(
                "the container holds 101.0 MiB of memory, which its dump writes into the work \
                 dir {}, and that filesystem has room for only 100.0 MiB (100.0 MiB free)",
                work.display()
            )
        );
        // Another session was given 64 MiB and has written 16 of them so far.
        let other = work.join("session-a");
        std::fs::create_dir_all(other.join("images")).unwrap();
        std::fs::write(
            other.join("images/pages-1.img"),
            vec![0u8; 16 * MIB as usize],
        )
        .unwrap();
        let a = DiskClaim {
            dir: other,
            bytes: 64 * MIB,
        };
        let claims = std::slice::from_ref(&a);
        assert!(fits_disk(work, 100 * MIB, &mem(52 * MIB), claims).is_ok());
        let e = fits_disk(work, 100 * MIB, &mem(53 * MIB), claims).unwrap_err();
        assert!(
            e.ends_with("room for only 52.0 MiB (100.0 MiB free, 48.0 MiB claimed by 1 migration under way)"),
            "{e}"
        );
        assert_eq!(bytes_under(&work.join("none")), 0);
        assert!(check_disk(&work.join("none"), &mem(u64::MAX), &[]).is_ok());
        // The room reported between pre-copy rounds: free space less the 48 MiB still claimed.
        assert_eq!(room_left(100 * MIB, claims).0, 52 * MIB);
        assert_eq!(room_left(40 * MIB, claims).0, 0);
        assert!(disk_room(work, claims).is_some());
        assert_eq!(disk_room(&work.join("none"), &[]), None);
    }

    fn copy(copy: u64) -> RootfsBytes {
        RootfsBytes { copy, ghosts: 0 }
    }

    #[test]
    fn rootfs_files_fit_besides_the_page_images_on_the_same_filesystem() {
        let d = tempfile::tempdir().unwrap();
        let b = d.path();
        assert!(fits_rootfs(b, 100 * MIB, copy(100 * MIB), 0).is_ok());
        let e = fits_rootfs(b, 100 * MIB, copy(101 * MIB), 0).unwrap_err();
        assert_eq!(
            e,
            format!(
                "the container's rootfs files to copy take 101.0 MiB, and the filesystem of the \
                 bundles dir {} has room for only 100.0 MiB (100.0 MiB free)",
                b.display()
            )
        );
        assert!(fits_rootfs(b, 100 * MIB, copy(36 * MIB), 64 * MIB).is_ok());
        let e = fits_rootfs(b, 100 * MIB, copy(37 * MIB), 64 * MIB).unwrap_err();
        assert!(
            e.ends_with(
                "room for only 36.0 MiB (100.0 MiB free, 64.0 MiB of it kept for the page images \
                 still to come into the work dir on the same filesystem)"
            ),
            "{e}"
        );
        // Page images count only on the same filesystem (a work dir on /proc is not).
        let claim = DiskClaim {
            dir: b.join("session"),
            bytes: u64::MAX / 2,
        };
        let claims = std::slice::from_ref(&claim);
        assert!(check_rootfs(b, copy(1), Path::new("/proc"), claims).is_ok());
        assert!(check_rootfs(b, copy(1), b, claims).is_err());
        assert!(check_rootfs(&b.join("none"), copy(u64::MAX), b, &[]).is_ok());
        // The deleted files the restore writes back count too, and are named.
        let both = RootfsBytes {
            copy: 30 * MIB,
            ghosts: 6 * MIB,
        };
        assert!(fits_rootfs(b, 100 * MIB, both, 64 * MIB).is_ok());
        let e = fits_rootfs(b, 99 * MIB, both, 64 * MIB).unwrap_err();
        assert!(
            e.starts_with(
                "the container's rootfs files to copy take 30.0 MiB, and the deleted files it \
                 keeps open, which its restore writes back there, take 6.0 MiB, and the \
                 filesystem of the bundles dir "
            ),
            "{e}"
        );
    }

    #[test]
    fn sizes_read_as_people_say_them() {
        assert_eq!(size(512 * 1024), "512 KiB");
        assert_eq!(size(64 * MIB), "64.0 MiB");
        assert_eq!(size(3 * 512 * MIB), "1.5 GiB");
    }

    #[test]
    fn only_cgroup_paths_are_checked() {
        assert!(check(Path::new("/tmp/x"), 1, &[]).is_err());
        assert!(check(Path::new("/sys/fs/cgroup/../x"), 1, &[]).is_err());
    }
}
