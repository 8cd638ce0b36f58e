//! The operations the binaries run: one file each.

pub mod check;
pub mod checkpoint;
pub mod interrupt;
pub mod kept;
pub mod restore;

use std::path::PathBuf;

use crate::criu::CriuError;
use crate::images::ImageError;
use crate::oci::OciError;
use crate::runtime::RuntimeError;

/// Any failure of an operation.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error("images: {0}")]
    Image(#[from] ImageError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("images directory {0} does not exist")]
    NoImages(PathBuf),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Environment(String),
    /// Stopped by a signal ([`interrupt`]) at a point where nothing was lost.
    #[error("interrupted by {0}: stopped before anything was lost; the container is as it was")]
    Interrupted(String),
}

/// What kind of failure, for exit codes (CLI) and status codes (shim): mapped in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The container or the images do not exist.
    NotFound,
    /// The input is wrong: not runc's root, not a ferry checkpoint, corrupt images…
    Invalid,
    /// This host cannot do it: CRIU missing or too old, no privileges.
    Environment,
    /// CRIU tried and failed.
    Criu,
    /// The state does not allow it: container exists already, is not running.
    Conflict,
    /// The migration peer refused or failed.
    Remote,
    /// The network failed (connection refused, dropped, timed out).
    Network,
    Internal,
    /// Stopped by a signal before anything was lost.
    Interrupted,
}

impl OpError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            OpError::Criu(e) => match e {
                CriuError::NotFound { .. } | CriuError::Spawn { .. } | CriuError::TooOld { .. } => {
                    ErrorKind::Environment
                }
                // A "criu" that cannot even answer VERSION is not a usable CRIU.
                CriuError::Closed { op: "version", .. }
                | CriuError::Protocol { op: "version", .. } => ErrorKind::Environment,
                _ => ErrorKind::Criu,
            },
            OpError::Oci(e) => oci_kind(e),
            OpError::Image(_) => ErrorKind::Invalid,
            OpError::Runtime(RuntimeError::Oci(e)) => oci_kind(e),
            OpError::Runtime(RuntimeError::Cgroup { .. }) => ErrorKind::Conflict,
            OpError::Runtime(_) => ErrorKind::Internal,
            OpError::NoImages(_) => ErrorKind::NotFound,
            OpError::Invalid(_) => ErrorKind::Invalid,
            OpError::Conflict(_) => ErrorKind::Conflict,
            OpError::Environment(_) => ErrorKind::Environment,
            OpError::Interrupted(_) => ErrorKind::Interrupted,
        }
    }
}

fn oci_kind(e: &OciError) -> ErrorKind {
    match e {
        OciError::UnknownContainer { .. } => ErrorKind::NotFound,
        OciError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            ErrorKind::NotFound
        }
        OciError::NotRunning { .. } | OciError::Exists { .. } => ErrorKind::Conflict,
        OciError::Write { .. } => ErrorKind::Internal,
        _ => ErrorKind::Invalid,
    }
}

/// Fails unless we run as root (CRIU needs CAP_SYS_ADMIN and more; runc's state is root's).
pub fn require_root() -> Result<(), OpError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(OpError::Environment(
            "checkpoint and restore need root".into(),
        ))
    }
}

/// Opens a directory as an owned descriptor (for images_dir_fd / work_dir_fd).
pub(crate) fn open_dir(path: &std::path::Path) -> Result<std::os::fd::OwnedFd, OpError> {
    let f = std::fs::File::open(path).map_err(|source| OciError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(f.into())
}

pub(crate) fn elapsed_ms(t: std::time::Instant) -> u64 {
    t.elapsed().as_millis() as u64
}
