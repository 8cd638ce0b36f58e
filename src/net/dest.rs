//! The destination's network namespace for a migrating container.
//!
//! Order (all before the source freezes the container):
//! 1. ferry creates an empty namespace, `ip netns add ferry-<id>` (`/run/netns/ferry-<id>`),
//! 2. restores the container's own iptables rules into it ([`super::firewall`]), then locks
//!    it ([`super::lock`]): nothing gets in or out until the commit,
//! 3. configures it: `lo` up with the source's extra addresses on it, then for each of the
//!    source's interfaces the built-in setup (`--bridge [IFNAME=]BRIDGE`: a veth pair whose
//!    host end is enslaved to the interface's bridge and whose other end, named like the
//!    source's interface, gets the source's MTU, addresses and routes; `arp_ignore=8` on it
//!    until the commit, so it does not answer ARP for an address the source still serves
//!    (IPv6 neighbour solicitations are IP traffic: the lock drops them; IPv6 addresses are
//!    added without duplicate address detection, which the lock would make pass blindly,
//!    and are probed as in 4.) or the user's hook
//!    (`--netns-hook PROG`: `PROG add <id> <netns-path>` with the interface's facts in the
//!    environment, once per interface),
//! 4. probes each address (RFC 5227 ARP probe, or for IPv6 the solicitation of duplicate
//!    address detection, from its new interface; all at once): an answer from any MAC but
//!    the source container's is a clash, and the migration is refused.
//!
//! After the commit: the lock goes, ARP answers are back on, and a gratuitous ARP (and for
//! IPv6 an unsolicited neighbour advertisement) announces the new location. On failure:
//! `PROG del <id> <netns-path>` (hook; per interface whose `add` ran, in reverse), then the
//! namespace is deleted (with the veths in it, which take their host ends along).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::arp::{self, fmt_mac, parse_mac, Mac};
use super::facts::{valid_ifname, Iface, NetFacts, Route};
use super::lock::{self, LockMethod};
use super::ndp;
use super::{in_ns_cmd, joined, on_ns_thread, run, side_by_side, NetError};
use crate::runtime::last_line;

/// Where ferry creates destination namespaces (`ip netns` keeps them there).
pub const NETNS_DIR: &str = "/run/netns";
/// How long the clash probe listens per address.
pub const PROBE_WAIT: Duration = Duration::from_millis(900);

/// How `ferry serve` builds the network side of a received container.
#[derive(Debug, Clone)]
pub enum NetSetup {
    /// Built-in: a veth per interface into its bridge (in the destination's namespace).
    Bridge(Bridges),
    /// A user program (see the module docs and the README).
    Hook(PathBuf),
}

/// Which bridge each interface's veth joins: `--bridge [IFNAME=]BRIDGE`, repeatable. A
/// plain `BRIDGE` takes every interface not named in an `IFNAME=` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bridges {
    default: Option<String>,
    named: Vec<(String, String)>,
}

impl Bridges {
    /// From the `--bridge` values; a name the kernel would refuse or an interface given twice
    /// is an error naming it.
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<Bridges, NetError> {
        let mut b = Bridges::default();
        for a in args.iter().map(AsRef::as_ref) {
            let (ifname, bridge) = match a.split_once('=') {
                Some((i, br)) => (Some(i), br),
                None => (None, a),
            };
            if let Some(bad) = [Some(bridge), ifname]
                .into_iter()
                .flatten()
                .find(|n| !valid_ifname(n))
            {
                return Err(NetError::Invalid(format!(
                    "--bridge {a}: {bad:?} is not an interface name"
                )));
            }
            let twice = match ifname {
                None => b.default.replace(bridge.to_string()).is_some(),
                Some(i) => {
                    let seen = b.named.iter().any(|(n, _)| n == i);
                    b.named.push((i.to_string(), bridge.to_string()));
                    seen
                }
            };
            if twice {
                return Err(NetError::Invalid(format!(
                    "--bridge {a}: {} has a bridge already",
                    ifname.map_or("every interface".into(), |i| format!("interface {i}"))
                )));
            }
        }
        Ok(b)
    }

    /// The bridge for the container's interface `ifname`.
    pub fn for_iface(&self, ifname: &str) -> Option<&str> {
        self.named
            .iter()
            .find(|(n, _)| n == ifname)
            .map(|(_, br)| br.as_str())
            .or(self.default.as_deref())
    }
}

/// A destination namespace being prepared for (or handed to) a container.
#[derive(Debug)]
pub struct DestNet {
    pub name: String,
    pub path: PathBuf,
    pub facts: NetFacts,
    pub method: LockMethod,
    id: String,
    hook: Option<PathBuf>,
    /// How many interfaces the hook's `add` was called for (in the facts' order).
    hooked: usize,
    /// The interfaces' MACs here (in the facts' order, once configured).
    macs: Vec<Mac>,
}

/// `ferry-<id>`, or a hash of the id when that is too long for a file name.
fn netns_name(id: &str) -> String {
    let n = format!("ferry-{id}");
    if n.len() <= 200 {
        return n;
    }
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    format!("ferry-{:016x}", h.finish())
}

/// Host-side veth name: at most 15 characters, unique enough per container, interface and
/// serve.
fn host_veth(id: &str, ifname: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (id, ifname, std::process::id()).hash(&mut h);
    format!("fy{:08x}", h.finish() as u32)
}

impl DestNet {
    /// Steps 1–4 of the module docs. `source` is the migration peer's address (for hooks).
    pub fn prepare(
        setup: &NetSetup,
        id: &str,
        facts: &NetFacts,
        source: &str,
    ) -> Result<DestNet, NetError> {
        facts.validate()?;
        let method = lock::host_method().ok_or_else(|| {
            NetError::Invalid(
                "neither iptables-restore nor nft is installed: the network cannot be locked"
                    .into(),
            )
        })?;
        if facts.has_ipv6() && !lock::covers_ipv6(method) {
            return Err(NetError::Invalid(format!(
                "the container has IPv6 addresses and this host's {} lock cannot hold IPv6 \
                 (install ip6tables-restore)",
                method.name()
            )));
        }
        if let Some(fw) = &facts.firewall {
            fw.check_host()?;
        }
        if let NetSetup::Bridge(b) = setup {
            if let Some(f) = facts
                .ifaces
                .iter()
                .find(|f| b.for_iface(&f.ifname).is_none())
            {
                return Err(NetError::Unsupported(format!(
                    "the container's interface {} has no bridge on this destination (ferry \
                     serve --bridge {}=BRIDGE)",
                    f.ifname, f.ifname
                )));
            }
        }
        let name = netns_name(id);
        let path = Path::new(NETNS_DIR).join(&name);
        if path.exists() {
            return Err(NetError::Invalid(format!(
                "network namespace {} exists already",
                path.display()
            )));
        }
        run(std::process::Command::new("ip").args(["netns", "add", &name]))?;
        let mut me = DestNet {
            name,
            path,
            facts: facts.clone(),
            method,
            id: id.to_string(),
            hook: None,
            hooked: 0,
            macs: Vec::new(),
        };
        if let Err(e) = me.configure(setup, source) {
            me.remove();
            return Err(e);
        }
        Ok(me)
    }

    fn configure(&mut self, setup: &NetSetup, source: &str) -> Result<(), NetError> {
        // The container's own rules first, while the namespace has no interface: the lock
        // then goes in front of them.
        if let Some(fw) = &self.facts.firewall {
            fw.apply(&self.path)?;
        }
        lock::lock(&self.path, self.method, self.facts.has_ipv6())?;
        // `lo` is ferry's in either setup: up, with the source's extra addresses.
        self.ip(&["link", "set", "lo", "up"])?;
        for a in &self.facts.loopback {
            self.ip(&["addr", "add", a, "dev", "lo"])?;
        }
        match setup {
            NetSetup::Bridge(b) => self.builtin(b)?,
            NetSetup::Hook(prog) => {
                self.hook = Some(prog.clone());
                for f in &self.facts.ifaces {
                    self.hooked += 1;
                    self.call_hook(prog, "add", f, source)?;
                }
            }
        }
        let links = run(in_ns_cmd(&self.path, "ip").args(["-j", "link", "show"]))?;
        let v: Vec<serde_json::Value> = serde_json::from_str(&links)
            .map_err(|e| NetError::Facts(format!("ip -j link: {e}")))?;
        for f in &self.facts.ifaces {
            let link = v.iter().find(|l| l["ifname"] == f.ifname.as_str());
            let Some(link) = link else {
                return Err(NetError::Invalid(format!(
                    "no interface {} in {} after the setup",
                    f.ifname,
                    self.path.display()
                )));
            };
            let mac = link["address"]
                .as_str()
                .and_then(parse_mac)
                .ok_or_else(|| NetError::Invalid(format!("interface {} has no MAC", f.ifname)))?;
            self.macs.push(mac);
        }
        self.clash_check()
    }

    fn ip<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Result<String, NetError> {
        run(in_ns_cmd(&self.path, "ip").args(args))
    }

    fn builtin(&self, bridges: &Bridges) -> Result<(), NetError> {
        for f in &self.facts.ifaces {
            // prepare() checked that every interface has one.
            let bridge = bridges.for_iface(&f.ifname).unwrap_or_default();
            self.builtin_iface(f, bridge)?;
        }
        Ok(())
    }

    fn builtin_iface(&self, f: &Iface, bridge: &str) -> Result<(), NetError> {
        let hv = host_veth(&self.id, &f.ifname);
        let mtu = f.mtu.to_string();
        run(std::process::Command::new("ip").args([
            "link", "add", &hv, "mtu", &mtu, "type", "veth", "peer", "name", &f.ifname, "mtu",
            &mtu, "netns", &self.name,
        ]))?;
        if let Err(e) =
            run(std::process::Command::new("ip").args(["link", "set", &hv, "master", bridge, "up"]))
        {
            let _ = run(std::process::Command::new("ip").args(["link", "del", &hv]));
            return Err(e);
        }
        self.set_arp_ignore(&f.ifname, 8)?;
        for a in &f.addrs {
            self.ip(&["addr", "add", a, "dev", &f.ifname])?;
        }
        for a in &f.addrs6 {
            self.ip(&["-6", "addr", "add", a, "dev", &f.ifname, "nodad"])?;
        }
        self.ip(&["link", "set", &f.ifname, "up"])?;
        for r in &f.routes {
            self.ip(&route_args("-4", "add", r, &f.ifname))?;
        }
        // `replace`: a router's advertisement may have put the same route there already.
        for r in &f.routes6 {
            self.ip(&route_args("-6", "replace", r, &f.ifname))?;
        }
        tracing::info!(netns = %self.path.display(), ifname = %f.ifname, bridge, veth = %hv, "destination interface ready (locked)");
        Ok(())
    }

    fn set_arp_ignore(&self, ifname: &str, v: u8) -> Result<(), NetError> {
        run(in_ns_cmd(&self.path, "sysctl")
            .args(["-qw", &format!("net.ipv4.conf.{ifname}.arp_ignore={v}")]))
        .map(|_| ())
    }

    fn call_hook(
        &self,
        prog: &Path,
        action: &'static str,
        f: &Iface,
        source: &str,
    ) -> Result<(), NetError> {
        // `dst[,via[,metric]]` (via empty when a route without one has a metric).
        let routes = |rs: &[Route]| -> String {
            rs.iter()
                .map(|r| match (&r.via, r.metric) {
                    (via, Some(m)) => format!("{},{},{m}", r.dst, via.as_deref().unwrap_or("")),
                    (Some(v), None) => format!("{},{v}", r.dst),
                    (None, None) => r.dst.clone(),
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        let out = std::process::Command::new(prog)
            .args([action, &self.id])
            .arg(&self.path)
            .env("FERRY_CONTAINER_ID", &self.id)
            .env("FERRY_NETNS", &self.path)
            .env("FERRY_IFNAME", &f.ifname)
            .env("FERRY_IFNAMES", self.facts.names())
            .env("FERRY_MAC", &f.mac)
            .env("FERRY_MTU", f.mtu.to_string())
            .env("FERRY_ADDRS", f.addrs.join(" "))
            .env("FERRY_ROUTES", routes(&f.routes))
            .env("FERRY_ADDRS6", f.addrs6.join(" "))
            .env("FERRY_ROUTES6", routes(&f.routes6))
            .env("FERRY_SOURCE", source)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| NetError::Hook {
                prog: prog.display().to_string(),
                action,
                ifname: f.ifname.clone(),
                why: e.to_string(),
            })?;
        if out.status.success() {
            return Ok(());
        }
        let last = last_line(&out.stderr).unwrap_or_default();
        Err(NetError::Hook {
            prog: prog.display().to_string(),
            action,
            ifname: f.ifname.clone(),
            why: format!(
                "{} {}",
                out.status,
                last.chars().take(400).collect::<String>()
            ),
        })
    }

    /// Probes every address from its new interface (ARP, IPv6 duplicate address detection),
    /// all interfaces and both families at once; anyone but the source answering is a clash.
    fn clash_check(&self) -> Result<(), NetError> {
        let allowed = self.facts.macs();
        let found = self.on_each_iface(|f, own| {
            let (ips, ips6) = (f.ips(), f.ips6());
            // Every address is probed for the same 0.9 s.
            let (v4, v6) = side_by_side(
                || arp::probe(&f.ifname, own, &ips, &allowed, PROBE_WAIT),
                || ndp::probe(&f.ifname, own, &ips6, &allowed, PROBE_WAIT),
                "NDP probe",
            );
            let v4 = v4?.map(|(ip, mac)| (IpAddr::V4(ip), mac));
            Ok(v4.or(v6?.map(|(ip, mac)| (IpAddr::V6(ip), mac))))
        })?;
        match found.into_iter().flatten().next() {
            Some((ip, mac)) => Err(NetError::Clash {
                addr: ip.to_string(),
                mac: fmt_mac(&mac),
            }),
            None => Ok(()),
        }
    }

    /// Runs `job` for every interface (with its MAC here), each on its own thread inside
    /// the namespace, all at once; the results in the facts' order, the first error if any.
    fn on_each_iface<T: Send>(
        &self,
        job: impl Fn(&Iface, Mac) -> Result<T, NetError> + Sync,
    ) -> Result<Vec<T>, NetError> {
        let job = &job;
        on_ns_thread(&self.path, || {
            std::thread::scope(|s| {
                let handles: Vec<_> = self
                    .facts
                    .ifaces
                    .iter()
                    .zip(&self.macs)
                    .map(|(f, &mac)| s.spawn(move || job(f, mac)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| joined(h, "interface"))
                    .collect::<Result<Vec<T>, NetError>>()
            })
        })?
    }

    /// At the commit: lock off, ARP answers on (built-in setup).
    pub fn unlock(&self) -> Result<(), NetError> {
        lock::unlock(&self.path, self.method, self.facts.has_ipv6())?;
        if self.hook.is_none() {
            for f in &self.facts.ifaces {
                self.set_arp_ignore(&f.ifname, 0)?;
            }
        }
        Ok(())
    }

    /// Gratuitous ARP and unsolicited neighbour advertisements for the container's addresses
    /// from their new interfaces.
    pub fn announce(&self) -> Result<(), NetError> {
        self.on_each_iface(|f, mac| {
            let (ips, ips6) = (f.ips(), f.ips6());
            // Both families together: three rounds, 100 ms apart.
            let (v4, v6) = side_by_side(
                || arp::announce(&f.ifname, mac, &ips, 3),
                || ndp::announce(&f.ifname, mac, &ips6, 3),
                "NDP announcement",
            );
            v4.and(v6)
        })
        .map(|_| ())
    }

    /// Undo: the hook's `del` (for each interface its `add` was called for, in reverse),
    /// then the namespace (and the veths in it).
    pub fn remove(&self) {
        if let Some(prog) = &self.hook {
            for f in self.facts.ifaces[..self.hooked].iter().rev() {
                if let Err(e) = self.call_hook(prog, "del", f, "") {
                    tracing::warn!("cleanup: {e}");
                }
            }
        }
        if let Err(e) = run(std::process::Command::new("ip").args(["netns", "del", &self.name])) {
            tracing::warn!("cleanup: {e}");
        }
    }
}

/// `ip <family> route <verb> DST [via V] dev IF [metric M]`.
fn route_args(family: &str, verb: &str, r: &Route, ifname: &str) -> Vec<String> {
    let mut args: Vec<String> = vec![family.into(), "route".into(), verb.into(), r.dst.clone()];
    if let Some(v) = &r.via {
        args.extend(["via".into(), v.clone()]);
    }
    args.extend(["dev".into(), ifname.into()]);
    if let Some(m) = r.metric {
        args.extend(["metric".into(), m.to_string()]);
    }
    args
}

/// Processes using the namespace at `netns` that are not the container's (whose init is
/// `init_pid`; its processes share the init's pid namespace): another container of a pod,
/// say. Moving the namespace's address away from them would break them.
pub fn foreign_users(netns: &Path, init_pid: i32) -> Result<Vec<i32>, NetError> {
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &str| std::fs::metadata(p).map(|m| m.ino());
    let net = std::fs::metadata(netns)
        .map_err(|source| NetError::Netns {
            path: netns.display().to_string(),
            source,
        })?
        .ino();
    let own_pid_ns =
        ino(&format!("/proc/{init_pid}/ns/pid")).map_err(|source| NetError::Netns {
            path: format!("/proc/{init_pid}/ns/pid"),
            source,
        })?;
    Ok(users_of_netns(net)
        .into_iter()
        .filter(|p| ino(&format!("/proc/{p}/ns/pid")).ok() != Some(own_pid_ns))
        .collect())
}

/// Processes whose network namespace is the one with inode `ino`.
fn users_of_netns(ino: u64) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == ino)
        })
        .collect()
}

/// After a successful migration: removes the source's namespace file at `path` (a bind mount
/// of a namespace, as `ip netns add` and CNI runtimes make; never a /proc path, never while a
/// process still uses it, e.g. another container of the same pod). The namespace dies with
/// its last user, and its veth with it, which removes the host end from the bridge.
pub fn remove_source_netns(path: &Path) -> Result<(), NetError> {
    use std::os::unix::fs::MetadataExt;
    if path.starts_with("/proc") {
        return Err(NetError::Invalid(format!(
            "{} is a process's namespace, not removed",
            path.display()
        )));
    }
    let ino = std::fs::metadata(path)
        .map_err(|source| NetError::Netns {
            path: path.display().to_string(),
            source,
        })?
        .ino();
    // The dumped tasks were just killed: give them a moment to be gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut users = users_of_netns(ino);
    while !users.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        users = users_of_netns(ino);
    }
    if !users.is_empty() {
        return Err(NetError::Invalid(format!(
            "{} is still used by pid(s) {users:?}, not removed",
            path.display()
        )));
    }
    let st = nix::sys::statfs::statfs(path).map_err(|e| NetError::Netns {
        path: path.display().to_string(),
        source: e.into(),
    })?;
    if st.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
        return Err(NetError::Invalid(format!(
            "{} is not a namespace bind mount, not removed",
            path.display()
        )));
    }
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).map_err(|e| NetError::Netns {
        path: path.display().to_string(),
        source: e.into(),
    })?;
    std::fs::remove_file(path).map_err(|source| NetError::Netns {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit() {
        assert_eq!(netns_name("c1"), "ferry-c1");
        assert!(netns_name(&"x".repeat(300)).len() < 30);
        assert!(host_veth("a-very-long-container-id-indeed", "eth0").len() <= 15);
        assert_ne!(host_veth("c1", "eth0"), host_veth("c1", "net1"));
        assert!(remove_source_netns(Path::new("/proc/1/ns/net")).is_err());
    }

    #[test]
    fn bridges_per_interface() {
        let b = Bridges::parse(&["br0", "net1=br1"]).unwrap();
        assert_eq!(b.for_iface("eth0"), Some("br0"));
        assert_eq!(b.for_iface("net1"), Some("br1"));
        let only = Bridges::parse(&["net1=br1"]).unwrap();
        assert_eq!(only.for_iface("eth0"), None);
        assert_eq!(Bridges::parse::<&str>(&[]).unwrap(), Bridges::default());
        let err = |a: &[&str]| Bridges::parse(a).unwrap_err().to_string();
        assert_eq!(
            err(&["br0", "br1"]),
            "--bridge br1: every interface has a bridge already"
        );
        assert_eq!(
            err(&["net1=br1", "net1=br2"]),
            "--bridge net1=br2: interface net1 has a bridge already"
        );
        assert_eq!(
            err(&["net1=a-name-far-too-long"]),
            "--bridge net1=a-name-far-too-long: \"a-name-far-too-long\" is not an interface name"
        );
        assert!(err(&["=br0"]).contains("\"\" is not an interface name"));
        assert!(err(&["eth0=br 0"]).contains("is not an interface name"));
    }

    #[test]
    fn routes_keep_their_metric() {
        let r = Route {
            dst: "default".into(),
            via: Some("10.0.0.1".into()),
            metric: Some(200),
        };
        assert_eq!(
            route_args("-4", "add", &r, "net1").join(" "),
            "-4 route add default via 10.0.0.1 dev net1 metric 200"
        );
        let r = Route {
            dst: "fd00::/64".into(),
            via: None,
            metric: None,
        };
        assert_eq!(
            route_args("-6", "replace", &r, "eth0").join(" "),
            "-6 route replace fd00::/64 dev eth0"
        );
    }
}
