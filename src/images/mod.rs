//! CRIU image files that ferry reads (and the memory images its page receiver writes).
//!
//! A CRIU image starts with magic numbers, then holds entries, each a u32 (little endian)
//! length followed by a packed protobuf message. Every length is checked against a cap and
//! against the bytes that remain before anything is allocated or decoded.

pub mod files;
pub mod pagemap;
pub mod stats;

pub use stats::{read_dump_stats, read_restore_stats, DumpStats, RestoreStats};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a CRIU image ({what})")]
    Foreign { path: PathBuf, what: String },
    #[error("{path}: truncated CRIU image ({what})")]
    Truncated { path: PathBuf, what: String },
    #[error("{path}: image of {size} bytes exceeds the cap of {cap} bytes")]
    TooLarge { path: PathBuf, size: u64, cap: u64 },
    #[error("{path}: bad entry: {what}")]
    BadEntry { path: PathBuf, what: String },
}

/// Reads a whole image file of at most `cap` bytes (larger ones are refused unread).
pub fn read_capped(path: &std::path::Path, cap: u64) -> Result<Vec<u8>, ImageError> {
    crate::capped::read_capped(path, cap).map_err(|e| match e {
        crate::capped::CappedError::Io(source) => ImageError::Io {
            path: path.to_path_buf(),
            source,
        },
        crate::capped::CappedError::TooLarge(size) => ImageError::TooLarge {
            path: path.to_path_buf(),
            size,
            cap,
        },
    })
}

/// The little-endian u32 at `at`, if the buffer holds it.
pub(crate) fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    buf.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The entries of an image held whole in `buf`, from byte `at` (past its magic numbers) to
/// the end: each a u32 length, checked against `max_entry` and against what remains, then
/// that many bytes.
pub(crate) fn entries<'a>(
    path: &std::path::Path,
    buf: &'a [u8],
    mut at: usize,
    max_entry: u32,
) -> Result<Vec<&'a [u8]>, ImageError> {
    let truncated = |what: &str| ImageError::Truncated {
        path: path.to_path_buf(),
        what: what.into(),
    };
    let mut out = Vec::new();
    while at < buf.len() {
        let len = u32_at(buf, at).ok_or_else(|| truncated("entry length"))?;
        if len > max_entry {
            return Err(ImageError::BadEntry {
                path: path.to_path_buf(),
                what: format!("entry of {len} bytes (cap {max_entry})"),
            });
        }
        let body = buf
            .get(at + 4..at + 4 + len as usize)
            .ok_or_else(|| truncated("entry"))?;
        out.push(body);
        at += 4 + len as usize;
    }
    Ok(out)
}
