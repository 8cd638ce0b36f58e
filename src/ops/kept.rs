//! The work dirs of failed operations, kept for the operator (CRIU's logs), bounded.
//!
//! A failed restore, migration or received migration keeps its work dir — CRIU's logs,
//! never images — so that the operator can read why. `/run` is a tmpfs (memory), and a
//! script that retries a failing migration every minute would fill it; so each new failure
//! prunes the oldest kept dirs beyond [`KEEP`]. A dir is only a candidate when it cannot be
//! in use: its operation's process is gone (`<op>-<id>-<pid>` under `/run/ferry`) or, for
//! `ferry serve`'s sessions, the caller says so. Removal never crosses a mount point.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::runtime::mounts::remove_tree;

/// Failed operations' dirs kept per directory (the newest).
pub const KEEP: usize = 16;

/// Prefixes of the per-process work dirs under `/run/ferry` (`<prefix><id>-<pid>`).
const OP_PREFIXES: [&str; 3] = ["restore-", "migrate-", "shim-restore-"];

/// Prunes `dir`'s failed-operation dirs (see the module doc) down to the newest `keep`.
/// Returns how many went. Failures to remove are logged, not returned: pruning never fails
/// the operation that triggers it.
pub fn prune_failed_ops(dir: &Path, keep: usize) -> usize {
    prune(dir, keep, &|name| {
        OP_PREFIXES.iter().any(|p| name.starts_with(p)) && owner_gone(name)
    })
}

/// Removes the dirs of `dir` for which `candidate(name)` holds, oldest (by modification
/// time) first, until the newest `keep` of them are left; other entries are never touched.
pub fn prune(dir: &Path, keep: usize, candidate: &dyn Fn(&str) -> bool) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    // Only candidates count towards `keep`, and only they can go.
    let mut found: Vec<(SystemTime, PathBuf)> = Vec::new();
    for e in rd.flatten() {
        let Ok(meta) = e.path().symlink_metadata() else {
            continue;
        };
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if meta.is_dir() && candidate(&name) {
            let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            found.push((mtime, e.path()));
        }
    }
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    let mut removed = 0;
    for (_, path) in found.into_iter().skip(keep) {
        match remove_tree(&path) {
            Ok(()) => removed += 1,
            Err(e) => tracing::warn!("pruning kept logs: {e}"),
        }
    }
    if removed > 0 {
        tracing::info!(
            removed,
            dir = %dir.display(),
            "pruned the oldest failed operations' logs (the newest {keep} stay)"
        );
    }
    removed
}

/// `<prefix><id>-<pid>`: whether process `pid` is gone (a name without a pid: not ours).
fn owner_gone(name: &str) -> bool {
    let Some(pid) = name.rsplit('-').next().and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    pid > 0 && !Path::new("/proc").join(pid.to_string()).exists()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn dead_pid() -> u32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    }

    fn mkdir_aged(dir: &Path, name: &str, age_s: u64) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("restore.log"), b"log").unwrap();
        let t = SystemTime::now() - Duration::from_secs(age_s);
        std::fs::File::open(&p).unwrap().set_modified(t).unwrap();
        p
    }

    #[test]
    fn the_newest_failures_stay_and_live_or_foreign_dirs_are_never_touched() {
        let tmp = tempfile::tempdir().unwrap();
        let dead = dead_pid();
        let mut old = Vec::new();
        for i in 0..20u64 {
            // i = 0 is the newest.
            old.push(mkdir_aged(
                tmp.path(),
                &format!("restore-c{i}-{dead}"),
                100 + i,
            ));
        }
        // The oldest of all, but its process runs (this test): in use.
        let live = mkdir_aged(
            tmp.path(),
            &format!("migrate-c-{}", std::process::id()),
            10_000,
        );
        // Not a per-process work dir (the shim's state, a user's dir).
        let foreign = mkdir_aged(tmp.path(), "containerd", 10_000);
        let no_pid = mkdir_aged(tmp.path(), "restore-by-hand", 10_000);

        assert_eq!(prune_failed_ops(tmp.path(), 16), 4);
        for (i, p) in old.iter().enumerate() {
            assert_eq!(p.exists(), i < 16, "{}", p.display());
        }
        assert!(live.exists() && foreign.exists() && no_pid.exists());
        assert_eq!(prune_failed_ops(tmp.path(), 16), 0);
    }

    #[test]
    fn the_caller_decides_the_candidates() {
        let tmp = tempfile::tempdir().unwrap();
        let a = mkdir_aged(tmp.path(), "session-a", 300);
        let b = mkdir_aged(tmp.path(), "session-b", 200);
        let c = mkdir_aged(tmp.path(), "session-c", 100);
        assert_eq!(prune(tmp.path(), 1, &|n| n != "session-a"), 1);
        assert!(a.exists(), "not a candidate");
        assert!(!b.exists(), "an older candidate beyond keep");
        assert!(c.exists(), "the newest candidate");
        assert_eq!(prune(Path::new("/nonexistent/ferry"), 1, &|_| true), 0);
    }
}
