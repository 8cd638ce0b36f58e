//! Talking to CRIU over `criu swrk`.
//!
//! [`swrk::Swrk`] is the transport: a `criu swrk 3` child joined to us by a SOCK_SEQPACKET
//! socketpair, one packed `criu_req`/`criu_resp` per datagram. [`client::Criu`] sends typed
//! requests through it; [`notify`] is how a caller answers CRIU's notifications (including
//! holding the answer to keep dumped tasks frozen).

pub mod client;
pub mod log;
pub mod notify;
pub mod swrk;

pub use client::{Criu, CriuVersion, Features};
pub use notify::{Notification, Notify, Reply, Script};

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while talking to CRIU.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("criu binary {path} not found (install CRIU >= {min}: vendor/criu/install.sh)")]
    NotFound { path: PathBuf, min: String },
    #[error("cannot start {path} swrk: {source}")]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("criu {found} is too old; ferry needs CRIU >= {min}")]
    TooOld { found: String, min: String },
    #[error("criu swrk socket: {0}")]
    Socket(#[source] nix::Error),
    #[error("criu closed the RPC connection during {op} (criu exited: {exit})")]
    Closed { op: &'static str, exit: String },
    #[error("criu did not answer {op} within {timeout:?}; criu was killed")]
    Timeout { op: &'static str, timeout: Duration },
    #[error("criu sent a malformed message during {op}: {detail}")]
    Protocol { op: &'static str, detail: String },
    #[error("criu {op} failed (errno {errno}){excerpt}{}", log.as_ref().map(|l| format!(" [log: {}]", l.display())).unwrap_or_default())]
    Failed {
        op: &'static str,
        errno: i32,
        /// The relevant lines of CRIU's log, prefixed with ": " when present.
        excerpt: String,
        log: Option<PathBuf>,
    },
    #[error("notification {script} failed: {reason}")]
    Notify { script: String, reason: String },
    #[error("encoding criu request: {0}")]
    Encode(#[from] protobuf::Error),
}

pub type Result<T, E = CriuError> = std::result::Result<T, E>;

#[cfg(test)]
mod loop_tests;
