//! The source side: `ferry migrate`.
//!
//! Connect and authenticate, agree on capabilities (CRIU versions, CPU, features), sync the
//! rootfs while the container runs, open the data connection for the page server, then freeze
//! and dump with the pages streamed to the destination. The answer to CRIU's `post-dump` is
//! held while the final rootfs delta and the non-page images are sent and the destination
//! restores; only when the destination reports the container running and adopted does the
//! source let CRIU end its tasks. Any failure before that resumes the source untouched.

use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use std::os::unix::fs::FileExt;

use super::auth::Token;
use super::link::{self, Link};
use super::policy::{Policy, PolicyKind, RoundFacts, PAGE};
use super::progress::{bytes_acked, Progress};
use super::relay::{free_loopback_port, SourceRelay};
use super::rootfs::{changed_since_listed, manifest, Beneath, BlockHasher, HashCache};
use super::tls::TlsClient;
use super::wire::{
    batches, check_peer, Entry, FileStart, Hole, Manifest, Msg, Prepare, RestoreMsg, Role,
    RoundDone, SyncDone, Target, WireError, CHUNK, MAX_FRAME,
};
use super::MigrateError;
use crate::criu::client::{run_pre_dump, Request};
use crate::criu::swrk::ChildFds;
use crate::criu::{Criu, Notification, Reply, Script};
use crate::images::read_dump_stats;
use crate::oci::options::{DumpSettings, DUMP_LOG};
use crate::ops::checkpoint::DumpJob;
use crate::ops::{open_dir, require_root};
use crate::pb::CriuPageServerInfo;
use crate::runtime::mounts::remove_tree;
use crate::runtime::runc::Runc;

/// How memory moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Auto,
    StopCopy,
    PreCopy,
    PostCopy,
    Hybrid,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::StopCopy => "stop-copy",
            Mode::PreCopy => "pre-copy",
            Mode::PostCopy => "post-copy",
            Mode::Hybrid => "hybrid",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "auto" => Mode::Auto,
            "stop-copy" => Mode::StopCopy,
            "pre-copy" => Mode::PreCopy,
            "post-copy" => Mode::PostCopy,
            "hybrid" => Mode::Hybrid,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
pub struct MigrateRequest {
    pub id: String,
    pub to: String,
    pub token: Token,
    pub mode: Mode,
    pub max_rounds: u32,
    pub target_downtime_ms: u64,
    /// Which rule stops the pre-copy rounds (adaptive; the anchors' rules for benchmarks).
    pub policy: PolicyKind,
    pub runtime_root: PathBuf,
    pub tcp_established: bool,
    /// Carry the container's file locks (CRIU's `file_locks`, on both sides).
    pub file_locks: bool,
    /// CRIU's `ghost_limit` for the final dump (None: CRIU's default).
    pub ghost_limit: Option<u32>,
    /// Draw progress lines on the terminal (stderr).
    pub progress: bool,
    /// Longest wait for any answer from the destination.
    pub io_timeout: Duration,
    /// TLS on both connections (with `--tls-*`).
    pub tls: Option<TlsClient>,
}

/// One memory transfer round.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub pages_scanned: u64,
    pub pages_written: u64,
    pub bytes: u64,
    pub ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MigrateReport {
    pub container: String,
    pub to: String,
    pub mode: String,
    pub mode_reason: String,
    /// Every memory transfer: the pre-dump rounds, then the final dump.
    pub rounds: Vec<Round>,
    /// Why the pre-copy rounds stopped (empty without pre-copy).
    pub rounds_reason: String,
    /// CRIU's frozen time of the final dump.
    pub frozen_ms: u64,
    /// Freeze start → the container runs on the destination.
    pub downtime_ms: u64,
    pub total_ms: u64,
    /// Control channel bytes plus page bytes.
    pub bytes_sent: u64,
    pub rootfs_files_sent: u64,
    pub restored_pid: i32,
    pub criu_version: String,
    /// Established TCP connections carried over (`--tcp-established`), counted while frozen.
    pub tcp_connections: u64,
    /// Established TCP connections closed instead (without `--tcp-established`).
    pub tcp_closed: u64,
    /// The source's network namespace (given by path) was removed after the commit.
    pub netns_removed: bool,
    /// The container was paused (`runc pause`) and is paused on the destination too.
    pub paused: bool,
}

/// The control connection, counting what is sent.
pub(crate) struct Ctl {
    pub stream: Link,
    pub sent: u64,
}

impl Ctl {
    pub fn send(&mut self, m: &Msg) -> Result<(), WireError> {
        let mut counter = Counting {
            inner: &mut self.stream,
            n: 0,
        };
        let written = m.write_to(&mut counter);
        let n = counter.n;
        written.map_err(|e| self.stream.explain(e))?;
        self.sent += n;
        Ok(())
    }

    pub fn recv(&mut self) -> Result<Msg, WireError> {
        let m = Msg::read_from(&mut self.stream, MAX_FRAME).map_err(|e| self.stream.explain(e))?;
        check_peer(m)
    }
}

struct Counting<'a> {
    inner: &'a mut Link,
    n: u64,
}

impl std::io::Write for Counting<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = std::io::Write::write(self.inner, b)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::Write::flush(self.inner)
    }
}

/// Unacknowledged data older than this fails the socket (a cut link must not hang a dump).
const TCP_USER_TIMEOUT_MS: u32 = 20_000;

/// Socket options for migration connections: no Nagle, bounded retransmission, keepalive.
pub(crate) fn tune(s: &TcpStream, io_timeout: Duration) {
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(io_timeout));
    let _ = s.set_write_timeout(Some(io_timeout));
    let fd = s.as_raw_fd();
    let set = |level: i32, name: i32, v: u32| {
        let v = v as libc::c_int;
        // SAFETY: setsockopt with a pointer to a live c_int and its exact size.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
    };
    set(
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        TCP_USER_TIMEOUT_MS,
    );
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 5);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 2);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 5);
}

fn connect(addr: &str, io_timeout: Duration) -> Result<TcpStream, MigrateError> {
    let conn_err = |source: std::io::Error| MigrateError::Connect {
        addr: addr.to_string(),
        source,
    };
    let sa = addr
        .to_socket_addrs()
        .map_err(conn_err)?
        .next()
        .ok_or_else(|| {
            conn_err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no address",
            ))
        })?;
    let s = TcpStream::connect_timeout(&sa, Duration::from_secs(10)).map_err(conn_err)?;
    tune(&s, io_timeout);
    Ok(s)
}

/// A connection to the destination, authenticated (inside TLS when configured).
fn open(
    req: &MigrateRequest,
    role: Role,
    session: Option<&str>,
) -> Result<(Link, String), MigrateError> {
    let tcp = connect(&req.to, req.io_timeout)?;
    link::client(tcp, &req.to, req.tls.as_ref(), &req.token, role, session)
}

fn expect_ok(ctl: &mut Ctl, state: &'static str) -> Result<(), MigrateError> {
    match ctl.recv()? {
        Msg::Ok => Ok(()),
        other => Err(WireError::Unexpected {
            got: other.kind(),
            state,
        }
        .into()),
    }
}

/// Sends one file's content as File + (Chunk | Hole)* + FileEnd.
pub(crate) fn send_file(
    ctl: &mut Ctl,
    target: Target,
    name: &str,
    path: &Path,
    mode: u32,
) -> Result<u64, MigrateError> {
    let (f, _) = crate::capped::open_regular(path)
        .map_err(|e| MigrateError::Rootfs(format!("{}: {e}", path.display())))?;
    send_file_as(ctl, target, name, path, f, mode, Changing::Fails)
}

/// What a file that changes while it is being sent does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Changing {
    /// The send fails (images; the rootfs while frozen: nothing may change it then).
    Fails,
    /// Best effort (the rootfs while the container runs): a file that grew is cut at the
    /// size the manifest gave (`at_most`: the destination accepts no more), one that shrank
    /// while read is padded with zeros. The final round compares hashes and sends it again
    /// as it is then.
    Tolerated { at_most: u64 },
}

/// Sends the open regular file `f` (`path` names it in errors).
fn send_file_as(
    ctl: &mut Ctl,
    target: Target,
    name: &str,
    path: &Path,
    f: std::fs::File,
    mode: u32,
    changing: Changing,
) -> Result<u64, MigrateError> {
    let io = |e: std::io::Error| MigrateError::Rootfs(format!("{}: {e}", path.display()));
    let mut size = f.metadata().map_err(io)?.len();
    if let Changing::Tolerated { at_most } = changing {
        size = size.min(at_most);
    }
    ctl.send(&Msg::File(FileStart {
        target,
        path: name.to_string(),
        size,
        mode,
    }))?;
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    // Holes go as Hole frames (the receiver seeks over them), data runs as chunks.
    let (mut run_end, mut hole) = (0, false);
    while total < size {
        if total == run_end {
            let (n, h) = super::rootfs::next_run(&f, total, size).map_err(io)?;
            (run_end, hole) = (total + n, h);
        }
        if hole {
            ctl.send(&Msg::Hole(Hole {
                len: run_end - total,
            }))?;
            total = run_end;
            continue;
        }
        let want = usize::try_from((run_end - total).min(CHUNK as u64)).unwrap_or(CHUNK);
        let mut n = f.read_at(&mut buf[..want], total).map_err(io)?;
        if n == 0 {
            if changing == Changing::Fails {
                return Err(MigrateError::Rootfs(format!(
                    "{} shrank while being sent",
                    path.display()
                )));
            }
            buf[..want].fill(0);
            n = want;
        }
        total += n as u64;
        ctl.send(&Msg::Chunk(buf[..n].to_vec()))?;
    }
    if changing == Changing::Fails && f.read_at(&mut buf[..1], size).map_err(io)? != 0 {
        return Err(MigrateError::Rootfs(format!(
            "{} grew while being sent",
            path.display()
        )));
    }
    ctl.send(&Msg::FileEnd)?;
    Ok(total)
}

/// One rootfs round: manifest, the destination's needs, the files. Returns files sent.
fn sync_rootfs(
    ctl: &mut Ctl,
    rootfs: &Path,
    final_sync: bool,
    hashes: &mut HashCache,
) -> Result<u64, MigrateError> {
    let read_before = hashes.reads;
    let rootfs = Beneath::open(rootfs)?;
    let entries = manifest(&rootfs, hashes)?;
    tracing::debug!(
        entries = entries.len(),
        files_read = hashes.reads - read_before,
        final_sync,
        "rootfs manifest"
    );
    let parts = batches(&entries, 4096, Entry::wire_size);
    let n = parts.len();
    for (i, p) in parts.into_iter().enumerate() {
        ctl.send(&Msg::Manifest(Manifest {
            entries: p.to_vec(),
            last: i + 1 == n,
        }))?;
    }
    let mut need = Vec::new();
    loop {
        match ctl.recv()? {
            Msg::Need(n) if need.len() + n.paths.len() <= entries.len() => {
                need.extend(n.paths);
                if n.last {
                    break;
                }
            }
            Msg::Need(_) => {
                return Err(MigrateError::Remote(
                    "asked for more files than the manifest has".into(),
                ))
            }
            other => {
                return Err(WireError::Unexpected {
                    got: other.kind(),
                    state: "waiting for the rootfs needs",
                }
                .into())
            }
        }
    }
    let idx: std::collections::BTreeMap<&str, &Entry> =
        entries.iter().map(|e| (e.path.as_str(), e)).collect();
    let mut sent = 0;
    for p in &need {
        if !final_sync {
            crate::ops::interrupt::check()?;
        }
        let e = idx.get(p.as_str()).ok_or_else(|| {
            MigrateError::Remote(format!("asked for {p:?}, which is not in the manifest"))
        })?;
        let rel = super::rootfs::check_rel(p)?;
        let full = rootfs.path().join(&rel);
        // While the container runs, what changed since the manifest is skipped: the final
        // round (frozen) settles it.
        let skip = |x: &std::io::Error| !final_sync && changed_since_listed(x);
        let fail = |x: std::io::Error| MigrateError::Rootfs(format!("{}: {x}", full.display()));
        if e.kind == "l" {
            let t = match rootfs.link(&rel) {
                Ok(t) => t,
                Err(x) if skip(&x) => continue, // (EINVAL: no longer a symlink)
                Err(x) => return Err(fail(x)),
            };
            ctl.send(&Msg::File(FileStart {
                target: Target::Rootfs,
                path: p.clone(),
                size: 0,
                mode: e.mode,
            }))?;
            ctl.send(&Msg::Chunk(t.to_string_lossy().as_bytes().to_vec()))?;
            ctl.send(&Msg::FileEnd)?;
        } else {
            let f = match rootfs.file(&rel) {
                Ok(f) => f,
                Err(x) if skip(&x) => continue,
                Err(x) => return Err(fail(x)),
            };
            let changing = if final_sync {
                Changing::Fails
            } else {
                Changing::Tolerated { at_most: e.size }
            };
            send_file_as(ctl, Target::Rootfs, p, &full, f, e.mode, changing)?;
        }
        sent += 1;
    }
    ctl.send(&Msg::SyncDone(SyncDone {
        deleted: vec![],
        final_sync,
    }))?;
    expect_ok(ctl, "waiting for the rootfs sync to be applied")?;
    Ok(sent)
}

/// Removes CRIU image files from a directory, leaving logs.
fn discard_images(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let is_image = p.extension().is_some_and(|x| x == "img")
            || p.file_name().is_some_and(|n| n == "stats-dump");
        if is_image && e.file_type().map(|t| t.is_file()).unwrap_or(false) {
            let _ = std::fs::remove_file(&p);
        }
    }
}

type CommitResult = Result<(i32, Instant), (MigrateError, bool)>;

/// The final rootfs delta, the non-page images and the Restore request.
fn send_final(
    ctl: &mut Ctl,
    job: &DumpJob,
    images: &Path,
    files_sent: &mut u64,
    hashes: &mut HashCache,
) -> Result<(), MigrateError> {
    *files_sent += sync_rootfs(ctl, &job.cfg.rootfs, true, hashes)?;
    tracing::debug!("final rootfs delta applied on the destination");
    let mut names: Vec<_> = std::fs::read_dir(images)
        .map_err(|e| MigrateError::Rootfs(e.to_string()))?
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".log") && !n.ends_with(".conf"))
        .collect();
    names.sort();
    for name in &names {
        send_file(ctl, Target::Image, name, &images.join(name), 0o600)?;
    }
    let meta = serde_json::to_value(&job.meta).map_err(|e| MigrateError::Rootfs(e.to_string()))?;
    ctl.send(&Msg::Restore(RestoreMsg { meta }))?;
    tracing::debug!(images = names.len(), "images sent, restore requested");
    Ok(())
}

/// Restored → Commit → Committed. The flag says whether the outcome is unknown (the
/// connection was lost after the commit was sent).
fn commit(ctl: &mut Ctl) -> Result<i32, (MigrateError, bool)> {
    let plain = |e: MigrateError| (e, false);
    let pid = match ctl.recv().map_err(|e| plain(e.into()))? {
        Msg::Restored(p) => p.pid,
        other => {
            return Err(plain(
                WireError::Unexpected {
                    got: other.kind(),
                    state: "waiting for the restore",
                }
                .into(),
            ))
        }
    };
    ctl.send(&Msg::Commit)
        .map_err(|e| (MigrateError::Ambiguous(e.to_string()), true))?;
    match ctl.recv() {
        Ok(Msg::Committed(p)) => Ok(p.pid.max(pid)),
        Ok(other) => Err(plain(
            WireError::Unexpected {
                got: other.kind(),
                state: "waiting for the commit",
            }
            .into(),
        )),
        Err(e @ WireError::Peer { .. }) => Err(plain(e.into())),
        Err(e) => Err((MigrateError::Ambiguous(e.to_string()), true)),
    }
}

fn choose_mode(
    req: &MigrateRequest,
    mem_track: bool,
    lazy_pages: bool,
) -> Result<(Mode, String), MigrateError> {
    match req.mode {
        Mode::StopCopy => Ok((Mode::StopCopy, "requested".into())),
        Mode::Auto if !mem_track => Ok((
            Mode::StopCopy,
            "no dirty memory tracking on the source kernel (pre-copy impossible); post-copy is not chosen automatically".into(),
        )),
        Mode::Auto => Ok((
            Mode::PreCopy,
            "the kernel tracks dirty memory: pre-copy rounds while the container runs, as many as the policy finds worth it".into(),
        )),
        Mode::PostCopy | Mode::Hybrid if !lazy_pages => Err(MigrateError::Unsupported(format!(
            "--mode {} needs userfaultfd (CRIU's lazy_pages feature), which this host lacks",
            req.mode.name()
        ))),
        Mode::PreCopy | Mode::Hybrid if !mem_track => Err(MigrateError::Unsupported(format!(
            "--mode {} needs dirty memory tracking, which this kernel lacks (CONFIG_MEM_SOFT_DIRTY)",
            req.mode.name()
        ))),
        m @ (Mode::PostCopy | Mode::Hybrid) => {
            crate::migrate::lazy_pages_ready().map_err(MigrateError::Unsupported)?;
            Ok((m, "requested".into()))
        }
        m => Ok((m, "requested".into())),
    }
}

/// The CPUs and memory nodes the job's container is pinned to (the cpuset files of the
/// limits its checkpoint metadata carries, as its restore will write them), for the
/// destination to check at Prepare. None when nothing is pinned.
fn cpuset_of(job: &DumpJob) -> Option<super::wire::Cpuset> {
    let settings = &job.meta.cgroup_settings;
    let cpus = settings.get("cpuset.cpus").cloned();
    let mems = settings.get("cpuset.mems").cloned();
    if cpus.is_none() && mems.is_none() {
        return None;
    }
    let dir = crate::runtime::cgroups::dir_of(&job.container.cgroup_paths, "cpuset.cpus")?;
    Some(super::wire::Cpuset {
        dir: dir.clone(),
        cpus,
        mems,
    })
}

/// The memory the job's container holds (see [`crate::runtime::memroom::held`]), for the
/// destination to check at Prepare. None where its memory cgroup does not show it.
fn memory_of(job: &DumpJob) -> Option<Box<super::wire::Memory>> {
    let dir = crate::runtime::cgroups::dir_of(&job.container.cgroup_paths, "memory.stat")?;
    let bytes = crate::runtime::memroom::held(std::path::Path::new(dir))?;
    Some(Box::new(super::wire::Memory {
        dir: dir.clone(),
        bytes,
    }))
}

/// Bytes of the deleted files the job's container keeps open that its dump copies (see
/// [`crate::runtime::memroom::ghost_bytes`]), for the destination to check at Prepare. The
/// container runs on, so this is what it holds now.
fn ghosts_of(job: &DumpJob, limit: Option<u32>) -> u64 {
    let Some(pids) = job.tasks() else {
        return 0;
    };
    let limit = limit.map_or(crate::oci::options::CRIU_GHOST_LIMIT, u64::from);
    crate::runtime::memroom::ghost_bytes(&pids, limit)
}

/// The locks the job's container holds (each once), for the destination to check at
/// Prepare. The container runs on, so these are the ones it holds now.
fn locks_of(job: &DumpJob) -> Vec<super::wire::LockedFile> {
    let pids = crate::ops::checkpoint::container_pids(&job.container);
    let mut locks: Vec<super::wire::LockedFile> =
        crate::runtime::locks::held_locks(&pids, super::wire::MAX_LOCKS)
            .into_iter()
            .filter_map(|h| {
                Some(super::wire::LockedFile {
                    path: h.path.to_str()?.to_string(),
                    lock: h.lock,
                })
            })
            .collect();
    locks.sort_by_key(|f| {
        let l = &f.lock;
        (f.path.clone(), l.kind.clone(), l.write, l.start, l.end)
    });
    locks.dedup();
    locks
}

/// The job's container's cgroup limits (see [`super::wire::Limits`]), for the destination
/// to check at Prepare. None when it has none.
fn limits_of(job: &DumpJob) -> Option<Box<super::wire::Limits>> {
    let settings: std::collections::BTreeMap<String, String> = job
        .meta
        .cgroup_settings
        .iter()
        .filter(|(k, _)| *k != crate::runtime::cgroups::DEVICES_LIST)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if settings.is_empty() {
        return None;
    }
    Some(Box::new(super::wire::Limits {
        paths: job.container.cgroup_paths.clone(),
        settings,
    }))
}

/// How long the source waits, after serving the last page, for the destination's word.
const SETTLE_WAIT: Duration = Duration::from_secs(30);

/// Post-copy, once the source served its pages: the destination closes the control
/// connection when every page has arrived, or first sends an error when the container's
/// memory could not all arrive (it killed the container then). No word within
/// [`SETTLE_WAIT`] is logged and taken as arrived: the source's CRIU counted the transfer
/// complete.
fn pages_settled(ctl: &mut Ctl) -> Result<(), MigrateError> {
    let _ = ctl.stream.set_read_timeout(Some(SETTLE_WAIT));
    match ctl.recv() {
        Err(WireError::Closed) => Ok(()),
        Err(WireError::Peer { message, .. }) => Err(MigrateError::Lost(message)),
        Err(e) => {
            tracing::warn!("no word from the destination after the page transfer: {e}");
            Ok(())
        }
        Ok(other) => {
            tracing::warn!(
                "unexpected {:?} from the destination after the page transfer",
                other.kind()
            );
            Ok(())
        }
    }
}

/// Why a container with a terminal is not migrated: its pty master is held by whoever started
/// it on the source (a console socket's receiver, containerd's shim), and `ferry serve` has
/// nobody on the destination to hand the restored one to.
pub(crate) const TERMINAL_REFUSED: &str =
    "the container has a terminal (process.terminal in its config.json): its pty could not \
     follow it, since nothing on the destination would receive the restored pty master; \
     only containers started without a terminal can be migrated";

/// Migrates a runc container to a `ferry serve` destination.
pub fn migrate(criu: &Criu, req: &MigrateRequest) -> Result<MigrateReport, MigrateError> {
    let started = Instant::now();
    require_root()?;
    let features = criu.features()?;
    let version = criu.require_version()?;
    let settings = DumpSettings {
        leave_running: false,
        tcp_established: req.tcp_established,
        tcp_close: !req.tcp_established,
        network_lock: crate::net::lock::host_method().map(|m| m.criu()),
        ghost_limit: req.ghost_limit,
        file_locks: req.file_locks,
        ..Default::default()
    };
    let job = DumpJob::prepare(&req.runtime_root, &req.id, &settings, &version.to_string())?;
    if job.cfg.terminal {
        return Err(MigrateError::Unsupported(TERMINAL_REFUSED.into()));
    }
    // A namespace given by path (CNI style) is rebuilt on the destination from these facts.
    let netns = crate::net::netns_path(&job.cfg);
    let net = match &netns {
        Some(p) => crate::net::facts::gather(p).map_err(|e| match e {
            crate::net::NetError::Unsupported(why) => MigrateError::Unsupported(why),
            e => MigrateError::Net(e.to_string()),
        })?,
        None => None,
    };
    if let (Some(p), Some(_)) = (&netns, &net) {
        let others = crate::net::dest::foreign_users(p, job.container.init_pid)
            .map_err(|e| MigrateError::Net(e.to_string()))?;
        if !others.is_empty() {
            return Err(MigrateError::Unsupported(format!(
                "the network namespace {} is shared with processes outside the container \
                 (pids {others:?}); its address cannot move without them",
                p.display()
            )));
        }
    }
    let (mode, mode_reason) = choose_mode(req, features.mem_track, features.lazy_pages)?;
    let runc_version = Runc::new(&req.runtime_root)
        .version()
        .unwrap_or_else(|_| "unknown".into());
    let config_path = job.container.bundle.join("config.json");
    let unusable =
        |why: String| MigrateError::Unsupported(format!("{}: {why}", config_path.display()));
    let config = match crate::capped::read_capped(&config_path, super::wire::MAX_CONFIG) {
        Ok(b) => String::from_utf8(b).map_err(|_| unusable("not UTF-8".into()))?,
        Err(crate::capped::CappedError::Io(e)) => {
            return Err(MigrateError::Rootfs(format!(
                "{}: {e}",
                config_path.display()
            )))
        }
        Err(crate::capped::CappedError::TooLarge(n)) => {
            return Err(unusable(format!(
                "{n} bytes; a migration carries at most {}",
                super::wire::MAX_CONFIG
            )))
        }
    };

    let (stream, session_id) = open(req, Role::Control, None)?;
    let mut ctl = Ctl { stream, sent: 0 };
    tracing::info!(to = %req.to, session = %session_id, "authenticated");
    ctl.send(&Msg::Prepare(Box::new(Prepare {
        container: req.id.clone(),
        config,
        criu_version: version.to_string(),
        runc_version,
        mem_track: features.mem_track,
        lazy_pages: features.lazy_pages,
        mode: mode.name().into(),
        tcp_established: req.tcp_established,
        tcp_close: !req.tcp_established,
        file_locks: req.file_locks,
        locks: if req.file_locks {
            locks_of(&job)
        } else {
            Vec::new()
        },
        net: net.clone().map(Box::new),
        cgroups: Some(crate::runtime::cgroups::layout_of(&job.container.cgroup_paths).into()),
        cpuset: cpuset_of(&job),
        memory: memory_of(&job),
        limits: limits_of(&job),
        ghosts: ghosts_of(&job, req.ghost_limit),
    })))?;
    match ctl.recv()? {
        Msg::Prepared(p) => {
            tracing::info!(criu = %p.criu_version, runc = %p.runc_version, "destination ready")
        }
        other => {
            return Err(WireError::Unexpected {
                got: other.kind(),
                state: "waiting for prepared",
            }
            .into())
        }
    }

    // Scratch dir for the non-page images (pages never land here).
    let work = PathBuf::from(crate::ops::restore::FERRY_RUN_DIR).join(format!(
        "migrate-{}-{}",
        req.id,
        std::process::id()
    ));
    std::fs::create_dir_all(&work)
        .map_err(|e| MigrateError::Rootfs(format!("{}: {e}", work.display())))?;
    let result = run(criu, req, mode, &job, &mut ctl, &session_id, &work);
    // With TLS, a last message (the abort notice) must leave before the process does.
    ctl.stream.finish(Duration::from_secs(5));
    if result.is_ok() {
        if let Err(e) = remove_tree(&work) {
            tracing::warn!("cleanup: {e}");
        }
    } else {
        // Keep CRIU's logs for the operator; the images (process state) go.
        discard_images(&work.join("images"));
        crate::ops::kept::prune_failed_ops(
            Path::new(crate::ops::restore::FERRY_RUN_DIR),
            crate::ops::kept::KEEP,
        );
        tracing::info!(
            "migration failed; CRIU's logs are kept in {}",
            work.display()
        );
    }
    let out = result?;
    if let Some(s) = crate::ops::interrupt::requested() {
        tracing::warn!(
            "{} arrived after the commit had begun: not stopped, the migration finished",
            crate::ops::interrupt::signal_name(s)
        );
    }
    if let Err(e) = Runc::new(&req.runtime_root).delete(&req.id) {
        tracing::warn!(
            "migrated container {} could not be deleted from the source's runc: {e}",
            req.id
        );
    }
    // The container's namespace here (still locked by CRIU, its tasks gone) goes, and its
    // veth with it: the address now lives on the destination.
    let mut netns_removed = false;
    if let (Some(p), Some(_)) = (&netns, &net) {
        match crate::net::dest::remove_source_netns(p) {
            Ok(()) => netns_removed = true,
            Err(e) => tracing::warn!("migrated, but the source's network namespace stays: {e}"),
        }
    }
    let final_bytes = out.stats.pages_written * 4096 + out.relay_bytes;
    let mut rounds = out.pre_rounds;
    rounds.push(Round {
        pages_scanned: out.stats.pages_scanned,
        pages_written: out.stats.pages_written,
        bytes: final_bytes,
        // CRIU's memdump time spans the whole page round of a dump (collecting the pages and,
        // in its chunk mode, writing them: memwrite is counted inside it, not after it).
        ms: out.stats.memdump_time_us / 1000,
    });
    let bytes: u64 = rounds.iter().map(|r| r.bytes).sum();
    Ok(MigrateReport {
        container: req.id.clone(),
        to: req.to.clone(),
        mode: mode.name().into(),
        mode_reason,
        rounds,
        rounds_reason: out.rounds_reason,
        frozen_ms: out.stats.frozen_time_us / 1000,
        downtime_ms: out.downtime_ms,
        total_ms: started.elapsed().as_millis() as u64,
        bytes_sent: ctl.sent + bytes,
        rootfs_files_sent: out.files_sent,
        restored_pid: out.pid,
        criu_version: version.to_string(),
        tcp_connections: if req.tcp_established { out.tcp } else { 0 },
        tcp_closed: if req.tcp_established { 0 } else { out.tcp },
        netns_removed,
        paused: job.meta.paused,
    })
}

/// What the freeze-and-commit phase produced.
struct Outcome {
    pre_rounds: Vec<Round>,
    rounds_reason: String,
    /// Bytes relayed to the destination after the commit (post-copy pages).
    relay_bytes: u64,
    pid: i32,
    downtime_ms: u64,
    files_sent: u64,
    stats: crate::images::DumpStats,
    /// Established TCP connections of the container when it was frozen.
    tcp: u64,
}

/// Links `dir/parent` to `target` (relative to `dir`). CRIU creates this link itself only
/// on its command line: over the RPC it applies `parent_img` after opening the images dir,
/// so the link is ferry's to make (`parent_img` is still set: CRIU's dirty-page logic needs
/// it).
pub(crate) fn link_parent(dir: &Path, target: &str) -> Result<(), MigrateError> {
    match std::os::unix::fs::symlink(target, dir.join("parent")) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(MigrateError::Rootfs(format!(
            "{}: parent link: {e}",
            dir.display()
        ))),
    }
}

/// What the pre-copy rounds did.
struct PreRounds {
    rounds: Vec<Round>,
    /// The policy's reason for stopping.
    reason: String,
    /// The last round's directory name (the final dump's parent).
    last_dir: String,
    /// CRIU's running totals after the last round (the session's stats accumulate).
    stats_total: crate::images::DumpStats,
}

/// The pre-copy rounds: PRE_DUMPs into the destination's page server while the container
/// runs, until the policy says stop. Returns the rounds, the policy's reason and the last
/// round's directory name (the final dump's parent).
#[allow(clippy::too_many_arguments)]
fn pre_dump_rounds(
    criu: &Criu,
    req: &MigrateRequest,
    job: &DumpJob,
    ctl: &mut Ctl,
    session: &mut crate::criu::swrk::Swrk,
    ps_fd: std::os::fd::RawFd,
    images: &Path,
    progress: (&Progress, &Option<Link>),
    mut room: Option<u64>,
    lazy_final: bool,
) -> Result<PreRounds, MigrateError> {
    let mut policy = Policy::new(req.policy, req.max_rounds, req.target_downtime_ms);
    if lazy_final {
        policy = policy.with_lazy_final();
    }
    let mut rounds = Vec::new();
    let mut previous_start: Option<Instant> = None;
    let mut before = crate::images::DumpStats::default();
    for k in 1u32.. {
        crate::ops::interrupt::check()?;
        let name = format!("pre-{k}");
        let dir = images.join(&name);
        std::fs::create_dir_all(&dir).map_err(|e| MigrateError::Rootfs(e.to_string()))?;
        let mut o = job.opts.clone();
        o.set_track_mem(true);
        if k > 1 {
            let parent = format!("../pre-{}", k - 1);
            link_parent(&dir, &parent)?;
            o.set_parent_img(parent);
        }
        let mut ps = CriuPageServerInfo::new();
        ps.set_fd(ps_fd);
        o.ps = protobuf::MessageField::some(ps);
        let request = Request {
            opts: o,
            images_dir: open_dir(&dir)?,
            work_dir: Some(open_dir(&dir)?),
            log_path: Some(dir.join(DUMP_LOG)),
        };
        let start = Instant::now();
        tracing::info!(round = k, "pre-dump");
        let line = progress
            .0
            .stage(format!("round {k}: pre-dump"), sent_counter(progress.1));
        run_pre_dump(session, request, &mut |_| Reply::Success, criu.timeout())
            .map_err(|e| MigrateError::Op(e.into()))?;
        let wall = start.elapsed();
        // (Unreadable stats count as an empty round and keep the running totals.)
        let total = read_dump_stats(&dir).unwrap_or_else(|_| before.clone());
        let st = total.since(&before);
        before = total;
        let facts = RoundFacts {
            pages_written: st.pages_written,
            write_ms: st.memwrite_time_us as f64 / 1000.0,
            wall_ms: wall.as_secs_f64() * 1000.0,
            since_previous_ms: previous_start
                .map(|p| start.duration_since(p).as_secs_f64() * 1000.0)
                .unwrap_or(0.0),
            // What the destination had before the round, less the round's pages.
            room_after: room.map(|r| r.saturating_sub(st.pages_written * PAGE)),
            // Only the room rules use it, and only until a dirty rate is known (round 2 on):
            // not scanned where it would not count.
            dirty_now: if k == 1 && room.is_some() {
                written_since_round(job)
            } else {
                None
            },
        };
        previous_start = Some(start);
        let decision = policy.after_round(facts);
        line.finish(&format!("{} pages; {}", st.pages_written, decision.reason));
        tracing::info!(
            round = k,
            pages = st.pages_written,
            dirty_now = facts.dirty_now,
            ms = wall.as_millis() as u64,
            stop = decision.stop,
            "{}",
            decision.reason
        );
        rounds.push(Round {
            pages_scanned: st.pages_scanned,
            pages_written: st.pages_written,
            bytes: st.pages_written * PAGE,
            ms: wall.as_millis() as u64,
        });
        if decision.stop {
            // Better refused now, with the container running, than failed after the freeze.
            if let Some(why) = policy.final_room_shortfall() {
                return Err(MigrateError::Incompatible(why));
            }
        }
        ctl.send(&Msg::RoundDone(RoundDone {
            round: k,
            next_final: decision.stop,
        }))?;
        // Hybrid: the round's page maps come back first (see `receive_pagemaps`).
        room = receive_pagemaps(ctl, &dir)?;
        if decision.stop {
            return Ok(PreRounds {
                rounds,
                reason: decision.reason,
                last_dir: name,
                stats_total: before,
            });
        }
    }
    unreachable!("the rounds loop only ends by returning")
}

/// The pages the container wrote since the last pre-dump round froze it, when they can be
/// counted (see [`crate::runtime::softdirty`]).
fn written_since_round(job: &DumpJob) -> Option<u64> {
    crate::runtime::softdirty::dirty_pages(&job.tasks()?)
        .map_err(|e| tracing::debug!("soft-dirty pages not counted: {e}"))
        .ok()
}

/// Bytes sent on the data connection, as seen through ferry's copy of it.
/// (With TLS the data connection ferry holds is the local end of the pump, which the kernel
/// keeps no TCP counters for: the line then shows time only.)
fn sent_counter(probe: &Option<Link>) -> impl Fn() -> u64 + Send + 'static {
    let p = match probe {
        Some(Link::Tcp(s)) => s.try_clone().ok(),
        _ => None,
    };
    move || p.as_ref().map(bytes_acked).unwrap_or(0)
}

/// Receives one file's Chunk* FileEnd into `dest` (created), refusing an announced size over
/// `cap` and more than `longest` bytes of chunks.
pub(crate) fn receive_file(
    ctl: &mut Ctl,
    f: &FileStart,
    dest: &Path,
    cap: u64,
    longest: u64,
    mut digest: Option<&mut BlockHasher>,
) -> Result<(), MigrateError> {
    if f.size > cap {
        return Err(MigrateError::Remote(format!(
            "{} announced {} bytes (cap {cap})",
            f.path, f.size
        )));
    }
    let io = |e: std::io::Error| MigrateError::Write(format!("{}: {e}", dest.display()));
    let mut out = std::fs::File::create(dest).map_err(io)?;
    let mut got = 0u64;
    loop {
        match ctl.recv()? {
            Msg::Chunk(b) => {
                got += b.len() as u64;
                if got > longest {
                    return Err(MigrateError::Remote(format!(
                        "{} is longer than announced",
                        f.path
                    )));
                }
                std::io::Write::write_all(&mut out, &b).map_err(io)?;
                if let Some(d) = digest.as_deref_mut() {
                    d.update(&b);
                }
            }
            Msg::Hole(h) => {
                got = got.saturating_add(h.len);
                if got > longest {
                    return Err(MigrateError::Remote(format!(
                        "{} is longer than announced",
                        f.path
                    )));
                }
                let by = i64::try_from(h.len).map_err(|_| {
                    MigrateError::Remote(format!("{}: a hole of {} bytes", f.path, h.len))
                })?;
                std::io::Seek::seek(&mut out, std::io::SeekFrom::Current(by)).map_err(io)?;
                if let Some(d) = digest.as_deref_mut() {
                    d.zeros(h.len);
                }
            }
            // The length also counts a hole at the end, which nothing was written over.
            Msg::FileEnd => return out.set_len(got).map_err(io),
            other => {
                return Err(WireError::Unexpected {
                    got: other.kind(),
                    state: "receiving a file",
                }
                .into())
            }
        }
    }
}

/// Largest page map accepted back from the destination.
const MAX_PAGEMAP: u64 = 256 * 1024 * 1024;

/// Until PageServerReady: image files the destination sends back into a round's directory
/// (hybrid: the round's page maps, and empty pages images of the same names, so that the
/// lazy final dump finds its parent chain and marks pages already sent as in the parent).
/// Returns the room the destination reports left in its work dir.
fn receive_pagemaps(ctl: &mut Ctl, dir: &Path) -> Result<Option<u64>, MigrateError> {
    loop {
        let f = match ctl.recv()? {
            Msg::PageServerReady(r) => return Ok(r.room),
            Msg::File(f) if f.target == Target::Image => f,
            other => {
                return Err(WireError::Unexpected {
                    got: other.kind(),
                    state: "waiting for the next page server",
                }
                .into())
            }
        };
        let name = super::rootfs::check_rel(&f.path)?;
        let plain = name.components().count() == 1
            && f.path.ends_with(".img")
            && (f.path.starts_with("pagemap-") || f.path.starts_with("pages-"));
        if !plain {
            return Err(MigrateError::Remote(format!(
                "unexpected image {:?} ({} bytes) sent back",
                f.path, f.size
            )));
        }
        receive_file(ctl, &f, &dir.join(name), MAX_PAGEMAP, f.size, None)?;
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    criu: &Criu,
    req: &MigrateRequest,
    mode: Mode,
    job: &DumpJob,
    ctl: &mut Ctl,
    session_id: &str,
    work: &Path,
) -> Result<Outcome, MigrateError> {
    // CPU compatibility before anything else is moved.
    let cpu_dir = work.join("cpuinfo");
    std::fs::create_dir_all(&cpu_dir).map_err(|e| MigrateError::Rootfs(e.to_string()))?;
    let mut o = crate::pb::CriuOpts::new();
    o.set_log_file("cpuinfo.log".into());
    criu.cpuinfo_dump(Request {
        opts: o,
        images_dir: open_dir(&cpu_dir)?,
        work_dir: Some(open_dir(&cpu_dir)?),
        log_path: Some(cpu_dir.join("cpuinfo.log")),
    })?;
    send_file(
        ctl,
        Target::Cpuinfo,
        "cpuinfo.img",
        &cpu_dir.join("cpuinfo.img"),
        0o600,
    )?;
    expect_ok(ctl, "waiting for the CPU check")?;

    // The final round (frozen) re-reads only what changed since this one.
    let mut hashes = HashCache::default();
    let mut files_sent = sync_rootfs(ctl, &job.cfg.rootfs, false, &mut hashes)?;
    tracing::info!(files = files_sent, "rootfs synced while running");
    crate::ops::interrupt::check()?;

    let (data, _) = open(req, Role::Data, Some(session_id))?;
    let room = match ctl.recv()? {
        Msg::PageServerReady(r) => r.room,
        other => {
            return Err(WireError::Unexpected {
                got: other.kind(),
                state: "waiting for the page server",
            }
            .into())
        }
    };

    let images = work.join("images");
    std::fs::create_dir_all(&images).map_err(|e| MigrateError::Rootfs(e.to_string()))?;
    let pre_copy = matches!(mode, Mode::PreCopy | Mode::Hybrid);
    let mut opts = job.opts.clone();
    let mut fds = ChildFds::default();
    let mut ps = CriuPageServerInfo::new();
    // Post-copy: CRIU's lazy page server listens on loopback only (the config file overrides
    // the RPC's any-address default) and ferry relays it through the data connection.
    let mut lazy: Option<(u16, Link)> = None;
    // Pre-copy: the data connection is inherited once by the criu session; every round
    // (CRIU runs each pre-dump in a child) and the final dump write into it.
    let mut ps_fd = None;
    let progress = Progress::new(req.progress);
    let probe = data.try_clone().ok();
    match mode {
        Mode::PostCopy => lazy = Some((0, data)),
        Mode::Hybrid => {
            let relay_end = data
                .try_clone()
                .map_err(|e| MigrateError::Wire(WireError::Io(e)))?;
            ps_fd = Some(fds.inherit(OwnedFd::from(data)));
            lazy = Some((0, relay_end));
        }
        _ => ps_fd = Some(fds.inherit(OwnedFd::from(data))),
    }
    // The dump's criu inherits the data connection (ps.fd), so it is started only now.
    let (mut session, _) = criu.session(fds)?;
    let mut pre_rounds = Vec::new();
    let mut rounds_reason = String::new();
    let mut stats_before = crate::images::DumpStats::default();
    if pre_copy {
        let fd = ps_fd.ok_or_else(|| MigrateError::Remote("no data connection".into()))?;
        let done = pre_dump_rounds(
            criu,
            req,
            job,
            ctl,
            &mut session,
            fd,
            &images,
            (&progress, &probe),
            room,
            mode == Mode::Hybrid,
        )?;
        pre_rounds = done.rounds;
        rounds_reason = done.reason;
        stats_before = done.stats_total;
        opts.set_track_mem(true);
        link_parent(&images, &done.last_dir)?;
        opts.set_parent_img(done.last_dir);
    }
    if let Some((port_slot, _)) = lazy.as_mut() {
        let port = free_loopback_port()
            .map_err(|e| MigrateError::Rootfs(format!("loopback port: {e}")))?;
        let conf = work.join("lazy.conf");
        std::fs::write(&conf, "address 127.0.0.1\n")
            .map_err(|e| MigrateError::Rootfs(e.to_string()))?;
        opts.set_lazy_pages(true);
        opts.set_config_file(conf.to_string_lossy().into_owned());
        ps.set_port(i32::from(port));
        *port_slot = port;
    } else if let Some(fd) = ps_fd {
        ps.set_fd(fd);
    }
    opts.ps = protobuf::MessageField::some(ps);
    let request = Request {
        opts,
        images_dir: open_dir(&images)?,
        work_dir: Some(open_dir(&images)?),
        log_path: Some(images.join(DUMP_LOG)),
    };

    let mut failure: Option<MigrateError> = None;
    let mut ambiguous = false;
    let mut restored = 0;
    let mut committed_at = None;
    let mut relay: Option<SourceRelay> = None;
    let mut committer: Option<std::thread::JoinHandle<CommitResult>> = None;
    // Until the dump says when it froze the container (a paused one: from here).
    let mut freeze_start = Instant::now();
    let mut post_dump_at = None;
    let mut tcp = None;
    let fault = std::env::var("FERRY_TEST_FAULT").unwrap_or_default();
    let mut notify = |n: Notification| -> Reply {
        if n.script != Script::PostDump {
            return Reply::Success;
        }
        post_dump_at = Some(Instant::now());
        // Frozen: the count cannot change any more (counted off the freeze's path).
        tcp = Some(crate::net::established_tcp_in_background(
            job.container.init_pid,
        ));
        if fault == "fail-post-dump" {
            tracing::info!("FERRY_TEST_FAULT: failing the final dump at post-dump");
            failure = Some(MigrateError::Remote(
                "injected fault (FERRY_TEST_FAULT=fail-post-dump): the final dump fails".into(),
            ));
            return Reply::Failure("FERRY_TEST_FAULT".into());
        }
        if let Err(e) = send_final(ctl, job, &images, &mut files_sent, &mut hashes) {
            let text = e.to_string();
            failure = Some(e);
            return Reply::Failure(text);
        }
        if let Some((port, data)) = lazy.take() {
            // Post-copy: the restore on the destination already needs pages, which CRIU serves
            // only after post-dump: answer now and commit alongside. Should the destination
            // fail, the relay breaks CRIU's connection so that its lazy dump fails and the
            // tasks stay; the end of the page stream counts as such only once committed.
            let r = SourceRelay::start(port, data, Duration::from_secs(60));
            let verdict = r.verdict();
            relay = Some(r);
            match ctl.stream.try_clone() {
                Ok(stream) => {
                    committer = Some(std::thread::spawn(move || {
                        let mut c2 = Ctl { stream, sent: 0 };
                        let res = commit(&mut c2);
                        match &res {
                            Ok(_) => verdict.commit(),
                            Err(_) => verdict.fail(),
                        }
                        if res.is_ok() {
                            tracing::info!(
                                "committed: the container runs on the destination; serving \
                                 its pages"
                            );
                        }
                        res.map(|pid| (pid, Instant::now()))
                    }));
                    Reply::Success
                }
                Err(e) => {
                    verdict.fail();
                    failure = Some(MigrateError::Wire(WireError::Io(e)));
                    Reply::Failure("cannot share the control connection".into())
                }
            }
        } else {
            // Stop-copy: hold CRIU (the source tasks stay frozen) until the destination runs it.
            match commit(ctl) {
                Ok(pid) => {
                    restored = pid;
                    committed_at = Some(Instant::now());
                    Reply::Success
                }
                Err((e, amb)) => {
                    ambiguous = amb;
                    let text = e.to_string();
                    failure = Some(e);
                    Reply::Failure(text)
                }
            }
        }
    };
    tracing::info!(id = %req.id, "freezing and dumping");
    let label = match mode {
        Mode::PostCopy | Mode::Hybrid => "final dump, then lazy pages",
        _ => "final dump (frozen)",
    };
    let line = progress.stage(label.to_string(), sent_counter(&probe));
    let dumped = job.run(&mut session, request, &mut notify, criu.timeout());
    if let Ok(Some(at)) = &dumped {
        freeze_start = *at;
    }
    let dumped = dumped.map(|_| ());
    session.finish(Duration::from_secs(5));
    let mut relay_bytes = 0;
    if let Some(h) = committer {
        match h
            .join()
            .unwrap_or_else(|_| Err((MigrateError::Remote("commit thread panicked".into()), false)))
        {
            Ok((pid, at)) => {
                restored = pid;
                committed_at = Some(at);
            }
            Err((e, amb)) => {
                ambiguous = amb;
                failure = Some(e);
            }
        }
    }
    let served_pages = relay.is_some();
    if let Some(r) = relay {
        r.criu_ended();
        let failed = dumped.is_err() || failure.is_some();
        if failed {
            // Failed: nothing more is to cross (a relay still connecting to a CRIU that
            // failed before listening would otherwise wait out its deadline).
            r.verdict().fail();
        }
        match r.join() {
            Ok((requests, pages)) => {
                relay_bytes = pages;
                tracing::info!(
                    pages_bytes = pages,
                    request_bytes = requests,
                    "post-copy page transfer finished"
                );
            }
            // A failed migration's relay ends with the poisoned stream: said by the error.
            Err(e) if failed => tracing::debug!("post-copy relay: {e}"),
            Err(e) => tracing::warn!("post-copy relay: {e}"),
        }
    }
    line.finish(if dumped.is_ok() && failure.is_none() {
        "done"
    } else {
        "failed"
    });
    job.settle_freezer(ambiguous);
    match (dumped, failure) {
        (Ok(()), None) => {}
        (Err(e), None) => return Err(MigrateError::Op(e)),
        (Err(e), Some(f)) => {
            tracing::info!("dump ended with: {e}");
            let _ = ctl.send(&Msg::Error(super::wire::ErrorMsg {
                kind: "aborted".into(),
                message: f.to_string(),
            }));
            return Err(f);
        }
        // The dump finished (post-copy: every page was served, the source tasks are gone)
        // but the destination did not confirm: nothing is known to run anywhere.
        (Ok(()), Some(f)) => {
            return Err(MigrateError::Ambiguous(format!(
                "the destination did not confirm the commit: {f}"
            )))
        }
    }
    if served_pages {
        pages_settled(ctl)?;
    }
    let mut stats = read_dump_stats(&images)
        .unwrap_or_default()
        .since(&stats_before);
    tracing::debug!(?stats, "final dump statistics (CRIU's)");
    if matches!(mode, Mode::PostCopy | Mode::Hybrid) {
        // CRIU's frozen_time of a lazy dump spans the whole page transfer; what the workload
        // feels is the freeze up to the hand-over.
        let frozen = post_dump_at
            .map(|p| p.duration_since(freeze_start))
            .unwrap_or_default();
        stats.frozen_time_us = frozen.as_micros() as u64;
    }
    let downtime = committed_at
        .map(|c| c.duration_since(freeze_start))
        .unwrap_or_default();
    Ok(Outcome {
        pre_rounds,
        rounds_reason,
        relay_bytes,
        pid: restored,
        downtime_ms: downtime.as_millis() as u64,
        files_sent,
        stats,
        tcp: tcp.and_then(|h| h.join().ok()).unwrap_or(0),
    })
}
