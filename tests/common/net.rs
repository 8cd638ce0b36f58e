//! Network-continuity rig (tests/net.rs): [`BridgedHosts`] puts a layer-2 network under the
//! two emulated hosts of [`TwoHosts`] so that a third namespace, the client host, reaches a
//! container's address on either of them; the container's own namespace is made CNI style
//! on the source. Also the TCP/UDP clients that check a connection's continuity.
//!
//! ```text
//!   client ns (fcli-…)                src host ns (fsrc-…)          dst host ns (fdst-…)
//!   br0 10.77.0.100/24  ── us0 ═ up0 ─ br0 ─ vc0 ══ eth0 (fct-…)      br0 ─ (ferry's veth)
//!                       ── ud0 ══════════════════════════════ up0 ─┘
//! ```
//! The container namespace `fct-…` holds eth0 = 10.77.0.10/24 with a default route via the
//! client (so that a route is carried too). [`BridgedHosts::add_second_network`] adds the
//! same again as `br1` / `net1` (10.78.0.0/24). Interface names inside namespaces are fixed;
//! namespace names carry the test process's pid and a sequence number.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use super::*;

pub const CLIENT_IP: &str = "10.77.0.100";
pub const CONTAINER_IP: &str = "10.77.0.10";
/// Addresses on the second network of [`BridgedHosts::add_second_network`].
pub const CLIENT_IP_NET1: &str = "10.78.0.100";
pub const CONTAINER_IP_NET1: &str = "10.78.0.10";
/// The address on the container's `lo` of [`BridgedHosts::add_service_address`].
pub const SERVICE_IP: &str = "10.96.0.5";
/// IPv6 addresses of [`BridgedHosts::add_ipv6`].
pub const CLIENT_IP6: &str = "fd00:77::100";
pub const CONTAINER_IP6: &str = "fd00:77::10";
pub const PORT: u16 = 7000;
pub const NETSERVER_SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads/netserver.c");

static SEQ: AtomicU32 = AtomicU32::new(0);
static NETSERVER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// The netserver workload, built once per test process (`gcc -O2 -static`).
pub fn netserver_bin() -> PathBuf {
    NETSERVER
        .get_or_init(|| build_static_workload(NETSERVER_SRC, "netserver"))
        .clone()
}

/// Lines of `iptables -S` / `nft list ruleset` in the namespace at `path` that belong to a
/// network lock (CRIU's or ferry's).
pub fn lock_rules_in(path: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for (prog, args) in [
        ("iptables", &["-S"][..]),
        ("ip6tables", &["-S"][..]),
        ("nft", &["list", "ruleset"][..]),
    ] {
        let out = run_output(
            Command::new("nsenter")
                .arg(format!("--net={}", path.display()))
                .arg("--")
                .arg(prog)
                .args(args),
        );
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            if l.contains("CRIU") || l.contains("FERRY-LOCK") {
                v.push(format!("{} {prog}: {l}", path.display()));
            }
        }
    }
    v
}

pub struct BridgedHosts {
    pub th: TwoHosts,
    pub client_ns: String,
    /// The container's namespace on the source (`/run/netns/<container_ns>`).
    pub container_ns: String,
    /// Extra namespaces a test made (removed at the end).
    pub extra_ns: Mutex<Vec<String>>,
}

fn ipc(args: &[&str]) {
    must(ip(args), &format!("ip {}", args.join(" ")));
}

impl BridgedHosts {
    pub fn new(name: &str) -> BridgedHosts {
        let th = TwoHosts::new(name);
        let pid = std::process::id();
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let b = BridgedHosts {
            client_ns: format!("fcli-{pid}-{n}"),
            container_ns: format!("fct-{pid}-{n}"),
            th,
            extra_ns: Mutex::new(Vec::new()),
        };
        for ns in [&b.client_ns, &b.container_ns] {
            let _ = ip(&["netns", "del", ns]);
        }
        let (c, k) = (b.client_ns.as_str(), b.container_ns.as_str());
        ipc(&["netns", "add", c]);
        ipc(&["netns", "add", k]);
        b.add_network(0, CLIENT_IP, CONTAINER_IP, "eth0");
        ipc(&["-n", c, "link", "set", "lo", "up"]);
        ipc(&["-n", k, "link", "set", "lo", "up"]);
        ipc(&["-n", k, "route", "add", "default", "via", CLIENT_IP]);
        b
    }

    /// Network `n`: a bridge `br<n>` in the client namespace and both hosts, the hosts'
    /// joined to the client's (`us<n>`/`ud<n>` ── `up<n>`), the client `client_ip/24` on
    /// it; the container's interface `ifname` = `container_ip/24`, CNI style: a veth
    /// (`vc<n>` on the host side) into the source host's bridge.
    fn add_network(&self, n: u8, client_ip: &str, container_ip: &str, ifname: &str) {
        let (c, s, d, k) = (
            self.client_ns.as_str(),
            self.th.src_ns.as_str(),
            self.th.dst_ns.as_str(),
            self.container_ns.as_str(),
        );
        let [br, us, ud, up, vc] = ["br", "us", "ud", "up", "vc"].map(|p| format!("{p}{n}"));
        for ns in [c, s, d] {
            ipc(&["-n", ns, "link", "add", &br, "type", "bridge"]);
            // No spanning tree delay: ports forward at once.
            ipc(&[
                "-n",
                ns,
                "link",
                "set",
                &br,
                "type",
                "bridge",
                "forward_delay",
                "0",
            ]);
        }
        for (port, host) in [(&us, s), (&ud, d)] {
            ipc(&[
                "-n", c, "link", "add", port, "type", "veth", "peer", "name", &up, "netns", host,
            ]);
            ipc(&["-n", c, "link", "set", port, "master", &br, "up"]);
        }
        for ns in [s, d] {
            ipc(&["-n", ns, "link", "set", &up, "master", &br, "up"]);
            ipc(&["-n", ns, "link", "set", &br, "up"]);
        }
        let client = format!("{client_ip}/24");
        ipc(&["-n", c, "addr", "add", &client, "dev", &br]);
        ipc(&["-n", c, "link", "set", &br, "up"]);
        ipc(&[
            "-n", k, "link", "add", ifname, "type", "veth", "peer", "name", &vc, "netns", s,
        ]);
        ipc(&["-n", s, "link", "set", &vc, "master", &br, "up"]);
        let container = format!("{container_ip}/24");
        ipc(&["-n", k, "addr", "add", &container, "dev", ifname]);
        ipc(&["-n", k, "link", "set", ifname, "up"]);
    }

    /// A service address on the container's `lo` ([`SERVICE_IP`]/32), which the client
    /// reaches through the container's eth0 address.
    pub fn add_service_address(&self) {
        let (c, k) = (self.client_ns.as_str(), self.container_ns.as_str());
        let service = format!("{SERVICE_IP}/32");
        ipc(&["-n", k, "addr", "add", &service, "dev", "lo"]);
        ipc(&["-n", c, "route", "add", &service, "via", CONTAINER_IP]);
    }

    /// A second network, Multus style: `br1` everywhere, the client at [`CLIENT_IP_NET1`], the
    /// container's `net1` at [`CONTAINER_IP_NET1`] with MTU 1400 and a route
    /// `10.79.0.0/24 via CLIENT_IP_NET1 metric 50` through it (so that its MTU, a route and
    /// a metric are carried too).
    pub fn add_second_network(&self) {
        let k = self.container_ns.as_str();
        self.add_network(1, CLIENT_IP_NET1, CONTAINER_IP_NET1, "net1");
        ipc(&["-n", k, "link", "set", "net1", "mtu", "1400"]);
        ipc(&[
            "-n",
            k,
            "route",
            "add",
            "10.79.0.0/24",
            "via",
            CLIENT_IP_NET1,
            "dev",
            "net1",
            "metric",
            "50",
        ]);
    }

    /// Dual stack: IPv6 addresses on the client's bridge and the container's eth0 (no
    /// duplicate address detection: usable at once), and an IPv6 default route in the
    /// container's namespace via the client (so that an IPv6 route is carried too).
    pub fn add_ipv6(&self) {
        let (c, k) = (self.client_ns.as_str(), self.container_ns.as_str());
        let client = format!("{CLIENT_IP6}/64");
        let container = format!("{CONTAINER_IP6}/64");
        ipc(&["-n", c, "-6", "addr", "add", &client, "dev", "br0", "nodad"]);
        ipc(&[
            "-n", k, "-6", "addr", "add", &container, "dev", "eth0", "nodad",
        ]);
        ipc(&["-n", k, "-6", "route", "add", "default", "via", CLIENT_IP6]);
    }

    /// A namespace on the destination host's bridge holding an address of the container
    /// (`addr_args`: what follows `ip -n NS`, e.g. `["addr", "add", "10.77.0.10/24", "dev",
    /// "eth0"]`); its name, removed with the rig.
    pub fn add_address_holder(&self, addr_args: &[&str]) -> String {
        let holder = format!(
            "fclash-{}-{}",
            std::process::id(),
            self.container_ns.rsplit('-').next().unwrap()
        );
        self.extra_ns.lock().unwrap().push(holder.clone());
        let h = holder.as_str();
        let d = self.th.dst_ns.as_str();
        ipc(&["netns", "add", h]);
        ipc(&[
            "-n", h, "link", "add", "eth0", "type", "veth", "peer", "name", "vx0", "netns", d,
        ]);
        ipc(&["-n", d, "link", "set", "vx0", "master", "br0", "up"]);
        let mut a = vec!["-n", h];
        a.extend_from_slice(addr_args);
        ipc(&a);
        ipc(&["-n", h, "link", "set", "eth0", "up"]);
        holder
    }

    pub fn container_netns(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.container_ns))
    }

    /// Where ferry serve's built-in setup puts the namespace of `id`.
    pub fn dst_netns(id: &str) -> PathBuf {
        PathBuf::from(format!("/run/netns/ferry-{id}"))
    }

    /// Start the netserver container on the source (log in a bind-mounted dir); waits until
    /// it logs. Returns (id, host path of its log).
    pub fn start_server(&self, suffix: &str) -> (String, PathBuf) {
        let src = self.th.src_runc();
        let id = src.id(suffix);
        let data = src.mkdir(&format!("netdata{suffix}"));
        let bundle = src
            .bundle(&format!("netserver{suffix}"))
            .with_binary(&netserver_bin(), "netserver")
            .netns(&self.container_netns())
            .bind(&data, "/data")
            .args(&["/bin/netserver", &PORT.to_string(), "/data/server.log"])
            .build();
        src.run_detached(&id, &bundle, Out::Null);
        let log = data.join("server.log");
        wait_for(slow(T_NET), "netserver logs", || {
            fs::read_to_string(&log).is_ok_and(|t| t.lines().count() >= 2)
        });
        // The destination's namespace of this id goes at the end, whatever happened.
        self.extra_ns.lock().unwrap().push(format!("ferry-{id}"));
        (id, log)
    }

    /// `ferry serve --bridge br0` on the destination.
    pub fn serve(&self, extra: &[&str]) -> Serve {
        let mut a = vec!["--bridge", "br0"];
        a.extend_from_slice(extra);
        self.th.serve(&a)
    }

    /// Every lock rule (CRIU's or ferry's) in the namespaces of this rig and the hosts.
    pub fn lock_rules(&self) -> Vec<String> {
        let mut v = Vec::new();
        let mut paths = vec![
            self.container_netns(),
            PathBuf::from(format!("/run/netns/{}", self.th.src_ns)),
            PathBuf::from(format!("/run/netns/{}", self.th.dst_ns)),
        ];
        for n in self.extra_ns.lock().unwrap().iter() {
            paths.push(PathBuf::from(format!("/run/netns/{n}")));
        }
        for p in paths.iter().filter(|p| p.exists()) {
            v.extend(lock_rules_in(p));
        }
        v
    }

    /// Namespaces of this rig still present.
    pub fn leftover_netns(&self) -> Vec<String> {
        let mut names = vec![self.client_ns.clone(), self.container_ns.clone()];
        names.extend(self.extra_ns.lock().unwrap().iter().cloned());
        names
            .into_iter()
            .filter(|n| Path::new("/run/netns").join(n).exists())
            .collect()
    }
}

impl Drop for BridgedHosts {
    fn drop(&mut self) {
        // Containers first (TwoHosts' runc helpers), so the namespaces are unused.
        self.th.dst_runc().teardown();
        self.th.src_runc().teardown();
        let mut names = vec![self.client_ns.clone(), self.container_ns.clone()];
        names.extend(self.extra_ns.lock().unwrap().iter().cloned());
        for n in names {
            if Path::new("/run/netns").join(&n).exists() {
                let _ = ip(&["netns", "del", &n]);
            }
        }
    }
}

pub const T_NET: Duration = Duration::from_secs(20);

/// What one TCP client saw.
#[derive(Debug, Default, Clone)]
pub struct ClientReport {
    /// Last server sequence number received (they must come 1, 2, 3, … without a gap).
    pub received: u64,
    /// Client sequence numbers sent.
    pub sent: u64,
    /// Why it ended early (a reset, EOF, a gap…), None while fine.
    pub error: Option<String>,
    /// The longest time without any data from the server, ms.
    pub longest_silence_ms: u64,
}

/// A client in the client namespace with one long TCP connection to the container, sending
/// "c <n>" every 20 ms and checking the server's "s <k>" stream, until stopped.
pub struct TcpClient {
    pub report: Arc<Mutex<ClientReport>>,
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl TcpClient {
    /// To the container's IPv4 address.
    pub fn start(client_ns: &str) -> TcpClient {
        Self::start_to(client_ns, format!("{CONTAINER_IP}:{PORT}").parse().unwrap())
    }

    pub fn start_to(client_ns: &str, addr: SocketAddr) -> TcpClient {
        let s = in_netns(client_ns, || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        })
        .unwrap_or_else(|e| panic!("connect to the container from the client host: {e}"));
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let report = Arc::new(Mutex::new(ClientReport::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r2, st2) = (report.clone(), stop.clone());
        let handle = thread::spawn(move || client_loop(s, r2, st2));
        TcpClient {
            report,
            stop,
            handle: Some(handle),
        }
    }

    pub fn snapshot(&self) -> ClientReport {
        self.report.lock().unwrap().clone()
    }

    pub fn stop(&mut self) -> ClientReport {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.snapshot()
    }
}

impl Drop for TcpClient {
    fn drop(&mut self) {
        self.stop();
    }
}

fn client_loop(s: TcpStream, report: Arc<Mutex<ClientReport>>, stop: Arc<AtomicBool>) {
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut next_send = Instant::now();
    let mut last_data = Instant::now();
    let mut line = String::new();
    let fail = |why: String| {
        let mut rep = report.lock().unwrap();
        if rep.error.is_none() {
            rep.error = Some(why);
        }
    };
    while !stop.load(Ordering::SeqCst) {
        if Instant::now() >= next_send {
            next_send += Duration::from_millis(20);
            let n = report.lock().unwrap().sent + 1;
            // The kernel buffers while the container is frozen; a failing write is the end.
            if let Err(e) = w.write_all(format!("c {n}\n").as_bytes()) {
                return fail(format!("write: {e}"));
            }
            report.lock().unwrap().sent = n;
        }
        match r.read_line(&mut line) {
            Ok(0) => return fail("EOF from the server".into()),
            Ok(_) if line.ends_with('\n') => {
                let k: Option<u64> = line.trim().strip_prefix("s ").and_then(|x| x.parse().ok());
                let mut rep = report.lock().unwrap();
                match k {
                    Some(k) if k == rep.received + 1 => rep.received = k,
                    _ => {
                        let why = format!("after s {} got {:?}", rep.received, line);
                        drop(rep);
                        return fail(why);
                    }
                }
                let silent = last_data.elapsed().as_millis() as u64;
                rep.longest_silence_ms = rep.longest_silence_ms.max(silent);
                last_data = Instant::now();
                line.clear();
            }
            Ok(_) => {} // partial line, keep reading
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => return fail(format!("read: {e}")),
        }
    }
}

/// A UDP flow from the client namespace: a datagram "u <n>" every 50 ms; echoes counted.
pub struct UdpFlow {
    /// (sent, highest echoed sequence number, echoes received)
    pub state: Arc<Mutex<(u64, u64, u64)>>,
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl UdpFlow {
    pub fn start(client_ns: &str) -> UdpFlow {
        let sock = in_netns(client_ns, || UdpSocket::bind((CLIENT_IP, 0))).expect("udp bind");
        sock.connect((CONTAINER_IP, PORT)).expect("udp connect");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let state = Arc::new(Mutex::new((0, 0, 0)));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2) = (state.clone(), stop.clone());
        let handle = thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !st2.load(Ordering::SeqCst) {
                let n = s2.lock().unwrap().0 + 1;
                let _ = sock.send(format!("u {n}").as_bytes());
                s2.lock().unwrap().0 = n;
                if let Ok(len) = sock.recv(&mut buf) {
                    let txt = String::from_utf8_lossy(&buf[..len]).to_string();
                    if let Some(k) = txt.strip_prefix("u ").and_then(|x| x.parse::<u64>().ok()) {
                        let mut st = s2.lock().unwrap();
                        st.1 = st.1.max(k);
                        st.2 += 1;
                    }
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
        UdpFlow {
            state,
            stop,
            handle: Some(handle),
        }
    }

    pub fn snapshot(&self) -> (u64, u64, u64) {
        *self.state.lock().unwrap()
    }
}

impl Drop for UdpFlow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The server's log lines as (tick, conns, bad, udp).
pub fn server_log(path: &Path) -> Vec<(u64, u64, u64, u64)> {
    let t = fs::read_to_string(path).unwrap_or_default();
    t.lines()
        .filter(|l| l.ends_with(|c: char| c.is_ascii_digit()))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let tick = it.next()?.parse().ok()?;
            let mut get = |k: &str| -> Option<u64> { it.next()?.strip_prefix(k)?.parse().ok() };
            Some((tick, get("conns=")?, get("bad=")?, get("udp=")?))
        })
        .collect()
}

/// Wait until every client received at least `more` further server lines.
pub fn wait_clients_progress(clients: &[TcpClient], more: u64, timeout: Duration) {
    let base: Vec<u64> = clients.iter().map(|c| c.snapshot().received).collect();
    wait_for(timeout, "every client receives more server data", || {
        clients.iter().zip(&base).all(|(c, b)| {
            let r = c.snapshot();
            assert!(r.error.is_none(), "client failed: {r:?}");
            r.received >= b + more
        })
    });
}

/// The neighbour entry of `addr` in the namespace `ns` (its MAC).
pub fn neighbour_mac(ns: &str, addr: &str) -> Option<String> {
    let out = ip(&["-n", ns, "-j", "neigh", "show", addr]);
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get(0)?["lladdr"].as_str().map(str::to_string)
}

/// The standard output of `prog args…` run in the network namespace at `path`.
pub fn stdout_in(path: &Path, prog: &str, args: &[&str]) -> String {
    let out = run_output(
        Command::new("nsenter")
            .arg(format!("--net={}", path.display()))
            .arg("--")
            .arg(prog)
            .args(args),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The MAC of `ifname` in the namespace at `path`.
pub fn mac_in(path: &Path, ifname: &str) -> Option<String> {
    let out = stdout_in(path, "ip", &["-j", "link", "show", "dev", ifname]);
    let v: Value = serde_json::from_str(&out).ok()?;
    v.get(0)?["address"].as_str().map(str::to_string)
}

/// The client's neighbour entry for `addr` names the MAC of `ifname` in the namespace at
/// `dst_ns` (the destination's announcement moved it).
#[track_caller]
pub fn assert_neighbour_moved(client_ns: &str, addr: &str, dst_ns: &Path, ifname: &str) {
    let dst_mac =
        mac_in(dst_ns, ifname).unwrap_or_else(|| panic!("no {ifname} in {}", dst_ns.display()));
    assert_eq!(
        neighbour_mac(client_ns, addr).as_deref(),
        Some(dst_mac.as_str()),
        "the client's neighbour entry for {addr} did not move to {ifname}'s MAC on the \
         destination"
    );
}
