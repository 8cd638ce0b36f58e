//! Raw ARP on one interface (an AF_PACKET socket): the address-conflict probe of RFC 5227
//! (sender address 0.0.0.0, so nobody's cache changes) and the gratuitous announcement after
//! a migration (sender = target = the container's address, broadcast), which moves
//! neighbours' caches and the bridges' forwarding tables to the new location.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::NetError;

pub type Mac = [u8; 6];
const BROADCAST: Mac = [0xff; 6];
const ETH_P_ARP: u16 = 0x0806;
/// Ethernet header + ARP for IPv4, padded to the Ethernet minimum.
const FRAME_LEN: usize = 60;

pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in m.iter_mut() {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

pub fn fmt_mac(m: &Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// An ARP frame for IPv4 over Ethernet.
pub fn frame(op: u16, eth_dst: Mac, sha: Mac, spa: Ipv4Addr, tha: Mac, tpa: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(FRAME_LEN);
    f.extend_from_slice(&eth_dst);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f.push(6);
    f.push(4);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa.octets());
    f.resize(FRAME_LEN, 0);
    f
}

/// (op, sender MAC, sender address) of an ARP frame for IPv4 over Ethernet.
pub fn parse(f: &[u8]) -> Option<(u16, Mac, Ipv4Addr)> {
    if f.len() < 42 || f[12..14] != ETH_P_ARP.to_be_bytes() || f[16..18] != [0x08, 0x00] {
        return None;
    }
    let op = u16::from_be_bytes([f[20], f[21]]);
    let mut sha = [0u8; 6];
    sha.copy_from_slice(&f[22..28]);
    let spa = Ipv4Addr::new(f[28], f[29], f[30], f[31]);
    Some((op, sha, spa))
}

/// A packet socket bound to one interface of the calling thread's namespace.
struct ArpSocket {
    fd: OwnedFd,
    ifname: String,
}

impl ArpSocket {
    fn open(ifname: &str) -> Result<ArpSocket, NetError> {
        let err = |source: std::io::Error| NetError::Arp {
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
                i32::from(ETH_P_ARP.to_be()),
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
        sll.sll_protocol = ETH_P_ARP.to_be();
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
        Ok(ArpSocket {
            fd,
            ifname: ifname.to_string(),
        })
    }

    fn err(&self, source: std::io::Error) -> NetError {
        NetError::Arp {
            ifname: self.ifname.clone(),
            source,
        }
    }

    fn send(&self, f: &[u8]) -> Result<(), NetError> {
        // SAFETY: send from a live buffer of the given length on our own socket.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
        if n < 0 {
            return Err(self.err(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// One frame, or None after `wait`.
    fn recv(&self, wait: Duration) -> Result<Option<Vec<u8>>, NetError> {
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
        let mut buf = vec![0u8; 1600];
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

/// RFC 5227 probe for `target` on `ifname` (in the calling thread's namespace) sent from
/// `own` with sender address 0.0.0.0: the MAC of anyone but `allowed` that claims the
/// address within `wait`, or None.
pub fn probe(
    ifname: &str,
    own: Mac,
    target: Ipv4Addr,
    allowed: &[Mac],
    wait: Duration,
) -> Result<Option<Mac>, NetError> {
    let s = ArpSocket::open(ifname)?;
    let req = frame(1, BROADCAST, own, Ipv4Addr::UNSPECIFIED, [0; 6], target);
    let start = Instant::now();
    let mut next_send = start;
    while start.elapsed() < wait {
        if Instant::now() >= next_send {
            s.send(&req)?;
            next_send += wait / 3;
        }
        let left = next_send
            .saturating_duration_since(Instant::now())
            .min(wait.saturating_sub(start.elapsed()));
        if let Some(f) = s.recv(left)? {
            if let Some((_, sha, spa)) = parse(&f) {
                if spa == target && sha != own && !allowed.contains(&sha) {
                    return Ok(Some(sha));
                }
            }
        }
    }
    Ok(None)
}

/// Gratuitous ARP for each of `addrs` from `mac` on `ifname`, `times` rounds 100 ms apart.
pub fn announce(ifname: &str, mac: Mac, addrs: &[Ipv4Addr], times: u32) -> Result<(), NetError> {
    let s = ArpSocket::open(ifname)?;
    for k in 0..times {
        if k > 0 {
            std::thread::sleep(Duration::from_millis(100));
        }
        for a in addrs {
            s.send(&frame(1, BROADCAST, mac, *a, [0; 6], *a))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mac = parse_mac("02:42:0a:58:00:05").unwrap();
        assert_eq!(fmt_mac(&mac), "02:42:0a:58:00:05");
        let ip: Ipv4Addr = "10.88.0.5".parse().unwrap();
        let f = frame(1, BROADCAST, mac, ip, [0; 6], ip);
        assert_eq!(f.len(), FRAME_LEN);
        assert_eq!(&f[0..6], &BROADCAST);
        assert_eq!(parse(&f), Some((1, mac, ip)));
        assert_eq!(&f[38..42], &ip.octets());
        assert!(parse(&f[..30]).is_none());
        assert!(parse_mac("02:42:0a:58:00").is_none());
        assert!(parse_mac("02:42:0a:58:00:05:06").is_none());
        assert!(parse_mac("zz:42:0a:58:00:05").is_none());
    }
}
