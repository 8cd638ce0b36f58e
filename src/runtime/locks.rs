//! The file locks a container's processes hold, which CRIU dumps only when asked
//! (`file_locks`; without it the dump fails once the container is frozen), and whether one
//! could be taken again on a restoring host.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Most open files [`held_locks`] looks at, over all the processes.
const MAX_FDS: usize = 1 << 20;

/// One lock, as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    /// The kernel's name of its kind: FLOCK, POSIX, OFDLCK, LEASE, …
    pub kind: String,
    /// Exclusive (a write lock), else shared.
    pub write: bool,
    /// The byte range of a POSIX or OFD lock: first byte, and last (None: to the end).
    pub start: u64,
    pub end: Option<u64>,
}

/// One lock a process holds (or waits for) on one of its open files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLock {
    pub pid: i32,
    pub fd: u32,
    pub lock: Lock,
    /// The file, as /proc shows the descriptor's target (the path in the process's own
    /// mount namespace).
    pub path: PathBuf,
}

/// The locks in a /proc/<pid>/fdinfo/<fd> text, whose `lock:` lines read
/// `lock:\t1: FLOCK  ADVISORY  WRITE 1234 00:2a:56 0 EOF` (`->` before the kind for a
/// waiter).
fn parse_locks(fdinfo: &str) -> Vec<Lock> {
    fdinfo
        .lines()
        .filter_map(|l| l.strip_prefix("lock:"))
        .map(|rest| {
            let w: Vec<&str> = rest
                .split_whitespace()
                .skip(1)
                .skip_while(|w| *w == "->")
                .collect();
            Lock {
                kind: w.first().unwrap_or(&"unknown").to_string(),
                write: w.get(2) == Some(&"WRITE"),
                start: w.get(5).and_then(|v| v.parse().ok()).unwrap_or(0),
                end: w.get(6).and_then(|v| v.parse().ok()),
            }
        })
        .collect()
}

/// Up to `max` of the locks that the processes `pids` hold or wait for on their open files
/// (the kernel lists a flock or OFD lock under the descriptor that took it, a POSIX lock
/// under each descriptor of its process on that file). Processes and descriptors that end
/// meanwhile are passed over.
pub fn held_locks(pids: &[i32], max: usize) -> Vec<HeldLock> {
    let mut found = Vec::new();
    let mut looked = 0usize;
    for &pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
            continue;
        };
        for entry in fds.flatten() {
            looked += 1;
            if looked > MAX_FDS || found.len() >= max {
                return found;
            }
            let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            let Ok(text) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            let locks = parse_locks(&text);
            if locks.is_empty() {
                continue;
            }
            let path = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap_or_default();
            for lock in locks.into_iter().take(max - found.len()) {
                found.push(HeldLock {
                    pid,
                    fd,
                    lock,
                    path: path.clone(),
                });
            }
        }
    }
    found
}

/// Whether some other holder keeps `lock` from being taken on the file at `path` now: the
/// test takes nothing that outlives it (a flock taken is given back with the descriptor;
/// POSIX and OFD locks are only asked about). Kinds other than FLOCK, POSIX and OFDLCK are
/// not tested (false). A FIFO or device at `path` is not opened (an error).
pub fn taken_elsewhere(path: &Path, lock: &Lock) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    if !matches!(lock.kind.as_str(), "FLOCK" | "POSIX" | "OFDLCK") {
        return Ok(false);
    }
    let (file, _) = crate::capped::open_regular(path)?;
    let fd = file.as_raw_fd();
    if lock.kind == "FLOCK" {
        let op = if lock.write {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: flock on a descriptor this function owns; no memory is passed.
        let rc = unsafe { libc::flock(fd, op | libc::LOCK_NB) };
        return match rc {
            0 => Ok(false),
            _ => match std::io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(true),
                e => Err(e),
            },
        };
    }
    // SAFETY: an all-zero flock is a valid value of this plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if lock.write {
        libc::F_WRLCK
    } else {
        libc::F_RDLCK
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = i64::try_from(lock.start).unwrap_or(i64::MAX);
    fl.l_len = match lock.end {
        Some(end) => i64::try_from(end.saturating_sub(lock.start).saturating_add(1)).unwrap_or(0),
        None => 0,
    };
    let cmd = if lock.kind == "POSIX" {
        libc::F_GETLK
    } else {
        libc::F_OFD_GETLK
    };
    // SAFETY: F_GETLK/F_OFD_GETLK read and write the flock struct given, which lives
    // across the call, on a descriptor this function owns.
    if unsafe { libc::fcntl(fd, cmd, &mut fl) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(kind: &str, write: bool, start: u64, end: Option<u64>) -> Lock {
        Lock {
            kind: kind.into(),
            write,
            start,
            end,
        }
    }

    #[test]
    fn lock_lines_name_kind_access_and_range() {
        let plain = "pos:\t0\nflags:\t0100002\nmnt_id:\t31\nino:\t77\n";
        assert_eq!(parse_locks(plain), vec![]);
        let text = format!(
            "{plain}lock:\t1: FLOCK  ADVISORY  WRITE 4242 00:2a:77 0 EOF\n\
             lock:\t2: -> POSIX  ADVISORY  READ 4243 00:2a:77 100 199\n\
             lock:\t3: OFDLCK ADVISORY  READ -1 00:2a:77 7 EOF\n\
             lock:\t4:\n"
        );
        assert_eq!(
            parse_locks(&text),
            vec![
                lock("FLOCK", true, 0, None),
                lock("POSIX", false, 100, Some(199)),
                lock("OFDLCK", false, 7, None),
                lock("unknown", false, 0, None),
            ]
        );
    }

    #[test]
    fn a_lock_this_process_takes_is_found_and_one_given_back_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.lock");
        let f = std::fs::File::create(&path).unwrap();
        let me = [std::process::id() as i32];
        // Other tests of this process may hold locks on their own files meanwhile.
        let on_mine = || -> Vec<HeldLock> {
            held_locks(&me, usize::MAX)
                .into_iter()
                .filter(|l| l.path == path)
                .collect()
        };
        assert_eq!(on_mine(), vec![]);
        let locked = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| e)
            .unwrap();
        let held = on_mine();
        assert_eq!(held.len(), 1, "{held:?}");
        assert_eq!(held[0].pid, me[0]);
        assert_eq!(held[0].lock, lock("FLOCK", true, 0, None));
        let _file = locked.unlock().map_err(|(_, e)| e).unwrap();
        assert_eq!(on_mine(), vec![]);
        assert!(held_locks(&me, 0).is_empty());
    }

    /// flock and OFD locks belong to an open file: one taken through another open of the
    /// same file is in the way of the test's own open, in this process as in any other.
    #[test]
    fn locks_held_through_another_open_are_in_the_way() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.lock");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let holder = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        for kind in ["FLOCK", "OFDLCK", "LEASE"] {
            assert!(
                !taken_elsewhere(&path, &lock(kind, true, 0, None)).unwrap(),
                "{kind}"
            );
        }
        let locked = nix::fcntl::Flock::lock(holder, nix::fcntl::FlockArg::LockSharedNonblock)
            .map_err(|(_, e)| e)
            .unwrap();
        assert!(taken_elsewhere(&path, &lock("FLOCK", true, 0, None)).unwrap());
        assert!(!taken_elsewhere(&path, &lock("FLOCK", false, 0, None)).unwrap());
        let holder = locked.unlock().map_err(|(_, e)| e).unwrap();

        // An OFD write lock on bytes 100..=199.
        use std::os::fd::AsRawFd;
        // SAFETY: an all-zero flock is a valid value of this plain C struct.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = 100;
        fl.l_len = 100;
        assert_eq!(
            // SAFETY: F_OFD_SETLK reads the flock struct given, on a descriptor held open.
            unsafe { libc::fcntl(holder.as_raw_fd(), libc::F_OFD_SETLK, &fl) },
            0
        );
        assert!(taken_elsewhere(&path, &lock("OFDLCK", false, 0, None)).unwrap());
        assert!(taken_elsewhere(&path, &lock("OFDLCK", true, 150, Some(150))).unwrap());
        assert!(!taken_elsewhere(&path, &lock("OFDLCK", true, 200, Some(300))).unwrap());
        assert!(!taken_elsewhere(&path, &lock("OFDLCK", true, 0, Some(99))).unwrap());
        // OFD and POSIX locks share one space: the OFD lock is in a POSIX lock's way.
        assert!(taken_elsewhere(&path, &lock("POSIX", true, 0, None)).unwrap());
        drop(holder);
        assert!(!taken_elsewhere(&path, &lock("OFDLCK", true, 0, None)).unwrap());

        assert!(
            taken_elsewhere(&dir.path().join("missing"), &lock("FLOCK", true, 0, None)).is_err()
        );
        assert!(taken_elsewhere(dir.path(), &lock("FLOCK", true, 0, None)).is_err());
    }
}
