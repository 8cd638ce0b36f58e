//! Raw ARP on one interface (an AF_PACKET socket): the address-conflict probe of RFC 5227
//! (sender address 0.0.0.0, so nobody's cache changes) and the gratuitous announcement after
//! a migration (sender = target = the container's address, broadcast), which moves
//! neighbours' caches and the bridges' forwarding tables to the new location.

use std::net::Ipv4Addr;
use std::time::Duration;

use super::packet::{self, PacketSocket};
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

/// RFC 5227 probes for `targets` on `ifname` (in the calling thread's namespace) sent from
/// `own` with sender address 0.0.0.0: the first (address, MAC) that anyone but `allowed`
/// claims within `wait`, or None.
pub fn probe(
    ifname: &str,
    own: Mac,
    targets: &[Ipv4Addr],
    allowed: &[Mac],
    wait: Duration,
) -> Result<Option<(Ipv4Addr, Mac)>, NetError> {
    if targets.is_empty() {
        return Ok(None);
    }
    let s = PacketSocket::open(ifname, ETH_P_ARP, "ARP")?;
    let reqs: Vec<Vec<u8>> = targets
        .iter()
        .map(|t| frame(1, BROADCAST, own, Ipv4Addr::UNSPECIFIED, [0; 6], *t))
        .collect();
    packet::probe(&s, &reqs, wait, |f| {
        let (_, sha, spa) = parse(f)?;
        (targets.contains(&spa) && sha != own && !allowed.contains(&sha)).then_some((spa, sha))
    })
}

/// Gratuitous ARP for each of `addrs` from `mac` on `ifname`, `times` rounds 100 ms apart.
pub fn announce(ifname: &str, mac: Mac, addrs: &[Ipv4Addr], times: u32) -> Result<(), NetError> {
    let s = PacketSocket::open(ifname, ETH_P_ARP, "ARP")?;
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
