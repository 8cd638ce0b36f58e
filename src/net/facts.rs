//! The network facts of a container's namespace, read on the source before anything moves.
//!
//! One interface is carried: the first non-loopback interface with a global IPv4 address
//! (a CNI container has exactly one, usually `eth0`). Its IPv4 addresses (with prefix
//! lengths), MTU and MAC, and the namespace's IPv4 routes that the kernel did not add by
//! itself (the default route through the bridge's gateway, say). IPv6 is not carried: a
//! namespace with a global IPv6 address (on any interface but `lo`) is refused, since the
//! container would come up on the destination without it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{in_ns_cmd, run, NetError};

/// Most addresses / routes accepted from a peer.
pub const MAX_ITEMS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// "default" or a CIDR.
    pub dst: String,
    /// The next hop, if any.
    #[serde(default)]
    pub via: Option<String>,
}

/// What the destination must rebuild.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetFacts {
    /// Interface name inside the namespace (e.g. `eth0`).
    pub ifname: String,
    /// Its MAC on the source (the destination uses a fresh one and announces it).
    pub mac: String,
    pub mtu: u32,
    /// IPv4 addresses as `a.b.c.d/len`.
    pub addrs: Vec<String>,
    pub routes: Vec<Route>,
}

impl NetFacts {
    /// Checks what a peer sent before anything is done with it: sizes, an interface name
    /// the kernel accepts, addresses and routes that parse.
    pub fn validate(&self) -> Result<(), NetError> {
        let bad = |w: String| Err(NetError::Invalid(format!("network facts: {w}")));
        if self.ifname.is_empty()
            || self.ifname.len() > 15
            || !self
                .ifname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return bad(format!("interface name {:?}", self.ifname));
        }
        if self.addrs.is_empty() || self.addrs.len() > MAX_ITEMS || self.routes.len() > MAX_ITEMS {
            return bad("no address, or too many addresses or routes".into());
        }
        for a in &self.addrs {
            parse_cidr(a).ok_or_else(|| NetError::Invalid(format!("network facts: {a:?}")))?;
        }
        for r in &self.routes {
            if r.dst != "default" && parse_cidr(&r.dst).is_none() {
                return bad(format!("route {:?}", r.dst));
            }
            if let Some(v) = &r.via {
                if v.parse::<std::net::Ipv4Addr>().is_err() {
                    return bad(format!("next hop {v:?}"));
                }
            }
        }
        if !(68..=65535).contains(&self.mtu) {
            return bad(format!("mtu {}", self.mtu));
        }
        Ok(())
    }

    /// The addresses without their prefix lengths.
    pub fn ips(&self) -> Vec<std::net::Ipv4Addr> {
        self.addrs
            .iter()
            .filter_map(|a| parse_cidr(a).map(|(ip, _)| ip))
            .collect()
    }
}

/// `a.b.c.d/len` → (address, len).
pub fn parse_cidr(s: &str) -> Option<(std::net::Ipv4Addr, u8)> {
    let (a, l) = s.split_once('/')?;
    let len: u8 = l.parse().ok()?;
    (len <= 32).then_some(())?;
    Some((a.parse().ok()?, len))
}

/// Reads the facts of the namespace at `netns` (`ip -j` inside it); None when it has no
/// interface with a global IPv4 address (nothing to rebuild: the path is used as it is).
pub fn gather(netns: &Path) -> Result<Option<NetFacts>, NetError> {
    // A kernel without IPv6 (or with it off) has no address to lose.
    match run(in_ns_cmd(netns, "ip").args(["-j", "-6", "addr", "show", "scope", "global"])) {
        Ok(addrs6) => refuse_ipv6(&addrs6)?,
        Err(e) => tracing::debug!("no IPv6 addresses read: {e}"),
    }
    let addrs = run(in_ns_cmd(netns, "ip").args(["-j", "-4", "addr", "show"]))?;
    let links = run(in_ns_cmd(netns, "ip").args(["-j", "link", "show"]))?;
    let routes = run(in_ns_cmd(netns, "ip").args(["-j", "-4", "route", "show"]))?;
    from_json(&addrs, &links, &routes)
}

/// Refuses, from `ip -j -6 addr show` output, a namespace where an interface other than `lo`
/// holds a global IPv6 address (link-local ones are made anew by the kernel on any host).
pub fn refuse_ipv6(addrs6: &str) -> Result<(), NetError> {
    if addrs6.trim().is_empty() {
        return Ok(());
    }
    let ifaces: Vec<serde_json::Value> =
        serde_json::from_str(addrs6).map_err(|e| NetError::Facts(format!("ip -j -6 addr: {e}")))?;
    for l in &ifaces {
        let ifname = l["ifname"].as_str().unwrap_or("?");
        if ifname == "lo" {
            continue;
        }
        let global = l["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| i["family"] == "inet6" && i["scope"] == "global");
        if let Some(a) = global {
            return Err(NetError::Unsupported(format!(
                "{ifname} has the IPv6 address {}/{}; ferry moves IPv4 addresses and routes \
                 only, and the container would lose it",
                a["local"].as_str().unwrap_or("?"),
                a["prefixlen"].as_u64().unwrap_or(0)
            )));
        }
    }
    Ok(())
}

/// The facts from `ip -j -4 addr`, `ip -j link` and `ip -j -4 route` output.
pub fn from_json(addrs: &str, links: &str, routes: &str) -> Result<Option<NetFacts>, NetError> {
    let parse = |t: &str, what: &str| -> Result<Vec<serde_json::Value>, NetError> {
        serde_json::from_str(t).map_err(|e| NetError::Facts(format!("ip -j {what}: {e}")))
    };
    let addrs = parse(addrs, "addr")?;
    let links = parse(links, "link")?;
    let routes = parse(routes, "route")?;
    let Some(iface) = addrs.iter().find(|l| {
        l["ifname"].as_str() != Some("lo")
            && l["addr_info"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|i| i["family"] == "inet" && i["scope"] == "global")
            })
    }) else {
        return Ok(None);
    };
    let ifname = iface["ifname"].as_str().unwrap_or_default().to_string();
    let link = links
        .iter()
        .find(|l| l["ifname"].as_str() == Some(ifname.as_str()))
        .ok_or_else(|| NetError::Facts(format!("no link {ifname}")))?;
    let addrs: Vec<String> = iface["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["family"] == "inet" && i["scope"] == "global")
        .filter_map(|i| {
            Some(format!(
                "{}/{}",
                i["local"].as_str()?,
                i["prefixlen"].as_u64()?
            ))
        })
        .collect();
    let routes: Vec<Route> = routes
        .iter()
        .filter(|r| r["protocol"] != "kernel" && r["dev"].as_str() == Some(ifname.as_str()))
        .filter_map(|r| {
            Some(Route {
                dst: r["dst"].as_str()?.to_string(),
                via: r["gateway"].as_str().map(str::to_string),
            })
        })
        .collect();
    let f = NetFacts {
        mac: link["address"].as_str().unwrap_or_default().to_string(),
        mtu: link["mtu"].as_u64().unwrap_or(1500) as u32,
        ifname,
        addrs,
        routes,
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
        {"dst":"10.99.0.0/24","gateway":"10.88.0.254","dev":"eth0"}]"#;

    #[test]
    fn facts_of_a_cni_namespace() {
        let f = from_json(ADDRS, LINKS, ROUTES).unwrap().unwrap();
        assert_eq!(f.ifname, "eth0");
        assert_eq!(f.mac, "02:42:0a:58:00:05");
        assert_eq!(f.mtu, 1450);
        assert_eq!(f.addrs, vec!["10.88.0.5/16"]);
        assert_eq!(
            f.routes,
            vec![
                Route {
                    dst: "default".into(),
                    via: Some("10.88.0.1".into())
                },
                Route {
                    dst: "10.99.0.0/24".into(),
                    via: Some("10.88.0.254".into())
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
        let f = from_json(r#"[{"ifname":"lo","addr_info":[]}]"#, LINKS, "[]").unwrap();
        assert!(f.is_none());
        assert!(from_json("not json", LINKS, "[]").is_err());
    }

    #[test]
    fn a_global_ipv6_address_is_refused_link_local_and_lo_are_not() {
        let ok = r#"[{"ifname":"lo","addr_info":[{"family":"inet6","local":"::1","prefixlen":128,"scope":"host"}]},
            {"ifname":"eth0","addr_info":[{"family":"inet6","local":"fe80::42:aff:fe58:5","prefixlen":64,"scope":"link"}]}]"#;
        refuse_ipv6(ok).unwrap();
        refuse_ipv6("[]").unwrap();
        refuse_ipv6("\n").unwrap();
        let v6 = r#"[{"ifname":"eth0","addr_info":[{"family":"inet6","local":"fd00:88::5","prefixlen":64,"scope":"global"},
            {"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"}]}]"#;
        let e = refuse_ipv6(v6).unwrap_err();
        assert!(matches!(e, NetError::Unsupported(_)));
        assert_eq!(
            e.to_string(),
            "eth0 has the IPv6 address fd00:88::5/64; ferry moves IPv4 addresses and routes \
             only, and the container would lose it"
        );
        assert!(refuse_ipv6("not json").is_err());
    }

    #[test]
    fn peer_facts_are_validated() {
        let mut f = from_json(ADDRS, LINKS, ROUTES).unwrap().unwrap();
        f.ifname = "eth0; rm -rf /".into();
        assert!(f.validate().is_err());
        let mut f = from_json(ADDRS, LINKS, ROUTES).unwrap().unwrap();
        f.addrs = vec!["10.0.0.1/33".into()];
        assert!(f.validate().is_err());
        let mut f = from_json(ADDRS, LINKS, ROUTES).unwrap().unwrap();
        f.routes[0].via = Some("x".into());
        assert!(f.validate().is_err());
        let mut f = from_json(ADDRS, LINKS, ROUTES).unwrap().unwrap();
        f.addrs = vec!["10.0.0.1/24".into(); MAX_ITEMS + 1];
        assert!(f.validate().is_err());
    }
}
