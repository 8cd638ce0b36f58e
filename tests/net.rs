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

const DST_CLEAN_T: Duration = Duration::from_secs(30);
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
/// a namespace given by path, with established connections from another namespace and
/// `--tcp-established`: the same connections go on (no gap, no repeat), no lock rule stays.
#[test]
fn local_checkpoint_restore_keeps_tcp_connections() {
    if !require_two_hosts() {
        return;
    }
    let b = BridgedHosts::new("netlocal");
    let (id, log) = b.start_server("");
    let mut clients = start_clients(&b, 2);
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
    assert_connections_kept(&mut clients, &log, 20, 2);
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
    let dst_mac = mac_in(&dst_ns, "eth0").expect("eth0 in the destination namespace");
    assert_eq!(
        client_neighbour_mac(&b.client_ns).as_deref(),
        Some(dst_mac.as_str()),
        "the client's neighbour entry did not move to the destination's MAC"
    );
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
    let clash = format!(
        "fclash-{}-{}",
        std::process::id(),
        b.container_ns.rsplit('-').next().unwrap()
    );
    b.extra_ns.lock().unwrap().push(clash.clone());
    for args in [
        vec!["netns", "add", clash.as_str()],
        vec![
            "-n",
            clash.as_str(),
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "vx0",
            "netns",
            b.th.dst_ns.as_str(),
        ],
        vec![
            "-n",
            b.th.dst_ns.as_str(),
            "link",
            "set",
            "vx0",
            "master",
            "br0",
            "up",
        ],
        vec![
            "-n",
            clash.as_str(),
            "addr",
            "add",
            "10.77.0.10/24",
            "dev",
            "eth0",
        ],
        vec!["-n", clash.as_str(), "link", "set", "eth0", "up"],
    ] {
        must(
            run_output(std::process::Command::new("ip").args(&args)),
            &format!("ip {args:?}"),
        );
    }

    let out = b.th.migrate(
        &id,
        &serve.addr,
        &["--mode", "stop-copy", "--tcp-established", "-v"],
    );
    // -v: info lines come before the one error line.
    assert_eq!(out.code, Some(8), "{out:?}");
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("ferry: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{out:?}");
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

/// A test `--netns-hook`: logs every call (arguments and FERRY_* facts), refuses while a
/// file `fail` exists beside it, and otherwise does what the built-in setup does.
const HOOK: &str = r#"#!/bin/sh
dir=$(dirname "$0")
echo "$1 $2 $3 id=$FERRY_CONTAINER_ID netns=$FERRY_NETNS if=$FERRY_IFNAME addrs=$FERRY_ADDRS routes=$FERRY_ROUTES mtu=$FERRY_MTU source=$FERRY_SOURCE" >> "$dir/calls"
[ "$1" = add ] || exit 0
if [ -e "$dir/fail" ]; then echo "hook says: no capacity here" >&2; exit 3; fi
ip link add "hk$$" type veth peer name "$FERRY_IFNAME" netns "$(basename "$3")" || exit 1
ip link set "hk$$" master br0 up || exit 1
nsenter --net="$3" -- ip link set lo up
for a in $FERRY_ADDRS; do nsenter --net="$3" -- ip addr add "$a" dev "$FERRY_IFNAME" || exit 1; done
nsenter --net="$3" -- ip link set "$FERRY_IFNAME" up
for r in $FERRY_ROUTES; do
  dst=${r%%,*}; via=${r#*,}
  if [ "$via" = "$r" ]; then nsenter --net="$3" -- ip route add "$dst" dev "$FERRY_IFNAME" || exit 1
  else nsenter --net="$3" -- ip route add "$dst" via "$via" dev "$FERRY_IFNAME" || exit 1; fi
done
"#;

/// `ferry serve --netns-hook PROG`: a hook that refuses makes the migration fail before the
/// freeze with its message (and is called again with `del`); once it accepts, the migration
/// keeps the connections. The hook gets the documented arguments and facts.
#[test]
fn netns_hook_is_called_with_the_facts() {
    let Some((b, serve, id, log, mut clients)) = start_net("nethook", 2, |b| {
        let hook_dir = b.th.dst_runc().mkdir("hook");
        let hook = hook_dir.join("netns-hook");
        std::fs::write(&hook, HOOK).unwrap();
        std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        std::fs::write(hook_dir.join("fail"), "").unwrap();
        b.th.serve(&["--netns-hook", s(&hook)])
    }) else {
        return;
    };
    let hook_dir = b.th.dst_runc().path("hook");

    let out = b.th.migrate(
        &id,
        &serve.addr,
        &["--mode", "stop-copy", "--tcp-established"],
    );
    assert_failed_with(&out, &[8]);
    assert!(out.stderr.contains("no capacity here"), "{out:?}");
    assert_eq!(b.th.src_runc().status(&id).as_deref(), Some("running"));
    b.th.assert_dst_clean(&id, DST_CLEAN_T);
    assert!(!BridgedHosts::dst_netns(&id).exists());
    let calls = std::fs::read_to_string(hook_dir.join("calls")).unwrap();
    let ns = BridgedHosts::dst_netns(&id);
    let want_add = format!(
        "add {id} {} id={id} netns={} if=eth0 addrs={CONTAINER_IP}/24 routes=default,{CLIENT_IP} mtu=1500 source={SRC_IP}",
        ns.display(),
        ns.display()
    );
    assert_eq!(
        calls.lines().collect::<Vec<_>>(),
        vec![want_add.as_str(), &format!("del {id} {} id={id} netns={} if=eth0 addrs={CONTAINER_IP}/24 routes=default,{CLIENT_IP} mtu=1500 source=", ns.display(), ns.display())],
        "hook calls"
    );

    std::fs::remove_file(hook_dir.join("fail")).unwrap();
    let out = b.th.migrate(
        &id,
        &serve.addr,
        &["--mode", "stop-copy", "--tcp-established"],
    );
    let v = migrate_json(&out, Some("stop-copy"));
    assert_eq!(json_u64(&v, "tcp_connections"), 2, "report: {v}");
    assert_connections_kept(&mut clients, &log, 25, 2);
    let calls = std::fs::read_to_string(hook_dir.join("calls")).unwrap();
    assert_eq!(calls.lines().count(), 3, "hook calls: {calls}");
    finish(&b);
}

/// The nftables lock (`FERRY_NET_LOCK=nftables` on both hosts, which have both tools): a
/// failed final dump leaves the source's connections alive and no table behind; then the
/// migration keeps the connections, and no table is left anywhere.
#[test]
fn nftables_lock_method() {
    let Some((b, serve, id, log, mut clients)) = start_net("netnft", 2, |b| {
        b.th.serve_with_env(&[("FERRY_NET_LOCK", "nftables")], &["--bridge", "br0"])
    }) else {
        return;
    };
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
    assert_eq!(json_u64(&v, "tcp_connections"), 2, "report: {v}");
    assert_connections_kept(&mut clients, &log, 25, 2);
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

/// ferry carries IPv4 only: a container whose interface also has a global IPv6 address is
/// refused before anything happens, rather than arriving without it.
#[test]
fn ipv6_address_is_refused() {
    let Some((b, serve, id, _log, _clients)) = start_net("netv6", 0, serve_bridge) else {
        return;
    };
    let ip = |args: &[&str]| {
        let mut a = vec!["-n", b.container_ns.as_str()];
        a.extend_from_slice(args);
        must(
            run_output(std::process::Command::new("ip").args(&a)),
            "ip in the container's namespace",
        );
    };
    ip(&[
        "-6",
        "addr",
        "add",
        "fd00:77::10/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    let out = b.th.migrate(&id, &serve.addr, &["--mode", "stop-copy"]);
    assert_failed_with(&out, &[4]);
    assert!(
        out.stderr.contains("IPv6 address fd00:77::10/64"),
        "{out:?}"
    );
    assert_eq!(b.th.src_runc().status(&id).as_deref(), Some("running"));
    b.th.assert_dst_clean(&id, DST_CLEAN_T);
    // Without it, the same container moves.
    ip(&["-6", "addr", "del", "fd00:77::10/64", "dev", "eth0"]);
    let out = b.th.migrate(&id, &serve.addr, &["--mode", "stop-copy"]);
    let v = migrate_json(&out, Some("stop-copy"));
    assert_migrated(&b.th, &id, &v);
    b.th.finish();
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
    let out = b.th.migrate(
        &id,
        &serve.addr,
        &["--mode", "post-copy", "--tcp-established"],
    );
    let v = migrate_json(&out, Some("post-copy"));
    assert_eq!(json_u64(&v, "tcp_connections"), 2, "report: {v}");
    assert_migrated(&b.th, &id, &v);
    assert_connections_kept(&mut clients, &log, 25, 2);
    finish(&b);
}

#[test]
fn zz_no_leftovers() {
    if !require_two_hosts() {
        return;
    }
    assert_no_leftovers();
}
