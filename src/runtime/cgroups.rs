//! The restored container's cgroups: created before CRIU runs, with criu placed inside (CRIU
//! then restores the tasks under `cg_root`), removed again if the restore fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{io_err, RuntimeError};

/// Cgroup directories created for one restore.
#[derive(Debug, Default)]
pub struct CgroupSet {
    created: Vec<PathBuf>,
}

/// Only paths below the cgroup filesystems are touched.
const CGROUP_FS: &str = "/sys/fs/cgroup/";

fn check_path(p: &Path) -> Result<(), RuntimeError> {
    let s = p.to_string_lossy();
    if !s.starts_with(CGROUP_FS) || s.split('/').any(|c| c == "..") {
        return Err(RuntimeError::Cgroup {
            path: p.to_path_buf(),
            why: format!("not a path below {CGROUP_FS}"),
        });
    }
    Ok(())
}

/// Whether a cgroup directory holds processes.
pub fn has_processes(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| !s.trim().is_empty())
        .unwrap_or(false)
}

impl CgroupSet {
    /// Creates every directory of `paths` (controller → dir) that is missing. Fails if one
    /// already holds processes (another container lives there).
    pub fn create(paths: &BTreeMap<String, String>) -> Result<CgroupSet, RuntimeError> {
        let mut set = CgroupSet::default();
        let mut dirs: Vec<PathBuf> = paths.values().map(PathBuf::from).collect();
        dirs.sort();
        dirs.dedup();
        for d in &dirs {
            check_path(d)?;
            if has_processes(d) {
                return Err(RuntimeError::Cgroup {
                    path: d.clone(),
                    why: "already holds processes of another container".into(),
                });
            }
        }
        for d in dirs {
            set.ensure(&d)?;
        }
        Ok(set)
    }

    fn ensure(&mut self, dir: &Path) -> Result<(), RuntimeError> {
        if dir.is_dir() {
            return Ok(());
        }
        if let Some(parent) = dir.parent() {
            if parent.as_os_str().len() > CGROUP_FS.len() {
                self.ensure(parent)?;
            }
        }
        std::fs::create_dir(dir).map_err(io_err("create cgroup", dir))?;
        self.created.push(dir.to_path_buf());
        // A new cgroup v1 cpuset has no cpus/mems: copy the parent's, as runc does.
        if dir.to_string_lossy().contains("/cpuset") {
            for f in ["cpuset.cpus", "cpuset.mems"] {
                let own = dir.join(f);
                let empty = std::fs::read_to_string(&own)
                    .map(|s| s.trim().is_empty())
                    .unwrap_or(false);
                if empty {
                    if let Some(v) = dir
                        .parent()
                        .and_then(|p| std::fs::read_to_string(p.join(f)).ok())
                    {
                        std::fs::write(&own, v.trim()).map_err(io_err("write", &own))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves `pid` into every cgroup of `paths`.
    pub fn enter(paths: &BTreeMap<String, String>, pid: u32) -> Result<(), RuntimeError> {
        let mut dirs: Vec<&String> = paths.values().collect();
        dirs.sort();
        dirs.dedup();
        for d in dirs {
            let procs = Path::new(d).join("cgroup.procs");
            std::fs::write(&procs, pid.to_string()).map_err(io_err("enter cgroup", &procs))?;
        }
        Ok(())
    }

    /// Kills every process left in the directories this set created (a failed or timed-out
    /// restore may leave CRIU's helpers or half-restored tasks behind), thawing a frozen
    /// freezer first, and waits (bounded) until they are empty.
    pub fn kill_all(&self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        for d in &self.created {
            let state = d.join("freezer.state");
            if state.exists() {
                let _ = std::fs::write(&state, "THAWED");
            }
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let mut left = 0;
            for d in &self.created {
                let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    left += 1;
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            if left == 0 || std::time::Instant::now() > deadline {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Removes the directories this set created (deepest first; rmdir only, which the kernel
    /// refuses for a cgroup that still has processes or children).
    pub fn remove(&mut self) {
        while let Some(d) = self.created.pop() {
            if let Err(e) = std::fs::remove_dir(&d) {
                tracing::warn!("cleanup: cannot remove cgroup {}: {e}", d.display());
            }
        }
    }

    /// Keeps the directories (the restore succeeded; runc owns them now).
    pub fn keep(mut self) {
        self.created.clear();
    }
}

/// Whether a freezer cgroup (v1 `freezer.state`, v2 `cgroup.freeze`) is frozen, if readable.
pub fn is_frozen(dir: &Path) -> Option<bool> {
    if let Ok(s) = std::fs::read_to_string(dir.join("freezer.state")) {
        return Some(s.trim() != "THAWED");
    }
    std::fs::read_to_string(dir.join("cgroup.freeze"))
        .ok()
        .map(|s| s.trim() == "1")
}

/// Freezes a freezer cgroup and waits until it is frozen, polling every millisecond.
///
/// CRIU freezes with 100 ms sleeps between checks; a container that ferry froze already is
/// seized at once (CRIU thaws it again after a successful dump, the tasks staying seized).
pub fn freeze(dir: &Path, timeout: std::time::Duration) -> Result<(), RuntimeError> {
    let v1 = dir.join("freezer.state");
    let (file, value) = if v1.exists() {
        (v1, "FROZEN")
    } else {
        (dir.join("cgroup.freeze"), "1")
    };
    std::fs::write(&file, value).map_err(io_err("freeze", &file))?;
    let started = std::time::Instant::now();
    let mut rewritten = started;
    loop {
        if is_frozen_complete(dir) {
            return Ok(());
        }
        if started.elapsed() > timeout {
            let _ = thaw(dir);
            return Err(RuntimeError::Cgroup {
                path: dir.to_path_buf(),
                why: format!("not frozen after {timeout:?}"),
            });
        }
        // A v1 freezer can stall in FREEZING; writing FROZEN again retries it.
        if rewritten.elapsed() > std::time::Duration::from_millis(50) {
            let _ = std::fs::write(&file, value);
            rewritten = std::time::Instant::now();
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Frozen and not in transition (v1 FROZEN, v2 `frozen 1` in cgroup.events).
fn is_frozen_complete(dir: &Path) -> bool {
    if let Ok(s) = std::fs::read_to_string(dir.join("freezer.state")) {
        return s.trim() == "FROZEN";
    }
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map(|s| s.lines().any(|l| l.trim() == "frozen 1"))
        .unwrap_or(false)
}

/// Thaws a freezer cgroup.
pub fn thaw(dir: &Path) -> Result<(), RuntimeError> {
    let v1 = dir.join("freezer.state");
    if v1.exists() {
        return std::fs::write(&v1, "THAWED").map_err(io_err("thaw", &v1));
    }
    let v2 = dir.join("cgroup.freeze");
    std::fs::write(&v2, "0").map_err(io_err("thaw", &v2))
}

/// The cgroup paths of a container restored as `new_id`, derived from the checkpointed ones:
/// a last component equal to the old id is replaced, as runc names a container's cgroup after it.
pub fn renamed_paths(
    paths: &BTreeMap<String, String>,
    old_id: &str,
    new_id: &str,
) -> BTreeMap<String, String> {
    paths
        .iter()
        .map(|(k, v)| {
            let p = Path::new(v);
            let renamed = match p.file_name() {
                Some(n) if n == old_id && old_id != new_id => {
                    p.with_file_name(new_id).to_string_lossy().into_owned()
                }
                _ => v.clone(),
            };
            (k.clone(), renamed)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rename_replaces_only_the_id_component() {
        let mut m = BTreeMap::new();
        m.insert("cpu".to_string(), "/sys/fs/cgroup/cpu/c1".to_string());
        m.insert(
            "memory".to_string(),
            "/sys/fs/cgroup/memory/x/c1".to_string(),
        );
        m.insert("pids".to_string(), "/sys/fs/cgroup/pids/custom".to_string());
        let r = renamed_paths(&m, "c1", "c2");
        assert_eq!(r["cpu"], "/sys/fs/cgroup/cpu/c2");
        assert_eq!(r["memory"], "/sys/fs/cgroup/memory/x/c2");
        assert_eq!(r["pids"], "/sys/fs/cgroup/pids/custom");
    }

    #[test]
    fn paths_outside_cgroupfs_are_refused() {
        let mut m = BTreeMap::new();
        m.insert("cpu".to_string(), "/etc/evil".to_string());
        assert!(CgroupSet::create(&m).is_err());
        m.insert("cpu".to_string(), "/sys/fs/cgroup/../../etc".to_string());
        assert!(CgroupSet::create(&m).is_err());
    }
}
