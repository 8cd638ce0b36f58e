//! A container process's stdio: containerd's fifos (or `file://` URIs) copied through pipes
//! the shim owns, or a terminal whose master arrives on a console socket.
//!
//! Pipes rather than handing the fifos to runc: a checkpointed process's stdio are then
//! `pipe:[…]` descriptors, which a restore re-inherits from new pipes (CRIU's `inherit_fd`)
//! wherever containerd's new fifos are.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::OFlag;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::error::{Result, ShimError};

/// Where containerd wants a process's stdio (empty strings: none).
#[derive(Debug, Clone, Default)]
pub struct StdioSpec {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// The shim's side of a process's stdio.
#[derive(Default)]
pub struct ProcessIo {
    close_stdin: Option<Arc<Notify>>,
    outputs: Vec<JoinHandle<()>>,
    /// The pty master, for resize.
    pub console: Option<Arc<OwnedFd>>,
}

fn devnull() -> Result<OwnedFd> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map(OwnedFd::from)
        .map_err(ShimError::io("opening /dev/null"))
}

fn pipe_pair() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| ShimError::io("pipe")(std::io::Error::from(e)))
}

/// An output destination: a fifo (opened read-write so that writing never blocks on a
/// missing reader nor fails with EPIPE when the reader goes), or a file for `file://`.
async fn open_output(target: &str) -> Result<Box<dyn tokio::io::AsyncWrite + Unpin + Send>> {
    if let Some(rest) = target.strip_prefix("file://") {
        let f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(rest)
            .await
            .map_err(ShimError::io(format!("opening {rest}")))?;
        return Ok(Box::new(f));
    }
    if target.contains("://") {
        return Err(ShimError::InvalidArgument(format!(
            "stdio URI {target:?}: only fifos and file:// are supported"
        )));
    }
    let s = pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(target)
        .map_err(ShimError::io(format!("opening fifo {target}")))?;
    Ok(Box::new(s))
}

/// A process's stdin fifo, read until containerd says CloseIO and then until it is empty.
///
/// The fifo is opened read-write, so it never reports EOF (a client that detaches and
/// attaches again does not end the process's stdin); containerd says CloseIO instead. ctr
/// and containerd's clients send CloseIO once they have written everything (ctr even before
/// closing their end), so what is in the fifo then still belongs to the process: it is read
/// out, without waiting for more, before the stdin ends.
struct StdinSource {
    fifo: pipe::Receiver,
    closed: Arc<Notify>,
    closing: bool,
}

impl StdinSource {
    fn open(target: &str, io: &mut ProcessIo) -> Result<StdinSource> {
        let fifo = pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(target)
            .map_err(ShimError::io(format!("opening fifo {target}")))?;
        let closed = Arc::new(Notify::new());
        io.close_stdin = Some(closed.clone());
        Ok(StdinSource {
            fifo,
            closed,
            closing: false,
        })
    }

    /// The next chunk into `buf`: its length, or `None` when the stdin is over (CloseIO and
    /// the fifo drained, or a read error).
    async fn next(&mut self, buf: &mut [u8]) -> Option<usize> {
        use tokio::io::AsyncReadExt;
        loop {
            if self.closing {
                // A read(2) of the (non-blocking) fifo, not tokio's `try_read`: that one
                // trusts the reactor's readiness, which may not have seen the last write yet.
                return match nix::unistd::read(self.fifo.as_raw_fd(), buf) {
                    Ok(n) if n > 0 => Some(n),
                    Err(nix::errno::Errno::EINTR) => continue,
                    _ => None,
                };
            }
            // Both branches are cancel-safe: a read that loses the race took no data, and a
            // CloseIO that comes first is kept by `Notify` as a permit.
            tokio::select! {
                r = self.fifo.read(buf) => return match r {
                    Ok(n) if n > 0 => Some(n),
                    _ => None,
                },
                _ = self.closed.notified() => self.closing = true,
            }
        }
    }
}

impl ProcessIo {
    /// Pipes for a process without a terminal: returns the process's stdin, stdout, stderr
    /// (to hand to runc or CRIU) and starts the copies.
    pub async fn pipes(spec: &StdioSpec) -> Result<([OwnedFd; 3], ProcessIo)> {
        let mut io = ProcessIo::default();
        let stdin = if spec.stdin.is_empty() {
            devnull()?
        } else {
            let (r, w) = pipe_pair()?;
            let mut src = StdinSource::open(&spec.stdin, &mut io)?;
            let mut dst = pipe::Sender::from_owned_fd(w).map_err(ShimError::io("stdin pipe"))?;
            tokio::spawn(async move {
                let mut buf = vec![0u8; 32 * 1024];
                while let Some(n) = src.next(&mut buf).await {
                    if dst.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                // Dropping `dst` closes the process's stdin.
            });
            r
        };
        let stdout = Self::output(&mut io, &spec.stdout).await?;
        let stderr = Self::output(&mut io, &spec.stderr).await?;
        Ok(([stdin, stdout, stderr], io))
    }

    async fn output(io: &mut ProcessIo, target: &str) -> Result<OwnedFd> {
        if target.is_empty() {
            return devnull();
        }
        let (r, w) = pipe_pair()?;
        let mut dst = open_output(target).await?;
        let mut src = pipe::Receiver::from_owned_fd(r).map_err(ShimError::io("output pipe"))?;
        io.outputs.push(tokio::spawn(async move {
            let _ = tokio::io::copy(&mut src, &mut dst).await;
            let _ = dst.flush().await;
        }));
        Ok(w)
    }

    /// A process with a terminal: copies between its pty master and the fifos.
    pub async fn console(spec: &StdioSpec, master: OwnedFd) -> Result<ProcessIo> {
        let mut io = ProcessIo::default();
        let master = Arc::new(master);
        io.console = Some(master.clone());
        if !spec.stdin.is_empty() {
            let mut src = StdinSource::open(&spec.stdin, &mut io)?;
            let m = master
                .try_clone()
                .map_err(ShimError::io("dup pty master"))?;
            tokio::spawn(async move {
                let mut w = std::fs::File::from(m);
                let mut buf = vec![0u8; 32 * 1024];
                while let Some(n) = src.next(&mut buf).await {
                    use std::io::Write;
                    // A pty accepts small writes at once; a blocked write only delays this task.
                    if tokio::task::block_in_place(|| w.write_all(&buf[..n])).is_err() {
                        break;
                    }
                }
            });
        }
        if !spec.stdout.is_empty() {
            let target = spec.stdout.clone();
            let m = master
                .try_clone()
                .map_err(ShimError::io("dup pty master"))?;
            let dst = open_output_blocking(&target)?;
            io.outputs.push(tokio::task::spawn_blocking(move || {
                let mut r = std::fs::File::from(m);
                let mut w = dst;
                // Ends with EIO when the last slave descriptor closes.
                let _ = std::io::copy(&mut r, &mut w);
            }));
        }
        Ok(io)
    }

    /// CloseIO: the process's stdin reaches EOF.
    pub fn close_stdin(&self) {
        if let Some(c) = &self.close_stdin {
            c.notify_one();
        }
    }

    /// Waits (at most `timeout`) for the output copies to end, so that a process's last
    /// words reach containerd before its exit does.
    pub async fn drain(&mut self, timeout: Duration) {
        let all = futures_join(std::mem::take(&mut self.outputs));
        let _ = tokio::time::timeout(timeout, all).await;
    }

    /// TIOCSWINSZ on the pty master.
    pub fn resize(&self, width: u32, height: u32) -> Result<()> {
        let Some(m) = &self.console else {
            return Err(ShimError::FailedPrecondition(
                "the process has no terminal".into(),
            ));
        };
        let ws = libc::winsize {
            ws_row: height.min(u16::MAX as u32) as u16,
            ws_col: width.min(u16::MAX as u32) as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is valid for the
        // call; the descriptor is owned by `m` and open.
        let r = unsafe { libc::ioctl(m.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if r < 0 {
            return Err(ShimError::io("resizing the pty")(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

async fn futures_join(handles: Vec<JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

fn open_output_blocking(target: &str) -> Result<std::fs::File> {
    if let Some(rest) = target.strip_prefix("file://") {
        return std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(rest)
            .map_err(ShimError::io(format!("opening {rest}")));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(target)
        .map_err(ShimError::io(format!("opening fifo {target}")))
}

/// A console socket runc (or a terminal restore) sends the pty master to.
pub struct ConsoleSocket {
    pub path: PathBuf,
    listener: tokio::net::UnixListener,
}

impl ConsoleSocket {
    /// Binds a socket under `dir` (kept short: socket paths are limited to 107 bytes).
    pub fn bind(dir: &Path) -> Result<ConsoleSocket> {
        std::fs::create_dir_all(dir)
            .map_err(ShimError::io(format!("creating {}", dir.display())))?;
        let mut rnd = [0u8; 8];
        getrandom::getrandom(&mut rnd).map_err(|e| ShimError::Internal(e.to_string()))?;
        let name: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
        let path = dir.join(format!("pty-{name}.sock"));
        let listener = tokio::net::UnixListener::bind(&path)
            .map_err(ShimError::io(format!("binding {}", path.display())))?;
        Ok(ConsoleSocket { path, listener })
    }

    /// Accepts one connection and receives the master (at most `timeout`).
    pub async fn receive(self, timeout: Duration) -> Result<OwnedFd> {
        let path = self.path.clone();
        let res = tokio::time::timeout(timeout, async {
            let (s, _) = self
                .listener
                .accept()
                .await
                .map_err(ShimError::io("accepting on the console socket"))?;
            let s = s.into_std().map_err(ShimError::io("console socket"))?;
            s.set_nonblocking(false)
                .map_err(ShimError::io("console socket"))?;
            tokio::task::spawn_blocking(move || recv_fd(&s))
                .await
                .map_err(|e| ShimError::Internal(e.to_string()))?
        })
        .await;
        let _ = std::fs::remove_file(&path);
        match res {
            Ok(r) => r,
            Err(_) => Err(ShimError::Internal(
                "no pty master arrived on the console socket".into(),
            )),
        }
    }
}

fn recv_fd(s: &std::os::unix::net::UnixStream) -> Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let mut buf = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        s.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| ShimError::io("receiving the pty master")(e.into()))?;
    let mut got: Option<OwnedFd> = None;
    for c in msg
        .cmsgs()
        .map_err(|e| ShimError::io("receiving the pty master")(e.into()))?
    {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: SCM_RIGHTS just installed `fd` in this process; nothing else owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if got.is_none() {
                    got = Some(owned);
                }
            }
        }
    }
    got.ok_or_else(|| ShimError::Internal("console socket message without a descriptor".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// What a client wrote into the stdin fifo before it said CloseIO reaches the process,
    /// all of it, even while the process is slow to read; then the process sees EOF.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn close_io_delivers_everything_written_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("stdin");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let spec = StdioSpec {
            stdin: fifo.to_string_lossy().into_owned(),
            ..Default::default()
        };
        let ([stdin, _, _], io) = ProcessIo::pipes(&spec).await.unwrap();

        const LEN: usize = 1 << 20;
        let data: Vec<u8> = (0..LEN).map(|i| (i * 7 % 251) as u8).collect();
        // The process: starts reading late, then slowly.
        let reader = std::thread::spawn(move || {
            let mut f = std::fs::File::from(stdin);
            std::thread::sleep(Duration::from_millis(200));
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match f.read(&mut buf).unwrap() {
                    0 => break got,
                    n => got.extend_from_slice(&buf[..n]),
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        });
        // The client: writes it all (the fifo takes it as the shim copies it on), then
        // CloseIO, then closes its end (ctr's order).
        let expect = data.clone();
        let fifo2 = fifo.clone();
        let w = tokio::task::spawn_blocking(move || {
            let mut w = std::fs::OpenOptions::new().write(true).open(fifo2).unwrap();
            w.write_all(&data).unwrap();
            w
        })
        .await
        .unwrap();
        io.close_stdin();
        drop(w);
        let got = tokio::task::spawn_blocking(move || reader.join().unwrap())
            .await
            .unwrap();
        assert_eq!(got.len(), expect.len(), "bytes reaching the process");
        assert!(got == expect, "stdin content differs");
    }
}
