//! Reading a small file whole, with a size cap checked before anything is allocated.

use std::io::Read;
use std::path::Path;

pub(crate) enum CappedError {
    Io(std::io::Error),
    /// The file's size, over the cap.
    TooLarge(u64),
}

/// Opens `path` for reading when it is a regular file. The open does not wait: a FIFO in its
/// place would otherwise block until some writer came (ignoring ferry's signal handlers,
/// which restart the call), and a device could be anything.
pub(crate) fn open_regular(path: &Path) -> std::io::Result<(std::fs::File, std::fs::Metadata)> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        let why = if meta.is_dir() {
            "is a directory"
        } else {
            "not a regular file"
        };
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, why));
    }
    Ok((f, meta))
}

/// Reads `path` whole when it is a regular file of at most `cap` bytes (larger files are
/// refused unread; one that grows meanwhile is cut at the cap).
pub(crate) fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, CappedError> {
    let (f, meta) = open_regular(path).map_err(CappedError::Io)?;
    let size = meta.len();
    if size > cap {
        return Err(CappedError::TooLarge(size));
    }
    let mut buf = Vec::with_capacity(size as usize);
    f.take(cap).read_to_end(&mut buf).map_err(CappedError::Io)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_or_directory_is_refused_without_waiting() {
        let dir = std::env::temp_dir().join(format!("ferry-capped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = open_regular(&fifo).unwrap_err();
        assert_eq!(e.to_string(), "not a regular file");
        let e = open_regular(&dir).unwrap_err();
        assert_eq!(e.to_string(), "is a directory");
        std::fs::write(dir.join("f"), b"abc").unwrap();
        assert!(matches!(
            read_capped(&dir.join("f"), 2),
            Err(CappedError::TooLarge(3))
        ));
        assert_eq!(read_capped(&dir.join("f"), 3).ok().unwrap(), b"abc");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
