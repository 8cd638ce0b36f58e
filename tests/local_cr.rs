//! Checkpoint/restore on one host with real CRIU and runc (no mocks).
//!
//! Needs root, criu, runc and busybox-static; without them the tests print `skipping: …`
//! and pass, unless `CI` is set, in which case they fail. Run with `--test-threads=1`
//! (leak checks look at global state, and `zz_no_leftovers` must run last).

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use common::local::*;
use common::*;
use serde_json::Value;

/// Generous timeout for things that normally take well under a second.
const T: Duration = Duration::from_secs(20);

/// ferry.json says the dump took no network lock (a namespace with only lo, no
/// --tcp-established), so the restore takes none either.
#[track_caller]
fn assert_lock_skipped(images: &Path) {
    let meta: Value =
        serde_json::from_slice(&fs::read(images.join("ferry.json")).unwrap()).unwrap();
    assert_eq!(meta["network_lock_skipped"], true, "ferry.json: {meta}");
}

/// No CRIU (or ferry) lock rule in the network namespace of `pid`: a rule left there
/// would drop the container's loopback traffic.
#[track_caller]
fn assert_no_lock_rules(pid: u64) {
    let pid = pid.to_string();
    for (prog, args) in [
        ("iptables-save", &[][..]),
        ("ip6tables-save", &[][..]),
        ("nft", &["list", "ruleset"][..]),
    ] {
        let out = std::process::Command::new("nsenter")
            .args(["-t", &pid, "-n", prog])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("nsenter {prog}: {e}"));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !text.contains("CRIU") && !text.contains("FERRY-LOCK"),
            "lock rules left in the namespace of {pid} ({prog}):\n{text}"
        );
    }
}

/// Number of counter lines in `path` does not change for a while (the writer is gone).
#[track_caller]
fn assert_stopped_writing(path: &Path) {
    let n = read_counter_lines(path).len();
    thread::sleep(Duration::from_millis(400));
    assert_eq!(
        read_counter_lines(path).len(),
        n,
        "{} still grows",
        path.display()
    );
}

// ---------------------------------------------------------------------------------------
// The rig itself (plain runc + criu, no ferry)
// ---------------------------------------------------------------------------------------

/// Proves the helpers: counter container, pipes, runc checkpoint/restore, leak check.
#[test]
fn rig_runc_baseline_checkpoint_restore() {
    if !require_root_and_criu() {
        return;
    }
    let rc = Runc::new("rig");
    let id = rc.id("");
    let bundle = rc.bundle("counter").hostname("rig").build();

    // stdout and stderr on a pipe: plain runc cannot dump a host file outside the
    // container's mounts, but it reconnects pipes (descriptors.json + inherit fds).
    let (p1, out1) = pipe_lines();
    rc.run_detached(&id, &bundle, out1);
    p1.wait_values(20, T);
    assert_eq!(rc.status(&id).as_deref(), Some("running"));
    assert!(rc.list_ids().contains(&id));
    assert_exec_works(&rc, &id);

    let images = rc.mkdir("images");
    must(rc.checkpoint(&id, &images, &[]), "runc checkpoint");
    p1.wait_eof(T);
    assert!(
        !rc.list_ids().contains(&id),
        "{id} still listed after runc checkpoint"
    );
    let before = p1.values();

    let (p2, out2) = pipe_lines();
    let r = rc.restore_detached(&id, &bundle, &images, out2);
    assert!(
        r.status.success(),
        "runc restore failed: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    rc.wait_status(&id, "running", T);
    p2.wait_values(20, T);

    let mut all = before.clone();
    all.extend(p2.values());
    assert_eq!(all[0], 1);
    assert_strictly_continues(&all, before.len() + 20);
    assert_exec_works(&rc, &id);

    rc.kill_and_delete(&id);
    p2.wait_eof(T);
    assert!(rc.list().is_empty());
    rc.teardown();
    leak_check(&rc.ids());
}

// ---------------------------------------------------------------------------------------
// ferry check
// ---------------------------------------------------------------------------------------

#[test]
fn check_json_reports_ok() {
    if !require_root_and_criu() {
        return;
    }
    let out = ferry(&["check", "--json"]);
    out.ok();
    let v = out.json();
    assert_fields(&v, &["ok", "criu_version", "features", "kernel", "missing"]);
    assert_eq!(v["ok"], true, "{v}");
    assert_version_string(&v);
    for f in ["mem_track", "lazy_pages", "pidfd_store"] {
        assert!(v["features"][f].is_boolean(), "features.{f}: {v}");
    }
    assert!(v["kernel"].as_str().is_some_and(|k| !k.is_empty()), "{v}");
    assert!(v["missing"].as_array().is_some_and(|m| m.is_empty()), "{v}");
    let layout = if cgroup_v2_only() { "v2" } else { "v1" };
    assert_eq!(v["cgroups"], layout, "{v}");
    // scripts/setup.sh (vendor/criu/install.sh) gives CRIU a tmpfs for its kernel-facts
    // cache; without it every restore probes the kernel again.
    let warnings = v["warnings"].as_array().expect("warnings array");
    assert!(
        !warnings
            .iter()
            .any(|w| w.as_str().is_some_and(|w| w.contains("kernel-facts cache"))),
        "CRIU cannot keep its kernel-facts cache: {v}"
    );
}

// ---------------------------------------------------------------------------------------
// Happy paths
// ---------------------------------------------------------------------------------------

#[test]
fn counter_checkpoint_restore_continues() {
    if !require_root_and_criu() {
        return;
    }
    let rc = Runc::new("counter");
    let id = rc.id("");
    let (out, _bundle) = start_file_counter(&rc, &id);
    wait_counter_lines(&out, 20, T);

    // One cycle: checkpoint into a new `images` dir (the container is gone and silent), restore
    // (it counts on from where it stopped and takes `runc exec`).
    let cycle = |images: &str, which: &str| {
        let images = rc.mkdir(images);
        ferry_checkpoint(&rc, &id, &images, false);
        // The container's own namespace has only lo: dumped without CRIU's network lock.
        assert_lock_skipped(&images);
        assert!(
            !rc.list_ids().contains(&id),
            "{id} still in runc list after {which}checkpoint"
        );
        assert_stopped_writing(&out);
        let n = read_counter_lines(&out).len();
        let pid = ferry_restore(&rc, &id, &images, &[]);
        wait_counter_lines(&out, n + 20, T);
        assert_file_counts_from_one(&out, n + 20);
        assert_exec_works(&rc, &id);
        assert_no_lock_rules(pid);
    };
    cycle("images1", "");
    // Cycle 2 on the restored container.
    cycle("images2", "2nd ");

    rc.kill_and_delete(&id);
    assert!(!rc.list_ids().contains(&id));
    assert_stopped_writing(&out);
    rc.teardown();
    leak_check(&rc.ids());
}

/// A paused container (`runc pause`) stays paused through checkpoint and restore.
#[test]
fn paused_container_checkpoint_restore_stays_paused() {
    if !require_root_and_criu() {
        return;
    }
    paused_checkpoint_restore(T);
}

/// A read-only root (`root.readonly`, as `docker run --read-only`): checkpoint and restore
/// keep the counter going and the root read-only. Without a `/tmp` directory in the rootfs
/// CRIU could dump it but never restore it (it pivots through a directory it finds or makes
/// there), so ferry refuses such a checkpoint before anything happens (exit 4, the container
/// keeps running).
#[test]
fn readonly_root_checkpoint_restore() {
    if !require_root_and_criu() {
        return;
    }
    let rc = Runc::new("readonly");
    let id = rc.id("");
    let (out, bundle) = start_file_counter_with(&rc, &id, Bundle::readonly);
    wait_counter_lines(&out, 10, T);
    let images = rc.mkdir("images");
    ferry_checkpoint(&rc, &id, &images, false);
    let n = read_counter_lines(&out).len();
    ferry_restore(&rc, &id, &images, &[]);
    wait_counter_lines(&out, n + 10, T);
    assert_file_counts_from_one(&out, n + 10);
    let touch = rc.exec(&id, &["touch", "/x"]);
    assert!(
        !touch.status.success() && String::from_utf8_lossy(&touch.stderr).contains("Read-only"),
        "the restored root is writable: {touch:?}"
    );
    rc.kill_and_delete(&id);

    // The same without /tmp in the rootfs: refused, the container untouched.
    std::fs::remove_dir(bundle.join("rootfs/tmp")).unwrap();
    rc.run_detached(&id, &bundle, Out::Null);
    wait_counter_lines(&out, 5, T);
    let images = rc.mkdir("images-notmp");
    let root = s(&rc.root).to_string();
    let out_cmd = cr_cmd("checkpoint", &id, &images, &[], &root).run();
    out_cmd.assert_error(4);
    assert!(
        out_cmd
            .stderr
            .contains("root.readonly with no /tmp directory in"),
        "{out_cmd:?}"
    );
    assert_eq!(rc.status(&id).as_deref(), Some("running"));
    let n = read_counter_lines(&out).len();
    wait_counter_lines(&out, n + 5, T);
    rc.kill_and_delete(&id);
    rc.teardown();
    leak_check(&rc.ids());
}

/// The container's cgroup limits (memory, CPU shares and quota, pids) and device rules come
/// back with the restored container. CRIU does not restore them into cgroups that exist
/// before it runs, and a new device cgroup allows every device: before ferry wrote them back,
/// a restored container could open any device node and had no memory limit.
#[test]
fn cgroup_limits_and_device_rules_survive_checkpoint_restore() {
    if !require_root_and_criu() {
        return;
    }
    let rc = Runc::new("limits");
    let id = rc.id("");
    let (out, _bundle) = start_file_counter_with(&rc, &id, |b| b.resources(test_limits().0));
    wait_counter_lines(&out, 5, T);
    let devices = cgroup_value(&rc.state_file(&id), "devices", "devices.list");
    assert_limits(&rc.state_file(&id), &devices, "container");
    let images = rc.mkdir("images");
    ferry_checkpoint(&rc, &id, &images, false);
    // Only what runc's config sets is carried (not, e.g., the host's default blkio.weight).
    let meta: Value =
        serde_json::from_slice(&fs::read(images.join("ferry.json")).unwrap()).unwrap();
    let carried: Vec<&str> = meta["cgroup_settings"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        carried,
        [
            "cpu.cfs_period_us",
            "cpu.cfs_quota_us",
            "cpu.shares",
            "cpuset.cpus",
            "devices.list",
            "memory.limit_in_bytes",
            "pids.max"
        ]
    );
    ferry_restore(&rc, &id, &images, &[]);
    assert_limits(&rc.state_file(&id), &devices, "restored container");
    let n = read_counter_lines(&out).len();
    wait_counter_lines(&out, n + 5, T);
    assert_exec_works(&rc, &id);
    rc.kill_and_delete(&id);
    rc.teardown();
    leak_check(&rc.ids());
}

/// The value of the sysctl `key` (dots) in the network namespace of `pid`.
fn net_sysctl_of(pid: u64, key: &str) -> String {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let out = must(
        run_output(std::process::Command::new("nsenter").args([
            "-t",
            &pid.to_string(),
            "-n",
            "cat",
            &path,
        ])),
        &format!("read {key} of pid {pid}"),
    );
    String::from_utf8_lossy(&out.stdout).trim_end().to_string()
}

/// config.json's network sysctls (Docker sets `net.ipv4.ip_unprivileged_port_start=0` in
/// every container) come back with the restored container; CRIU alone restores
/// `ping_group_range` but leaves the others at the kernel's defaults. A value changed after
/// the create is kept as it was at checkpoint time.
#[test]
fn network_sysctls_survive_checkpoint_restore() {
    if !require_root_and_criu() {
        return;
    }
    let rc = Runc::new("sysctl");
    let id = rc.id("");
    let (out, _bundle) = start_file_counter_with(&rc, &id, |b| {
        b.sysctl("net.ipv4.ip_unprivileged_port_start", "0")
            .sysctl("net.core.somaxconn", "1000")
            .sysctl("net.ipv4.tcp_keepalive_time", "600")
            .sysctl("net.ipv4.ping_group_range", "0 0")
    });
    wait_counter_lines(&out, 5, T);
    let pid = rc.state(&id)["pid"].as_u64().expect("pid of the container");
    assert_eq!(net_sysctl_of(pid, "net.core.somaxconn"), "1000");
    // Changed since the create (by whoever manages the container's network).
    must(
        run_output(std::process::Command::new("nsenter").args([
            "-t",
            &pid.to_string(),
            "-n",
            "sh",
            "-c",
            "echo 1001 > /proc/sys/net/core/somaxconn",
        ])),
        "change somaxconn",
    );
    let images = rc.mkdir("images");
    ferry_checkpoint(&rc, &id, &images, false);
    let pid = ferry_restore(&rc, &id, &images, &[]);
    for (key, want) in [
        ("net.ipv4.ip_unprivileged_port_start", "0"),
        ("net.core.somaxconn", "1001"),
        ("net.ipv4.tcp_keepalive_time", "600"),
        ("net.ipv4.ping_group_range", "0\t0"),
    ] {
        assert_eq!(net_sysctl_of(pid, key), want, "{key} after the restore");
    }
    let n = read_counter_lines(&out).len();
    wait_counter_lines(&out, n + 5, T);
    rc.kill_and_delete(&id);
    rc.teardown();
    leak_check(&rc.ids());
}

/// `--images`, `--work-dir` and `--bundle` relative to ferry's current directory: CRIU runs
/// in its work dir, so ferry must not hand it relative paths (a relative restore work dir
/// made CRIU fail to mount its root).
#[test]
fn relative_paths_checkpoint_restore() {
    if !require_root_and_criu() {
        return;
    }
    let rc = Runc::new("relpath");
    let id = rc.id("");
    let (out, bundle) = start_file_counter(&rc, &id);
    wait_counter_lines(&out, 10, T);
    let here = rc.path("");
    let bundle_rel = bundle
        .strip_prefix(&here)
        .expect("bundle inside the work dir");
    let root = rc.root.clone();

    ferry_cmd(&[
        "checkpoint",
        &id,
        "--images",
        "images",
        "--work-dir",
        "wd-dump",
        "--runtime-root",
        s(&root),
    ])
    .current_dir(&here)
    .run()
    .ok();
    assert!(
        here.join("wd-dump/dump.log").is_file(),
        "no dump.log in the relative work dir"
    );
    assert_stopped_writing(&out);
    let n = read_counter_lines(&out).len();

    rc.track(&id);
    ferry_cmd(&[
        "restore",
        &id,
        "--images",
        "images",
        "--work-dir",
        "wd-restore",
        "--bundle",
        s(bundle_rel),
        "--runtime-root",
        s(&root),
    ])
    .current_dir(&here)
    .run()
    .ok();
    let st = rc.state(&id);
    assert_eq!(st["status"], "running", "{st}");
    assert_eq!(
        st["bundle"].as_str().map(Path::new),
        Some(bundle.as_path()),
        "runc records the bundle's absolute path: {st}"
    );
    wait_counter_lines(&out, n + 10, T);
    assert_file_counts_from_one(&out, n + 10);

    rc.kill_and_delete(&id);
    rc.teardown();
    leak_check(&rc.ids());
}

#[test]
fn leave_running_images_restorable() {
    if !require_root_and_criu() {
        return;
    }
    let rc = Runc::new("leave");
    let a = rc.id("");
    let b = rc.id("-copy");
    let (out, _bundle) = start_file_counter(&rc, &a);
    wait_counter_lines(&out, 20, T);

    let images = rc.mkdir("images");
    let lo = read_counter_lines(&out).len() as u64;
    ferry_checkpoint(&rc, &a, &images, true);
    let hi = read_counter_lines(&out).len() as u64;
    let snap = snapshot_tree(&images);
    assert_lock_skipped(&images);

    // The original keeps running and counting, undisturbed, with no lock rule left.
    assert_eq!(rc.status(&a).as_deref(), Some("running"));
    assert_no_lock_rules(json_u64(&rc.state(&a), "pid"));
    wait_counter_lines(&out, hi as usize + 20, T);
    assert_file_counts_from_one(&out, hi as usize + 20);

    // A copy under another id. It appends to the same bind-mounted counter file, so from here on
    // the file interleaves two counters: only check that both run.
    ferry_restore(&rc, &b, &images, &["--rename"]);
    assert_exec_works(&rc, &b);
    assert_eq!(
        rc.status(&a).as_deref(),
        Some("running"),
        "original stopped"
    );
    assert_exec_works(&rc, &a);

    rc.kill_and_delete(&b);
    rc.kill_and_delete(&a);
    assert_stopped_writing(&out);
    let offset = fs::read(&out).unwrap().len();

    // Same images again, under the original id, without --rename.
    ferry_restore(&rc, &a, &images, &[]);
    assert_exec_works(&rc, &a);
    let mut seg = Vec::new();
    wait_for(T, "restored counter output", || {
        let text = String::from_utf8_lossy(&fs::read(&out).unwrap()[offset..]).into_owned();
        seg = parse_counter(&text, "output after 2nd restore");
        seg.len() >= 20
    });
    assert_strictly_continues(&seg, 20);
    assert!(
        (lo + 1..=hi + 1).contains(&seg[0]),
        "restored counter starts at {} but was between {lo} and {hi} at checkpoint",
        seg[0]
    );
    assert_tree_kept(&images, &snap);

    rc.kill_and_delete(&a);
    rc.teardown();
    leak_check(&rc.ids());
}

#[test]
fn bind_mount_and_pipe_stdout() {
    if !require_root_and_criu() {
        return;
    }
    let rc = Runc::new("bindpipe");
    let id = rc.id("");
    let hostdata = rc.mkdir("hostdata");
    let data_out = hostdata.join("out");
    let bundle = rc
        .bundle("tee")
        .bind(&hostdata, "/data")
        .args(&counter_tee_args("/data/out"))
        .build();

    // stdout on a pipe the test reads; stderr /dev/null (so stdout is the only pipe).
    let (p1, o1) = pipe_lines();
    rc.run_detached_io(&id, &bundle, o1, Out::Null);
    p1.wait_values(20, T);
    wait_counter_lines(&data_out, 20, T);

    let images = rc.mkdir("images");
    ferry_checkpoint(&rc, &id, &images, false);
    p1.wait_eof(T); // the container is gone and with it the pipe's only writer
    assert!(!rc.list_ids().contains(&id));
    let before = p1.values();
    assert_eq!(before[0], 1);
    assert_strictly_continues(&before, 20);

    // Restore with ferry's stdout a NEW pipe: the container must write to it, and keep
    // writing after ferry has exited. No --json: stdout belongs to the container.
    let (p2, o2) = pipe_lines();
    rc.track(&id);
    let r = ferry_cmd(&[
        "restore",
        &id,
        "--images",
        s(&images),
        "--runtime-root",
        s(&rc.root),
    ])
    .stdout(o2)
    .run();
    r.ok();
    rc.wait_status(&id, "running", T);
    wait_for(T, "20 counter lines on the new pipe", || {
        p2.numeric_values().len() >= 20
    });
    let extra: Vec<String> = complete_lines_of(&p2.text())
        .into_iter()
        .filter(|l| l.trim().parse::<u64>().is_err())
        .collect();
    if !extra.is_empty() {
        eprintln!("note: non-counter lines on ferry restore's stdout: {extra:?}");
    }
    let mut all = before.clone();
    all.extend(p2.numeric_values());
    assert_strictly_continues(&all, before.len() + 20);

    let data = wait_counter_lines(&data_out, before.len() + 20, T);
    assert_eq!(data[0], 1);
    assert_strictly_continues(&data, before.len() + 20);
    assert_exec_works(&rc, &id);

    rc.kill_and_delete(&id);
    p2.wait_eof(T); // nothing but the container held the new pipe
    rc.teardown();
    leak_check(&rc.ids());
}

fn complete_lines_of(text: &str) -> Vec<String> {
    match text.rfind('\n') {
        Some(i) => text[..i].split('\n').map(str::to_string).collect(),
        None => Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------
// Bad inputs: documented exit code, one `ferry: error:` line, nothing harmed
// ---------------------------------------------------------------------------------------

/// A running counter container whose health is asserted after each bad invocation.
struct Source {
    rc: Runc,
    id: String,
    out: PathBuf,
    bundle: PathBuf,
    bundle_snap: TreeSnapshot,
}

impl Source {
    fn start(name: &str) -> Source {
        Source::start_with(name, |b| b)
    }

    /// [`Source::start`] with more to the counter's bundle (see [`start_file_counter_with`]).
    fn start_with(name: &str, more: impl FnOnce(Bundle) -> Bundle) -> Source {
        let rc = Runc::new(name);
        let id = rc.id("");
        let (out, bundle) = start_file_counter_with(&rc, &id, more);
        wait_counter_lines(&out, 10, T);
        let bundle_snap = snapshot_tree(&bundle);
        Source {
            rc,
            id,
            out,
            bundle,
            bundle_snap,
        }
    }

    fn root(&self) -> &str {
        s(&self.rc.root)
    }

    /// `ferry <verb> <id> --images DIR [extra…] --runtime-root <the source's runc root>`.
    fn cmd(&self, verb: &str, id: &str, images: &Path, extra: &[&str]) -> FerryCmd {
        cr_cmd(verb, id, images, extra, self.root())
    }

    /// `cmd`, a checkpoint into `images`, fails with `code`; `images` is still there and the
    /// source is unharmed.
    #[track_caller]
    fn assert_checkpoint_refused(&self, cmd: FerryCmd, images: &Path, code: i32) {
        cmd.run().assert_error(code);
        assert!(images.is_dir(), "images dir removed");
        self.assert_healthy();
    }

    /// `ferry restore <id> --images DIR [extra…]` fails with `code`, leaves the images as they
    /// were and (unless `id` is the running source's) no container `id` registered; the
    /// source is unharmed. Returns the failed run.
    #[track_caller]
    fn assert_restore_refused(
        &self,
        id: &str,
        images: &Path,
        extra: &[&str],
        code: i32,
    ) -> FerryOut {
        let snap = snapshot_tree(images);
        let out = self.cmd("restore", id, images, extra).run();
        out.assert_error(code);
        assert_tree_kept(images, &snap);
        if id != self.id {
            self.assert_not_created(id);
        }
        self.assert_healthy();
        out
    }

    /// Still running, still counting without a break, bundle intact.
    #[track_caller]
    fn assert_healthy(&self) {
        self.assert_runs_on(5);
    }

    /// [`Source::assert_healthy`], waiting for `more` new values.
    #[track_caller]
    fn assert_runs_on(&self, more: usize) {
        assert_eq!(
            self.rc.status(&self.id).as_deref(),
            Some("running"),
            "source not running"
        );
        let n = read_counter_lines(&self.out).len();
        wait_counter_lines(&self.out, n + more, T);
        assert_file_counts_from_one(&self.out, n + more);
        assert_tree_kept(&self.bundle, &self.bundle_snap);
    }

    /// `other` must not have been left registered in runc.
    #[track_caller]
    fn assert_not_created(&self, other: &str) {
        self.rc.track(other);
        assert!(
            self.rc.try_state(other).is_none(),
            "failed restore left container {other} behind: {:?}",
            self.rc.try_state(other)
        );
    }

    fn finish(self) {
        self.rc.teardown();
        leak_check(&self.rc.ids());
    }
}

/// `ferry <verb> <id> --images DIR [extra…] --runtime-root ROOT`, not yet run.
fn cr_cmd(verb: &str, id: &str, images: &Path, extra: &[&str], root: &str) -> FerryCmd {
    let mut args = vec![verb, id, "--images", s(images)];
    args.extend_from_slice(extra);
    args.extend(["--runtime-root", root]);
    ferry_cmd(&args)
}

#[test]
fn bad_input_unknown_container() {
    if !require_root_and_criu() {
        return;
    }
    let src = Source::start("badunknown");
    let images = src.rc.mkdir("images");
    let nosuch = src.rc.id("-nosuch");
    src.assert_checkpoint_refused(src.cmd("checkpoint", &nosuch, &images, &[]), &images, 3);
    src.finish();
}

#[test]
fn bad_input_runtime_root_not_runc() {
    if !require_root_and_criu() {
        return;
    }
    let src = Source::start("badroot");
    let images = src.rc.mkdir("images");
    let notrunc = src.rc.mkdir("notrunc");
    fs::write(notrunc.join("random.txt"), "not a runc state dir\n").unwrap();
    let snap = snapshot_tree(&notrunc);
    let cmd = cr_cmd("checkpoint", &src.id, &images, &[], s(&notrunc));
    src.assert_checkpoint_refused(cmd, &images, 4);
    assert_tree_kept(&notrunc, &snap);
    src.finish();
}

#[test]
fn bad_input_restore_empty_missing_or_file_images_dir() {
    if !require_root_and_criu() {
        return;
    }
    let src = Source::start("badempty");
    let other = src.rc.id("-new");
    let empty = src.rc.mkdir("empty");
    let bundle = s(&src.bundle).to_string();

    src.cmd("restore", &other, &empty, &["--bundle", &bundle])
        .run()
        .assert_error(4);
    assert!(empty.is_dir(), "empty images dir removed");
    src.assert_not_created(&other);

    let missing = src.rc.path("no-such-images");
    src.cmd("restore", &other, &missing, &["--bundle", &bundle])
        .run()
        .assert_error(3);
    src.assert_not_created(&other);

    // A file where the images directory should be: said so, not "does not exist".
    let a_file = src.rc.path("images-file");
    std::fs::write(&a_file, b"x").unwrap();
    let out = src
        .cmd("restore", &other, &a_file, &["--bundle", &bundle])
        .run();
    out.assert_error(4);
    assert!(out.stderr.contains("is not a directory"), "{out:?}");
    src.assert_not_created(&other);

    src.assert_healthy();
    src.finish();
}

#[test]
fn bad_input_restore_other_containers_images_without_rename() {
    if !require_root_and_criu() {
        return;
    }
    let src = Source::start("badrename");
    let images = src.rc.mkdir("images");
    ferry_checkpoint(&src.rc, &src.id, &images, true);
    let other = src.rc.id("-other");
    let r = src.assert_restore_refused(&other, &images, &[], 4);
    assert!(
        r.stderr.contains(&src.id),
        "error should name the checkpointed container: {r:?}"
    );
    src.finish();
}

#[test]
fn bad_input_restore_truncated_stats() {
    if !require_root_and_criu() {
        return;
    }
    let src = Source::start("badstats");
    let images = src.rc.mkdir("images");
    ferry_checkpoint(&src.rc, &src.id, &images, true);
    let stats = images.join("stats-dump");
    let data = fs::read(&stats).expect("checkpoint wrote stats-dump");
    assert!(data.len() > 5);
    fs::write(&stats, &data[..5]).unwrap();
    let other = src.rc.id("-other");
    src.assert_restore_refused(&other, &images, &["--rename"], 4);
    src.finish();
}

#[test]
fn bad_input_restore_existing_id() {
    if !require_root_and_criu() {
        return;
    }
    let src = Source::start("badexists");
    let images = src.rc.mkdir("images");
    ferry_checkpoint(&src.rc, &src.id, &images, true);
    // The source is still running under that id.
    src.assert_restore_refused(&src.id, &images, &[], 7);
    src.finish();
}

#[test]
fn bad_input_checkpoint_stopped_created_or_with_exec_processes() {
    if !require_root_and_criu() {
        return;
    }
    let src = Source::start("badstopped");
    let done = src.rc.id("-done");
    let bundle = src.rc.bundle("true").args(&["true"]).build();
    src.rc.run_detached(&done, &bundle, Out::Null);
    src.rc.wait_status(&done, "stopped", T);
    let images = src.rc.mkdir("images");
    src.assert_checkpoint_refused(src.cmd("checkpoint", &done, &images, &[]), &images, 7);
    must(src.rc.delete(&done, false), "runc delete stopped container");

    // `runc create`d, not started: its init is runc's own, which CRIU cannot dump (it
    // failed with "Can't lookup mount=… for fd=-3"). Refused, and still startable.
    let created = src.rc.id("-created");
    let bundle = src.rc.bundle("sleeper").args(&["sleep", "1000"]).build();
    src.rc.track(&created);
    must(
        src.rc
            .cmd()
            .args(["create", "--bundle"])
            .arg(&bundle)
            .arg(&created)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .unwrap(),
        "runc create",
    );
    let out = src.cmd("checkpoint", &created, &images, &[]).run();
    out.assert_error(7);
    assert!(out.stderr.contains("created, not started"), "{out:?}");
    assert_eq!(src.rc.status(&created).as_deref(), Some("created"));
    must(
        src.rc.cmd().args(["start", &created]).output().unwrap(),
        "runc start",
    );
    src.rc.wait_status(&created, "running", T);
    src.rc.kill_and_delete(&created);

    // A process `runc exec` started is outside the init's tree CRIU dumps: refused while
    // frozen, rather than checkpointed without it. The source runs on with it.
    src.rc.exec_detached(&src.id, &["sleep", "1000"]);
    let out = src.cmd("checkpoint", &src.id, &images, &[]).run();
    out.assert_error(7);
    assert!(
        out.stderr.contains("outside its init's process tree"),
        "{out:?}"
    );
    assert!(!images.join("ferry.json").exists());
    src.assert_healthy();
    src.finish();
}

/// A failed checkpoint took its images back (no `ferry.json` vouches for anything, the
/// disk is free again); at most CRIU's log is left.
#[track_caller]
fn assert_only_the_log_left(images: &Path) {
    let left: Vec<String> = std::fs::read_dir(images)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "dump.log")
        .collect();
    assert!(left.is_empty(), "left in {}: {left:?}", images.display());
}

fn write_script(path: &Path, body: &str) {
    fs::write(path, body).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A checkpoint into a filesystem too small for the images: the dump fails with exit 5 and
/// one line that names the full filesystem first (CRIU's own log is on it and may be cut
/// short, or repeat its complaint once per image buffer), no `ferry.json` vouches for the
/// partial images, and the container runs on.
#[test]
fn checkpoint_into_a_full_filesystem_leaves_the_container_running() {
    if !require_root_and_criu() {
        return;
    }
    let src = Source::start("enospc");
    let full = src.rc.mkdir("full");
    let _tmpfs = Mounted::tmpfs(&full, "256k");
    let images = full.join("images");
    std::fs::create_dir(&images).unwrap();
    let out = src.cmd("checkpoint", &src.id, &images, &[]).run();
    out.assert_error(5);
    assert!(
        out.stderr.contains(&format!(
            "ferry: error: no room left for the images: the filesystem of {} has ",
            images.display()
        )),
        "{out:?}"
    );
    assert!(
        out.stderr.matches("No space left on device").count() <= 1,
        "{out:?}"
    );
    assert_only_the_log_left(&images);
    src.assert_healthy();
    src.finish();
}

/// A dump that filled a filesystem larger than the "full" mark (a 3 MiB deleted file into a
/// 2 MiB tmpfs) is still named a full filesystem (exit 5), although removing its partial
/// images gives the room back; only the log is left.
#[test]
fn a_dump_that_filled_its_filesystem_is_named_so_after_its_images_go() {
    if !require_root_and_criu() {
        return;
    }
    let src = Source::start_with("ghostfull", |b| {
        b.args(&ghost_counter_args("/data/counter", 3072))
    });
    let full = src.rc.mkdir("full");
    let _tmpfs = Mounted::tmpfs(&full, "2m");
    let images = full.join("images");
    let failed = src
        .cmd("checkpoint", &src.id, &images, &["--ghost-limit", "4M"])
        .run();
    failed.assert_error(5);
    assert!(
        failed
            .stderr
            .contains("ferry: error: no room left for the images: the filesystem of"),
        "{failed:?}"
    );
    assert_only_the_log_left(&images);
    src.assert_runs_on(10);
    src.rc.kill_and_delete(&src.id);
    src.finish();
}

/// A file the container deleted but keeps open, over CRIU's 1 MiB ghost limit: the
/// checkpoint fails with a line naming `--ghost-limit` (exit 6, CRIU), the container runs on;
/// a retry into the same images dir with the limit raised checkpoints it, and after the
/// restore the process still reads the file's content.
#[test]
fn a_deleted_open_file_over_the_ghost_limit_needs_the_flag() {
    if !require_root_and_criu() {
        return;
    }
    let src = Source::start_with("ghost", |b| {
        b.args(&ghost_counter_args("/data/counter", 2048))
    });
    let (rc, id, out) = (&src.rc, &src.id, &src.out);
    let images = rc.mkdir("images");
    let failed = src.cmd("checkpoint", id, &images, &[]).run();
    failed.assert_error(6);
    assert!(
        failed.stderr.contains("Can't dump ghost file")
            && failed.stderr.contains("--ghost-limit raises it"),
        "{failed:?}"
    );
    assert_only_the_log_left(&images);
    src.assert_runs_on(10);

    src.cmd("checkpoint", id, &images, &["--ghost-limit", "4M"])
        .run()
        .ok();
    assert_stopped_writing(out);
    let n = read_counter_lines(out).len();
    ferry_restore(rc, id, &images, &[]);
    wait_counter_lines(out, n + 10, T);
    assert_file_counts_from_one(out, n + 10);
    assert_ghost_kept(rc, id);
    rc.kill_and_delete(id);
    src.finish();
}

/// SIGTERM to `ferry checkpoint` (its process group, as a supervisor stopping the job)
/// while the container is frozen: the dump is failed at CRIU's post-dump, CRIU resumes the
/// tasks, ferry exits 10 saying so, the counter runs on, and the images dir holds no
/// `ferry.json` (nothing would restore the partial images).
#[test]
fn interrupted_checkpoint_leaves_the_container_running() {
    if !require_root_and_criu() {
        return;
    }
    let src = Source::start("intr");
    let images = src.rc.mkdir("images");
    let out = src
        .cmd("checkpoint", &src.id, &images, &["-vv"])
        .run_signalled(libc::SIGTERM, |err| err.contains("container frozen"));
    let error = out.assert_verbose_error(10);
    assert!(error.contains("interrupted by SIGTERM"), "{out:?}");
    assert!(
        out.stderr.contains("failing the dump at PostDump"),
        "not stopped at post-dump: {out:?}"
    );
    assert!(
        !images.join("ferry.json").exists(),
        "an interrupted checkpoint vouches for its images"
    );
    assert_only_the_log_left(&images);
    src.assert_healthy();
    src.finish();
}

/// SIGINT to `ferry restore` (a terminal's Ctrl-C): the restore is failed at CRIU's
/// post-restore, before the restored tasks ran, ferry exits 10, no container, mount or
/// cgroup is left (the suite's leak check), the images are as they were, and a second
/// restore from them brings the counter back.
#[test]
fn interrupted_restore_leaves_nothing_and_the_images_restore() {
    if !require_root_and_criu() {
        return;
    }
    let rc = Runc::new("intrrest");
    let id = rc.id("");
    let (out, _bundle) = start_file_counter(&rc, &id);
    wait_counter_lines(&out, 10, T);
    let images = rc.mkdir("images");
    ferry_checkpoint(&rc, &id, &images, false);
    let n = read_counter_lines(&out).len();
    let snap = snapshot_tree(&images);
    let res = cr_cmd("restore", &id, &images, &["-vv"], s(&rc.root))
        .run_signalled(libc::SIGINT, |err| err.contains("restoring"));
    let error = res.assert_verbose_error(10);
    assert!(error.contains("interrupted by SIGINT"), "{res:?}");
    assert!(
        res.stderr.contains("failing the restore at post-restore"),
        "not stopped at post-restore: {res:?}"
    );
    assert!(rc.try_state(&id).is_none(), "{id} left in runc: {res:?}");
    assert_tree_kept(&images, &snap);
    assert_eq!(read_counter_lines(&out).len(), n, "the restored tasks ran");
    leak_check(&rc.ids());
    ferry_restore(&rc, &id, &images, &[]);
    wait_counter_lines(&out, n + 10, T);
    assert_file_counts_from_one(&out, n + 10);
    rc.kill_and_delete(&id);
    rc.teardown();
    leak_check(&rc.ids());
}

#[test]
fn bad_input_criu_missing() {
    if !require_root_and_criu() {
        return;
    }
    let src = Source::start("badnocriu");
    let images = src.rc.mkdir("images");
    let missing = src.rc.path("no-such-dir/criu");
    let cmd = src.cmd("checkpoint", &src.id, &images, &[]);
    src.assert_checkpoint_refused(cmd.env("FERRY_CRIU", s(&missing)), &images, 5);
    src.finish();
}

#[test]
fn bad_input_criu_too_old_or_broken() {
    if !require_root_and_criu() {
        return;
    }
    let src = Source::start("badoldcriu");
    let images = src.rc.mkdir("images");

    // Claims 3.11 and fails for anything else (including `swrk`).
    let old = src.rc.path("old-criu");
    write_script(
        &old,
        "#!/bin/sh\nif [ \"$1\" = --version ] || [ \"$1\" = -V ]; then echo 'Version: 3.11'; exit 0; fi\nexit 1\n",
    );
    // Claims a recent version but exits at once when started as `swrk`.
    let broken = src.rc.path("broken-criu");
    write_script(
        &broken,
        "#!/bin/sh\nif [ \"$1\" = --version ] || [ \"$1\" = -V ]; then echo 'Version: 4.2.1'; exit 0; fi\nexit 1\n",
    );

    for fake in [&old, &broken] {
        let cmd = src.cmd("checkpoint", &src.id, &images, &[]);
        src.assert_checkpoint_refused(cmd.env("FERRY_CRIU", s(fake)), &images, 5);
    }
    src.finish();
}

#[test]
fn bad_input_usage_error() {
    // No container needed; still gate on the environment so a bare `cargo test` behaves
    // the same as for the other tests.
    if !require_root_and_criu() {
        return;
    }
    ferry(&["checkpoint"]).assert_error(2);
    ferry(&["restore", "x", "--no-such-flag"]).assert_error(2);
}

// ---------------------------------------------------------------------------------------
// Last: nothing left behind by this test binary
// ---------------------------------------------------------------------------------------

#[test]
fn zz_no_leftovers() {
    if !require_root_and_criu() {
        return;
    }
    global_leak_check();
}

/// A restore that CRIU itself fails (corrupt page data) undoes everything ferry set up: no
/// runc state, no cgroups, no criu-root mount, no processes, and the bundle's rootfs intact
/// (runc's own `delete -f` after such a failure would delete the rootfs through the mount).
#[test]
fn failed_restore_by_criu_cleans_up_without_touching_the_rootfs() {
    if !require_root_and_criu() {
        return;
    }
    let src = Source::start("criufail");
    let images = src.rc.mkdir("images");
    ferry_checkpoint(&src.rc, &src.id, &images, true);
    let pages = fs::read_dir(&images)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("pages-")
        })
        .expect("a pages image");
    fs::write(&pages, b"").unwrap();
    let rootfs_snap = snapshot_tree(&src.bundle.join("rootfs"));
    let other = src.rc.id("-other");
    // Twenty old failures' logs of processes long gone: this failure keeps its own logs
    // and prunes the oldest others, so that at most 16 stay.
    let planted = plant_kept_logs(&other, 20);
    // An empty pages image sends CRIU 4.2.1 into an endless loop: ferry's per-answer
    // timeout must end it and the cleanup must kill what CRIU left in the cgroups.
    let out = ferry(&[
        "restore",
        &other,
        "--images",
        s(&images),
        "--rename",
        "--runtime-root",
        src.root(),
        "--timeout",
        "15",
    ]);
    out.assert_error(6);
    src.assert_not_created(&other);
    assert_tree_kept(&src.bundle.join("rootfs"), &rootfs_snap);
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains("criu-root"),
        "criu-root still mounted:\n{mounts}"
    );
    for ctrl in ["freezer", "pids", "cpu", "devices"] {
        let d = Path::new("/sys/fs/cgroup").join(ctrl).join(&other);
        assert!(!d.exists(), "cgroup {} left behind", d.display());
    }
    let own = fs::read_dir("/run/ferry")
        .unwrap()
        .flatten()
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("restore-{other}-"))
        })
        .expect("the failed restore's logs are kept");
    assert!(own.path().join("restore.log").exists());
    let kept_dead = fs::read_dir("/run/ferry")
        .unwrap()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let pid = n.rsplit('-').next().unwrap_or("");
            n.starts_with("restore-")
                && !Path::new("/proc").join(pid).exists()
                && e.path() != own.path()
        })
        .count();
    assert!(
        kept_dead <= 16,
        "{kept_dead} earlier failures' dirs kept besides this one's"
    );
    for (i, p) in planted.iter().enumerate() {
        // planted[0] is the oldest.
        if i < 4 {
            assert!(!p.exists(), "not pruned: {}", p.display());
        }
        safe_remove_dir_all(p);
    }
    src.assert_healthy();
    src.finish();
}

/// `n` dirs like a failed restore's kept logs (`/run/ferry/restore-<id>.<i>-<pid>`), of a
/// process that is gone, the oldest first (a year old, then a minute younger each).
fn plant_kept_logs(id: &str, n: u64) -> Vec<PathBuf> {
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let dead = c.id();
    c.wait().unwrap();
    (0..n)
        .map(|i| {
            let d = Path::new("/run/ferry").join(format!("restore-{id}.old{i}-{dead}"));
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("restore.log"), "an old failure\n").unwrap();
            let t = std::time::SystemTime::now() - Duration::from_secs(365 * 86400 - i * 60);
            fs::File::open(&d).unwrap().set_modified(t).unwrap();
            d
        })
        .collect()
}

fn terminal_counter_values(path: &Path) -> Vec<u64> {
    let text = String::from_utf8_lossy(&fs::read(path).unwrap_or_default()).into_owned();
    let complete = text.rsplit_once('\n').map(|(a, _)| a).unwrap_or("");
    complete
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// A container with a terminal: its pty master comes back through CRIU's orphan-pts-master
/// notification and ferry hands it to `--console-socket`, as runc does.
#[test]
fn terminal_container_restores_through_console_socket() {
    if !require_root_and_criu() {
        return;
    }
    let rc = Runc::new("tty");
    let id = rc.id("");
    let bundle = rc.bundle("counter").terminal().build();
    let out1 = rc.path("tty1.txt");
    let sock1 = rc.path("console1.sock");
    let recv1 = console_receiver(&sock1, out1.clone());
    rc.run_with_console(&id, &bundle, &sock1);
    wait_for(T, "counter on the terminal", || {
        terminal_counter_values(&out1).len() >= 10
    });

    let images = rc.mkdir("images");
    ferry_checkpoint(&rc, &id, &images, false);
    recv1.join().unwrap();
    let before = terminal_counter_values(&out1);
    let last = *before.last().unwrap();

    // Without a console socket the restore is refused up front.
    cr_cmd("restore", &id, &images, &[], s(&rc.root))
        .run()
        .assert_error(4);

    let out2 = rc.path("tty2.txt");
    let sock2 = rc.path("console2.sock");
    let _recv2 = console_receiver(&sock2, out2.clone());
    ferry_restore(&rc, &id, &images, &["--console-socket", s(&sock2)]);
    wait_for(T, "counter on the restored terminal", || {
        terminal_counter_values(&out2).len() >= 10
    });
    let after = terminal_counter_values(&out2);
    assert_eq!(
        after[0],
        last + 1,
        "terminal counter: {last} before, {:?} after",
        &after[..3]
    );
    assert_strictly_continues(&after, 10);

    rc.kill_and_delete(&id);
    rc.teardown();
    leak_check(&rc.ids());
}
