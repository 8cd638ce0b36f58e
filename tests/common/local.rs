//! Local checkpoint and restore with ferry (`ferry checkpoint` / `ferry restore` against a
//! runc root), asserting success and the shape of their JSON reports.

use std::path::Path;

use serde_json::Value;

use super::*;

/// The fields of `ferry checkpoint --json`: three strings, the counts, then a flag.
pub const CHECKPOINT_FIELDS: &[&str] = &[
    "criu_version",
    "container",
    "images",
    "freezing_time_us",
    "frozen_time_us",
    "memdump_time_us",
    "memwrite_time_us",
    "pages_scanned",
    "pages_written",
    "elapsed_ms",
    "leave_running",
];

pub const RESTORE_FIELDS: &[&str] = &["criu_version", "container", "pid", "elapsed_ms", "paused"];

#[track_caller]
pub fn assert_version_string(v: &Value) {
    let ver = v["criu_version"]
        .as_str()
        .unwrap_or_else(|| panic!("criu_version: {v}"));
    assert!(
        ver.split('.').count() >= 2 && ver.split('.').all(|p| p.parse::<u32>().is_ok()),
        "criu_version {ver:?} is not a dotted version"
    );
}

/// `ferry checkpoint <id> --images DIR --runtime-root R --json [--leave-running]`,
/// asserting success and the JSON shape.
#[track_caller]
pub fn ferry_checkpoint(rc: &Runc, id: &str, images: &Path, leave_running: bool) -> Value {
    let root = rc.root.clone();
    let mut args = vec![
        "checkpoint",
        id,
        "--images",
        s(images),
        "--runtime-root",
        s(&root),
    ];
    if leave_running {
        args.push("--leave-running");
    }
    args.push("--json");
    let out = ferry(&args);
    out.ok();
    let v = out.json();
    assert_fields(&v, CHECKPOINT_FIELDS);
    assert_version_string(&v);
    assert_eq!(v["container"], id, "{v}");
    assert!(v["images"].is_string(), "images: {v}");
    // Every field but the strings and the flag is a count.
    for f in &CHECKPOINT_FIELDS[3..CHECKPOINT_FIELDS.len() - 1] {
        json_u64(&v, f);
    }
    assert!(json_u64(&v, "pages_written") > 0, "pages_written: {v}");
    assert!(
        json_u64(&v, "pages_scanned") >= json_u64(&v, "pages_written"),
        "{v}"
    );
    assert_eq!(v["leave_running"], leave_running, "{v}");
    v
}

/// `ferry restore <id> --images DIR --runtime-root R --json [extra...]`, asserting
/// success, the JSON shape and that runc now shows the container running with that pid.
#[track_caller]
pub fn ferry_restore(rc: &Runc, id: &str, images: &Path, extra: &[&str]) -> u64 {
    rc.track(id);
    let root = rc.root.clone();
    let mut args = vec![
        "restore",
        id,
        "--images",
        s(images),
        "--runtime-root",
        s(&root),
    ];
    args.extend_from_slice(extra);
    args.push("--json");
    let out = ferry(&args);
    out.ok();
    let v = out.json();
    assert_fields(&v, RESTORE_FIELDS);
    assert_version_string(&v);
    assert_eq!(v["container"], id, "{v}");
    let pid = json_u64(&v, "pid");
    assert!(pid > 0, "{v}");
    let st = rc.state(id);
    // Checkpointed paused, restored paused.
    let want = if v["paused"] == true {
        "paused"
    } else {
        "running"
    };
    assert_eq!(st["status"], want, "runc state after restore: {st}");
    assert_eq!(
        st["pid"].as_u64(),
        Some(pid),
        "runc state pid vs ferry pid: {st} / {v}"
    );
    pid
}

#[track_caller]
pub fn assert_exec_works(rc: &Runc, id: &str) {
    let out = must(
        rc.exec(id, &["echo", "hi"]),
        &format!("runc exec {id} echo hi"),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
}

/// The counter output in `path` is one unbroken sequence 1, 2, 3, … of at least `min`.
#[track_caller]
pub fn assert_file_counts_from_one(path: &Path, min: usize) -> Vec<u64> {
    let v = read_counter_lines(path);
    assert!(!v.is_empty(), "{} is empty", path.display());
    assert_eq!(v[0], 1, "counter in {} does not start at 1", path.display());
    assert_strictly_continues(&v, min);
    v
}

/// A paused container (`runc pause`): checkpoint (with and without --leave-running) keeps it
/// paused, and the restore brings it back paused (it does not count) until `runc resume`,
/// then it counts on strictly. `t`: how long counting may take.
pub fn paused_checkpoint_restore(t: Duration) {
    let rc = Runc::new("paused");
    let id = rc.id("");
    let (out, _bundle) = start_file_counter(&rc, &id);
    wait_counter_lines(&out, 20, t);
    rc.pause(&id);
    std::thread::sleep(Duration::from_millis(200));
    let n = read_counter_lines(&out).len();

    let kept = rc.mkdir("images-kept");
    let v = ferry_checkpoint(&rc, &id, &kept, true);
    assert_eq!(rc.status(&id).as_deref(), Some("paused"), "{v}");
    let images = rc.mkdir("images");
    ferry_checkpoint(&rc, &id, &images, false);
    assert!(!rc.list_ids().contains(&id));

    // ferry_restore checks that runc says paused (the report's `paused`).
    let meta: Value =
        serde_json::from_str(&fs::read_to_string(images.join("ferry.json")).unwrap()).unwrap();
    assert_eq!(meta["paused"], true, "{meta}");
    ferry_restore(&rc, &id, &images, &[]);
    assert_eq!(rc.status(&id).as_deref(), Some("paused"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        read_counter_lines(&out).len(),
        n,
        "the restored container ran"
    );
    rc.resume(&id);
    wait_counter_lines(&out, n + 10, t);
    assert_file_counts_from_one(&out, n + 10);

    rc.kill_and_delete(&id);
    rc.teardown();
    leak_check(&rc.ids());
}
