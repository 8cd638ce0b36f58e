//! The shim's errors, and their one mapping onto ttrpc status codes.
//!
//! containerd turns the ttrpc code back into an errdefs error (`NotFound`, `AlreadyExists`,
//! `FailedPrecondition`, …), which is what `ctr` prints and what containerd's own logic
//! branches on (a `NotFound` from `delete` is treated as already deleted, for instance).

use containerd_shim::protos::ttrpc::{self, Code};

use crate::ops::{ErrorKind, OpError};

/// Any failure of a task-service request.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0} is not implemented by the ferry shim")]
    Unimplemented(&'static str),
    #[error("runc {args}: {why}")]
    Runc { args: String, why: String },
    #[error("{op}: {source}")]
    Io { op: String, source: std::io::Error },
    #[error("{op}: {source}")]
    Op { op: &'static str, source: OpError },
    #[error("{0}")]
    Internal(String),
}

impl ShimError {
    pub fn io(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> ShimError {
        let op = op.into();
        move |source| ShimError::Io { op, source }
    }

    /// The ttrpc status code for this error: the only place where the mapping is made.
    pub fn code(&self) -> Code {
        match self {
            ShimError::NotFound(_) => Code::NOT_FOUND,
            ShimError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            ShimError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            ShimError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            ShimError::Unimplemented(_) => Code::UNIMPLEMENTED,
            ShimError::Runc { why, .. } => runc_code(why),
            ShimError::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => Code::NOT_FOUND,
                std::io::ErrorKind::AlreadyExists => Code::ALREADY_EXISTS,
                std::io::ErrorKind::PermissionDenied => Code::PERMISSION_DENIED,
                _ => Code::INTERNAL,
            },
            ShimError::Op { source, .. } => match source.kind() {
                ErrorKind::NotFound => Code::NOT_FOUND,
                ErrorKind::Invalid => Code::INVALID_ARGUMENT,
                ErrorKind::Environment => Code::FAILED_PRECONDITION,
                ErrorKind::Conflict => Code::FAILED_PRECONDITION,
                ErrorKind::Criu | ErrorKind::Remote | ErrorKind::Network => Code::UNKNOWN,
                ErrorKind::Internal => Code::INTERNAL,
                ErrorKind::Interrupted => Code::CANCELLED,
            },
            ShimError::Internal(_) => Code::INTERNAL,
        }
    }
}

/// runc reports "container does not exist" / "not running" in words only.
fn runc_code(why: &str) -> Code {
    if why.contains("does not exist") || why.contains("not found") {
        Code::NOT_FOUND
    } else if why.contains("not running")
        || why.contains("not paused")
        || why.contains("is paused")
        || why.contains("cannot")
    {
        Code::FAILED_PRECONDITION
    } else {
        Code::UNKNOWN
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

pub type Result<T> = std::result::Result<T, ShimError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(ShimError::NotFound("x".into()).code(), Code::NOT_FOUND);
        assert_eq!(
            ShimError::Runc {
                args: "kill".into(),
                why: "container does not exist".into()
            }
            .code(),
            Code::NOT_FOUND
        );
        assert_eq!(
            ShimError::Op {
                op: "restore",
                source: OpError::NoImages("/x".into())
            }
            .code(),
            Code::NOT_FOUND
        );
        assert_eq!(
            ShimError::Op {
                op: "checkpoint",
                source: OpError::Invalid("bad".into())
            }
            .code(),
            Code::INVALID_ARGUMENT
        );
        let t: ttrpc::Error = ShimError::Unimplemented("stats").into();
        match t {
            ttrpc::Error::RpcStatus(s) => assert_eq!(s.code(), Code::UNIMPLEMENTED),
            other => panic!("{other:?}"),
        }
    }
}
