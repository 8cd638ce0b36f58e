//! The destination side: `ferry serve`.
//!
//! [`serve`] accepts connections until told to stop; each runs on its own thread. A control
//! connection is one migration, driven by [`Receiver`], an explicit state machine: every
//! state names what it accepts, a message that does not fit is an error naming both, and any
//! error ends the migration with everything undone (page server, images, cgroups, runc state,
//! a bundle this migration created). A data connection is handed to the page server of the
//! control session it names. Authentication comes first on both; a failed or garbled
//! connection is logged and closed, and serving goes on. Peers that have not authenticated
//! are bounded: at most [`MAX_HANDSHAKES`] at a time (more are closed as they arrive), each
//! closed if it has not finished its handshake (TLS included) [`HANDSHAKE_DEADLINE`] after
//! it connected, so that idle or trickling connections cannot pile up threads.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver as ChanReceiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::auth::{random_hex, Token};
use super::link::{self, Link};
use super::pages::PageSink;
use super::rootfs::{
    check_rel, delete_extra, install, link_names, needed, settle_dirs, staging_path, BlockHasher,
    HashCache,
};
use super::source::{tune, Ctl};
use super::tls::TlsServer;
use super::wire::{
    Entry, ErrorMsg, FileStart, Msg, Pid, Prepare, Prepared, Role, Target, WireError,
};
use super::{kind_name, MigrateError};
use crate::criu::client::{CriuVersion, PageServer, Request};
use crate::criu::swrk::{ChildFds, Swrk};
use crate::criu::Criu;
use crate::oci::meta::CheckpointMeta;
use crate::oci::state::RuncRoot;
use crate::oci::validate_id;
use crate::ops::open_dir;
use crate::ops::restore::{restore_gated, RestoreRequest};
use crate::pb::{CriuOpts, CriuPageServerInfo};
use crate::runtime::mounts::remove_tree;
use crate::runtime::runc::Runc;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub token: Token,
    pub bundles: PathBuf,
    pub runtime_root: PathBuf,
    pub work_dir: PathBuf,
    /// Restored containers' cgroups go under this name (two hosts sharing one cgroupfs).
    pub cgroup_prefix: Option<String>,
    pub io_timeout: Duration,
    /// Called once a received container runs and is committed.
    pub on_committed: Option<super::hook::CommitHook>,
    /// TLS required on every connection (with `--tls-*`).
    pub tls: Option<TlsServer>,
    /// How a container with a network namespace given by path gets one here (`--bridge`,
    /// `--netns-hook`); None refuses such containers.
    pub net: Option<crate::net::dest::NetSetup>,
    /// Who writes the pages the source dumps (`--page-server`).
    pub page_receiver: PageReceiver,
}

/// The destination's end of the source's page stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PageReceiver {
    /// ferry's own receiver ([`super::pages`]): a 1 MiB transfer pipe.
    #[default]
    Ferry,
    /// A CRIU page server per round, started through the RPC (64 KiB steps).
    Criu,
}

impl PageReceiver {
    pub fn parse(s: &str) -> Option<PageReceiver> {
        match s {
            "ferry" => Some(PageReceiver::Ferry),
            "criu" => Some(PageReceiver::Criu),
            _ => None,
        }
    }
}

/// A round's page receiver while it runs.
enum PageServerRun {
    Ferry(PageSink),
    Criu(PageServer, Swrk),
}

struct Shared {
    cfg: ServeConfig,
    criu: Criu,
    /// Control sessions waiting for their data connection.
    sessions: Mutex<HashMap<String, SyncSender<Link>>>,
    /// Containers being received.
    busy: Mutex<HashSet<String>>,
    /// Room for their memory given to migrations under way, by container; see
    /// [`crate::runtime::memroom::Claim`].
    claims: Mutex<HashMap<String, crate::runtime::memroom::Claim>>,
    /// Room for their page images given to migrations under way, by container.
    disk_claims: Mutex<HashMap<String, crate::runtime::memroom::DiskClaim>>,
    /// Set once `serve` is asked to stop: no new migrations.
    stopping: AtomicBool,
    /// The `--cgroup-prefix` directories restores went into: removed when empty at the end.
    prefix_dirs: Mutex<std::collections::BTreeSet<PathBuf>>,
}

impl ServeConfig {
    /// Creates `bundles`, `work_dir` and the runc root if needed; an error names the flag and
    /// the path ("not a directory" for a file in a directory's place). [`serve`] needs them.
    pub fn make_dirs(&self) -> std::io::Result<()> {
        let named = |flag: &str, dir: &Path, e: &dyn std::fmt::Display| {
            format!("{flag} {}: {e}", dir.display())
        };
        for (flag, dir) in [("--bundles", &self.bundles), ("--work-dir", &self.work_dir)] {
            if dir.exists() && !dir.is_dir() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    named(flag, dir, &"not a directory"),
                ));
            }
            std::fs::create_dir_all(dir)
                .map_err(|e| std::io::Error::new(e.kind(), named(flag, dir, &e)))?;
        }
        // A runc root restores could not use would otherwise fail only at the first migration.
        // InvalidInput: the caller's "invalid input" (a runc root that is not runc's).
        crate::oci::state::RuncRoot::open_or_create(&self.runtime_root).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("--runtime-root: {e}"),
            )
        })?;
        Ok(())
    }
}

/// Serves until `shutdown` is set. The directories of `cfg` exist already
/// ([`ServeConfig::make_dirs`]: before the caller binds, so that a wrong one fails before
/// anyone is told the destination is listening).
pub fn serve(
    listener: TcpListener,
    cfg: ServeConfig,
    criu: Criu,
    shutdown: &AtomicBool,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let shared = Arc::new(Shared {
        cfg,
        criu,
        sessions: Mutex::new(HashMap::new()),
        busy: Mutex::new(HashSet::new()),
        claims: Mutex::new(HashMap::new()),
        disk_claims: Mutex::new(HashMap::new()),
        stopping: AtomicBool::new(false),
        prefix_dirs: Mutex::new(Default::default()),
    });
    let active = Arc::new(AtomicUsize::new(0));
    let handshaking = Arc::new(AtomicUsize::new(0));
    let mut refused = Refusals::default();
    // On shutdown, stop taking new migrations but keep accepting the data connections of the
    // ones under way, and let them finish or fail (cleaning up) instead of dying half way.
    let mut deadline = None;
    loop {
        if shutdown.load(Ordering::Relaxed) {
            shared.stopping.store(true, Ordering::SeqCst);
            let d = *deadline.get_or_insert_with(|| std::time::Instant::now() + SHUTDOWN_GRACE);
            if active.load(Ordering::SeqCst) == 0 || std::time::Instant::now() > d {
                break;
            }
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                // Counted here, before the thread starts, so that a burst cannot overshoot.
                if handshaking.fetch_add(1, Ordering::SeqCst) >= MAX_HANDSHAKES {
                    handshaking.fetch_sub(1, Ordering::SeqCst);
                    refused.note(peer);
                    drop(stream);
                    continue;
                }
                let pending = Handshaking(handshaking.clone());
                let shared = shared.clone();
                let active = active.clone();
                active.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    if let Err(e) = connection(stream, &shared, pending) {
                        tracing::warn!(%peer, "{e}");
                    }
                    active.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    let left = active.load(Ordering::SeqCst);
    if left > 0 {
        tracing::warn!("stopping with {left} connection(s) still open");
    }
    remove_empty_prefix_dirs(&shared);
    Ok(())
}

/// Removes the `--cgroup-prefix` directories that no longer hold any container (rmdir only
/// succeeds on an empty cgroup; those still in use stay).
fn remove_empty_prefix_dirs(shared: &Shared) {
    let dirs = shared
        .prefix_dirs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for d in dirs.iter().rev() {
        match std::fs::remove_dir(d) {
            Ok(()) => tracing::debug!(dir = %d.display(), "removed empty cgroup prefix dir"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::debug!(dir = %d.display(), "cgroup prefix dir kept: {e}"),
        }
    }
}

/// How long `serve` waits for migrations under way when asked to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(120);

/// Most connections in their handshake at once; more are closed as they are accepted.
pub const MAX_HANDSHAKES: usize = 32;

/// Longest a connection may take from accept to the end of its handshake.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// One connection counted among those in their handshake, until dropped.
struct Handshaking(Arc<AtomicUsize>);

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Connections refused for [`MAX_HANDSHAKES`], logged at most every few seconds.
#[derive(Default)]
struct Refusals {
    since_log: u64,
    logged: Option<Instant>,
}

impl Refusals {
    fn note(&mut self, peer: std::net::SocketAddr) {
        self.since_log += 1;
        if self
            .logged
            .map_or(true, |t| t.elapsed() >= Duration::from_secs(5))
        {
            tracing::warn!(
                %peer,
                refused = self.since_log,
                "{MAX_HANDSHAKES} connections are in their handshake: refusing more"
            );
            self.since_log = 0;
            self.logged = Some(Instant::now());
        }
    }
}

/// Shuts `stream` down unless the returned sender is dropped within `deadline` (the
/// handshake's reads then fail at once, whatever they were waiting for).
fn deadline_guard(stream: &TcpStream, deadline: Duration) -> std::io::Result<SyncSender<()>> {
    let victim = stream.try_clone()?;
    let (tx, rx) = sync_channel::<()>(0);
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(deadline) {
            tracing::debug!("handshake deadline passed: closing the connection");
            let _ = victim.shutdown(std::net::Shutdown::Both);
        }
    });
    Ok(tx)
}

fn connection(
    stream: TcpStream,
    shared: &Shared,
    pending: Handshaking,
) -> Result<(), MigrateError> {
    stream.set_nonblocking(false).map_err(WireError::Io)?;
    tune(&stream, Duration::from_secs(10));
    let addr = stream.peer_addr().ok();
    let peer = addr.map(|a| a.to_string()).unwrap_or_else(|| "?".into());
    let peer_ip = addr.map(|a| a.ip().to_string()).unwrap_or_default();
    let guard = deadline_guard(&stream, HANDSHAKE_DEADLINE).map_err(WireError::Io)?;
    let (mut stream, hello, session) = link::server(
        stream,
        &peer,
        shared.cfg.tls.as_ref(),
        &shared.cfg.token,
        || random_hex(16),
    )?;
    drop((guard, pending));
    stream.set_io_timeout(shared.cfg.io_timeout);
    match hello.role {
        Role::Data => {
            let tx = shared
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&session);
            match tx {
                Some(tx) => tx
                    .send(stream)
                    .map_err(|_| MigrateError::Remote("session ended".into())),
                None => Err(MigrateError::Remote(format!(
                    "data connection for unknown session {session}"
                ))),
            }
        }
        Role::Control if shared.stopping.load(Ordering::SeqCst) => {
            let _ = Msg::Error(ErrorMsg {
                kind: "environment".into(),
                message: "the destination is shutting down".into(),
            })
            .write_to(&mut stream);
            Err(MigrateError::Remote(
                "refused a migration while shutting down".into(),
            ))
        }
        Role::Control => {
            let (tx, rx) = sync_channel(1);
            shared
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(session.clone(), tx);
            let mut r = Receiver::new(shared, session.clone(), rx, Ctl { stream, sent: 0 });
            r.peer_ip = peer_ip;
            let result = r.run();
            shared
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&session);
            if let Err(e) = &result {
                let kind = kind_name(e.kind());
                let _ = r.ctl.send(&Msg::Error(ErrorMsg {
                    kind: kind.into(),
                    message: e.to_string(),
                }));
            }
            r.cleanup(result.is_ok());
            result
        }
    }
}

/// Checks a migration's `claim` to room on this host against the other migrations' `claims`
/// and records it for container `id`. Under one lock: two migrations preparing at once must
/// not both be given the same room.
fn claim_room<C: Clone>(
    claims: &Mutex<HashMap<String, C>>,
    id: &str,
    claim: C,
    check: impl FnOnce(&[C]) -> Result<(), String>,
) -> Result<(), MigrateError> {
    let mut claims = claims.lock().unwrap_or_else(|e| e.into_inner());
    let others: Vec<C> = claims.values().cloned().collect();
    check(&others).map_err(MigrateError::Incompatible)?;
    claims.insert(id.to_string(), claim);
    Ok(())
}

/// The claims of migrations other than `id`'s.
fn others_of<C: Clone>(claims: &Mutex<HashMap<String, C>>, id: &str) -> Vec<C> {
    let claims = claims.lock().unwrap_or_else(|e| e.into_inner());
    claims
        .iter()
        .filter(|(k, _)| k.as_str() != id)
        .map(|(_, c)| c.clone())
        .collect()
}

/// Stops a post-copy container whose memory can no longer arrive. Armed with the
/// container's freezer cgroup once it runs; tripped by the relay when the source's pages
/// stop while the lazy-pages daemon still waits for some. Whichever comes second freezes
/// the container, before the daemon exits: with the daemon goes the registration of the
/// missing memory, which the container would read as zero-filled pages from then on.
#[derive(Clone, Default)]
struct Tripwire(Arc<Mutex<(Option<PathBuf>, bool)>>);

impl Tripwire {
    fn arm(&self, freezer: PathBuf) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if g.1 {
            Self::freeze(&freezer);
        }
        g.0 = Some(freezer);
    }

    fn trip(&self) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.1 = true;
        if let Some(f) = &g.0 {
            Self::freeze(f);
        }
    }

    fn tripped(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    fn freeze(dir: &Path) {
        tracing::warn!(
            "the source's pages stopped before all arrived: freezing {}",
            dir.display()
        );
        // Tasks waiting for a page in the kernel cannot freeze; the kill after the daemon
        // exits gets them.
        if let Err(e) = crate::runtime::cgroups::freeze(dir, Duration::from_secs(2)) {
            tracing::warn!("{e}");
        }
    }
}

/// CRIU's lazy-pages daemon on the destination, fed through a loopback relay. Started
/// without waiting: the restore waits for its socket ([`LazyPages::wait_listening`]) just
/// before its request goes out.
struct LazyPages {
    child: std::process::Child,
    relay: super::relay::DestinationRelay,
    socket: PathBuf,
}

impl LazyPages {
    fn start(
        criu: &Path,
        images: &Path,
        work: &Path,
        data: Link,
        tripwire: Tripwire,
    ) -> Result<LazyPages, MigrateError> {
        let broken = Box::new(move || tripwire.trip());
        let relay = super::relay::destination_relay(data, Duration::from_secs(120), broken)
            .map_err(|e| MigrateError::Rootfs(format!("relay: {e}")))?;
        let port = relay.port;
        let child = std::process::Command::new(criu)
            .arg("lazy-pages")
            .arg("--page-server")
            .args(["--address", "127.0.0.1", "--port", &port.to_string()])
            .arg("--images-dir")
            .arg(images)
            .arg("--work-dir")
            .arg(work)
            .args(["--log-file", "lazy-pages.log", "-v4"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                relay.cancel();
                return Err(MigrateError::Op(crate::ops::OpError::Environment(format!(
                    "criu lazy-pages: {e}"
                ))));
            }
        };
        Ok(LazyPages {
            child,
            relay,
            socket: work.join("lazy-pages.socket"),
        })
    }

    /// Waits until the daemon listens on its socket (the restore connects to it first thing).
    fn wait_listening(&mut self) -> Result<(), String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !self.socket.exists() {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!("criu lazy-pages exited early ({st})"));
            }
            if std::time::Instant::now() > deadline {
                return Err("criu lazy-pages did not start within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        tracing::debug!("criu lazy-pages daemon listening");
        Ok(())
    }

    /// The migration failed: the daemon goes, and so does the relay with the data
    /// connection, so that the source's lazy page server fails at once and the source
    /// resumes (a relay still waiting for the daemon kept it frozen for two minutes).
    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.relay.cancel();
    }

    /// Waits until the daemon has every page; Err says why not.
    fn wait(mut self) -> Result<(), String> {
        let done = match self.child.wait() {
            Ok(st) if st.success() => {
                tracing::info!("all lazy pages received");
                Ok(())
            }
            Ok(st) => Err(format!("criu lazy-pages ended with {st}")),
            Err(e) => Err(format!("criu lazy-pages: {e}")),
        };
        let _ = self.relay.join();
        done
    }
}

/// States of one incoming migration.
enum State {
    AwaitPrepare,
    AwaitCpuinfo,
    /// A rootfs round: manifest parts so far (and about how many bytes they took on the
    /// wire), whether it is the final round.
    Manifest {
        entries: Vec<Entry>,
        bytes: usize,
        final_sync: bool,
    },
    /// Files of a rootfs round.
    Files {
        entries: Vec<Entry>,
        final_sync: bool,
    },
    /// Page server running for pre-dump round `round` (0: for the final dump, or none for a
    /// lazy final dump); waiting for the round's end or the final sync.
    Dumping {
        round: u32,
    },
    /// Final round applied; images arrive until Restore.
    Images,
    Done,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::AwaitPrepare => "waiting for prepare",
            State::AwaitCpuinfo => "waiting for cpuinfo",
            State::Manifest { .. } => "receiving a rootfs manifest",
            State::Files { .. } => "receiving rootfs files",
            State::Dumping { .. } => "waiting for a round's end or the final sync",
            State::Images => "receiving images",
            State::Done => "done",
        }
    }
}

/// One migration being received.
pub struct Receiver<'a> {
    shared: &'a Shared,
    session: String,
    data_rx: ChanReceiver<Link>,
    ctl: Ctl,
    id: Option<String>,
    bundle_created: bool,
    page_server: Option<PageServerRun>,
    /// The final dump is lazy (post-copy, hybrid): its pages come through the lazy-pages
    /// daemon after the restore started.
    lazy_final: bool,
    /// Pre-dump rounds come first (pre-copy, hybrid).
    pre_copy: bool,
    /// The data connection: each page server gets a copy; a lazy final dump's relay takes it.
    data: Option<Link>,
    /// The container's network namespace here (see `crate::net::dest`), until committed.
    net: Option<crate::net::dest::DestNet>,
    tcp_established: bool,
    tcp_close: bool,
    /// The images carry file locks (the source's Prepare).
    file_locks: bool,
    /// Bytes of the deleted files the container keeps open (the source's Prepare).
    ghosts: u64,
    /// The source's IP address, as this connection came from it.
    peer_ip: String,
    /// Hashes of this side's rootfs copy, so that the final round (frozen) reads only what
    /// changed.
    hashes: HashCache,
}

/// Most cgroup directories a container has (one per v1 controller, and `unified`).
const MAX_CGROUP_PATHS: usize = 32;
/// Most pre-dump rounds accepted from a source.
const MAX_ROUNDS: u32 = 64;
/// Most bytes one rootfs manifest may take (by [`Entry::wire_size`]): a million entries of a
/// few hundred bytes, not a million with 64 KiB of extended attributes each.
const MAX_MANIFEST_BYTES: usize = 1 << 30;
/// Longest wait for a page server to finish writing once its round ended.
const PAGE_SERVER_EXIT: Duration = Duration::from_secs(60);
const MAX_IMAGE_FILE: u64 = 16 * 1024 * 1024 * 1024;

impl<'a> Receiver<'a> {
    fn new(
        shared: &'a Shared,
        session: String,
        data_rx: ChanReceiver<Link>,
        ctl: Ctl,
    ) -> Receiver<'a> {
        Receiver {
            shared,
            session,
            data_rx,
            ctl,
            id: None,
            bundle_created: false,
            page_server: None,
            lazy_final: false,
            pre_copy: false,
            data: None,
            net: None,
            tcp_established: false,
            tcp_close: false,
            file_locks: false,
            ghosts: 0,
            peer_ip: String::new(),
            hashes: HashCache::default(),
        }
    }

    fn work(&self) -> PathBuf {
        self.shared
            .cfg
            .work_dir
            .join(format!("session-{}", self.session))
    }

    /// Bounds the failed sessions' dirs kept in the work dir: a candidate is no session of
    /// this serve's that is still going, and has no images (a session has them from its
    /// start; a failed one's went), so another serve sharing the dir keeps its own.
    fn prune_kept_sessions(&self) {
        let live: HashSet<String> = self
            .shared
            .sessions
            .lock()
            .map(|s| s.keys().map(|k| format!("session-{k}")).collect())
            .unwrap_or_default();
        let dir = &self.shared.cfg.work_dir;
        crate::ops::kept::prune(dir, crate::ops::kept::KEEP, &|name| {
            name.starts_with("session-")
                && !live.contains(name)
                && !dir.join(name).join("images").exists()
        });
    }

    fn images(&self) -> PathBuf {
        self.work().join("images")
    }

    fn bundle(&self) -> PathBuf {
        self.shared
            .cfg
            .bundles
            .join(self.id.as_deref().unwrap_or("_"))
    }

    fn run(&mut self) -> Result<(), MigrateError> {
        let mut state = State::AwaitPrepare;
        loop {
            if let State::Done = state {
                return Ok(());
            }
            let msg = self.ctl.recv()?;
            state = self.step(state, msg)?;
        }
    }

    fn unexpected(state: &State, got: &Msg) -> MigrateError {
        WireError::Unexpected {
            got: got.kind(),
            state: state.name(),
        }
        .into()
    }

    /// One message in one state → the next state.
    fn step(&mut self, state: State, msg: Msg) -> Result<State, MigrateError> {
        match (state, msg) {
            (State::AwaitPrepare, Msg::Prepare(p)) => {
                self.prepare(*p)?;
                Ok(State::AwaitCpuinfo)
            }
            (State::AwaitCpuinfo, Msg::File(f)) if f.target == Target::Cpuinfo => {
                self.cpuinfo(f)?;
                self.ctl.send(&Msg::Ok)?;
                Ok(State::Manifest {
                    entries: vec![],
                    bytes: 0,
                    final_sync: false,
                })
            }
            (
                State::Manifest {
                    mut entries,
                    mut bytes,
                    final_sync,
                },
                Msg::Manifest(m),
            ) => {
                bytes += m.entries.iter().map(Entry::wire_size).sum::<usize>();
                entries.extend(m.entries);
                if entries.len() > super::rootfs::MAX_ENTRIES || bytes > MAX_MANIFEST_BYTES {
                    return Err(MigrateError::Rootfs("manifest too large".into()));
                }
                if !m.last {
                    return Ok(State::Manifest {
                        entries,
                        bytes,
                        final_sync,
                    });
                }
                let rootfs = self.bundle().join("rootfs");
                let read_before = self.hashes.reads;
                let need = needed(&rootfs, &entries, &mut self.hashes)?;
                if !final_sync {
                    self.check_rootfs_room(&entries, &need)?;
                }
                tracing::debug!(
                    entries = entries.len(),
                    need = need.len(),
                    files_read = self.hashes.reads - read_before,
                    final_sync,
                    "rootfs compared"
                );
                let parts = super::wire::batches(&need, usize::MAX, |p| p.len() + 3);
                let n = parts.len();
                for (i, paths) in parts.into_iter().enumerate() {
                    self.ctl.send(&Msg::Need(super::wire::Need {
                        paths: paths.to_vec(),
                        last: i + 1 == n,
                    }))?;
                }
                Ok(State::Files {
                    entries,
                    final_sync,
                })
            }
            (
                State::Files {
                    entries,
                    final_sync,
                },
                Msg::File(f),
            ) if f.target == Target::Rootfs => {
                self.rootfs_file(&entries, f)?;
                Ok(State::Files {
                    entries,
                    final_sync,
                })
            }
            (
                State::Files {
                    entries,
                    final_sync,
                },
                Msg::SyncDone(d),
            ) => {
                if d.final_sync != final_sync {
                    return Err(MigrateError::Remote("sync round mixed up".into()));
                }
                let rootfs = self.bundle().join("rootfs");
                if final_sync {
                    let gone = delete_extra(&rootfs, &entries)?;
                    tracing::info!(deleted = gone.len(), "final rootfs delta applied");
                }
                link_names(&rootfs, &entries, final_sync)?;
                settle_dirs(&rootfs, &entries)?;
                self.ctl.send(&Msg::Ok)?;
                if final_sync {
                    Ok(State::Images)
                } else {
                    self.data = Some(self.take_data()?);
                    let round = if self.pre_copy {
                        self.start_page_server("pre-1", None)?;
                        1
                    } else {
                        if !self.lazy_final {
                            self.start_page_server(".", None)?;
                        }
                        0
                    };
                    self.ctl.send(&self.ready())?;
                    Ok(State::Dumping { round })
                }
            }
            (State::Dumping { round }, Msg::RoundDone(r))
                if self.pre_copy && round > 0 && r.round == round =>
            {
                self.end_page_server(round)?;
                let prev = format!("pre-{round}");
                if self.lazy_final {
                    self.send_pagemaps(&prev)?;
                }
                let next = if r.next_final {
                    if self.lazy_final {
                        // No page server for a lazy final dump: only the link.
                        super::source::link_parent(&self.images(), &prev)?;
                    } else {
                        self.start_page_server(".", Some(prev))?;
                    }
                    0
                } else if round >= MAX_ROUNDS {
                    return Err(MigrateError::Remote(format!(
                        "more than {MAX_ROUNDS} pre-dump rounds"
                    )));
                } else {
                    self.start_page_server(
                        &format!("pre-{}", round + 1),
                        Some(format!("../{prev}")),
                    )?;
                    round + 1
                };
                self.ctl.send(&self.ready())?;
                Ok(State::Dumping { round: next })
            }
            (State::Dumping { round: 0 }, Msg::Manifest(m)) => self.step(
                State::Manifest {
                    entries: vec![],
                    bytes: 0,
                    final_sync: true,
                },
                Msg::Manifest(m),
            ),
            (State::Images, Msg::File(f)) if f.target == Target::Image => {
                self.image_file(f)?;
                Ok(State::Images)
            }
            (State::Images, Msg::Restore(r)) => {
                self.restore(r.meta)?;
                Ok(State::Done)
            }
            (s, m) => Err(Self::unexpected(&s, &m)),
        }
    }

    fn prepare(&mut self, p: Prepare) -> Result<(), MigrateError> {
        validate_id(&p.container).map_err(crate::ops::OpError::from)?;
        if p.config.len() as u64 > super::wire::MAX_CONFIG {
            return Err(MigrateError::Remote("config.json too large".into()));
        }
        {
            let mut busy = self.shared.busy.lock().unwrap_or_else(|e| e.into_inner());
            if !busy.insert(p.container.clone()) {
                return Err(crate::ops::OpError::Conflict(format!(
                    "container {:?} is already being received",
                    p.container
                ))
                .into());
            }
        }
        self.id = Some(p.container.clone());
        let root = RuncRoot::open_or_create(&self.shared.cfg.runtime_root)
            .map_err(crate::ops::OpError::from)?;
        if root.exists(&p.container) {
            return Err(crate::ops::OpError::Conflict(format!(
                "container {:?} already exists on the destination",
                p.container
            ))
            .into());
        }
        let mine = self.shared.criu.require_version()?;
        let theirs = CriuVersion::parse(&p.criu_version).ok_or_else(|| {
            MigrateError::Incompatible(format!("source CRIU version {:?}", p.criu_version))
        })?;
        if mine < theirs {
            return Err(MigrateError::Incompatible(format!(
                "destination CRIU {mine} is older than the source's {theirs}"
            )));
        }
        let runc = Runc::new(&self.shared.cfg.runtime_root)
            .version()
            .unwrap_or_else(|e| e.to_string());
        crate::runtime::runc::check_adoptable(&runc, &p.runc_version)
            .map_err(MigrateError::Incompatible)?;
        if let Some(theirs) = &p.cgroups {
            crate::runtime::cgroups::check_layout(theirs, crate::runtime::cgroups::host_layout())
                .map_err(MigrateError::Incompatible)?;
        }
        if let Some(c) = &p.cpuset {
            let dir = self.relocated(&c.dir);
            crate::runtime::cgroups::check_cpuset(&dir, c.cpus.as_deref(), c.mems.as_deref())
                .map_err(MigrateError::Incompatible)?;
        }
        if let Some(l) = &p.limits {
            self.check_limits(l)?;
        }
        if let Some(m) = &p.memory {
            use crate::runtime::memroom::{check, Claim};
            let dir = self.relocated(&m.dir);
            let claim = Claim {
                dir: dir.clone(),
                bytes: m.bytes,
            };
            claim_room(&self.shared.claims, &p.container, claim, |others| {
                check(&dir, m.bytes, others)
            })?;
        }
        let features = self.shared.criu.features()?;
        (self.pre_copy, self.lazy_final) = match p.mode.as_str() {
            "stop-copy" => (false, false),
            "pre-copy" => (true, false),
            "post-copy" => (false, true),
            "hybrid" => (true, true),
            other => {
                return Err(MigrateError::Remote(format!("unknown mode {other:?}")));
            }
        };
        // Every mode but post-copy writes the pages into the work dir (pre-copy rounds, the
        // final dump), and every mode the ghost files: refused now what would run out of
        // room after the freeze.
        let dump = crate::runtime::memroom::DumpBytes {
            memory: match (&p.memory, self.pre_copy || !self.lazy_final) {
                (Some(m), true) => m.bytes,
                _ => 0,
            },
            ghosts: p.ghosts,
        };
        self.ghosts = p.ghosts;
        if dump.total() > 0 {
            use crate::runtime::memroom::{check_disk, DiskClaim};
            let claim = DiskClaim {
                dir: self.work(),
                bytes: dump.total(),
            };
            claim_room(&self.shared.disk_claims, &p.container, claim, |others| {
                check_disk(&self.shared.cfg.work_dir, &dump, others)
            })?;
            // A tmpfs work dir holds the pages in memory too, until the restore has read them.
            if crate::runtime::memroom::in_memory(&self.shared.cfg.work_dir) {
                let mem = others_of(&self.shared.claims, &p.container);
                let disk = others_of(&self.shared.disk_claims, &p.container);
                crate::runtime::memroom::check_pages_in_memory(
                    &self.shared.cfg.work_dir,
                    &dump,
                    &mem,
                    &disk,
                )
                .map_err(MigrateError::Incompatible)?;
            }
        }
        if self.lazy_final && !features.lazy_pages {
            return Err(MigrateError::Incompatible(format!(
                "{} needs userfaultfd (lazy_pages), which the destination lacks",
                p.mode
            )));
        }
        // The bundle: config.json as the source has it, root at <bundle>/rootfs.
        let mut config: serde_json::Value = serde_json::from_str(&p.config)
            .map_err(|e| MigrateError::Remote(format!("config.json: {e}")))?;
        config["root"]["path"] = serde_json::Value::from("rootfs");
        // What the restore would refuse after the freeze is refused now, before it and
        // before anything is made here.
        self.check_restorable(&config, &p.locks)?;
        (self.tcp_established, self.tcp_close) = (p.tcp_established, p.tcp_close);
        self.file_locks = p.file_locks;
        if let Some(facts) = &p.net {
            self.prepare_net(&mut config, facts)?;
        }
        let bundle = self.bundle();
        if !bundle.exists() {
            std::fs::create_dir_all(bundle.join("rootfs"))
                .map_err(|e| MigrateError::Rootfs(e.to_string()))?;
            self.bundle_created = true;
        }
        std::fs::create_dir_all(bundle.join("rootfs"))
            .map_err(|e| MigrateError::Rootfs(e.to_string()))?;
        let text = serde_json::to_vec_pretty(&config).unwrap_or_default();
        std::fs::write(bundle.join("config.json"), text)
            .map_err(|e| MigrateError::Rootfs(e.to_string()))?;
        std::fs::create_dir_all(self.images()).map_err(|e| MigrateError::Rootfs(e.to_string()))?;
        self.ctl.send(&Msg::Prepared(Prepared {
            criu_version: mine.to_string(),
            mem_track: features.mem_track,
            lazy_pages: features.lazy_pages,
            runc_version: runc,
        }))?;
        Ok(())
    }

    /// The source's word on the container's cgroup limits: refused if the cgroups its
    /// restore will make here could not take them.
    fn check_limits(&self, l: &crate::migrate::wire::Limits) -> Result<(), MigrateError> {
        use crate::runtime::cgroups::{check_settable, validate_settings};
        if l.paths.len() > MAX_CGROUP_PATHS {
            return Err(MigrateError::Remote(format!(
                "{} cgroup paths (at most {MAX_CGROUP_PATHS})",
                l.paths.len()
            )));
        }
        validate_settings(&l.settings).map_err(MigrateError::Remote)?;
        let paths = l
            .paths
            .iter()
            .map(|(k, v)| (k.clone(), self.relocated(v).to_string_lossy().into_owned()))
            .collect();
        check_settable(&paths, &l.settings).map_err(MigrateError::Incompatible)
    }

    /// The received config.json (root already at `rootfs`) as the restore will read it:
    /// refused if its container has a terminal or a bind mount whose source this host lacks.
    fn check_restorable(
        &self,
        config: &serde_json::Value,
        locks: &[super::wire::LockedFile],
    ) -> Result<(), MigrateError> {
        let invalid = |e: String| MigrateError::Remote(format!("config.json: {e}"));
        let spec: oci_spec::runtime::Spec =
            serde_json::from_value(config.clone()).map_err(|e| invalid(e.to_string()))?;
        let bundle = self.bundle();
        let cfg = crate::oci::bundle::BundleConfig::from_spec(
            &bundle,
            &bundle.join("config.json"),
            &spec,
        )
        .map_err(|e| invalid(e.to_string()))?;
        if cfg.terminal {
            return Err(MigrateError::Unsupported(
                crate::migrate::source::TERMINAL_REFUSED.into(),
            ));
        }
        if let Some((dest, source)) = crate::ops::restore::missing_bind_source(&cfg) {
            return Err(MigrateError::Unsupported(format!(
                "bind mount source {} (for {dest}) does not exist on the destination",
                source.display()
            )));
        }
        lock_in_the_way(&cfg, locks)
    }

    /// The container's network namespace here, before the source freezes anything: created,
    /// locked, configured, probed for a clash; config.json then names it.
    fn prepare_net(
        &mut self,
        config: &mut serde_json::Value,
        facts: &crate::net::facts::NetFacts,
    ) -> Result<(), MigrateError> {
        use crate::net::dest::{Bridges, NetSetup};
        let setup = match (&self.shared.cfg.net, facts.ifaces.is_empty()) {
            (Some(setup), _) => setup.clone(),
            // Only addresses on `lo`: ferry adds those itself, no interface to set up.
            (None, true) => NetSetup::Bridge(Bridges::default()),
            (None, false) => {
                return Err(MigrateError::Unsupported(
                    "the container has a network namespace given by path; this destination \
                     has no network setup (ferry serve --bridge [IFNAME=]BRIDGE or --netns-hook \
                     PROG)"
                        .into(),
                ))
            }
        };
        let source = self.peer_ip.clone();
        let id = self.id.clone().unwrap_or_default();
        let net =
            crate::net::dest::DestNet::prepare(&setup, &id, facts, &source).map_err(
                |e| match e {
                    crate::net::NetError::Clash { .. } => {
                        MigrateError::Op(crate::ops::OpError::Conflict(e.to_string()))
                    }
                    crate::net::NetError::Unsupported(why) => MigrateError::Unsupported(why),
                    e => MigrateError::Net(e.to_string()),
                },
            )?;
        let path = net.path.to_string_lossy().into_owned();
        self.net = Some(net);
        let namespaces = config["linux"]["namespaces"]
            .as_array_mut()
            .ok_or_else(|| MigrateError::Remote("config.json without namespaces".into()))?;
        for n in namespaces.iter_mut() {
            if n["type"] == "network" {
                n["path"] = serde_json::Value::from(path.clone());
            }
        }
        Ok(())
    }

    /// Receives one file's chunks into `dest` (created), checking the announced size.
    fn receive_into(&mut self, f: &FileStart, dest: &Path, cap: u64) -> Result<(), MigrateError> {
        super::source::receive_file(&mut self.ctl, f, dest, cap, f.size.max(4096), None)
    }

    fn cpuinfo(&mut self, f: FileStart) -> Result<(), MigrateError> {
        let dir = self.work().join("cpuinfo");
        std::fs::create_dir_all(&dir).map_err(|e| MigrateError::Rootfs(e.to_string()))?;
        self.receive_into(&f, &dir.join("cpuinfo.img"), 1024 * 1024)?;
        let mut o = CriuOpts::new();
        o.set_log_file("cpuinfo.log".into());
        self.shared
            .criu
            .cpuinfo_check(Request {
                opts: o,
                images_dir: open_dir(&dir)?,
                work_dir: Some(open_dir(&dir)?),
                log_path: Some(dir.join("cpuinfo.log")),
            })
            .map_err(|e| MigrateError::Incompatible(format!("CPU check: {e}")))
    }

    fn rootfs_file(&mut self, entries: &[Entry], f: FileStart) -> Result<(), MigrateError> {
        let e = entries
            .iter()
            .find(|e| e.path == f.path && e.kind != "d")
            .cloned()
            .ok_or_else(|| {
                MigrateError::Remote(format!("file {:?} is not in the manifest", f.path))
            })?;
        let rootfs = self.bundle().join("rootfs");
        let (_, tmp) = staging_path(&rootfs, &e)?;
        if e.kind == "l" {
            let mut target = Vec::new();
            loop {
                match self.ctl.recv()? {
                    Msg::Chunk(b) if target.len() + b.len() <= 4096 => target.extend(b),
                    Msg::FileEnd => break,
                    other => {
                        return Err(WireError::Unexpected {
                            got: other.kind(),
                            state: "receiving a symlink",
                        }
                        .into())
                    }
                }
            }
            install(&rootfs, &e, &tmp, Some(&String::from_utf8_lossy(&target)))
        } else {
            // Hashed as it arrives: the cache learns what was written, not what the manifest
            // said (the source's file may have changed in between).
            let mut digest = BlockHasher::default();
            super::source::receive_file(
                &mut self.ctl,
                &f,
                &tmp,
                e.size,
                f.size.max(4096),
                Some(&mut digest),
            )?;
            install(&rootfs, &e, &tmp, None)?;
            let target = super::rootfs::safe_target(&rootfs, &e.path)?;
            self.hashes
                .learn(&target, digest.finish())
                .map_err(|x| MigrateError::Rootfs(format!("{}: {x}", target.display())))
        }
    }

    fn image_file(&mut self, f: FileStart) -> Result<(), MigrateError> {
        let rel = check_rel(&f.path)?;
        if rel.components().count() != 1 {
            return Err(MigrateError::Remote(format!(
                "image name {:?} is not a plain name",
                f.path
            )));
        }
        let dest = self.images().join(rel);
        if std::env::var("FERRY_TEST_FAULT").as_deref() == Ok("fail-image") {
            tracing::warn!("FERRY_TEST_FAULT: failing to write an image");
            return Err(MigrateError::Write(format!(
                "{}: injected fault (FERRY_TEST_FAULT=fail-image)",
                dest.display()
            )));
        }
        self.receive_into(&f, &dest, MAX_IMAGE_FILE)
    }

    /// The data connection of this session (the source opens it after the first sync).
    fn take_data(&mut self) -> Result<Link, MigrateError> {
        self.data_rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| MigrateError::Remote("no data connection within 30 s".into()))
    }

    /// The rootfs files the destination needs must fit into the bundles dir's filesystem,
    /// besides the page images still to come when the work dir is on it too: refused now, not
    /// out of room during the sync or, worse, the dump after it.
    fn check_rootfs_room(&self, entries: &[Entry], need: &[String]) -> Result<(), MigrateError> {
        let sizes: HashMap<&str, u64> = entries
            .iter()
            .filter(|e| e.kind == "f")
            // What the file takes on disk: a sparse file's holes stay holes here.
            .map(|e| (e.path.as_str(), e.blocks.min(e.size)))
            .collect();
        let bytes = need
            .iter()
            .filter_map(|p| sizes.get(p.as_str()))
            .fold(0u64, |sum, b| sum.saturating_add(*b));
        let claims: Vec<_> = {
            let c = self
                .shared
                .disk_claims
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            c.values().cloned().collect()
        };
        crate::runtime::memroom::check_rootfs(
            &self.shared.cfg.bundles,
            crate::runtime::memroom::RootfsBytes {
                copy: bytes,
                ghosts: self.ghosts,
            },
            &self.shared.cfg.work_dir,
            &claims,
        )
        .map_err(MigrateError::Incompatible)
    }

    /// PageServerReady, with the room the work dir has left for this migration's pages.
    fn ready(&self) -> Msg {
        let id = self.id.as_deref().unwrap_or_default();
        let others = others_of(&self.shared.disk_claims, id);
        Msg::PageServerReady(super::wire::Ready {
            room: crate::runtime::memroom::disk_room(&self.shared.cfg.work_dir, &others),
        })
    }

    /// Starts a page server writing into `dir` (relative to the images dir) with `parent`
    /// (relative to `dir`) as the previous round, fed by a copy of the data connection.
    fn start_page_server(&mut self, dir: &str, parent: Option<String>) -> Result<(), MigrateError> {
        let data = self
            .data
            .as_ref()
            .ok_or_else(|| MigrateError::Remote("no data connection".into()))?
            .try_clone()
            .map_err(WireError::Io)?;
        let images = self.images().join(dir);
        std::fs::create_dir_all(&images).map_err(|e| MigrateError::Rootfs(e.to_string()))?;
        // Either receiver finds the previous round through the `parent` link.
        if let Some(p) = &parent {
            super::source::link_parent(&images, p)?;
        }
        if self.shared.cfg.page_receiver == PageReceiver::Ferry {
            let sink = PageSink::spawn(OwnedFd::from(data), images).map_err(WireError::Io)?;
            self.page_server = Some(PageServerRun::Ferry(sink));
            return Ok(());
        }
        let mut fds = ChildFds::default();
        let mut ps = CriuPageServerInfo::new();
        ps.set_fd(fds.inherit(OwnedFd::from(data)));
        let mut o = CriuOpts::new();
        let log = if dir == "." {
            "page-server.log".to_string()
        } else {
            format!("page-server-{dir}.log")
        };
        o.set_log_file(log.clone());
        if let Some(p) = parent {
            o.set_parent_img(p);
        }
        o.ps = protobuf::MessageField::some(ps);
        let req = Request {
            opts: o,
            images_dir: open_dir(&images)?,
            work_dir: Some(open_dir(&self.work())?),
            log_path: Some(self.work().join(&log)),
        };
        let (ps, s) = self.shared.criu.page_server(req, fds, true)?;
        self.page_server = Some(PageServerRun::Criu(ps, s));
        Ok(())
    }

    /// Hybrid: the source's lazy final dump decides which pages are already here by reading
    /// its parent images' pagemaps, which only the destination has. Sends them back (page
    /// maps, not pages: a few KiB), and the names of the pages images, which the source
    /// creates empty.
    fn send_pagemaps(&mut self, round_dir: &str) -> Result<(), MigrateError> {
        let dir = self.images().join(round_dir);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|e| MigrateError::Rootfs(format!("{}: {e}", dir.display())))?
            .flatten()
            .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".img") && (n.contains("pagemap-") || n.contains("pages-")))
            .collect();
        names.sort();
        for name in names {
            if name.contains("pagemap-") {
                super::source::send_file(
                    &mut self.ctl,
                    Target::Image,
                    &name,
                    &dir.join(&name),
                    0o600,
                )?;
            } else {
                self.ctl.send(&Msg::File(FileStart {
                    target: Target::Image,
                    path: name,
                    size: 0,
                    mode: 0o600,
                }))?;
                self.ctl.send(&Msg::FileEnd)?;
            }
        }
        Ok(())
    }

    /// Waits for the running page server to write out what it received and exit.
    fn end_page_server(&mut self, round: u32) -> Result<(), MigrateError> {
        let (ps, s) = match self.page_server.take() {
            None => return Ok(()),
            Some(PageServerRun::Ferry(sink)) => {
                return match sink.wait(PAGE_SERVER_EXIT) {
                    Ok(_) => Ok(()),
                    Err(e) => Err(MigrateError::Remote(format!("round {round}: {e}"))),
                }
            }
            Some(PageServerRun::Criu(ps, s)) => (ps, s),
        };
        let done = ps.wait_exit(PAGE_SERVER_EXIT);
        s.finish(Duration::from_secs(5));
        if done {
            Ok(())
        } else {
            Err(MigrateError::Remote(format!(
                "the page server of round {round} did not finish within {} s",
                PAGE_SERVER_EXIT.as_secs()
            )))
        }
    }

    fn cgroup_paths(
        &self,
        meta: &CheckpointMeta,
    ) -> Result<BTreeMap<String, String>, MigrateError> {
        let old: BTreeMap<String, String> =
            serde_json::from_value(meta.runc_state["cgroup_paths"].clone()).map_err(|e| {
                MigrateError::Remote(format!("runc state without cgroup paths: {e}"))
            })?;
        if self.shared.cfg.cgroup_prefix.is_none() {
            return Ok(old);
        }
        let mut dirs = self
            .shared
            .prefix_dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Ok(old
            .into_iter()
            .map(|(k, v)| {
                let moved = self.relocated(&v);
                // Only what this serve creates is its to remove.
                if let Some(made) = moved.parent().filter(|_| moved != Path::new(&v)) {
                    if !made.exists() {
                        dirs.insert(made.to_path_buf());
                    }
                }
                (k, moved.to_string_lossy().into_owned())
            })
            .collect())
    }

    /// Where a source cgroup directory goes here: under `--cgroup-prefix` (in its parent),
    /// or the same path without one.
    fn relocated(&self, dir: &str) -> PathBuf {
        let p = Path::new(dir);
        match (&self.shared.cfg.cgroup_prefix, p.parent(), p.file_name()) {
            (Some(prefix), Some(parent), Some(name)) => parent.join(prefix).join(name),
            _ => p.to_path_buf(),
        }
    }

    fn restore(&mut self, meta: serde_json::Value) -> Result<(), MigrateError> {
        tracing::debug!("images received, restore requested");
        // The page server has everything once the source disconnected from it.
        self.end_page_server(0)?;
        let mut meta: CheckpointMeta = serde_json::from_value(meta)
            .map_err(|e| MigrateError::Remote(format!("checkpoint metadata: {e}")))?;
        let id = self.id.clone().unwrap_or_default();
        if meta.container != id {
            return Err(MigrateError::Remote(
                "metadata names another container".into(),
            ));
        }
        meta.bundle = self.bundle();
        meta.rootfs = self.bundle().join("rootfs");
        meta.save(&self.images())
            .map_err(crate::ops::OpError::from)?;
        let req = RestoreRequest {
            id: id.clone(),
            runtime_root: self.shared.cfg.runtime_root.clone(),
            images: self.images(),
            bundle: Some(self.bundle()),
            rename: false,
            work_dir: Some(self.work().join("restore")),
            console_socket: None,
            settings: crate::oci::options::RestoreSettings {
                tcp_established: self.tcp_established,
                tcp_close: self.tcp_close,
                file_locks: self.file_locks,
                network_lock: self.net.as_ref().map(|n| n.method.criu()),
                ..Default::default()
            },
            cgroup_paths: Some(self.cgroup_paths(&meta)?),
            null_stdio: true,
            unpause: false,
        };
        let restore_work = self.work().join("restore");
        std::fs::create_dir_all(&restore_work).map_err(|e| MigrateError::Rootfs(e.to_string()))?;
        let mut req = req;
        let mut lazy = None;
        let tripwire = Tripwire::default();
        let freezer = req
            .cgroup_paths
            .as_ref()
            .and_then(|p| crate::runtime::cgroups::dir_of(p, "freezer.state"))
            .map(PathBuf::from);
        if self.lazy_final {
            let data = self
                .data
                .take()
                .ok_or_else(|| MigrateError::Remote("no data connection".into()))?;
            lazy = Some(LazyPages::start(
                self.shared.criu.path(),
                &self.images(),
                &restore_work,
                data,
                tripwire.clone(),
            )?);
            req.settings.lazy_pages = true;
        }
        let ctl = &mut self.ctl;
        let net = self.net.as_ref();
        let mut gate = |pid: i32| -> Result<(), String> {
            ctl.send(&Msg::Restored(Pid { pid }))
                .map_err(|e| e.to_string())?;
            match ctl.recv() {
                Ok(Msg::Commit) => Ok(()),
                Ok(other) => Err(format!("expected commit, got {:?}", other.kind())),
                Err(e) => Err(format!("source gone before commit: {e}")),
            }
        };
        // Committed and handed to runc: CRIU unlocks and turns TCP repair off next, then
        // resumes the tasks; ferry's lock goes first.
        let mut unlock = || {
            if let Some(n) = net {
                if let Err(e) = n.unlock() {
                    tracing::warn!("unlocking the container's network: {e}");
                }
            }
        };
        // The daemon starts while criu does; the request waits for its socket.
        let mut ready = || match lazy.as_mut() {
            Some(l) => l.wait_listening(),
            None => Ok(()),
        };
        let restored = restore_gated(&self.shared.criu, &req, &mut gate, &mut unlock, &mut ready);
        let report = match restored {
            Ok(r) => {
                if let (Some(f), true) = (&freezer, lazy.is_some()) {
                    tripwire.arm(f.clone());
                }
                r
            }
            Err(e) => {
                if let Some(l) = lazy {
                    l.stop();
                }
                return Err(e.into());
            }
        };
        // Committed: the container runs here and belongs to this host's runc whatever happens
        // to the connection now. A source that misses this answer reports the outcome as
        // unknown and leaves its copy paused for the operator.
        if std::env::var("FERRY_TEST_FAULT").as_deref() == Ok("drop-committed") {
            tracing::warn!("FERRY_TEST_FAULT: dropping the connection instead of confirming");
            let _ = self.ctl.stream.shutdown(std::net::Shutdown::Both);
        } else if let Err(e) = self.ctl.send(&Msg::Committed(Pid { pid: report.pid })) {
            tracing::warn!(id = %id, "the container runs here, but the source was not told: {e}");
        }
        // The namespace is the container's now; tell the neighbours where it went (three
        // rounds over 200 ms: beside the hand-over to containerd, not before it).
        let announcing = self.net.take().map(|n| {
            std::thread::spawn(move || {
                if let Err(e) = n.announce() {
                    tracing::warn!("announcing the container's new location: {e}");
                }
            })
        });
        if let Some(h) = &self.shared.cfg.on_committed {
            h.call(&id, &self.bundle(), report.pid);
        }
        if let Some(a) = announcing {
            let _ = a.join();
        }
        tracing::info!(id = %id, pid = report.pid, "migration received; container running");
        if let Some(l) = lazy {
            // The container runs; its remaining memory arrives as it touches it. Stay until
            // every page is here (the daemon exits then), so the scratch space can go.
            if let Err(why) = l.wait() {
                return Err(self.discard_lost(&id, freezer.as_deref(), &tripwire, &why));
            }
        }
        Ok(())
    }

    /// A post-copy container whose memory cannot arrive any more (the lazy-pages daemon
    /// ended without every page: `why`) is killed (frozen first where the relay saw the
    /// pages stop; see [`Tripwire`]) and removed from runc; the rest goes with the failed
    /// migration's cleanup. Running on, it would read zeros where its pages are missing.
    fn discard_lost(
        &mut self,
        id: &str,
        freezer: Option<&Path>,
        tripwire: &Tripwire,
        why: &str,
    ) -> MigrateError {
        let (how, done) = if tripwire.tripped() {
            ("the source's pages stopped before all arrived", "frozen")
        } else {
            (why, "killed")
        };
        tracing::error!(
            id = %id,
            "{how}; its memory cannot arrive: {done} and removed"
        );
        if let Some(f) = freezer {
            crate::runtime::cgroups::kill_frozen(f);
        }
        if let Err(e) = crate::runtime::runc::Runc::new(&self.shared.cfg.runtime_root).delete(id) {
            tracing::warn!("removing the lost container: {e}");
        }
        MigrateError::Remote(format!(
            "{how}: the container's memory cannot arrive; it was killed on the destination"
        ))
    }

    /// Undoes what a failed migration left; on success removes only the scratch space.
    fn cleanup(&mut self, ok: bool) {
        if !ok {
            // The page server shares this socket: shutting it down ends any round under way.
            if let Some(d) = self.data.take() {
                let _ = d.shutdown(std::net::Shutdown::Both);
            }
        }
        match self.page_server.take() {
            Some(PageServerRun::Ferry(sink)) => sink.abort(),
            Some(PageServerRun::Criu(ps, s)) => {
                if !ps.wait_exit(Duration::from_secs(5)) && ps.pid > 0 {
                    tracing::warn!(pid = ps.pid, "page server still running; killing it");
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(ps.pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                s.finish(Duration::from_secs(5));
            }
            None => {}
        }
        let work = self.work();
        let _ = crate::runtime::mounts::unmount_under(&work);
        // On failure CRIU's logs stay for the operator; the images (memory!) never do.
        let doomed = if ok {
            vec![work.clone()]
        } else {
            vec![self.images(), work.join("cpuinfo")]
        };
        for d in doomed {
            if let Err(e) = remove_tree(&d) {
                tracing::warn!("cleanup: {e}");
            }
        }
        if !ok {
            tracing::warn!(
                "migration failed; CRIU's logs are kept in {}",
                work.display()
            );
            self.prune_kept_sessions();
        }
        if let Some(n) = self.net.take() {
            n.remove();
        }
        if !ok && self.bundle_created {
            if let Err(e) = remove_tree(&self.bundle()) {
                tracing::warn!("cleanup: {e}");
            }
        }
        if let Some(id) = &self.id {
            self.shared
                .claims
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
            self.shared
                .disk_claims
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
            self.shared
                .busy
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
        }
    }
}

/// A lock the container holds on a bind-mounted file that some process here holds too: the
/// restore would wait for it (CRIU takes locks again blocking), with the source frozen. On a
/// file the hosts share, that process is the source's container itself, which keeps its
/// lock until the commit: refused before the freeze instead. Locks on rootfs files are not
/// tested (the copy here is this host's own).
fn lock_in_the_way(
    cfg: &crate::oci::bundle::BundleConfig,
    locks: &[super::wire::LockedFile],
) -> Result<(), MigrateError> {
    if locks.len() > super::wire::MAX_LOCKS {
        return Err(MigrateError::Remote(format!(
            "{} file locks listed, more than {}",
            locks.len(),
            super::wire::MAX_LOCKS
        )));
    }
    for l in locks {
        let Some(here) = cfg.bind_source_of(&l.path) else {
            continue;
        };
        match crate::runtime::locks::taken_elsewhere(&here, &l.lock) {
            Ok(false) => {}
            Ok(true) => {
                return Err(MigrateError::Unsupported(format!(
                    "the container's {} lock on {} cannot be taken on the destination: a \
                     process there holds {} (a file both hosts share? the source keeps its \
                     lock until the container runs here)",
                    l.lock.kind,
                    l.path,
                    here.display()
                )))
            }
            Err(e) => tracing::debug!(path = %here.display(), "lock not tested: {e}"),
        }
    }
    Ok(())
}
