//! Migration test helpers shared by tests/migrate.rs (host) and tests/vm_*.rs (VM rig):
//! workloads on the source host and the checks on a migration's result.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

/// Generous timeout for things that normally take well under a second.
pub const T: Duration = Duration::from_secs(20);
/// memwriter with 256 MiB needs a moment to fill its memory and to check it.
pub const MEM_T: Duration = Duration::from_secs(60);
pub const MIB: u64 = 1 << 20;

pub const MIGRATE_FIELDS: &[&str] = &[
    "paused",
    "mode",
    "mode_reason",
    "rounds",
    "frozen_ms",
    "downtime_ms",
    "total_ms",
    "bytes_sent",
    "restored_pid",
    "tcp_connections",
    "tcp_closed",
    "netns_removed",
];

pub const ROUND_FIELDS: &[&str] = &["pages_scanned", "pages_written", "bytes", "ms"];

// ---------------------------------------------------------------------------------------
// Workloads on the source host
// ---------------------------------------------------------------------------------------

/// A container on the source host writing to a file in a bind-mounted host directory (the
/// same path on both hosts). stdio is /dev/null: CRIU cannot dump a container whose stdout
/// is a regular host file.
#[allow(dead_code)]
pub struct Workload {
    pub id: String,
    /// Host path of the output file.
    pub out: PathBuf,
    /// Host directory bind-mounted at /data.
    pub data: PathBuf,
    pub bundle: PathBuf,
}

/// The network sysctl the counter is created with (Docker's default for every container),
/// which CRIU alone would not bring back.
pub const COUNTER_SYSCTL: (&str, &str) = ("net.ipv4.ip_unprivileged_port_start", "0");

/// Counter appending 1, 2, 3, … to /data/counter every 50 ms (with [`COUNTER_SYSCTL`] and
/// the limits of [`test_limits`]).
pub fn start_counter(th: &TwoHosts, suffix: &str) -> Workload {
    start_counter_with(th, suffix, &[])
}

/// [`start_counter`] with more host paths bind-mounted (source, destination).
pub fn start_counter_with(th: &TwoHosts, suffix: &str, binds: &[(&Path, &str)]) -> Workload {
    start_counter_shaped(th, suffix, |mut b| {
        for (from, to) in binds {
            b = b.bind(from, to);
        }
        b.sysctl(COUNTER_SYSCTL.0, COUNTER_SYSCTL.1)
            .resources(test_limits().0)
    })
}

/// The counter of [`start_counter`] (its /data bind mount and arguments) with `more` made of
/// its bundle instead of the sysctl and limits; returns once it counted 20.
pub fn start_counter_shaped(
    th: &TwoHosts,
    suffix: &str,
    more: impl FnOnce(Bundle) -> Bundle,
) -> Workload {
    let src = th.src_runc();
    let id = src.id(suffix);
    let (out, bundle) = start_file_counter_named(src, &id, suffix, more);
    wait_counter_lines(&out, 20, slow(T));
    Workload {
        id,
        data: out.parent().expect("data dir").to_path_buf(),
        out,
        bundle,
    }
}

/// memwriter with `mib` MiB, `rate` MiB/s rewritten, checking its memory into /data/mem.log.
pub fn start_memwriter(th: &TwoHosts, suffix: &str, mib: u32, rate: u32) -> Workload {
    let src = th.src_runc();
    let id = src.id(suffix);
    let data = src.mkdir(&format!("data{suffix}"));
    let bundle = src
        .bundle(&format!("memwriter{suffix}"))
        .with_memwriter()
        .bind(&data, "/data")
        .args(&memwriter_args(mib, rate, "/data/mem.log"))
        .build();
    src.run_detached(&id, &bundle, Out::Null);
    let out = data.join("mem.log");
    wait_memwriter_lines(&out, 3, slow(MEM_T));
    assert_memwriter_ok(&out);
    Workload {
        id,
        out,
        data,
        bundle,
    }
}

/// The counter keeps going, strictly: at least `more` new values after the `have` there
/// were, and the whole file is 1, 2, 3, … (no reset, repeat or gap).
#[track_caller]
pub fn assert_counter_continues(out: &Path, have: usize, more: usize) {
    let v = wait_counter_lines(out, have + more, slow(T));
    assert_eq!(v[0], 1, "counter in {} does not start at 1", out.display());
    assert_strictly_continues(&v, have + more);
}

/// memwriter keeps going: at least `more` new lines after the `have` there were, every line
/// `ok`, seq 1, 2, 3, ….
#[track_caller]
pub fn assert_memwriter_continues(out: &Path, have: usize, more: usize) {
    wait_memwriter_lines(out, have + more, slow(MEM_T));
    assert_memwriter_ok(out);
}

/// After a failed migration: the source container is still running (not paused), still
/// counting without a break.
#[track_caller]
pub fn assert_source_counter_healthy(th: &TwoHosts, w: &Workload) {
    assert_eq!(
        th.src_runc().status(&w.id).as_deref(),
        Some("running"),
        "source container {} is not running after the failed migration",
        w.id
    );
    let n = read_counter_lines(&w.out).len();
    assert_counter_continues(&w.out, n, 10);
}

/// After a failed migration: the source memwriter is still running (not paused), its
/// memory intact and its seq unbroken.
#[track_caller]
pub fn assert_source_memwriter_healthy(th: &TwoHosts, w: &Workload) {
    assert_eq!(
        th.src_runc().status(&w.id).as_deref(),
        Some("running"),
        "source container {} is not running after the failed migration",
        w.id
    );
    let n = read_memwriter_lines(&w.out).len();
    assert_memwriter_continues(&w.out, n, 3);
}

// ---------------------------------------------------------------------------------------
// Checks on a migration's result
// ---------------------------------------------------------------------------------------

/// Assert success and the JSON shape of `ferry migrate --json`; `mode`, when given, is the
/// mode that must have been used. Returns the JSON object.
#[track_caller]
pub fn migrate_json(out: &FerryOut, mode: Option<&str>) -> Value {
    out.ok();
    let v = out.json();
    assert_fields(&v, MIGRATE_FIELDS);
    let m = v["mode"]
        .as_str()
        .unwrap_or_else(|| panic!("mode is not a string: {v}"));
    assert!(
        ["stop-copy", "post-copy", "pre-copy", "hybrid"].contains(&m),
        "unknown mode {m:?}: {v}"
    );
    if let Some(want) = mode {
        assert_eq!(m, want, "mode used: {v}");
    }
    assert!(v["mode_reason"].is_string(), "mode_reason: {v}");
    let rounds = v["rounds"]
        .as_array()
        .unwrap_or_else(|| panic!("rounds is not an array: {v}"));
    for r in rounds {
        assert_fields(r, ROUND_FIELDS);
        for f in ROUND_FIELDS {
            json_u64(r, f);
        }
        assert!(
            json_u64(r, "pages_scanned") >= json_u64(r, "pages_written"),
            "round scanned fewer pages than it wrote: {v}"
        );
    }
    for f in [
        "frozen_ms",
        "downtime_ms",
        "total_ms",
        "bytes_sent",
        "restored_pid",
    ] {
        json_u64(&v, f);
    }
    let total = json_u64(&v, "total_ms");
    assert!(
        json_u64(&v, "frozen_ms") <= total,
        "frozen_ms > total_ms: {v}"
    );
    assert!(
        json_u64(&v, "downtime_ms") <= total,
        "downtime_ms > total_ms: {v}"
    );
    assert!(json_u64(&v, "bytes_sent") > 0, "bytes_sent: {v}");
    assert!(json_u64(&v, "restored_pid") > 0, "restored_pid: {v}");
    v
}

/// The container left the source and runs on the destination under the same id, with pid
/// `restored_pid`, bundle `<dst bundles>/<id>` (rootfs copied), and `runc exec` works there.
#[track_caller]
pub fn assert_migrated(th: &TwoHosts, id: &str, v: &Value) {
    let src = th.src_runc();
    assert!(
        src.try_state(id).is_none(),
        "{id} still known to the source runc after migrating: {:?}",
        src.try_state(id)
    );
    assert!(!src.list_ids().contains(&id.to_string()));
    let dst = th.dst_runc();
    let st = dst
        .try_state(id)
        .unwrap_or_else(|| panic!("{id} not known to the destination runc; migrate said {v}"));
    assert_eq!(st["status"], "running", "destination runc state: {st}");
    assert_eq!(
        st["pid"].as_u64(),
        Some(json_u64(v, "restored_pid")),
        "destination runc pid vs restored_pid: {st} / {v}"
    );
    let bundle = th.dst_bundle(id);
    assert_eq!(
        st["bundle"].as_str().map(PathBuf::from),
        Some(bundle.clone()),
        "destination bundle: {st}"
    );
    assert!(
        bundle.join("config.json").is_file() && bundle.join("rootfs/bin/busybox").is_file(),
        "bundle not copied to {}",
        bundle.display()
    );
    let out = must(
        dst.exec(id, &["echo", "hi"]),
        &format!("runc exec {id} echo hi (destination)"),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    // --cgroup-prefix: the restored tasks live under ferry-dst-<pid>/ (the hosts share cgroupfs).
    let pid = json_u64(v, "restored_pid");
    let cg = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let v2 = cgroup_v2_only();
    let freezer = cg
        .lines()
        .find(|l| l.split(':').nth(1) == Some("freezer") || (v2 && l.starts_with("0::")))
        .unwrap_or_else(|| panic!("no freezer cgroup for pid {pid}:\n{cg}"));
    assert!(
        freezer.contains(&format!("/{}/", dst_cgroup_prefix())) && freezer.contains(id),
        "restored pid {pid} is not in a {}/ cgroup of {id}:\n{cg}",
        dst_cgroup_prefix()
    );
    // The destination-clean check sees a live container (so its silence means something).
    let seen = th.dst_leftovers(id);
    for what in [
        "destination runc knows",
        "leftover cgroup dir",
        "in a destination cgroup",
    ] {
        assert!(
            seen.iter().any(|p| p.contains(what)),
            "dst_leftovers misses {what:?} for a running container: {seen:?}"
        );
    }
}

/// Failure shape: exit code one of `codes`, exactly one `ferry: error:` line on stderr.
#[track_caller]
pub fn assert_failed_with(out: &FerryOut, codes: &[i32]) {
    assert!(
        out.code.is_some_and(|c| codes.contains(&c)),
        "expected exit code in {codes:?}: {out:?}"
    );
    out.assert_error(out.code.unwrap());
}

/// `out`, a migration of the counter `w`, failed with one of `codes`: the source counter
/// runs on unbroken and the destination is clean within `clean_t`.
#[track_caller]
pub fn assert_counter_not_migrated(
    th: &TwoHosts,
    w: &Workload,
    out: &FerryOut,
    codes: &[i32],
    clean_t: Duration,
) {
    assert_failed_with(out, codes);
    assert_source_counter_healthy(th, w);
    th.assert_dst_clean(&w.id, clean_t);
}

/// How long the destination may take to clean up after a failed migration.
pub const DST_CLEAN_T: Duration = Duration::from_secs(30);

/// `out`, a `-v` migration of the counter `w`, was refused before the source froze: the
/// source counter runs on, the destination is clean and `serve` is up.
#[track_caller]
pub fn assert_counter_refused_before_the_freeze(
    th: &TwoHosts,
    w: &Workload,
    serve: &Serve,
    out: &FerryOut,
) {
    assert_refused_before_the_freeze(th, w, serve, out, assert_source_counter_healthy);
}

/// [`assert_counter_refused_before_the_freeze`] for any workload, `healthy` checking that it
/// runs on at the source.
#[track_caller]
pub fn assert_refused_before_the_freeze(
    th: &TwoHosts,
    w: &Workload,
    serve: &Serve,
    out: &FerryOut,
    healthy: fn(&TwoHosts, &Workload),
) {
    assert!(
        !out.stderr.contains("freezing and dumping"),
        "the source froze before the refusal: {out:?}"
    );
    healthy(th, w);
    th.assert_dst_clean(&w.id, DST_CLEAN_T);
    assert!(serve.is_alive(), "ferry serve exited");
}

/// `out`, a migration of the memwriter `w`, failed with one of `codes`: the source
/// memwriter runs on intact and the destination is clean within `clean_t`.
#[track_caller]
pub fn assert_memwriter_not_migrated(
    th: &TwoHosts,
    w: &Workload,
    out: &FerryOut,
    codes: &[i32],
    clean_t: Duration,
) {
    assert_failed_with(out, codes);
    assert_source_memwriter_healthy(th, w);
    th.assert_dst_clean(&w.id, clean_t);
}

/// `out` migrated the counter `w` (with `mode`, when given): the report has the right
/// shape, the container runs on the destination and the counter goes on strictly for
/// `more` values. Returns the report.
#[track_caller]
pub fn assert_counter_migrated(
    th: &TwoHosts,
    w: &Workload,
    out: &FerryOut,
    mode: Option<&str>,
    more: usize,
) -> Value {
    let v = migrate_json(out, mode);
    assert_migrated(th, &w.id, &v);
    let n = read_counter_lines(&w.out).len();
    assert_counter_continues(&w.out, n, more);
    v
}

/// `out` migrated the memwriter `w` (with `mode`, when given): the report has the right
/// shape, the container runs on the destination and the memwriter goes on intact for
/// `more` lines. Returns the report.
#[track_caller]
pub fn assert_memwriter_migrated(
    th: &TwoHosts,
    w: &Workload,
    out: &FerryOut,
    mode: Option<&str>,
    more: usize,
) -> Value {
    let v = migrate_json(out, mode);
    assert_migrated(th, &w.id, &v);
    let n = read_memwriter_lines(&w.out).len();
    assert_memwriter_continues(&w.out, n, more);
    v
}

/// The busybox counter migrated with `--mode mode` to a fresh `ferry serve`: the report has
/// the right shape and mode, the container runs on the destination, the counter continues
/// strictly, serve stays up; the container is then removed. Returns the report.
#[track_caller]
pub fn migrate_counter(th: &TwoHosts, mode: &str) -> Value {
    migrate_counter_via(th, mode, &[])
}

/// [`migrate_counter`] with extra `ferry serve` arguments.
pub fn migrate_counter_via(th: &TwoHosts, mode: &str, serve_args: &[&str]) -> Value {
    let w = start_counter(th, "");
    let devices = cgroup_value(&th.src_runc().state_file(&w.id), "devices", "devices.list");
    assert_limits(
        &th.src_runc().state_file(&w.id),
        &devices,
        "source container",
    );
    let serve = th.serve(serve_args);
    let out = th.migrate(&w.id, &serve.addr, &["--mode", mode]);
    let v = assert_counter_migrated(th, &w, &out, Some(mode), 20);
    eprintln!("migrate ({mode}): {v}");
    assert_limits(
        &th.dst_runc().state_file(&w.id),
        &devices,
        "migrated container",
    );
    let (key, want) = COUNTER_SYSCTL;
    let sysctl = must(
        th.dst_runc().exec(
            &w.id,
            &["cat", &format!("/proc/sys/{}", key.replace('.', "/"))],
        ),
        "read a sysctl in the migrated container",
    );
    assert_eq!(
        String::from_utf8_lossy(&sysctl.stdout).trim(),
        want,
        "{key} in the migrated container"
    );
    assert!(serve.is_alive(), "ferry serve exited after a migration");
    th.dst_runc().kill_and_delete(&w.id);
    v
}

/// Bytes the source must have sent before a fault is injected "mid-transfer": past the
/// handshake and the rootfs (a few MiB), well inside the 256 MiB of memory.
pub const FAULT_AFTER_BYTES: u64 = 32 << 20;

/// Run `ferry migrate` on another thread and call `inject` once the source has sent
/// [`FAULT_AFTER_BYTES`] over the link (i.e. while memory is crossing it). Panics if the
/// migration ended before that. Returns the migration's result.
pub fn migrate_with_fault(
    th: &TwoHosts,
    id: &str,
    addr: &str,
    mode: &str,
    inject: impl FnOnce(),
) -> FerryOut {
    let base = th.src_tx_bytes();
    thread::scope(|sc| {
        let h = sc.spawn(|| th.migrate(id, addr, &["--mode", mode]));
        let start = Instant::now();
        let mut sent = 0;
        while !h.is_finished() && start.elapsed() < Duration::from_secs(60) {
            sent = th.src_tx_bytes().saturating_sub(base);
            if sent >= FAULT_AFTER_BYTES {
                break;
            }
            thread::sleep(Duration::from_millis(1));
        }
        if h.is_finished() {
            let out = h.join().unwrap();
            panic!(
                "the migration ended before the fault could be injected ({} MiB sent): {out:?}",
                sent / MIB
            );
        }
        assert!(
            sent >= FAULT_AFTER_BYTES,
            "only {} MiB crossed the link within 60 s",
            sent / MIB
        );
        eprintln!(
            "injecting the fault after {} MiB sent, {:?} into the migration",
            sent / MIB,
            start.elapsed()
        );
        inject();
        let t0 = Instant::now();
        let out = h.join().unwrap();
        eprintln!("ferry migrate ended {:?} after the fault", t0.elapsed());
        out
    })
}

/// A rootfs file big enough that a fault from [`migrate_with_fault`] lands while the rootfs
/// crosses the link: after the destination's Prepare, before the freeze. Old, as an image's
/// files are (a recent one would be hashed again in the freeze).
pub fn add_rootfs_ballast(w: &Workload) {
    let ballast = w.bundle.join("rootfs/ballast");
    fs::write(&ballast, vec![0x5a_u8; 2 * FAULT_AFTER_BYTES as usize]).unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    fs::File::open(&ballast).unwrap().set_modified(old).unwrap();
}

/// Migrates the counter, paused, with `--mode mode`: it arrives paused (the report says so),
/// stands still on the destination, and counts on strictly once resumed. Returns the
/// report (None: no two hosts here, as `require_two_hosts` decided).
pub fn paused_migration(name: &str, mode: &str) -> Option<Value> {
    if !require_two_hosts() {
        return None;
    }
    let th = TwoHosts::new(name);
    let w = start_counter(&th, "");
    let serve = th.serve(&[]);
    let n = pause_counter(th.src_runc(), &w);
    let out = th.migrate(&w.id, &serve.addr, &["--mode", mode]);
    let v = migrate_json(&out, Some(mode));
    eprintln!("migrate ({mode}) of a paused container: {v}");
    assert_eq!(v["paused"], true, "{v}");
    assert_eq!(th.src_runc().status(&w.id), None, "source container left");
    assert_eq!(th.dst_runc().status(&w.id).as_deref(), Some("paused"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        read_counter_lines(&w.out).len(),
        n,
        "the paused container counted on the destination"
    );
    th.dst_runc().resume(&w.id);
    assert_counter_continues(&w.out, n, 10);
    th.dst_runc().kill_and_delete(&w.id);
    th.finish();
    Some(v)
}

/// Pauses the counter `w` and waits until it stands still; returns its line count.
pub fn pause_counter(rc: &Runc, w: &Workload) -> usize {
    rc.pause(&w.id);
    assert_eq!(rc.status(&w.id).as_deref(), Some("paused"));
    // A write under way when the freezer took it lands at once.
    std::thread::sleep(Duration::from_millis(200));
    read_counter_lines(&w.out).len()
}
