//! A cgroup v2-only host (Debian's default under systemd: one hierarchy at /sys/fs/cgroup),
//! in the VM rig's `--cgroup2` guest: a container's limits (huge pages and runc's `unified`
//! files too) and device rules come back with a local restore and with a migration. There
//! the device rules are an eBPF program on the container's cgroup, which neither CRIU nor
//! `runc update` restores, and the limits are the v2 files (`memory.max`, `cpu.max`, …).
//!
//! Ignored in a plain `cargo test`: `tests/vm/run --cgroup2` runs them in the guest with
//! `--ignored --test-threads=1`, `CI` set and `FERRY_VM_CGROUPS=v2`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::local::*;
use common::migration::*;
use common::vm::where_hint;
use common::*;
use serde_json::Value;

/// Things that take well under a second on the host take several under emulation.
const T: Duration = Duration::from_secs(60);

/// Root, CRIU, and a v2-only host; in the rig anything else is a failure.
fn require_cgroup2() -> bool {
    if !require_root_and_criu() {
        return false;
    }
    assert!(
        cgroup_v2_only(),
        "/sys/fs/cgroup is not a cgroup v2 hierarchy (FERRY_VM_CGROUPS={:?}){}",
        std::env::var("FERRY_VM_CGROUPS").unwrap_or_default(),
        where_hint()
    );
    true
}

/// A device node the container's rules do not allow: the guest's hardware RNG (opening it
/// has no effect and needs no capability, so only the device rules can refuse it).
const RNG: &str = "/dev/hwrng";

/// The container's v2 cgroup directory, from runc's state.json.
fn v2_dir(state: &Value) -> String {
    state["cgroup_paths"][""]
        .as_str()
        .unwrap_or_else(|| panic!("no cgroup v2 path in {state}"))
        .to_string()
}

/// The limits of [`test_limits`] are in the container's v2 files, and its device rules
/// hold: /dev/null opens, the bound-in RNG (at /rng) does not.
#[track_caller]
fn assert_confined(rc: &Runc, id: &str, which: &str) {
    let dir = v2_dir(&rc.state_file(id));
    for (file, want) in TEST_LIMITS_V2 {
        let path = Path::new(&dir).join(file);
        let got = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{} of the {which}: {e}", path.display()));
        assert_eq!(got.trim_end(), want, "{file} of the {which}");
    }
    must(
        rc.exec(id, &["sh", "-c", ": </dev/null"]),
        &format!("open /dev/null in the {which}"),
    );
    let out = rc.exec(id, &["sh", "-c", ": </rng"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Operation not permitted"),
        "the {which} opened {RNG} (its device rules do not allow it): status {}, stderr {err:?}",
        out.status
    );
}

/// `memory.high` given through `linux.resources.unified` (192 MiB).
const HIGH: &str = "201326592";

/// A huge page limit (`linux.resources.hugepageLimits`, 2 MiB pages): two pages.
const HUGE: &str = "4194304";

/// A file of the container's v2 cgroup, trimmed.
fn v2_file(rc: &Runc, id: &str, file: &str) -> String {
    let path = Path::new(&v2_dir(&rc.state_file(id))).join(file);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim_end()
        .to_string()
}

#[test]
#[ignore = "runs inside the VM rig (tests/vm/run --cgroup2)"]
fn check_reports_the_v2_layout() {
    if !require_cgroup2() {
        return;
    }
    let out = ferry(&["check", "--json"]);
    out.ok();
    let v = out.json();
    assert_eq!(v["cgroups"], "v2", "{v}");
}

#[test]
#[ignore = "runs inside the VM rig (tests/vm/run --cgroup2)"]
fn checkpoint_restore_keeps_limits_and_device_rules() {
    if !require_cgroup2() {
        return;
    }
    assert!(Path::new(RNG).exists(), "no {RNG} in the guest");
    // A raw v2 file through runc's `unified` map and a huge page limit, besides the usual
    // limits.
    let mut resources = test_limits().0;
    resources["unified"] = serde_json::json!({ "memory.high": HIGH });
    resources["hugepageLimits"] =
        serde_json::json!([{"pageSize": "2MB", "limit": HUGE.parse::<u64>().unwrap()}]);
    let rc = Runc::new("cg2");
    let id = rc.id("");
    let (out, _bundle) = start_file_counter_with(&rc, &id, |b| {
        b.bind(Path::new(RNG), "/rng").resources(resources)
    });
    wait_counter_lines(&out, 5, T);
    assert_confined(&rc, &id, "container");
    let extras = [("memory.high", HIGH), ("hugetlb.2MB.max", HUGE)];
    for (file, want) in extras {
        assert_eq!(v2_file(&rc, &id, file), want, "{file} of the container");
    }
    // --leave-running: the v2 freezer (cgroup.freeze) is thawed again, the counter goes on.
    let kept = rc.mkdir("images-kept");
    ferry_checkpoint(&rc, &id, &kept, true);
    assert_eq!(rc.status(&id).as_deref(), Some("running"));
    let n = read_counter_lines(&out).len();
    wait_counter_lines(&out, n + 5, T);
    let images = rc.mkdir("images");
    ferry_checkpoint(&rc, &id, &images, false);
    ferry_restore(&rc, &id, &images, &[]);
    assert_confined(&rc, &id, "restored container");
    for (file, want) in extras {
        assert_eq!(
            v2_file(&rc, &id, file),
            want,
            "{file} of the restored container"
        );
    }
    let n = read_counter_lines(&out).len();
    wait_counter_lines(&out, n + 5, T);
    assert_strictly_continues(&read_counter_lines(&out), n + 5);
    rc.kill_and_delete(&id);
    rc.teardown();
    leak_check(&rc.ids());
}

/// A paused container stays paused through checkpoint and restore on v2 too, where the
/// freezer is `cgroup.freeze` in the one hierarchy that CRIU shares with the container until
/// it is done.
#[test]
#[ignore = "runs inside the VM rig (tests/vm/run --cgroup2)"]
fn paused_container_checkpoint_restore_stays_paused() {
    if !require_cgroup2() {
        return;
    }
    paused_checkpoint_restore(T);
}

#[test]
#[ignore = "runs inside the VM rig (tests/vm/run --cgroup2)"]
fn migration_keeps_limits_and_device_rules() {
    migration_keeps_limits_and_device_rules_in("cg2m", "stop-copy");
}

/// The same in post-copy: CRIU's lazy-pages daemon serves the restored tasks in their v2
/// cgroup while the pages arrive.
#[test]
#[ignore = "runs inside the VM rig (tests/vm/run --cgroup2)"]
fn post_copy_migration_keeps_limits_and_device_rules() {
    migration_keeps_limits_and_device_rules_in("cg2pc", "post-copy");
}

/// And in pre-copy (this guest's kernel tracks dirty memory): the rounds freeze nothing,
/// the final dump and restore are as in stop-copy.
#[test]
#[ignore = "runs inside the VM rig (tests/vm/run --cgroup2)"]
fn pre_copy_migration_keeps_limits_and_device_rules() {
    migration_keeps_limits_and_device_rules_in("cg2pre", "pre-copy");
}

fn migration_keeps_limits_and_device_rules_in(name: &str, mode: &str) {
    if !require_cgroup2() || !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new(name);
    let w = start_counter_with(&th, "", &[(Path::new(RNG), "/rng")]);
    assert_confined(th.src_runc(), &w.id, "source container");
    let serve = th.serve(&[]);
    let out = th.migrate(&w.id, &serve.addr, &["--mode", mode]);
    assert_counter_migrated(&th, &w, &out, Some(mode), 20);
    assert_confined(th.dst_runc(), &w.id, "migrated container");
    th.dst_runc().kill_and_delete(&w.id);
    drop(serve);
    th.finish();
}

/// The destination's restore fails (a bind-mount source is renamed away after the
/// destination prepared, while the rootfs crosses the link): the source container resumes,
/// still confined, and the destination is clean (its cgroups, with the device program ferry
/// attached, removed).
#[test]
#[ignore = "runs inside the VM rig (tests/vm/run --cgroup2)"]
fn failed_restore_resumes_the_source_confined() {
    if !require_cgroup2() || !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("cg2f");
    let extra = th.src_runc().mkdir("extra");
    let w = start_counter_with(&th, "", &[(Path::new(RNG), "/rng"), (&extra, "/extra")]);
    add_rootfs_ballast(&w);
    let serve = th.serve(&[]);
    let moved = th.src_runc().path("extra.moved");
    let out = migrate_with_fault(&th, &w.id, &serve.addr, "stop-copy", || {
        std::fs::rename(&extra, &moved).unwrap()
    });
    assert_counter_not_migrated(&th, &w, &out, &[8], T);
    assert_confined(th.src_runc(), &w.id, "resumed source container");
    assert!(
        serve.is_alive(),
        "ferry serve exited after a failed migration"
    );
    th.src_runc().kill_and_delete(&w.id);
    drop(serve);
    th.finish();
}

/// The destination keeps received containers in a delegated subtree that was given no pids
/// controller (its parent enables only cpu, cpuset and memory for it), and the container
/// has a pids limit: refused when the destination prepares, before the source freezes
/// (exit 8, naming the limit and the cgroup), the source running on confined, the
/// destination clean. Without the check the source froze, the restore failed writing
/// pids.max, and the source resumed.
#[test]
#[ignore = "runs inside the VM rig (tests/vm/run --cgroup2)"]
fn limits_the_destination_cannot_set_are_refused_before_the_freeze() {
    if !require_cgroup2() || !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("cg2lim");
    let w = start_counter_with(&th, "", &[(Path::new(RNG), "/rng")]);
    let own = v2_dir(&th.src_runc().state_file(&w.id));
    let name = format!("{}-nopids", dst_cgroup_prefix());
    // Its child `inner` gets only the cpu, cpuset and memory controllers.
    let subtree = MadeCgroup::make(
        &Path::new(&own).parent().unwrap().join(&name),
        &[("cgroup.subtree_control", "+cpu +cpuset +memory")],
    )
    .child("inner", &[]);
    let serve = th.serve(&["--cgroup-prefix", &format!("{name}/inner")]);
    let out = th.migrate(&w.id, &serve.addr, &["--mode", "stop-copy", "-v"]);
    let error = out.assert_verbose_error(8).to_string();
    let says = format!(
        "the container's pids.max is 99 and this host's cgroup {} has no pids.max",
        subtree.path().display()
    );
    assert!(error.contains(&says), "{out:?}");
    assert_counter_refused_before_the_freeze(&th, &w, &serve, &out);
    assert_confined(th.src_runc(), &w.id, "source container");
    subtree.remove();
    th.src_runc().kill_and_delete(&w.id);
    drop(serve);
    th.finish();
}

#[test]
#[ignore = "runs inside the VM rig (tests/vm/run --cgroup2)"]
fn zz_no_leftovers() {
    if !require_cgroup2() {
        return;
    }
    assert_no_leftovers();
}
