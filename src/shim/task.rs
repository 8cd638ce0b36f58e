//! The shim's model of its one container: the init process and the exec processes, each with
//! a status, an exit once it has one, and its stdio.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use containerd_shim::api::Status;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::watch;

use super::io::{ProcessIo, StdioSpec};

/// How and when a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub status: u32,
    pub at: SystemTime,
}

impl Exit {
    pub fn now(status: u32) -> Exit {
        Exit {
            status,
            at: SystemTime::now(),
        }
    }

    pub fn timestamp(&self) -> Timestamp {
        timestamp(self.at)
    }
}

pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = d.as_secs() as i64;
    ts.nanos = d.subsec_nanos() as i32;
    ts
}

/// One process of the container (init or exec).
pub struct Proc {
    pub pid: i32,
    pub status: Status,
    pub stdio: StdioSpec,
    pub io: ProcessIo,
    /// Exec processes: the OCI process spec (JSON) containerd sent.
    pub spec: Option<Vec<u8>>,
    exit_tx: watch::Sender<Option<Exit>>,
}

impl Proc {
    pub fn new(stdio: StdioSpec) -> Proc {
        let (exit_tx, _) = watch::channel(None);
        Proc {
            pid: 0,
            status: Status::CREATED,
            stdio,
            io: ProcessIo::default(),
            spec: None,
            exit_tx,
        }
    }

    pub fn exit(&self) -> Option<Exit> {
        *self.exit_tx.borrow()
    }

    /// Records the exit (once) and wakes every `wait`.
    pub fn set_exited(&mut self, exit: Exit) {
        self.status = Status::STOPPED;
        if self.exit().is_none() {
            self.exit_tx.send_replace(Some(exit));
        }
    }

    /// A receiver that sees the exit when it comes.
    pub fn exit_watch(&self) -> watch::Receiver<Option<Exit>> {
        self.exit_tx.subscribe()
    }
}

/// The container this shim serves.
pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    /// Whether the shim mounted `rootfs` (and so must unmount it).
    pub rootfs_mounted: bool,
    /// A running container handed over by `ferry serve --containerd` (not our child).
    pub adopted: bool,
    /// Images to restore from on Start (CreateTaskRequest.checkpoint).
    pub checkpoint: Option<PathBuf>,
    pub init: Proc,
    pub execs: HashMap<String, Proc>,
}

impl Container {
    /// The process named by an exec id ("" is init).
    pub fn process(&self, exec_id: &str) -> Option<&Proc> {
        if exec_id.is_empty() {
            Some(&self.init)
        } else {
            self.execs.get(exec_id)
        }
    }

    pub fn process_mut(&mut self, exec_id: &str) -> Option<&mut Proc> {
        if exec_id.is_empty() {
            Some(&mut self.init)
        } else {
            self.execs.get_mut(exec_id)
        }
    }
}

/// Waits for a process that is not our child to exit (pidfd; polling /proc where pidfds are
/// missing) and returns its exit code as a waitpid would: the status field of its
/// /proc/<pid>/stat while it is a zombie, 255 when it was reaped before we could look.
pub async fn wait_foreign(pid: i32) -> i32 {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1; it
    // touches no memory of ours.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let mut watched = false;
    if raw >= 0 {
        // SAFETY: `raw` is a descriptor pidfd_open just created; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, so it stays open and refers to
        // the same pidfd for the AsyncFd's whole life, and as_raw_fd always returns it.
        if let Ok(afd) = unsafe { tokio::io::unix::AsyncFd::register(fd) } {
            // Readable once the process has exited.
            let _ = afd.readable().await;
            watched = true;
        }
    }
    if !watched {
        while zombie_status(pid).is_none() && std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    zombie_status(pid).unwrap_or(255)
}

/// The exit code of a zombie from /proc/<pid>/stat (field 52, a wait status).
fn zombie_status(pid: i32) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_zombie_status(&text)
}

fn parse_zombie_status(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state).
    if f.first() != Some(&"Z") {
        return None;
    }
    let st: i32 = f.get(52 - 3)?.parse().ok()?;
    Some(if st & 0x7f == 0 {
        (st >> 8) & 0xff
    } else {
        128 + (st & 0x7f)
    })
}

/// Maps CRIU-style cgroups mode words (runc's CheckpointOptions.cgroups_mode).
pub fn cgroups_mode(word: &str) -> Option<crate::pb::CriuCgMode> {
    use crate::pb::CriuCgMode;
    match word {
        "soft" => Some(CriuCgMode::SOFT),
        "full" => Some(CriuCgMode::FULL),
        "strict" => Some(CriuCgMode::STRICT),
        "ignore" => Some(CriuCgMode::IGNORE),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_is_recorded_once() {
        let mut p = Proc::new(StdioSpec::default());
        let rx = p.exit_watch();
        assert!(rx.borrow().is_none());
        p.set_exited(Exit::now(3));
        p.set_exited(Exit::now(9));
        assert_eq!(p.exit().unwrap().status, 3);
        assert_eq!(rx.borrow().unwrap().status, 3);
        assert_eq!(p.status, Status::STOPPED);
    }

    #[test]
    fn zombie_exit_codes() {
        let mut fields = vec!["0"; 50];
        fields[0] = "Z";
        fields[49] = "9"; // killed by SIGKILL
        let stat = format!("12 (sh) {}", fields.join(" "));
        assert_eq!(parse_zombie_status(&stat), Some(137));
        fields[49] = "768"; // exit(3)
        let stat = format!("12 (a) b) {}", fields.join(" "));
        assert_eq!(parse_zombie_status(&stat), Some(3));
        fields[0] = "S";
        assert_eq!(
            parse_zombie_status(&format!("1 (x) {}", fields.join(" "))),
            None
        );
    }

    #[test]
    fn modes() {
        assert!(cgroups_mode("soft").is_some());
        assert!(cgroups_mode("").is_none());
        assert!(cgroups_mode("bogus").is_none());
    }
}
