//! The `criu swrk` transport.
//!
//! `criu swrk 3` serves the RPC on its fd 3, one end of a `socketpair(AF_UNIX, SOCK_SEQPACKET)`.
//! Each datagram is one packed message; the peer may attach descriptors with SCM_RIGHTS (the pty
//! master of `orphan-pts-master`). Descriptors the child must inherit (stdio to re-inherit,
//! namespace files for `inherit_fd`, page-server sockets) are placed at fixed numbers in the
//! child: stdio at 0–2, the RPC socket at 3, inherited descriptors from 4 on.
//!
//! The child is always reaped: [`Swrk::finish`] waits for it, and dropping a [`Swrk`] that was not
//! finished kills and reaps it.

use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    recvmsg, send, socketpair, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use protobuf::Message;

use super::{CriuError, Result};
use crate::pb::{criu_req_type, CriuReq, CriuResp};

/// Child fd number of the RPC socket.
pub const CHILD_SOCKET_FD: RawFd = 3;
/// Child fd number of the first inherited descriptor.
pub const CHILD_FIRST_INHERITED_FD: RawFd = 4;
/// Largest datagram accepted from CRIU. Responses are small; a larger one is a protocol error.
pub const MAX_DATAGRAM: usize = 64 * 1024;
/// Most descriptors accepted with one datagram.
const MAX_RECEIVED_FDS: usize = 4;
/// Parent-side copies of inherited fds are moved at or above this number so that placing them
/// at their child numbers (0..CHILD_FIRST_INHERITED_FD + n) can never overwrite another one.
const STAGING_FD_BASE: RawFd = 256;
/// Most descriptors a child may inherit besides stdio and the socket.
pub const MAX_INHERITED_FDS: usize = 64;

/// Descriptors handed to the criu child.
#[derive(Default)]
pub struct ChildFds {
    /// stdin, stdout, stderr of the child (re-inherited by a restored task's pipes).
    pub stdio: Option<[OwnedFd; 3]>,
    /// Placed at 4, 5, … in order.
    pub inherited: Vec<OwnedFd>,
}

impl ChildFds {
    /// Adds a descriptor and returns the number it will have in the child.
    pub fn inherit(&mut self, fd: OwnedFd) -> RawFd {
        self.inherited.push(fd);
        CHILD_FIRST_INHERITED_FD + self.inherited.len() as RawFd - 1
    }
}

/// One message received from the peer, with any descriptors attached to it.
#[derive(Debug)]
pub struct Received {
    pub resp: CriuResp,
    pub fds: Vec<OwnedFd>,
}

/// A connection to one `criu swrk` process (or, in tests, to any peer on a socketpair).
pub struct Swrk {
    sock: OwnedFd,
    child: Option<Child>,
    criu: PathBuf,
}

fn stage(fd: OwnedFd) -> Result<OwnedFd> {
    let raw = fcntl(fd.as_raw_fd(), FcntlArg::F_DUPFD_CLOEXEC(STAGING_FD_BASE))
        .map_err(CriuError::Socket)?;
    // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

impl Swrk {
    /// Starts `criu swrk 3` with the given descriptors.
    pub fn spawn(criu: &Path, fds: ChildFds) -> Result<Swrk> {
        if fds.inherited.len() > MAX_INHERITED_FDS {
            return Err(CriuError::Protocol {
                op: "spawn",
                detail: format!(
                    "{} inherited descriptors (max {MAX_INHERITED_FDS})",
                    fds.inherited.len()
                ),
            });
        }
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(CriuError::Socket)?;

        // Staged copies (all CLOEXEC, numbered >= STAGING_FD_BASE) and their child numbers.
        let mut placements: Vec<(OwnedFd, RawFd)> = vec![(stage(theirs)?, CHILD_SOCKET_FD)];
        for (i, fd) in fds.inherited.into_iter().enumerate() {
            placements.push((stage(fd)?, CHILD_FIRST_INHERITED_FD + i as RawFd));
        }
        let plan: Vec<(RawFd, RawFd)> = placements
            .iter()
            .map(|(fd, to)| (fd.as_raw_fd(), *to))
            .collect();

        let mut cmd = Command::new(criu);
        cmd.arg("swrk").arg(CHILD_SOCKET_FD.to_string());
        // Its own process group: a terminal's Ctrl-C goes to ferry alone, which ends the
        // operation where that loses nothing (ops::interrupt); a CRIU killed by it too would
        // end it wherever it was (a post-copy source's CRIU serves the pages after the
        // commit).
        cmd.process_group(0);
        match fds.stdio {
            Some([i, o, e]) => {
                cmd.stdin(Stdio::from(i))
                    .stdout(Stdio::from(o))
                    .stderr(Stdio::from(e));
            }
            None => {
                // CRIU logs to its log file; what it prints on stderr is noise such as the
                // "Can't recv request" of a keep_open session that we close.
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
            }
        }
        // SAFETY: the closure runs in the forked child before exec and only calls dup2(2), which
        // is async-signal-safe; it allocates nothing (`plan` was built before fork).
        unsafe {
            cmd.pre_exec(move || {
                for &(from, to) in &plan {
                    // dup2 clears FD_CLOEXEC on `to`, so exactly these survive exec.
                    if libc::dup2(from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                CriuError::NotFound {
                    path: criu.to_path_buf(),
                    min: super::client::MIN_VERSION_TEXT.to_string(),
                }
            } else {
                CriuError::Spawn {
                    path: criu.to_path_buf(),
                    source,
                }
            }
        })?;
        drop(placements); // our copies of the child's descriptors
        tracing::debug!(pid = child.id(), criu = %criu.display(), "started criu swrk");
        Ok(Swrk {
            sock: ours,
            child: Some(child),
            criu: criu.to_path_buf(),
        })
    }

    /// Wraps an already connected SOCK_SEQPACKET socket (used by tests with a fake peer).
    pub fn from_socket(sock: OwnedFd) -> Swrk {
        Swrk {
            sock,
            child: None,
            criu: PathBuf::from("<peer>"),
        }
    }

    /// The criu child's pid, if this connection has a child.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn criu_path(&self) -> &Path {
        &self.criu
    }

    pub fn socket(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Sends one request datagram.
    pub fn send(&mut self, req: &CriuReq, op: &'static str) -> Result<()> {
        let buf = req.write_to_bytes()?;
        match send(self.sock.as_raw_fd(), &buf, MsgFlags::MSG_NOSIGNAL) {
            Ok(n) if n == buf.len() => Ok(()),
            Ok(n) => Err(CriuError::Protocol {
                op,
                detail: format!("short send: {n} of {} bytes", buf.len()),
            }),
            Err(nix::errno::Errno::EPIPE) | Err(nix::errno::Errno::ECONNRESET) => {
                Err(self.closed(op))
            }
            Err(e) => Err(CriuError::Socket(e)),
        }
    }

    /// Receives one response datagram, waiting at most `timeout` (None, or a wait too long
    /// for the clock to express: forever).
    pub fn recv(&mut self, op: &'static str, timeout: Option<Duration>) -> Result<Received> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            let wait = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        let timeout = timeout.unwrap_or_default();
                        self.kill();
                        return Err(CriuError::Timeout { op, timeout });
                    }
                    PollTimeout::try_from(left.as_millis().min(60_000) as i32 + 1)
                        .unwrap_or(PollTimeout::MAX)
                }
            };
            let mut pfd = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
            match poll(&mut pfd, wait) {
                Ok(0) => continue,
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(CriuError::Socket(e)),
            }
        }
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_RECEIVED_FDS]);
        let (n, flags, fds) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::ECONNRESET) => return Err(self.closed(op)),
                Err(e) => return Err(CriuError::Socket(e)),
            };
            let mut fds = Vec::new();
            for c in msg.cmsgs().map_err(CriuError::Socket)? {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    for fd in raw {
                        // SAFETY: SCM_RIGHTS just installed this descriptor in our table and
                        // nothing else refers to it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
            (msg.bytes, msg.flags, fds)
        };
        if flags.contains(MsgFlags::MSG_TRUNC) || flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(CriuError::Protocol {
                op,
                detail: format!("datagram or its descriptors exceed the cap of {MAX_DATAGRAM} bytes / {MAX_RECEIVED_FDS} fds"),
            });
        }
        if n == 0 {
            return Err(self.closed(op));
        }
        let resp = CriuResp::parse_from_bytes(&buf[..n]).map_err(|e| CriuError::Protocol {
            op,
            detail: format!("undecodable response: {e}"),
        })?;
        if resp.type_.is_none() || resp.success.is_none() {
            return Err(CriuError::Protocol {
                op,
                detail: "response without type or success".into(),
            });
        }
        tracing::trace!(op, kind = ?resp.type_(), success = resp.success(), "criu response");
        Ok(Received { resp, fds })
    }

    fn closed(&mut self, op: &'static str) -> CriuError {
        let exit = match self.child.as_mut() {
            Some(c) => match wait_briefly(c, Duration::from_secs(2)) {
                Some(st) => st.to_string(),
                None => "still running".into(),
            },
            None => "peer".into(),
        };
        CriuError::Closed { op, exit }
    }

    /// Kills and reaps the child (used on timeouts and errors).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Closes the connection and waits for the child to exit (killing it after `grace`).
    pub fn finish(mut self, grace: Duration) -> Option<ExitStatus> {
        let _ = nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let mut child = self.child.take()?;
        match wait_briefly(&mut child, grace) {
            Some(st) => Some(st),
            None => {
                let _ = child.kill();
                child.wait().ok()
            }
        }
    }
}

impl Drop for Swrk {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ =
                nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
            if wait_briefly(&mut c, Duration::from_millis(500)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Polls a child for exit for up to `grace`: every millisecond at first (criu usually exits
/// right after its last answer, and a restore's hand-over waits for that), backing off to
/// every 10 ms.
fn wait_briefly(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + grace;
    let mut nap = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(10));
            }
            _ => return None,
        }
    }
}

/// A request of the given type with no options.
pub fn bare_request(kind: criu_req_type) -> CriuReq {
    let mut req = CriuReq::new();
    req.set_type(kind);
    req
}
