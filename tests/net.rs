//! Network continuity (issue #6) with real CRIU and runc: a TCP/UDP server container in a
//! network namespace given by path (CNI style), clients in a third namespace that reaches
//! the container's address on either emulated host (see `common::net::BridgedHosts`).
//!
//! Needs root, criu, runc, busybox-static, iproute2, util-linux (nsenter), gcc, iptables or
//! nft; without them the tests print `skipping: …` and pass, unless `CI` is set. Run with
//! `--test-threads=1` (`zz_no_leftovers` must run last).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::migration::*;
use common::net::*;
use common::*;

const CLIENTS: usize = 4;

fn start_clients(b: &BridgedHosts, n: usize) -> Vec<TcpClient> {
    let c: Vec<TcpClient> = (0..n).map(|_| TcpClient::start(&b.client_ns)).collect();
    wait_clients_progress(&c, 10, slow(T_NET));
    c
}

/// What a migration test starts from: the rig, `ferry serve` on the destination, the server
/// container's id and log on the source, and the TCP clients exchanging data with it. Bind it
/// in this order, so that the clients go first and the rig last (reverse order of binding).
type Net = (BridgedHosts, Serve, String, PathBuf, Vec<TcpClient>);

/// [`Net`] on the rig `name`: `serve` starts `ferry serve` (given the rig), then the server
/// and `n` clients start. None (the test is skipped) without the two emulated hosts.
fn start_net(name: &str, n: usize, serve: impl FnOnce(&BridgedHosts) -> Serve) -> Option<Net> {
    if !require_two_hosts() {
        return None;
    }
    let b = BridgedHosts::new(name);
    let serve = serve(&b);
    let (id, log) = b.start_server("");
    let clients = start_clients(&b, n);
    Some((b, serve, id, log, clients))
}

/// `ferry serve --bridge br0`, the destination most tests use.
fn serve_bridge(b: &BridgedHosts) -> Serve {
    b.serve(&[])
}

/// Once the server had `n` connections, it never had fewer; no sequence error anywhere.
/// `lines` is the server's log read while the clients still ran (they close at the end).
#[track_caller]
fn assert_server_kept(lines: &[(u64, u64, u64, u64)], n: u64) {
    let first = lines
        .iter()
        .position(|l| l.1 >= n)
        .unwrap_or_else(|| panic!("the server never had {n} connections: {lines:?}"));
    for (i, l) in lines.iter().enumerate().skip(first) {
        assert!(
            l.1 >= n,
            "the server's connection count dropped: {l:?}; around it: {:?}",
            &lines[i.saturating_sub(5)..(i + 5).min(lines.len())]
        );
    }
    let last = lines.last().unwrap();
    assert_eq!(last.2, 0, "the server saw sequence errors: {last:?}");
}

#[track_caller]
/// The clients go on (`more` exchanges each) on the same connections, and the server's log
/// shows the `n` connections kept throughout.
fn assert_connections_kept(clients: &mut [TcpClient], log: &std::path::Path, more: u64, n: u64) {
    wait_clients_progress(clients, more, slow(T_NET));
    let kept = server_log(log);
    assert_clients_fine(clients);
    assert_server_kept(&kept, n);
}

/// `ferry migrate --mode MODE --tcp-established` to `serve` succeeds: the report names the
/// mode and counts the `n` connections, the container runs on the destination, and the
/// clients and the server's log show the connections kept. Returns the report.
fn migrate_keeping(
    b: &BridgedHosts,
    (id, serve, mode): (&str, &Serve, &str),
    clients: &mut [TcpClient],
    log: &std::path::Path,
    n: u64,
) -> serde_json::Value {
    let out =
        b.th.migrate(id, &serve.addr, &["--mode", mode, "--tcp-established"]);
    let v = migrate_json(&out, Some(mode));
    assert_eq!(json_u64(&v, "tcp_connections"), n, "report: {v}");
    assert_migrated(&b.th, id, &v);
    assert_connections_kept(clients, log, 25, n);
    v
}

/// No FERRY-LOCK / CRIU lock rule is left in either host.
fn assert_no_lock_rules(b: &BridgedHosts) {
    let rules = b.lock_rules();
    assert!(rules.is_empty(), "lock rules left: {rules:?}");
}

/// The end of a test: no lock rule is left, then [`TwoHosts::finish`].
#[track_caller]
fn finish(b: &BridgedHosts) {
    assert_no_lock_rules(b);
    b.th.finish();
}

fn assert_clients_fine(clients: &mut [TcpClient]) -> Vec<ClientReport> {
    let reps: Vec<ClientReport> = clients.iter_mut().map(|c| c.stop()).collect();
    for r in &reps {
        assert!(r.error.is_none(), "client: {r:?}");
    }
    reps
}

/// Step 1 of the issue, on one host: `ferry checkpoint` + `ferry restore` of a container in
/// a namespace given by path, with established connections from another namespace (two over
/// IPv4, one over IPv6) and `--tcp-established`: the same connections go on (no gap, no
/// repeat), no lock rule stays (ip6tables included).
#[test]
fn local_checkpoint_restore_keeps_tcp_connections() {
    if !require_two_hosts() {
        return;
    }
    let b = BridgedHosts::new("netlocal");
    b.add_ipv6();
    let (id, log) = b.start_server("");
    let mut clients = start_clients(&b, 2);
    let v6: std::net::SocketAddr = format!("[{CONTAINER_IP6}]:{PORT}").parse().unwrap();
    clients.push(TcpClient::start_to(&b.client_ns, v6));
    wait_clients_progress(&clients, 10, slow(T_NET));
    let src = b.th.src_runc();
    let images = src.path("images");
    let root = s(&src.root).to_string();
    for cmd in ["checkpoint", "restore"] {
        ferry(&[
            cmd,
            &id,
            "--images",
            s(&images),
            "--runtime-root",
            &root,
            "--tcp-established",
            "--json",
        ])
        .ok();
    }
    assert_eq!(src.status(&id).as_deref(), Some("running"));
    assert_connections_kept(&mut clients, &log, 20, 3);
    finish(&b);
}

/// The acceptance case: several clients, one long connection each, streaming both ways,
/// plus a UDP flow; `ferry migrate --tcp-established` to a `ferry serve --bridge br0`. The
/// same connections continue (no reconnect, no gap or repeat either way, the server's count
/// never drops), UDP echoes continue, the report counts the connections, the source's
/// namespace is gone, the client's neighbour entry moved to the new MAC (gratuitous ARP),
/// no lock rule anywhere.
#[test]
fn migrate_keeps_tcp_connections_and_udp_flow() {
    let Some((b, serve, id, log, mut clients)) = start_net("netmig", CLIENTS, serve_bridge) else {
        return;
    };
    let udp = UdpFlow::start(&b.client_ns);
    wait_for(slow(T_NET), "UDP echoes", || udp.snapshot().2 >= 5);

    let out = b.th.migrate(
        &id,
        &serve.addr,
        &["--mode", "stop-copy", "--tcp-established"],
    );
    let v = migrate_json(&out, Some("stop-copy"));
    assert_eq!(
        json_u64(&v, "tcp_connections"),
        CLIENTS as u64,
        "report: {v}"
    );
    assert_eq!(json_u64(&v, "tcp_closed"), 0, "report: {v}");
    assert_eq!(v["netns_removed"], true, "report: {v}");
    assert_migrated(&b.th, &id, &v);

    let (_, echoed_at_commit, _) = udp.snapshot();
    wait_clients_progress(&clients, 25, slow(T_NET));
    wait_for(slow(T_NET), "UDP echoes from the destination", || {
        udp.snapshot().1 >= echoed_at_commit + 10
    });
    let kept = server_log(&log);
    let reps = assert_clients_fine(&mut clients);
    eprintln!("clients after the migration: {reps:?}");
    assert_server_kept(&kept, CLIENTS as u64);

    assert!(
        !b.container_netns().exists(),
        "the source's namespace {} is still there",
        b.container_netns().display()
    );
    let dst_ns = BridgedHosts::dst_netns(&id);
    assert_neighbour_moved(&b.client_ns, CONTAINER_IP, &dst_ns, "eth0");
    assert_no_lock_rules(&b);
    drop(udp);
    b.th.finish();
}

/// The container's address is in use on the destination (another namespace on its bridge):
/// the migration is refused before the freeze, the source keeps running with its
/// connections, the destination keeps nothing.
#[test]
fn address_clash_is_refused_before_the_freeze() {
    let Some((b, serve, id, log, mut clients)) = start_net("netclash", 2, serve_bridge) else {
        return;
    };
    // Another holder of the address on the destination's bridge.
    b.add_address_holder(&["addr", "add", "10.77.0.10/24", "dev", "eth0"]);

    let out = b.th.migrate(
        &id,
        &serve.addr,
        &["--mode", "stop-copy", "--tcp-established", "-v"],
    );
    out.assert_verbose_error(8);
    assert!(
        out.stderr.contains("already in use"),
        "the error does not name the clash: {out:?}"
    );
    assert!(
        !out.stderr.contains("freezing and dumping"),
        "the source froze before the refusal: {out:?}"
    );
    assert_eq!(b.th.src_runc().status(&id).as_deref(), Some("running"));
    assert!(b.container_netns().exists());
    assert_connections_kept(&mut clients, &log, 15, 2);
    b.th.assert_dst_clean(&id, DST_CLEAN_T);
    assert!(
        !BridgedHosts::dst_netns(&id).exists(),
        "the destination kept its namespace for {id}"
    );
    finish(&b);
}

/// The final dump fails (post-dump answered with a failure) under `--tcp-established`: the
/// source resumes with its connections alive and unbroken, CRIU's lock is gone from its
/// namespace, the destination's namespace (and lock) are gone.
#[test]
fn final_dump_failure_keeps_the_source_connections() {
    let Some((b, serve, id, log, mut clients)) = start_net("netfail", 3, serve_bridge) else {
        return;
    };
    let out =
        b.th.migrate_cmd(
            &id,
            &serve.addr,
            &["--mode", "stop-copy", "--tcp-established"],
        )
        .env("FERRY_TEST_FAULT", "fail-post-dump")
        .run();
    assert_failed_with(&out, &[8]);
    assert_eq!(b.th.src_runc().status(&id).as_deref(), Some("running"));
    assert_connections_kept(&mut clients, &log, 25, 3);
    b.th.assert_dst_clean(&id, DST_CLEAN_T);
    assert!(!BridgedHosts::dst_netns(&id).exists());
    finish(&b);
}

/// Without `--tcp-established` the connections are closed on the destination (CRIU's
/// tcp_close): the report counts them, the clients see their connections end, the migrated
/// server takes new connections.
#[test]
fn without_tcp_established_connections_are_closed_and_counted() {
    let Some((b, serve, id, log, clients)) = start_net("netclose", 3, serve_bridge) else {
        return;
    };
    let out = b.th.migrate(&id, &serve.addr, &["--mode", "stop-copy"]);
    let v = migrate_json(&out, Some("stop-copy"));
    assert_eq!(json_u64(&v, "tcp_closed"), 3, "report: {v}");
    assert_eq!(json_u64(&v, "tcp_connections"), 0, "report: {v}");
    assert_migrated(&b.th, &id, &v);
    wait_for(slow(T_NET), "every old connection ends", || {
        clients.iter().all(|c| c.snapshot().error.is_some())
    });
    wait_for(slow(T_NET), "the migrated server closes them", || {
        server_log(&log).last().is_some_and(|l| l.1 == 0)
    });
    let fresh = start_clients(&b, 1);
    wait_clients_progress(&fresh, 10, slow(T_NET));
    drop(fresh);
    drop(clients);
    finish(&b);
}

/// A test `--netns-hook`: logs every call (arguments and FERRY_* facts), refuses the
/// interface named in a file `fail` beside it, and otherwise does what the built-in setup
/// does (eth0 into br0, any other interface into br1).
const HOOK: &str = r#"#!/bin/sh
dir=$(dirname "$0")
echo "$1 $2 $3 id=$FERRY_CONTAINER_ID netns=$FERRY_NETNS if=$FERRY_IFNAME of=$FERRY_IFNAMES addrs=$FERRY_ADDRS routes=$FERRY_ROUTES addrs6=$FERRY_ADDRS6 routes6=$FERRY_ROUTES6 mtu=$FERRY_MTU source=$FERRY_SOURCE" >> "$dir/calls"
[ "$1" = add ] || exit 0
if [ "$(cat "$dir/fail" 2>/dev/null)" = "$FERRY_IFNAME" ]; then echo "hook says: no capacity here" >&2; exit 3; fi
br=br1; [ "$FERRY_IFNAME" = eth0 ] && br=br0
ip link add "hk$$" mtu "$FERRY_MTU" type veth peer name "$FERRY_IFNAME" mtu "$FERRY_MTU" netns "$(basename "$3")" || exit 1
ip link set "hk$$" master $br up || exit 1
nsenter --net="$3" -- ip link set lo up
for a in $FERRY_ADDRS; do nsenter --net="$3" -- ip addr add "$a" dev "$FERRY_IFNAME" || exit 1; done
for a in $FERRY_ADDRS6; do nsenter --net="$3" -- ip -6 addr add "$a" dev "$FERRY_IFNAME" nodad || exit 1; done
nsenter --net="$3" -- ip link set "$FERRY_IFNAME" up
for f in 4 6; do
  if [ $f = 4 ]; then routes=$FERRY_ROUTES; else routes=$FERRY_ROUTES6; fi
  for r in $routes; do
    # dst[,via[,metric]]
    dst=${r%%,*}; rest=${r#"$dst"}; rest=${rest#,}; via=${rest%%,*}; metric=${rest#"$via"}; metric=${metric#,}
    set -- "$dst"
    [ -n "$via" ] && set -- "$@" via "$via"
    [ -n "$metric" ] && set -- "$@" metric "$metric"
    nsenter --net="$FERRY_NETNS" -- ip -$f route add "$@" dev "$FERRY_IFNAME" || exit 1
  done
done
"#;

/// `ferry serve --netns-hook PROG`, with two interfaces (dual stack eth0, and net1 with its
/// own MTU and a route with a metric): the hook is called once per interface with that
/// interface's facts; when it refuses the second, the migration fails before the freeze
/// with its message and `del` is called for both, last first; once it accepts, the
/// migration keeps the connections on both interfaces.
#[test]
fn netns_hook_is_called_with_the_facts() {
    let Some((b, serve, id, log, mut clients)) = start_net("nethook", 2, |b| {
        b.add_ipv6();
        b.add_second_network();
        let hook_dir = b.th.dst_runc().mkdir("hook");
        let hook = hook_dir.join("netns-hook");
        std::fs::write(&hook, HOOK).unwrap();
        std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        std::fs::write(hook_dir.join("fail"), "net1").unwrap();
        b.th.serve(&["--netns-hook", s(&hook)])
    }) else {
        return;
    };
    let net1: std::net::SocketAddr = format!("{CONTAINER_IP_NET1}:{PORT}").parse().unwrap();
    clients.push(TcpClient::start_to(&b.client_ns, net1));
    wait_clients_progress(&clients, 10, slow(T_NET));
    let hook_dir = b.th.dst_runc().path("hook");

    let out = b.th.migrate(
        &id,
        &serve.addr,
        &["--mode", "stop-copy", "--tcp-established"],
    );
    assert_failed_with(&out, &[8]);
    assert!(
        out.stderr.contains("add (interface net1)") && out.stderr.contains("no capacity here"),
        "{out:?}"
    );
    assert_eq!(b.th.src_runc().status(&id).as_deref(), Some("running"));
    b.th.assert_dst_clean(&id, DST_CLEAN_T);
    assert!(!BridgedHosts::dst_netns(&id).exists());
    let calls = std::fs::read_to_string(hook_dir.join("calls")).unwrap();
    let ns = BridgedHosts::dst_netns(&id).display().to_string();
    let call = |action: &str, iface: &str| {
        let facts = match iface {
            "eth0" => format!(
                "addrs={CONTAINER_IP}/24 routes=default,{CLIENT_IP} addrs6={CONTAINER_IP6}/64 \
                 routes6=default,{CLIENT_IP6} mtu=1500"
            ),
            _ => format!(
                "addrs={CONTAINER_IP_NET1}/24 routes=10.79.0.0/24,{CLIENT_IP_NET1},50 addrs6= \
                 routes6= mtu=1400"
            ),
        };
        let source = if action == "add" { SRC_IP } else { "" };
        format!(
            "{action} {id} {ns} id={id} netns={ns} if={iface} of=eth0 net1 {facts} source={source}"
        )
    };
    assert_eq!(
        calls.lines().collect::<Vec<_>>(),
        [
            call("add", "eth0"),
            call("add", "net1"),
            call("del", "net1"),
            call("del", "eth0")
        ],
        "hook calls"
    );

    std::fs::remove_file(hook_dir.join("fail")).unwrap();
    let out = b.th.migrate(
        &id,
        &serve.addr,
        &["--mode", "stop-copy", "--tcp-established"],
    );
    let v = migrate_json(&out, Some("stop-copy"));
    assert_eq!(json_u64(&v, "tcp_connections"), 3, "report: {v}");
    assert_connections_kept(&mut clients, &log, 25, 3);
    let calls = std::fs::read_to_string(hook_dir.join("calls")).unwrap();
    assert_eq!(calls.lines().count(), 6, "hook calls: {calls}");
    finish(&b);
}

/// The nftables lock (`FERRY_NET_LOCK=nftables` on both hosts, which have both tools), dual
/// stack (two connections over IPv4, one over IPv6): a failed final dump leaves the source's
/// connections alive and no table behind; then the migration keeps the connections, and no
/// table is left anywhere.
#[test]
fn nftables_lock_method() {
    let Some((b, serve, id, log, mut clients)) = start_net("netnft", 2, |b| {
        b.add_ipv6();
        b.th.serve_with_env(&[("FERRY_NET_LOCK", "nftables")], &["--bridge", "br0"])
    }) else {
        return;
    };
    // One connection over IPv6: the `inet` table locks both families.
    let v6: std::net::SocketAddr = format!("[{CONTAINER_IP6}]:{PORT}").parse().unwrap();
    clients.push(TcpClient::start_to(&b.client_ns, v6));
    wait_clients_progress(&clients, 10, slow(T_NET));
    let args = ["--mode", "stop-copy", "--tcp-established"];
    let out =
        b.th.migrate_cmd(&id, &serve.addr, &args)
            .env("FERRY_NET_LOCK", "nftables")
            .env("FERRY_TEST_FAULT", "fail-post-dump")
            .run();
    assert_failed_with(&out, &[8]);
    assert_eq!(b.th.src_runc().status(&id).as_deref(), Some("running"));
    wait_clients_progress(&clients, 15, slow(T_NET));
    let rules = b.lock_rules();
    assert!(
        rules.is_empty(),
        "lock rules left after the failure: {rules:?}"
    );
    b.th.assert_dst_clean(&id, DST_CLEAN_T);

    let out =
        b.th.migrate_cmd(&id, &serve.addr, &args)
            .env("FERRY_NET_LOCK", "nftables")
            .run();
    let v = migrate_json(&out, Some("stop-copy"));
    assert_eq!(json_u64(&v, "tcp_connections"), 3, "report: {v}");
    assert_connections_kept(&mut clients, &log, 25, 3);
    finish(&b);
}

/// A network namespace shared with a process outside the container (another container of a
/// pod, say) is refused before anything happens: its address cannot move without it.
#[test]
fn shared_netns_is_refused() {
    let Some((b, serve, id, _log, _clients)) = start_net("netshared", 0, serve_bridge) else {
        return;
    };
    let mut holder = std::process::Command::new("ip")
        .args(["netns", "exec", &b.container_ns, "sleep", "60"])
        .spawn()
        .expect("spawn a process in the container's namespace");
    thread_sleep_ms(300);
    let out = b.th.migrate(
        &id,
        &serve.addr,
        &["--mode", "stop-copy", "--tcp-established"],
    );
    let _ = holder.kill();
    let _ = holder.wait();
    assert_failed_with(&out, &[4]);
    assert!(out.stderr.contains("shared"), "{out:?}");
    assert_eq!(b.th.src_runc().status(&id).as_deref(), Some("running"));
    assert!(b.container_netns().exists());
    b.th.assert_dst_clean(&id, DST_CLEAN_T);
    b.th.finish();
}

/// Dual stack: the container's interface has an IPv6 address and its namespace an IPv6
/// default route next to the IPv4 ones. First another holder of the IPv6 address sits on the
/// destination's bridge: the migration is refused before the freeze (naming the address),
/// the source untouched. Then without it: TCP connections over both families go on, the
/// destination's interface has the IPv6 address and route, and the client's IPv6 neighbour
/// entry moved to the new MAC (unsolicited neighbour advertisement); no lock rule anywhere
/// (ip6tables included).
#[test]
fn ipv6_addresses_are_carried() {
    let Some((b, serve, id, log, _)) = start_net("netv6", 0, serve_bridge) else {
        return;
    };
    b.add_ipv6();
    let v6: std::net::SocketAddr = format!("[{CONTAINER_IP6}]:{PORT}").parse().unwrap();
    let mut clients = vec![
        TcpClient::start(&b.client_ns),
        TcpClient::start_to(&b.client_ns, v6),
        TcpClient::start_to(&b.client_ns, v6),
    ];
    wait_clients_progress(&clients, 10, slow(T_NET));

    let container6 = format!("{CONTAINER_IP6}/64");
    let holder = b.add_address_holder(&["-6", "addr", "add", &container6, "dev", "eth0", "nodad"]);
    let out = b.th.migrate(
        &id,
        &serve.addr,
        &["--mode", "stop-copy", "--tcp-established"],
    );
    assert_failed_with(&out, &[8]);
    assert!(
        out.stderr
            .contains(&format!("address {CONTAINER_IP6} is already in use")),
        "{out:?}"
    );
    assert_eq!(b.th.src_runc().status(&id).as_deref(), Some("running"));
    b.th.assert_dst_clean(&id, DST_CLEAN_T);
    must(
        run_output(std::process::Command::new("ip").args(["netns", "del", &holder])),
        "remove the holder",
    );

    migrate_keeping(&b, (&id, &serve, "stop-copy"), &mut clients, &log, 3);

    let dst_ns = BridgedHosts::dst_netns(&id);
    let in_dst = |args: &[&str]| stdout_in(&dst_ns, "ip", args);
    let addrs = in_dst(&["-6", "addr", "show", "dev", "eth0", "scope", "global"]);
    assert!(addrs.contains(&container6), "{addrs}");
    let routes = in_dst(&["-6", "route", "show", "default"]);
    assert!(routes.contains(&format!("via {CLIENT_IP6}")), "{routes}");
    assert_neighbour_moved(&b.client_ns, CONTAINER_IP6, &dst_ns, "eth0");
    finish(&b);
}

/// A container with two networks (Multus style: `eth0` on br0, `net1` on br1 with its own
/// MTU, a route and a metric) and a service address on `lo` keeps them all: a destination
/// that has no bridge for `net1` refuses before anything happens (the source untouched, the
/// destination clean); one with `--bridge br0 --bridge net1=br1` takes it, and TCP
/// connections to all three addresses go on, with net1's MTU, address and route (metric
/// included) and lo's address rebuilt, and the client's neighbour entry for net1's address
/// moved to the new MAC.
#[test]
fn two_interfaces_and_a_service_address_are_carried() {
    let only_eth0 = |b: &BridgedHosts| b.th.serve(&["--bridge", "eth0=br0"]);
    let Some((b, partial, id, log, _)) = start_net("net2if", 0, only_eth0) else {
        return;
    };
    b.add_second_network();
    b.add_service_address();
    let to = |ip: &str| -> std::net::SocketAddr { format!("{ip}:{PORT}").parse().unwrap() };
    let mut clients = vec![
        TcpClient::start(&b.client_ns),
        TcpClient::start_to(&b.client_ns, to(CONTAINER_IP_NET1)),
        TcpClient::start_to(&b.client_ns, to(SERVICE_IP)),
    ];
    wait_clients_progress(&clients, 10, slow(T_NET));
    let tcp = ["--mode", "stop-copy", "--tcp-established"];

    let out = b.th.migrate(&id, &partial.addr, &tcp);
    assert_failed_with(&out, &[8]);
    assert!(
        out.stderr.contains(
            "interface net1 has no bridge on this destination (ferry serve --bridge \
             net1=BRIDGE)"
        ),
        "{out:?}"
    );
    assert_eq!(b.th.src_runc().status(&id).as_deref(), Some("running"));
    b.th.assert_dst_clean(&id, DST_CLEAN_T);

    let serve = b.th.serve(&["--bridge", "br0", "--bridge", "net1=br1"]);
    migrate_keeping(&b, (&id, &serve, "stop-copy"), &mut clients, &log, 3);

    let dst_ns = BridgedHosts::dst_netns(&id);
    let in_dst = |args: &[&str]| stdout_in(&dst_ns, "ip", args);
    let link = in_dst(&["link", "show", "dev", "net1"]);
    assert!(link.contains("mtu 1400"), "{link}");
    let addrs = in_dst(&["-4", "addr", "show", "dev", "net1"]);
    assert!(
        addrs.contains(&format!("{CONTAINER_IP_NET1}/24")),
        "{addrs}"
    );
    let routes = in_dst(&["-4", "route", "show", "10.79.0.0/24"]);
    assert!(
        routes.contains(&format!("via {CLIENT_IP_NET1} dev net1 metric 50")),
        "{routes}"
    );
    let lo = in_dst(&["-4", "addr", "show", "dev", "lo"]);
    assert!(lo.contains(&format!("{SERVICE_IP}/32")), "{lo}");
    assert_neighbour_moved(&b.client_ns, CONTAINER_IP_NET1, &dst_ns, "net1");
    finish(&b);
}

/// The container namespace's own firewall (a service mesh redirecting a port, IPv4 and IPv6)
/// arrives with it: a namespace with an nftables table of its own is refused first (exit 4,
/// naming it, the source untouched); then the iptables and ip6tables rules are on the
/// destination (without ferry's lock), a new connection through the redirect reaches the
/// server over both families, and the connection made before the migration goes on.
#[test]
fn firewall_rules_are_carried() {
    let Some((b, serve, id, log, mut clients)) = start_net("netfw", 1, serve_bridge) else {
        return;
    };
    b.add_ipv6();
    let k = b.container_ns.as_str();
    let in_k = |args: &[&str]| {
        let mut a = vec!["netns", "exec", k];
        a.extend_from_slice(args);
        must(
            run_output(std::process::Command::new("ip").args(&a)),
            &format!("{args:?} in the container's namespace"),
        )
    };
    let redirect = [
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-p",
        "tcp",
        "--dport",
        "7002",
        "-j",
        "REDIRECT",
        "--to-ports",
        &PORT.to_string(),
    ]
    .map(str::to_string);
    for prog in ["iptables", "ip6tables"] {
        let mut a = vec![prog];
        a.extend(redirect.iter().map(String::as_str));
        in_k(&a);
    }
    let via_redirect = |ip: &str| -> std::net::SocketAddr {
        let ip: std::net::IpAddr = ip.parse().unwrap();
        std::net::SocketAddr::new(ip, 7002)
    };
    // The rule works on the source.
    let probe = TcpClient::start_to(&b.client_ns, via_redirect(CONTAINER_IP));
    wait_clients_progress(&[probe], 5, slow(T_NET));

    in_k(&["nft", "add", "table", "inet", "mesh"]);
    let tcp = ["--mode", "stop-copy", "--tcp-established"];
    let out = b.th.migrate(&id, &serve.addr, &tcp);
    assert_failed_with(&out, &[4]);
    assert!(
        out.stderr
            .contains("nftables tables of its own (inet mesh)"),
        "{out:?}"
    );
    assert_eq!(b.th.src_runc().status(&id).as_deref(), Some("running"));
    b.th.assert_dst_clean(&id, DST_CLEAN_T);
    in_k(&["nft", "delete", "table", "inet", "mesh"]);

    let out = b.th.migrate(&id, &serve.addr, &tcp);
    let v = migrate_json(&out, Some("stop-copy"));
    assert_migrated(&b.th, &id, &v);
    assert_connections_kept(&mut clients, &log, 20, 1);
    let dst_ns = BridgedHosts::dst_netns(&id);
    for prog in ["iptables-save", "ip6tables-save"] {
        let rules = stdout_in(&dst_ns, prog, &[]);
        assert!(
            rules.contains("--dport 7002 -j REDIRECT --to-ports 7000"),
            "{prog} on the destination: {rules}"
        );
        assert!(!rules.contains("FERRY-LOCK"), "{prog}: {rules}");
    }
    let v6 = format!("[{CONTAINER_IP6}]:7002").parse().unwrap();
    let fresh = [
        TcpClient::start_to(&b.client_ns, via_redirect(CONTAINER_IP)),
        TcpClient::start_to(&b.client_ns, v6),
    ];
    wait_clients_progress(&fresh, 5, slow(T_NET));
    drop(fresh);
    finish(&b);
}

/// Policy routing in the container's namespace (a rule to a table of its own, a route in
/// it) is not carried: the migration is refused before anything happens (exit 4, naming
/// them), the source untouched and the destination clean.
#[test]
fn policy_routing_is_refused() {
    let Some((b, serve, id, _log, _clients)) = start_net("netrule", 0, serve_bridge) else {
        return;
    };
    let k = b.container_ns.as_str();
    for args in [
        &[
            "-n",
            k,
            "rule",
            "add",
            "from",
            CONTAINER_IP,
            "table",
            "100",
            "prio",
            "100",
        ][..],
        &[
            "-n",
            k,
            "route",
            "add",
            "10.10.0.0/16",
            "via",
            CLIENT_IP,
            "table",
            "100",
        ],
    ] {
        must(
            run_output(std::process::Command::new("ip").args(args)),
            &format!("ip {args:?}"),
        );
    }
    let out = b.th.migrate(&id, &serve.addr, &["--mode", "stop-copy"]);
    assert_failed_with(&out, &[4]);
    assert!(
        out.stderr.contains(
            "uses policy routing (rule 100 to table 100, route 10.10.0.0/16 in table 100)"
        ),
        "{out:?}"
    );
    assert_eq!(b.th.src_runc().status(&id).as_deref(), Some("running"));
    b.th.assert_dst_clean(&id, DST_CLEAN_T);
    finish(&b);
}

/// Two namespaces joined by a veth pair (`a0` ── `b0`), removed on drop.
struct VethPair {
    a: String,
    b: String,
}

impl VethPair {
    fn new(tag: &str) -> VethPair {
        let p = VethPair {
            a: format!("f{tag}a-{}", std::process::id()),
            b: format!("f{tag}b-{}", std::process::id()),
        };
        let ip = |args: &[&str]| {
            must(
                run_output(std::process::Command::new("ip").args(args)),
                &format!("ip {args:?}"),
            )
        };
        for n in [&p.a, &p.b] {
            let _ = run_output(std::process::Command::new("ip").args(["netns", "del", n]));
            ip(&["netns", "add", n]);
        }
        ip(&[
            "-n", &p.a, "link", "add", "a0", "type", "veth", "peer", "name", "b0", "netns", &p.b,
        ]);
        ip(&["-n", &p.a, "link", "set", "a0", "up"]);
        ip(&["-n", &p.b, "link", "set", "b0", "up"]);
        p
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        for n in [&self.a, &self.b] {
            let _ = run_output(std::process::Command::new("ip").args(["netns", "del", n]));
        }
    }
}

/// ferry's own frames, each on its own (in a migration a neighbour also learns the new MAC
/// from the destination's first solicitation, which would hide a broken announcement): the
/// gratuitous ARP and the unsolicited neighbour advertisement move a neighbour's existing
/// entries to the announcer's MAC (the kernel checks the ICMPv6 checksum and hop limit), and
/// the clash probes of both families find a holder of the address and nobody for a free one.
#[test]
fn announcements_and_probes_work_on_their_own() {
    use ferry::net::arp::{self, parse_mac};
    use ferry::net::ndp;
    if !require_two_hosts() {
        return;
    }
    let p = VethPair::new("ann");
    let ip = |args: &[&str]| {
        must(
            run_output(std::process::Command::new("ip").args(args)),
            &format!("ip {args:?}"),
        )
    };
    let a = p.a.as_str();
    ip(&["-n", a, "addr", "add", "10.99.0.2/24", "dev", "a0"]);
    ip(&[
        "-n",
        a,
        "-6",
        "addr",
        "add",
        "fd00:99::2/64",
        "dev",
        "a0",
        "nodad",
    ]);
    let stale = "02:00:00:00:00:01";
    for (fam, addr) in [("-4", "10.99.0.1"), ("-6", "fd00:99::1")] {
        ip(&[
            "-n", a, fam, "neigh", "replace", addr, "lladdr", stale, "dev", "a0", "nud", "stale",
        ]);
    }
    let b_mac = mac_in(
        &std::path::PathBuf::from(format!("/run/netns/{}", p.b)),
        "b0",
    )
    .expect("b0's MAC");
    let a_mac =
        mac_in(&std::path::PathBuf::from(format!("/run/netns/{a}")), "a0").expect("a0's MAC");
    let mac = parse_mac(&b_mac).unwrap();
    let (v4, v6) = ("10.99.0.1".parse().unwrap(), "fd00:99::1".parse().unwrap());
    in_netns(&p.b, || {
        arp::announce("b0", mac, &[v4], 1).expect("gratuitous ARP");
        ndp::announce("b0", mac, &[v6], 1).expect("neighbour advertisement");
    });
    for addr in ["10.99.0.1", "fd00:99::1"] {
        wait_for(Duration::from_secs(5), "the entry moves", || {
            neighbour_mac(a, addr).as_deref() == Some(b_mac.as_str())
        });
    }

    let wait = Duration::from_millis(600);
    let (held4, free4) = ("10.99.0.2".parse().unwrap(), "10.99.0.3".parse().unwrap());
    let (held6, free6) = ("fd00:99::2".parse().unwrap(), "fd00:99::3".parse().unwrap());
    let found = in_netns(&p.b, || {
        (
            arp::probe("b0", mac, &[free4, held4], &[], wait).unwrap(),
            arp::probe("b0", mac, &[free4], &[], wait).unwrap(),
            ndp::probe("b0", mac, &[free6, held6], &[], wait).unwrap(),
            ndp::probe("b0", mac, &[free6], &[], wait).unwrap(),
            // The source container's MAC is no clash.
            ndp::probe("b0", mac, &[held6], &[parse_mac(&a_mac).unwrap()], wait).unwrap(),
        )
    });
    let a_mac = parse_mac(&a_mac);
    assert_eq!(found.0, Some((held4, a_mac.unwrap())), "ARP probe");
    assert_eq!(found.1, None, "ARP probe of a free address");
    assert_eq!(found.2, Some((held6, a_mac.unwrap())), "NDP probe");
    assert_eq!(found.3, None, "NDP probe of a free address");
    assert_eq!(found.4, None, "NDP probe answered by an allowed MAC");
}

fn thread_sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// Post-copy with `--tcp-established`: the destination runs the container before its memory
/// has arrived; the connections go on all the same.
#[test]
fn post_copy_keeps_tcp_connections() {
    let Some((b, serve, id, log, mut clients)) = start_net("netpost", 2, serve_bridge) else {
        return;
    };
    migrate_keeping(&b, (&id, &serve, "post-copy"), &mut clients, &log, 2);
    finish(&b);
}

#[test]
fn zz_no_leftovers() {
    if !require_two_hosts() {
        return;
    }
    assert_no_leftovers();
}
