//! CRIU's notifications ("action scripts") and how a caller answers them.
//!
//! With `notify_scripts = true`, CRIU sends a response of type NOTIFY naming a script and waits
//! for a NOTIFY request back. Answering `notify_success = false` fails the operation. Delaying
//! the answer to `post-dump` keeps the dumped tasks frozen: the basis of a safe migration commit.

use std::os::fd::OwnedFd;

/// The scripts CRIU notifies about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Script {
    PreDump,
    PostDump,
    NetworkLock,
    NetworkUnlock,
    PreRestore,
    SetupNamespaces,
    PostSetupNamespaces,
    PostRestore,
    PreResume,
    PostResume,
    /// Carries the master of the restored task's pty (received by SCM_RIGHTS).
    OrphanPtsMaster,
    StatusReady,
    QueryExtFiles,
    Other(String),
}

impl Script {
    pub fn parse(name: &str) -> Script {
        match name {
            "pre-dump" => Script::PreDump,
            "post-dump" => Script::PostDump,
            "network-lock" => Script::NetworkLock,
            "network-unlock" => Script::NetworkUnlock,
            "pre-restore" => Script::PreRestore,
            "setup-namespaces" => Script::SetupNamespaces,
            "post-setup-namespaces" => Script::PostSetupNamespaces,
            "post-restore" => Script::PostRestore,
            "pre-resume" => Script::PreResume,
            "post-resume" => Script::PostResume,
            "orphan-pts-master" => Script::OrphanPtsMaster,
            "status-ready" => Script::StatusReady,
            "query-ext-files" => Script::QueryExtFiles,
            other => Script::Other(other.to_string()),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Script::PreDump => "pre-dump",
            Script::PostDump => "post-dump",
            Script::NetworkLock => "network-lock",
            Script::NetworkUnlock => "network-unlock",
            Script::PreRestore => "pre-restore",
            Script::SetupNamespaces => "setup-namespaces",
            Script::PostSetupNamespaces => "post-setup-namespaces",
            Script::PostRestore => "post-restore",
            Script::PreResume => "pre-resume",
            Script::PostResume => "post-resume",
            Script::OrphanPtsMaster => "orphan-pts-master",
            Script::StatusReady => "status-ready",
            Script::QueryExtFiles => "query-ext-files",
            Script::Other(s) => s,
        }
    }
}

impl std::fmt::Display for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One notification from CRIU.
#[derive(Debug)]
pub struct Notification {
    pub script: Script,
    /// Set for setup-namespaces and post-restore: the (restored) root task's pid.
    pub pid: Option<i32>,
    /// Set for orphan-pts-master: the pty master.
    pub fd: Option<OwnedFd>,
}

/// A decision that is taken later: called on the RPC thread, blocks until it is known.
pub type Deferred = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// How to answer a notification.
pub enum Reply {
    Success,
    Failure(String),
    /// Keep CRIU waiting (e.g. the dumped tasks frozen) until the closure returns; then answer
    /// success for `Ok` and failure for `Err`. No RPC timeout applies while holding.
    Hold(Deferred),
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Success => f.write_str("Success"),
            Reply::Failure(r) => write!(f, "Failure({r})"),
            Reply::Hold(_) => f.write_str("Hold"),
        }
    }
}

/// Answers CRIU's notifications.
pub trait Notify {
    fn notify(&mut self, n: Notification) -> Reply;
}

/// Answers success to everything.
pub struct AcceptAll;

impl Notify for AcceptAll {
    fn notify(&mut self, _n: Notification) -> Reply {
        Reply::Success
    }
}

impl<F: FnMut(Notification) -> Reply> Notify for F {
    fn notify(&mut self, n: Notification) -> Reply {
        self(n)
    }
}
