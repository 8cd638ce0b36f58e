//! The destination's page receiver: ferry's own end of CRIU's page-server protocol. The
//! source's CRIU dumps (or pre-dumps) into the data connection as it would into a CRIU page
//! server; this side writes the pagemap and pages images that the restore reads.
//!
//! Why not a CRIU page server: its receiver moves pages socket → pipe → file in steps of
//! its pipe's size, which CRIU leaves at the 64 KiB default, so a gigabyte takes some
//! 16 000 rounds of poll + two splices. Here the pipe is 1 MiB (when the system allows it),
//! which is what raises the page throughput (figures in BENCHMARKS.md). `ferry serve
//! --page-server criu` keeps CRIU's receiver.
//!
//! # Wire
//! Each command is a 32-byte `page_server_iov` in the hosts' byte order (x86_64: little
//! endian): u32 `cmd` (low 16 bits the command, high 16 bits `PE_*` flags), 4 bytes of
//! padding, u64 `nr_pages`, u64 `vaddr`, u64 `dst_id` (low 8 bits the image type: 1 a task's
//! pagemap, 2 a shared-memory one; the pid or segment id above). The commands:
//!
//! - `OPEN2` (4): closes the open image and opens the pagemap of `dst_id`; answers one byte,
//!   1 when the parent round (`parent` in the images dir) has that pagemap. `OPEN` (3): the
//!   same without the answer.
//! - `ADD_F` (6): a pagemap entry with the command's flags; with `PE_PRESENT` the
//!   `nr_pages` pages follow. `ADD` (1): present pages; `HOLE` (2): pages in the parent.
//!   Either, for another `dst_id` than the open one, opens that one first (unanswered).
//! - `PARENT` (5): answers an i32, 1 when the parent round has the pagemap of `dst_id`.
//! - `CLOSE` (0x1023), `FORCE_CLOSE` (0x1024): answers an i32 0 once everything received is
//!   written; the session ends there. EOF before it is an error (the dump did not finish).
//! - `GET` (7, lazy pages: the source serves those) and anything else: refused.
//!
//! Pages files are numbered from 0x10001, like a CRIU page server's, so they never clash
//! with the files a dump writes itself.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{splice, FcntlArg, OFlag, SpliceFFlags};

use crate::images::pagemap::{
    pagemap_name, PagemapKind, PagemapWriter, PAGE_SIZE, PE_PARENT, PE_PRESENT,
};
use crate::images::ImageError;

const PS_IOV_ADD: u32 = 1;
const PS_IOV_HOLE: u32 = 2;
const PS_IOV_OPEN: u32 = 3;
const PS_IOV_OPEN2: u32 = 4;
const PS_IOV_PARENT: u32 = 5;
const PS_IOV_ADD_F: u32 = 6;
const PS_IOV_GET: u32 = 7;
const PS_IOV_CLOSE: u32 = 0x1023;
const PS_IOV_FORCE_CLOSE: u32 = 0x1024;
const PS_TYPE_PID: u64 = 1;
const PS_TYPE_SHMEM: u64 = 2;

/// The pipe the pages go through (asked for; the system may give less).
const PIPE_SIZE: usize = 1024 * 1024;
const FIRST_PAGES_ID: u32 = 0x10001;
/// No mapping ends above this (x86_64 with 5-level page tables: 2^57).
const MAX_VADDR: u64 = 1 << 57;
/// Most images in one session (one per process and shared segment).
const MAX_IMAGES: u32 = 1 << 16;
/// Most entries in one session (each is a run of pages).
const MAX_ENTRIES: u64 = 1 << 24;

#[derive(Debug, thiserror::Error)]
pub enum PagesError {
    #[error("page stream: {0}")]
    Io(#[from] io::Error),
    #[error("page stream: {0}")]
    Image(#[from] ImageError),
    #[error("page stream: {0}")]
    Protocol(String),
    #[error("page stream: the source closed it before its last command")]
    Closed,
    #[error("page stream: not finished within {0} s")]
    Timeout(u64),
}

/// What one session received.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageStats {
    pub images: u32,
    pub entries: u64,
    /// Pages received (present).
    pub pages: u64,
    /// Pages the source said are in the parent round.
    pub parent_pages: u64,
    pub elapsed: Duration,
}

/// Receives one session from `sock` into `dir` (which holds `parent` when there is a
/// previous round) until the source's CLOSE.
pub fn receive(sock: &OwnedFd, dir: &Path) -> Result<PageStats, PagesError> {
    let mut s = Session {
        sock: File::from(sock.try_clone()?),
        dir: dir.to_path_buf(),
        pipe: Pipe::new()?,
        open: None,
        next_pages_id: FIRST_PAGES_ID,
        stats: PageStats::default(),
    };
    let t0 = Instant::now();
    let r = s.run();
    s.stats.elapsed = t0.elapsed();
    let closed = s.close_image();
    r.and(closed)?;
    Ok(s.stats)
}

struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    size: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        // A smaller pipe only means more steps (fs.pipe-max-size or the user's pipe quota
        // may refuse this size).
        let _ = nix::fcntl::fcntl(w.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32));
        let size =
            nix::fcntl::fcntl(w.as_raw_fd(), FcntlArg::F_GETPIPE_SZ).map_err(io::Error::from)?;
        Ok(Pipe {
            r,
            w,
            size: usize::try_from(size).unwrap_or(0).max(4096),
        })
    }
}

struct Command {
    cmd: u32,
    flags: u32,
    nr_pages: u64,
    vaddr: u64,
    dst_id: u64,
}

fn parse(b: &[u8; 32]) -> Command {
    let u64_at = |at: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(x)
    };
    let raw = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    Command {
        cmd: raw & 0xffff,
        flags: raw >> 16,
        nr_pages: u64_at(8),
        vaddr: u64_at(16),
        dst_id: u64_at(24),
    }
}

fn image_of(dst_id: u64) -> Result<(PagemapKind, u64), PagesError> {
    let kind = match dst_id & 0xff {
        PS_TYPE_PID => PagemapKind::Task,
        PS_TYPE_SHMEM => PagemapKind::Shmem,
        t => return Err(PagesError::Protocol(format!("unknown pagemap type {t}"))),
    };
    Ok((kind, dst_id >> 8))
}

struct Session {
    sock: File,
    dir: PathBuf,
    pipe: Pipe,
    open: Option<(u64, PagemapWriter)>,
    next_pages_id: u32,
    stats: PageStats,
}

impl Session {
    fn run(&mut self) -> Result<(), PagesError> {
        loop {
            let mut b = [0u8; 32];
            match self.sock.read_exact(&mut b) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(PagesError::Closed)
                }
                Err(e) => return Err(e.into()),
            }
            let c = parse(&b);
            match c.cmd {
                PS_IOV_OPEN2 => {
                    self.open(c.dst_id)?;
                    let has = self.parent_has(c.dst_id)?;
                    self.sock.write_all(&[u8::from(has)])?;
                }
                PS_IOV_OPEN => self.open(c.dst_id)?,
                PS_IOV_PARENT => {
                    let has = self.parent_has(c.dst_id)?;
                    self.sock.write_all(&i32::from(has).to_le_bytes())?;
                }
                PS_IOV_ADD_F => self.add(&c, c.flags)?,
                PS_IOV_ADD => self.add(&c, PE_PRESENT)?,
                PS_IOV_HOLE => self.add(&c, PE_PARENT)?,
                PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE => {
                    self.close_image()?;
                    self.sock.write_all(&0i32.to_le_bytes())?;
                    return Ok(());
                }
                PS_IOV_GET => {
                    return Err(PagesError::Protocol(
                        "a lazy-pages request (GET) on a dump's page stream".into(),
                    ))
                }
                other => return Err(PagesError::Protocol(format!("unknown command {other:#x}"))),
            }
        }
    }

    fn open(&mut self, dst_id: u64) -> Result<(), PagesError> {
        let (kind, id) = image_of(dst_id)?;
        self.close_image()?;
        if self.stats.images >= MAX_IMAGES {
            return Err(PagesError::Protocol(format!(
                "more than {MAX_IMAGES} images in one dump"
            )));
        }
        let w = PagemapWriter::create(&self.dir, kind, id, self.next_pages_id)?;
        self.next_pages_id += 1;
        self.stats.images += 1;
        self.open = Some((dst_id, w));
        Ok(())
    }

    fn close_image(&mut self) -> Result<(), PagesError> {
        if let Some((_, w)) = self.open.take() {
            w.finish()?;
        }
        Ok(())
    }

    fn parent_has(&self, dst_id: u64) -> Result<bool, PagesError> {
        let (kind, id) = image_of(dst_id)?;
        let parent = self.dir.join("parent");
        Ok(parent.symlink_metadata().is_ok() && parent.join(pagemap_name(kind, id)).exists())
    }

    fn add(&mut self, c: &Command, flags: u32) -> Result<(), PagesError> {
        let len = c
            .nr_pages
            .checked_mul(PAGE_SIZE)
            .filter(|len| {
                c.vaddr
                    .checked_add(*len)
                    .is_some_and(|end| end <= MAX_VADDR)
            })
            .ok_or_else(|| {
                PagesError::Protocol(format!(
                    "{} pages at {:#x} lie outside any address space",
                    c.nr_pages, c.vaddr
                ))
            })?;
        if self.stats.entries >= MAX_ENTRIES {
            return Err(PagesError::Protocol(format!(
                "more than {MAX_ENTRIES} page runs in one dump"
            )));
        }
        if self.open.as_ref().map(|(d, _)| *d) != Some(c.dst_id) {
            self.open(c.dst_id)?;
        }
        let Some((_, w)) = self.open.as_mut() else {
            return Err(PagesError::Protocol("no open image".into()));
        };
        w.entry(c.vaddr, c.nr_pages, flags)?;
        self.stats.entries += 1;
        if flags & PE_PRESENT != 0 {
            move_bytes(self.sock.as_fd(), &self.pipe, w.pages(), len)?;
            self.stats.pages += c.nr_pages;
        } else if flags & PE_PARENT != 0 {
            self.stats.parent_pages += c.nr_pages;
        }
        Ok(())
    }
}

/// Moves `len` bytes from the socket into `out` through the pipe, without copying them
/// through this process.
fn move_bytes(
    sock: BorrowedFd<'_>,
    pipe: &Pipe,
    out: BorrowedFd<'_>,
    mut len: u64,
) -> Result<(), PagesError> {
    while len > 0 {
        // The pipe is empty here, so this never waits for room, only for the peer.
        let want = len.min(pipe.size as u64) as usize;
        let got = retry(|| {
            splice(
                sock,
                None,
                pipe.w.as_fd(),
                None,
                want,
                SpliceFFlags::SPLICE_F_MOVE,
            )
        })?;
        if got == 0 {
            return Err(PagesError::Closed);
        }
        let mut left = got;
        while left > 0 {
            let k = retry(|| {
                splice(
                    pipe.r.as_fd(),
                    None,
                    out,
                    None,
                    left,
                    SpliceFFlags::SPLICE_F_MOVE,
                )
            })?;
            if k == 0 {
                return Err(PagesError::Protocol("the pages file took no bytes".into()));
            }
            left -= k;
        }
        len -= got as u64;
    }
    Ok(())
}

fn retry(mut f: impl FnMut() -> nix::Result<usize>) -> io::Result<usize> {
    loop {
        match f() {
            Err(Errno::EINTR) => continue,
            // The socket's receive timeout expired.
            Err(Errno::EAGAIN) => return Err(io::Error::from(io::ErrorKind::TimedOut)),
            r => return r.map_err(io::Error::from),
        }
    }
}

/// A session being received on its own thread.
pub struct PageSink {
    done: mpsc::Receiver<Result<PageStats, PagesError>>,
    thread: Option<JoinHandle<()>>,
    /// A copy of the socket, to end a session that must not go on.
    sock: OwnedFd,
}

impl PageSink {
    /// Starts receiving from `sock` into `dir`. A failed session shuts the socket down both
    /// ways, so that the source's CRIU fails at once instead of waiting to send.
    pub fn spawn(sock: OwnedFd, dir: PathBuf) -> io::Result<PageSink> {
        let copy = sock.try_clone()?;
        let (tx, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("pages".into())
            .spawn(move || {
                let r = receive(&sock, &dir);
                match &r {
                    Ok(s) => tracing::info!(
                        dir = %dir.display(),
                        images = s.images,
                        pages = s.pages,
                        parent_pages = s.parent_pages,
                        ms = s.elapsed.as_millis() as u64,
                        "page stream received"
                    ),
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), "{e}");
                        shutdown(&sock);
                    }
                }
                let _ = tx.send(r);
            })?;
        Ok(PageSink {
            done,
            thread: Some(thread),
            sock: copy,
        })
    }

    /// Waits for the session's end (the source's CLOSE, with everything written). After
    /// `timeout` the socket is shut down and the session fails.
    pub fn wait(mut self, timeout: Duration) -> Result<PageStats, PagesError> {
        let r = match self.done.recv_timeout(timeout) {
            Ok(r) => r,
            Err(_) => {
                shutdown(&self.sock);
                let _ = self.done.recv_timeout(Duration::from_secs(5));
                Err(PagesError::Timeout(timeout.as_secs()))
            }
        };
        self.join();
        r
    }

    /// Ends the session now (the migration failed).
    pub fn abort(mut self) {
        shutdown(&self.sock);
        let _ = self.done.recv_timeout(Duration::from_secs(5));
        self.join();
    }

    fn join(&mut self) {
        // The thread has sent its result (or is stuck past every timeout: left detached).
        if let Some(t) = self.thread.take() {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

fn shutdown(sock: &OwnedFd) {
    let _ = nix::sys::socket::shutdown(sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::pagemap::{read_pagemap, PE_LAZY};
    use std::os::unix::net::UnixStream;

    fn iov(cmd: u32, flags: u32, nr_pages: u64, vaddr: u64, dst_id: u64) -> Vec<u8> {
        let mut b = ((flags << 16) | cmd).to_le_bytes().to_vec();
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&nr_pages.to_le_bytes());
        b.extend_from_slice(&vaddr.to_le_bytes());
        b.extend_from_slice(&dst_id.to_le_bytes());
        b
    }

    fn task(pid: u64) -> u64 {
        (pid << 8) | PS_TYPE_PID
    }

    /// Runs a receiver on one end of a socket pair; `talk` plays the source on the other.
    fn session(dir: &Path, talk: impl FnOnce(&mut UnixStream)) -> Result<PageStats, PagesError> {
        let (mut a, b) = UnixStream::pair().unwrap();
        let sink = PageSink::spawn(OwnedFd::from(b), dir.to_path_buf()).unwrap();
        talk(&mut a);
        let r = sink.wait(Duration::from_secs(10));
        drop(a);
        r
    }

    fn answer<const N: usize>(s: &mut UnixStream) -> [u8; N] {
        let mut b = [0u8; N];
        s.read_exact(&mut b).unwrap();
        b
    }

    #[test]
    fn a_dump_arrives_as_pagemap_and_pages_images() {
        let dir = tempfile::tempdir().unwrap();
        let page = |n: u8| vec![n; PAGE_SIZE as usize];
        let stats = session(dir.path(), |s| {
            s.write_all(&iov(PS_IOV_OPEN2, 0, 0, 0, task(7))).unwrap();
            assert_eq!(answer::<1>(s), [0], "no parent round");
            s.write_all(&iov(PS_IOV_ADD_F, PE_PRESENT, 2, 0x1000, task(7)))
                .unwrap();
            s.write_all(&[page(1), page(2)].concat()).unwrap();
            s.write_all(&iov(PS_IOV_ADD_F, PE_LAZY, 5, 0x10_0000, task(7)))
                .unwrap();
            // Another image, opened by its first entry (no answer).
            s.write_all(&iov(PS_IOV_ADD, 0, 1, 0x2000, (9 << 8) | PS_TYPE_SHMEM))
                .unwrap();
            s.write_all(&page(3)).unwrap();
            s.write_all(&iov(PS_IOV_CLOSE, 0, 0, 0, 0)).unwrap();
            assert_eq!(answer::<4>(s), [0; 4]);
        })
        .unwrap();
        assert_eq!((stats.images, stats.entries, stats.pages), (2, 3, 3));
        let (id, e) = read_pagemap(&dir.path().join("pagemap-7.img")).unwrap();
        assert_eq!(id, FIRST_PAGES_ID);
        assert_eq!(e, vec![(0x1000, 2, PE_PRESENT), (0x10_0000, 5, PE_LAZY)]);
        assert_eq!(
            std::fs::read(dir.path().join(format!("pages-{id}.img"))).unwrap(),
            [page(1), page(2)].concat()
        );
        let (id, e) = read_pagemap(&dir.path().join("pagemap-shmem-9.img")).unwrap();
        assert_eq!((id, e), (FIRST_PAGES_ID + 1, vec![(0x2000, 1, PE_PRESENT)]));
        assert_eq!(
            std::fs::read(dir.path().join(format!("pages-{id}.img"))).unwrap(),
            page(3)
        );
    }

    #[test]
    fn parent_round_is_reported_and_holes_point_into_it() {
        let root = tempfile::tempdir().unwrap();
        let prev = root.path().join("pre-1");
        let cur = root.path().join("pre-2");
        std::fs::create_dir_all(&prev).unwrap();
        std::fs::create_dir_all(&cur).unwrap();
        PagemapWriter::create(&prev, PagemapKind::Task, 7, 1)
            .unwrap()
            .finish()
            .unwrap();
        std::os::unix::fs::symlink("../pre-1", cur.join("parent")).unwrap();
        let stats = session(&cur, |s| {
            s.write_all(&iov(PS_IOV_PARENT, 0, 0, 0, task(8))).unwrap();
            assert_eq!(answer::<4>(s), 0i32.to_le_bytes());
            s.write_all(&iov(PS_IOV_OPEN2, 0, 0, 0, task(7))).unwrap();
            assert_eq!(answer::<1>(s), [1]);
            s.write_all(&iov(PS_IOV_HOLE, 0, 4, 0x1000, task(7)))
                .unwrap();
            s.write_all(&iov(PS_IOV_FORCE_CLOSE, 0, 0, 0, 0)).unwrap();
            assert_eq!(answer::<4>(s), [0; 4]);
        })
        .unwrap();
        assert_eq!((stats.pages, stats.parent_pages), (0, 4));
        let (_, e) = read_pagemap(&cur.join("pagemap-7.img")).unwrap();
        assert_eq!(e, vec![(0x1000, 4, PE_PARENT)]);
    }

    #[test]
    fn bad_streams_fail_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let r = session(dir.path(), |s| {
            s.write_all(&iov(PS_IOV_GET, 0, 1, 0x1000, task(1)))
                .unwrap();
        });
        assert!(
            matches!(r, Err(PagesError::Protocol(ref m)) if m.contains("GET")),
            "{r:?}"
        );
        let r = session(dir.path(), |s| {
            s.write_all(&iov(PS_IOV_ADD, 0, u64::MAX / 2, 0x1000, task(1)))
                .unwrap();
        });
        assert!(
            matches!(r, Err(PagesError::Protocol(ref m)) if m.contains("address space")),
            "{r:?}"
        );
        let r = session(dir.path(), |s| {
            s.write_all(&iov(PS_IOV_OPEN2, 0, 0, 0, (1 << 8) | 77))
                .unwrap();
        });
        assert!(
            matches!(r, Err(PagesError::Protocol(ref m)) if m.contains("type 77")),
            "{r:?}"
        );
        let r = session(dir.path(), |s| {
            s.write_all(&iov(0x99, 0, 0, 0, 0)).unwrap();
        });
        assert!(
            matches!(r, Err(PagesError::Protocol(ref m)) if m.contains("0x99")),
            "{r:?}"
        );
        // The source goes away in the middle of a page, and before its CLOSE.
        let r = session(dir.path(), |s| {
            s.write_all(&iov(PS_IOV_ADD, 0, 2, 0x1000, task(1)))
                .unwrap();
            s.write_all(&[0; 100]).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
        });
        assert!(matches!(r, Err(PagesError::Closed)), "{r:?}");
        let r = session(dir.path(), |s| {
            s.write_all(&iov(PS_IOV_OPEN, 0, 0, 0, task(1))).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
        });
        assert!(matches!(r, Err(PagesError::Closed)), "{r:?}");
    }

    #[test]
    fn a_stalled_source_times_out_and_its_socket_is_shut() {
        let dir = tempfile::tempdir().unwrap();
        let (mut a, b) = UnixStream::pair().unwrap();
        let sink = PageSink::spawn(OwnedFd::from(b), dir.path().to_path_buf()).unwrap();
        a.write_all(&iov(PS_IOV_OPEN, 0, 0, 0, task(1))).unwrap();
        let r = sink.wait(Duration::from_millis(200));
        assert!(matches!(r, Err(PagesError::Timeout(_))), "{r:?}");
        let mut b = [0u8; 1];
        assert_eq!(a.read(&mut b).unwrap(), 0, "the source sees the stream end");
    }
}
