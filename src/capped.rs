//! Reading a small file whole, with a size cap checked before anything is allocated.

use std::io::Read;
use std::path::Path;

pub(crate) enum CappedError {
    Io(std::io::Error),
    /// The file's size, over the cap.
    TooLarge(u64),
}

/// Reads `path` whole when it holds at most `cap` bytes (larger files are refused unread; one
/// that grows meanwhile is cut at the cap).
pub(crate) fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, CappedError> {
    let f = std::fs::File::open(path).map_err(CappedError::Io)?;
    let size = f.metadata().map_err(CappedError::Io)?.len();
    if size > cap {
        return Err(CappedError::TooLarge(size));
    }
    let mut buf = Vec::with_capacity(size as usize);
    f.take(cap).read_to_end(&mut buf).map_err(CappedError::Io)?;
    Ok(buf)
}
