//! The destination's network namespace for a migrating container.
//!
//! Order (all before the source freezes the container):
//! 1. ferry creates an empty namespace, `ip netns add ferry-<id>` (`/run/netns/ferry-<id>`),
//! 2. locks it ([`super::lock`]): nothing gets in or out until the commit,
//! 3. configures it: the built-in setup (`--bridge NAME`: a veth pair whose host end is
//!    enslaved to the bridge and whose other end, named like the source's interface, gets the
//!    source's MTU, addresses and routes; `arp_ignore=8` on it until the commit, so it does
//!    not answer ARP for an address the source still serves (IPv6 neighbour solicitations are
//!    IP traffic: the lock drops them; IPv6 addresses are added without duplicate address
//!    detection, which the lock would make pass blindly, and are probed as in 4.) or the
//!    user's hook (`--netns-hook PROG`: `PROG add <id> <netns-path>` with the facts in the
//!    environment),
//! 4. probes each address (RFC 5227 ARP probe, or for IPv6 the solicitation of duplicate
//!    address detection, from the new interface): an answer from any MAC but the source
//!    container's is a clash, and the migration is refused.
//!
//! After the commit: the lock goes, ARP answers are back on, and a gratuitous ARP (and for
//! IPv6 an unsolicited neighbour advertisement) announces the new location. On failure:
//! `PROG del <id> <netns-path>` (hook), then the namespace is deleted (with the veth in it,
//! which takes its host end along).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::arp::{self, fmt_mac, parse_mac, Mac};
use super::facts::{NetFacts, Route};
use super::lock::{self, LockMethod};
use super::ndp;
use super::{in_ns_cmd, on_ns_thread, run, side_by_side, NetError};
use crate::runtime::last_line;

/// Where ferry creates destination namespaces (`ip netns` keeps them there).
pub const NETNS_DIR: &str = "/run/netns";
/// How long the clash probe listens per address.
pub const PROBE_WAIT: Duration = Duration::from_millis(900);

/// How `ferry serve` builds the network side of a received container.
#[derive(Debug, Clone)]
pub enum NetSetup {
    /// Built-in: a veth into this bridge (in the destination's namespace).
    Bridge(String),
    /// A user program (see the module docs and the README).
    Hook(PathBuf),
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
    /// The interface's MAC here.
    mac: Option<Mac>,
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

/// Host-side veth name: at most 15 characters, unique enough per container and serve.
fn host_veth(id: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (id, std::process::id()).hash(&mut h);
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
            mac: None,
        };
        if let Err(e) = me.configure(setup, source) {
            me.remove();
            return Err(e);
        }
        Ok(me)
    }

    fn configure(&mut self, setup: &NetSetup, source: &str) -> Result<(), NetError> {
        lock::lock(&self.path, self.method, self.facts.has_ipv6())?;
        match setup {
            NetSetup::Bridge(br) => self.builtin(br)?,
            NetSetup::Hook(prog) => {
                self.hook = Some(prog.clone());
                self.call_hook(prog, "add", source)?;
            }
        }
        let links = run(in_ns_cmd(&self.path, "ip").args([
            "-j",
            "link",
            "show",
            "dev",
            &self.facts.ifname,
        ]))
        .map_err(|e| {
            NetError::Invalid(format!(
                "no interface {} in {} after the setup: {e}",
                self.facts.ifname,
                self.path.display()
            ))
        })?;
        let v: serde_json::Value = serde_json::from_str(&links)
            .map_err(|e| NetError::Facts(format!("ip -j link: {e}")))?;
        self.mac = v[0]["address"].as_str().and_then(parse_mac);
        self.clash_check()
    }

    fn ip(&self, args: &[&str]) -> Result<String, NetError> {
        run(in_ns_cmd(&self.path, "ip").args(args))
    }

    fn builtin(&self, bridge: &str) -> Result<(), NetError> {
        let f = &self.facts;
        let hv = host_veth(&self.id);
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
        self.ip(&["link", "set", "lo", "up"])?;
        self.set_arp_ignore(8)?;
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
        tracing::info!(netns = %self.path.display(), bridge, veth = %hv, "destination network ready (locked)");
        Ok(())
    }

    fn set_arp_ignore(&self, v: u8) -> Result<(), NetError> {
        run(in_ns_cmd(&self.path, "sysctl").args([
            "-qw",
            &format!("net.ipv4.conf.{}.arp_ignore={v}", self.facts.ifname),
        ]))
        .map(|_| ())
    }

    fn call_hook(&self, prog: &Path, action: &'static str, source: &str) -> Result<(), NetError> {
        let f = &self.facts;
        let routes = |rs: &[Route]| -> String {
            rs.iter()
                .map(|r| match &r.via {
                    Some(v) => format!("{},{v}", r.dst),
                    None => r.dst.clone(),
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
                why: e.to_string(),
            })?;
        if out.status.success() {
            return Ok(());
        }
        let last = last_line(&out.stderr).unwrap_or_default();
        Err(NetError::Hook {
            prog: prog.display().to_string(),
            action,
            why: format!(
                "{} {}",
                out.status,
                last.chars().take(400).collect::<String>()
            ),
        })
    }

    /// Probes every address from the new interface (ARP, IPv6 duplicate address detection);
    /// anyone but the source answering is a clash.
    fn clash_check(&self) -> Result<(), NetError> {
        let own = self.mac.ok_or_else(|| {
            NetError::Invalid(format!("interface {} has no MAC", self.facts.ifname))
        })?;
        let allowed: Vec<Mac> = parse_mac(&self.facts.mac).into_iter().collect();
        let ifname = self.facts.ifname.clone();
        let (ips, ips6) = (self.facts.ips(), self.facts.ips6());
        // Both families at once: every address is probed for the same 0.9 s.
        let found = on_ns_thread(&self.path, || {
            let (v4, v6) = side_by_side(
                || arp::probe(&ifname, own, &ips, &allowed, PROBE_WAIT),
                || ndp::probe(&ifname, own, &ips6, &allowed, PROBE_WAIT),
                "NDP probe",
            );
            let v4 = v4?.map(|(ip, mac)| (IpAddr::V4(ip), mac));
            Ok::<_, NetError>(v4.or(v6?.map(|(ip, mac)| (IpAddr::V6(ip), mac))))
        })??;
        match found {
            Some((ip, mac)) => Err(NetError::Clash {
                addr: ip.to_string(),
                mac: fmt_mac(&mac),
            }),
            None => Ok(()),
        }
    }

    /// At the commit: lock off, ARP answers on (built-in setup).
    pub fn unlock(&self) -> Result<(), NetError> {
        lock::unlock(&self.path, self.method, self.facts.has_ipv6())?;
        if self.hook.is_none() {
            self.set_arp_ignore(0)?;
        }
        Ok(())
    }

    /// Gratuitous ARP and unsolicited neighbour advertisements for the container's addresses
    /// from its new interface.
    pub fn announce(&self) -> Result<(), NetError> {
        let Some(mac) = self.mac else { return Ok(()) };
        let ips: Vec<Ipv4Addr> = self.facts.ips();
        let ips6 = self.facts.ips6();
        let ifname = self.facts.ifname.clone();
        on_ns_thread(&self.path, || {
            // Both families together: three rounds, 100 ms apart.
            let (v4, v6) = side_by_side(
                || arp::announce(&ifname, mac, &ips, 3),
                || ndp::announce(&ifname, mac, &ips6, 3),
                "NDP announcement",
            );
            v4.and(v6)
        })?
    }

    /// Undo: the hook's `del`, then the namespace (and the veth in it).
    pub fn remove(&self) {
        if let Some(prog) = &self.hook {
            if let Err(e) = self.call_hook(prog, "del", "") {
                tracing::warn!("cleanup: {e}");
            }
        }
        if let Err(e) = run(std::process::Command::new("ip").args(["netns", "del", &self.name])) {
            tracing::warn!("cleanup: {e}");
        }
    }
}

/// `ip <family> route <verb> DST [via V] dev IF`.
fn route_args<'a>(family: &'a str, verb: &'a str, r: &'a Route, ifname: &'a str) -> Vec<&'a str> {
    let mut args = vec![family, "route", verb, r.dst.as_str()];
    if let Some(v) = &r.via {
        args.extend(["via", v.as_str()]);
    }
    args.extend(["dev", ifname]);
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
        assert!(host_veth("a-very-long-container-id-indeed").len() <= 15);
        assert!(remove_source_netns(Path::new("/proc/1/ns/net")).is_err());
    }
}
