//! Shared helpers for the integration tests that drive real CRIU + runc.
//!
//! Compiled into each test crate with `mod common;`. Everything here talks to the real
//! system (runc, criu, mounts, cgroups), so the tests using it need root.
//!
//! Layout of one test's scratch space (`<unique>` = `<name>-<pid>`):
//! - runc state root: `/run/ferry-test/<unique>/runc` (runc's `--root`)
//! - work dir:        `/var/tmp/ferry-test/<unique>/` with `bundles/`, images, output files.
//!   It is not under /run because /run is often mounted `noexec`, and bundles must be
//!   executable.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Base of runc state roots used by the tests.
pub const RUNC_ROOT_BASE: &str = "/run/ferry-test";
/// Base of bundles, images and output files used by the tests.
pub const WORK_BASE: &str = "/var/tmp/ferry-test";

/// How long to wait for a `ferry` invocation before killing it and failing.
pub const FERRY_TIMEOUT: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------
// Prerequisites
// ---------------------------------------------------------------------------------------

fn ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// Look a program up on PATH plus the sbin directories (cargo may run with a user PATH).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// True when `path` is an ELF file without a PT_INTERP program header (statically linked).
fn is_static_elf(path: &Path) -> bool {
    let Ok(data) = fs::read(path) else {
        return false;
    };
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        return false; // not a 64-bit ELF
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(data[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let off = phoff + i * phentsize;
        if off + 4 > data.len() {
            return false;
        }
        if u32::from_le_bytes(data[off..off + 4].try_into().unwrap()) == 3 {
            return false; // PT_INTERP: dynamically linked
        }
    }
    true
}

/// The host's statically linked busybox (Debian's `busybox-static` package).
pub fn host_busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| is_static_elf(p))
}

/// Check that the tests can run: root, `criu`, `runc` and a static busybox.
///
/// When they cannot: with `CI` set (non-empty) this panics (CI must fail loudly, never
/// skip); otherwise it prints `skipping: <reason>` to stderr and returns false, and the
/// test should return early.
pub fn require_root_and_criu() -> bool {
    let mut missing = Vec::new();
    if euid() != 0 {
        missing.push("not running as root".to_string());
    }
    if find_program("criu").is_none() {
        missing.push("`criu` not found (run `bash vendor/criu/install.sh`)".to_string());
    }
    if find_program("runc").is_none() {
        missing.push("`runc` not found (apt-get install runc)".to_string());
    }
    if host_busybox().is_none() {
        missing.push("no static busybox at /bin/busybox (apt-get install busybox-static)".into());
    }
    if missing.is_empty() {
        return true;
    }
    let reason = missing.join("; ");
    if ci() {
        panic!("CI is set, refusing to skip: {reason}");
    }
    eprintln!("skipping: {reason}");
    false
}

/// Path of the `ferry` binary built by cargo for this test run.
pub fn ferry_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferry"))
}

// ---------------------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------------------

/// Poll `cond` every 20ms until it is true; panic with `what` after `timeout`.
#[track_caller]
pub fn wait_for(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    loop {
        if cond() {
            return;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Run a command to completion, capturing output, panicking if it cannot be spawned.
pub fn run_output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null());
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Panic unless `out` is a successful exit; `what` names the command in the message.
#[track_caller]
pub fn must(out: Output, what: &str) -> Output {
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

fn unique(name: &str) -> String {
    format!("{}-{}", name, std::process::id())
}

/// Container id for a test: `ft-<name>-<pid>` (unique per test and per test process).
pub fn container_id(name: &str) -> String {
    format!("ft-{}", unique(name))
}

// ---------------------------------------------------------------------------------------
// Mount handling and safe removal
// ---------------------------------------------------------------------------------------

fn unescape_mountinfo(s: &str) -> String {
    // Mount points in mountinfo escape space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points currently visible in this process's mount namespace.
pub fn mount_points() -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|mp| PathBuf::from(unescape_mountinfo(mp)))
        .collect()
}

fn is_mount_point(p: &Path) -> bool {
    mount_points().iter().any(|m| m == p)
}

/// Lazily unmount (`umount -l`, i.e. umount2 MNT_DETACH) everything mounted at or below
/// `dir`, deepest first. Returns mounts that are still there afterwards.
pub fn unmount_below(dir: &Path) -> Vec<PathBuf> {
    for _ in 0..3 {
        let mut below: Vec<PathBuf> = mount_points()
            .into_iter()
            .filter(|m| m.starts_with(dir))
            .collect();
        if below.is_empty() {
            return below;
        }
        below.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for m in &below {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(m)
                .stdin(Stdio::null())
                .output();
        }
    }
    mount_points()
        .into_iter()
        .filter(|m| m.starts_with(dir))
        .collect()
}

/// Remove `dir` recursively, but never through a mount point: unmount everything below it
/// first and refuse (with a message) if anything is still mounted there.
pub fn safe_remove_dir_all(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let left = unmount_below(dir);
    if !left.is_empty() {
        eprintln!(
            "not removing {}: still mounted below it: {left:?}",
            dir.display()
        );
        return;
    }
    if let Err(e) = fs::remove_dir_all(dir) {
        eprintln!("cannot remove {}: {e}", dir.display());
    }
}

// ---------------------------------------------------------------------------------------
// Container stdio: files and pipes
// ---------------------------------------------------------------------------------------

/// Where a container's stdout and stderr go (stdin is always /dev/null).
pub enum Out {
    /// /dev/null
    Null,
    /// A regular file opened for appending.
    File(File),
    /// A file descriptor (typically the write end of a pipe from [`pipe_lines`]).
    Fd(OwnedFd),
}

impl Out {
    /// Open (creating) `path` for appending.
    pub fn append_file(path: &Path) -> Out {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        Out::File(f)
    }

    /// A fresh `Stdio` for this target (each call duplicates the descriptor).
    pub fn stdio(&self) -> Stdio {
        match self {
            Out::Null => Stdio::null(),
            Out::File(f) => Stdio::from(f.try_clone().expect("dup file")),
            Out::Fd(fd) => Stdio::from(fd.try_clone().expect("dup fd")),
        }
    }
}

/// Collects everything written to a pipe, on a background thread, until EOF.
pub struct PipeLines {
    buf: Arc<Mutex<Vec<u8>>>,
    eof: Arc<AtomicBool>,
}

/// Create a pipe (both ends close-on-exec). Returns the collector for the read end and
/// an [`Out`] holding the write end. Drop the `Out` (after handing it to a child) so that
/// EOF arrives when the last process holding it exits.
pub fn pipe_lines() -> (PipeLines, Out) {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds is a valid, writable array of two c_ints as pipe2 requires.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    let (r, w) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let buf = Arc::new(Mutex::new(Vec::new()));
    let eof = Arc::new(AtomicBool::new(false));
    let (b2, e2) = (buf.clone(), eof.clone());
    thread::spawn(move || {
        let mut r = r;
        let mut chunk = [0u8; 4096];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => b2.lock().unwrap().extend_from_slice(&chunk[..n]),
            }
        }
        e2.store(true, Ordering::SeqCst);
    });
    (PipeLines { buf, eof }, Out::Fd(w))
}

impl PipeLines {
    /// Everything read so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }
    /// Counter values read so far (complete lines only; panics on a non-numeric line).
    pub fn values(&self) -> Vec<u64> {
        parse_counter(&self.text(), "pipe")
    }
    /// Counter values read so far, ignoring lines that are not plain numbers.
    pub fn numeric_values(&self) -> Vec<u64> {
        complete_lines(&self.text())
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
    /// Wait until at least `n` counter values were read.
    #[track_caller]
    pub fn wait_values(&self, n: usize, timeout: Duration) {
        wait_for(timeout, &format!("{n} counter lines on pipe"), || {
            self.numeric_values().len() >= n
        });
    }
    pub fn is_eof(&self) -> bool {
        self.eof.load(Ordering::SeqCst)
    }
    /// Wait until every writer has closed the pipe.
    #[track_caller]
    pub fn wait_eof(&self, timeout: Duration) {
        wait_for(timeout, "EOF on pipe (all writers closed)", || {
            self.is_eof()
        });
    }
}

// ---------------------------------------------------------------------------------------
// Counter workload
// ---------------------------------------------------------------------------------------

/// Shell loop keeping a counter in shell memory, printing each value on stdout.
pub const COUNTER_SCRIPT: &str = "i=0; while true; do i=$((i+1)); echo $i; sleep 0.05; done";

/// `process.args` of the counter workload.
pub fn counter_args() -> Vec<String> {
    vec!["sh".into(), "-c".into(), COUNTER_SCRIPT.into()]
}

/// Counter that appends each value to `file` (inside the container) and prints nothing.
pub fn counter_file_args(file: &str) -> Vec<String> {
    let script = format!("i=0; while true; do i=$((i+1)); echo $i >> {file}; sleep 0.05; done");
    vec!["sh".into(), "-c".into(), script]
}

/// Counter that also appends each value to `file` (inside the container).
pub fn counter_tee_args(file: &str) -> Vec<String> {
    let script =
        format!("i=0; while true; do i=$((i+1)); echo $i; echo $i >> {file}; sleep 0.05; done");
    vec!["sh".into(), "-c".into(), script]
}

fn complete_lines(text: &str) -> impl Iterator<Item = &str> {
    // The last segment is only complete if the text ends with a newline.
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => "",
    };
    complete
        .split('\n')
        .filter(|l| !complete.is_empty() || !l.is_empty())
}

/// Parse complete lines of counter output; panics (quoting the line) on anything else.
#[track_caller]
pub fn parse_counter(text: &str, what: &str) -> Vec<u64> {
    complete_lines(text)
        .enumerate()
        .map(|(n, l)| {
            l.trim().parse::<u64>().unwrap_or_else(|_| {
                panic!(
                    "{what}: line {} is not a counter value: {l:?}\nfull text:\n{text}",
                    n + 1
                )
            })
        })
        .collect()
}

/// Counter values in the file at `path` (missing file: none). Ignores a trailing partial
/// line.
#[track_caller]
pub fn read_counter_lines(path: &Path) -> Vec<u64> {
    match fs::read(path) {
        Ok(b) => parse_counter(&String::from_utf8_lossy(&b), &path.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("read {}: {e}", path.display()),
    }
}

/// Wait until the file at `path` holds at least `n` counter values; returns them.
#[track_caller]
pub fn wait_counter_lines(path: &Path, n: usize, timeout: Duration) -> Vec<u64> {
    let mut last = Vec::new();
    wait_for(
        timeout,
        &format!("{n} counter lines in {}", path.display()),
        || {
            last = read_counter_lines(path);
            last.len() >= n
        },
    );
    last
}

/// Assert that every value is exactly the previous one plus one (no reset, no repeat, no
/// gap) and that there are at least `min_len` values.
#[track_caller]
pub fn assert_strictly_continues(values: &[u64], min_len: usize) {
    assert!(
        values.len() >= min_len,
        "expected at least {min_len} counter values, got {}: {values:?}",
        values.len()
    );
    for i in 1..values.len() {
        if values[i] != values[i - 1] + 1 {
            let lo = i.saturating_sub(5);
            let hi = (i + 5).min(values.len());
            panic!(
                "counter does not continue at index {i}: {} followed by {} (expected {}); \
                 around it: {:?}",
                values[i - 1],
                values[i],
                values[i - 1] + 1,
                &values[lo..hi]
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Bundles
// ---------------------------------------------------------------------------------------

/// Builder of an OCI bundle with a busybox rootfs and a `runc spec` config.
pub struct Bundle {
    dir: PathBuf,
    args: Vec<String>,
    hostname: Option<String>,
    binds: Vec<(PathBuf, String)>,
}

impl Bundle {
    pub fn new(dir: impl Into<PathBuf>) -> Bundle {
        Bundle {
            dir: dir.into(),
            args: counter_args(),
            hostname: None,
            binds: Vec::new(),
        }
    }

    /// `process.args` (default: the counter).
    pub fn args<S: AsRef<str>>(mut self, args: &[S]) -> Bundle {
        self.args = args.iter().map(|s| s.as_ref().to_string()).collect();
        self
    }

    pub fn hostname(mut self, h: &str) -> Bundle {
        self.hostname = Some(h.to_string());
        self
    }

    /// Bind-mount host `source` at `destination` (rbind, rw).
    pub fn bind(mut self, source: &Path, destination: &str) -> Bundle {
        self.binds
            .push((source.to_path_buf(), destination.to_string()));
        self
    }

    /// Create the bundle on disk and return its directory.
    pub fn build(self) -> PathBuf {
        let rootfs = self.dir.join("rootfs");
        for d in ["bin", "tmp", "proc", "sys", "dev", "data", "etc"] {
            fs::create_dir_all(rootfs.join(d)).expect("create rootfs dirs");
        }
        let busybox = host_busybox().expect("static busybox (apt-get install busybox-static)");
        let target = rootfs.join("bin/busybox");
        fs::copy(&busybox, &target).expect("copy busybox into rootfs");
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
        let list = must(
            run_output(Command::new(&busybox).arg("--list")),
            "busybox --list",
        );
        for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
            if applet == "busybox" || applet.contains('/') {
                continue;
            }
            let link = rootfs.join("bin").join(applet);
            if fs::symlink_metadata(&link).is_err() {
                symlink("busybox", &link).expect("symlink applet");
            }
        }

        let config = self.dir.join("config.json");
        let _ = fs::remove_file(&config);
        must(
            run_output(Command::new("runc").arg("spec").current_dir(&self.dir)),
            "runc spec",
        );
        let mut spec: Value =
            serde_json::from_slice(&fs::read(&config).expect("read config.json")).unwrap();
        spec["process"]["terminal"] = Value::Bool(false);
        spec["process"]["args"] = Value::from(self.args.clone());
        spec["root"]["readonly"] = Value::Bool(false);
        if let Some(h) = &self.hostname {
            spec["hostname"] = Value::from(h.clone());
        }
        let mounts = spec["mounts"]
            .as_array_mut()
            .expect("mounts array in runc spec");
        for (src, dst) in &self.binds {
            mounts.push(serde_json::json!({
                "destination": dst,
                "type": "bind",
                "source": src,
                "options": ["rbind", "rw"],
            }));
        }
        fs::write(&config, serde_json::to_vec_pretty(&spec).unwrap()).expect("write config");
        self.dir
    }
}

// ---------------------------------------------------------------------------------------
// runc
// ---------------------------------------------------------------------------------------

/// A runc with its own state root and work dir; tears down every container in that root
/// (and the directories) when dropped.
pub struct Runc {
    pub name: String,
    /// runc's `--root`.
    pub root: PathBuf,
    /// Scratch directory for bundles, images and output files.
    pub work: PathBuf,
    /// Directory holding bundles.
    pub bundles: PathBuf,
    /// `--log` file of runc.
    pub log: PathBuf,
    started: Mutex<Vec<String>>,
}

impl Runc {
    /// Fresh, empty runc root and work dir for the test `name`.
    pub fn new(name: &str) -> Runc {
        let u = unique(name);
        let root_base = Path::new(RUNC_ROOT_BASE).join(&u);
        let work = Path::new(WORK_BASE).join(&u);
        // Leftovers of an earlier run with the same pid: remove them safely.
        safe_remove_dir_all(&root_base);
        safe_remove_dir_all(&work);
        let root = root_base.join("runc");
        let bundles = work.join("bundles");
        fs::create_dir_all(&root).expect("create runc root");
        fs::create_dir_all(&bundles).expect("create bundles dir");
        let log = work.join("runc.log");
        Runc {
            name: name.to_string(),
            root,
            work,
            bundles,
            log,
            started: Mutex::new(Vec::new()),
        }
    }

    /// Container id for this test, with an optional suffix (`""` for the main one).
    pub fn id(&self, suffix: &str) -> String {
        container_id(&format!("{}{}", self.name, suffix))
    }

    /// Remember `id` so teardown and leak checks cover it (e.g. ids created by ferry).
    pub fn track(&self, id: &str) {
        let mut s = self.started.lock().unwrap();
        if !s.iter().any(|x| x == id) {
            s.push(id.to_string());
        }
    }

    /// Every id this helper started or was told about.
    pub fn ids(&self) -> Vec<String> {
        self.started.lock().unwrap().clone()
    }

    /// A scratch path inside the work dir.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.work.join(rel)
    }

    /// A new empty directory inside the work dir.
    pub fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.work.join(rel);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        p
    }

    /// A `runc --root R --log L` command.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new("runc");
        c.arg("--root").arg(&self.root).arg("--log").arg(&self.log);
        c
    }

    fn log_tail(&self) -> String {
        let t = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// Build a bundle named `name` under the bundles dir.
    pub fn bundle(&self, name: &str) -> Bundle {
        Bundle::new(self.bundles.join(name))
    }

    /// `runc run -d --bundle B id`, the container's stdout and stderr both connected to `out`
    /// (runc hands its own stdio to the container when there is no terminal) and stdin to
    /// /dev/null. Panics if runc fails.
    pub fn run_detached(&self, id: &str, bundle: &Path, out: Out) {
        let err = match &out {
            Out::Null => Out::Null,
            Out::File(f) => Out::File(f.try_clone().expect("dup file")),
            Out::Fd(fd) => Out::Fd(fd.try_clone().expect("dup fd")),
        };
        self.run_detached_io(id, bundle, out, err)
    }

    /// Like [`Runc::run_detached`] with separate targets for stdout and stderr.
    pub fn run_detached_io(&self, id: &str, bundle: &Path, stdout: Out, stderr: Out) {
        self.track(id);
        let status = self
            .cmd()
            .args(["run", "-d", "--bundle"])
            .arg(bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(stdout.stdio())
            .stderr(stderr.stdio())
            .status()
            .expect("spawn runc run");
        drop((stdout, stderr));
        assert!(
            status.success(),
            "runc run -d {id} failed ({status}); runc log:\n{}",
            self.log_tail()
        );
    }

    /// `runc checkpoint --image-path DIR id` (plain runc, for the baseline).
    pub fn checkpoint(&self, id: &str, images: &Path, extra: &[&str]) -> Output {
        run_output(
            self.cmd()
                .arg("checkpoint")
                .args(extra)
                .arg("--image-path")
                .arg(images)
                .arg(id),
        )
    }

    /// `runc restore -d --image-path DIR --bundle B id` with the restored container's
    /// pipes connected to `out` (plain runc, for the baseline).
    pub fn restore_detached(&self, id: &str, bundle: &Path, images: &Path, out: Out) -> Output {
        self.track(id);
        let mut c = self.cmd();
        c.args(["restore", "-d", "--image-path"])
            .arg(images)
            .arg("--bundle")
            .arg(bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(out.stdio())
            .stderr(out.stdio());
        drop(out);
        let status = c.status().expect("spawn runc restore");
        Output {
            status,
            stdout: Vec::new(),
            stderr: self.log_tail().into_bytes(),
        }
    }

    /// `runc state id` as JSON; None if runc does not know the container.
    pub fn try_state(&self, id: &str) -> Option<Value> {
        let out = run_output(self.cmd().arg("state").arg(id));
        if !out.status.success() {
            return None;
        }
        Some(serde_json::from_slice(&out.stdout).expect("runc state prints JSON"))
    }

    /// `runc state id` as JSON; panics if the container does not exist.
    #[track_caller]
    pub fn state(&self, id: &str) -> Value {
        let out = must(
            run_output(self.cmd().arg("state").arg(id)),
            &format!("runc state {id}"),
        );
        serde_json::from_slice(&out.stdout).expect("runc state prints JSON")
    }

    /// `status` field of `runc state id`, None if the container does not exist.
    pub fn status(&self, id: &str) -> Option<String> {
        self.try_state(id)
            .and_then(|s| s["status"].as_str().map(str::to_string))
    }

    /// Wait until the container has the given status.
    #[track_caller]
    pub fn wait_status(&self, id: &str, status: &str, timeout: Duration) {
        wait_for(timeout, &format!("container {id} to be {status}"), || {
            self.status(id).as_deref() == Some(status)
        });
    }

    /// `runc list --format json` (which prints `null` when empty).
    pub fn list(&self) -> Vec<Value> {
        let out = must(
            run_output(self.cmd().args(["list", "--format", "json"])),
            "runc list",
        );
        match serde_json::from_slice::<Value>(&out.stdout).expect("runc list prints JSON") {
            Value::Null => Vec::new(),
            Value::Array(v) => v,
            other => panic!("unexpected runc list output: {other}"),
        }
    }

    /// Ids of the containers runc knows in this root.
    pub fn list_ids(&self) -> Vec<String> {
        self.list()
            .iter()
            .filter_map(|c| c["id"].as_str().map(str::to_string))
            .collect()
    }

    /// `runc exec id args...` (no terminal, stdin /dev/null).
    pub fn exec(&self, id: &str, args: &[&str]) -> Output {
        run_output(self.cmd().arg("exec").arg(id).args(args))
    }

    /// `runc kill id SIG`.
    pub fn kill(&self, id: &str, sig: &str) -> Output {
        run_output(self.cmd().arg("kill").arg(id).arg(sig))
    }

    /// `runc delete [-f] id` (unmounting a leftover criu-root first when forcing).
    pub fn delete(&self, id: &str, force: bool) -> Output {
        if force {
            self.unmount_criu_root(id);
        }
        let mut c = self.cmd();
        c.arg("delete");
        if force {
            c.arg("-f");
        }
        run_output(c.arg(id))
    }

    /// Kill with SIGKILL, wait for it to stop and `runc delete` it, asserting success.
    #[track_caller]
    pub fn kill_and_delete(&self, id: &str) {
        must(self.kill(id, "KILL"), &format!("runc kill {id} KILL"));
        self.wait_status(id, "stopped", Duration::from_secs(10));
        must(self.delete(id, false), &format!("runc delete {id}"));
        assert!(
            self.try_state(id).is_none(),
            "{id} still known to runc after delete"
        );
    }

    /// A `<root>/<id>/criu-root` bind mount left behind by a failed restore would make
    /// `runc delete -f` remove the bundle's rootfs *through* it: detach it first.
    fn unmount_criu_root(&self, id: &str) {
        let p = self.root.join(id).join("criu-root");
        if is_mount_point(&p) || mount_points().iter().any(|m| m.starts_with(&p)) {
            let left = unmount_below(&p);
            if !left.is_empty() {
                eprintln!("warning: could not unmount {left:?}");
            }
        }
    }

    /// Best-effort: kill and force-delete every container started here or known to runc
    /// in this root. Idempotent.
    pub fn teardown(&self) {
        let mut ids = self.ids();
        let listed = run_output(self.cmd().args(["list", "--format", "json"]));
        if let Ok(Value::Array(v)) = serde_json::from_slice::<Value>(&listed.stdout) {
            for c in v {
                if let Some(id) = c["id"].as_str() {
                    if !ids.iter().any(|x| x == id) {
                        ids.push(id.to_string());
                    }
                }
            }
        }
        for id in &ids {
            // Also catches restores ferry left half-done (state dir exists, runc doesn't
            // list it).
            self.unmount_criu_root(id);
            if self.try_state(id).is_none() {
                continue;
            }
            let _ = self.kill(id, "KILL");
            let _ = wait_for_quiet(Duration::from_secs(5), || {
                self.status(id).as_deref() != Some("running")
            });
            self.unmount_criu_root(id);
            let _ = self.delete(id, true);
        }
        // Anything mounted under our root (e.g. criu-root of an id we never saw).
        let left = unmount_below(&self.root);
        if !left.is_empty() {
            eprintln!(
                "warning: mounts left under {}: {left:?}",
                self.root.display()
            );
        }
    }
}

/// Like [`wait_for`] but returns false instead of panicking.
pub fn wait_for_quiet(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    cond()
}

impl Drop for Runc {
    fn drop(&mut self) {
        self.teardown();
        if let Some(base) = self.root.parent() {
            safe_remove_dir_all(base);
        }
        if std::env::var_os("FERRY_TEST_KEEP").is_none() {
            safe_remove_dir_all(&self.work);
        } else {
            eprintln!("FERRY_TEST_KEEP set: keeping {}", self.work.display());
        }
    }
}

// ---------------------------------------------------------------------------------------
// ferry
// ---------------------------------------------------------------------------------------

/// Result of one `ferry` invocation.
pub struct FerryOut {
    pub args: Vec<String>,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Debug for FerryOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ferry {:?}: exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args, self.code, self.stdout, self.stderr
        )
    }
}

impl FerryOut {
    /// Assert exit 0.
    #[track_caller]
    pub fn ok(&self) -> &FerryOut {
        assert_eq!(self.code, Some(0), "ferry failed: {self:?}");
        self
    }

    /// Parse stdout as one JSON object.
    #[track_caller]
    pub fn json(&self) -> Value {
        let v: Value = serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {self:?}"));
        assert!(v.is_object(), "JSON output is not an object: {self:?}");
        v
    }

    /// Assert the documented failure shape: exit `code`, exactly one stderr line, starting
    /// with `ferry: error: `.
    #[track_caller]
    pub fn assert_error(&self, code: i32) -> &FerryOut {
        assert_eq!(self.code, Some(code), "expected exit {code}: {self:?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected exactly one stderr line: {self:?}");
        assert!(
            lines[0].starts_with("ferry: error: "),
            "bad error line: {self:?}"
        );
        self
    }
}

/// Builder for a `ferry` invocation. stdin is /dev/null; stdout and stderr go to
/// anonymous temp files unless stdout is redirected with [`FerryCmd::stdout`] (then it is
/// not captured). Never hangs: killed after [`FERRY_TIMEOUT`].
pub struct FerryCmd {
    args: Vec<String>,
    envs: Vec<(String, String)>,
    stdout: Option<Out>,
}

pub fn ferry_cmd<S: AsRef<str>>(args: &[S]) -> FerryCmd {
    FerryCmd {
        args: args.iter().map(|a| a.as_ref().to_string()).collect(),
        envs: Vec::new(),
        stdout: None,
    }
}

/// Run `ferry args...` with the inherited environment.
pub fn ferry<S: AsRef<str>>(args: &[S]) -> FerryOut {
    ferry_cmd(args).run()
}

impl FerryCmd {
    pub fn env(mut self, k: &str, v: &str) -> FerryCmd {
        self.envs.push((k.to_string(), v.to_string()));
        self
    }

    /// Connect ferry's stdout to `out` (e.g. a new pipe for a restored container).
    pub fn stdout(mut self, out: Out) -> FerryCmd {
        self.stdout = Some(out);
        self
    }

    pub fn run(self) -> FerryOut {
        let mut out_f = tempfile::tempfile().expect("temp file");
        let mut err_f = tempfile::tempfile().expect("temp file");
        let mut c = Command::new(ferry_bin());
        c.args(&self.args)
            .stdin(Stdio::null())
            .stderr(err_f.try_clone().unwrap());
        for (k, v) in &self.envs {
            c.env(k, v);
        }
        match &self.stdout {
            Some(o) => c.stdout(o.stdio()),
            None => c.stdout(out_f.try_clone().unwrap()),
        };
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", ferry_bin()));
        drop(c); // closes our copies of the redirected descriptors
        drop(self.stdout);
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait ferry") {
                break st;
            }
            if start.elapsed() > FERRY_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "ferry {:?} did not finish within {FERRY_TIMEOUT:?}",
                    self.args
                );
            }
            thread::sleep(Duration::from_millis(10));
        };
        let read_all = |f: &mut File| {
            let mut s = String::new();
            f.seek(SeekFrom::Start(0)).unwrap();
            let mut b = Vec::new();
            f.read_to_end(&mut b).unwrap();
            s.push_str(&String::from_utf8_lossy(&b));
            s
        };
        FerryOut {
            args: self.args,
            code: status.code(),
            stdout: read_all(&mut out_f),
            stderr: read_all(&mut err_f),
        }
    }
}

/// Assert a ferry JSON object has all `fields`.
#[track_caller]
pub fn assert_fields(v: &Value, fields: &[&str]) {
    for f in fields {
        assert!(v.get(f).is_some(), "JSON lacks field {f:?}: {v}");
    }
}

/// Unsigned integer field of a JSON object (panics with the object if absent/wrong type).
#[track_caller]
pub fn json_u64(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("field {field:?} is not an unsigned int: {v}"))
}

// ---------------------------------------------------------------------------------------
// Directory snapshots ("nothing deleted or changed")
// ---------------------------------------------------------------------------------------

/// Relative path → (size, content hash) of every regular file below `dir`, plus `None`
/// entries for directories.
pub type TreeSnapshot = BTreeMap<PathBuf, Option<(u64, u64)>>;

pub fn snapshot_tree(dir: &Path) -> TreeSnapshot {
    fn walk(base: &Path, dir: &Path, out: &mut TreeSnapshot) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().to_path_buf();
            let Ok(md) = fs::symlink_metadata(&p) else {
                continue;
            };
            if md.is_dir() {
                out.insert(rel, None);
                walk(base, &p, out);
            } else if md.is_file() {
                let data = fs::read(&p).unwrap_or_default();
                let mut h = std::collections::hash_map::DefaultHasher::new();
                data.hash(&mut h);
                out.insert(rel, Some((md.len(), h.finish())));
            } else {
                out.insert(rel, Some((0, 0)));
            }
        }
    }
    let mut out = TreeSnapshot::new();
    walk(dir, dir, &mut out);
    out
}

/// Assert `dir` still exists and every entry recorded in `before` is still there,
/// unchanged. New files (e.g. logs) are allowed.
#[track_caller]
pub fn assert_tree_kept(dir: &Path, before: &TreeSnapshot) {
    assert!(dir.is_dir(), "{} was removed", dir.display());
    let now = snapshot_tree(dir);
    for (rel, meta) in before {
        match now.get(rel) {
            None => panic!("{} was deleted from {}", rel.display(), dir.display()),
            Some(m) if m != meta => {
                panic!("{} in {} was modified", rel.display(), dir.display())
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------
// Leak checks
// ---------------------------------------------------------------------------------------

fn criu_mounts() -> Vec<String> {
    mount_points()
        .into_iter()
        .map(|m| m.display().to_string())
        .filter(|m| m.contains("criu-root") || m.contains(".criu.cgyard"))
        .collect()
}

fn criu_processes() -> Vec<String> {
    let mut v = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            if fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "criu") {
                let cmdline = fs::read(e.path().join("cmdline"))
                    .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                    .unwrap_or_default();
                v.push(format!("pid {pid}: {}", cmdline.trim()));
            }
        }
    }
    v
}

fn criu_firewall_rules() -> Vec<String> {
    let mut v = Vec::new();
    let mut scan = |prog: &str, args: &[&str]| {
        if find_program(prog).is_none() {
            return;
        }
        if let Ok(out) = Command::new(prog).args(args).stdin(Stdio::null()).output() {
            for l in String::from_utf8_lossy(&out.stdout).lines() {
                if l.contains("CRIU") {
                    v.push(format!("{prog}: {l}"));
                }
            }
        }
    };
    if find_program("iptables-save").is_some() {
        scan("iptables-save", &[]);
    } else {
        scan("iptables", &["-S"]);
    }
    scan("ip6tables-save", &[]);
    scan("nft", &["list", "ruleset"]);
    v
}

/// Cgroup directories below /sys/fs/cgroup/<hierarchy>/ whose name contains one of `ids`
/// (searched a few levels deep, since some hierarchies nest the container under the
/// caller's own cgroup).
fn cgroup_dirs_matching(matches: &dyn Fn(&str) -> bool) -> Vec<String> {
    fn walk(dir: &Path, depth: u32, matches: &dyn Fn(&str) -> bool, out: &mut Vec<String>) {
        if depth == 0 {
            return;
        }
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let p = e.path();
            if e.file_name().to_str().is_some_and(matches) {
                out.push(p.display().to_string());
            }
            walk(&p, depth - 1, matches, out);
        }
    }
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir("/sys/fs/cgroup") {
        for e in rd.flatten() {
            walk(&e.path(), 5, matches, &mut out);
        }
    }
    out
}

/// Processes still running in a cgroup whose path names one of `ids`.
fn processes_in_cgroups(ids: &[String]) -> Vec<String> {
    let mut v = Vec::new();
    if ids.is_empty() {
        return v;
    }
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let name = e.file_name();
            if !name
                .to_str()
                .is_some_and(|s| s.bytes().all(|b| b.is_ascii_digit()))
            {
                continue;
            }
            let cg = fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
            if let Some(id) = ids
                .iter()
                .find(|id| cg.lines().any(|l| l.split('/').any(|c| c == id.as_str())))
            {
                v.push(format!("pid {} in cgroup of {id}", name.to_string_lossy()));
            }
        }
    }
    v
}

fn global_problems() -> Vec<String> {
    let mut p = Vec::new();
    p.extend(
        criu_mounts()
            .into_iter()
            .map(|m| format!("leftover mount: {m}")),
    );
    p.extend(
        criu_processes()
            .into_iter()
            .map(|c| format!("criu process: {c}")),
    );
    p.extend(
        criu_firewall_rules()
            .into_iter()
            .map(|r| format!("CRIU firewall rule: {r}")),
    );
    p
}

fn poll_problems(timeout: Duration, f: impl Fn() -> Vec<String>) -> Vec<String> {
    let start = Instant::now();
    loop {
        let p = f();
        if p.is_empty() || start.elapsed() > timeout {
            return p;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Assert nothing was left behind by the test that used `ids` (call after its containers
/// are deleted): no criu-root / .criu.cgyard mounts, no criu processes, no CRIU
/// iptables/nft rules, no cgroup dirs or processes for `ids`. Polls for a few seconds,
/// since cgroup removal and process exit are asynchronous. The mount/process/firewall
/// checks are global, so run CRIU tests with `--test-threads=1`.
#[track_caller]
pub fn leak_check(ids: &[String]) {
    let problems = poll_problems(Duration::from_secs(10), || {
        let mut p = global_problems();
        p.extend(
            cgroup_dirs_matching(&|n| ids.iter().any(|id| n.contains(id.as_str())))
                .into_iter()
                .map(|d| format!("leftover cgroup dir: {d}")),
        );
        p.extend(processes_in_cgroups(ids));
        p
    });
    assert!(
        problems.is_empty(),
        "leaks after test ({ids:?}):\n{}",
        problems.join("\n")
    );
}

/// Global check at the end of a test binary: no criu-root / .criu.cgyard mounts, no criu
/// processes, no CRIU firewall rules, no cgroups or scratch dirs of this test process.
#[track_caller]
pub fn global_leak_check() {
    let suffix = format!("-{}", std::process::id());
    let problems = poll_problems(Duration::from_secs(10), || {
        let mut p = global_problems();
        p.extend(
            cgroup_dirs_matching(&|n| n.starts_with("ft-") && n.ends_with(&suffix))
                .into_iter()
                .map(|d| format!("leftover cgroup dir: {d}")),
        );
        for base in [RUNC_ROOT_BASE, WORK_BASE] {
            if let Ok(rd) = fs::read_dir(base) {
                for e in rd.flatten() {
                    if e.file_name().to_string_lossy().ends_with(&suffix)
                        && std::env::var_os("FERRY_TEST_KEEP").is_none()
                    {
                        p.push(format!("leftover scratch dir: {}", e.path().display()));
                    }
                }
            }
        }
        p
    });
    assert!(problems.is_empty(), "leftovers:\n{}", problems.join("\n"));
}
