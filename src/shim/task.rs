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
    fn modes() {
        assert!(cgroups_mode("soft").is_some());
        assert!(cgroups_mode("").is_none());
        assert!(cgroups_mode("bogus").is_none());
    }
}
