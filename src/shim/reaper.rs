//! Waiting for child exits through containerd-shim's subreaper monitor.
//!
//! The crate's SIGCHLD handler reaps every child of the shim with `waitpid(-1)` and publishes
//! the exit on its monitor; a `Command::wait` of our own would race it. So every wait here is
//! a subscription to the monitor, taken *before* the process is spawned (an exit that happens
//! before we know the pid is then still in the subscription's queue), filtered by pid.

use std::collections::HashMap;

use containerd_shim::monitor::{
    monitor_subscribe, monitor_unsubscribe, Subject, Subscription, Topic,
};

use super::error::{Result, ShimError};

/// A subscription to process exits. Take it before spawning what you will wait for.
pub struct ExitWatch {
    sub: Option<Subscription>,
    /// Exits seen while waiting for another pid.
    seen: HashMap<i32, i32>,
    /// Whether exits of other pids are remembered (until the pids that matter are known).
    remember: bool,
}

/// Most exits of other processes remembered while waiting for one (each is 8 bytes; a watch
/// lives for one spawn, so this is only reached if thousands of processes die meanwhile).
const MAX_SEEN: usize = 4096;

impl ExitWatch {
    pub async fn new() -> Result<ExitWatch> {
        let sub = monitor_subscribe(Topic::Pid)
            .await
            .map_err(|e| ShimError::Internal(format!("subscribing to exits: {e}")))?;
        Ok(ExitWatch {
            sub: Some(sub),
            seen: HashMap::new(),
            remember: true,
        })
    }

    /// Waits for `pid` to exit; returns its exit code (128 + signal for a killed process).
    pub async fn wait(&mut self, pid: i32) -> i32 {
        if let Some(code) = self.seen.remove(&pid) {
            return code;
        }
        let sub = self.sub.as_mut().expect("subscription");
        loop {
            match sub.rx.recv().await {
                Some(ev) => {
                    let Subject::Pid(p) = ev.subject else {
                        continue;
                    };
                    if p == pid {
                        return ev.exit_code;
                    }
                    if self.remember && self.seen.len() < MAX_SEEN {
                        self.seen.insert(p, ev.exit_code);
                    }
                }
                // The monitor never drops its senders while we are subscribed.
                None => std::future::pending::<()>().await,
            }
        }
    }

    /// Forgets the exits of other processes remembered so far and stops remembering new
    /// ones (once the pids that matter are known, the rest is noise).
    pub fn forget_others(&mut self, keep: &[i32]) {
        self.seen.retain(|p, _| keep.contains(p));
        self.remember = false;
    }
}

impl Drop for ExitWatch {
    fn drop(&mut self) {
        if let Some(sub) = self.sub.take() {
            let id = sub.id;
            drop(sub);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = monitor_unsubscribe(id).await;
                });
            }
        }
    }
}
