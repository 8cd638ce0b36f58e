//! Handing containers back to the runtime and cleaning up after ourselves.
//!
//! - [`mounts`]: the private bind mount CRIU restores into, and removal that never crosses a
//!   mount point (runc's `delete -f` after a failed restore deletes the rootfs through its
//!   leftover criu-root bind mount; ferry must never do that),
//! - [`cgroups`]: creating the restored container's cgroups and placing criu in them, and
//!   writing its limits and device rules back ([`devfilter`]: the v2 device rules' program),
//! - [`locks`]: the file locks a container's processes hold,
//! - [`memroom`]: whether a host has room for a container's memory,
//! - [`runc`]: runc's state.json for a restored container, and calls to the runc binary,
//! - [`softdirty`]: the pages a container wrote since CRIU's last pre-dump round.

pub mod cgroups;
pub mod devfilter;
pub mod locks;
pub mod memroom;
pub mod mounts;
pub mod runc;
pub mod softdirty;

use std::path::PathBuf;

/// The last non-blank line of a program's output, trimmed: what it said last, usually why
/// it failed.
pub fn last_line(output: &[u8]) -> Option<String> {
    String::from_utf8_lossy(output)
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("mount {what} on {target}: {source}")]
    Mount {
        what: &'static str,
        target: PathBuf,
        source: nix::Error,
    },
    #[error("refusing to remove {path}: {why}")]
    Refused { path: PathBuf, why: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cgroup {path}: {why}")]
    Cgroup { path: PathBuf, why: String },
    #[error("runc {args}: {why}")]
    Runc { args: String, why: String },
    #[error(transparent)]
    Oci(#[from] crate::oci::OciError),
}

pub(crate) fn io_err(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let path = path.into();
    move |source| RuntimeError::Io { op, path, source }
}

#[cfg(test)]
mod tests {
    #[test]
    fn last_line_skips_blank_lines() {
        assert_eq!(
            super::last_line(b"warning: x\n  error: it broke  \n\n \n").as_deref(),
            Some("error: it broke")
        );
        assert_eq!(super::last_line(b"\n\n"), None);
        assert_eq!(super::last_line(b""), None);
    }
}
