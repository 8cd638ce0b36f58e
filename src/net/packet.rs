//! A raw packet socket (AF_PACKET) on one interface, for the frames ferry sends itself: ARP
//! ([`super::arp`]) and IPv6 neighbour discovery ([`super::ndp`]). Frames sent here bypass
//! the network lock, which filters IP traffic only.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::NetError;

/// Largest frame read (the interfaces ferry makes have an MTU ≤ 65535; what is read here is
/// ARP or neighbour discovery, far smaller; anything longer is cut).
const MAX_FRAME: usize = 2048;

/// A packet socket bound to one interface of the calling thread's namespace, receiving the
/// frames of one ethertype.
pub(crate) struct PacketSocket {
    fd: OwnedFd,
    ifname: String,
    proto: &'static str,
}

impl PacketSocket {
    /// `proto` names the protocol in errors (`ARP`, `NDP`).
    pub(crate) fn open(
        ifname: &str,
        ethertype: u16,
        proto: &'static str,
    ) -> Result<PacketSocket, NetError> {
        let err = |source: std::io::Error| NetError::Packet {
            proto,
            ifname: ifname.to_string(),
            source,
        };
        let cname = std::ffi::CString::new(ifname)
            .map_err(|_| err(std::io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: if_nametoindex reads a NUL-terminated string that lives across the call.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if index == 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        // SAFETY: socket(2) with constant arguments; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(ethertype.to_be()),
            )
        };
        if raw < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ethertype.to_be();
        sll.sll_ifindex = index as i32;
        // SAFETY: bind with a pointer to a live sockaddr_ll and its exact size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        Ok(PacketSocket {
            fd,
            ifname: ifname.to_string(),
            proto,
        })
    }

    fn err(&self, source: std::io::Error) -> NetError {
        NetError::Packet {
            proto: self.proto,
            ifname: self.ifname.clone(),
            source,
        }
    }

    /// Sends one whole frame (Ethernet header included).
    pub(crate) fn send(&self, f: &[u8]) -> Result<(), NetError> {
        // SAFETY: send from a live buffer of the given length on our own socket.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
        if n < 0 {
            return Err(self.err(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// One frame (at most [`MAX_FRAME`] bytes of it), or None after `wait`.
    pub(crate) fn recv(&self, wait: Duration) -> Result<Option<Vec<u8>>, NetError> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = wait.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll on one live pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            return Err(self.err(std::io::Error::last_os_error()));
        }
        if rc == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; MAX_FRAME];
        // SAFETY: recv into a live buffer of the given length on our own socket.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(self.err(std::io::Error::last_os_error()));
        }
        buf.truncate(n as usize);
        Ok(Some(buf))
    }
}

/// A probe: sends every frame of `requests` three times over `wait` on `s`, and returns what
/// `claim` makes of the first received frame it accepts (someone claiming an address), or
/// None after `wait`.
pub(crate) fn probe<T>(
    s: &PacketSocket,
    requests: &[Vec<u8>],
    wait: Duration,
    mut claim: impl FnMut(&[u8]) -> Option<T>,
) -> Result<Option<T>, NetError> {
    let start = Instant::now();
    let mut next_send = start;
    while start.elapsed() < wait {
        if Instant::now() >= next_send {
            for r in requests {
                s.send(r)?;
            }
            next_send += wait / 3;
        }
        let left = next_send
            .saturating_duration_since(Instant::now())
            .min(wait.saturating_sub(start.elapsed()));
        if let Some(found) = s.recv(left)?.and_then(|f| claim(&f)) {
            return Ok(Some(found));
        }
    }
    Ok(None)
}
