//! Live migration between hosts: `ferry serve` (destination) and `ferry migrate` (source).
//!
//! - [`wire`]: frames and messages of the control channel, and the message sequence,
//! - [`auth`]: shared-token mutual challenge–response,
//! - [`tls`]: optional TLS 1.3 with certificates on both sides, and the pump that lets CRIU
//!   and ferry use a TLS connection as a plain socket; [`link`]: a connection either way,
//! - [`rootfs`]: rootfs manifests by content hash, deltas, and applying them safely,
//! - [`policy`]: when the pre-copy rounds stop,
//! - [`source`]: the source side, [`destination`]: the destination side.
//!
//! Memory never touches the source's disk: CRIU's page server on the destination receives
//! the pages through an authenticated TCP connection that ferry opened and hands to both criu
//! processes (`ps.fd`), so no port is ever opened for CRIU itself. With TLS, what they get
//! is the local end of a pump that encrypts onto that connection.

pub mod auth;
pub mod destination;
pub mod hook;
pub mod link;
pub mod pages;
pub mod policy;
pub mod progress;
pub mod relay;
pub mod rootfs;
pub mod source;
pub mod tls;
pub mod wire;
pub mod xattr;

use crate::ops::{ErrorKind, OpError};
use wire::WireError;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("token: {0}")]
    Token(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("incompatible hosts: {0}")]
    Incompatible(String),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("control channel: {0}")]
    Wire(#[from] WireError),
    #[error("destination failed: {0}")]
    Remote(String),
    #[error("rootfs sync: {0}")]
    Rootfs(String),
    /// A file received over the control channel (an image, a rootfs file) could not be
    /// written.
    #[error("writing {0}")]
    Write(String),
    #[error("{0}")]
    Op(#[from] OpError),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("network: {0}")]
    Net(String),
    #[error(
        "the connection was lost after the commit was sent; the destination may be running the \
         container, so the source is left paused: check the destination, then `runc resume` or \
         `runc delete` the source ({0})"
    )]
    Ambiguous(String),
    #[error(
        "the container was lost after the commit: the destination ran it but its memory could \
         not all arrive, so it killed it, and the source's copy was ended when the page \
         transfer stopped ({0})"
    )]
    Lost(String),
}

impl MigrateError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            MigrateError::Token(_)
            | MigrateError::Auth(_)
            | MigrateError::Unsupported(_)
            | MigrateError::Tls(_) => ErrorKind::Invalid,
            MigrateError::Incompatible(_) => ErrorKind::Environment,
            MigrateError::Connect { .. } | MigrateError::Ambiguous(_) => ErrorKind::Network,
            MigrateError::Wire(WireError::Peer { kind, .. })
                if kind == "auth" || kind == tls::PLAINTEXT_REFUSED =>
            {
                ErrorKind::Invalid
            }
            MigrateError::Wire(WireError::Peer { .. })
            | MigrateError::Remote(_)
            | MigrateError::Lost(_) => ErrorKind::Remote,
            MigrateError::Wire(_) => ErrorKind::Network,
            MigrateError::Rootfs(_) | MigrateError::Write(_) => ErrorKind::Internal,
            MigrateError::Net(_) => ErrorKind::Environment,
            MigrateError::Op(e) => e.kind(),
        }
    }
}

impl From<crate::criu::CriuError> for MigrateError {
    fn from(e: crate::criu::CriuError) -> Self {
        MigrateError::Op(e.into())
    }
}

/// Pipe size CRIU's lazy page server asks for (about 819 pages). Above `fs.pipe-max-size`
/// that needs CAP_SYS_RESOURCE; without both, CRIU's page server fails with EBADF.
pub const LAZY_PIPE_BYTES: u64 = 3_354_624;

/// Whether CRIU's lazy page server can size its pipes here.
pub fn lazy_pages_ready() -> Result<(), String> {
    if caps::has_cap(
        None,
        caps::CapSet::Effective,
        caps::Capability::CAP_SYS_RESOURCE,
    )
    .unwrap_or(false)
    {
        return Ok(());
    }
    let max: u64 = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if max >= LAZY_PIPE_BYTES {
        Ok(())
    } else {
        Err(format!(
            "post-copy needs CAP_SYS_RESOURCE or fs.pipe-max-size >= {LAZY_PIPE_BYTES} (now {max}): \
             sysctl -w fs.pipe-max-size=4194304"
        ))
    }
}

/// Short name of an error kind on the wire.
pub fn kind_name(k: ErrorKind) -> &'static str {
    match k {
        ErrorKind::NotFound => "not-found",
        ErrorKind::Invalid => "invalid",
        ErrorKind::Environment => "environment",
        ErrorKind::Criu => "criu",
        ErrorKind::Conflict => "conflict",
        ErrorKind::Remote => "remote",
        ErrorKind::Network => "network",
        ErrorKind::Internal => "internal",
        ErrorKind::Interrupted => "interrupted",
    }
}
