//! runc's state: the root directory (runc's `--root`) and `<root>/<id>/state.json`.
//!
//! ferry reads runc 1.1's libcontainer state directly: the init pid and its start time (field
//! 22 of /proc/<pid>/stat, which runc checks on every load), the bundle (from the `bundle=`
//! label), the rootfs, the cgroup paths per controller, and the container's stdio. The raw
//! JSON is kept so that a restored container can be handed back to runc with the same state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{read_capped, validate_id, OciError};

/// Default runc root.
pub const DEFAULT_RUNC_ROOT: &str = "/run/runc";
/// Cap on state.json (real ones are a few KiB).
pub const MAX_STATE_JSON: u64 = 4 * 1024 * 1024;
pub const STATE_FILE: &str = "state.json";
/// What `runc start` opens to let a created container's init exec the process.
const EXEC_FIFO: &str = "exec.fifo";

/// A runc state root.
#[derive(Debug, Clone)]
pub struct RuncRoot {
    path: PathBuf,
}

impl RuncRoot {
    /// Opens an existing root, checking that it looks like runc's: a directory whose entries
    /// are container directories holding state.json.
    pub fn open(path: &Path) -> Result<RuncRoot, OciError> {
        let not_runc = |why: String| OciError::NotRuncRoot {
            root: path.to_path_buf(),
            why,
        };
        let meta = std::fs::metadata(path).map_err(|e| not_runc(e.to_string()))?;
        if !meta.is_dir() {
            return Err(not_runc("not a directory".into()));
        }
        let entries = std::fs::read_dir(path).map_err(|e| not_runc(e.to_string()))?;
        for e in entries.flatten().take(10_000) {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if !p.is_dir() {
                return Err(not_runc(format!("{name:?} is not a container directory")));
            }
            if !p.join(STATE_FILE).is_file() && !is_fresh_dir(&p) {
                return Err(not_runc(format!("{name:?} has no {STATE_FILE}")));
            }
        }
        Ok(RuncRoot {
            path: path.to_path_buf(),
        })
    }

    /// Opens the root, creating it (0700) when it does not exist yet (as runc does).
    pub fn open_or_create(path: &Path) -> Result<RuncRoot, OciError> {
        if !path.exists() {
            std::fs::create_dir_all(path).map_err(|source| OciError::Write {
                path: path.to_path_buf(),
                source,
            })?;
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700));
        }
        RuncRoot::open(path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.path.join(id)
    }

    pub fn exists(&self, id: &str) -> bool {
        self.container_dir(id).exists()
    }

    /// Loads a container's state.
    pub fn load(&self, id: &str) -> Result<RuncContainer, OciError> {
        validate_id(id)?;
        let dir = self.container_dir(id);
        let file = dir.join(STATE_FILE);
        if !file.exists() {
            return Err(OciError::UnknownContainer {
                id: id.to_string(),
                root: self.path.clone(),
            });
        }
        let raw: Value =
            serde_json::from_slice(&read_capped(&file, MAX_STATE_JSON)?).map_err(|source| {
                OciError::Json {
                    path: file.clone(),
                    source,
                }
            })?;
        let mut c = RuncContainer::from_raw(id, &file, raw)?;
        // runc's own test for "created": the exec fifo `runc start` opens is still there.
        c.created = dir.join(EXEC_FIFO).exists();
        Ok(c)
    }
}

/// A directory runc may be creating right now (tolerated for a moment while listing).
fn is_fresh_dir(p: &Path) -> bool {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .map(|t| t.elapsed().map(|e| e.as_secs() < 5).unwrap_or(true))
        .unwrap_or(false)
}

/// One container as runc records it.
#[derive(Debug, Clone)]
pub struct RuncContainer {
    pub id: String,
    pub init_pid: i32,
    pub init_start: u64,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    /// Controller (or "" for the cgroup v2 hierarchy) → absolute cgroup directory.
    pub cgroup_paths: BTreeMap<String, String>,
    /// The whole state.json, kept for the hand-back.
    pub raw: Value,
    /// `runc create`d but not started: its init is runc's, waiting on the exec fifo.
    pub created: bool,
}

impl RuncContainer {
    pub fn from_raw(id: &str, file: &Path, raw: Value) -> Result<RuncContainer, OciError> {
        let bad = |what: &str| OciError::BadState {
            path: file.to_path_buf(),
            what: what.to_string(),
        };
        let init_pid = raw["init_process_pid"]
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| bad("no init_process_pid"))?;
        let init_start = raw["init_process_start"]
            .as_u64()
            .ok_or_else(|| bad("no init_process_start"))?;
        let config = &raw["config"];
        let rootfs = config["rootfs"]
            .as_str()
            .ok_or_else(|| bad("no config.rootfs"))?;
        let bundle = config["labels"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l.as_str())
            .find_map(|l| l.strip_prefix("bundle="))
            .ok_or_else(|| bad("no bundle= label in config.labels"))?;
        let cgroup_paths = raw["cgroup_paths"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        Ok(RuncContainer {
            id: id.to_string(),
            init_pid,
            init_start,
            bundle: PathBuf::from(bundle),
            rootfs: PathBuf::from(rootfs),
            cgroup_paths,
            raw,
            created: false,
        })
    }

    /// Checks that the recorded init process is alive and is the same process (runc's test).
    pub fn check_running(&self) -> Result<(), OciError> {
        let not = |why: String| OciError::NotRunning {
            id: self.id.clone(),
            why,
        };
        if self.init_pid <= 0 {
            return Err(not("no init process".into()));
        }
        if self.created {
            return Err(not("created, not started: `runc start` it first".into()));
        }
        match process_start_time(self.init_pid) {
            Ok((start, state)) if start == self.init_start && state != 'Z' && state != 'X' => {
                Ok(())
            }
            Ok((start, state)) if start == self.init_start => {
                Err(not(format!("init is a zombie ({state})")))
            }
            Ok(_) => Err(not(format!(
                "pid {} is another process now: stopped",
                self.init_pid
            ))),
            Err(_) => Err(not("stopped".into())),
        }
    }

    /// The freezer cgroup (cgroup v1), or the v2 cgroup, for CRIU's freeze_cgroup.
    pub fn freeze_cgroup(&self) -> Option<&str> {
        self.cgroup_paths
            .get("freezer")
            .or_else(|| self.cgroup_paths.get(""))
            .map(String::as_str)
    }
}

/// Start time (field 22) and state (field 3) of /proc/<pid>/stat.
pub fn process_start_time(pid: i32) -> std::io::Result<(u64, char)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad /proc stat"))
}

/// Parent pid (field 4) of /proc/<pid>/stat; None where it cannot be read.
pub fn process_parent(pid: i32) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_fields(&text)?.get(1)?.parse().ok()
}

/// The command name of a process (/proc/<pid>/comm), empty where it cannot be read.
pub fn process_comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim_end().to_string())
        .unwrap_or_default()
}

/// The text of /proc/<pid>/status; None where it cannot be read (gone).
pub fn process_status(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status")).ok()
}

/// Why CRIU cannot seize the process `pid`, whose /proc status text is `status` (see
/// [`unseizable_in`]), if it cannot.
pub fn unseizable(pid: i32, status: &str) -> Option<String> {
    let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
    unseizable_in(status, &wchan)
}

/// From a process's /proc status and wchan: stopped by a signal (shown as `T`, or as
/// waiting in `do_signal_stop` once its cgroup is frozen) — the kernel's PTRACE_SEIZE of a
/// stopped task in a frozen cgroup waits until it is continued, so CRIU's dump would hang —
/// or traced by another process (a debugger, strace), which CRIU cannot seize.
fn unseizable_in(status: &str, wchan: &str) -> Option<String> {
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
    };
    if let Some(tracer) = field("TracerPid:").filter(|t| *t != "0") {
        return Some(format!(
            "traced by pid {tracer} (a debugger or strace?): detach it first"
        ));
    }
    let stopped = field("State:").is_some_and(|s| s.starts_with('T'));
    if stopped || wchan.trim() == "do_signal_stop" {
        return Some("stopped by a signal: continue it first (kill -CONT)".into());
    }
    None
}

/// Real, effective and saved user ids, then the same group ids, of a process: the `Uid:`
/// and `Gid:` lines of its /proc status text. None where they cannot be read.
pub fn status_ids(status: &str) -> Option<[u32; 6]> {
    let three = |key: &str| -> Option<[u32; 3]> {
        let line = status.lines().find_map(|l| l.strip_prefix(key))?;
        let mut f = line.split_whitespace().map(|v| v.parse::<u32>());
        Some([f.next()?.ok()?, f.next()?.ok()?, f.next()?.ok()?])
    };
    let (u, g) = (three("Uid:")?, three("Gid:")?);
    Some([u[0], u[1], u[2], g[0], g[1], g[2]])
}

/// The fields of a /proc/<pid>/stat after the command name (field 3 on), which may itself
/// contain spaces and parentheses.
fn stat_fields(text: &str) -> Option<Vec<&str>> {
    Some(text[text.rfind(')')? + 1..].split_whitespace().collect())
}

/// Parses /proc/<pid>/stat: start time (field 22) and state (field 3).
pub fn parse_stat(text: &str) -> Option<(u64, char)> {
    let fields = stat_fields(text)?;
    // fields[0] is field 3 (state); field 22 is fields[19]
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stopped_and_traced_processes_cannot_be_seized() {
        let st = |state: &str, tracer: &str| {
            format!("Name:\tsh\nState:\t{state}\nTgid:\t7\nTracerPid:\t{tracer}\nUid:\t0\n")
        };
        assert_eq!(
            unseizable_in(&st("S (sleeping)", "0"), "hrtimer_nanosleep"),
            None
        );
        assert_eq!(unseizable_in(&st("R (running)", "0"), "0"), None);
        let stopped = unseizable_in(&st("T (stopped)", "0"), "do_signal_stop").unwrap();
        assert!(stopped.contains("stopped by a signal"), "{stopped}");
        // Frozen: the state letter is D, the wait is still the signal stop.
        let frozen = unseizable_in(&st("D (disk sleep)", "0"), "do_signal_stop\n").unwrap();
        assert!(frozen.contains("stopped by a signal"), "{frozen}");
        let traced = unseizable_in(&st("t (tracing stop)", "4242"), "ptrace_stop").unwrap();
        assert!(traced.contains("traced by pid 4242"), "{traced}");
        let me = std::process::id() as i32;
        assert_eq!(unseizable(me, &process_status(me).unwrap()), None);
    }

    #[test]
    fn status_ids_are_real_effective_saved() {
        let status = "Name:\tsh\nUmask:\t0022\nUid:\t1000\t1001\t1002\t1003\n\
                      Gid:\t5\t6\t7\t8\nGroups:\t5 6\n";
        assert_eq!(status_ids(status), Some([1000, 1001, 1002, 5, 6, 7]));
        assert_eq!(status_ids("Uid:\t0\t0\t0\t0\n"), None);
        assert_eq!(status_ids("Uid:\t0\tx\t0\t0\nGid:\t0\t0\t0\t0\n"), None);
        let me = status_ids(&process_status(std::process::id() as i32).unwrap()).unwrap();
        assert_eq!(me[0], nix::unistd::getuid().as_raw());
        assert_eq!(me[3], nix::unistd::getgid().as_raw());
    }

    #[test]
    fn stat_with_odd_command_name() {
        let s =
            "4242 (sh) x (y)) S 1 4242 4242 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_stat(s), Some((987654, 'S')));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(
            process_parent(std::process::id() as i32),
            Some(std::os::unix::process::parent_id() as i32)
        );
    }

    #[test]
    fn root_with_a_stray_file_is_not_runcs() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("notes.txt"), "x").unwrap();
        assert!(matches!(
            RuncRoot::open(d.path()),
            Err(OciError::NotRuncRoot { .. })
        ));
    }

    #[test]
    fn state_fields_are_read() {
        let raw = serde_json::json!({
            "id": "c1", "init_process_pid": 42, "init_process_start": 777,
            "cgroup_paths": {"freezer": "/sys/fs/cgroup/freezer/c1", "": "/sys/fs/cgroup/unified/c1"},
            "config": {"rootfs": "/b/rootfs", "labels": ["bundle=/b"]}
        });
        let c = RuncContainer::from_raw("c1", Path::new("state.json"), raw).unwrap();
        assert_eq!(c.init_pid, 42);
        assert_eq!(c.bundle, PathBuf::from("/b"));
        assert_eq!(c.freeze_cgroup(), Some("/sys/fs/cgroup/freezer/c1"));
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("c1")).unwrap();
        std::fs::write(d.path().join("c1/state.json"), b"{}").unwrap();
        let root = RuncRoot::open(d.path()).unwrap();
        assert!(matches!(root.load("c1"), Err(OciError::BadState { .. })));
        assert!(matches!(
            root.load("c2"),
            Err(OciError::UnknownContainer { .. })
        ));
        assert!(matches!(root.load("../x"), Err(OciError::BadId(_))));
    }
}
