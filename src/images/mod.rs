//! CRIU image files that ferry reads (and the memory images its page receiver writes).
//!
//! A CRIU image starts with magic numbers, then holds entries, each a u32 (little endian)
//! length followed by a packed protobuf message. Every length is checked against a cap and
//! against the bytes that remain before anything is allocated or decoded.

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
    use std::io::Read;
    let io = |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    if size > cap {
        return Err(ImageError::TooLarge {
            path: path.to_path_buf(),
            size,
            cap,
        });
    }
    let mut buf = Vec::with_capacity(size as usize);
    f.take(cap).read_to_end(&mut buf).map_err(io)?;
    Ok(buf)
}
