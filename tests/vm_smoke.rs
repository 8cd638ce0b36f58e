//! Smoke tests of the VM rig (`tests/vm/run`): they run inside a guest whose kernel tracks
//! dirty memory (CONFIG_MEM_SOFT_DIRTY) and prove that what the pre-copy tests need works
//! there: `ferry check` reports memory tracking, CRIU's own pre-dump → dump → restore
//! cycle works, and live migrations between the two emulated hosts (network namespaces,
//! runc, cgroups v1; stop-copy, and post-copy for userfaultfd) work as on the host.
//!
//! Ignored in a plain `cargo test`: the rig runs them in the guest with `--ignored`, `CI`
//! set (missing prerequisites fail, never skip), `FERRY_IN_VM=1`, `FERRY_MEMWRITER` (the
//! guest has no gcc) and `FERRY_VM_QUICK=1` for `--quick` (smaller workloads). Run them
//! with `--test-threads=1` (leak checks look at global state; `zz_no_leftovers` is last).

mod common;

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::migration::*;
use common::vm::{self, where_hint};
use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// Things that take well under a second on the host take several under emulation.
const T: Duration = Duration::from_secs(60);
/// memwriter fills and checks all its memory for every line: slow under emulation.
const MEM_T: Duration = Duration::from_secs(240);

/// Workload size for the memory tests: 64 MiB with `--quick`, else 256 MiB.
fn mem_mib() -> u32 {
    if vm::quick() {
        64
    } else {
        256
    }
}

// ---------------------------------------------------------------------------------------
// 1. ferry check: dirty memory tracking is there
// ---------------------------------------------------------------------------------------

#[test]
#[ignore = "runs inside the VM rig (tests/vm/run)"]
fn check_reports_mem_track() {
    if !require_root_and_criu() {
        return;
    }
    let out = ferry(&["check", "--json"]);
    eprintln!("ferry check --json: {}", out.stdout.trim());
    out.ok();
    let v = out.json();
    let features = &v["features"];
    eprintln!(
        "kernel {}: mem_track={} lazy_pages={} pidfd_store={} warnings={}",
        v["kernel"],
        features["mem_track"],
        features["lazy_pages"],
        features["pidfd_store"],
        v["warnings"]
    );
    assert_eq!(v["ok"], Value::Bool(true), "ferry check is not ok: {v}");
    assert_eq!(
        features["mem_track"],
        Value::Bool(true),
        "mem_track is not true: no dirty memory tracking{}: {v}",
        where_hint()
    );
    assert!(
        features["lazy_pages"].is_boolean(),
        "lazy_pages is not reported: {v}"
    );
}

// ---------------------------------------------------------------------------------------
// 2. CRIU alone: pre-dump with memory tracking, then a dump on top of it, then restore
// ---------------------------------------------------------------------------------------

/// CRIU's `--display-stats` value `<label>: <n> (0x..)` or `<label>: <n> us`.
fn criu_stat(stdout: &str, label: &str) -> u64 {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(label)?.strip_prefix(':'))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {label:?} in CRIU's stats:\n{stdout}"))
}

/// Run criu with `args` in `dir`, to completion; panics (with its log) if it fails.
fn criu(dir: &Path, args: &[&str], log: &str) -> (String, Duration) {
    let start = Instant::now();
    let out = run_output(
        Command::new("criu")
            .args(args)
            .args(["-o", log, "-v4", "--display-stats"])
            .current_dir(dir),
    );
    let took = start.elapsed();
    if !out.status.success() {
        let log_text = fs::read_to_string(dir.join(log)).unwrap_or_default();
        let tail: Vec<&str> = log_text.lines().rev().take(40).collect();
        panic!(
            "criu {args:?} failed ({}){}:\nstdout: {}\nstderr: {}\nlog tail:\n{}",
            out.status,
            where_hint(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    (String::from_utf8_lossy(&out.stdout).into_owned(), took)
}

/// Wait for `pid` (a child of this process) to exit, up to `timeout`.
fn reap(pid: i32, timeout: Duration) -> bool {
    wait_for_quiet(timeout, || {
        let mut status = 0;
        // SAFETY: waitpid on a pid of our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        r == pid || r == -1
    })
}

/// memwriter (a plain process, no container) is pre-dumped with `--track-mem`, keeps
/// running and dirtying memory, then is dumped with `--track-mem --prev-images-dir`: the
/// dump writes only the pages dirtied since (soft-dirty tracking works) and the restore
/// from both image sets gives memwriter its memory back intact (its own checks stay ok and
/// its sequence continues).
#[test]
#[ignore = "runs inside the VM rig (tests/vm/run)"]
fn criu_pre_dump_then_dump_and_restore() {
    if !require_two_hosts() {
        return;
    }
    let known = global_leak_findings();
    let work = PathBuf::from(WORK_BASE).join(format!("criupre-{}", std::process::id()));
    safe_remove_dir_all(&work);
    let (d1, d2) = (work.join("d1"), work.join("d2"));
    fs::create_dir_all(&d1).unwrap();
    fs::create_dir_all(&d2).unwrap();
    let log = work.join("mem.log");
    let mib = mem_mib();
    // 4 MiB/s dirtied: a small fraction of the memory between pre-dump and dump.
    let mut cmd = Command::new(memwriter_bin());
    cmd.args([&mib.to_string(), "4", s(&log)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .current_dir(&work);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent. A session
    // of its own: CRIU dumps a tree whose session and group lie inside it (no --shell-job).
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn memwriter");
    let pid = child.id().to_string();
    wait_memwriter_lines(&log, 2, MEM_T);
    assert_memwriter_ok(&log);

    let (pre, pre_t) = criu(
        &d1,
        &["pre-dump", "-t", &pid, "-D", ".", "--track-mem"],
        "pre-dump.log",
    );
    let pre_written = criu_stat(&pre, "Memory pages written");
    eprintln!("pre-dump ({mib} MiB) took {pre_t:?}:\n{pre}");
    assert!(
        pre_written >= u64::from(mib) * 256,
        "pre-dump wrote {pre_written} pages, fewer than memwriter's {mib} MiB:\n{pre}"
    );
    // Still running after the pre-dump, still healthy.
    let n = read_memwriter_lines(&log).len();
    wait_memwriter_lines(&log, n + 2, MEM_T);
    assert_memwriter_ok(&log);

    let (dump, dump_t) = criu(
        &d2,
        &[
            "dump",
            "-t",
            &pid,
            "-D",
            ".",
            "--track-mem",
            "--prev-images-dir",
            "../d1",
        ],
        "dump.log",
    );
    eprintln!("dump on top of the pre-dump took {dump_t:?}:\n{dump}");
    let scanned = criu_stat(&dump, "Memory pages scanned");
    let skipped = criu_stat(&dump, "Memory pages skipped from parent");
    let written = criu_stat(&dump, "Memory pages written");
    assert!(
        skipped > 0 && written < scanned / 2,
        "the dump did not build on the pre-dump (scanned {scanned}, skipped from parent \
         {skipped}, written {written}): soft-dirty tracking does not work{}",
        where_hint()
    );
    let status = child.wait().expect("reap the dumped memwriter");
    eprintln!("dumped memwriter ended: {status}");
    let n = read_memwriter_lines(&log).len();

    let pidfile = work.join("restored.pid");
    let (rst, rst_t) = criu(
        &d2,
        &[
            "restore",
            "-D",
            ".",
            "-d",
            "--restore-sibling",
            "--pidfile",
            s(&pidfile),
        ],
        "restore.log",
    );
    eprintln!("restore took {rst_t:?}:\n{rst}");
    let rpid: i32 = fs::read_to_string(&pidfile)
        .expect("restore pidfile")
        .trim()
        .parse()
        .expect("pid in the pidfile");
    assert_eq!(rpid.to_string(), pid, "restored under another pid");
    // The restored memwriter keeps going: memory intact, seq continuing.
    wait_memwriter_lines(&log, n + 3, MEM_T);
    let lines = assert_memwriter_ok(&log);
    eprintln!(
        "restored memwriter: {} lines, last {:?}",
        lines.len(),
        lines.last().map(|l| &l.raw)
    );
    // SAFETY: kill(2) on the restored memwriter, our child (restored as our sibling's
    // sibling, i.e. a child of this process), not reaped yet.
    unsafe {
        libc::kill(rpid, libc::SIGKILL);
    }
    assert!(reap(rpid, T), "restored memwriter {rpid} did not exit");
    vm::report(&format!(
        "criu alone, memwriter {mib} MiB dirtying 4 MiB/s: pre-dump {:.1}s ({pre_written} \
         pages), dump on it {:.1}s ({written} of {scanned} pages written, {skipped} from \
         the parent), restore {:.1}s",
        pre_t.as_secs_f64(),
        dump_t.as_secs_f64(),
        rst_t.as_secs_f64()
    ));
    safe_remove_dir_all(&work);
    leak_check_except(&[], &known);
}

// ---------------------------------------------------------------------------------------
// 3. A live migration between the two emulated hosts, as on the host
// ---------------------------------------------------------------------------------------

/// Print how fast the migration moved memory (for sizing the pre-copy tests).
fn measure(what: &str, v: &Value) {
    let bytes = json_u64(v, "bytes_sent");
    let total = json_u64(v, "total_ms").max(1);
    vm::report(&format!(
        "{what}: {:.1} MiB sent in {} ms ({:.1} MiB/s over the whole migration), frozen {} \
         ms, downtime {} ms",
        bytes as f64 / MIB as f64,
        total,
        bytes as f64 / MIB as f64 / (total as f64 / 1000.0),
        json_u64(v, "frozen_ms"),
        json_u64(v, "downtime_ms")
    ));
    for (i, r) in v["rounds"].as_array().into_iter().flatten().enumerate() {
        if json_u64(r, "pages_written") == 0 {
            continue; // post-copy: the pages follow after the restore
        }
        let (b, ms) = (json_u64(r, "bytes"), json_u64(r, "ms").max(1));
        vm::report(&format!(
            "{what}: page round {}: {:.1} MiB in {ms} ms ({:.1} MiB/s), {} pages written",
            i + 1,
            b as f64 / MIB as f64,
            b as f64 / MIB as f64 / (ms as f64 / 1000.0),
            json_u64(r, "pages_written")
        ));
    }
}

/// The busybox counter (tests/migrate.rs's stop-copy test): migrated with `--mode
/// stop-copy`, it keeps counting on the destination without a gap. Proves runc, cgroups,
/// network namespaces, the veth and ferry in the guest.
#[test]
#[ignore = "runs inside the VM rig (tests/vm/run)"]
fn migrate_counter_stop_copy() {
    if !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("vmcstop");
    let v = migrate_counter(&th, "stop-copy");
    measure("stop-copy counter", &v);
    th.finish();
}

/// Post-copy of a memwriter (64 MiB, 16 MiB/s dirtied): proves userfaultfd and CRIU's lazy
/// pages in the guest (hybrid mode needs them); its memory checks stay ok on the
/// destination. Reports the timings.
#[test]
#[ignore = "runs inside the VM rig (tests/vm/run)"]
fn migrate_memwriter_post_copy() {
    if !require_two_hosts() {
        return;
    }
    let mib = 64;
    let th = TwoHosts::new("vmmpost");
    let w = start_memwriter(&th, "", mib, 16);
    let serve = th.serve(&[]);
    let out = th.migrate(&w.id, &serve.addr, &["--mode", "post-copy"]);
    let v = migrate_json(&out, Some("post-copy"));
    eprintln!("migrate: {v}");
    measure(&format!("post-copy memwriter {mib} MiB"), &v);
    assert_migrated(&th, &w.id, &v);
    // The first full check after the restore pulls in every remaining page.
    let n = read_memwriter_lines(&w.out).len();
    let t = Instant::now();
    assert_memwriter_continues(&w.out, n, 3);
    vm::report(&format!(
        "post-copy memwriter {mib} MiB: 3 ok check lines on the destination {:.1}s after the \
         migration",
        t.elapsed().as_secs_f64()
    ));
    th.dst_runc().kill_and_delete(&w.id);
    th.finish();
}

#[test]
#[ignore = "runs inside the VM rig (tests/vm/run)"]
fn zz_no_leftovers() {
    if !require_two_hosts() {
        return;
    }
    assert_no_leftovers();
}
