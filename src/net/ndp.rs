//! IPv6 neighbour discovery frames (RFC 4861) on one interface, ferry's IPv6 counterpart of
//! [`super::arp`]: the clash probe is a neighbour solicitation as duplicate address detection
//! sends it (RFC 4862: from the unspecified address, so nobody's cache changes), and the
//! announcement after a migration is an unsolicited neighbour advertisement with the override
//! flag to all nodes, which moves neighbours' caches and the bridges' forwarding tables to
//! the new MAC.

use std::net::Ipv6Addr;
use std::time::Duration;

use super::arp::Mac;
use super::packet::{self, PacketSocket};
use super::NetError;

const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_ICMPV6: u8 = 58;
const NEIGHBOR_SOLICITATION: u8 = 135;
const NEIGHBOR_ADVERTISEMENT: u8 = 136;
/// Neighbour discovery is only believed from the link itself (RFC 4861 §7.1).
const HOP_LIMIT: u8 = 255;
/// Ethernet (14) + IPv6 header (40).
const ICMP_AT: usize = 54;
/// Override flag of a neighbour advertisement.
const FLAG_OVERRIDE: u8 = 0x20;
/// Option "target link-layer address".
const OPT_TARGET_LL: u8 = 2;
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// The solicited-node multicast address of `a` (ff02::1:ffXX:XXXX).
fn solicited_node(a: Ipv6Addr) -> Ipv6Addr {
    let o = a.octets();
    let mut m = [0u8; 16];
    m[0] = 0xff;
    m[1] = 0x02;
    m[11] = 0x01;
    m[12] = 0xff;
    m[13..].copy_from_slice(&o[13..]);
    Ipv6Addr::from(m)
}

/// The Ethernet address of an IPv6 multicast group (33:33 + its last 32 bits).
fn multicast_mac(g: Ipv6Addr) -> Mac {
    let o = g.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// The ICMPv6 checksum of `msg` (checksum field zero) from `src` to `dst` (RFC 4443 §2.3).
fn checksum(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(msg.len() as u32).to_be_bytes());
    add(&[0, 0, 0, IPPROTO_ICMPV6]);
    add(msg);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame carrying the ICMPv6 message `icmp` (checksum filled in here).
fn frame(eth_dst: Mac, eth_src: Mac, src: Ipv6Addr, dst: Ipv6Addr, mut icmp: Vec<u8>) -> Vec<u8> {
    let c = checksum(src, dst, &icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::with_capacity(ICMP_AT + icmp.len());
    f.extend_from_slice(&eth_dst);
    f.extend_from_slice(&eth_src);
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, no traffic class or flow label
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.push(IPPROTO_ICMPV6);
    f.push(HOP_LIMIT);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&icmp);
    f
}

/// The duplicate-address-detection solicitation for `target`, from `own`.
pub fn solicitation(own: Mac, target: Ipv6Addr) -> Vec<u8> {
    let group = solicited_node(target);
    let mut icmp = vec![NEIGHBOR_SOLICITATION, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    frame(
        multicast_mac(group),
        own,
        Ipv6Addr::UNSPECIFIED,
        group,
        icmp,
    )
}

/// The unsolicited advertisement of `addr` at `mac`, to all nodes, overriding their caches.
pub fn advertisement(mac: Mac, addr: Ipv6Addr) -> Vec<u8> {
    let mut icmp = vec![NEIGHBOR_ADVERTISEMENT, 0, 0, 0, FLAG_OVERRIDE, 0, 0, 0];
    icmp.extend_from_slice(&addr.octets());
    icmp.extend_from_slice(&[OPT_TARGET_LL, 1]);
    icmp.extend_from_slice(&mac);
    frame(multicast_mac(ALL_NODES), mac, addr, ALL_NODES, icmp)
}

/// (sender MAC, target address) of a neighbour advertisement received from the link.
pub fn parse_advertisement(f: &[u8]) -> Option<(Mac, Ipv6Addr)> {
    if f.len() < ICMP_AT + 24
        || f[12..14] != ETH_P_IPV6.to_be_bytes()
        || f[20] != IPPROTO_ICMPV6
        || f[21] != HOP_LIMIT
        || f[ICMP_AT] != NEIGHBOR_ADVERTISEMENT
    {
        return None;
    }
    let mut sha = [0u8; 6];
    sha.copy_from_slice(&f[6..12]);
    let mut t = [0u8; 16];
    t.copy_from_slice(&f[ICMP_AT + 8..ICMP_AT + 24]);
    Some((sha, Ipv6Addr::from(t)))
}

/// Duplicate address detection for `targets` on `ifname` (in the calling thread's
/// namespace), sent from `own`: the first (address, MAC) that anyone but `allowed` claims
/// within `wait`, or None.
pub fn probe(
    ifname: &str,
    own: Mac,
    targets: &[Ipv6Addr],
    allowed: &[Mac],
    wait: Duration,
) -> Result<Option<(Ipv6Addr, Mac)>, NetError> {
    if targets.is_empty() {
        return Ok(None);
    }
    let s = PacketSocket::open(ifname, ETH_P_IPV6, "NDP")?;
    let reqs: Vec<Vec<u8>> = targets.iter().map(|t| solicitation(own, *t)).collect();
    packet::probe(&s, &reqs, wait, |f| {
        let (sha, target) = parse_advertisement(f)?;
        (targets.contains(&target) && sha != own && !allowed.contains(&sha))
            .then_some((target, sha))
    })
}

/// Unsolicited advertisements of each of `addrs` at `mac` on `ifname`, `times` rounds
/// 100 ms apart.
pub fn announce(ifname: &str, mac: Mac, addrs: &[Ipv6Addr], times: u32) -> Result<(), NetError> {
    if addrs.is_empty() {
        return Ok(());
    }
    let s = PacketSocket::open(ifname, ETH_P_IPV6, "NDP")?;
    for k in 0..times {
        if k > 0 {
            std::thread::sleep(Duration::from_millis(100));
        }
        for a in addrs {
            s.send(&advertisement(mac, *a))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: Mac = [0x02, 0x42, 0x0a, 0x58, 0x00, 0x05];

    /// A message with its checksum in place sums to zero with the pseudo-header.
    fn verifies(f: &[u8]) -> bool {
        let addr = |at: usize| {
            let mut o = [0u8; 16];
            o.copy_from_slice(&f[at..at + 16]);
            Ipv6Addr::from(o)
        };
        checksum(addr(22), addr(38), &f[ICMP_AT..]) == 0
    }

    #[test]
    fn solicitation_goes_to_the_solicited_node_group_from_nowhere() {
        let t: Ipv6Addr = "fd00:77::1:2345:6789".parse().unwrap();
        let f = solicitation(MAC, t);
        assert_eq!(f.len(), ICMP_AT + 24);
        assert_eq!(&f[0..6], &[0x33, 0x33, 0xff, 0x45, 0x67, 0x89]);
        assert_eq!(&f[6..12], &MAC);
        assert_eq!(&f[22..38], &Ipv6Addr::UNSPECIFIED.octets());
        assert_eq!(
            &f[38..54],
            &"ff02::1:ff45:6789".parse::<Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(f[21], 255);
        assert_eq!(f[ICMP_AT], 135);
        assert!(verifies(&f));
        assert!(
            parse_advertisement(&f).is_none(),
            "a solicitation is no answer"
        );
    }

    #[test]
    fn advertisement_overrides_and_round_trips() {
        let a: Ipv6Addr = "fd00:77::10".parse().unwrap();
        let f = advertisement(MAC, a);
        assert_eq!(f.len(), ICMP_AT + 32);
        assert_eq!(&f[0..6], &[0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(f[ICMP_AT + 4], FLAG_OVERRIDE);
        assert_eq!(
            &f[ICMP_AT + 24..],
            &[2, 1, 0x02, 0x42, 0x0a, 0x58, 0x00, 0x05]
        );
        assert!(verifies(&f));
        assert_eq!(parse_advertisement(&f), Some((MAC, a)));
        assert!(parse_advertisement(&f[..60]).is_none());
        let mut hop = f.clone();
        hop[21] = 64;
        assert!(parse_advertisement(&hop).is_none(), "from off the link");
    }

    #[test]
    fn checksum_of_a_known_message() {
        // An echo request ::1 → ::1, id 1, seq 1, no data: 0xffff - sum(pseudo, message).
        let msg = [128u8, 0, 0, 0, 0, 1, 0, 1];
        let lo = Ipv6Addr::LOCALHOST;
        // 1 + 1 (addresses) + 8 (length) + 58 (next header) + 0x8000 + 1 + 1 = 0x8046
        assert_eq!(checksum(lo, lo, &msg), !0x8046u16);
    }
}
