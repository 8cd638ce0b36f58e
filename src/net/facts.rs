//! The network facts of a container's namespace, read on the source before anything moves.
//!
//! Every non-loopback interface with a global address is carried (a CNI container has one,
//! usually `eth0`; a pod with extra networks, Multus style, has more): its IPv4 and global
//! IPv6 addresses (with prefix lengths), MTU and MAC, and the namespace's IPv4 and IPv6
//! routes through it that the kernel did not add by itself (the default route through the
//! bridge's gateway, say). Link-local IPv6 addresses are not carried: the kernel makes them
//! anew on any interface. At most [`MAX_IFACES`] interfaces: a namespace with more is
//! refused. Addresses on `lo` beyond the loopback ones (a service or anycast address, scope
//! global) are carried too, and the namespace's own iptables rules ([`super::firewall`]).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::arp::{parse_mac, Mac};
use super::{in_ns_cmd, run, NetError};

/// Most addresses / routes (of each family, per interface) accepted from a peer.
pub const MAX_ITEMS: usize = 64;
/// Most interfaces carried.
pub const MAX_IFACES: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// "default" or a CIDR.
    pub dst: String,
    /// The next hop, if any.
    #[serde(default)]
    pub via: Option<String>,
    /// The route's metric unless it is the family's default (two default routes through two
    /// interfaces differ in it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<u32>,
}

/// What the destination must rebuild: the interfaces. A field this build does not know is
/// refused, not ignored: it would be something of the container's network that does not
/// arrive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetFacts {
    /// In the source's order (by interface index).
    pub ifaces: Vec<Iface>,
    /// Global addresses on `lo` (either family, `address/len`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loopback: Vec<String>,
    /// The namespace's own iptables rules, if it has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall: Option<super::firewall::Firewall>,
}

/// One interface of the namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Iface {
    /// Interface name inside the namespace (e.g. `eth0`).
    pub ifname: String,
    /// Its MAC on the source (the destination uses a fresh one and announces it).
    pub mac: String,
    pub mtu: u32,
    /// IPv4 addresses as `a.b.c.d/len`.
    pub addrs: Vec<String>,
    pub routes: Vec<Route>,
    /// Global IPv6 addresses as `x:y::z/len`.
    #[serde(default)]
    pub addrs6: Vec<String>,
    /// IPv6 routes (next hops may be link-local: they are always given with the interface).
    #[serde(default)]
    pub routes6: Vec<Route>,
}

impl NetFacts {
    /// Checks what a peer sent before anything is done with it: how many interfaces, names
    /// that differ, each interface ([`Iface::validate`]), the loopback addresses.
    pub fn validate(&self) -> Result<(), NetError> {
        let bad = |w: String| Err(NetError::Invalid(format!("network facts: {w}")));
        if self.ifaces.len() > MAX_IFACES {
            return bad(format!(
                "{} interfaces (at most {MAX_IFACES} are carried)",
                self.ifaces.len()
            ));
        }
        if self.ifaces.is_empty() && self.loopback.is_empty() {
            return bad("nothing to carry".into());
        }
        if self.loopback.len() > MAX_ITEMS {
            return bad("too many addresses on lo".into());
        }
        if let Some(a) = self
            .loopback
            .iter()
            .find(|a| parse_cidr(a).is_none() && parse_cidr6(a).is_none())
        {
            return bad(format!("lo: {a:?}"));
        }
        if let Some(fw) = &self.firewall {
            fw.validate()?;
        }
        for (i, f) in self.ifaces.iter().enumerate() {
            if self.ifaces[..i].iter().any(|g| g.ifname == f.ifname) {
                return Err(NetError::Invalid(format!(
                    "network facts: interface {:?} twice",
                    f.ifname
                )));
            }
            f.validate()?;
        }
        Ok(())
    }

    /// Whether the container has IPv6 addresses (then the destination locks IPv6 too).
    pub fn has_ipv6(&self) -> bool {
        self.ifaces.iter().any(|f| !f.addrs6.is_empty())
            || self.loopback.iter().any(|a| parse_cidr6(a).is_some())
    }

    /// The source's MACs (a clash probe answered by one of them is the source itself).
    pub fn macs(&self) -> Vec<Mac> {
        self.ifaces
            .iter()
            .filter_map(|f| parse_mac(&f.mac))
            .collect()
    }

    /// The interface names, e.g. `eth0 net1`.
    pub fn names(&self) -> String {
        let names: Vec<&str> = self.ifaces.iter().map(|f| f.ifname.as_str()).collect();
        names.join(" ")
    }
}

impl Iface {
    /// Sizes, an interface name the kernel accepts, addresses and routes that parse.
    pub fn validate(&self) -> Result<(), NetError> {
        let bad = |w: String| Err(NetError::Invalid(format!("network facts: {w}")));
        if !valid_ifname(&self.ifname) {
            return bad(format!("interface name {:?}", self.ifname));
        }
        let bad = |w: String| bad(format!("{}: {w}", self.ifname));
        if self.addrs.is_empty() && self.addrs6.is_empty() {
            return bad("no address".into());
        }
        let most = [&self.addrs, &self.addrs6].map(Vec::len).into_iter().max();
        let most_routes = [&self.routes, &self.routes6]
            .map(Vec::len)
            .into_iter()
            .max();
        if most > Some(MAX_ITEMS) || most_routes > Some(MAX_ITEMS) {
            return bad("too many addresses or routes".into());
        }
        let v4 = |c: &str| parse_cidr(c).is_some();
        let v6 = |c: &str| parse_cidr6(c).is_some();
        check_family(&self.addrs, &self.routes, v4, |h| {
            h.parse::<Ipv4Addr>().is_ok()
        })
        .or_else(bad)?;
        check_family(&self.addrs6, &self.routes6, v6, |h| {
            h.parse::<Ipv6Addr>().is_ok()
        })
        .or_else(bad)?;
        if !(68..=65535).contains(&self.mtu) {
            return bad(format!("mtu {}", self.mtu));
        }
        if !self.addrs6.is_empty() && self.mtu < 1280 {
            return bad(format!("mtu {} is below IPv6's 1280", self.mtu));
        }
        Ok(())
    }

    /// The IPv4 addresses without their prefix lengths.
    pub fn ips(&self) -> Vec<Ipv4Addr> {
        self.addrs
            .iter()
            .filter_map(|a| cidr(a, 32))
            .map(|(ip, _)| ip)
            .collect()
    }

    /// The IPv6 addresses without their prefix lengths.
    pub fn ips6(&self) -> Vec<Ipv6Addr> {
        self.addrs6
            .iter()
            .filter_map(|a| cidr(a, 128))
            .map(|(ip, _)| ip)
            .collect()
    }
}

/// An interface name the kernel accepts (and a shell would not split or expand).
pub(crate) fn valid_ifname(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 15
        && n != "."
        && n != ".."
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Addresses and route destinations (or `default`) that are CIDRs of one family
/// (`cidr_ok`), next hops that are addresses of it (`hop_ok`); what is wrong otherwise.
fn check_family(
    addrs: &[String],
    routes: &[Route],
    cidr_ok: impl Fn(&str) -> bool,
    hop_ok: impl Fn(&str) -> bool,
) -> Result<(), String> {
    if let Some(a) = addrs.iter().find(|a| !cidr_ok(a)) {
        return Err(format!("{a:?}"));
    }
    for r in routes {
        if r.dst != "default" && !cidr_ok(&r.dst) {
            return Err(format!("route {:?}", r.dst));
        }
        if let Some(v) = r.via.as_deref().filter(|v| !hop_ok(v)) {
            return Err(format!("next hop {v:?}"));
        }
    }
    Ok(())
}

/// `address/len` → (address, len), the length at most `max` (32 for IPv4, 128 for IPv6).
fn cidr<A: std::str::FromStr>(s: &str, max: u8) -> Option<(A, u8)> {
    let (a, l) = s.split_once('/')?;
    let len: u8 = l.parse().ok()?;
    (len <= max).then_some(())?;
    Some((a.parse().ok()?, len))
}

/// `a.b.c.d/len` → (address, len).
pub fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    cidr(s, 32)
}

/// `x:y::z/len` → (address, len).
pub fn parse_cidr6(s: &str) -> Option<(Ipv6Addr, u8)> {
    cidr(s, 128)
}

/// Reads the facts of the namespace at `netns` (`ip -j` inside it); None when no interface
/// has a global address (nothing to rebuild: the path is used as it is).
pub fn gather(netns: &Path) -> Result<Option<NetFacts>, NetError> {
    let addrs = run(in_ns_cmd(netns, "ip").args(["-j", "addr", "show"]))?;
    let links = run(in_ns_cmd(netns, "ip").args(["-j", "link", "show"]))?;
    let ip_json = |args: &[&str]| -> Result<String, NetError> {
        let mut a = vec!["-j"];
        a.extend_from_slice(args);
        run(in_ns_cmd(netns, "ip").args(&a))
    };
    // Every table: the main one's routes are carried, any other is refused below.
    let routes = ip_json(&["-4", "route", "show", "table", "all"])?;
    let rules = ip_json(&["-4", "rule", "show"])?;
    // A kernel without IPv6 (or with it off) has no route to carry.
    let (routes6, rules6) = match ip_json(&["-6", "route", "show", "table", "all"]) {
        Ok(r) => (r, ip_json(&["-6", "rule", "show"])?),
        Err(e) => {
            tracing::debug!("no IPv6 routes read: {e}");
            ("[]".into(), "[]".into())
        }
    };
    let mut facts = from_json(&addrs, &links, &routes, &routes6)?;
    if let Some(f) = &mut facts {
        let not_carried = policy_routing(&rules, &rules6, &routes, &routes6)?;
        if !not_carried.is_empty() {
            return Err(NetError::Unsupported(format!(
                "the network namespace uses policy routing ({}); ferry carries the main \
                 routing table only, and the container would arrive without it",
                not_carried.join(", ")
            )));
        }
        f.firewall = super::firewall::gather(netns)?;
    }
    Ok(facts)
}

/// What of the namespace's routing ferry does not carry: rules other than the kernel's
/// three (local, main, default), and user routes in tables other than main (from `ip -j
/// rule` and `ip -j route show table all` of both families).
pub fn policy_routing(
    rules: &str,
    rules6: &str,
    routes: &str,
    routes6: &str,
) -> Result<Vec<String>, NetError> {
    const DEFAULT_RULES: [(u64, &str); 3] = [(0, "local"), (32766, "main"), (32767, "default")];
    let mut found = Vec::new();
    for text in [rules, rules6] {
        for r in parse_json_list(text, "rule")? {
            let (prio, table) = (r["priority"].as_u64().unwrap_or(0), r["table"].as_str());
            let plain = r.as_object().is_some_and(|o| {
                o.keys()
                    .all(|k| matches!(k.as_str(), "priority" | "src" | "table"))
            }) && r["src"] == "all";
            if !(plain && DEFAULT_RULES.contains(&(prio, table.unwrap_or("")))) {
                found.push(format!("rule {prio} to table {}", table.unwrap_or("?")));
            }
        }
    }
    for text in [routes, routes6] {
        for r in parse_json_list(text, "route")? {
            let table = r["table"].as_str().unwrap_or("main");
            if !matches!(table, "main" | "local") && r["protocol"] != "kernel" {
                found.push(format!(
                    "route {} in table {table}",
                    r["dst"].as_str().unwrap_or("?")
                ));
            }
        }
    }
    Ok(found)
}

/// An `ip -j` list (empty output: none).
fn parse_json_list(text: &str, what: &str) -> Result<Vec<serde_json::Value>, NetError> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(text).map_err(|e| NetError::Facts(format!("ip -j {what}: {e}")))
}

/// Whether an `addr_info` entry of `ip -j addr` is a global address of either family.
fn is_global(i: &serde_json::Value) -> bool {
    (i["family"] == "inet" || i["family"] == "inet6") && i["scope"] == "global"
}

/// `addr/len` of the global addresses of `family` (`inet` or `inet6`) of one interface.
fn global_addrs(iface: &serde_json::Value, family: &str) -> Vec<String> {
    iface["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["family"] == family && is_global(i))
        .filter_map(|i| {
            Some(format!(
                "{}/{}",
                i["local"].as_str()?,
                i["prefixlen"].as_u64()?
            ))
        })
        .collect()
}

/// The routes of `ip -j route` output through `ifname` that were not made by the kernel
/// (nor IPv6's link-local ones); a metric only when it is not the family's default
/// (`default_metric`: 0 for IPv4, 1024 for IPv6).
fn user_routes(routes: &[serde_json::Value], ifname: &str, default_metric: u64) -> Vec<Route> {
    routes
        .iter()
        .filter(|r| r["protocol"] != "kernel" && r["dev"].as_str() == Some(ifname))
        // The main table (`table all` output names the others).
        .filter(|r| r["table"].as_str().map_or(true, |t| t == "main"))
        .filter(|r| !r["dst"].as_str().is_some_and(|d| d.starts_with("fe80:")))
        .filter_map(|r| {
            Some(Route {
                dst: r["dst"].as_str()?.to_string(),
                via: r["gateway"].as_str().map(str::to_string),
                metric: r["metric"]
                    .as_u64()
                    .filter(|&m| m != default_metric)
                    .and_then(|m| u32::try_from(m).ok()),
            })
        })
        .collect()
}

/// The facts from `ip -j addr` (both families), `ip -j link`, and `ip -j -4 route` and
/// `ip -j -6 route` output (of the main table, or of `table all`: others are skipped).
pub fn from_json(
    addrs: &str,
    links: &str,
    routes: &str,
    routes6: &str,
) -> Result<Option<NetFacts>, NetError> {
    let addrs = parse_json_list(addrs, "addr")?;
    let links = parse_json_list(links, "link")?;
    let routes = parse_json_list(routes, "route")?;
    let routes6 = parse_json_list(routes6, "-6 route")?;
    let with_global: Vec<&serde_json::Value> = addrs
        .iter()
        .filter(|l| {
            l["ifname"].as_str() != Some("lo")
                && l["addr_info"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(is_global))
        })
        .collect();
    let mut loopback = Vec::new();
    if let Some(lo) = addrs.iter().find(|l| l["ifname"].as_str() == Some("lo")) {
        loopback = global_addrs(lo, "inet");
        loopback.extend(global_addrs(lo, "inet6"));
    }
    if with_global.is_empty() && loopback.is_empty() {
        return Ok(None);
    }
    if with_global.len() > MAX_IFACES {
        return Err(NetError::Unsupported(format!(
            "the network namespace has addresses on {} interfaces; ferry carries at most \
             {MAX_IFACES}",
            with_global.len()
        )));
    }
    let mut ifaces = Vec::with_capacity(with_global.len());
    for iface in with_global {
        let ifname = iface["ifname"].as_str().unwrap_or_default().to_string();
        let link = links
            .iter()
            .find(|l| l["ifname"].as_str() == Some(ifname.as_str()))
            .ok_or_else(|| NetError::Facts(format!("no link {ifname}")))?;
        ifaces.push(Iface {
            mac: link["address"].as_str().unwrap_or_default().to_string(),
            mtu: link["mtu"].as_u64().unwrap_or(1500) as u32,
            addrs: global_addrs(iface, "inet"),
            routes: user_routes(&routes, &ifname, 0),
            addrs6: global_addrs(iface, "inet6"),
            routes6: user_routes(&routes6, &ifname, 1024),
            ifname,
        });
    }
    let f = NetFacts {
        ifaces,
        loopback,
        firewall: None,
    };
    f.validate()?;
    Ok(Some(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDRS: &str = r#"[{"ifindex":1,"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}]},
        {"ifindex":2,"ifname":"eth0","addr_info":[{"family":"inet","local":"10.88.0.5","prefixlen":16,"scope":"global"}]}]"#;
    const LINKS: &str = r#"[{"ifname":"lo","mtu":65536,"address":"00:00:00:00:00:00"},
        {"ifname":"eth0","mtu":1450,"address":"02:42:0a:58:00:05"}]"#;
    const ROUTES: &str = r#"[{"dst":"default","gateway":"10.88.0.1","dev":"eth0","flags":[]},
        {"dst":"10.88.0.0/16","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"10.88.0.5"},
        {"dst":"10.99.0.0/24","gateway":"10.88.0.254","dev":"eth0","metric":100}]"#;

    #[test]
    fn facts_of_a_cni_namespace() {
        let facts = from_json(ADDRS, LINKS, ROUTES, "[]").unwrap().unwrap();
        assert_eq!(facts.ifaces.len(), 1);
        let f = &facts.ifaces[0];
        assert_eq!(f.ifname, "eth0");
        assert_eq!(f.mac, "02:42:0a:58:00:05");
        assert_eq!(f.mtu, 1450);
        assert_eq!(f.addrs, vec!["10.88.0.5/16"]);
        assert_eq!(
            f.routes,
            vec![
                Route {
                    dst: "default".into(),
                    via: Some("10.88.0.1".into()),
                    metric: None,
                },
                Route {
                    dst: "10.99.0.0/24".into(),
                    via: Some("10.88.0.254".into()),
                    metric: Some(100),
                }
            ]
        );
        assert_eq!(
            f.ips(),
            vec!["10.88.0.5".parse::<std::net::Ipv4Addr>().unwrap()]
        );
    }

    #[test]
    fn no_address_means_nothing_to_carry() {
        let f = from_json(r#"[{"ifname":"lo","addr_info":[]}]"#, LINKS, "[]", "[]").unwrap();
        assert!(f.is_none());
        assert!(from_json("not json", LINKS, "[]", "[]").is_err());
    }

    #[test]
    fn ipv6_addresses_and_routes_are_carried_link_local_ones_are_not() {
        let addrs = r#"[{"ifname":"lo","addr_info":[{"family":"inet6","local":"::1","prefixlen":128,"scope":"host"}]},
            {"ifname":"eth0","addr_info":[{"family":"inet","local":"10.88.0.5","prefixlen":16,"scope":"global"},
            {"family":"inet6","local":"fd00:88::5","prefixlen":64,"scope":"global"},
            {"family":"inet6","local":"fe80::42:aff:fe58:5","prefixlen":64,"scope":"link"}]}]"#;
        let routes6 = r#"[{"dst":"fd00:88::/64","dev":"eth0","protocol":"kernel","metric":256},
            {"dst":"fe80::/64","dev":"eth0","protocol":"kernel","metric":256},
            {"dst":"fd00:99::/48","gateway":"fe80::1","dev":"eth0","metric":1024},
            {"dst":"default","gateway":"fd00:88::1","dev":"eth0","protocol":"ra","metric":100}]"#;
        let facts = from_json(addrs, LINKS, ROUTES, routes6).unwrap().unwrap();
        let f = &facts.ifaces[0];
        assert_eq!(f.addrs, vec!["10.88.0.5/16"]);
        assert_eq!(f.addrs6, vec!["fd00:88::5/64"]);
        assert_eq!(
            f.routes6,
            vec![
                Route {
                    dst: "fd00:99::/48".into(),
                    via: Some("fe80::1".into()),
                    metric: None,
                },
                Route {
                    dst: "default".into(),
                    via: Some("fd00:88::1".into()),
                    metric: Some(100),
                }
            ]
        );
        assert_eq!(f.ips6(), vec!["fd00:88::5".parse::<Ipv6Addr>().unwrap()]);
        // IPv6 only.
        let v6only = r#"[{"ifname":"eth0","addr_info":[{"family":"inet6","local":"fd00:88::5","prefixlen":64,"scope":"global"}]}]"#;
        let facts = from_json(v6only, LINKS, "[]", "").unwrap().unwrap();
        let f = &facts.ifaces[0];
        assert!(f.addrs.is_empty() && f.routes6.is_empty());
        assert_eq!(f.addrs6, vec!["fd00:88::5/64"]);
        // Link-local only: nothing to carry.
        let ll = r#"[{"ifname":"eth0","addr_info":[{"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"}]}]"#;
        assert!(from_json(ll, LINKS, "[]", "[]").unwrap().is_none());
    }

    #[test]
    fn every_interface_with_a_global_address_is_carried() {
        let two = r#"[{"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}]},
            {"ifname":"eth0","addr_info":[{"family":"inet","local":"10.88.0.5","prefixlen":16,"scope":"global"}]},
            {"ifname":"net1","addr_info":[{"family":"inet6","local":"fd00:77::10","prefixlen":64,"scope":"global"},
            {"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"}]},
            {"ifname":"net2","addr_info":[{"family":"inet6","local":"fe80::2","prefixlen":64,"scope":"link"}]}]"#;
        let links = r#"[{"ifname":"eth0","mtu":1450,"address":"02:42:0a:58:00:05"},
            {"ifname":"net1","mtu":9000,"address":"02:00:00:00:00:01"},
            {"ifname":"net2","mtu":1500,"address":"02:00:00:00:00:02"}]"#;
        let routes6 = r#"[{"dst":"fd00:78::/64","gateway":"fd00:77::1","dev":"net1","metric":1024},
            {"dst":"default","gateway":"fd00:88::1","dev":"eth0","metric":1024}]"#;
        let f = from_json(two, links, ROUTES, routes6).unwrap().unwrap();
        assert_eq!(f.names(), "eth0 net1", "net2 has no global address");
        let (eth0, net1) = (&f.ifaces[0], &f.ifaces[1]);
        assert_eq!(eth0.routes.len(), 2);
        assert_eq!(eth0.routes6.len(), 1, "each interface its own routes");
        assert_eq!(net1.addrs6, vec!["fd00:77::10/64"]);
        assert_eq!((net1.mtu, net1.mac.as_str()), (9000, "02:00:00:00:00:01"));
        assert_eq!(net1.routes6[0].dst, "fd00:78::/64");
        assert!(net1.addrs.is_empty() && net1.routes.is_empty());
        assert!(f.has_ipv6());
        assert_eq!(f.macs().len(), 2);
        // More than MAX_IFACES: refused, naming the count.
        let many: Vec<String> = (0..=MAX_IFACES)
            .map(|i| {
                format!(
                    r#"{{"ifname":"n{i}","addr_info":[{{"family":"inet","local":"10.0.{i}.1","prefixlen":24,"scope":"global"}}]}}"#
                )
            })
            .collect();
        let e = from_json(&format!("[{}]", many.join(",")), links, "[]", "[]").unwrap_err();
        assert!(matches!(e, NetError::Unsupported(_)), "{e}");
        assert!(
            e.to_string()
                .contains("on 9 interfaces; ferry carries at most 8"),
            "{e}"
        );
    }

    #[test]
    fn extra_addresses_on_lo_are_carried() {
        let lo = |extra: &str| {
            format!(
                r#"[{{"ifname":"lo","addr_info":[{{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}},
                {{"family":"inet6","local":"::1","prefixlen":128,"scope":"host"}}{extra}]}}]"#
            )
        };
        let service = r#",{"family":"inet","local":"10.96.0.5","prefixlen":32,"scope":"global"},
            {"family":"inet6","local":"fd00:96::5","prefixlen":128,"scope":"global"}"#;
        // Only the loopback addresses: nothing to carry.
        assert!(from_json(&lo(""), LINKS, "[]", "[]").unwrap().is_none());
        // Extra ones alone are carried (no interface to rebuild).
        let f = from_json(&lo(service), LINKS, "[]", "[]").unwrap().unwrap();
        assert!(f.ifaces.is_empty());
        assert_eq!(f.loopback, vec!["10.96.0.5/32", "fd00:96::5/128"]);
        assert!(f.has_ipv6(), "an IPv6 address on lo is locked too");
        // Beside an interface.
        let both = lo(service).replace(
            "]}]",
            r#"]},{"ifname":"eth0","addr_info":[{"family":"inet","local":"10.88.0.5","prefixlen":16,"scope":"global"}]}]"#,
        );
        let f = from_json(&both, LINKS, ROUTES, "[]").unwrap().unwrap();
        assert_eq!((f.names().as_str(), f.loopback.len()), ("eth0", 2));
        // From a peer: checked.
        let mut bad = f.clone();
        bad.loopback = vec!["10.96.0.5/40".into()];
        assert!(bad.validate().is_err());
        bad.loopback = vec!["10.96.0.5/32".into(); MAX_ITEMS + 1];
        assert!(bad.validate().is_err());
        bad.loopback.clear();
        bad.ifaces.clear();
        assert!(bad.validate().is_err(), "nothing at all");
    }

    #[test]
    fn policy_routing_is_found() {
        let rules = r#"[{"priority":0,"src":"all","table":"local"},{"priority":32766,"src":"all","table":"main"},
            {"priority":32767,"src":"all","table":"default"}]"#;
        let rules6 = r#"[{"priority":0,"src":"all","table":"local"},{"priority":32766,"src":"all","table":"main"}]"#;
        let all = r#"[{"dst":"default","gateway":"10.88.0.1","dev":"eth0"},
            {"dst":"10.88.0.0/16","dev":"eth0","protocol":"kernel","scope":"link"},
            {"type":"local","dst":"10.88.0.5","dev":"eth0","table":"local","protocol":"kernel"}]"#;
        assert!(policy_routing(rules, rules6, all, "[]").unwrap().is_empty());
        let own_rule = r#"[{"priority":0,"src":"all","table":"local"},{"priority":100,"src":"10.0.0.0","srclen":8,"table":"100"},
            {"priority":32766,"src":"all","table":"main","fwmark":"0x1"}]"#;
        let table100 =
            r#"[{"dst":"10.10.0.0/16","gateway":"10.9.0.2","dev":"eth0","table":"100"}]"#;
        assert_eq!(
            policy_routing(own_rule, rules6, all, table100).unwrap(),
            [
                "rule 100 to table 100",
                "rule 32766 to table main",
                "route 10.10.0.0/16 in table 100"
            ]
        );
        // `table all` output: the main table's routes are carried, the others' are not.
        let routes = all.replace(
            "]",
            r#",{"dst":"10.10.0.0/16","gateway":"10.88.0.2","dev":"eth0","table":"100"}]"#,
        );
        let f = from_json(ADDRS, LINKS, &routes, "[]").unwrap().unwrap();
        assert_eq!(f.ifaces[0].routes.len(), 1, "{:?}", f.ifaces[0].routes);
    }

    #[test]
    fn unknown_facts_are_refused_not_ignored() {
        let f = from_json(ADDRS, LINKS, ROUTES, "[]").unwrap().unwrap();
        let mut v = serde_json::to_value(&f).unwrap();
        assert_eq!(serde_json::from_value::<NetFacts>(v.clone()).unwrap(), f);
        v["ifaces"][0]["vlans"] = serde_json::json!([5]);
        let e = serde_json::from_value::<NetFacts>(v.clone()).unwrap_err();
        assert!(e.to_string().contains("unknown field `vlans`"), "{e}");
        v["ifaces"][0].as_object_mut().unwrap().remove("vlans");
        v["bonds"] = serde_json::json!([]);
        let e = serde_json::from_value::<NetFacts>(v).unwrap_err();
        assert!(e.to_string().contains("unknown field `bonds`"), "{e}");
    }

    #[test]
    fn peer_facts_are_validated() {
        let facts = from_json(ADDRS, LINKS, ROUTES, "[]").unwrap().unwrap();
        let one = |change: &dyn Fn(&mut Iface)| {
            let mut f = facts.clone();
            change(&mut f.ifaces[0]);
            f.validate()
        };
        assert!(one(&|f| f.ifname = "eth0; rm -rf /".into()).is_err());
        assert!(one(&|f| f.addrs = vec!["10.0.0.1/33".into()]).is_err());
        assert!(one(&|f| f.routes[0].via = Some("x".into())).is_err());
        assert!(one(&|f| f.addrs = vec!["10.0.0.1/24".into(); MAX_ITEMS + 1]).is_err());
        assert!(one(&|f| f.addrs6 = vec!["fd00::1/129".into()]).is_err());
        one(&|f| f.addrs6 = vec!["fd00::1/64".into()]).unwrap();
        let v4_hop = |f: &mut Iface| {
            f.addrs6 = vec!["fd00::1/64".into()];
            f.routes6 = vec![Route {
                dst: "default".into(),
                via: Some("10.0.0.1".into()),
                metric: None,
            }];
        };
        assert!(one(&v4_hop).is_err(), "an IPv4 next hop for an IPv6 route");
        let low_mtu = |f: &mut Iface| {
            f.addrs6 = vec!["fd00::1/64".into()];
            f.mtu = 1000;
        };
        let e = one(&low_mtu).unwrap_err();
        assert_eq!(
            e.to_string(),
            "network facts: eth0: mtu 1000 is below IPv6's 1280"
        );
        assert!(one(&|f| f.addrs.clear()).is_err(), "no address at all");
        // The interface list: not empty, not too long, no name twice.
        let mut f = facts.clone();
        f.ifaces.clear();
        assert!(f.validate().is_err());
        let mut f = facts.clone();
        f.ifaces.push(f.ifaces[0].clone());
        assert!(f
            .validate()
            .unwrap_err()
            .to_string()
            .contains("\"eth0\" twice"));
        let mut f = facts.clone();
        f.ifaces = (0..=MAX_IFACES)
            .map(|i| Iface {
                ifname: format!("n{i}"),
                ..facts.ifaces[0].clone()
            })
            .collect();
        assert!(f.validate().is_err());
        f.ifaces.pop();
        f.validate().unwrap();
    }
}
