//! containerd-shim-ferry-v2 on a real containerd (Debian's, 1.6.20 on bookworm), driven with
//! `ctr`: lifecycle, exec, pause/resume, events, stdin and terminals (exec and init, window
//! size), resource updates (over the shim's ttrpc: ctr 1.6 has no update), checkpoint,
//! restore under a new id, a failed restore, and live migration of a containerd task between
//! two emulated hosts.
//!
//! Each test starts its own containerd with a temporary config (CRI plugin disabled, state
//! and socket under /run/fctd-<pid>-<n>, root under /var/tmp/ferry-test), imports a busybox
//! OCI image built here from Debian's busybox-static (no registry), and runs containers with
//! `--runtime io.containerd.ferry.v2`; the shim is found on containerd's PATH (cargo's
//! target dir first). Needs root, criu, runc, busybox-static, containerd and ctr; with CI set
//! a missing one fails the test. Run with `--test-threads=1`. `FERRY_TEST_CONTAINERD_DIR=DIR`
//! takes containerd and ctr from DIR instead of the PATH: `scripts/test.sh` runs this suite a
//! second time with Debian trixie's containerd 1.7 (unpacked by `scripts/setup.sh`), and
//! `FERRY_TEST_CONTAINERD_VERSION=V` makes every test check that the daemon's version starts
//! with V.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

const T: Duration = Duration::from_secs(30);
const IMAGE: &str = "localhost/ferry/busybox:test";
const RUNTIME: &str = "io.containerd.ferry.v2";
const NS: &str = "ferry-test";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// `containerd` or `ctr`: from `FERRY_TEST_CONTAINERD_DIR` when set, else from the PATH.
fn containerd_prog(name: &str) -> PathBuf {
    match std::env::var_os("FERRY_TEST_CONTAINERD_DIR") {
        Some(d) if !d.is_empty() => Path::new(&d).join(name),
        _ => PathBuf::from(name),
    }
}

/// containerd and ctr present (CI: must be).
fn require_containerd() -> bool {
    if !require_root_and_criu() {
        return false;
    }
    let mut missing = Vec::new();
    for p in ["containerd", "ctr"] {
        let prog = containerd_prog(p);
        let found = if prog.components().count() > 1 {
            prog.is_file()
        } else {
            find_program(p).is_some()
        };
        if !found {
            missing.push(format!(
                "`{}` not found (apt-get install containerd)",
                prog.display()
            ));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let reason = missing.join("; ");
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("CI is set, refusing to skip: {reason}");
    }
    eprintln!("skipping: {reason}");
    false
}

fn shim_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-ferry-v2"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An OCI image layout tarball with one layer: /bin/busybox and a few applet links.
fn build_busybox_image(dir: &Path) -> PathBuf {
    let tarball = dir.join("busybox-oci.tar");
    if tarball.exists() {
        return tarball;
    }
    let rootfs = dir.join("img-rootfs");
    let oci = dir.join("img-oci");
    safe_remove_dir_all(&rootfs);
    safe_remove_dir_all(&oci);
    fs::create_dir_all(rootfs.join("bin")).unwrap();
    for d in ["data", "tmp", "proc", "sys", "dev", "etc"] {
        fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    fs::copy(host_busybox().unwrap(), rootfs.join("bin/busybox")).unwrap();
    for a in ["sh", "echo", "sleep", "cat", "true", "kill", "ps"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).unwrap();
    }
    let blobs = oci.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let layer_tmp = dir.join("layer.tar");
    must(
        run_output(Command::new("tar").args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-C",
            s(&rootfs),
            "-cf",
            s(&layer_tmp),
            ".",
        ])),
        "tar layer",
    );
    let layer = fs::read(&layer_tmp).unwrap();
    fs::remove_file(&layer_tmp).unwrap();
    let put = |data: &[u8]| -> (String, usize) {
        let d = sha256_hex(data);
        fs::write(blobs.join(&d), data).unwrap();
        (d, data.len())
    };
    let (ld, ls) = put(&layer);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{ld}")]}
    });
    let (cd, cs) = put(config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{cd}"), "size": cs},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": format!("sha256:{ld}"), "size": ls}]
    });
    let (md, ms) = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": format!("sha256:{md}"), "size": ms,
                       "platform": {"architecture": "amd64", "os": "linux"},
                       "annotations": {"io.containerd.image.name": IMAGE,
                                       "org.opencontainers.image.ref.name": "test"}}]
    });
    fs::write(oci.join("index.json"), index.to_string()).unwrap();
    fs::write(oci.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    must(
        run_output(Command::new("tar").args(["-C", s(&oci), "-cf", s(&tarball), "."])),
        "tar image",
    );
    safe_remove_dir_all(&rootfs);
    safe_remove_dir_all(&oci);
    tarball
}

/// One containerd instance with its own config, root, state and socket.
struct Containerd {
    /// /run/fctd-<pid>-<n>: state and sockets (short: socket paths are limited).
    run: PathBuf,
    /// /var/tmp/ferry-test/ctd-<pid>-<n>: containerd's root (content, snapshots).
    root: PathBuf,
    sock: PathBuf,
    child: Option<Child>,
    /// Network namespace containerd (and so its shims and containers) runs in, if any.
    netns: Option<String>,
    containers: std::sync::Mutex<Vec<String>>,
}

impl Containerd {
    fn start(netns: Option<&str>) -> Containerd {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}-{n}", std::process::id());
        let run = PathBuf::from(format!("/run/fctd-{tag}"));
        let root = Path::new(WORK_BASE).join(format!("ctd-{tag}"));
        safe_remove_dir_all(&run);
        safe_remove_dir_all(&root);
        fs::create_dir_all(&run).unwrap();
        fs::create_dir_all(&root).unwrap();
        let sock = run.join("c.sock");
        let config = format!(
            "version = 2\nroot = \"{}\"\nstate = \"{}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{}\"\n",
            root.join("root").display(),
            run.join("state").display(),
            sock.display()
        );
        fs::write(run.join("config.toml"), config).unwrap();
        let log = fs::File::create(run.join("containerd.log")).unwrap();
        let path = format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            shim_dir().display()
        );
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}"))
                    .arg("--")
                    .arg(containerd_prog("containerd"));
                c
            }
            None => Command::new(containerd_prog("containerd")),
        };
        cmd.arg("--config")
            .arg(run.join("config.toml"))
            .arg("--log-level")
            .arg("debug")
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().expect("start containerd");
        let c = Containerd {
            run,
            root,
            sock,
            child: Some(child),
            netns: netns.map(str::to_string),
            containers: std::sync::Mutex::new(Vec::new()),
        };
        wait_for(T, "containerd to answer", || {
            c.sock.exists() && c.ctr_out(&["version"]).status.success()
        });
        // The suite's second run (scripts/test.sh) says which containerd it means to test.
        if let Ok(want) = std::env::var("FERRY_TEST_CONTAINERD_VERSION") {
            let v = c.ctr(&["version"]);
            let server = v.split("Server:").nth(1).unwrap_or_default();
            assert!(
                server.contains(&format!("Version:  {want}")),
                "containerd is not version {want}: {v}"
            );
        }
        c
    }

    fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(containerd_prog("ctr"));
        cmd.arg("-a").arg(&self.sock).arg("-n").arg(NS).args(args);
        cmd
    }

    fn ctr_out(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = self.ctr_cmd(args);
        cmd.stdin(Stdio::null());
        cmd.output().expect("run ctr")
    }

    #[track_caller]
    fn ctr(&self, args: &[&str]) -> String {
        let out = must(self.ctr_out(args), &format!("ctr {}", args.join(" ")));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn import_image(&self) {
        let tarball = build_busybox_image(Path::new(WORK_BASE));
        self.ctr(&["images", "import", s(&tarball)]);
    }

    fn track(&self, id: &str) {
        let mut v = self.containers.lock().unwrap();
        if !v.iter().any(|x| x == id) {
            v.push(id.to_string());
        }
    }

    /// `ctr run -d` of the file counter (values appended to `<data>/counter`).
    fn run_counter(&self, id: &str, data: &Path, extra: &[&str]) {
        self.run_with(id, data, extra, &counter_file_args("/data/counter"));
    }

    /// `ctr run -d` of `script` with `data` bound at /data.
    fn run_with(&self, id: &str, data: &Path, extra: &[&str], script: &[String]) {
        self.track(id);
        let mount = format!(
            "type=bind,src={},dst=/data,options=rbind:rw",
            data.display()
        );
        let mut args = vec!["run", "-d", "--runtime", RUNTIME, "--mount", &mount];
        args.extend_from_slice(extra);
        args.push(IMAGE);
        args.push(id);
        args.extend(script.iter().map(String::as_str));
        self.ctr(&args);
    }

    /// (pid, status) from `ctr task ls`.
    fn task(&self, id: &str) -> Option<(u32, String)> {
        let out = self.ctr_out(&["task", "ls"]);
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[0] == id).then(|| (f[1].parse().unwrap_or(0), f[2].to_string()))
        })
    }

    #[track_caller]
    fn wait_status(&self, id: &str, status: &str) {
        wait_for(T, &format!("task {id} to be {status}"), || {
            self.task(id).is_some_and(|(_, s)| s == status)
        });
    }

    fn remove(&self, id: &str) {
        let _ = self.ctr_out(&["task", "kill", "-s", "KILL", id]);
        let deadline = Instant::now() + T;
        while Instant::now() < deadline {
            match self.task(id) {
                None => break,
                Some((_, s)) if s != "RUNNING" && s != "PAUSED" => {
                    let _ = self.ctr_out(&["task", "delete", id]);
                }
                Some((_, s)) if s == "PAUSED" => {
                    let _ = self.ctr_out(&["task", "resume", id]);
                }
                _ => thread::sleep(Duration::from_millis(50)),
            }
        }
        let _ = self.ctr_out(&["container", "rm", id]);
    }

    /// Bundles (and so rootfs mounts) live under the state dir.
    fn state_mounts(&self) -> Vec<PathBuf> {
        mount_points()
            .into_iter()
            .filter(|m| m.starts_with(&self.run) || m.starts_with(&self.root))
            .collect()
    }

    fn log(&self) -> String {
        fs::read_to_string(self.run.join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let ids: Vec<String> = self.containers.lock().unwrap().clone();
        for id in &ids {
            self.remove(id);
        }
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid with SIGTERM has no memory effects.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if c.try_wait().ok().flatten().is_some() {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for m in self.state_mounts().iter().rev() {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        // The shims' (now empty) runc root for this containerd.
        let root = ferry::shim::containerd::runc_root(&self.sock.to_string_lossy(), NS);
        let _ = fs::remove_dir(&root);
        if let Some(p) = root.parent() {
            let _ = fs::remove_dir(p);
        }
        // containerd's namespace cgroups (runc leaves parents in place).
        if let Ok(rd) = fs::read_dir("/sys/fs/cgroup") {
            for e in rd.flatten() {
                let _ = fs::remove_dir(e.path().join(NS));
            }
        }
        if std::env::var_os("FERRY_TEST_KEEP").is_none() {
            safe_remove_dir_all(&self.run);
            safe_remove_dir_all(&self.root);
        }
        let _ = &self.netns;
    }
}

/// Shim processes still running for containerd instance `c` (by its socket in their args).
fn shim_processes(c: &Containerd) -> Vec<String> {
    let needle = c.sock.to_string_lossy().into_owned();
    let mut v = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = fs::read(e.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        if cmdline.contains("containerd-shim-ferry-v2") && cmdline.contains(&needle) {
            v.push(format!("{}: {cmdline}", e.file_name().to_string_lossy()));
        }
    }
    v
}

#[track_caller]
fn assert_no_shims(c: &Containerd) {
    let start = Instant::now();
    loop {
        let s = shim_processes(c);
        if s.is_empty() {
            return;
        }
        if start.elapsed() > Duration::from_secs(10) {
            panic!("shim processes left: {s:?}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn data_dir(name: &str) -> PathBuf {
    let d = Path::new(WORK_BASE).join(format!("ctd-data-{name}-{}", std::process::id()));
    safe_remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

// ---------------------------------------------------------------------------------------

#[test]
fn containerd_lifecycle_exec_pause_events() {
    if !require_containerd() {
        return;
    }
    let c = Containerd::start(None);
    c.import_image();
    let id = container_id("ctd-life");
    let data = data_dir("life");
    let events_file = c.run.join("events.txt");
    let mut events = c
        .ctr_cmd(&["events"])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&events_file).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(300));

    // stdout through the shim's pipes to a file:// log URI, and the counter file.
    let out = c.run.join("stdout.log");
    let log_uri = format!("file://{}", out.display());
    c.run_with(
        &id,
        &data,
        &["--log-uri", &log_uri],
        &counter_tee_args("/data/counter"),
    );
    let (pid, st) = c.task(&id).expect("task listed");
    assert_eq!(st, "RUNNING");
    assert!(pid > 0);
    wait_counter_lines(&data.join("counter"), 5, T);

    // exec: output through containerd's fifos, exit code back.
    let e = c.ctr_out(&[
        "task",
        "exec",
        "--exec-id",
        "x1",
        &id,
        "sh",
        "-c",
        "echo exec-out; echo exec-err >&2; exit 7",
    ]);
    assert_eq!(e.status.code(), Some(7), "exec exit code: {e:?}");
    assert_eq!(String::from_utf8_lossy(&e.stdout).trim(), "exec-out");
    assert!(String::from_utf8_lossy(&e.stderr).contains("exec-err"));

    // ps lists the init.
    let ps = c.ctr(&["task", "ps", &id]);
    assert!(ps.contains(&pid.to_string()), "ps: {ps}");

    // metrics come from the cgroup.
    let m = c.ctr(&["task", "metrics", &id]);
    assert!(m.contains("memory") || m.contains("pids"), "metrics: {m}");

    // pause / resume: the counter stops, then goes on.
    c.ctr(&["task", "pause", &id]);
    c.wait_status(&id, "PAUSED");
    thread::sleep(Duration::from_millis(200));
    let a = read_counter_lines(&data.join("counter")).len();
    thread::sleep(Duration::from_millis(500));
    let b = read_counter_lines(&data.join("counter")).len();
    assert_eq!(a, b, "counter moved while paused");
    c.ctr(&["task", "resume", &id]);
    c.wait_status(&id, "RUNNING");
    wait_counter_lines(&data.join("counter"), b + 5, T);

    // kill (all processes), exit status, delete.
    c.ctr(&["task", "kill", "--all", "-s", "KILL", &id]);
    c.wait_status(&id, "STOPPED");
    let d = c.ctr_out(&["task", "delete", &id]);
    assert!(d.status.success(), "task delete: {d:?}");
    assert!(c.task(&id).is_none());
    c.ctr(&["container", "rm", &id]);
    assert_no_shims(&c);
    assert!(c
        .state_mounts()
        .iter()
        .all(|m| !m.to_string_lossy().contains(&id)));
    // the counter wrote to stdout too, through the shim's pipe.
    let text = fs::read_to_string(&out).unwrap_or_default();
    assert!(
        parse_counter(&text, "stdout log").len() >= 5,
        "stdout log: {text:?}"
    );

    thread::sleep(Duration::from_millis(300));
    let _ = events.kill();
    let _ = events.wait();
    let ev = fs::read_to_string(&events_file).unwrap();
    let topics: Vec<&str> = ev
        .lines()
        .filter(|l| l.contains(&id) && l.contains("/tasks/"))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("/tasks/")))
        .collect();
    let expect = [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/exit",
        "/tasks/paused",
        "/tasks/resumed",
        "/tasks/exit",
        "/tasks/delete",
    ];
    assert_eq!(topics, expect, "events:\n{ev}");
    leak_check(&[id]);
    safe_remove_dir_all(&data);
}

#[test]
fn containerd_checkpoint_and_restore_live_under_new_id() {
    if !require_containerd() {
        return;
    }
    let c = Containerd::start(None);
    c.import_image();
    let id = container_id("ctd-cr");
    let id2 = container_id("ctd-cr2");
    let data = data_dir("cr");
    let counter = data.join("counter");
    c.run_counter(&id, &data, &["--null-io"]);
    wait_counter_lines(&counter, 5, T);

    // `ctr container checkpoint --task`: pauses, checkpoints (leave running), resumes.
    let ckpt = format!("ferry-test/ckpt-{id}:1");
    c.ctr(&["container", "checkpoint", "--task", &id, &ckpt]);
    c.wait_status(&id, "RUNNING");
    let n = read_counter_lines(&counter).len();
    wait_counter_lines(&counter, n + 5, T);

    // Stop the original, then restore its checkpoint live under a new id.
    c.ctr(&["task", "kill", "-s", "KILL", &id]);
    c.wait_status(&id, "STOPPED");
    c.ctr(&["task", "delete", &id]);
    let before = read_counter_lines(&counter);
    let last = *before.last().unwrap();
    c.track(&id2);
    c.ctr(&["container", "restore", "--live", &id2, &ckpt]);
    c.wait_status(&id2, "RUNNING");
    let (pid2, _) = c.task(&id2).unwrap();
    assert!(pid2 > 0);
    let after = wait_counter_lines(&counter, before.len() + 10, T);
    // The restored counter goes on from the checkpoint's memory: its first value after the
    // stop is at most the last value before (it was checkpointed earlier) plus one.
    let resumed = after[before.len()];
    assert!(
        resumed <= last + 1 && resumed > 1,
        "restored counter restarted instead of continuing: last before {last}, first after {resumed}"
    );
    assert_strictly_continues(&after[before.len()..], 10);

    // The restored task is reaped like any other: exec, kill, exit status, delete.
    let e = c.ctr_out(&[
        "task",
        "exec",
        "--exec-id",
        "r1",
        &id2,
        "sh",
        "-c",
        "echo alive",
    ]);
    assert_eq!(String::from_utf8_lossy(&e.stdout).trim(), "alive", "{e:?}");
    c.ctr(&["task", "kill", "-s", "KILL", &id2]);
    c.wait_status(&id2, "STOPPED");
    c.ctr(&["task", "delete", &id2]);

    // `ctr task checkpoint` of a running task (a container with a different spec: containerd
    // 1.6 refuses to store a second checkpoint whose spec blob it already has).
    let id3 = container_id("ctd-cr3");
    c.run_counter(
        &id3,
        &data,
        &["--null-io", "--label", "x=y", "--env", "FERRY=3"],
    );
    wait_counter_lines(&counter, after.len() + 5, T);
    let out = c.ctr(&["task", "checkpoint", &id3]);
    let image = out.trim().to_string();
    assert!(
        image.starts_with("containerd.io/checkpoint/"),
        "ctr task checkpoint: {out}"
    );
    let imgs = c.ctr(&["images", "ls", "-q"]);
    assert!(imgs.lines().any(|l| l == image), "images: {imgs}");
    c.wait_status(&id3, "RUNNING");
    let n = read_counter_lines(&counter).len();
    wait_counter_lines(&counter, n + 5, T);
    c.remove(&id3);
    c.remove(&id2);
    c.remove(&id);
    assert_no_shims(&c);
    leak_check(&[id, id2, id3]);
    safe_remove_dir_all(&data);
}

#[test]
fn containerd_failed_restore_leaves_containerd_consistent() {
    if !require_containerd() {
        return;
    }
    let c = Containerd::start(None);
    c.import_image();
    let id = container_id("ctd-fail");
    let id2 = container_id("ctd-fail2");
    let data = data_dir("fail");
    c.run_counter(&id, &data, &["--null-io"]);
    wait_counter_lines(&data.join("counter"), 3, T);
    let ckpt = format!("ferry-test/ckpt-{id}:1");
    c.ctr(&["container", "checkpoint", "--task", &id, &ckpt]);
    c.remove(&id);
    // The restore cannot work: the bind mount's source is gone.
    safe_remove_dir_all(&data);
    c.track(&id2);
    let r = c.ctr_out(&["container", "restore", "--live", &id2, &ckpt]);
    assert!(!r.status.success(), "restore should fail: {r:?}");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("does not exist"),
        "error names the cause: {err}"
    );
    // containerd sees a task that failed: stopped, not running; delete works.
    let (_, st) = c.task(&id2).expect("failed task still listed");
    assert_eq!(st, "STOPPED");
    c.ctr(&["task", "delete", &id2]);
    c.ctr(&["container", "rm", &id2]);
    assert_no_shims(&c);
    let left: Vec<PathBuf> = c
        .state_mounts()
        .into_iter()
        .filter(|m| m.to_string_lossy().contains(&id2))
        .collect();
    assert!(left.is_empty(), "mounts left: {left:?}");
    leak_check(&[id, id2]);
}

/// A failed CRIU restore (not a validation error): CRIU's log is copied into the bundle and
/// containerd is left consistent.
#[test]
fn containerd_failed_criu_restore_keeps_log() {
    if !require_containerd() {
        return;
    }
    let c = Containerd::start(None);
    c.import_image();
    let id = container_id("ctd-crfail");
    let id2 = container_id("ctd-crfail2");
    let data = data_dir("crfail");
    c.run_counter(&id, &data, &["--null-io"]);
    wait_counter_lines(&data.join("counter"), 3, T);
    let ckpt = format!("ferry-test/ckpt-{id}:1");
    c.ctr(&["container", "checkpoint", "--task", &id, &ckpt]);
    // The original keeps running with the same pid namespace content; make CRIU's restore
    // fail by replacing the bind source directory with a file (CRIU cannot bind a file onto
    // the directory mount point it recorded).
    c.remove(&id);
    safe_remove_dir_all(&data);
    fs::write(&data, b"not a directory").unwrap();
    c.track(&id2);
    let r = c.ctr_out(&["container", "restore", "--live", &id2, &ckpt]);
    assert!(!r.status.success(), "restore should fail: {r:?}");
    let (_, st) = c.task(&id2).expect("failed task still listed");
    assert_eq!(st, "STOPPED");
    let bundle = c
        .run
        .join("state/io.containerd.runtime.v2.task")
        .join(NS)
        .join(&id2);
    let log = bundle.join("criu-restore.log");
    assert!(log.exists(), "CRIU's restore log copied into the bundle");
    // The shim's own log reaches containerd's through the bundle's log fifo.
    assert!(
        c.log().contains("restore failed"),
        "shim log line in containerd's log"
    );
    c.ctr(&["task", "delete", &id2]);
    c.ctr(&["container", "rm", &id2]);
    assert_no_shims(&c);
    let left: Vec<PathBuf> = c
        .state_mounts()
        .into_iter()
        .filter(|m| m.to_string_lossy().contains(&id2))
        .collect();
    assert!(left.is_empty(), "mounts left: {left:?}");
    leak_check(&[id, id2]);
    let _ = fs::remove_file(&data);
}

/// A containerd task migrates between two containerd instances on the two emulated hosts:
/// the counter continues, the source task is gone, the destination task is RUNNING in the
/// destination's containerd under the ferry shim, and kill/delete work there.
#[test]
fn containerd_task_live_migration_between_two_hosts() {
    if !require_containerd() || !require_two_hosts() {
        return;
    }
    let th = TwoHosts::new("ctd-mig");
    let src = Containerd::start(Some(&th.src_ns));
    let dst = Containerd::start(Some(&th.dst_ns));
    src.import_image();
    let id = container_id("ctd-mig");
    let data = data_dir("mig");
    let counter = data.join("counter");
    src.run_counter(&id, &data, &["--null-io"]);
    dst.track(&id);
    wait_counter_lines(&counter, 5, T);

    let serve = th.serve(&["--containerd", s(&dst.sock), "--namespace", NS]);
    let out = ferry_cmd(&[
        "migrate",
        &id,
        "--to",
        &serve.addr,
        "--token-file",
        s(&th.token),
        "--containerd",
        s(&src.sock),
        "--namespace",
        NS,
        "--json",
    ])
    .prefix(&TwoHosts::netns_prefix(&th.src_ns))
    .run();
    out.ok();
    let report = out.json();
    eprintln!("migrate: {report}");
    let pid = report["restored_pid"].as_u64().unwrap_or(0) as u32;
    assert!(pid > 0, "report: {report}");

    // The destination's containerd has the task, RUNNING under the ferry shim.
    dst.wait_status(&id, "RUNNING");
    let (dpid, _) = dst.task(&id).unwrap();
    assert_eq!(dpid, pid, "destination task pid");
    let info = dst.ctr(&["container", "info", &id]);
    assert!(
        info.contains(RUNTIME),
        "runtime of the destination container: {info}"
    );
    // The source's task and container are gone.
    assert!(src.task(&id).is_none(), "source task still listed");
    let srcs = src.ctr(&["container", "ls", "-q"]);
    assert!(
        !srcs.lines().any(|l| l == id),
        "source container still listed: {srcs}"
    );
    assert_no_shims(&src);

    // The counter goes on without a gap or a repeat.
    let n = read_counter_lines(&counter).len();
    let all = wait_counter_lines(&counter, n + 20, T);
    assert_strictly_continues(&all, n + 20);

    // Kill and delete through the destination's containerd.
    dst.ctr(&["task", "kill", "-s", "KILL", &id]);
    dst.wait_status(&id, "STOPPED");
    dst.ctr(&["task", "delete", &id]);
    dst.ctr(&["container", "rm", &id]);
    assert_no_shims(&dst);
    let l = read_counter_lines(&counter).len();
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        read_counter_lines(&counter).len(),
        l,
        "counter still running after kill"
    );

    serve.stop();
    drop(dst);
    drop(src);
    th.finish();
    leak_check(&[id]);
    safe_remove_dir_all(&data);
}

/// The shim's `delete` action (containerd's cleanup) succeeds on a bundle whose container
/// runc never knew, and again on the same bundle, printing only a DeleteResponse.
#[test]
fn shim_delete_action_is_idempotent() {
    if !require_root_and_criu() {
        return;
    }
    let bundle = Path::new(WORK_BASE).join(format!("ctd-del-{}", std::process::id()));
    safe_remove_dir_all(&bundle);
    fs::create_dir_all(bundle.join("rootfs")).unwrap();
    let addr = format!("/run/fctd-del-{}.sock", std::process::id());
    for round in 0..2 {
        let out = run_output(
            Command::new(env!("CARGO_BIN_EXE_containerd-shim-ferry-v2"))
                .current_dir(&bundle)
                .env("TTRPC_ADDRESS", format!("{addr}.ttrpc"))
                .args([
                    "-namespace",
                    NS,
                    "-id",
                    "never-created",
                    "-address",
                    &addr,
                    "delete",
                ]),
        );
        assert!(
            out.status.success(),
            "delete #{round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A DeleteResponse: exit_status (field 2, varint) = 137.
        assert!(
            out.stdout.windows(3).any(|w| w == [0x10, 0x89, 0x01]),
            "stdout: {:?}",
            out.stdout
        );
    }
    safe_remove_dir_all(&bundle);
    // runc creates its (empty) root on any call.
    let root = ferry::shim::containerd::runc_root(&addr, NS);
    let _ = fs::remove_dir(&root);
    let _ = root.parent().map(fs::remove_dir);
}

/// `script -qec CMD /dev/null`: CMD on a fresh pseudo-terminal (ctr's `-t` needs one), its
/// exit code and everything it wrote to the terminal.
fn on_a_terminal(cmd: &str) -> std::process::Output {
    run_output(
        Command::new("script")
            .args(["-qec", cmd, "/dev/null"])
            .stdin(Stdio::null()),
    )
}

#[test]
fn containerd_stdin_and_terminals() {
    if !require_containerd() {
        return;
    }
    if find_program("script").is_none() {
        // util-linux's `script` (Debian: bsdutils, an essential package).
        panic!("`script` not found (apt-get install bsdutils)");
    }
    let c = Containerd::start(None);
    c.import_image();
    let id = container_id("ctd-io");
    let data = data_dir("io");
    c.run_counter(&id, &data, &[]);
    wait_counter_lines(&data.join("counter"), 2, T);

    // stdin through an exec's fifo: ctr writes 4 MiB and says CloseIO at its end. The process
    // reads all but the last 96 KiB, pauses for a second (ctr meanwhile hands over the rest,
    // which waits in the fifo and the shim's pipe, and says CloseIO), then reads on; it must
    // get every byte, then EOF.
    let input: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let input_file = data.join("stdin.bin");
    fs::write(&input_file, &input).unwrap();
    let out = c
        .ctr_cmd(&[
            "task",
            "exec",
            "--exec-id",
            "in1",
            &id,
            "sh",
            "-c",
            "busybox head -c 4096000 > /tmp/in; sleep 1; busybox cat >> /tmp/in; \
             busybox sha256sum < /tmp/in",
        ])
        .stdin(fs::File::open(&input_file).unwrap())
        .output()
        .expect("run ctr");
    let out = must(out, "ctr task exec with stdin");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        printed.split_whitespace().next(),
        Some(sha256_hex(&input).as_str()),
        "sha256 of the exec's stdin: {printed}"
    );

    // An exec with a terminal: ctr passes its window size on (ResizePty), the process sees
    // a tty, and its exit code comes back. ctr resizes only once the process has started
    // (as with runc's shim), so the process waits up to 10 s for the size to arrive.
    let sock = c.sock.display().to_string();
    let exec_t = format!(
        "stty rows 33 cols 101; exec ctr -a {sock} -n {NS} task exec -t --exec-id t1 {id} \
         sh -c 'i=0; while [ \"$(busybox stty size)\" != \"33 101\" ] && [ $i -lt 100 ]; \
         do sleep 0.1; i=$((i+1)); done; busybox stty size; busybox tty; exit 5'"
    );
    let out = on_a_terminal(&exec_t);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(5), "exec -t exit: {out:?}");
    assert!(text.contains("33 101"), "exec -t window size: {text:?}");
    assert!(text.contains("/dev/pts/"), "exec -t tty: {text:?}");

    // A container whose init has a terminal, run to its end and removed (`--rm`).
    let id2 = container_id("ctd-tty");
    c.track(&id2);
    let run_t = format!(
        "stty rows 21 cols 77; exec ctr -a {sock} -n {NS} run -t --rm --runtime {RUNTIME} \
         {IMAGE} {id2} sh -c 'i=0; while [ \"$(busybox stty size)\" != \"21 77\" ] && [ $i -lt 100 ]; \
         do sleep 0.1; i=$((i+1)); done; busybox stty size; busybox tty; exit 4'"
    );
    let out = on_a_terminal(&run_t);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "run -t exit: {out:?}");
    assert!(text.contains("21 77"), "run -t window size: {text:?}");
    assert!(
        text.contains("/dev/console") || text.contains("/dev/pts/"),
        "run -t tty: {text:?}"
    );
    assert!(c.task(&id2).is_none(), "run -t --rm left its task");

    // The counter went on throughout.
    let n = read_counter_lines(&data.join("counter")).len();
    wait_counter_lines(&data.join("counter"), n + 2, T);
    c.remove(&id);
    assert_no_shims(&c);
    leak_check(&[id, id2]);
    safe_remove_dir_all(&data);
}

/// A ttrpc client of the shim that serves container `id` (containerd keeps its address in
/// the task's state dir).
fn shim_client(c: &Containerd, id: &str) -> containerd_shim::protos::TaskClient {
    let addr_file = c
        .run
        .join("state/io.containerd.runtime.v2.task")
        .join(NS)
        .join(id)
        .join("address");
    let addr =
        fs::read_to_string(&addr_file).unwrap_or_else(|e| panic!("{}: {e}", addr_file.display()));
    let client = containerd_shim::protos::Client::connect(addr.trim())
        .unwrap_or_else(|e| panic!("connecting to the shim at {addr}: {e}"));
    containerd_shim::protos::TaskClient::new(client)
}

/// The v1 controller dir (or the unified one) of `pid`'s cgroup for `controller`.
fn cgroup_dir(pid: u32, controller: &str) -> PathBuf {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for l in text.lines() {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        if ctrls.split(',').any(|x| x == controller) {
            return Path::new("/sys/fs/cgroup")
                .join(controller)
                .join(path.trim_start_matches('/'));
        }
    }
    panic!("no {controller} cgroup for pid {pid}: {text}");
}

/// Task.Update as containerd sends it (runtime-spec LinuxResources as JSON in an Any): the
/// limits land in the container's cgroups; a bad request is refused and changes nothing.
#[test]
fn containerd_update_resources() {
    use containerd_shim::protos::api::UpdateTaskRequest;
    use containerd_shim::protos::protobuf::well_known_types::any::Any;
    use containerd_shim::protos::ttrpc::context;

    if !require_containerd() {
        return;
    }
    let c = Containerd::start(None);
    c.import_image();
    let id = container_id("ctd-upd");
    let data = data_dir("upd");
    c.run_counter(&id, &data, &[]);
    wait_counter_lines(&data.join("counter"), 2, T);
    let (pid, _) = c.task(&id).expect("task listed");
    let mem = cgroup_dir(pid, "memory").join("memory.limit_in_bytes");
    let pids = cgroup_dir(pid, "pids").join("pids.max");

    let task = shim_client(&c, &id);
    let ctx = || context::with_timeout(10_000_000_000);
    let update = |resources: Option<&str>| {
        let req = UpdateTaskRequest {
            id: id.clone(),
            resources: resources
                .map(|json| Any {
                    type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
                        .into(),
                    value: json.as_bytes().to_vec(),
                    ..Default::default()
                })
                .into(),
            ..Default::default()
        };
        task.update(ctx(), &req)
    };
    update(Some(
        r#"{"memory":{"limit":100663296},"pids":{"limit":77}}"#,
    ))
    .expect("update with memory and pids limits");
    assert_eq!(fs::read_to_string(&mem).unwrap().trim(), "100663296");
    assert_eq!(fs::read_to_string(&pids).unwrap().trim(), "77");

    // Refused, one message each, the limits as they were.
    let e = update(None).expect_err("an update without resources");
    assert!(
        format!("{e:?}").contains("INVALID_ARGUMENT")
            && format!("{e:?}").contains("without resources"),
        "{e:?}"
    );
    let e = update(Some("{not json")).expect_err("an update with broken JSON");
    assert!(
        format!("{e:?}").contains("INVALID_ARGUMENT") && format!("{e:?}").contains("not JSON"),
        "{e:?}"
    );
    assert_eq!(fs::read_to_string(&mem).unwrap().trim(), "100663296");
    assert_eq!(fs::read_to_string(&pids).unwrap().trim(), "77");

    // The container runs on.
    let n = read_counter_lines(&data.join("counter")).len();
    wait_counter_lines(&data.join("counter"), n + 2, T);
    c.remove(&id);
    assert_no_shims(&c);
    leak_check(&[id]);
    safe_remove_dir_all(&data);
}
