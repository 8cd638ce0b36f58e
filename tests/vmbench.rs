//! The migration benchmark for kernels with dirty-memory tracking, run inside the VM rig:
//! `tests/vm/run --bench` (never part of the test suite: it only measures and prints).
//!
//! Same shape as benches/migrate.sh on the host: memwriter containers of each size and dirty
//! rate migrated between the two emulated hosts with every mode, and with the baseline users
//! know from `docker checkpoint` (runc checkpoint to disk, the images copied over one TCP
//! connection across the veth, runc restore). Each row: downtime, total time and bytes sent,
//! as ratios to the baseline of the same size and rate. Pre-copy runs with ferry's adaptive
//! rounds policy and with the anchors' fixed rules (P.Haul's thresholds; one round, as
//! go-criu's phaul does in practice), so the policies are compared on the same workloads in
//! one run. Under TCG everything is slow: only ratios within one run mean anything.
//!
//! Environment: FERRY_BENCH_SIZES (MiB, default "64 256"), FERRY_BENCH_RATES (MiB/s,
//! default "16"), FERRY_BENCH_REPEAT (default 1), FERRY_BENCH_MODES (names from the table,
//! default all; the baseline always runs).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Instant;

use common::migration::*;
use common::vm;
use common::*;

fn env_list(name: &str, default: &str) -> Vec<u32> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect()
}

#[derive(Debug, Clone, Default)]
struct Row {
    downtime_ms: u64,
    total_ms: u64,
    bytes: u64,
    rounds: Vec<u64>,
    note: String,
}

/// Sends every file of `dir` (flat, as runc's images are) as name, length, bytes.
fn send_dir(mut s: TcpStream, dir: &Path) -> u64 {
    let mut sent = 0;
    for e in fs::read_dir(dir).unwrap().flatten() {
        if !e.file_type().unwrap().is_file() {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        let data = fs::read(e.path()).unwrap();
        s.write_all(&(name.len() as u32).to_be_bytes()).unwrap();
        s.write_all(name.as_bytes()).unwrap();
        s.write_all(&(data.len() as u64).to_be_bytes()).unwrap();
        s.write_all(&data).unwrap();
        sent += data.len() as u64 + name.len() as u64 + 12;
    }
    sent
}

fn recv_dir(l: TcpListener, dir: &Path) {
    let (mut s, _) = l.accept().unwrap();
    fs::create_dir_all(dir).unwrap();
    loop {
        let mut n = [0u8; 4];
        if s.read_exact(&mut n).is_err() {
            return;
        }
        let mut name = vec![0u8; u32::from_be_bytes(n).min(4096) as usize];
        s.read_exact(&mut name).unwrap();
        let mut len = [0u8; 8];
        s.read_exact(&mut len).unwrap();
        let mut data = vec![0u8; u64::from_be_bytes(len) as usize];
        s.read_exact(&mut data).unwrap();
        fs::write(dir.join(String::from_utf8_lossy(&name).as_ref()), data).unwrap();
    }
}

/// runc checkpoint → copy across the veth → runc restore on the destination host.
fn baseline(th: &TwoHosts, w: &Workload) -> Row {
    let src_img = th.src_runc().mkdir(&format!("base-img-{}", w.id));
    let dst_img = th.dst_runc().mkdir(&format!("base-img-dst-{}", w.id));
    let start = Instant::now();
    must(
        th.src_runc().checkpoint(&w.id, &src_img, &[]),
        "runc checkpoint",
    );
    let checkpointed = start.elapsed();
    let listener = in_netns(&th.dst_ns, || {
        TcpListener::bind(format!("{DST_IP}:0")).unwrap()
    });
    let addr = listener.local_addr().unwrap();
    let bytes = std::thread::scope(|sc| {
        let r = sc.spawn(|| recv_dir(listener, &dst_img));
        let sent = in_netns(&th.src_ns, || {
            send_dir(TcpStream::connect(addr).unwrap(), &src_img)
        });
        r.join().unwrap();
        sent
    });
    let copied = start.elapsed();
    must(
        th.dst_runc()
            .restore_detached(&w.id, &w.bundle, &dst_img, Out::Null),
        "runc restore (destination)",
    );
    let total = start.elapsed().as_millis() as u64;
    Row {
        downtime_ms: total,
        total_ms: total,
        bytes,
        rounds: vec![],
        note: format!(
            "checkpoint {} / copy {} / restore {} ms",
            checkpointed.as_millis(),
            (copied - checkpointed).as_millis(),
            total - copied.as_millis() as u64
        ),
    }
}

fn ferry_run(th: &TwoHosts, w: &Workload, addr: &str, args: &[&str]) -> Row {
    let out = th.migrate(&w.id, addr, args);
    let v = migrate_json(&out, None);
    let rounds: Vec<u64> = v["rounds"]
        .as_array()
        .map(|a| a.iter().map(|r| json_u64(r, "pages_written")).collect())
        .unwrap_or_default();
    Row {
        downtime_ms: json_u64(&v, "downtime_ms"),
        total_ms: json_u64(&v, "total_ms"),
        bytes: json_u64(&v, "bytes_sent"),
        rounds,
        note: v["rounds_reason"].as_str().unwrap_or("").to_string(),
    }
}

/// A line of the result table: printed, and reported to the VM rig's summary.
fn out(line: String) {
    println!("{line}");
    if vm::in_vm() {
        vm::report(&line);
    }
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

#[test]
#[ignore = "benchmark: run by tests/vm/run --bench"]
fn bench_modes_and_policies() {
    require_two_hosts();
    let sizes = env_list("FERRY_BENCH_SIZES", "64 256");
    let rates = env_list("FERRY_BENCH_RATES", "16");
    let repeat = env_list("FERRY_BENCH_REPEAT", "1")
        .first()
        .copied()
        .unwrap_or(1);
    let modes: &[(&str, &[&str])] = &[
        ("baseline", &[]),
        ("stop-copy", &["--mode", "stop-copy"]),
        ("pre-copy", &["--mode", "pre-copy"]),
        (
            "pre-copy/p.haul",
            &["--mode", "pre-copy", "--rounds-policy", "p.haul"],
        ),
        (
            "pre-copy/1-round",
            &["--mode", "pre-copy", "--rounds-policy", "one-round"],
        ),
        ("hybrid", &["--mode", "hybrid"]),
        ("post-copy", &["--mode", "post-copy"]),
    ];
    let only: Option<Vec<String>> = std::env::var("FERRY_BENCH_MODES")
        .ok()
        .map(|m| m.split_whitespace().map(String::from).collect());
    let selected = |name: &str| {
        name == "baseline" || only.as_ref().is_none_or(|o| o.iter().any(|x| x == name))
    };
    let th = TwoHosts::new("vbench");
    let serve = th.serve(&[]);
    let mut results: BTreeMap<(u32, u32, usize), Vec<Row>> = BTreeMap::new();
    let mut n = 0;
    for &mib in &sizes {
        for &rate in &rates {
            for rep in 0..repeat {
                for (mi, (name, args)) in modes.iter().enumerate() {
                    if !selected(name) {
                        continue;
                    }
                    n += 1;
                    let w = start_memwriter(&th, &format!("b{n}"), mib, rate);
                    let t = Instant::now();
                    let row = if *name == "baseline" {
                        baseline(&th, &w)
                    } else {
                        ferry_run(&th, &w, &serve.addr, args)
                    };
                    let have = read_memwriter_lines(&w.out).len();
                    assert_memwriter_continues(&w.out, have, 2);
                    eprintln!(
                        "{mib} MiB {rate} MiB/s {name} #{rep}: downtime {} ms total {} ms bytes {} rounds {:?} ({}) [{:?}]",
                        row.downtime_ms, row.total_ms, row.bytes, row.rounds, row.note, t.elapsed()
                    );
                    th.dst_runc().kill_and_delete(&w.id);
                    results.entry((mib, rate, mi)).or_default().push(row);
                }
            }
        }
    }
    let rss = |mib: u32| u64::from(mib) << 20;
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    out(format!(
        "\nmigration benchmark on kernel {} ({}; ratios within this run only), medians of {repeat} run(s)",
        kernel.trim(),
        if std::env::var_os("FERRY_IN_VM").is_some() { "VM rig, software-emulated CPU" } else { "host" }
    ));
    out(format!(
        "{:>5} {:>5} {:<17} {:>11} {:>9} {:>9} {:>9} {:>10} {:>10}  rounds (pages written) / note",
        "MiB",
        "MiB/s",
        "mode",
        "downtime_ms",
        "total_ms",
        "bytes_MiB",
        "down/base",
        "total/base",
        "bytes/RSS"
    ));
    let mut best: BTreeMap<(u32, u32), (String, f64)> = BTreeMap::new();
    for &mib in &sizes {
        for &rate in &rates {
            let base = &results[&(mib, rate, 0)];
            let bd = median(base.iter().map(|r| r.downtime_ms).collect()).max(1) as f64;
            let bt = median(base.iter().map(|r| r.total_ms).collect()).max(1) as f64;
            for (mi, (name, _)) in modes.iter().enumerate() {
                let Some(rows) = results.get(&(mib, rate, mi)) else {
                    continue;
                };
                let d = median(rows.iter().map(|r| r.downtime_ms).collect());
                let t = median(rows.iter().map(|r| r.total_ms).collect());
                let b = median(rows.iter().map(|r| r.bytes).collect());
                let last = rows.last().cloned().unwrap_or_default();
                out(format!(
                    "{mib:>5} {rate:>5} {name:<17} {d:>11} {t:>9} {:>9.1} {:>9.3} {:>10.3} {:>10.3}  {:?} {}",
                    b as f64 / (1 << 20) as f64,
                    d as f64 / bd,
                    t as f64 / bt,
                    b as f64 / rss(mib) as f64,
                    last.rounds,
                    last.note
                ));
                if mi > 0 {
                    let e = best
                        .entry((mib, rate))
                        .or_insert((name.to_string(), f64::MAX));
                    if (d as f64 / bd) < e.1 {
                        *e = (name.to_string(), d as f64 / bd);
                    }
                }
            }
        }
    }
    out("\nTargets (from the migration issue, measured in this run):".to_string());
    for ((mib, rate), (name, ratio)) in &best {
        out(format!(
            "  [{}] best-mode downtime <= 0.05x baseline at {mib} MiB, {rate} MiB/s: {name} {ratio:.3}x",
            if *ratio <= 0.05 { "PASS" } else { "FAIL" }
        ));
    }
    for &mib in &sizes {
        if let Some(rows) = results.get(&(mib, 16, 2)) {
            let b = median(rows.iter().map(|r| r.bytes).collect()) as f64 / rss(mib) as f64;
            out(format!(
                "  [{}] pre-copy bytes sent <= 1.2x RSS at {mib} MiB, 16 MiB/s: {b:.3}x",
                if b <= 1.2 { "PASS" } else { "FAIL" }
            ));
        }
    }
    out(
        "\nRounds policies (pre-copy): downtime / total, adaptive vs the anchors' rules:"
            .to_string(),
    );
    for &mib in &sizes {
        for &rate in &rates {
            let get = |mi: usize| {
                let rows = results.get(&(mib, rate, mi)).cloned().unwrap_or_default();
                (
                    median(rows.iter().map(|r| r.downtime_ms).collect()),
                    median(rows.iter().map(|r| r.total_ms).collect()),
                )
            };
            let (a, p, o) = (get(2), get(3), get(4));
            if !results.contains_key(&(mib, rate, 2)) {
                continue;
            }
            out(format!(
                "  {mib} MiB {rate} MiB/s: adaptive {}/{} ms, p.haul {}/{} ms, one-round {}/{} ms",
                a.0, a.1, p.0, p.1, o.0, o.1
            ));
        }
    }
    th.finish();
}
