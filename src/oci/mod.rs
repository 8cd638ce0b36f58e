//! The OCI side: the runtime's state of a container, its bundle, and how both map onto CRIU
//! options.
//!
//! - [`state`]: runc's state root (`--root`, default /run/runc) and `<root>/<id>/state.json`,
//! - [`bundle`]: `config.json` through `oci-spec`, with the fields ferry supports checked,
//! - [`meta`]: what ferry stores beside CRIU's images so a checkpoint can be restored and
//!   handed back to runc,
//! - [`options`]: the one path that turns all of it into CRIU dump and restore options; the
//!   checkpoint command, migration and the containerd shim all use it,
//! - [`sysctl`]: config.json's network sysctls, which CRIU does not carry.

pub mod bundle;
pub mod meta;
pub mod options;
pub mod state;
pub mod sysctl;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("invalid container id {0:?} (letters, digits, '_', '+', '-', '.'; not '.' or '..')")]
    BadId(String),
    #[error("no container {id:?} in runc root {root}")]
    UnknownContainer { id: String, root: PathBuf },
    #[error("{root} is not a runc state root: {why}")]
    NotRuncRoot { root: PathBuf, why: String },
    #[error("container {id:?} is not running ({why})")]
    NotRunning { id: String, why: String },
    #[error("container {id:?} already exists in runc root {root}")]
    Exists { id: String, root: PathBuf },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: malformed JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {what}")]
    BadState { path: PathBuf, what: String },
    #[error("bundle config {path}: {source}")]
    Spec {
        path: PathBuf,
        source: oci_spec::OciSpecError,
    },
    #[error("unsupported in {path}: {what}")]
    Unsupported { path: PathBuf, what: String },
    #[error("{path} is not a ferry checkpoint: {why}")]
    NotCheckpoint { path: PathBuf, why: String },
}

/// Checks a container id the way runc does, which also keeps it a single path component.
pub fn validate_id(id: &str) -> Result<(), OciError> {
    let ok = !id.is_empty()
        && id.len() <= 1024
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(OciError::BadId(id.to_string()))
    }
}

/// Reads a small file with a size cap, failing on larger files.
pub(crate) fn read_capped(path: &std::path::Path, cap: u64) -> Result<Vec<u8>, OciError> {
    crate::capped::read_capped(path, cap).map_err(|e| match e {
        crate::capped::CappedError::Io(source) => OciError::Read {
            path: path.to_path_buf(),
            source,
        },
        crate::capped::CappedError::TooLarge(len) => OciError::BadState {
            path: path.to_path_buf(),
            what: format!("{len} bytes exceed the cap of {cap}"),
        },
    })
}

/// Writes a file atomically: temporary file in the same directory, fsync, rename, fsync dir.
pub(crate) fn write_atomic(path: &std::path::Path, data: &[u8], mode: u32) -> Result<(), OciError> {
    write_via_tmp(path, data, mode, true)
}

/// Replaces a file atomically (temporary file, rename) without waiting for the disk: for files
/// that are only worth as much as the unsynced files beside them (CRIU's images), written
/// while a container is frozen, where an fsync can wait for everything the dump just wrote.
pub(crate) fn write_replace(
    path: &std::path::Path,
    data: &[u8],
    mode: u32,
) -> Result<(), OciError> {
    write_via_tmp(path, data, mode, false)
}

fn write_via_tmp(
    path: &std::path::Path,
    data: &[u8],
    mode: u32,
    sync: bool,
) -> Result<(), OciError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let write = |source| OciError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(write)?;
    let res = f
        .write_all(data)
        .and_then(|_| if sync { f.sync_all() } else { Ok(()) });
    drop(f);
    if let Err(e) = res.and_then(|_| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(write(e));
    }
    if sync {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for good in ["a", "ctr-1", "my_ctr.2", "x+y"] {
            assert!(validate_id(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "../x", "a b", "ä"] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
    }
}
