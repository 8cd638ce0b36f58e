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

pub mod local;
pub mod migration;
pub mod net;
pub mod vm;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::process::CommandExt;
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

/// Inside the VM rig (`FERRY_IN_VM`, software-emulated CPU) everything is several times
/// slower: waits are stretched by this factor there.
pub const VM_SLOWDOWN: u32 = 8;

/// `d`, stretched inside the VM rig.
pub fn slow(d: Duration) -> Duration {
    if std::env::var_os("FERRY_IN_VM").is_some() {
        d * VM_SLOWDOWN
    } else {
        d
    }
}

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

/// The value of a cgroup file of a container, from its runc state file (`cgroup_paths`).
#[track_caller]
pub fn cgroup_value(state: &Value, controller: &str, file: &str) -> String {
    let dir = state["cgroup_paths"][controller]
        .as_str()
        .unwrap_or_else(|| panic!("no {controller} cgroup in {state}"));
    let path = Path::new(dir).join(file);
    fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim_end()
        .to_string()
}

/// The host has only the cgroup v2 hierarchy, at /sys/fs/cgroup (the VM rig's `--cgroup2`).
pub fn cgroup_v2_only() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// The cgroup v2 files that must show [`test_limits`] on a v2-only host: (file, value).
/// runc turns shares 512 into weight 20, quota/period into `cpu.max`.
pub const TEST_LIMITS_V2: [(&str, &str); 5] = [
    ("memory.max", "268435456"),
    ("cpu.weight", "20"),
    ("cpu.max", "50000 100000"),
    ("pids.max", "99"),
    ("cpuset.cpus", "0"),
];

/// The `linux.resources` the tests' limited containers get, and the cgroup v1 files that
/// must show them: (controller, file, value).
pub fn test_limits() -> (Value, [(&'static str, &'static str, &'static str); 5]) {
    (
        serde_json::json!({
            "memory": {"limit": 268435456},
            "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0"},
            "pids": {"limit": 99}
        }),
        [
            ("memory", "memory.limit_in_bytes", "268435456"),
            ("cpu", "cpu.shares", "512"),
            ("cpu", "cpu.cfs_quota_us", "50000"),
            ("pids", "pids.max", "99"),
            ("cpuset", "cpuset.cpus", "0"),
        ],
    )
}

/// The container's limits and device rules (see [`test_limits`]) are in its cgroups, and
/// the device rules are `devices` (taken from the original container).
#[track_caller]
pub fn assert_limits(state: &Value, devices: &str, which: &str) {
    for (ctl, file, want) in test_limits().1 {
        assert_eq!(
            cgroup_value(state, ctl, file),
            want,
            "{file} of the {which}"
        );
    }
    assert_eq!(
        cgroup_value(state, "devices", "devices.list"),
        devices,
        "device rules of the {which}"
    );
    assert!(
        !devices.contains("a *:* rwm"),
        "every device allowed: {devices}"
    );
}

/// Counter that appends each value to `file` (inside the container) and prints nothing.
pub fn counter_file_args(file: &str) -> Vec<String> {
    let script = format!("i=0; while true; do i=$((i+1)); echo $i >> {file}; sleep 0.05; done");
    vec!["sh".into(), "-c".into(), script]
}

/// The end of the file [`ghost_counter_args`] deletes and keeps open.
pub const GHOST_TAIL: &str = "ghost-tail\n";

/// The counter of [`counter_file_args`], after writing a file of `kib` KiB and
/// [`GHOST_TAIL`], opening it on fd 3 and deleting it: a "ghost" file, whose content only
/// the checkpoint can carry.
pub fn ghost_counter_args(file: &str, kib: u32) -> Vec<String> {
    let script = format!(
        "dd if=/dev/zero of=/tmp/ghost bs=1024 count={kib} 2>/dev/null; \
         echo {} >> /tmp/ghost; exec 3</tmp/ghost; rm /tmp/ghost; \
         i=0; while true; do i=$((i+1)); echo $i >> {file}; sleep 0.05; done",
        GHOST_TAIL.trim_end()
    );
    vec!["sh".into(), "-c".into(), script]
}

/// The container's init (of [`ghost_counter_args`]) still reads its deleted file to the end.
#[track_caller]
pub fn assert_ghost_kept(rc: &Runc, id: &str) {
    let n = GHOST_TAIL.len().to_string();
    let out = must(
        rc.exec(id, &["tail", "-c", &n, "/proc/1/fd/3"]),
        "read the deleted file",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), GHOST_TAIL);
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

/// The complete lines of the file at `path` parsed by `parse` (missing file: none). Ignores
/// a trailing partial line.
#[track_caller]
pub fn read_parsed<T>(path: &Path, parse: fn(&str, &str) -> Vec<T>) -> Vec<T> {
    match fs::read(path) {
        Ok(b) => parse(&String::from_utf8_lossy(&b), &path.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("read {}: {e}", path.display()),
    }
}

/// Wait until the file at `path` holds at least `n` lines that `parse` accepts; returns them.
#[track_caller]
pub fn wait_parsed<T>(
    path: &Path,
    n: usize,
    timeout: Duration,
    what: &str,
    parse: fn(&str, &str) -> Vec<T>,
) -> Vec<T> {
    let mut last = Vec::new();
    wait_for(
        timeout,
        &format!("{n} {what} lines in {}", path.display()),
        || {
            last = read_parsed(path, parse);
            last.len() >= n
        },
    );
    last
}

/// Counter values in the file at `path` (missing file: none). Ignores a trailing partial
/// line.
#[track_caller]
pub fn read_counter_lines(path: &Path) -> Vec<u64> {
    read_parsed(path, parse_counter)
}

/// Wait until the file at `path` holds at least `n` counter values; returns them.
#[track_caller]
pub fn wait_counter_lines(path: &Path, n: usize, timeout: Duration) -> Vec<u64> {
    wait_parsed(path, n, timeout, "counter", parse_counter)
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

/// A change to a bundle's config.json (see [`Bundle::edit`]).
type SpecEdit = Box<dyn FnOnce(&mut Value)>;

/// Builder of an OCI bundle with a busybox rootfs and a `runc spec` config.
pub struct Bundle {
    dir: PathBuf,
    args: Vec<String>,
    hostname: Option<String>,
    binds: Vec<(PathBuf, String)>,
    memwriter: bool,
    /// Host binaries copied into the rootfs as `/bin/<name>`.
    binaries: Vec<(PathBuf, String)>,
    /// The network namespace to join (path), instead of a new one.
    netns: Option<PathBuf>,
    /// `root.readonly`.
    readonly: bool,
    /// `linux.sysctl` entries.
    sysctls: Vec<(String, String)>,
    /// `linux.resources`, as given.
    resources: Option<Value>,
    /// `process.terminal`.
    terminal: bool,
    /// Further changes to config.json, applied last.
    edits: Vec<SpecEdit>,
}

impl Bundle {
    pub fn new(dir: impl Into<PathBuf>) -> Bundle {
        Bundle {
            dir: dir.into(),
            args: counter_args(),
            hostname: None,
            binds: Vec::new(),
            memwriter: false,
            binaries: Vec::new(),
            netns: None,
            readonly: false,
            sysctls: Vec::new(),
            resources: None,
            terminal: false,
            edits: Vec::new(),
        }
    }

    /// Change config.json further (after everything else the builder sets).
    pub fn edit(mut self, f: impl FnOnce(&mut Value) + 'static) -> Bundle {
        self.edits.push(Box::new(f));
        self
    }

    /// `process.terminal`: start it with [`Runc::run_with_console`].
    pub fn terminal(mut self) -> Bundle {
        self.terminal = true;
        self
    }

    /// `linux.resources` entries (limits runc writes into the container's cgroups), merged
    /// into runc spec's.
    pub fn resources(mut self, r: Value) -> Bundle {
        self.resources = Some(r);
        self
    }

    /// A read-only root (`root.readonly`, as `docker run --read-only`).
    pub fn readonly(mut self) -> Bundle {
        self.readonly = true;
        self
    }

    /// A `linux.sysctl` entry (runc writes it into the container's namespaces at create).
    pub fn sysctl(mut self, key: &str, value: &str) -> Bundle {
        self.sysctls.push((key.to_string(), value.to_string()));
        self
    }

    /// Copy the host binary `bin` into the rootfs as `/bin/<name>`.
    pub fn with_binary(mut self, bin: &Path, name: &str) -> Bundle {
        self.binaries.push((bin.to_path_buf(), name.to_string()));
        self
    }

    /// Join the network namespace at `path` (config.json's `linux.namespaces`, CNI style).
    pub fn netns(mut self, path: &Path) -> Bundle {
        self.netns = Some(path.to_path_buf());
        self
    }

    /// Also install the memwriter workload as `/bin/memwriter` (see [`memwriter_args`]).
    pub fn with_memwriter(mut self) -> Bundle {
        self.memwriter = true;
        self
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

        if self.memwriter {
            let target = rootfs.join("bin/memwriter");
            fs::copy(memwriter_bin(), &target).expect("copy memwriter into rootfs");
            fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
        }
        for (bin, name) in &self.binaries {
            let target = rootfs.join("bin").join(name);
            fs::copy(bin, &target).expect("copy a binary into rootfs");
            fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
        }

        let config = self.dir.join("config.json");
        let _ = fs::remove_file(&config);
        must(
            run_output(Command::new("runc").arg("spec").current_dir(&self.dir)),
            "runc spec",
        );
        let mut spec: Value =
            serde_json::from_slice(&fs::read(&config).expect("read config.json")).unwrap();
        spec["process"]["terminal"] = Value::Bool(self.terminal);
        spec["process"]["args"] = Value::from(self.args.clone());
        spec["root"]["readonly"] = Value::Bool(self.readonly);
        // Merged into runc spec's (which denies every device but its defaults).
        if let Some(Value::Object(r)) = &self.resources {
            for (k, v) in r {
                spec["linux"]["resources"][k] = v.clone();
            }
        }
        if !self.sysctls.is_empty() {
            let map: serde_json::Map<String, Value> = self
                .sysctls
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(v.clone())))
                .collect();
            spec["linux"]["sysctl"] = Value::Object(map);
        }
        if let Some(h) = &self.hostname {
            spec["hostname"] = Value::from(h.clone());
        }
        if let Some(ns) = &self.netns {
            for n in spec["linux"]["namespaces"]
                .as_array_mut()
                .expect("namespaces in runc spec")
            {
                if n["type"] == "network" {
                    n["path"] = Value::from(ns.display().to_string());
                }
            }
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
        for f in self.edits {
            f(&mut spec);
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
        Runc::at(
            name,
            Path::new(RUNC_ROOT_BASE).join(&u),
            Path::new(WORK_BASE).join(&u),
        )
    }

    /// Fresh, empty runc root `<root_base>/runc` and work dir `work` (with `bundles/`);
    /// container ids are still `ft-<name><suffix>-<pid>`. Dropping it removes `root_base`
    /// and `work`.
    pub fn at(name: &str, root_base: PathBuf, work: PathBuf) -> Runc {
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

    /// `runc run -d --console-socket SOCK` of a bundle with a terminal; someone must be
    /// listening on `sock` (see [`console_receiver`]).
    pub fn run_with_console(&self, id: &str, bundle: &Path, sock: &Path) {
        self.track(id);
        let status = self
            .cmd()
            .args(["run", "-d", "--console-socket"])
            .arg(sock)
            .arg("--bundle")
            .arg(bundle)
            .arg(id)
            .stdin(Stdio::null())
            .status()
            .expect("spawn runc run");
        assert!(
            status.success(),
            "runc run -d --console-socket {id} failed ({status}); runc log:\n{}",
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

    /// runc's own record of the container (`<root>/<id>/state.json`: cgroup paths, config).
    #[track_caller]
    pub fn state_file(&self, id: &str) -> Value {
        let path = self.root.join(id).join("state.json");
        let data = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_slice(&data).expect("runc's state.json is JSON")
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

    /// `runc pause id`, which must succeed.
    #[track_caller]
    pub fn pause(&self, id: &str) {
        must(run_output(self.cmd().arg("pause").arg(id)), "runc pause");
    }

    /// `runc resume id`, which must succeed.
    #[track_caller]
    pub fn resume(&self, id: &str) {
        must(run_output(self.cmd().arg("resume").arg(id)), "runc resume");
    }

    /// `runc exec -d id args…`, which must succeed. Its stdio is /dev/null, not captured:
    /// the detached process would hold the pipes open.
    #[track_caller]
    pub fn exec_detached(&self, id: &str, args: &[&str]) {
        let status = self
            .cmd()
            .args(["exec", "-d", id])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run runc exec -d");
        assert!(status.success(), "runc exec -d {id} {args:?}: {status}");
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
            // A passing test's expected failures leave CRIU's logs in ferry's run dir (kept
            // for operators); a failing test's stay for whoever looks into it.
            if !thread::panicking() {
                remove_ferry_logs_of(&self.ids());
            }
        } else {
            eprintln!("FERRY_TEST_KEEP set: keeping {}", self.work.display());
        }
    }
}

/// Removes `/run/ferry/<op>-<id>-<pid>` directories (what a failed checkpoint, restore or
/// migration keeps) of these container ids.
fn remove_ferry_logs_of(ids: &[String]) {
    let Ok(entries) = fs::read_dir("/run/ferry") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = ids.iter().any(|id| {
            name.split_once(&format!("-{id}-"))
                .is_some_and(|(op, pid)| {
                    matches!(op, "restore" | "migrate" | "shim-restore")
                        && !pid.is_empty()
                        && pid.bytes().all(|b| b.is_ascii_digit())
                })
        });
        if ours && e.file_type().is_ok_and(|t| t.is_dir()) {
            safe_remove_dir_all(&e.path());
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

    /// A failure of a run with `-v` (log lines before the error): exit `code`, exactly one
    /// `ferry: error:` line, which is returned.
    #[track_caller]
    pub fn assert_verbose_error(&self, code: i32) -> &str {
        assert_eq!(self.code, Some(code), "expected exit {code}: {self:?}");
        let errors: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("ferry: error:"))
            .collect();
        assert_eq!(errors.len(), 1, "expected one error line: {self:?}");
        errors[0]
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
    prefix: Vec<String>,
    cwd: Option<PathBuf>,
}

pub fn ferry_cmd<S: AsRef<str>>(args: &[S]) -> FerryCmd {
    FerryCmd {
        args: args.iter().map(|a| a.as_ref().to_string()).collect(),
        envs: Vec::new(),
        stdout: None,
        prefix: Vec::new(),
        cwd: None,
    }
}

/// Run `ferry args...` with the inherited environment.
pub fn ferry<S: AsRef<str>>(args: &[S]) -> FerryOut {
    ferry_cmd(args).run()
}

impl FerryCmd {
    /// Run ferry through a wrapper command, e.g. `nsenter --net=/run/netns/X --`: the
    /// process started is `prefix[0] prefix[1..] <ferry> args...`.
    pub fn prefix<S: AsRef<str>>(mut self, prefix: &[S]) -> FerryCmd {
        self.prefix = prefix.iter().map(|a| a.as_ref().to_string()).collect();
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> FerryCmd {
        self.envs.push((k.to_string(), v.to_string()));
        self
    }

    /// Run ferry in this directory (for relative path arguments).
    pub fn current_dir(mut self, dir: &Path) -> FerryCmd {
        self.cwd = Some(dir.to_path_buf());
        self
    }

    /// Connect ferry's stdout to `out` (e.g. a new pipe for a restored container).
    pub fn stdout(mut self, out: Out) -> FerryCmd {
        self.stdout = Some(out);
        self
    }

    pub fn run(self) -> FerryOut {
        self.run_watched(false, |_, _| {})
    }

    /// Run it as a terminal job (its own process group) and send `signal` to that group
    /// once its stderr so far satisfies `when` (as a Ctrl-C, or SIGTERM from a supervisor, at
    /// that moment). Panics if it ends without `when` having held.
    pub fn run_signalled(self, signal: libc::c_int, when: impl Fn(&str) -> bool) -> FerryOut {
        let mut sent = false;
        let out = self.run_watched(true, |pid, stderr| {
            if !sent && when(&stderr()) {
                signal_group(pid, signal);
                sent = true;
            }
        });
        assert!(sent, "ferry ended before the signal was due: {out:?}");
        out
    }

    /// Runs it; once `when(stderr so far)`, stops its process group (SIGSTOP), runs
    /// `meanwhile` and lets it go on (SIGCONT).
    pub fn run_paused(self, when: impl Fn(&str) -> bool, meanwhile: impl FnOnce()) -> FerryOut {
        let mut meanwhile = Some(meanwhile);
        let out = self.run_watched(true, |pid, stderr| {
            if meanwhile.is_some() && when(&stderr()) {
                signal_group(pid, libc::SIGSTOP);
                let f = meanwhile.take().expect("checked");
                // Let it go on even when `meanwhile` fails, then fail.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
                signal_group(pid, libc::SIGCONT);
                if let Err(p) = r {
                    std::panic::resume_unwind(p);
                }
            }
        });
        assert!(
            meanwhile.is_none(),
            "ferry ended before the pause was due: {out:?}"
        );
        out
    }

    /// Runs it; `tick(pid, read stderr so far)` every 10 ms while it runs.
    fn run_watched(
        self,
        own_group: bool,
        mut tick: impl FnMut(u32, &dyn Fn() -> String),
    ) -> FerryOut {
        let mut out_f = tempfile::tempfile().expect("temp file");
        let mut err_f = tempfile::tempfile().expect("temp file");
        let mut c = match self.prefix.split_first() {
            None => Command::new(ferry_bin()),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(ferry_bin());
                c
            }
        };
        c.args(&self.args)
            .stdin(Stdio::null())
            .stderr(err_f.try_clone().unwrap());
        for (k, v) in &self.envs {
            c.env(k, v);
        }
        if let Some(d) = &self.cwd {
            c.current_dir(d);
        }
        if own_group {
            c.process_group(0);
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
        let err_path = format!("/proc/self/fd/{}", err_f.as_raw_fd());
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait ferry") {
                break st;
            }
            tick(child.id(), &|| {
                fs::read_to_string(&err_path).unwrap_or_default()
            });
            if start.elapsed() > slow(FERRY_TIMEOUT) {
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
                // CRIU's network lock, or ferry's own (destination namespaces).
                if l.contains("CRIU") || l.contains("FERRY-LOCK") {
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

/// Cgroup directories below /sys/fs/cgroup (each v1 hierarchy, or the v2 one) whose name
/// `matches` (searched a few levels deep, since some hierarchies nest the container under
/// the caller's own cgroup).
pub fn cgroup_dirs_matching(matches: &dyn Fn(&str) -> bool) -> Vec<String> {
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
    // v1: /sys/fs/cgroup/<controller>/…; v2 only: the hierarchy starts at /sys/fs/cgroup.
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), 6, matches, &mut out);
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
    leak_check_except(ids, &[]);
}

/// Global check at the end of a test binary: no criu-root / .criu.cgyard mounts, no criu
/// processes, no CRIU firewall rules, no cgroups, lock files or scratch dirs of this test
/// process.
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
        // Lock files of this process's containers: a killed ferry's is swept by the next
        // dump of any container.
        if let Ok(rd) = fs::read_dir("/run/ferry/locks") {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.contains("-ft-") && n.ends_with(&suffix) {
                    p.push(format!("leftover lock file: {}", e.path().display()));
                }
            }
        }
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

// ---------------------------------------------------------------------------------------
// Memory-writer workload (tests/workloads/memwriter.c)
// ---------------------------------------------------------------------------------------

/// Source of the memwriter workload.
pub const MEMWRITER_SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads/memwriter.c");

static MEMWRITER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Environment variable naming a prebuilt static memwriter, used instead of compiling one
/// (the VM rig sets it: its guest has no gcc).
pub const MEMWRITER_ENV: &str = "FERRY_MEMWRITER";

/// The prebuilt memwriter named by [`MEMWRITER_ENV`], if set (non-empty).
fn prebuilt_memwriter() -> Option<PathBuf> {
    std::env::var_os(MEMWRITER_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The C program `src` (a file of tests/workloads) built with `gcc -O2 -static` into cargo's
/// target tmp dir as `name` (under a temporary name, then renamed into place); its path.
pub fn build_static_workload(src: &str, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    fs::create_dir_all(dir).expect("create CARGO_TARGET_TMPDIR");
    let tmp = dir.join(format!("{name}.{}.tmp", std::process::id()));
    let out = run_output(
        Command::new("gcc")
            .args(["-O2", "-Wall", "-static", "-o"])
            .arg(&tmp)
            .arg(src),
    );
    must(out, &format!("gcc -O2 -static {src}"));
    let bin = dir.join(name);
    fs::rename(&tmp, &bin).unwrap_or_else(|e| panic!("rename {name} into place: {e}"));
    bin
}

pub const LOCKER_SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads/locker.c");
static LOCKER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// `locker` (tests/workloads/locker.c: hold a file lock while running a command, or test
/// one), built once per test process.
pub fn locker_bin() -> PathBuf {
    LOCKER
        .get_or_init(|| build_static_workload(LOCKER_SRC, "locker"))
        .clone()
}

pub const EVENTLOOP_SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads/eventloop.c");
static EVENTLOOP: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// `eventloop` (tests/workloads/eventloop.c: a counter kept by an event loop of threads,
/// SysV shared memory, an eventfd, a periodic timer fd, a signalfd and epoll, which checks
/// them), built once per test process.
pub fn eventloop_bin() -> PathBuf {
    EVENTLOOP
        .get_or_init(|| build_static_workload(EVENTLOOP_SRC, "eventloop"))
        .clone()
}

/// The memwriter binary: the prebuilt one named by `FERRY_MEMWRITER` (which must be a
/// static executable), else built once per test process with `gcc -O2 -static` into
/// cargo's target tmp dir (built under a temporary name, then renamed into place).
pub fn memwriter_bin() -> PathBuf {
    MEMWRITER
        .get_or_init(|| {
            if let Some(bin) = prebuilt_memwriter() {
                assert!(
                    is_static_elf(&bin),
                    "{MEMWRITER_ENV}={} is not a static executable",
                    bin.display()
                );
                return bin;
            }
            let bin = build_static_workload(MEMWRITER_SRC, "memwriter");
            assert!(is_static_elf(&bin), "memwriter is not a static binary");
            bin
        })
        .clone()
}

/// `process.args` of memwriter: `<mib>` MiB, `<dirty_mib_per_s>` MiB/s rewritten, one
/// verification line every ~200 ms appended to `file` (a path inside the container).
pub fn memwriter_args(mib: u32, dirty_mib_per_s: u32, file: &str) -> Vec<String> {
    vec![
        "/bin/memwriter".into(),
        mib.to_string(),
        dirty_mib_per_s.to_string(),
        file.into(),
    ]
}

/// One line of memwriter output: `<seq> <ok|BAD> <pages>[ extra...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemLine {
    pub seq: u64,
    pub ok: bool,
    pub pages: u64,
    pub raw: String,
}

/// Parse complete memwriter lines; panics (quoting the line) on anything malformed.
#[track_caller]
pub fn parse_memwriter(text: &str, what: &str) -> Vec<MemLine> {
    complete_lines(text)
        .enumerate()
        .map(|(n, l)| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let parsed = (f.len() >= 3)
                .then(|| {
                    let seq = f[0].parse::<u64>().ok()?;
                    let ok = match f[1] {
                        "ok" => true,
                        "BAD" => false,
                        _ => return None,
                    };
                    let pages = f[2].parse::<u64>().ok()?;
                    Some(MemLine {
                        seq,
                        ok,
                        pages,
                        raw: l.to_string(),
                    })
                })
                .flatten();
            parsed.unwrap_or_else(|| {
                panic!(
                    "{what}: line {} is not a memwriter line: {l:?}\nfull text:\n{text}",
                    n + 1
                )
            })
        })
        .collect()
}

/// memwriter lines in the file at `path` (missing file: none); a trailing partial line is
/// ignored.
#[track_caller]
pub fn read_memwriter_lines(path: &Path) -> Vec<MemLine> {
    read_parsed(path, parse_memwriter)
}

/// Wait until `path` holds at least `n` memwriter lines; returns them.
#[track_caller]
pub fn wait_memwriter_lines(path: &Path, n: usize, timeout: Duration) -> Vec<MemLine> {
    wait_parsed(path, n, timeout, "memwriter", parse_memwriter)
}

/// Assert the memwriter output in `path` is healthy: at least one line, seq 1, 2, 3, … with
/// no gap or repeat, and every line `ok`. Returns the lines.
#[track_caller]
pub fn assert_memwriter_ok(path: &Path) -> Vec<MemLine> {
    let lines = read_memwriter_lines(path);
    assert!(!lines.is_empty(), "{}: no memwriter lines", path.display());
    let context = |i: usize| {
        let lo = i.saturating_sub(5);
        let hi = (i + 5).min(lines.len());
        lines[lo..hi]
            .iter()
            .map(|l| l.raw.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        lines[0].seq,
        1,
        "{}: memwriter seq does not start at 1:\n{}",
        path.display(),
        context(0)
    );
    for (i, l) in lines.iter().enumerate() {
        assert!(
            l.ok,
            "{}: memory verification failed at line {} ({:?}):\n{}",
            path.display(),
            i + 1,
            l.raw,
            context(i)
        );
        if i > 0 {
            assert_eq!(
                l.seq,
                lines[i - 1].seq + 1,
                "{}: memwriter seq does not continue at line {} (reset, repeat or gap):\n{}",
                path.display(),
                i + 1,
                context(i)
            );
        }
    }
    lines
}

// ---------------------------------------------------------------------------------------
// Two emulated hosts: network namespaces joined by a veth pair
// ---------------------------------------------------------------------------------------

/// Address of the emulated source host (documentation range, RFC 5737).
pub const SRC_IP: &str = "192.0.2.1";
/// Address of the emulated destination host.
pub const DST_IP: &str = "192.0.2.2";
/// The destination's `--cgroup-prefix`: one per test process, so that the suite's check for
/// prefix dirs left behind sees only its own (other runs on the machine have their own).
pub fn dst_cgroup_prefix() -> String {
    format!("ferry-dst-{}", std::process::id())
}

/// Sets the extended attribute `name` of `p` itself (not following a symlink).
pub fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: NUL-terminated path and name; `value` is valid for its length.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setting {name} on {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

/// The value of the extended attribute `name` of `p` itself, None when it has none.
pub fn get_xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: NUL-terminated path and name; `buf` is valid for its length.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return None;
    }
    buf.truncate(r as usize);
    Some(buf)
}

/// A mount a test made, unmounted (lazily) when dropped.
pub struct Mounted(PathBuf);

impl Mounted {
    /// A tmpfs of `size` on `dir`.
    pub fn tmpfs(dir: &Path, size: &str) -> Self {
        Mounted::run(
            Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]),
            dir,
        )
    }

    /// `src` bind-mounted on `onto`.
    pub fn bind(src: &Path, onto: &Path) -> Self {
        Mounted::run(Command::new("mount").arg("--bind").arg(src), onto)
    }

    fn run(mount: &mut Command, onto: &Path) -> Self {
        must(mount.arg(onto).output().unwrap(), "mount");
        Mounted(onto.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

/// Cgroup directories a test made, each inside the one before, with files written in each;
/// removed innermost first however the test ends.
pub struct MadeCgroup(Vec<PathBuf>);

impl MadeCgroup {
    /// Makes `dir` and writes `files` into it.
    pub fn make(dir: &Path, files: &[(&str, &str)]) -> Self {
        MadeCgroup(Vec::new()).with(dir.to_path_buf(), files)
    }

    /// Makes `name` inside the innermost one, with `files`.
    pub fn child(self, name: &str, files: &[(&str, &str)]) -> Self {
        let dir = self.path().join(name);
        self.with(dir, files)
    }

    fn with(mut self, dir: PathBuf, files: &[(&str, &str)]) -> Self {
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        self.0.push(dir);
        for (file, value) in files {
            let path = self.path().join(file);
            fs::write(&path, value).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
        self
    }

    /// The innermost.
    pub fn path(&self) -> &Path {
        self.0.last().expect("a cgroup made")
    }

    /// Removes them, asserting that nothing was left in them.
    pub fn remove(self) {
        let dirs = self.0.clone();
        drop(self);
        for d in dirs {
            assert!(!d.exists(), "{} left behind", d.display());
        }
    }
}

impl Drop for MadeCgroup {
    fn drop(&mut self) {
        for d in self.0.iter().rev() {
            let _ = fs::remove_dir(d);
        }
    }
}

/// Removes this process's (empty) `--cgroup-prefix` dirs, for tests in which `ferry serve`
/// exited before the containers it received were deleted.
pub fn remove_empty_prefix_dirs() {
    let prefix = dst_cgroup_prefix();
    for d in cgroup_dirs_matching(&|n| n == prefix) {
        let _ = fs::remove_dir(&d);
    }
}
/// How long `ferry serve` may take to print its `listening` line.
pub const SERVE_START_TIMEOUT: Duration = Duration::from_secs(30);

static TWO_HOSTS_SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Like [`require_root_and_criu`], plus what the two-host rig needs: `ip` (iproute2),
/// `nsenter` (util-linux) and `gcc` (memwriter; not when `FERRY_MEMWRITER` names a prebuilt
/// one).
pub fn require_two_hosts() -> bool {
    if !require_root_and_criu() {
        return false;
    }
    let gcc = prebuilt_memwriter().is_none().then_some("gcc");
    let missing: Vec<&str> = ["ip", "nsenter"]
        .into_iter()
        .chain(gcc)
        .filter(|p| find_program(p).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let reason = format!("missing programs: {missing:?} (iproute2, util-linux, build-essential)");
    if ci() {
        panic!("CI is set, refusing to skip: {reason}");
    }
    eprintln!("skipping: {reason}");
    false
}

fn ip(args: &[&str]) -> Output {
    run_output(Command::new("ip").args(args))
}

/// Run `f` on a thread that has joined the network namespace `/run/netns/<ns>` (only that
/// thread switches; sockets it creates stay in that namespace wherever they are used).
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    thread::scope(|s| {
        s.spawn(|| {
            let fd = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: fd is an open namespace file; setns only changes this thread's netns.
            let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// The inode of the named network namespace `/run/netns/<ns>`.
fn netns_file_inode(ns: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(format!("/run/netns/{ns}"))
        .ok()
        .map(|m| m.ino())
}

/// The inode of the network namespace process `pid` is in (None once it is gone).
fn netns_of_pid(pid: &str) -> Option<u64> {
    // "net:[<inode>]"
    fs::read_link(format!("/proc/{pid}/ns/net"))
        .ok()?
        .to_string_lossy()
        .trim_start_matches("net:[")
        .trim_end_matches(']')
        .parse::<u64>()
        .ok()
}

/// A running `ferry serve` (on the destination host).
pub struct Serve {
    /// `192.0.2.2:<port>` as printed on the `listening` line.
    pub addr: String,
    pub port: u16,
    /// Its stderr (printed when a test fails while it is alive).
    pub stderr_path: PathBuf,
    proc: Arc<Mutex<std::process::Child>>,
    stdout_rest: Arc<Mutex<String>>,
}

fn stop_child(
    child: &Mutex<std::process::Child>,
    grace: Duration,
) -> Option<std::process::ExitStatus> {
    let mut c = child.lock().unwrap();
    if let Ok(Some(st)) = c.try_wait() {
        return Some(st);
    }
    // SAFETY: plain kill(2) on our own child, which has not been reaped yet (try_wait above),
    // so its pid cannot have been reused.
    unsafe {
        libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
    }
    let start = Instant::now();
    while start.elapsed() < grace {
        if let Ok(Some(st)) = c.try_wait() {
            return Some(st);
        }
        thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "ferry serve (pid {}) ignored SIGTERM for {grace:?}: SIGKILL",
        c.id()
    );
    let _ = c.kill();
    c.wait().ok()
}

impl Serve {
    pub fn pid(&self) -> u32 {
        self.proc.lock().unwrap().id()
    }

    /// Still running (not exited)?
    pub fn is_alive(&self) -> bool {
        matches!(self.proc.lock().unwrap().try_wait(), Ok(None))
    }

    /// SIGKILL and reap it.
    pub fn kill_hard(&self) {
        let mut c = self.proc.lock().unwrap();
        if let Ok(None) = c.try_wait() {
            let _ = c.kill();
        }
        let _ = c.wait();
    }

    /// SIGTERM, SIGKILL after 5 s; returns the exit status.
    pub fn stop(&self) -> Option<std::process::ExitStatus> {
        stop_child(&self.proc, Duration::from_secs(5))
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Everything it printed on stdout after the `listening` line.
    pub fn stdout_rest(&self) -> String {
        self.stdout_rest.lock().unwrap().clone()
    }

    /// Peak resident set size (VmHWM) in KiB, if it is still running.
    pub fn vm_hwm_kib(&self) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let st = self.stop();
        if thread::panicking() {
            eprintln!(
                "--- ferry serve {} (exit {st:?}) stderr ({}) ---\n{}\n--- end of serve stderr ---",
                self.addr,
                self.stderr_path.display(),
                self.stderr()
            );
        }
    }
}

/// Two emulated hosts on this machine: network namespaces `src_ns` (192.0.2.1) and `dst_ns`
/// (192.0.2.2) joined by a veth pair, each host with its own runc root and bundles dir, and
/// a shared token file. ferry runs inside a namespace through `nsenter --net=…`, which
/// switches only the network namespace (`ip netns exec` would also give it a private mount
/// namespace with a fresh /sys, hiding /sys/fs/cgroup from ferry, runc and CRIU). runc
/// itself, called by the tests, runs in the host namespaces. The filesystem (and so bind
/// mount sources) and the cgroup filesystem are shared: the destination's restored
/// containers live under `--cgroup-prefix ferry-dst-<pid>`.
pub struct TwoHosts {
    pub name: String,
    pub src_ns: String,
    pub dst_ns: String,
    pub src_veth: String,
    pub dst_veth: String,
    /// `/run/ferry-test/<name>-<pid>` (runc roots below `src/` and `dst/`).
    pub root_base: PathBuf,
    /// `/var/tmp/ferry-test/<name>-<pid>` (work dirs below `src/` and `dst/`).
    pub work_base: PathBuf,
    /// 32 random hex characters, mode 0600.
    pub token: PathBuf,
    src: Option<Runc>,
    dst: Option<Runc>,
    serves: Mutex<Vec<Arc<Mutex<std::process::Child>>>>,
    netns_made: bool,
    /// Global leak-check findings from before this test started (see [`TwoHosts::finish`]).
    baseline: Vec<String>,
}

/// 2·n random hex characters from the kernel.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("read /dev/urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Write a token file (`content` plus a newline) with mode 0600.
pub fn write_token_file(path: &Path, content: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = fs::remove_file(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    writeln!(f, "{content}").unwrap();
}

impl TwoHosts {
    /// Create both hosts for the test `name` (panics if the network cannot be set up).
    pub fn new(name: &str) -> TwoHosts {
        let pid = std::process::id();
        let n = TWO_HOSTS_SEQ.fetch_add(1, Ordering::SeqCst);
        let u = unique(name);
        let root_base = Path::new(RUNC_ROOT_BASE).join(&u);
        let work_base = Path::new(WORK_BASE).join(&u);
        safe_remove_dir_all(&root_base);
        safe_remove_dir_all(&work_base);
        let src = Runc::at(name, root_base.join("src"), work_base.join("src"));
        let dst = Runc::at(name, root_base.join("dst"), work_base.join("dst"));
        let token = work_base.join("token");
        write_token_file(&token, &random_hex(16));
        let mut th = TwoHosts {
            name: name.to_string(),
            src_ns: format!("fsrc-{pid}-{n}"),
            dst_ns: format!("fdst-{pid}-{n}"),
            // Interface names: at most 15 characters.
            src_veth: format!("fvs{pid}x{n}"),
            dst_veth: format!("fvd{pid}x{n}"),
            root_base,
            work_base,
            token,
            src: Some(src),
            dst: Some(dst),
            serves: Mutex::new(Vec::new()),
            netns_made: false,
            baseline: global_leak_findings(),
        };
        if !th.baseline.is_empty() {
            eprintln!(
                "note: {} CRIU leftovers on this machine before the test, not counted against \
                 it (first: {})",
                th.baseline.len(),
                th.baseline[0]
            );
        }
        th.setup_network();
        th
    }

    fn setup_network(&mut self) {
        for ns in [&self.src_ns, &self.dst_ns] {
            let _ = ip(&["netns", "del", ns]); // leftover of an earlier run with this pid
        }
        self.netns_made = true; // from here on, Drop deletes them
        let (s, d) = (self.src_ns.as_str(), self.dst_ns.as_str());
        let (vs, vd) = (self.src_veth.as_str(), self.dst_veth.as_str());
        let src_cidr = format!("{SRC_IP}/24");
        let dst_cidr = format!("{DST_IP}/24");
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", s],
            vec!["netns", "add", d],
            // Created inside the source namespace with its peer directly in the destination
            // namespace: nothing ever appears in the host's namespace.
            vec![
                "-n", s, "link", "add", vs, "type", "veth", "peer", "name", vd, "netns", d,
            ],
            vec!["-n", s, "addr", "add", &src_cidr, "dev", vs],
            vec!["-n", d, "addr", "add", &dst_cidr, "dev", vd],
            vec!["-n", s, "link", "set", "lo", "up"],
            vec!["-n", d, "link", "set", "lo", "up"],
            vec!["-n", s, "link", "set", vs, "up"],
            vec!["-n", d, "link", "set", vd, "up"],
        ];
        for st in steps {
            must(ip(&st), &format!("ip {}", st.join(" ")));
        }
        // Wait for the link (and IPv4 address) to be usable from the source side.
        self.wait_link_up(Duration::from_secs(10));
    }

    fn wait_link_up(&self, timeout: Duration) {
        let dst_ns = self.dst_ns.clone();
        let src_ns = self.src_ns.clone();
        // A listener in the destination namespace, connected to from the source namespace.
        let listener = in_netns(&dst_ns, || std::net::TcpListener::bind((DST_IP, 0)))
            .expect("bind a probe listener on 192.0.2.2");
        let port = listener.local_addr().unwrap().port();
        wait_for(
            timeout,
            "TCP from 192.0.2.1 to 192.0.2.2 over the veth",
            || {
                in_netns(&src_ns, || {
                    std::net::TcpStream::connect_timeout(
                        &format!("{DST_IP}:{port}").parse().unwrap(),
                        Duration::from_millis(500),
                    )
                    .is_ok()
                })
            },
        );
    }

    pub fn src_runc(&self) -> &Runc {
        self.src.as_ref().expect("src runc")
    }

    pub fn dst_runc(&self) -> &Runc {
        self.dst.as_ref().expect("dst runc")
    }

    /// Every container id either host started or was told about.
    pub fn ids(&self) -> Vec<String> {
        let mut ids = self.src_runc().ids();
        for id in self.dst_runc().ids() {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }

    /// `<dst bundles>/<id>`, where a migrated container's bundle lands.
    pub fn dst_bundle(&self, id: &str) -> PathBuf {
        self.dst_runc().bundles.join(id)
    }

    /// `nsenter --net=/run/netns/<ns> --`: run a program in one host's network namespace.
    pub fn netns_prefix(ns: &str) -> Vec<String> {
        vec![
            "nsenter".to_string(),
            format!("--net=/run/netns/{ns}"),
            "--".to_string(),
        ]
    }

    /// `<dst work>/serve-work`, the `--work-dir` every `ferry serve` here is given (made if
    /// missing).
    pub fn serve_work(&self) -> PathBuf {
        self.dst_runc().mkdir("serve-work")
    }

    /// Start `ferry serve` on the destination with the shared token.
    pub fn serve(&self, extra: &[&str]) -> Serve {
        self.serve_with_token(&self.token, extra)
    }

    /// Start `ferry -v serve --listen 192.0.2.2:0 --token-file <token> --bundles <dst bundles>
    /// --runtime-root <dst runc root> --work-dir <dst work>/serve-work [extra…] --cgroup-prefix
    /// ferry-dst-<pid>` (unless `extra` gives one) in the destination namespace and wait for
    /// its `listening` line.
    pub fn serve_with_token(&self, token: &Path, extra: &[&str]) -> Serve {
        self.serve_full(token, &[], extra)
    }

    /// [`TwoHosts::serve`] with extra environment variables (e.g. `FERRY_TEST_FAULT`).
    pub fn serve_with_env(&self, env: &[(&str, &str)], extra: &[&str]) -> Serve {
        self.serve_full(&self.token.clone(), env, extra)
    }

    fn serve_full(&self, token: &Path, env: &[(&str, &str)], extra: &[&str]) -> Serve {
        use std::io::BufRead;
        let dst = self.dst_runc();
        let k = self.serves.lock().unwrap().len();
        let stderr_path = dst.work.join(format!("serve-{k}.stderr"));
        let err_f = File::create(&stderr_path).expect("create serve stderr file");
        let work = self.serve_work();
        let prefix = TwoHosts::netns_prefix(&self.dst_ns);
        let mut c = Command::new(&prefix[0]);
        c.args(&prefix[1..])
            .arg(ferry_bin())
            .arg("-v")
            .arg("serve")
            .args(["--listen", &format!("{DST_IP}:0")])
            .arg("--token-file")
            .arg(token)
            .arg("--bundles")
            .arg(&dst.bundles)
            .arg("--runtime-root")
            .arg(&dst.root)
            .arg("--work-dir")
            .arg(&work)
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err_f);
        if !extra.contains(&"--cgroup-prefix") {
            c.args(["--cgroup-prefix", &dst_cgroup_prefix()]);
        }
        let mut child = c.spawn().unwrap_or_else(|e| panic!("spawn {c:?}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let proc = Arc::new(Mutex::new(child));
        self.serves.lock().unwrap().push(proc.clone());

        let rest = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let rest2 = rest.clone();
        thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            if let Some(Ok(first)) = lines.next() {
                let _ = tx.send(first);
            }
            drop(tx);
            for l in lines.map_while(Result::ok) {
                let mut r = rest2.lock().unwrap();
                r.push_str(&l);
                r.push('\n');
            }
        });
        let fail = |why: String| -> ! {
            let st = stop_child(&proc, Duration::from_secs(5));
            panic!(
                "ferry serve: {why} (exit {st:?}); command: {c:?}\nstderr:\n{}",
                fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        };
        let first = match rx.recv_timeout(SERVE_START_TIMEOUT) {
            Ok(l) => l,
            Err(_) => fail(format!(
                "no `listening` line on stdout within {SERVE_START_TIMEOUT:?}"
            )),
        };
        let Some(addr) = first.trim().strip_prefix("listening ") else {
            fail(format!(
                "first stdout line is not `listening <addr>`: {first:?}"
            ))
        };
        let sa: std::net::SocketAddr = match addr.parse() {
            Ok(sa) => sa,
            Err(e) => fail(format!("bad address in {first:?}: {e}")),
        };
        if sa.ip().to_string() != DST_IP || sa.port() == 0 {
            fail(format!(
                "listening on {sa}, expected {DST_IP}:<non-zero port>"
            ));
        }
        Serve {
            addr: sa.to_string(),
            port: sa.port(),
            stderr_path,
            proc,
            stdout_rest: rest,
        }
    }

    /// Arguments of `ferry migrate <id> --to <addr> --token-file T --runtime-root <src runc
    /// root> --json [extra…]`.
    pub fn migrate_args(&self, id: &str, addr: &str, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "migrate".into(),
            id.into(),
            "--to".into(),
            addr.into(),
            "--token-file".into(),
            self.token.display().to_string(),
            "--runtime-root".into(),
            self.src_runc().root.display().to_string(),
            "--json".into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// Run `ferry migrate` (see [`TwoHosts::migrate_args`]) in the source namespace, to
    /// completion (killed after [`FERRY_TIMEOUT`]). The destination runc helper tracks `id`
    /// so teardown and leak checks cover it there too.
    pub fn migrate(&self, id: &str, addr: &str, extra: &[&str]) -> FerryOut {
        self.migrate_cmd(id, addr, extra).run()
    }

    /// The `ferry migrate` command, to add environment or run it on another thread.
    pub fn migrate_cmd(&self, id: &str, addr: &str, extra: &[&str]) -> FerryCmd {
        self.src_runc().track(id);
        self.dst_runc().track(id);
        ferry_cmd(&self.migrate_args(id, addr, extra)).prefix(&TwoHosts::netns_prefix(&self.src_ns))
    }

    /// Take the source's end of the link down: the network between the hosts dies.
    pub fn cut_link(&self) {
        must(
            ip(&["-n", &self.src_ns, "link", "set", &self.src_veth, "down"]),
            "ip link set down (cut the link)",
        );
    }

    /// Bring the source's end of the link back up.
    pub fn restore_link(&self) {
        must(
            ip(&["-n", &self.src_ns, "link", "set", &self.src_veth, "up"]),
            "ip link set up (restore the link)",
        );
        self.wait_link_up(Duration::from_secs(10));
    }

    /// Bytes the source host has sent over the link so far (read from
    /// `/proc/thread-self/net/dev` on a thread inside the source namespace: cheap enough to
    /// poll every few milliseconds while a migration runs, unlike spawning `ip`).
    pub fn src_tx_bytes(&self) -> u64 {
        let dev = in_netns(&self.src_ns, || {
            fs::read_to_string("/proc/thread-self/net/dev")
        })
        .expect("read /proc/thread-self/net/dev in the source namespace");
        // `<iface>: rx bytes packets errs drop fifo frame compressed multicast tx bytes …`
        dev.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(name, _)| name.trim() == self.src_veth)
            .and_then(|(_, stats)| stats.split_whitespace().nth(8)?.parse().ok())
            .unwrap_or_else(|| panic!("no tx bytes of {} in:\n{dev}", self.src_veth))
    }

    /// A TCP connection from the source host to `addr`.
    pub fn connect_from_src(&self, addr: &str) -> std::net::TcpStream {
        let sa: std::net::SocketAddr = addr.parse().expect("socket address");
        in_netns(&self.src_ns, || {
            std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(10))
        })
        .unwrap_or_else(|e| panic!("connect {addr} from the source namespace: {e}"))
    }

    /// What a failed migration of `id` left on the destination: runc state, state dir,
    /// mounts below the destination's root or work dir or naming `id`, cgroups under
    /// `ferry-dst-<pid>/` named after `id` and processes in them, criu processes in either host's
    /// network namespace. Scoped to this test, unlike [`leak_check`], so that it can be
    /// polled while unrelated CRIU work runs on the machine.
    pub fn dst_leftovers(&self, id: &str) -> Vec<String> {
        let dst = self.dst_runc();
        let mut p = Vec::new();
        if let Some(st) = dst.try_state(id) {
            p.push(format!("destination runc knows {id}: {st}"));
        }
        let state_dir = dst.root.join(id);
        if state_dir.exists() {
            p.push(format!(
                "destination runc state dir {} exists",
                state_dir.display()
            ));
        }
        // Only mounts that are ours (anything else may belong to unrelated CRIU work on
        // this machine): below the destination's runc root or work dir (which holds the
        // serve's --work-dir), or naming the container.
        for m in mount_points() {
            let ms = m.display().to_string();
            if m.starts_with(&dst.root) || m.starts_with(&dst.work) || ms.contains(id) {
                p.push(format!("leftover mount: {ms}"));
            }
        }
        let marker = format!("/{}/", dst_cgroup_prefix());
        p.extend(
            cgroup_dirs_matching(&|n| n.contains(id))
                .into_iter()
                .filter(|d| d.contains(&marker))
                .map(|d| format!("leftover cgroup dir: {d}")),
        );
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
                if cg
                    .lines()
                    .any(|l| l.contains(&marker) && l.split('/').any(|c| c == id))
                {
                    p.push(format!(
                        "pid {} in a destination cgroup of {id}",
                        name.to_string_lossy()
                    ));
                }
            }
        }
        p.extend(
            self.criu_processes_in_hosts()
                .into_iter()
                .map(|c| format!("criu process: {c}")),
        );
        // ferry's page receiver is a thread of `ferry serve` (named "pages"), where CRIU's
        // page server was a criu process: while it runs, a session is still under way.
        p.extend(
            self.page_receivers_in_destination()
                .into_iter()
                .map(|t| format!("page receiver still running: {t}")),
        );
        p
    }

    /// Threads named `pages` (ferry's page receiver) of processes in the destination's
    /// network namespace.
    pub fn page_receivers_in_destination(&self) -> Vec<String> {
        let want = netns_file_inode(&self.dst_ns);
        let mut v = Vec::new();
        let Ok(rd) = fs::read_dir("/proc") else {
            return v;
        };
        for e in rd.flatten() {
            let pid = e.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            if want.is_none() || netns_of_pid(&pid) != want {
                continue;
            }
            let Ok(tasks) = fs::read_dir(e.path().join("task")) else {
                continue;
            };
            for t in tasks.flatten() {
                let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                if comm.trim() == "pages" {
                    v.push(format!(
                        "pid {pid} thread {}",
                        t.file_name().to_string_lossy()
                    ));
                }
            }
        }
        v
    }

    /// criu processes running in either emulated host's network namespace (started by
    /// `ferry serve` or `ferry migrate`; a container's own namespaces are nested, so a
    /// criu process is in the host's).
    pub fn criu_processes_in_hosts(&self) -> Vec<String> {
        let hosts: Vec<(u64, &str)> = [(&self.src_ns, "source"), (&self.dst_ns, "destination")]
            .into_iter()
            .filter_map(|(ns, what)| Some((netns_file_inode(ns)?, what)))
            .collect();
        let mut v = Vec::new();
        for c in criu_processes() {
            let pid = c
                .strip_prefix("pid ")
                .and_then(|r| r.split(':').next())
                .unwrap_or_default();
            let Some(ino) = netns_of_pid(pid) else {
                continue; // gone meanwhile
            };
            if let Some((_, what)) = hosts.iter().find(|(i, _)| *i == ino) {
                v.push(format!("{c} (in the {what} namespace)"));
            }
        }
        v
    }

    /// Assert (polling up to `timeout`, since the destination cleans up asynchronously)
    /// that the destination holds nothing of `id`; see [`TwoHosts::dst_leftovers`]. The
    /// bundle dir is not checked: a partial copy may be kept for a retry.
    #[track_caller]
    pub fn assert_dst_clean(&self, id: &str, timeout: Duration) {
        let start = Instant::now();
        let problems = poll_problems(timeout, || self.dst_leftovers(id));
        if problems.is_empty() && start.elapsed() > Duration::from_secs(1) {
            eprintln!("destination clean of {id} after {:?}", start.elapsed());
        }
        assert!(
            problems.is_empty(),
            "destination not clean after a failed migration of {id} (waited {timeout:?}):\n{}",
            problems.join("\n")
        );
    }

    /// Kill and delete every container on both hosts, stop every `ferry serve`, then run the
    /// leak checks for all ids ([`leak_check`], except that global findings which already
    /// existed when the test started — unrelated CRIU work on a shared machine — are not
    /// counted; `zz_no_leftovers` still checks everything).
    #[track_caller]
    pub fn finish(&self) {
        self.dst_runc().teardown();
        self.src_runc().teardown();
        self.stop_serves();
        leak_check_except(&self.ids(), &self.baseline);
    }

    fn stop_serves(&self) {
        for p in self.serves.lock().unwrap().iter() {
            stop_child(p, Duration::from_secs(5));
        }
    }

    /// SIGKILL what a failed test may have left running that runc does not know about: criu
    /// processes in either host's network namespace and processes in the destination's
    /// cgroups of `ids` (thawed first, a frozen task cannot die). All of them were started
    /// by this test's `ferry serve` / `ferry migrate`.
    fn reap_leftover_processes(&self, ids: &[String]) {
        let killed = Mutex::new(Vec::<libc::pid_t>::new());
        let kill = |pid: &str, what: &str| {
            if let Ok(pid) = pid.trim().parse::<libc::pid_t>() {
                let mut k = killed.lock().unwrap();
                if k.contains(&pid) {
                    return;
                }
                k.push(pid);
                eprintln!("teardown: killing leftover {what} (pid {pid})");
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        };
        for c in self.criu_processes_in_hosts() {
            let pid = c
                .strip_prefix("pid ")
                .and_then(|r| r.split(':').next())
                .unwrap_or_default();
            kill(pid, &format!("criu process: {c}"));
        }
        let marker = format!("/{}/", dst_cgroup_prefix());
        let dirs: Vec<String> =
            cgroup_dirs_matching(&|n| ids.iter().any(|id| n.contains(id.as_str())))
                .into_iter()
                .filter(|d| d.contains(&marker))
                .collect();
        for d in dirs.iter().filter(|d| d.contains("/freezer/")) {
            let _ = fs::write(Path::new(d).join("freezer.state"), "THAWED");
        }
        for d in &dirs {
            let procs = fs::read_to_string(Path::new(d).join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines() {
                kill(pid, &format!("process in {d}"));
            }
        }
        wait_for_quiet(Duration::from_secs(5), || {
            dirs.iter().all(|d| {
                fs::read_to_string(Path::new(d).join("cgroup.procs"))
                    .map(|p| p.trim().is_empty())
                    .unwrap_or(true)
            })
        });
    }

    /// Empty cgroup dirs under `ferry-dst-<pid>/` named after our ids (best effort, deepest first).
    fn remove_dst_cgroups(ids: &[String]) {
        let marker = format!("/{}/", dst_cgroup_prefix());
        let mut dirs: Vec<String> =
            cgroup_dirs_matching(&|n| ids.iter().any(|id| n.contains(id.as_str())))
                .into_iter()
                .filter(|d| d.contains(&marker))
                .collect();
        dirs.sort_by_key(|d| std::cmp::Reverse(d.matches('/').count()));
        for d in dirs {
            let _ = fs::remove_dir(&d);
        }
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        self.stop_serves();
        let ids = self.ids();
        // Runc's Drop kills and deletes its containers and removes its directories.
        drop(self.dst.take());
        drop(self.src.take());
        self.reap_leftover_processes(&ids);
        TwoHosts::remove_dst_cgroups(&ids);
        if self.netns_made {
            for ns in [&self.src_ns, &self.dst_ns] {
                let out = ip(&["netns", "del", ns]);
                if !out.status.success() {
                    eprintln!(
                        "warning: ip netns del {ns}: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
            }
        }
        safe_remove_dir_all(&self.root_base);
        if std::env::var_os("FERRY_TEST_KEEP").is_none() {
            safe_remove_dir_all(&self.work_base);
        } else {
            eprintln!("FERRY_TEST_KEEP set: keeping {}", self.work_base.display());
        }
    }
}

/// The last check of a two-host test binary (its `zz_no_leftovers`): [`global_leak_check`],
/// and no network namespace of this process is left ([`leftover_netns`]).
#[track_caller]
pub fn assert_no_leftovers() {
    global_leak_check();
    let left = leftover_netns();
    assert!(left.is_empty(), "network namespaces left: {left:?}");
    // Every `ferry serve` has stopped: none left its (empty) --cgroup-prefix dirs behind.
    let prefix_dirs = cgroup_dirs_matching(&|n| n == dst_cgroup_prefix());
    assert!(
        prefix_dirs.is_empty(),
        "--cgroup-prefix dirs left: {prefix_dirs:?}"
    );
}

/// Network namespaces made by this test process that still exist: the emulated hosts, the
/// network rig's client, container and clash namespaces (`common::net`), and those `ferry
/// serve` made for this process's containers (`ferry-ft-…-<pid>`).
pub fn leftover_netns() -> Vec<String> {
    let out = ip(&["netns", "list"]);
    let mid = format!("-{}-", std::process::id());
    let end = format!("-{}", std::process::id());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| {
            (["fsrc-", "fdst-", "fcli-", "fct-", "fclash-"]
                .iter()
                .any(|p| n.starts_with(p))
                && n.contains(&mid))
                || (n.starts_with("ferry-ft-") && n.ends_with(&end))
        })
        .map(str::to_string)
        .collect()
}

/// [`leak_check`], ignoring global findings listed in `known` (taken before the test with
/// [`global_leak_findings`]).
#[track_caller]
pub fn leak_check_except(ids: &[String], known: &[String]) {
    let problems = poll_problems(Duration::from_secs(10), || {
        let mut p: Vec<String> = global_problems()
            .into_iter()
            .filter(|x| !known.contains(x))
            .collect();
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

/// The global part of [`leak_check`] right now: criu-root / cgyard mounts, criu processes,
/// CRIU firewall rules.
pub fn global_leak_findings() -> Vec<String> {
    global_problems()
}

/// A path as &str (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Starts a counter container whose values go to a file on a bind-mounted host directory
/// (CRIU, like `runc checkpoint`, cannot dump a container whose stdout is a host file that
/// is not visible through its mounts, so stdio is /dev/null here). Returns the host path of
/// the counter file and the bundle.
pub fn start_file_counter(rc: &Runc, id: &str) -> (PathBuf, PathBuf) {
    start_file_counter_with(rc, id, |b| b)
}

/// [`start_file_counter`] with more to its bundle (`more` gets the counter's bundle).
pub fn start_file_counter_with(
    rc: &Runc,
    id: &str,
    more: impl FnOnce(Bundle) -> Bundle,
) -> (PathBuf, PathBuf) {
    start_file_counter_named(rc, id, "", more)
}

/// [`start_file_counter_with`], its data dir and bundle named `data<suffix>` and
/// `counter<suffix>` (several in one runc root).
pub fn start_file_counter_named(
    rc: &Runc,
    id: &str,
    suffix: &str,
    more: impl FnOnce(Bundle) -> Bundle,
) -> (PathBuf, PathBuf) {
    let data = rc.mkdir(&format!("data{suffix}"));
    let bundle = rc
        .bundle(&format!("counter{suffix}"))
        .bind(&data, "/data")
        .args(&counter_file_args("/data/counter"));
    let bundle = more(bundle).build();
    rc.run_detached(id, &bundle, Out::Null);
    (data.join("counter"), bundle)
}

/// Receives one pty master over a console socket (runc's protocol: SCM_RIGHTS), then copies
/// everything the terminal shows into `out`.
pub fn console_receiver(sock: &Path, out: PathBuf) -> std::thread::JoinHandle<()> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let listener = std::os::unix::net::UnixListener::bind(sock).expect("console socket");
    std::thread::spawn(move || {
        let (conn, _) = listener.accept().expect("console connection");
        let mut name = [0u8; 256];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let mut iov = [std::io::IoSliceMut::new(&mut name)];
        let msg = recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )
        .expect("recvmsg");
        let mut master = None;
        for c in msg.cmsgs().expect("cmsgs") {
            if let ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: SCM_RIGHTS just installed this descriptor; nothing else owns it.
                master = fds.first().map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) });
            }
        }
        let mut master = fs::File::from(master.expect("a pty master"));
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out)
            .unwrap();
        let _ = std::io::copy(&mut master, &mut f);
    })
}

/// Sends `signal` to the process group led by `pid` (a command run in its own group).
fn signal_group(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) with a process group id we started; no memory involved.
    let rc = unsafe { libc::kill(-(pid as libc::pid_t), signal) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
}
