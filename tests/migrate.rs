//! Live migration between two emulated hosts on this machine (`ferry serve` on the
//! destination, `ferry migrate` on the source), with real CRIU and runc.
//!
//! The hosts are two network namespaces joined by a veth pair (192.0.2.1 = source,
//! 192.0.2.2 = destination), each with its own runc root and bundles dir; see
//! `common::TwoHosts`. They share the filesystem (so a bind-mount source has the same path on
//! both) and the cgroup filesystem (the destination's containers go under `ferry-dst-<pid>/`).
//!
//! Needs root, criu, runc, busybox-static, iproute2, util-linux (nsenter) and gcc; without
//! them the tests print `skipping: …` and pass, unless `CI` is set. Run with
//! `--test-threads=1` (leak checks look at global state, and `zz_no_leftovers` must run
//! last).

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::migration::*;
use common::*;

/// ... after a migration whose network died (it can only notice by a timeout).
const DST_CLEAN_DEAD_LINK_T: Duration = Duration::from_secs(120);
// ---------------------------------------------------------------------------------------
// The rig itself
// ---------------------------------------------------------------------------------------

/// The two hosts reach each other (and only as 192.0.2.1 → 192.0.2.2), `cut_link` really
/// cuts the link and `restore_link` brings it back.
#[test]
fn rig_two_hosts_network() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("rignet");
    let listener = in_netns(&th.dst_ns, || std::net::TcpListener::bind((DST_IP, 0)))
        .expect("listen on 192.0.2.2");
    let addr = listener.local_addr().unwrap().to_string();
    let echo = thread::spawn(move || {
        let (mut c, peer) = listener.accept().unwrap();
        let mut b = [0u8; 5];
        c.read_exact(&mut b).unwrap();
        c.write_all(&b).unwrap();
        (peer, listener)
    });
    let tx0 = th.src_tx_bytes();
    let mut c = th.connect_from_src(&addr);
    c.write_all(b"hello").unwrap();
    let mut b = [0u8; 5];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello");
    let (peer, listener) = echo.join().unwrap();
    assert_eq!(
        peer.ip().to_string(),
        SRC_IP,
        "peer address seen by the destination"
    );
    assert!(
        th.src_tx_bytes() > tx0,
        "tx bytes of the source veth did not grow"
    );

    // ICMP too (busybox's ping; the host has no other).
    let busybox = host_busybox().unwrap();
    let mut ping = Command::new("nsenter");
    ping.args(TwoHosts::netns_prefix(&th.src_ns).iter().skip(1))
        .arg(&busybox)
        .args(["ping", "-c", "1", "-W", "2", DST_IP]);
    let out = must(
        run_output(&mut ping),
        "ping 192.0.2.2 from the source namespace",
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 packets received"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Cut the link: a connection now fails.
    th.cut_link();
    let sa: std::net::SocketAddr = addr.parse().unwrap();
    let r = in_netns(&th.src_ns, || {
        TcpStream::connect_timeout(&sa, Duration::from_millis(500))
    });
    assert!(r.is_err(), "connected across a cut link");
    th.restore_link();
    drop(listener);

    // Per-host runc roots and bundles dirs, and a 0600 token of 32 hex characters.
    assert_ne!(th.src_runc().root, th.dst_runc().root);
    assert_ne!(th.src_runc().bundles, th.dst_runc().bundles);
    let tok = fs::read_to_string(&th.token).unwrap();
    assert_eq!(tok.trim().len(), 32);
    assert!(tok.trim().bytes().all(|b| b.is_ascii_hexdigit()));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&th.token).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (src_ns, dst_ns) = (th.src_ns.clone(), th.dst_ns.clone());
    drop(th);
    let left = leftover_netns();
    assert!(
        !left.contains(&src_ns) && !left.contains(&dst_ns),
        "network namespaces left: {left:?}"
    );
}

/// memwriter's check really checks: a word changed behind its back gives one BAD line,
/// then it goes on with ok lines and an unbroken seq.
#[test]
fn rig_memwriter_detects_corruption() {
    if !require_two_hosts() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mem.log");
    let mut child = Command::new(memwriter_bin())
        .args(["16", "4"])
        .arg(&out)
        .stdin(Stdio::null())
        .spawn()
        .expect("run memwriter on the host");
    let pid = child.id();
    let result = std::panic::catch_unwind(|| {
        wait_memwriter_lines(&out, 2, T);
        assert_memwriter_ok(&out);
        // The 16 MiB block is the only mapping that large: overwrite 8 bytes in its middle.
        let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let (lo, _hi) = maps
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|p| p.starts_with("rw"))
            })
            .filter_map(|l| {
                let (a, b) = l.split_whitespace().next()?.split_once('-')?;
                Some((
                    u64::from_str_radix(a, 16).ok()?,
                    u64::from_str_radix(b, 16).ok()?,
                ))
            })
            .find(|(a, b)| b - a >= 16 * MIB)
            .expect("memwriter's 16 MiB mapping");
        let mut mem = fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .unwrap();
        use std::io::{Seek, SeekFrom};
        mem.seek(SeekFrom::Start(lo + 8 * MIB)).unwrap();
        mem.write_all(b"garbage!").unwrap();
        drop(mem);
        let n = read_memwriter_lines(&out).len();
        let lines = wait_memwriter_lines(&out, n + 4, T);
        let bad: Vec<&MemLine> = lines.iter().filter(|l| !l.ok).collect();
        assert_eq!(bad.len(), 1, "exactly one BAD line expected: {lines:?}");
        assert!(bad[0].raw.contains("bad=1"), "{:?}", bad[0]);
        assert!(lines.last().unwrap().ok, "{lines:?}");
        for w in lines.windows(2) {
            assert_eq!(w[1].seq, w[0].seq + 1, "{lines:?}");
        }
        assert_eq!(lines[0].seq, 1);
        assert_eq!(lines[0].pages, 16 * 256);
    });
    let _ = child.kill();
    let _ = child.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// memwriter in a runc container on one host: ok lines, unbroken seq.
#[test]
fn rig_memwriter_in_runc() {
    if !require_two_hosts() {
        return;
    }
    let known = global_leak_findings();
    let rc = Runc::new("rigmem");
    let id = rc.id("");
    let data = rc.mkdir("data");
    let bundle = rc
        .bundle("memwriter")
        .with_memwriter()
        .bind(&data, "/data")
        .args(&memwriter_args(64, 16, "/data/mem.log"))
        .build();
    rc.run_detached(&id, &bundle, Out::Null);
    let out = data.join("mem.log");
    let lines = wait_memwriter_lines(&out, 10, MEM_T);
    assert_eq!(lines[0].pages, 64 * 256);
    assert_memwriter_ok(&out);
    rc.kill_and_delete(&id);
    rc.teardown();
    leak_check_except(&rc.ids(), &known);
}

/// memwriter (256 MiB, 16 MiB/s) survives a local `ferry checkpoint` / `ferry restore`
/// cycle: its memory checks stay ok and its seq continues.
#[test]
fn rig_memwriter_survives_local_checkpoint_restore() {
    if !require_two_hosts() {
        return;
    }
    let known = global_leak_findings();
    let rc = Runc::new("rigmemcr");
    let id = rc.id("");
    let data = rc.mkdir("data");
    let bundle = rc
        .bundle("memwriter")
        .with_memwriter()
        .bind(&data, "/data")
        .args(&memwriter_args(256, 16, "/data/mem.log"))
        .build();
    rc.run_detached(&id, &bundle, Out::Null);
    let out = data.join("mem.log");
    wait_memwriter_lines(&out, 3, MEM_T);
    assert_memwriter_ok(&out);

    let images = rc.mkdir("images");
    let root = rc.root.clone();
    let cp = ferry(&[
        "checkpoint",
        &id,
        "--images",
        s(&images),
        "--runtime-root",
        s(&root),
        "--json",
    ]);
    cp.ok();
    // The whole 256 MiB went into the images (4 KiB pages).
    let v = cp.json();
    assert!(
        json_u64(&v, "pages_written") >= 256 * 256,
        "pages_written: {v}"
    );
    assert!(
        rc.try_state(&id).is_none(),
        "{id} still in runc after checkpoint"
    );
    let n = read_memwriter_lines(&out).len();
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        read_memwriter_lines(&out).len(),
        n,
        "still writing after checkpoint"
    );

    ferry(&[
        "restore",
        &id,
        "--images",
        s(&images),
        "--runtime-root",
        s(&root),
    ])
    .ok();
    assert_eq!(rc.status(&id).as_deref(), Some("running"));
    assert_memwriter_continues(&out, n, 10);
    rc.kill_and_delete(&id);
    rc.teardown();
    leak_check_except(&rc.ids(), &known);
}

// ---------------------------------------------------------------------------------------
// Successful migrations
// ---------------------------------------------------------------------------------------

/// Skips (returns) without the two-host rig.
fn counter_migration(name: &str, mode: &str) {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new(name);
    migrate_counter(&th, mode);
    th.finish();
}

/// Skips (returns) without the two-host rig.
fn memwriter_migration(name: &str, mode: &str, serve_args: &[&str]) {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new(name);
    let w = start_memwriter(&th, "", 256, 16);
    let serve = th.serve(serve_args);
    let out = th.migrate(&w.id, &serve.addr, &["--mode", mode]);
    // Post-copy: the first full check after the restore pulls in every remaining page.
    let v = assert_memwriter_migrated(&th, &w, &out, Some(mode), 10);
    eprintln!("migrate ({mode}): {v}");
    if mode == "stop-copy" {
        // Every page of the 256 MiB crossed the link before the restore.
        assert!(
            json_u64(&v, "bytes_sent") >= 256 * MIB,
            "bytes_sent below the workload's 256 MiB: {v}"
        );
    }
    assert!(serve.is_alive(), "ferry serve exited after a migration");
    // Who wrote the pages: ferry's receiver logs each stream it took; a CRIU page server
    // does not (post-copy's final dump sends none).
    let log = std::fs::read_to_string(&serve.stderr_path).unwrap_or_default();
    let ferry_received = log.contains("page stream received");
    let criu = serve_args.contains(&"criu");
    assert_eq!(
        ferry_received,
        mode == "stop-copy" && !criu,
        "ferry serve {serve_args:?}, {mode}: its log {} ferry's page receiver",
        if ferry_received {
            "names"
        } else {
            "does not name"
        }
    );
    th.dst_runc().kill_and_delete(&w.id);
    th.finish();
}

#[test]
fn migrate_counter_stop_copy() {
    counter_migration("mcstop", "stop-copy");
}

#[test]
fn migrate_memwriter_stop_copy_256m() {
    memwriter_migration("mmstop", "stop-copy", &[]);
}

/// `ferry serve --page-server criu`: a CRIU page server (started through the RPC) writes
/// the pages instead of ferry's receiver; the memory arrives intact all the same.
#[test]
fn migrate_memwriter_stop_copy_256m_criu_page_server() {
    memwriter_migration("mmcriu", "stop-copy", &["--page-server", "criu"]);
}

#[test]
fn migrate_counter_post_copy() {
    counter_migration("mcpost", "post-copy");
}

#[test]
fn migrate_memwriter_post_copy_256m() {
    memwriter_migration("mmpost", "post-copy", &[]);
}

/// Two containers migrated at the same time to one `ferry serve` (mode auto): both arrive
/// and both keep counting.
#[test]
fn two_containers_concurrently() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mtwo");
    let a = start_counter(&th, "-a");
    let b = start_counter(&th, "-b");
    let serve = th.serve(&[]);
    let (ra, rb) = thread::scope(|sc| {
        let ha = sc.spawn(|| th.migrate(&a.id, &serve.addr, &[]));
        let hb = sc.spawn(|| th.migrate(&b.id, &serve.addr, &[]));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    let va = migrate_json(&ra, None);
    let vb = migrate_json(&rb, None);
    assert_migrated(&th, &a.id, &va);
    assert_migrated(&th, &b.id, &vb);
    for w in [&a, &b] {
        let n = read_counter_lines(&w.out).len();
        assert_counter_continues(&w.out, n, 20);
    }
    assert!(serve.is_alive());
    th.dst_runc().kill_and_delete(&a.id);
    th.dst_runc().kill_and_delete(&b.id);
    th.finish();
}

// ---------------------------------------------------------------------------------------
// Failures: the source keeps running, the destination is left clean
// ---------------------------------------------------------------------------------------

/// `ferry serve --page-server` other than ferry or criu: one line, exit 4, no `listening`.
/// A paused container (`runc pause`) is moved as it is: paused on the destination, where it
/// has not run a step (the counter stands still), and `runc resume` there lets it count on
/// strictly. Before, the destination let it run.
#[test]
fn paused_container_stays_paused_stop_copy() {
    paused_migration("mpause", "stop-copy");
}

/// The same in post-copy: its memory comes over while it stays paused.
#[test]
fn paused_container_stays_paused_post_copy() {
    paused_migration("mpausepc", "post-copy");
}

/// A migration of a paused container that fails after the dump (here at post-dump, by an
/// injected fault) leaves the source paused, not running, and the destination clean.
#[test]
fn paused_container_stays_paused_when_the_migration_fails() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mpausefail");
    let w = start_counter(&th, "");
    let serve = th.serve(&[]);
    let n = pause_counter(th.src_runc(), &w);
    let out = th
        .migrate_cmd(&w.id, &serve.addr, &["--mode", "stop-copy"])
        .env("FERRY_TEST_FAULT", "fail-post-dump")
        .run();
    assert_failed_with(&out, &[8]);
    assert!(out.stderr.contains("injected fault"), "{out:?}");
    th.assert_dst_clean(&w.id, DST_CLEAN_T);
    assert_eq!(th.src_runc().status(&w.id).as_deref(), Some("paused"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(read_counter_lines(&w.out).len(), n, "the source ran");
    th.src_runc().resume(&w.id);
    assert_source_counter_healthy(&th, &w);
    assert!(serve.is_alive(), "ferry serve exited");
    th.src_runc().kill_and_delete(&w.id);
    th.finish();
}

/// A process `runc exec` started is in the container's cgroup but not in its init's tree,
/// which is all CRIU dumps: CRIU only warned of an "unexpected process" and the migration
/// went through without it, the source's copy killed with the rest. Now the dump fails
/// while frozen, before CRIU seizes anything: exit 7 naming the process, the source
/// running on with it, the destination clean.
#[test]
fn exec_started_processes_are_refused_not_lost() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mexec");
    let w = start_counter(&th, "");
    let serve = th.serve(&[]);
    th.src_runc().exec_detached(&w.id, &["sleep", "1000"]);
    let out = th.migrate(&w.id, &serve.addr, &["--mode", "stop-copy"]);
    assert_counter_not_migrated(&th, &w, &out, &[7], DST_CLEAN_T);
    assert!(
        out.stderr
            .contains("1 process(es) outside its init's process tree"),
        "{out:?}"
    );
    assert!(out.stderr.contains("(sleep)"), "{out:?}");
    let ps = must(
        th.src_runc().cmd().args(["ps", &w.id]).output().unwrap(),
        "runc ps",
    );
    assert!(
        String::from_utf8_lossy(&ps.stdout).contains("sleep 1000"),
        "the exec'd process is gone: {ps:?}"
    );
    assert!(serve.is_alive(), "ferry serve exited");
    th.src_runc().kill_and_delete(&w.id);
    th.finish();
}

/// The container ends by itself while its rootfs crosses, before the freeze: the migration
/// fails saying it is not running (exit 7), not with what CRIU made of a dump of nothing;
/// the destination is clean and serve stays up.
#[test]
fn a_container_that_stops_during_the_migration_is_reported_stopped() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mstops");
    let w = start_counter(&th, "");
    add_rootfs_ballast(&w);
    let serve = th.serve(&[]);
    let out = migrate_with_fault(&th, &w.id, &serve.addr, "stop-copy", || {
        must(th.src_runc().kill(&w.id, "KILL"), "runc kill");
    });
    assert_failed_with(&out, &[7]);
    assert!(
        out.stderr
            .contains(&format!("container {:?} is not running", w.id)),
        "{out:?}"
    );
    th.assert_dst_clean(&w.id, DST_CLEAN_T);
    assert!(serve.is_alive(), "ferry serve exited");
    must(th.src_runc().delete(&w.id, false), "runc delete");
    th.finish();
}

/// A second dump of a container while a migration of it is under way (here `ferry
/// checkpoint --leave-running`, while memory crosses the link) is refused at once (exit 7),
/// and the migration goes through. Without the lock, the checkpoint's CRIU failed on the
/// tasks the migration's CRIU held (exit 6).
#[test]
fn a_second_dump_during_a_migration_is_refused() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mlock");
    let w = start_memwriter(&th, "", 256, 16);
    let serve = th.serve(&[]);
    let images = th.src_runc().mkdir("images");
    let mut second = None;
    let out = migrate_with_fault(&th, &w.id, &serve.addr, "stop-copy", || {
        second = Some(ferry(&[
            "checkpoint",
            &w.id,
            "--images",
            s(&images),
            "--leave-running",
            "--runtime-root",
            s(&th.src_runc().root),
        ]));
    });
    let second = second.unwrap();
    second.assert_error(7);
    assert!(
        second.stderr.contains(&format!(
            "a checkpoint or migration of container {:?} is already under way",
            w.id
        )),
        "{second:?}"
    );
    assert_memwriter_migrated(&th, &w, &out, Some("stop-copy"), 10);
    th.dst_runc().kill_and_delete(&w.id);
    th.finish();
}

#[test]
fn serve_refuses_an_unknown_page_server() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    write_token_file(&token, &random_hex(16));
    let token = token.display().to_string();
    let out = ferry(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--token-file",
        &token,
        "--page-server",
        "rsync",
    ]);
    out.assert_error(4);
    assert!(out.stdout.is_empty(), "serve started: {out:?}");
    assert!(
        out.stderr
            .contains("unknown --page-server \"rsync\" (ferry, criu)"),
        "{out:?}"
    );
}

/// `ferry serve` with a token, an address, a `--bridge` or a directory it cannot use: one line
/// naming it, no `listening`; exit 4 for what the caller wrote wrong, 5 for an address this host lacks
/// or a `--bundles` / `--work-dir` it cannot create.
#[test]
fn serve_refuses_a_bad_token_or_listen_address() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("token");
    write_token_file(&good, &random_hex(16));
    let short = dir.path().join("short");
    write_token_file(&short, "abc");
    let a_file = dir.path().join("a-file");
    std::fs::write(&a_file, "").unwrap();
    let serve_with = |token: &std::path::Path, listen: &str, extra: &[&str]| {
        let token = token.display().to_string();
        let mut a = vec!["serve", "--listen", listen, "--token-file", &token];
        a.extend_from_slice(extra);
        ferry(&a)
    };
    let serve = |token: &std::path::Path, listen: &str| serve_with(token, listen, &[]);
    // --bridge values: a name the kernel would refuse, an interface given two bridges.
    for (bridges, says) in [
        (
            &["br 0"][..],
            "--bridge br 0: \"br 0\" is not an interface name",
        ),
        (
            &["eth0=br0", "eth0=br1"],
            "--bridge eth0=br1: interface eth0 has a bridge already",
        ),
        (
            &["br0", "br1"],
            "--bridge br1: every interface has a bridge already",
        ),
    ] {
        let extra: Vec<&str> = bridges.iter().flat_map(|b| ["--bridge", b]).collect();
        let out = serve_with(&good, "127.0.0.1:0", &extra);
        out.assert_error(4);
        assert!(out.stdout.is_empty(), "serve started: {out:?}");
        assert!(out.stderr.contains(says), "{out:?}");
    }
    // Directories it cannot make: named, before "listening".
    let a_file = a_file.display().to_string();
    let under_file = format!("{a_file}/x");
    for (flag, dir, says) in [
        ("--bundles", a_file.as_str(), "not a directory"),
        ("--work-dir", under_file.as_str(), "Not a directory"),
    ] {
        let out = serve_with(&good, "127.0.0.1:0", &[flag, dir]);
        out.assert_error(5);
        assert!(out.stdout.is_empty(), "serve started: {out:?}");
        assert!(
            out.stderr.contains(&format!("{flag} {dir}: {says}")),
            "{out:?}"
        );
    }
    // A runc root restores could not use: invalid input, before "listening".
    let out = serve_with(&good, "127.0.0.1:0", &["--runtime-root", &a_file]);
    out.assert_error(4);
    assert!(out.stdout.is_empty(), "serve started: {out:?}");
    assert!(
        out.stderr.contains(&format!(
            "--runtime-root: {a_file} is not a runc state root"
        )),
        "{out:?}"
    );
    for (token, listen, code, says) in [
        (
            &short,
            "127.0.0.1:0",
            4,
            "short: 3 bytes long; at least 16 are needed",
        ),
        (
            &good,
            "127.0.0.1:99999",
            4,
            "--listen 127.0.0.1:99999: invalid port value",
        ),
        (&good, "7000", 4, "--listen 7000: invalid socket address"),
        // TEST-NET-1 is on no interface here.
        (
            &good,
            "192.0.2.77:7000",
            5,
            "--listen 192.0.2.77:7000: cannot listen there",
        ),
    ] {
        let out = serve(token, listen);
        out.assert_error(code);
        assert!(out.stdout.is_empty(), "serve started: {out:?}");
        assert!(out.stderr.contains(says), "{out:?}");
    }
}

/// `ferry migrate --to` not in HOST:PORT form: one line, exit 4, before anything is looked at
/// (the container does not even exist here).
#[test]
fn migrate_refuses_a_malformed_destination() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    write_token_file(&token, &random_hex(16));
    let token = token.display().to_string();
    for (to, says) in [
        ("127.0.0.1", "--to 127.0.0.1: needs HOST:PORT"),
        ("127.0.0.1:0", "--to 127.0.0.1:0: the port must be 1-65535"),
        ("host:70000", "--to host:70000: the port must be 1-65535"),
        (":7000", "--to :7000: needs HOST:PORT"),
        (
            "::1:7000",
            "--to ::1:7000: needs HOST:PORT (an IPv6 address in brackets)",
        ),
    ] {
        let out = ferry(&["migrate", "no-such-ctr", "--to", to, "--token-file", &token]);
        out.assert_error(4);
        assert!(out.stderr.contains(says), "{out:?}");
    }
}

/// A token file that is a FIFO or a directory: one line, exit 4, at once. Opening a FIFO
/// used to wait for a writer, and SIGTERM did not end that wait (ferry's handlers restart
/// the call).
#[test]
fn a_token_file_that_is_no_regular_file_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    std::fs::set_permissions(&tokens, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    for (token, says) in [(&fifo, "not a regular file"), (&tokens, "is a directory")] {
        let t = token.display().to_string();
        let serve = ["serve", "--listen", "127.0.0.1:0", "--token-file", &t];
        let migrate = ["migrate", "c", "--to", "127.0.0.1:1", "--token-file", &t];
        for args in [&serve[..], &migrate[..]] {
            let out = ferry(args);
            out.assert_error(4);
            assert!(out.stdout.is_empty(), "{out:?}");
            assert!(
                out.stderr.contains(&format!("token: {t}: {says}")),
                "{out:?}"
            );
        }
    }
}

/// `ferry serve` with another token: refused (exit 4), nothing happens on either side.
#[test]
fn wrong_token() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mtoken");
    let w = start_counter(&th, "");
    let other = th.work_base.join("other-token");
    write_token_file(&other, &random_hex(16));
    let serve = th.serve_with_token(&other, &[]);
    let out = th.migrate(&w.id, &serve.addr, &[]);
    assert_counter_not_migrated(&th, &w, &out, &[4], DST_CLEAN_T);
    assert!(
        !th.dst_bundle(&w.id).join("rootfs").exists(),
        "an unauthenticated peer got a rootfs copied"
    );
    assert!(serve.is_alive(), "ferry serve exited after a refused peer");
    th.src_runc().kill_and_delete(&w.id);
    th.finish();
}

/// A bundle config.json larger than a migration carries (4 MiB) is refused before the
/// container is touched (exit 4, saying so), instead of being read whole and sent.
#[test]
fn an_oversized_config_json_is_refused_before_the_freeze() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mbigcfg");
    let w = start_counter(&th, "");
    // runc read the config at create; ferry reads it again to send it.
    let path = w.bundle.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["annotations"] = serde_json::json!({"pad": "x".repeat(5 << 20)});
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
    let serve = th.serve(&[]);
    let out = th.migrate(&w.id, &serve.addr, &[]);
    assert_counter_not_migrated(&th, &w, &out, &[4], DST_CLEAN_T);
    assert!(
        out.stderr.contains("/config.json: 52")
            && out
                .stderr
                .contains(" bytes; a migration carries at most 4194304"),
        "{out:?}"
    );
    assert!(serve.is_alive(), "ferry serve exited");
    th.src_runc().kill_and_delete(&w.id);
    th.finish();
}

/// A container with a terminal is refused before it is touched (exit 4, the message says
/// why): nothing on the destination could receive its restored pty master. The source keeps
/// running on its terminal, the destination stays clean, `ferry serve` stays up.
#[test]
fn terminal_container_is_refused() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mtty");
    let src = th.src_runc();
    let id = src.id("");
    let data = src.mkdir("data");
    let bundle = src
        .bundle("countertty")
        .bind(&data, "/data")
        .args(&counter_file_args("/data/counter"))
        .terminal()
        .build();
    let sock = src.path("console.sock");
    let _tty = console_receiver(&sock, src.path("tty.txt"));
    src.run_with_console(&id, &bundle, &sock);
    let out = data.join("counter");
    wait_counter_lines(&out, 20, slow(T));
    let w = Workload {
        id,
        out,
        data,
        bundle,
    };
    let serve = th.serve(&[]);
    let res = th.migrate(&w.id, &serve.addr, &[]);
    assert_counter_not_migrated(&th, &w, &res, &[4], DST_CLEAN_T);
    assert!(res.stderr.contains("has a terminal"), "{res:?}");
    assert!(serve.is_alive(), "ferry serve exited");
    th.src_runc().kill_and_delete(&w.id);
    th.finish();
}

/// A bind-mount source that does not exist on the destination is found when the
/// destination prepares, before the source freezes: exit 8 naming the path, the source never
/// frozen and running on, the destination clean, `ferry serve` up.
#[test]
fn missing_bind_source_is_refused_before_the_freeze() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mbindpre");
    let extra = th.src_runc().mkdir("extra");
    let w = start_counter_with(&th, "", &[(&extra, "/extra")]);
    // Gone from the host, still mounted in the running container.
    fs::rename(&extra, th.src_runc().path("extra.moved")).unwrap();
    let serve = th.serve(&[]);
    let out = th.migrate(&w.id, &serve.addr, &["--mode", "stop-copy", "-v"]);
    let error = out.assert_verbose_error(8);
    let says = format!(
        "bind mount source {} (for /extra) does not exist on the destination",
        extra.display()
    );
    assert!(error.contains(&says), "{out:?}");
    assert_counter_refused_before_the_freeze(&th, &w, &serve, &out);
    th.src_runc().kill_and_delete(&w.id);
    th.finish();
}

/// Ctrl-C (SIGINT to `ferry migrate`'s process group, as a terminal sends it) while the
/// container is frozen for the final dump: ferry fails the dump at CRIU's post-dump (CRIU
/// resumes the tasks), exits 10 saying so, the memwriter runs on intact on the source, the
/// destination is clean. Before, ferry died of the signal without a word, leaving its
/// scratch dir (the dump's images) behind.
#[test]
fn interrupt_during_the_freeze_leaves_the_source_running() {
    interrupted_in_freeze("mintr", "stop-copy", libc::SIGINT);
}

/// The same in post-copy, by SIGTERM (a supervisor stopping the job).
#[test]
fn interrupt_during_the_freeze_leaves_the_source_running_post_copy() {
    interrupted_in_freeze("mintrpc", "post-copy", libc::SIGTERM);
}

/// Ctrl-C after a post-copy migration's commit, while the source still serves the pages
/// the restored memwriter faults in: ferry does not stop (the container would be lost on
/// the destination without its pages), the migration finishes, ferry says it ignored the
/// signal, and the memwriter runs on intact on the destination. Before, ferry died and took
/// the page relay with it: CRIU's broken lazy dump resumed the source while the destination
/// ran the container too (both memwriters appending to the same file).
#[test]
fn interrupt_after_the_commit_is_not_obeyed_post_copy() {
    let Some((th, w, serve, out)) = signalled_once_serving_pages("mintrlate", libc::SIGINT) else {
        return;
    };
    assert!(
        out.stderr
            .contains("SIGINT arrived after the commit had begun: not stopped"),
        "{out:?}"
    );
    assert_memwriter_migrated(&th, &w, &out, Some("post-copy"), 3);
    assert!(serve.is_alive(), "ferry serve exited");
    th.finish();
}

/// The source's ferry dies (SIGKILL) after a post-copy migration's commit, while the
/// restored memwriter still faults in its pages through it. Pages the destination never got
/// must not turn into zeros there: `ferry serve` freezes the container before CRIU's
/// lazy-pages daemon learns that the stream ended (the daemon's exit would unregister the
/// memory, and the container would read zero-filled pages from then on), kills it and
/// removes it. The memwriter never reports bad memory and never runs in two places; the
/// destination ends clean and `ferry serve` stays up. (The source's CRIU then resumes its
/// tasks or ends them, depending on where its page server was: the container runs on at the
/// source or is lost, post-copy's documented risk.)
#[test]
fn source_killed_mid_post_copy_leaves_no_container_without_its_memory() {
    let Some((th, w, serve, out)) = signalled_once_serving_pages("mpckill", libc::SIGKILL) else {
        return;
    };
    assert_eq!(out.code, None, "ferry migrate was not killed: {out:?}");
    // Its lock file stays (no Drop on SIGKILL), unlocked: the next dump of any container
    // removes it, which `zz_no_leftovers` checks.
    let locks: Vec<String> = fs::read_dir("/run/ferry/locks")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(&format!("-{}", w.id)))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(locks.len(), 1, "the killed ferry's lock file: {locks:?}");
    th.assert_dst_clean(&w.id, DST_CLEAN_T);
    let log = fs::read_to_string(&serve.stderr_path).unwrap_or_default();
    assert!(
        !log.contains("all lazy pages received"),
        "the transfer finished before the kill: nothing was tested\n{log}"
    );
    assert!(
        log.contains("its memory cannot arrive: frozen and removed"),
        "{log}"
    );
    // Whatever still runs (the source, if its CRIU resumed it) writes good lines only,
    // one writer at a time.
    thread::sleep(Duration::from_secs(3));
    assert_memwriter_ok(&w.out);
    eprintln!(
        "source container after the kill: {:?}",
        th.src_runc().status(&w.id)
    );
    assert!(serve.is_alive(), "ferry serve exited");
    th.finish();
}

/// CRIU's lazy-pages daemon on the destination dies (SIGKILL) after a post-copy commit,
/// while pages are still on their way: `ferry serve` kills the container, which would
/// otherwise run on reading zeros where its memory is missing, and removes it; the source's
/// CRIU took the end of the stream for a finished transfer and ended its copy, so `ferry
/// migrate` must not report success: it exits 8 saying the container was lost after the
/// commit. Before, it printed its report and exited 0.
#[test]
fn destination_daemon_killed_mid_post_copy_is_reported_lost() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mlpkill");
    let w = start_memwriter(&th, "", 256, 16);
    let serve = th.serve(&[]);
    let log_path = serve.stderr_path.clone();
    let dst_dir = log_path.parent().unwrap().display().to_string();
    // Once serve has confirmed the commit, its lazy-pages daemon goes.
    let killer = thread::spawn(move || {
        let t0 = Instant::now();
        while t0.elapsed() < slow(T) {
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            if log.contains("migration received; container running") {
                let pattern = format!("criu lazy-pages .*{dst_dir}");
                let st = Command::new("pkill")
                    .args(["-KILL", "-f", &pattern])
                    .status()
                    .expect("pkill");
                return st.success();
            }
            thread::sleep(Duration::from_millis(2));
        }
        false
    });
    let out = th.migrate(&w.id, &serve.addr, &["--mode", "post-copy", "-v"]);
    assert!(
        killer.join().unwrap(),
        "no lazy-pages daemon was killed: {out:?}"
    );
    let log = fs::read_to_string(&serve.stderr_path).unwrap_or_default();
    assert!(
        !log.contains("all lazy pages received"),
        "the transfer finished before the kill: nothing was tested\n{log}"
    );
    let error = out.assert_verbose_error(8).to_string();
    assert!(
        error.contains("the container was lost after the commit")
            && error.contains("memory cannot arrive; it was killed on the destination"),
        "{out:?}"
    );
    assert!(
        log.contains("its memory cannot arrive: killed and removed"),
        "{log}"
    );
    th.assert_dst_clean(&w.id, DST_CLEAN_T);
    assert_memwriter_ok(&w.out);
    assert!(serve.is_alive(), "ferry serve exited");
    th.finish();
}

/// A 256 MiB memwriter migrated post-copy (`-vv`), `signal` sent to `ferry migrate`'s
/// process group once the commit is done and it serves the pages. None without the two-host
/// rig.
fn signalled_once_serving_pages(
    name: &str,
    signal: libc::c_int,
) -> Option<(TwoHosts, Workload, Serve, FerryOut)> {
    if !require_two_hosts() {
        return None;
    }
    let th = TwoHosts::new(name);
    let w = start_memwriter(&th, "", 256, 16);
    let serve = th.serve(&[]);
    let out = th
        .migrate_cmd(&w.id, &serve.addr, &["--mode", "post-copy", "-vv"])
        .run_signalled(signal, |err| err.contains("serving its pages"));
    Some((th, w, serve, out))
}

fn interrupted_in_freeze(name: &str, mode: &str, signal: libc::c_int) {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new(name);
    let w = start_memwriter(&th, "", 256, 16);
    let serve = th.serve(&[]);
    let out = th
        .migrate_cmd(&w.id, &serve.addr, &["--mode", mode, "-vv"])
        .run_signalled(signal, |err| err.contains("container frozen"));
    let error = out.assert_verbose_error(10);
    let name = if signal == libc::SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    };
    assert!(error.contains(&format!("interrupted by {name}")), "{out:?}");
    assert!(
        out.stderr.contains("failing the dump at PostDump"),
        "not stopped at post-dump: {out:?}"
    );
    assert_source_memwriter_healthy(&th, &w);
    th.assert_dst_clean(&w.id, DST_CLEAN_T);
    assert!(serve.is_alive(), "ferry serve exited");
    th.src_runc().kill_and_delete(&w.id);
    th.finish();
}

/// A destination whose runc is of an older minor release than the source's (here a
/// wrapper that reports 1.0.0 and runs the real runc otherwise), or has no runc at all, is
/// refused when the destination prepares, before the source freezes: exit 8 naming both
/// versions (or the missing one), the source never frozen, the destination clean, `ferry
/// serve` up. Without the check both migrations "succeeded": the container was handed to a
/// runc that may not know the state a newer one wrote, or to none (nothing there could stop
/// or delete it).
#[test]
fn a_destination_runc_that_cannot_take_over_is_refused_before_the_freeze() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mruncver");
    let src = th.src_runc();
    let w = start_counter(&th, "");
    let version = Command::new("runc")
        .arg("--version")
        .output()
        .expect("runc --version");
    let theirs = String::from_utf8_lossy(&version.stdout)
        .split_whitespace()
        .nth(2)
        .expect("runc --version names a version")
        .to_string();
    let wrapper = th.dst_runc().path("old-runc");
    fs::write(
        &wrapper,
        "#!/bin/sh\n[ \"$1\" = --version ] && { echo 'runc version 1.0.0'; exit 0; }\nexec runc \"$@\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    for (runc, says) in [
        (
            wrapper.display().to_string(),
            format!("this host's runc 1.0.0 is older than the source's {theirs}"),
        ),
        (
            "/nonexistent/runc".to_string(),
            "this host's runc gives no version".to_string(),
        ),
    ] {
        let serve = th.serve_with_env(&[("FERRY_RUNC", &runc)], &[]);
        let out = th.migrate(&w.id, &serve.addr, &["--mode", "stop-copy", "-v"]);
        let error = out.assert_verbose_error(8).to_string();
        assert!(error.contains(&says), "{out:?}");
        assert_counter_refused_before_the_freeze(&th, &w, &serve, &out);
        drop(serve);
    }
    src.kill_and_delete(&w.id);
    th.finish();
}

/// A container pinned to a CPU the destination cannot give it (here: the destination's
/// cpuset for received containers holds only CPU 0, the container is pinned to CPU 1) is
/// refused when the destination prepares, before the source freezes: exit 8 naming the CPUs,
/// the source never frozen and running on, the destination clean, `ferry serve` up. Without
/// the check the restore's write of `cpuset.cpus` fails after the freeze and the transfer.
#[test]
fn pinned_cpus_the_destination_lacks_are_refused_before_the_freeze() {
    if !require_two_hosts() {
        return;
    }
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    assert!(cpus >= 2, "this test needs 2 CPUs, the machine has {cpus}");
    let th = TwoHosts::new("mcpuset");
    let src = th.src_runc();
    let w = start_counter_shaped(&th, "", |b| {
        b.resources(serde_json::json!({"cpu": {"cpus": "1"}}))
    });
    // The destination's cpuset for received containers: CPU 0 only (as a host reserving
    // CPUs for itself would).
    let state = src.state_file(&w.id);
    assert_eq!(cgroup_value(&state, "cpuset", "cpuset.cpus"), "1");
    let limited = limited_prefix(
        &state,
        "cpuset",
        &[("cpuset.cpus", "0"), ("cpuset.mems", "0")],
    );
    let serve = th.serve(&[]);
    let out = th.migrate(&w.id, &serve.addr, &["--mode", "stop-copy", "-v"]);
    let error = out.assert_verbose_error(8).to_string();
    let says = format!(
        "the container is pinned to CPUs 1 (cpuset.cpus) and this host's cpuset {} has only \
         0: 1 missing",
        limited.path().display()
    );
    assert!(error.contains(&says), "{out:?}");
    assert_counter_refused_before_the_freeze(&th, &w, &serve, &out);
    limited.remove();
    src.kill_and_delete(&w.id);
    th.finish();
}

/// The destination's `--cgroup-prefix` dir in one controller's hierarchy, beside the cgroup
/// of `controller` in the source container's runc `state` (the hosts share cgroupfs), made
/// before `ferry serve` with `files` (limits of its own) written, and removed however the
/// test ends (a failed restore under it cleans up its own dir).
fn limited_prefix(
    state: &serde_json::Value,
    controller: &str,
    files: &[(&str, &str)],
) -> MadeCgroup {
    let own = state["cgroup_paths"][controller]
        .as_str()
        .unwrap_or_else(|| panic!("no {controller} cgroup in {state}"));
    MadeCgroup::make(
        &Path::new(own).parent().unwrap().join(dst_cgroup_prefix()),
        files,
    )
}

/// A memwriter holding 64 MiB is migrated post-copy to a destination whose memory cgroup for
/// received containers (its `--cgroup-prefix` dir) is limited to 32 MiB, as a host keeping
/// memory for itself limits it: refused when the destination prepares, before the source
/// freezes (exit 8, naming the limit), the source running on intact, the destination clean,
/// `ferry serve` up. Without the check the lazy restore succeeds, the source is told to go,
/// and the OOM killer ends the container on the destination as its pages arrive.
#[test]
fn memory_the_destination_has_no_room_for_is_refused_before_the_freeze() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mmemroom");
    let src = th.src_runc();
    let w = start_memwriter(&th, "", 64, 16);
    let limit = (32 * MIB).to_string();
    let limited = limited_prefix(
        &src.state_file(&w.id),
        "memory",
        &[("memory.limit_in_bytes", &limit)],
    );
    let serve = th.serve(&[]);
    let out = th.migrate(&w.id, &serve.addr, &["--mode", "post-copy", "-v"]);
    let error = out.assert_verbose_error(8).to_string();
    eprintln!("refused: {error}");
    let says = format!(
        "of memory and the memory cgroup {} has room for only",
        limited.path().display()
    );
    assert!(
        error.contains("the container holds ")
            && error.contains(&says)
            && error.contains("(memory.limit_in_bytes 32.0 MiB, "),
        "{out:?}"
    );
    assert_refused_before_the_freeze(&th, &w, &serve, &out, assert_source_memwriter_healthy);
    limited.remove();
    src.kill_and_delete(&w.id);
    th.finish();
}

/// Two memwriters holding 64 MiB each are migrated post-copy at the same time to a
/// destination whose memory cgroup for received containers is limited to 100 MiB: room for
/// either, not for both. The first migration is paused (SIGSTOP) once its source froze: the
/// destination gave it room at Prepare, and none of its memory is there yet. The second,
/// migrated meanwhile, is refused at Prepare (exit 8, naming the room the first one claimed),
/// its source running on and the destination clean of it; the first then completes. Without
/// the claim the second is given the same room, and the OOM killer ends a container on the
/// destination once both have their memory there.
#[test]
fn room_given_to_a_migration_under_way_is_not_given_again() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mmemclaim");
    let src = th.src_runc();
    let a = start_memwriter(&th, "a", 64, 16);
    let b = start_memwriter(&th, "b", 64, 16);
    let limit = (100 * MIB).to_string();
    let limited = limited_prefix(
        &src.state_file(&a.id),
        "memory",
        &[("memory.limit_in_bytes", &limit)],
    );
    let serve = th.serve(&[]);
    let mut second = None;
    let out = th
        .migrate_cmd(&a.id, &serve.addr, &["--mode", "post-copy", "-vv"])
        .run_paused(
            |err| err.contains("container frozen"),
            || second = Some(th.migrate(&b.id, &serve.addr, &["--mode", "post-copy", "-v"])),
        );
    let second = second.expect("the second migration ran");
    let error = second.assert_verbose_error(8).to_string();
    eprintln!("refused: {error}");
    let says = format!(
        "the memory cgroup {} has room for only ",
        limited.path().display()
    );
    assert!(
        error.contains(&says) && error.contains("claimed by 1 migration under way)"),
        "{second:?}"
    );
    assert_refused_before_the_freeze(&th, &b, &serve, &second, assert_source_memwriter_healthy);
    assert_memwriter_migrated(&th, &a, &out, Some("post-copy"), 3);
    assert!(serve.is_alive(), "ferry serve exited");
    th.dst_runc().kill_and_delete(&a.id);
    src.kill_and_delete(&b.id);
    limited.remove();
    th.finish();
}

/// A memwriter holding 64 MiB is migrated stop-copy to a `ferry serve` whose work dir is a
/// tmpfs (as Debian's `/run`, where its default work dir is, holds its files in memory) and
/// which runs in a memory cgroup limited to 32 MiB (a service with a memory limit): the
/// dump's pages would be memory charged to that cgroup. Refused when the destination
/// prepares, before the source freezes (exit 8, naming serve's cgroup), the source running
/// on intact, the destination clean, `ferry serve` up. Without the check the dump froze the
/// container and the OOM killer ended `ferry serve` as the pages arrived.
#[test]
fn pages_a_tmpfs_work_dir_has_no_memory_for_are_refused_before_the_freeze() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mtmpfsmem");
    let w = start_memwriter(&th, "", 64, 16);
    let work = th.serve_work();
    let tmpfs = Mounted::tmpfs(&work, "256m");
    // ferry serve's own memory cgroup, beside the container's (the hosts share cgroupfs).
    let state = th.src_runc().state_file(&w.id);
    let own = state["cgroup_paths"]["memory"]
        .as_str()
        .expect("a memory cgroup");
    let limit = (32 * MIB).to_string();
    let cgroup = MadeCgroup::make(
        &Path::new(own)
            .parent()
            .unwrap()
            .join(format!("{}-serve", dst_cgroup_prefix())),
        &[("memory.limit_in_bytes", &limit)],
    );
    let serve = th.serve(&[]);
    fs::write(cgroup.path().join("cgroup.procs"), serve.pid().to_string()).unwrap();
    let out = th.migrate(&w.id, &serve.addr, &["--mode", "stop-copy", "-v"]);
    let error = out.assert_verbose_error(8).to_string();
    eprintln!("refused: {error}");
    let says = format!(
        "a tmpfs (its files are held in memory), and ferry serve's memory cgroup {}, which \
         they are charged to, has room for only ",
        cgroup.path().display()
    );
    assert!(error.contains(&says), "{out:?}");
    drop(tmpfs);
    assert_refused_before_the_freeze(&th, &w, &serve, &out, assert_source_memwriter_healthy);
    drop(serve);
    cgroup.remove();
    th.src_runc().kill_and_delete(&w.id);
    th.finish();
}

/// A memwriter holding 64 MiB is migrated stop-copy to a destination whose work dir (where
/// the dump writes its pages) is on a filesystem with 32 MiB: refused when the destination
/// prepares, before the source freezes (exit 8, naming the work dir), the source running on
/// intact, the destination clean, `ferry serve` up. Without the check the page stream runs
/// out of room during the dump, with the container frozen.
#[test]
fn pages_the_destination_has_no_disk_for_are_refused_before_the_freeze() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mdiskroom");
    let w = start_memwriter(&th, "", 64, 16);
    let work = th.serve_work();
    let small = Mounted::tmpfs(&work, "32m");
    let serve = th.serve(&[]);
    let out = th.migrate(&w.id, &serve.addr, &["--mode", "stop-copy", "-v"]);
    let error = out.assert_verbose_error(8).to_string();
    eprintln!("refused: {error}");
    let says = format!(
        "of memory, which its dump writes into the work dir {}, and that filesystem has room \
         for only ",
        work.display()
    );
    assert!(error.contains(&says), "{out:?}");
    // The small tmpfs is the test's own mount in the destination's dir: gone before the
    // destination is checked for leftovers.
    drop(small);
    assert_refused_before_the_freeze(&th, &w, &serve, &out, assert_source_memwriter_healthy);
    th.src_runc().kill_and_delete(&w.id);
    th.finish();
}

/// The destination's bundles dir and work dir on one filesystem (a 72 MiB tmpfs), a 64 MiB
/// memwriter whose rootfs holds 16 MiB more: its pages fit there, and its rootfs, but not
/// both. Refused when the destination compares the rootfs, before the source freezes (exit
/// 8, naming the bundles dir and the room kept for the pages), the source running on intact,
/// the destination clean. Without the check the rootfs went in while the container ran and
/// the dump then ran out of room with the container frozen.
#[test]
fn rootfs_and_pages_the_destination_has_no_room_for_are_refused_before_the_freeze() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mrootroom");
    let w = start_memwriter(&th, "", 64, 16);
    fs::write(w.bundle.join("rootfs/blob"), vec![7u8; 16 << 20]).unwrap();
    let dst = th.dst_runc();
    let shared = dst.mkdir("shared-fs");
    let tmpfs = Mounted::tmpfs(&shared, "72m");
    for d in ["bundles", "work"] {
        fs::create_dir(shared.join(d)).unwrap();
    }
    let bundles = Mounted::bind(&shared.join("bundles"), &dst.bundles);
    let work = Mounted::bind(&shared.join("work"), &th.serve_work());
    let serve = th.serve(&[]);
    let out = th.migrate(&w.id, &serve.addr, &["--mode", "stop-copy", "-v"]);
    let error = out.assert_verbose_error(8).to_string();
    eprintln!("refused: {error}");
    assert!(
        error.contains("the container's rootfs files to copy take 1"),
        "{out:?}"
    );
    let says = format!(
        "and the filesystem of the bundles dir {} has room for only ",
        dst.bundles.display()
    );
    assert!(error.contains(&says), "{out:?}");
    assert!(
        error.contains(
            "of it kept for the page images still to come into the work dir on the same filesystem"
        ),
        "{out:?}"
    );
    drop((work, bundles, tmpfs));
    assert_refused_before_the_freeze(&th, &w, &serve, &out, assert_source_memwriter_healthy);
    th.src_runc().kill_and_delete(&w.id);
    th.finish();
}

/// The container has a bind mount whose host source is renamed away while the migration
/// runs, after the destination prepared (and found it) and before it restores (the running
/// container keeps its mount): the destination's restore fails (exit 8). The source keeps
/// running, the destination is clean, and once the source directory is back a retry to the
/// same `ferry serve` succeeds.
#[test]
fn restore_fails_on_destination() {
    restore_fails_on_destination_in("mrestfail", "stop-copy");
}

/// The same in post-copy, where the restore fails while the source's CRIU already serves
/// lazy pages: the source must resume at once, not when some relay times out.
#[test]
fn restore_fails_on_destination_post_copy() {
    restore_fails_on_destination_in("mrestfailpc", "post-copy");
}

fn restore_fails_on_destination_in(name: &str, mode: &str) {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new(name);
    let src = th.src_runc();
    let extra = src.mkdir("extra");
    fs::write(extra.join("hello"), "hello\n").unwrap();
    let w = start_counter_shaped(&th, "", |b| b.bind(&extra, "/extra"));
    let id = w.id.clone();
    add_rootfs_ballast(&w);
    let moved = src.path("extra.moved");

    let serve = th.serve(&[]);
    let t0 = Instant::now();
    let out = migrate_with_fault(&th, &id, &serve.addr, mode, || {
        fs::rename(&extra, &moved).unwrap()
    });
    eprintln!("failed {mode} migration took {:?}", t0.elapsed());
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "the source stayed frozen {:?} after the destination's restore failed",
        t0.elapsed()
    );
    // Gone from the host, still mounted in the resumed container.
    let cat = must(src.exec(&id, &["cat", "/extra/hello"]), "cat /extra/hello");
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "hello\n");
    assert_counter_not_migrated(&th, &w, &out, &[8], DST_CLEAN_T);
    assert!(
        serve.is_alive(),
        "ferry serve exited after a failed migration"
    );

    // Retry with the source directory back in place.
    fs::rename(&moved, &extra).unwrap();
    let out = th.migrate(&id, &serve.addr, &["--mode", mode]);
    assert_counter_migrated(&th, &w, &out, Some(mode), 20);
    th.dst_runc().kill_and_delete(&id);
    th.finish();
}

/// `ferry serve` is SIGKILLed while memory crosses the link: `ferry migrate` fails, the
/// source memwriter resumes intact, nothing is left on the destination, and a retry to a
/// fresh `ferry serve` succeeds.
#[test]
fn serve_killed_mid_transfer() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mkill");
    let w = start_memwriter(&th, "", 256, 16);
    let serve = th.serve(&[]);
    let out = migrate_with_fault(&th, &w.id, &serve.addr, "stop-copy", || serve.kill_hard());
    // Network failure, the destination failing, or CRIU failing because its page
    // connection broke: all say the migration did not happen.
    assert_memwriter_not_migrated(&th, &w, &out, &[6, 8, 9], DST_CLEAN_T);

    let serve2 = th.serve(&[]);
    let out = th.migrate(&w.id, &serve2.addr, &["--mode", "stop-copy"]);
    assert_memwriter_migrated(&th, &w, &out, Some("stop-copy"), 10);
    th.dst_runc().kill_and_delete(&w.id);
    th.finish();
}

/// The link dies while memory crosses it and stays down: `ferry migrate` notices (within
/// the rig's 180 s limit) and fails, the source memwriter resumes intact, the destination
/// cleans up by itself; with the link back, a retry to the same `ferry serve` succeeds.
#[test]
fn link_cut_during_dump() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mlink");
    let w = start_memwriter(&th, "", 256, 16);
    let serve = th.serve(&[]);
    let t0 = Instant::now();
    let out = migrate_with_fault(&th, &w.id, &serve.addr, "stop-copy", || th.cut_link());
    eprintln!("failed migration took {:?}", t0.elapsed());
    assert_memwriter_not_migrated(&th, &w, &out, &[6, 8, 9], DST_CLEAN_DEAD_LINK_T);
    assert!(serve.is_alive(), "ferry serve exited after losing a peer");

    th.restore_link();
    let out = th.migrate(&w.id, &serve.addr, &["--mode", "stop-copy"]);
    assert_memwriter_migrated(&th, &w, &out, Some("stop-copy"), 10);
    th.dst_runc().kill_and_delete(&w.id);
    th.finish();
}

/// Frame header of the control channel (src/migrate/wire.rs): `FY`, u16 kind, u32 payload
/// length, big endian.
/// The destination commits (the container runs there) but its confirmation never reaches
/// the source: the source cannot know which side runs the container, so it keeps its copy
/// paused rather than risk two, says so in one line (exit 9, network), and the destination's
/// copy runs on. The operator's resolution, deleting the paused source, then works.
#[test]
fn commit_confirmation_lost_leaves_the_source_paused() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mamb");
    let w = start_counter(&th, "");
    let serve = th.serve_with_env(&[("FERRY_TEST_FAULT", "drop-committed")], &[]);
    let out = th.migrate(&w.id, &serve.addr, &["--mode", "stop-copy"]);
    assert_failed_with(&out, &[9]);
    assert!(
        out.stderr.contains("paused"),
        "the error does not say the source is left paused: {out:?}"
    );
    assert_eq!(
        th.src_runc().status(&w.id).as_deref(),
        Some("paused"),
        "the source copy must stay paused when the outcome is unknown"
    );
    th.dst_runc().wait_status(&w.id, "running", slow(T));
    // Only the destination's copy writes: the shared counter file goes on unbroken.
    let n = read_counter_lines(&w.out).len();
    assert_counter_continues(&w.out, n, 10);
    assert_eq!(th.src_runc().status(&w.id).as_deref(), Some("paused"));
    must(
        th.src_runc().delete(&w.id, true),
        "runc delete -f (paused source)",
    );
    let n = read_counter_lines(&w.out).len();
    assert_counter_continues(&w.out, n, 5);
    assert!(serve.is_alive(), "ferry serve exited");
    th.dst_runc().kill_and_delete(&w.id);
    th.finish();
}

fn frame_header(kind: u16, len: u32) -> Vec<u8> {
    let mut h = b"FY".to_vec();
    h.extend_from_slice(&kind.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h
}

/// Send `bytes` (the server may close early: write errors are fine) and wait for the server
/// to close the connection; panics if it is still open after 10 s.
#[track_caller]
fn send_and_expect_close(mut c: TcpStream, bytes: &[u8], what: &str) {
    let _ = c.write_all(bytes);
    let _ = c.flush();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {} // e.g. an Error frame before closing
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("ferry serve kept the connection open 10 s after {what}")
            }
            Err(_) => return, // reset
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "ferry serve kept talking 10 s after {what}"
        );
    }
}

/// Garbage and frames claiming ~4 GiB payloads on the serve port: each connection is
/// dropped, `ferry serve` neither dies nor allocates the claimed size, a connection left
/// hanging mid-frame does not block it, and a real migration afterwards succeeds.
#[test]
fn garbage_and_oversized_frames() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mgarbage");
    let w = start_counter(&th, "");
    let serve = th.serve(&[]);

    // Random bytes.
    let hex = random_hex(32 * 1024);
    let garbage: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    send_and_expect_close(
        th.connect_from_src(&serve.addr),
        &garbage,
        "64 KiB of garbage",
    );
    // Printable garbage, as a confused HTTP client would send.
    send_and_expect_close(
        th.connect_from_src(&serve.addr),
        b"GET / HTTP/1.1\r\nHost: 192.0.2.2\r\n\r\n",
        "an HTTP request",
    );
    // Headers claiming 4 GiB - 1 payloads: as the first frame (Hello), as a file chunk and
    // with an unknown kind; each followed by some payload bytes.
    for (kind, what) in [(1u16, "Hello"), (10, "Chunk"), (0xfff0, "unknown kind")] {
        let mut f = frame_header(kind, u32::MAX);
        f.extend_from_slice(&garbage[..4096]);
        send_and_expect_close(
            th.connect_from_src(&serve.addr),
            &f,
            &format!("a 4 GiB {what} frame header"),
        );
    }
    // A header as a framing with a u64 length would write it for a 4 GiB payload; read as
    // ferry's framing it is a 1-byte Hello that is no valid message.
    let mut f = b"FY".to_vec();
    f.extend_from_slice(&1u16.to_be_bytes());
    f.extend_from_slice(&(4u64 << 30).to_be_bytes());
    send_and_expect_close(
        th.connect_from_src(&serve.addr),
        &f,
        "a u64-length 4 GiB header",
    );

    // Left hanging: a header of a frame just over the 16 MiB cap with no payload, and a
    // connection that never says anything. Neither may block the real migration.
    let mut hanging1 = th.connect_from_src(&serve.addr);
    hanging1
        .write_all(&frame_header(1, 16 * 1024 * 1024 + 1))
        .unwrap();
    let hanging2 = th.connect_from_src(&serve.addr);

    assert!(serve.is_alive(), "ferry serve died from garbage");
    let hwm = serve.vm_hwm_kib().expect("VmHWM of ferry serve");
    assert!(
        hwm < 256 * 1024,
        "ferry serve's peak RSS is {} MiB after oversized frames",
        hwm / 1024
    );

    let out = th.migrate(&w.id, &serve.addr, &[]);
    assert_counter_migrated(&th, &w, &out, None, 20);
    assert!(serve.is_alive());
    drop((hanging1, hanging2));
    th.dst_runc().kill_and_delete(&w.id);
    th.finish();
}

/// Whether the peer closed `c` (end of stream or reset) within `wait`.
fn closed_within(c: &mut TcpStream, wait: Duration) -> bool {
    c.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Peers that connect and never authenticate cannot pile up in `ferry serve`: with
/// `MAX_HANDSHAKES` of them open, one more is closed as it arrives; each is closed once
/// `HANDSHAKE_DEADLINE` has passed; serve stays up and a real migration then goes through.
#[test]
fn idle_peers_are_bounded() {
    use ferry::migrate::destination::{HANDSHAKE_DEADLINE, MAX_HANDSHAKES};
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("midle");
    let w = start_counter(&th, "");
    let serve = th.serve(&[]);
    let t0 = Instant::now();
    let mut idle: Vec<TcpStream> = (0..MAX_HANDSHAKES)
        .map(|_| th.connect_from_src(&serve.addr))
        .collect();
    // Once serve has taken them all in, a further connection is closed at once (one that
    // came in before may take a free place: then it is one more idle peer, and the next
    // try is the one over the bound).
    let mut extra = Vec::new();
    wait_for(T, "a connection over the bound closed at once", || {
        let mut c = th.connect_from_src(&serve.addr);
        let closed = closed_within(&mut c, Duration::from_millis(500));
        extra.push(c);
        closed
    });
    if t0.elapsed() < HANDSHAKE_DEADLINE / 2 {
        assert!(
            !closed_within(&mut idle[0], Duration::from_millis(100)),
            "an idle peer was closed long before the handshake deadline"
        );
    }
    assert!(serve.is_alive(), "ferry serve died");
    // Every idle peer is gone after the deadline (with a wide margin for a slow machine).
    let end = t0 + HANDSHAKE_DEADLINE + slow(T);
    for (i, c) in idle.iter_mut().enumerate() {
        let left = end
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        assert!(
            closed_within(c, left),
            "idle peer {i} still open after {:?}",
            t0.elapsed()
        );
    }
    eprintln!("idle peers closed {:?} after they connected", t0.elapsed());
    let out = th.migrate(&w.id, &serve.addr, &[]);
    assert_counter_migrated(&th, &w, &out, None, 20);
    assert!(serve.is_alive());
    drop(extra);
    th.dst_runc().kill_and_delete(&w.id);
    th.finish();
}

// ---------------------------------------------------------------------------------------
// Last: nothing left behind by this test binary
// ---------------------------------------------------------------------------------------

#[test]
fn zz_no_leftovers() {
    if !require_two_hosts() {
        return;
    }
    assert_no_leftovers();
}

/// SIGTERM to `ferry serve` during a migration: it stops accepting but lets the migration
/// under way finish (instead of dying with CRIU half way), then exits by itself.
#[test]
fn serve_drains_a_migration_on_sigterm() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mdrain");
    let w = start_memwriter(&th, "", 256, 16);
    let serve = th.serve(&[]);
    let pid = serve.pid();
    let addr = serve.addr.clone();
    let m = thread::scope(|sc| {
        let h = sc.spawn(|| th.migrate(&w.id, &addr, &["--mode", "stop-copy"]));
        thread::sleep(Duration::from_millis(300));
        // SAFETY: kill(2) on serve's pid; the Serve handle has not reaped it (it is running).
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
        h.join().unwrap()
    });
    let v = migrate_json(&m, Some("stop-copy"));
    assert_migrated(&th, &w.id, &v);
    let started = Instant::now();
    while serve.is_alive() && started.elapsed() < Duration::from_secs(30) {
        thread::sleep(Duration::from_millis(50));
    }
    assert!(!serve.is_alive(), "ferry serve did not exit after draining");
    let n = read_memwriter_lines(&w.out).len();
    assert_memwriter_continues(&w.out, n, 3);
    th.dst_runc().kill_and_delete(&w.id);
    // `ferry serve` exited while the container it received still lived in its --cgroup-prefix
    // dirs, so it could not remove them; now that runc deleted the container they are empty.
    remove_empty_prefix_dirs();
    th.finish();
}

/// The rootfs moves while the container writes to it: files created, appended to and
/// deleted between the sync while running and the freeze arrive with the final delta (both
/// sides re-read only what changed since the first round). The workload appends every value
/// to /var/w/acc, writes each value to its own file and deletes it five values later, except
/// every tenth, which it keeps. On the destination, paused right after the migration: acc is
/// 1, 2, …, N without a gap, every kept file up to N is there with its value, and no other
/// file older than N-5 is left.
#[test]
fn rootfs_changes_while_running_arrive_with_the_final_delta() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("rootfsdelta");
    let src = th.src_runc();
    let id = src.id("");
    let data = src.mkdir("data");
    let script = "mkdir -p /var/w; i=0; while true; do i=$((i+1)); echo $i >> /var/w/acc; \
                  echo $i > /var/w/f$i; j=$((i-5)); [ $((j % 10)) -eq 0 ] || rm -f /var/w/f$j; \
                  echo $i >> /data/counter; sleep 0.05; done";
    let bundle = src
        .bundle("rootfsdelta")
        .bind(&data, "/data")
        .args(&["sh", "-c", script])
        .build();
    src.run_detached(&id, &bundle, Out::Null);
    let out = data.join("counter");
    wait_counter_lines(&out, 30, slow(T));

    let serve = th.serve(&[]);
    let migrated = th.migrate(&id, &serve.addr, &["--mode", "stop-copy"]);
    let v = migrate_json(&migrated, Some("stop-copy"));
    assert_migrated(&th, &id, &v);
    let dst = th.dst_runc();
    dst.pause(&id);

    let w = th.dst_bundle(&id).join("rootfs/var/w");
    let acc: Vec<u64> = fs::read_to_string(w.join("acc"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let n = *acc.last().expect("acc is empty");
    assert_eq!(
        acc,
        (1..=n).collect::<Vec<_>>(),
        "acc on the destination has a gap or a repeat"
    );
    let assert_kept = |k: u64| {
        let f = w.join(format!("f{k}"));
        assert_eq!(
            fs::read_to_string(&f).map(|s| s.trim().to_string()).ok(),
            Some(k.to_string()),
            "kept file {} missing or wrong on the destination",
            f.display()
        );
    };
    // The shell writes f<i> after appending i to acc and before appending it to
    // /data/counter: when the freeze came between the two, the last value's file is still
    // being written (its open was dumped, its write runs after the restore) and the pause
    // may come first. That one is checked below, once the counter shows it was finished.
    let finished = read_counter_lines(&out).last().copied().unwrap_or(0);
    let last_done = if finished >= n { n } else { n - 1 };
    for k in (10..=last_done).step_by(10) {
        assert_kept(k);
    }
    for e in fs::read_dir(&w).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(k) = name.strip_prefix('f').and_then(|k| k.parse::<u64>().ok()) else {
            continue;
        };
        assert!(
            k % 10 == 0 || k + 5 >= n,
            "{name} should have been deleted (last value {n}) on the destination"
        );
    }
    if last_done < n {
        dst.resume(&id);
        wait_counter_lines(&out, n as usize, slow(T));
        if n % 10 == 0 {
            assert_kept(n);
        }
    }
    eprintln!("rootfs on the destination: acc 1..{n}, kept files and deletions as on the source");
    dst.kill_and_delete(&id);
    th.finish();
}

/// A file the container deleted but keeps open, over CRIU's 1 MiB ghost limit: the final
/// dump fails, the line says what to do (exit 6, CRIU), the source counts on and the
/// destination is clean; a retry with `--ghost-limit` migrates it and the restored process
/// still reads the file's content.
#[test]
fn a_deleted_open_file_over_the_ghost_limit_needs_the_flag() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mghost");
    let w = start_counter_shaped(&th, "", |b| {
        b.args(&ghost_counter_args("/data/counter", 2048))
    });
    let serve = th.serve(&[]);
    let out = th.migrate(&w.id, &serve.addr, &["--mode", "post-copy"]);
    assert!(
        out.stderr.contains("Can't dump ghost file")
            && out.stderr.contains("--ghost-limit raises it"),
        "{out:?}"
    );
    assert_counter_not_migrated(&th, &w, &out, &[6], DST_CLEAN_T);
    assert!(
        serve.is_alive(),
        "ferry serve exited after a failed migration"
    );

    let out = th.migrate(
        &w.id,
        &serve.addr,
        &["--mode", "post-copy", "--ghost-limit", "4M"],
    );
    assert_counter_migrated(&th, &w, &out, Some("post-copy"), 20);
    assert_ghost_kept(th.dst_runc(), &w.id);
    th.dst_runc().kill_and_delete(&w.id);
    th.finish();
}

/// The destination fails to write one of the final dump's images (injected: as a full disk
/// would), after the source's CRIU was told to go on. Both modes fail at once with exit 8
/// naming the file, the source counting on, the destination clean and `ferry serve` up.
/// Before, a post-copy migration hung: the relay gave up connecting to CRIU's lazy page
/// server once the migration had failed, and CRIU, which started listening just after,
/// waited in accept for ever with the container frozen.
#[test]
fn an_image_the_destination_cannot_write_fails_the_migration_at_once() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mimgfail");
    let w = start_counter(&th, "");
    let serve = th.serve_with_env(&[("FERRY_TEST_FAULT", "fail-image")], &[]);
    for mode in ["post-copy", "stop-copy"] {
        let t0 = Instant::now();
        let out = th.migrate(&w.id, &serve.addr, &["--mode", mode]);
        eprintln!("failed {mode} migration took {:?}", t0.elapsed());
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{mode}: the source stayed frozen {:?} after the destination failed",
            t0.elapsed()
        );
        assert!(
            out.stderr.contains("writing ")
                && out
                    .stderr
                    .contains("injected fault (FERRY_TEST_FAULT=fail-image)"),
            "{mode}: {out:?}"
        );
        assert_counter_not_migrated(&th, &w, &out, &[8], DST_CLEAN_T);
        assert!(
            serve.is_alive(),
            "ferry serve exited after a failed migration"
        );
    }
    th.src_runc().kill_and_delete(&w.id);
    th.finish();
}

/// A 3 MiB deleted-but-open file, allowed by `--ghost-limit 4M`, and a destination whose
/// work dir (a 2 MiB tmpfs) cannot take the copy of it that the dump writes, even in
/// post-copy, whose pages never go there. Refused when the destination prepares, before
/// the source freezes (exit 8, naming the deleted files and the work dir), the source
/// counting on, the destination clean. Before, the dump failed during the freeze.
#[test]
fn deleted_files_the_destination_has_no_room_for_are_refused_before_the_freeze() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mghostroom");
    let w = start_counter_shaped(&th, "", |b| {
        b.args(&ghost_counter_args("/data/counter", 3072))
    });
    let work = th.serve_work();
    let small = Mounted::tmpfs(&work, "2m");
    let serve = th.serve(&[]);
    let out = th.migrate(
        &w.id,
        &serve.addr,
        &["--mode", "post-copy", "--ghost-limit", "4M", "-v"],
    );
    let error = out.assert_verbose_error(8).to_string();
    eprintln!("refused: {error}");
    let says = format!(
        "the container keeps 3.0 MiB of deleted files open, which its dump copies into the \
         work dir {}, and that filesystem has room for only ",
        work.display()
    );
    assert!(error.contains(&says), "{out:?}");
    drop(small);
    assert_refused_before_the_freeze(&th, &w, &serve, &out, assert_source_counter_healthy);
    th.src_runc().kill_and_delete(&w.id);
    th.finish();
}

/// A container whose processes talk through a named pipe in its rootfs (mkfifo at run
/// time, one writer, one reader), in both modes: the pipe's node arrives with the rootfs,
/// CRIU reopens both ends on the destination, and the reader goes on receiving. Before, the
/// rootfs sync left named pipes out, and the restore failed with "Can't open file tmp/f".
#[test]
fn a_named_pipe_in_the_rootfs_keeps_working() {
    if !require_two_hosts() {
        return;
    }
    for mode in ["stop-copy", "post-copy"] {
        let th = TwoHosts::new(&format!("mfifo{}", &mode[..4]));
        let script = "mkfifo /tmp/f; (i=0; while true; do i=$((i+1)); echo $i; sleep 0.05; done \
                      > /tmp/f) & (cat /tmp/f > /data/piped) & \
                      i=0; while true; do i=$((i+1)); echo $i >> /data/counter; sleep 0.05; done";
        let w = start_counter_shaped(&th, "", |b| b.args(&["sh", "-c", script]));
        let piped = w.out.with_file_name("piped");
        let serve = th.serve(&[]);
        let out = th.migrate(&w.id, &serve.addr, &["--mode", mode]);
        assert_counter_migrated(&th, &w, &out, Some(mode), 20);
        // The reader, restored on the destination, still gets what the writer sends.
        let n = read_counter_lines(&piped).len();
        assert_counter_continues(&piped, n, 10);
        th.dst_runc().kill_and_delete(&w.id);
        th.finish();
    }
}

/// Files in the rootfs owned by users other than root (a database's data directory, say)
/// keep their owner, group and mode on the destination, set-user-ID bit included. Before,
/// the destination made every file it copied root's, so a process running as the file's
/// user could no longer write there after the migration.
#[test]
fn rootfs_owners_arrive() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mowner");
    let w = start_counter(&th, "");
    let root = w.bundle.join("rootfs");
    fs::create_dir_all(root.join("home/app")).unwrap();
    fs::write(root.join("home/app/file"), "x").unwrap();
    std::os::unix::fs::lchown(root.join("home/app"), Some(1000), Some(1001)).unwrap();
    std::os::unix::fs::lchown(root.join("home/app/file"), Some(999), Some(998)).unwrap();
    fs::set_permissions(
        root.join("home/app/file"),
        std::os::unix::fs::PermissionsExt::from_mode(0o4750),
    )
    .unwrap();
    let serve = th.serve(&[]);
    let out = th.migrate(&w.id, &serve.addr, &["--mode", "stop-copy"]);
    assert_counter_migrated(&th, &w, &out, Some("stop-copy"), 20);
    let st = must(
        th.dst_runc().exec(
            &w.id,
            &["stat", "-c", "%n %u:%g %a", "/home/app", "/home/app/file"],
        ),
        "stat",
    );
    assert_eq!(
        String::from_utf8_lossy(&st.stdout),
        "/home/app 1000:1001 755\n/home/app/file 999:998 4750\n"
    );
    th.dst_runc().kill_and_delete(&w.id);
    th.finish();
}

/// The rootfs arrives with its modification times (file, directory, symlink), a file's
/// second name as a hard link (one inode, not two copies) and extended attributes: a user
/// one, and a file capability on a file owned by another user (the change of owner on the
/// destination clears capabilities; they are set after it). Before, every copied file took
/// the time of the copy, links became copies and attributes were dropped, so a binary
/// granted `cap_net_raw` lost it.
#[test]
fn rootfs_times_links_and_xattrs_arrive() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mmeta");
    let w = start_counter(&th, "");
    let root = w.bundle.join("rootfs");
    fs::create_dir_all(root.join("srv/d")).unwrap();
    fs::write(root.join("srv/d/a"), "hello").unwrap();
    fs::hard_link(root.join("srv/d/a"), root.join("srv/b")).unwrap();
    std::os::unix::fs::symlink("d/a", root.join("srv/l")).unwrap();
    std::os::unix::fs::lchown(root.join("srv/d/a"), Some(1000), Some(1000)).unwrap();
    // cap_net_raw+ep (VFS_CAP_REVISION_2)
    let mut cap = vec![0u8; 20];
    cap[0..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
    cap[4..8].copy_from_slice(&(1u32 << 13).to_le_bytes());
    let want = [
        ("user.origin", b"src".to_vec()),
        ("security.capability", cap),
    ];
    for (name, value) in &want {
        set_xattr(&root.join("srv/d/a"), name, value);
    }
    for (p, when) in [
        ("srv/l", "2001-02-03 04:05:06"),
        ("srv/d/a", "2002-02-03 04:05:06"),
        ("srv/d", "2003-02-03 04:05:06"),
    ] {
        must(
            run_output(
                Command::new("touch")
                    .args(["-h", "-d", when])
                    .arg(root.join(p)),
            ),
            "touch",
        );
    }
    let stat = |r: &Runc| {
        let out = must(
            r.exec(
                &w.id,
                &[
                    "stat",
                    "-c",
                    "%n %Y %h %u %i",
                    "/srv/d",
                    "/srv/d/a",
                    "/srv/b",
                    "/srv/l",
                ],
            ),
            "stat",
        );
        let lines: Vec<Vec<String>> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split(' ').map(str::to_string).collect())
            .collect();
        assert_eq!(lines.len(), 4, "{lines:?}");
        lines
    };
    let before = stat(th.src_runc());
    let serve = th.serve(&[]);
    let out = th.migrate(&w.id, &serve.addr, &["--mode", "stop-copy"]);
    assert_counter_migrated(&th, &w, &out, Some("stop-copy"), 20);
    let after = stat(th.dst_runc());
    let without_inode = |l: &[Vec<String>]| l.iter().map(|f| f[..4].join(" ")).collect::<Vec<_>>();
    assert_eq!(without_inode(&after), without_inode(&before));
    assert_eq!(after[1][2], "2", "two names: {after:?}");
    assert_eq!(after[1][4], after[2][4], "one inode: {after:?}");
    let file = th.dst_bundle(&w.id).join("rootfs/srv/d/a");
    for (name, value) in &want {
        assert_eq!(
            get_xattr(&file, name).as_deref(),
            Some(&value[..]),
            "{name}"
        );
    }
    th.dst_runc().kill_and_delete(&w.id);
    th.finish();
}

/// A rootfs of many files with long paths: its listing, and the first round's answer naming
/// every file, are larger than one frame (16 MiB). Before, the destination's answer could
/// not be sent and the migration failed on "frame too large".
#[test]
fn a_rootfs_listing_larger_than_one_frame_migrates() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mlong");
    let w = start_counter(&th, "");
    let mut dir = w.bundle.join("rootfs/srv");
    for i in 0..3 {
        dir.push(format!("{i}{}", "d".repeat(240)));
    }
    fs::create_dir_all(&dir).unwrap();
    const FILES: usize = 20_000;
    for i in 0..FILES {
        fs::write(
            dir.join(format!("{i:05}{}", "f".repeat(230))),
            i.to_string(),
        )
        .unwrap();
    }
    let serve = th.serve(&[]);
    let out = th.migrate(&w.id, &serve.addr, &["--mode", "stop-copy"]);
    assert_counter_migrated(&th, &w, &out, Some("stop-copy"), 20);
    let sent = out.json()["rootfs_files_sent"].as_u64().unwrap();
    assert!(sent >= FILES as u64, "{sent} files sent");
    let dst = th
        .dst_bundle(&w.id)
        .join("rootfs")
        .join(dir.strip_prefix(w.bundle.join("rootfs")).unwrap());
    assert_eq!(fs::read_dir(&dst).unwrap().count(), FILES);
    let last = format!("{:05}{}", FILES - 1, "f".repeat(230));
    assert_eq!(
        fs::read_to_string(dst.join(last)).unwrap(),
        (FILES - 1).to_string()
    );
    th.dst_runc().kill_and_delete(&w.id);
    th.finish();
}

/// A server listening on a Unix socket in the rootfs (a database's, say), in both modes:
/// ferry's sync does not copy socket nodes, CRIU binds the socket again on the destination,
/// and a new client there is served as one was on the source.
#[test]
fn a_unix_socket_server_in_the_rootfs_keeps_serving() {
    if !require_two_hosts() {
        return;
    }
    for mode in ["stop-copy", "post-copy"] {
        let th = TwoHosts::new(&format!("munix{}", &mode[..4]));
        let script = "mkdir -p /srv; /bin/netserver 7000 /data/netlog /srv/sock & \
                      i=0; while true; do i=$((i+1)); echo $i >> /data/counter; sleep 0.05; done";
        let w = start_counter_shaped(&th, "", |b| {
            b.with_binary(&common::net::netserver_bin(), "netserver")
                .args(&["sh", "-c", script])
        });
        let ask = |root: &Path| {
            let p = root.join("srv/sock");
            let mut s = std::os::unix::net::UnixStream::connect(&p)
                .unwrap_or_else(|e| panic!("connect {}: {e}", p.display()));
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"c 1\n").unwrap();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"s 1\n");
        };
        // The server binds once the container runs; the client is gone before the dump (a
        // connection from outside the container is not the container's to move).
        let sock = w.bundle.join("rootfs/srv/sock");
        wait_for(slow(T), "the unix socket", || sock.exists());
        let log = w.data.join("netlog");
        let before = common::net::server_log(&log).len();
        ask(&w.bundle.join("rootfs"));
        wait_for(slow(T), "the client gone", || {
            let l = common::net::server_log(&log);
            l.len() >= before + 2 && l.last().is_some_and(|e| e.1 == 0 && e.2 == 0)
        });
        let serve = th.serve(&[]);
        let out = th.migrate(&w.id, &serve.addr, &["--mode", mode]);
        assert_counter_migrated(&th, &w, &out, Some(mode), 20);
        ask(&th.dst_bundle(&w.id).join("rootfs"));
        th.dst_runc().kill_and_delete(&w.id);
        th.finish();
    }
}

/// A sparse file in the rootfs (a `lastlog` after a user with a large uid logged in, a
/// database's or disk image's preallocated file): 8 GiB long, a few bytes of data. Its
/// holes cross as holes: the destination's copy has the same content and length and takes
/// almost no disk. Before, ferry read, hashed, sent and wrote all 8 GiB of zeros (61 s
/// here), the copy took 8 GiB of disk, and the room check counted it all.
#[test]
fn a_sparse_file_arrives_sparse() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("msparse");
    let w = start_counter(&th, "");
    const LEN: u64 = 8 << 30;
    let marks = [(4096u64, b"head"), (3 << 30, b"midl"), (LEN - 4, b"tail")];
    let f = fs::File::create(w.bundle.join("rootfs/lastlog")).unwrap();
    f.set_len(LEN).unwrap();
    for (at, what) in marks {
        std::os::unix::fs::FileExt::write_at(&f, what, at).unwrap();
    }
    drop(f);
    let serve = th.serve(&[]);
    let out = th.migrate(&w.id, &serve.addr, &["--mode", "stop-copy"]);
    assert_counter_migrated(&th, &w, &out, Some("stop-copy"), 20);
    let copy = fs::File::open(th.dst_bundle(&w.id).join("rootfs/lastlog")).unwrap();
    let m = copy.metadata().unwrap();
    assert_eq!(m.len(), LEN);
    let on_disk = std::os::unix::fs::MetadataExt::blocks(&m) * 512;
    assert!(on_disk < 1 << 20, "the copy takes {on_disk} bytes of disk");
    for (at, what) in marks {
        let mut got = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&copy, &mut got, at).unwrap();
        assert_eq!(&got, what, "at {at}");
    }
    let mut zeros = [1u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(&copy, &mut zeros, 5 << 30).unwrap();
    assert!(zeros.iter().all(|&b| b == 0));
    th.dst_runc().kill_and_delete(&w.id);
    th.finish();
}

/// `ferry checkpoint` of `w` on the source (through `prefix`, a wrapper command) into a
/// fresh images dir, which must hold no images afterwards (a refusal before the freeze).
fn local_checkpoint(th: &TwoHosts, w: &Workload, prefix: &[&str]) -> FerryOut {
    let images = th.src_runc().path("images");
    let root = th.src_runc().root.display().to_string();
    let dir = images.display().to_string();
    let args = [
        "checkpoint",
        &w.id,
        "--images",
        &dir,
        "--runtime-root",
        &root,
    ];
    let out = ferry_cmd(&args).prefix(prefix).run();
    assert!(
        !images.join("inventory.img").exists(),
        "images written: {out:?}"
    );
    out
}

/// Whether this process has CAP_SYS_RESOURCE in its effective set.
fn have_cap_sys_resource() -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff in /proc/self/status");
    u64::from_str_radix(eff.trim(), 16).unwrap() & (1 << 24) != 0
}

/// A container whose processes run as another user (uid 1000), dumped by a ferry without
/// CAP_SYS_RESOURCE (a restricted service unit or container; `setpriv` drops it here): CRIU
/// could not read the processes' resource limits and the dump failed once the container was
/// frozen ("Can't get rlimit 0: Operation not permitted", exit 6). Now refused before the
/// freeze with a message naming the capability (exit 5), by `ferry migrate` and `ferry
/// checkpoint` alike; the counter goes on at the source. Where this machine grants the
/// capability, the container then migrates with it.
#[test]
fn another_users_container_without_cap_sys_resource_is_refused_before_the_freeze() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mrlim");
    let w = start_counter_shaped(&th, "", |b| {
        std::os::unix::fs::chown(th.src_runc().path("data"), Some(1000), Some(1000)).unwrap();
        b.edit(|spec| spec["process"]["user"] = serde_json::json!({"uid": 1000, "gid": 1000}))
    });
    let drop_cap = ["setpriv", "--bounding-set", "-sys_resource", "--"];
    let serve = th.serve(&[]);
    let mut prefix = TwoHosts::netns_prefix(&th.src_ns);
    prefix.extend(drop_cap.iter().map(|a| a.to_string()));
    let out = th
        .migrate_cmd(&w.id, &serve.addr, &["--mode", "stop-copy"])
        .prefix(&prefix)
        .run();
    let msg = out.assert_error(5).stderr.clone();
    assert!(
        msg.contains("as uid 1000 gid 1000") && msg.contains("lacks CAP_SYS_RESOURCE"),
        "{msg}"
    );
    assert_counter_refused_before_the_freeze(&th, &w, &serve, &out);

    let out = local_checkpoint(&th, &w, &drop_cap);
    let msg = out.assert_error(5).stderr.clone();
    assert!(msg.contains("lacks CAP_SYS_RESOURCE"), "{msg}");
    assert_source_counter_healthy(&th, &w);

    if have_cap_sys_resource() {
        let out = th.migrate(&w.id, &serve.addr, &["--mode", "stop-copy"]);
        assert_counter_migrated(&th, &w, &out, Some("stop-copy"), 20);
        th.dst_runc().kill_and_delete(&w.id);
    } else {
        eprintln!("note: this machine grants no CAP_SYS_RESOURCE (not in the bounding set): the migration with it is not tried");
    }
    th.finish();
}

/// A container confined as Docker confines one keeps its confinement on the destination, in
/// both host modes: supplementary groups, umask, fewer capabilities (ambient ones too), no
/// new privileges, a seccomp filter, resource limits and an OOM score are the same on the
/// restored init (as the host sees them in /proc), and what it wrote into a tmpfs /tmp and
/// /dev/shm (memory the rootfs sync cannot see; CRIU's images carry it) is there.
#[test]
fn a_confined_container_stays_confined() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mconf");
    for mode in ["stop-copy", "post-copy"] {
        let w = start_counter_shaped(&th, mode, |b| {
            b.edit(|spec| {
                let p = &mut spec["process"];
                p["user"] =
                    serde_json::json!({"uid": 0, "gid": 0, "additionalGids": [5, 6], "umask": 23});
                p["noNewPrivileges"] = serde_json::Value::Bool(true);
                p["oomScoreAdj"] = serde_json::Value::from(345);
                p["cwd"] = serde_json::Value::from("/tmp");
                p["rlimits"] = serde_json::json!([
                    {"type": "RLIMIT_NOFILE", "hard": 777, "soft": 555},
                    {"type": "RLIMIT_NPROC", "hard": 333, "soft": 222}
                ]);
                let caps = serde_json::json!(["CAP_NET_BIND_SERVICE", "CAP_CHOWN"]);
                p["capabilities"] = serde_json::json!({
                    "bounding": caps, "effective": caps, "permitted": caps,
                    "inheritable": caps, "ambient": caps
                });
                spec["linux"]["seccomp"] = serde_json::json!({
                    "defaultAction": "SCMP_ACT_ALLOW",
                    "architectures": ["SCMP_ARCH_X86_64"],
                    "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]
                });
                spec["mounts"]
                    .as_array_mut()
                    .unwrap()
                    .push(serde_json::json!({
                        "destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                        "options": ["nosuid", "nodev", "mode=1777", "size=8m"]
                    }));
            })
        });
        let src = th.src_runc();
        for (f, text) in [("/tmp/note", "in tmp"), ("/dev/shm/note", "in shm")] {
            must(
                run_output(src.cmd().args([
                    "exec",
                    "--user",
                    "0:0",
                    &w.id,
                    "sh",
                    "-c",
                    &format!("echo '{text}' > {f}"),
                ])),
                "write",
            );
        }
        let facts = |pid: u64| {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let mut v: Vec<String> = status
                .lines()
                .filter(|l| {
                    [
                        "Umask",
                        "Uid",
                        "Gid",
                        "Groups",
                        "Cap",
                        "NoNewPrivs",
                        "Seccomp",
                    ]
                    .iter()
                    .any(|k| l.starts_with(k))
                })
                .map(str::to_string)
                .collect();
            v.push(fs::read_to_string(format!("/proc/{pid}/limits")).unwrap());
            v.push(fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap());
            v
        };
        let before = facts(src.state(&w.id)["pid"].as_u64().unwrap());
        let serve = th.serve(&[]);
        let out = th.migrate(&w.id, &serve.addr, &["--mode", mode]);
        let v = assert_counter_migrated(&th, &w, &out, Some(mode), 20);
        let after = facts(v["restored_pid"].as_u64().unwrap());
        assert_eq!(after, before, "{mode}");
        let dst = th.dst_runc();
        for (f, text) in [("/tmp/note", "in tmp"), ("/dev/shm/note", "in shm")] {
            let o = must(dst.exec(&w.id, &["cat", f]), "cat");
            assert_eq!(
                String::from_utf8_lossy(&o.stdout).trim(),
                text,
                "{mode} {f}"
            );
        }
        let o = dst.exec(&w.id, &["mkdir", "/tmp/x"]);
        assert!(!o.status.success(), "{mode}: mkdir allowed: {o:?}");
        dst.kill_and_delete(&w.id);
        drop(serve);
    }
    th.finish();
}

/// The counter, run by `locker hold KIND PATH`: it holds a file lock of that kind all along.
fn start_locked_counter(th: &TwoHosts, kind: &str, path: &str) -> Workload {
    let (kind, path) = (kind.to_string(), path.to_string());
    start_counter_shaped(th, &kind.clone(), move |b| {
        let mut args: Vec<String> = ["locker", "hold", &kind, &path]
            .iter()
            .map(|a| a.to_string())
            .collect();
        args.extend(counter_file_args("/data/counter"));
        b.with_binary(&locker_bin(), "locker").args(&args)
    })
}

/// What `locker test KIND PATH` says in the container `id` of `rc`: "held" or "free".
fn lock_state(rc: &Runc, id: &str, kind: &str, path: &str) -> String {
    let out = must(rc.exec(id, &["locker", "test", kind, path]), "locker test");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A container holding a file lock (flock, POSIX, OFD: what databases, JVMs and etcd take).
/// Before, its dump failed once frozen ("Some file locks are hold by dumping tasks! You can
/// try --file-locks"), a flag `ferry migrate` did not have. Without `--file-locks` it is now
/// refused before the freeze (exit 4) naming the process, the kind and the file, by `ferry
/// migrate` and `ferry checkpoint`; with it, it migrates and the restored process holds the
/// lock on the destination's copy of the file (another process there finds it held).
#[test]
fn file_locks_migrate_with_the_flag_and_are_refused_before_the_freeze_without() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mlock");
    let serve = th.serve(&[]);
    for (kind, name, mode) in [
        ("flock", "FLOCK", "stop-copy"),
        ("posix", "POSIX", "post-copy"),
        ("ofd", "OFDLCK", "stop-copy"),
    ] {
        let w = start_locked_counter(&th, kind, "/tmp/app.lock");
        assert_eq!(
            lock_state(th.src_runc(), &w.id, kind, "/tmp/app.lock"),
            "held"
        );
        let out = th.migrate(&w.id, &serve.addr, &["--mode", mode]);
        let msg = out.assert_error(4).stderr.clone();
        for want in ["holds a file lock", name, "/tmp/app.lock", "--file-locks"] {
            assert!(msg.contains(want), "{want:?} in {msg}");
        }
        assert_counter_refused_before_the_freeze(&th, &w, &serve, &out);
        if kind == "flock" {
            let out = local_checkpoint(&th, &w, &[]);
            assert!(
                out.assert_error(4).stderr.contains("--file-locks"),
                "{out:?}"
            );
            assert_source_counter_healthy(&th, &w);
        }
        let out = th.migrate(&w.id, &serve.addr, &["--mode", mode, "--file-locks"]);
        assert_counter_migrated(&th, &w, &out, Some(mode), 20);
        assert_eq!(
            lock_state(th.dst_runc(), &w.id, kind, "/tmp/app.lock"),
            "held",
            "{kind} on the destination"
        );
        th.dst_runc().kill_and_delete(&w.id);
    }
    th.finish();
}

/// A lock on a file the hosts share (a bind mount from one path on both, as network storage
/// is): the frozen source still holds it when the destination's restore would take it again,
/// and the restore waited for it with the source frozen (the migration hung for CRIU's
/// timeout, minutes). The destination now tests each lock on a bind-mounted file at Prepare
/// and refuses (exit 8) before the freeze; the counter goes on at the source.
#[test]
fn a_lock_on_a_file_both_hosts_share_is_refused_before_the_freeze() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mlocksh");
    let serve = th.serve(&[]);
    for (kind, name) in [("flock", "FLOCK"), ("posix", "POSIX")] {
        let w = start_locked_counter(&th, kind, "/data/app.lock");
        let out = th.migrate(&w.id, &serve.addr, &["--mode", "stop-copy", "--file-locks"]);
        let msg = out.assert_error(8).stderr.clone();
        let want = format!("{name} lock on /data/app.lock cannot be taken on the destination");
        assert!(msg.contains(&want), "{want:?} in {msg}");
        assert_counter_refused_before_the_freeze(&th, &w, &serve, &out);
        th.src_runc().kill_and_delete(&w.id);
    }
    th.finish();
}

/// A container with a process stopped by a signal (job control, a supervisor's SIGSTOP).
/// CRIU's seize of a stopped task in a frozen cgroup waits until it is continued: the dump
/// hung, the source frozen, until CRIU's timeout (`runc checkpoint` too). Now refused before
/// the freeze (exit 7) naming the process, by `ferry migrate` and `ferry checkpoint`; once
/// the process is continued, the container migrates.
#[test]
fn a_stopped_process_is_refused_before_the_freeze() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mstop");
    let w = start_counter_shaped(&th, "", |b| {
        let script = format!(
            "sleep 100000 & kill -STOP $! ; {}",
            counter_file_args("/data/counter")[2]
        );
        b.args(&["sh", "-c", &script])
    });
    let serve = th.serve(&[]);
    let out = th.migrate(&w.id, &serve.addr, &["--mode", "stop-copy"]);
    let msg = out.assert_error(7).stderr.clone();
    assert!(
        msg.contains("is stopped by a signal: continue it first"),
        "{msg}"
    );
    assert_counter_refused_before_the_freeze(&th, &w, &serve, &out);
    assert!(local_checkpoint(&th, &w, &[])
        .assert_error(7)
        .stderr
        .contains("stopped by a signal"));
    assert_source_counter_healthy(&th, &w);

    // Every process but the init (and the kill itself).
    must(
        th.src_runc().exec(&w.id, &["kill", "-CONT", "-1"]),
        "kill -CONT -1",
    );
    let out = th.migrate(&w.id, &serve.addr, &["--mode", "stop-copy"]);
    assert_counter_migrated(&th, &w, &out, Some("stop-copy"), 20);
    th.dst_runc().kill_and_delete(&w.id);
    th.finish();
}

/// A process that runs an event loop as servers do — worker threads, SysV shared memory,
/// an eventfd, a 5 ms periodic timer fd, a signalfd, all under epoll — keeps counting after
/// a migration in both host modes, checking each of them every round (a failed check
/// writes a line that is not the next number). Its timer has expirations pending at the
/// dump whenever the freeze is longer than its period, and CRIU restored such a timer
/// disarmed: the loop stopped for good after the pending expirations. ferry re-arms it in
/// files.img before the restore.
#[test]
fn an_event_loop_keeps_running_after_the_migration() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("mevloop");
    let serve = th.serve(&[]);
    for mode in ["stop-copy", "post-copy"] {
        let w = start_counter_shaped(&th, mode, |b| {
            b.with_binary(&eventloop_bin(), "eventloop")
                .args(&["eventloop", "/data/counter"])
        });
        let out = th.migrate(&w.id, &serve.addr, &["--mode", mode]);
        assert_counter_migrated(&th, &w, &out, Some(mode), 20);
        th.dst_runc().kill_and_delete(&w.id);
    }
    th.finish();
}
