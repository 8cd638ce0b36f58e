//! `pagemap-<id>.img` (a task's memory) and `pagemap-shmem-<id>.img` (a shared-memory
//! segment), each with the raw `pages-<n>.img` it names: the memory images CRIU restores.
//!
//! Layout of a pagemap image: u32 common magic, u32 pagemap magic, one `pagemap_head`
//! (naming the pages file), then one `pagemap_entry` per run of pages, each entry a u32
//! length + packed message. The pages file has no header: the present pages of the entries,
//! in entry order.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use protobuf::Message;

use super::stats::IMG_COMMON_MAGIC;
use super::{u32_at, ImageError};
use crate::pb::{PagemapEntry, PagemapHead};

pub const PAGEMAP_MAGIC: u32 = 0x5608_4025;
pub const PAGE_SIZE: u64 = 4096;
/// The pages are in the parent image (an earlier round).
pub const PE_PARENT: u32 = 1;
/// The pages may be fetched after the restore started (post-copy).
pub const PE_LAZY: u32 = 2;
/// The pages are in this image's pages file.
pub const PE_PRESENT: u32 = 4;
/// Largest pagemap image read back.
pub const MAX_PAGEMAP_FILE: u64 = 256 * 1024 * 1024;
/// Largest entry accepted when reading (real ones are about twenty bytes).
const MAX_ENTRY: u32 = 4096;

/// What a pagemap describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagemapKind {
    Task,
    Shmem,
}

/// The file name CRIU gives the pagemap of `kind` and `id` (a pid, or a segment's id).
pub fn pagemap_name(kind: PagemapKind, id: u64) -> String {
    match kind {
        PagemapKind::Task => format!("pagemap-{id}.img"),
        PagemapKind::Shmem => format!("pagemap-shmem-{id}.img"),
    }
}

pub fn pages_name(pages_id: u32) -> String {
    format!("pages-{pages_id}.img")
}

/// One pagemap image and its pages file being written.
pub struct PagemapWriter {
    path: PathBuf,
    map: BufWriter<File>,
    pages: File,
    entries: u64,
}

impl PagemapWriter {
    /// Creates (truncating, as CRIU does) the pagemap of `kind`/`id` in `dir` and the pages
    /// file `pages_id`.
    pub fn create(
        dir: &Path,
        kind: PagemapKind,
        id: u64,
        pages_id: u32,
    ) -> Result<PagemapWriter, ImageError> {
        let path = dir.join(pagemap_name(kind, id));
        let pages_path = dir.join(pages_name(pages_id));
        let open = |p: &Path| {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(p)
                .map_err(|source| ImageError::Io {
                    path: p.to_path_buf(),
                    source,
                })
        };
        let pages = open(&pages_path)?;
        let mut w = PagemapWriter {
            map: BufWriter::with_capacity(64 * 1024, open(&path)?),
            path,
            pages,
            entries: 0,
        };
        w.put(&IMG_COMMON_MAGIC.to_le_bytes())?;
        w.put(&PAGEMAP_MAGIC.to_le_bytes())?;
        let mut head = PagemapHead::new();
        head.set_pages_id(pages_id);
        w.message(&head)?;
        Ok(w)
    }

    /// Appends the entry for `nr_pages` pages at `vaddr` with `flags` (`PE_*`). With
    /// `PE_PRESENT`, the caller writes the pages themselves to [`Self::pages`].
    pub fn entry(&mut self, vaddr: u64, nr_pages: u64, flags: u32) -> Result<(), ImageError> {
        let mut e = PagemapEntry::new();
        e.set_vaddr(vaddr);
        // Readers before CRIU 4.0 know only the 32-bit count.
        e.set_compat_nr_pages(u32::try_from(nr_pages).unwrap_or(0));
        e.set_nr_pages(nr_pages);
        e.set_flags(flags);
        self.message(&e)?;
        self.entries += 1;
        Ok(())
    }

    /// The pages file (raw, written in entry order).
    pub fn pages(&self) -> BorrowedFd<'_> {
        self.pages.as_fd()
    }

    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Writes out what is buffered.
    pub fn finish(mut self) -> Result<(), ImageError> {
        let path = self.path.clone();
        self.map
            .flush()
            .map_err(|source| ImageError::Io { path, source })
    }

    fn message(&mut self, m: &impl Message) -> Result<(), ImageError> {
        let bytes = m.write_to_bytes().map_err(|e| ImageError::BadEntry {
            path: self.path.clone(),
            what: e.to_string(),
        })?;
        self.put(&(bytes.len() as u32).to_le_bytes())?;
        self.put(&bytes)
    }

    fn put(&mut self, b: &[u8]) -> Result<(), ImageError> {
        self.map.write_all(b).map_err(|source| ImageError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// One entry: (vaddr, nr_pages, flags).
pub type PageRun = (u64, u64, u32);

/// Reads a pagemap image: the pages file id and the entries.
pub fn read_pagemap(path: &Path) -> Result<(u32, Vec<PageRun>), ImageError> {
    let buf = super::read_capped(path, MAX_PAGEMAP_FILE)?;
    let truncated = |what: &str| ImageError::Truncated {
        path: path.to_path_buf(),
        what: what.into(),
    };
    if u32_at(&buf, 0) != Some(IMG_COMMON_MAGIC) || u32_at(&buf, 4) != Some(PAGEMAP_MAGIC) {
        return Err(ImageError::Foreign {
            path: path.to_path_buf(),
            what: "no pagemap magic".into(),
        });
    }
    let bad = |e: protobuf::Error| ImageError::BadEntry {
        path: path.to_path_buf(),
        what: e.to_string(),
    };
    let mut bodies = super::entries(path, &buf, 8, MAX_ENTRY)?.into_iter();
    let head = bodies.next().ok_or_else(|| truncated("no pagemap head"))?;
    let pages_id = PagemapHead::parse_from_bytes(head).map_err(bad)?.pages_id();
    let mut entries = vec![];
    for body in bodies {
        let e = PagemapEntry::parse_from_bytes(body).map_err(bad)?;
        let n = if e.has_nr_pages() {
            e.nr_pages()
        } else {
            u64::from(e.compat_nr_pages())
        };
        entries.push((e.vaddr(), n, e.flags()));
    }
    Ok((pages_id, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_pagemap_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PagemapWriter::create(dir.path(), PagemapKind::Task, 42, 0x10001).unwrap();
        w.entry(0x7f00_0000_0000, 3, PE_PRESENT).unwrap();
        w.entry(0x7f00_0000_3000, 1 << 33, PE_PARENT).unwrap();
        w.finish().unwrap();
        let (id, entries) = read_pagemap(&dir.path().join("pagemap-42.img")).unwrap();
        assert_eq!(id, 0x10001);
        assert_eq!(
            entries,
            vec![
                (0x7f00_0000_0000, 3, PE_PRESENT),
                (0x7f00_0000_3000, 1 << 33, PE_PARENT)
            ]
        );
        assert!(dir.path().join("pages-65537.img").exists());
        let raw = std::fs::read(dir.path().join("pagemap-42.img")).unwrap();
        assert_eq!(&raw[..8], &[0x19, 0x43, 0x56, 0x54, 0x25, 0x40, 0x08, 0x56]);
    }

    #[test]
    fn foreign_and_truncated_pagemaps_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pagemap-1.img");
        std::fs::write(&p, b"not an image").unwrap();
        assert!(matches!(read_pagemap(&p), Err(ImageError::Foreign { .. })));
        let mut b = IMG_COMMON_MAGIC.to_le_bytes().to_vec();
        b.extend_from_slice(&PAGEMAP_MAGIC.to_le_bytes());
        b.extend_from_slice(&100u32.to_le_bytes());
        b.extend_from_slice(&[8, 1]);
        std::fs::write(&p, &b).unwrap();
        assert!(matches!(
            read_pagemap(&p),
            Err(ImageError::Truncated { .. })
        ));
        b.truncate(8);
        b.extend_from_slice(&(1u32 << 20).to_le_bytes());
        std::fs::write(&p, &b).unwrap();
        assert!(matches!(read_pagemap(&p), Err(ImageError::BadEntry { .. })));
    }
}
