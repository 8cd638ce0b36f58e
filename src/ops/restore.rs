//! `ferry restore`: restore a checkpoint as a runc container.
//!
//! Order of events: validate everything (images, id, runc root, bundle, bind sources) before
//! touching anything; claim `<root>/<id>`; bind-mount the rootfs privately for CRIU; create
//! the cgroups; start criu, place it in the cgroups, send RESTORE; at `post-restore` (tasks
//! restored, not yet running) write runc's state so runc owns the container — if that fails
//! CRIU kills the restored tasks. Any failure undoes what was done (unmount first, then
//! remove only what ferry created, never through a mount) and keeps CRIU's log.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::{elapsed_ms, open_dir, require_root, OpError};
use crate::criu::client::Request;
use crate::criu::swrk::ChildFds;
use crate::criu::{Criu, Notification, Reply, Script};
use crate::images::read_dump_stats;
use crate::oci::bundle::{BundleConfig, MountKind};
use crate::oci::meta::CheckpointMeta;
use crate::oci::options::{cgroup_roots, restore_options, RestoreSettings, RESTORE_LOG};
use crate::oci::state::{process_start_time, RuncRoot};
use crate::oci::{validate_id, OciError};
use crate::pb::InheritFd;
use crate::runtime::cgroups::{renamed_paths, CgroupSet};
use crate::runtime::mounts::{remove_tree, unmount_under, BindMount};
use crate::runtime::runc::{adopted_state, rfc3339_now, write_state, Adoption};

/// Where ferry keeps per-restore work directories (CRIU's log, the rootfs mount point).
pub const FERRY_RUN_DIR: &str = "/run/ferry";

#[derive(Debug, Clone, Default)]
pub struct RestoreRequest {
    pub id: String,
    pub runtime_root: PathBuf,
    pub images: PathBuf,
    /// The bundle to restore into; the one recorded at checkpoint when absent.
    pub bundle: Option<PathBuf>,
    /// Allow restoring another container's checkpoint under `id`.
    pub rename: bool,
    pub work_dir: Option<PathBuf>,
    /// For containers with a terminal: where to send the pty master (runc's console socket).
    pub console_socket: Option<PathBuf>,
    pub settings: RestoreSettings,
    /// Cgroup paths to use instead of the checkpoint's (e.g. on a migration destination).
    pub cgroup_paths: Option<BTreeMap<String, String>>,
    /// Give the restored container /dev/null instead of ferry's own stdio.
    pub null_stdio: bool,
    /// Let a container checkpointed paused run anyway (containerd's start of a checkpoint
    /// has no paused outcome); otherwise it is restored paused.
    pub unpause: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub criu_version: String,
    pub container: String,
    pub pid: i32,
    pub bundle: PathBuf,
    pub elapsed_ms: u64,
    /// Checkpointed paused, it is restored paused (`runc resume` lets it go on).
    pub paused: bool,
}

/// Everything checked before anything is changed.
struct Validated {
    meta: CheckpointMeta,
    root: RuncRoot,
    cfg: BundleConfig,
    cgroup_paths: BTreeMap<String, String>,
}

fn validate(req: &RestoreRequest) -> Result<Validated, OpError> {
    validate_id(&req.id)?;
    if !req.images.is_dir() {
        if req.images.exists() {
            return Err(OpError::Invalid(format!(
                "images directory {} is not a directory",
                req.images.display()
            )));
        }
        return Err(OpError::NoImages(req.images.clone()));
    }
    let meta = CheckpointMeta::load(&req.images)?;
    // stats-dump is optional (a migration does not carry it), but a present one must be sound.
    if req
        .images
        .join(crate::images::stats::DUMP_STATS_FILE)
        .exists()
    {
        read_dump_stats(&req.images)?;
    }
    if meta.container != req.id && !req.rename {
        return Err(OpError::Invalid(format!(
            "images in {} are a checkpoint of container {:?}, not {:?} (pass --rename to restore them under this id)",
            req.images.display(),
            meta.container,
            req.id
        )));
    }
    let root = RuncRoot::open_or_create(&req.runtime_root)?;
    if root.exists(&req.id) {
        return Err(OciError::Exists {
            id: req.id.clone(),
            root: root.path().to_path_buf(),
        }
        .into());
    }
    let bundle = req.bundle.clone().unwrap_or_else(|| meta.bundle.clone());
    let cfg = BundleConfig::load(&bundle)?;
    cfg.check_restorable_root()?;
    if !cfg.rootfs.is_dir() {
        return Err(OpError::Invalid(format!(
            "rootfs {} does not exist",
            cfg.rootfs.display()
        )));
    }
    if let Some((dest, source)) = missing_bind_source(&cfg) {
        return Err(OpError::Invalid(format!(
            "bind mount source {} (for {dest}) does not exist on this host",
            source.display()
        )));
    }
    if meta.terminal && req.console_socket.is_none() {
        return Err(OpError::Invalid(
            "the container has a terminal: pass --console-socket to receive its pty master".into(),
        ));
    }
    let cgroup_paths = match &req.cgroup_paths {
        Some(p) => p.clone(),
        None => {
            let old: BTreeMap<String, String> =
                serde_json::from_value(meta.runc_state["cgroup_paths"].clone()).map_err(|e| {
                    OpError::Invalid(format!("ferry.json: runc state without cgroup paths: {e}"))
                })?;
            renamed_paths(&old, &meta.container, &req.id)
        }
    };
    Ok(Validated {
        meta,
        root,
        cfg,
        cgroup_paths,
    })
}

/// Creates missing mount points in the rootfs, as runc does before a restore: bind mounts get
/// a directory or a file like their source, other filesystems a directory; nothing below a
/// tmpfs (CRIU restores its content itself) and nothing for cgroup mounts (below /sys). A
/// fresh rootfs (a containerd snapshot restored under a new id) lacks e.g. `/run`.
fn prepare_mountpoints(cfg: &BundleConfig) -> Result<(), OpError> {
    let tmpfs = cfg.tmpfs_destinations();
    for m in &cfg.mounts {
        let source = match &m.kind {
            MountKind::Bind { source } => Some(source),
            MountKind::Cgroup => continue,
            MountKind::Tmpfs | MountKind::Other => None,
        };
        if tmpfs
            .iter()
            .any(|t| m.destination.starts_with(&format!("{t}/")))
        {
            continue;
        }
        let rel = m.destination.trim_start_matches('/');
        if rel.is_empty() {
            continue;
        }
        if rel.split('/').any(|c| c == "..") {
            return Err(OpError::Invalid(format!(
                "mount destination {} escapes the rootfs",
                m.destination
            )));
        }
        let target = cfg.rootfs.join(rel);
        if std::fs::symlink_metadata(&target).is_ok() {
            continue;
        }
        // Never create through a symlink of the container's rootfs.
        let mut at = cfg.rootfs.clone();
        for c in Path::new(rel)
            .parent()
            .into_iter()
            .flat_map(|p| p.components())
        {
            at.push(c);
            if std::fs::symlink_metadata(&at).is_ok_and(|md| md.file_type().is_symlink()) {
                return Err(OpError::Invalid(format!(
                    "mount destination {} is below a symlink in the rootfs",
                    m.destination
                )));
            }
        }
        let res = match source {
            Some(src) if !src.is_dir() => target
                .parent()
                .map(std::fs::create_dir_all)
                .unwrap_or(Ok(()))
                .and_then(|_| std::fs::File::create(&target).map(|_| ())),
            _ => std::fs::create_dir_all(&target),
        };
        res.map_err(|source| OciError::Write {
            path: target.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Undoes a failed restore's changes, in reverse order, when dropped unarmed.
struct Undo {
    state_dir: Option<PathBuf>,
    cgroups: Option<CgroupSet>,
    work: Option<PathBuf>,
}

impl Drop for Undo {
    fn drop(&mut self) {
        if let Some(mut cg) = self.cgroups.take() {
            cg.kill_all();
            cg.remove();
        }
        if let Some(w) = self.work.take() {
            // Whatever a killed criu left mounted in its work dir; the log stays.
            if let Err(e) = unmount_under(&w) {
                tracing::warn!("cleanup: {e}");
            }
            if w.parent() == Some(Path::new(FERRY_RUN_DIR)) {
                super::kept::prune_failed_ops(Path::new(FERRY_RUN_DIR), super::kept::KEEP);
            }
        }
        if let Some(d) = self.state_dir.take() {
            if let Err(e) = remove_tree(&d) {
                tracing::warn!("cleanup: {e}");
            }
        }
    }
}

fn dup_stdio() -> Result<[OwnedFd; 3], OpError> {
    let dup = |fd: std::os::fd::BorrowedFd<'_>| {
        fd.try_clone_to_owned()
            .map_err(|e| OpError::Environment(format!("cannot duplicate stdio: {e}")))
    };
    Ok([
        dup(std::io::stdin().as_fd())?,
        dup(std::io::stdout().as_fd())?,
        dup(std::io::stderr().as_fd())?,
    ])
}

fn null_stdio() -> Result<[OwnedFd; 3], OpError> {
    let open = || -> Result<OwnedFd, OpError> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map(OwnedFd::from)
            .map_err(|e| OpError::Environment(format!("/dev/null: {e}")))
    };
    Ok([open()?, open()?, open()?])
}

/// The first bind mount whose host source does not exist here: (its destination in the
/// container, the source).
pub fn missing_bind_source(cfg: &BundleConfig) -> Option<(&str, &Path)> {
    cfg.binds().find(|(_, source)| !source.exists())
}

/// Sends a pty master to a console socket (runc's protocol: SCM_RIGHTS with the name as data).
fn send_console(socket: &Path, master: OwnedFd) -> Result<(), String> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    let s = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    let fds = [master.as_raw_fd()];
    let name = b"/dev/ptmx";
    let iov = [std::io::IoSlice::new(name)];
    sendmsg::<()>(
        s.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| format!("sending pty master: {e}"))?;
    Ok(())
}

fn descriptors_of(pid: i32) -> Vec<String> {
    (0..3)
        .map(|fd| {
            std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "/dev/null".into())
        })
        .collect()
}

/// Freezes a restored container's cgroup, without waiting for it to settle: runc reports it
/// paused and `runc resume` lets it go on. CRIU (`criu_pid`) is in that cgroup too, for the
/// tasks to inherit it, and has work left: it goes back to ferry's own freezer cgroup first.
fn pause_restored(
    cgroup_paths: &BTreeMap<String, String>,
    criu_pid: Option<u32>,
) -> Result<(), String> {
    let dir = crate::runtime::cgroups::dir_of(cgroup_paths, "freezer.state")
        .map(Path::new)
        .ok_or("it has no freezer cgroup")?;
    let pid = criu_pid.ok_or("CRIU's pid is unknown")?;
    let read = |f: String| std::fs::read_to_string(&f).map_err(|e| format!("{f}: {e}"));
    let home = crate::runtime::cgroups::freezer_home(
        dir,
        &read(format!("/proc/{pid}/cgroup"))?,
        &read("/proc/self/cgroup".into())?,
    )
    .ok_or_else(|| format!("CRIU's freezer cgroup is not {}", dir.display()))?
    .join("cgroup.procs");
    std::fs::write(&home, pid.to_string()).map_err(|e| format!("{}: {e}", home.display()))?;
    crate::runtime::cgroups::start_freeze(dir)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

pub fn restore(criu: &Criu, req: &RestoreRequest) -> Result<RestoreReport, OpError> {
    restore_inner(criu, req, None, &mut |_| Ok(()), &mut || {}, &mut || Ok(()))
}

/// Restore with a gate: at `post-restore` (tasks restored, not yet running) `gate` is called
/// with the restored pid and may block; `Err` makes CRIU kill the restored tasks and the
/// restore fail (a migration destination waits here for the source's commit).
/// `on_network_unlock` runs at CRIU's `network-unlock` (after post-restore succeeded and
/// runc's state is written, before TCP repair is turned off and the tasks resume).
/// `ready` is called once criu runs (in the container's cgroups) and before the RESTORE
/// request goes out; an `Err` fails the restore. The destination of a post-copy migration
/// waits there for the lazy-pages daemon it started just before, so that the daemon's start
/// overlaps criu's.
pub fn restore_gated(
    criu: &Criu,
    req: &RestoreRequest,
    gate: &mut dyn FnMut(i32) -> Result<(), String>,
    on_network_unlock: &mut dyn FnMut(),
    ready: &mut dyn FnMut() -> Result<(), String>,
) -> Result<RestoreReport, OpError> {
    restore_inner(criu, req, None, gate, on_network_unlock, ready)
}

/// Restore whose pipes are re-inherited from `stdio` (stdin, stdout, stderr) instead of
/// ferry's own stdio or /dev/null (the shim passes new pipes to containerd's new fifos).
pub fn restore_with_stdio(
    criu: &Criu,
    req: &RestoreRequest,
    stdio: Option<[OwnedFd; 3]>,
    gate: &mut dyn FnMut(i32) -> Result<(), String>,
) -> Result<RestoreReport, OpError> {
    restore_inner(criu, req, stdio, gate, &mut || {}, &mut || Ok(()))
}

fn restore_inner(
    criu: &Criu,
    req: &RestoreRequest,
    stdio: Option<[OwnedFd; 3]>,
    gate: &mut dyn FnMut(i32) -> Result<(), String>,
    on_network_unlock: &mut dyn FnMut(),
    ready: &mut dyn FnMut() -> Result<(), String>,
) -> Result<RestoreReport, OpError> {
    let started = Instant::now();
    require_root()?;
    super::interrupt::check()?;
    let v = validate(req)?;
    // CRIU would restore a periodic timer fd with expirations pending disarmed (see
    // `images::files`). An images dir this ferry cannot write is restored as it is.
    match crate::images::files::rearm_pending_timerfds(&req.images) {
        Ok(0) => {}
        Ok(n) => tracing::debug!(n, "periodic timer fds re-armed in files.img"),
        Err(e) => tracing::warn!("timer fds not looked at: {e}"),
    }
    prepare_mountpoints(&v.cfg)?;

    let work = req.work_dir.clone().unwrap_or_else(|| {
        Path::new(FERRY_RUN_DIR).join(format!("restore-{}-{}", req.id, std::process::id()))
    });
    std::fs::create_dir_all(&work).map_err(|source| OciError::Write {
        path: work.clone(),
        source,
    })?;

    // Claim the id in runc's root (create_dir fails if another restore or runc won the race).
    let state_dir = v.root.container_dir(&req.id);
    std::fs::create_dir(&state_dir).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            OpError::from(OciError::Exists {
                id: req.id.clone(),
                root: v.root.path().to_path_buf(),
            })
        } else {
            OpError::from(OciError::Write {
                path: state_dir.clone(),
                source,
            })
        }
    })?;
    let mut undo = Undo {
        state_dir: Some(state_dir),
        cgroups: None,
        work: Some(work.clone()),
    };
    let criu_root = BindMount::new(&v.cfg.rootfs, &work.join("criu-root"))?;
    undo.cgroups = Some(CgroupSet::create(&v.cgroup_paths)?);
    // The limits and device rules before anything runs in them (as runc's restore does).
    crate::runtime::cgroups::apply_settings(
        &v.cgroup_paths,
        &v.meta.cgroup_settings,
        &v.meta.runc_state["config"]["cgroups"]["devices"],
    )?;

    let mut plan = restore_options(
        &v.cfg,
        &v.meta,
        criu_root.path(),
        &v.cgroup_paths,
        &req.settings,
    )?;
    let mut fds = ChildFds {
        stdio: Some(match stdio {
            Some(s) => s,
            None if req.null_stdio => null_stdio()?,
            None => dup_stdio()?,
        }),
        inherited: Vec::new(),
    };
    for (key, path) in &plan.inherit_ns {
        let f = std::fs::File::open(path).map_err(|source| OciError::Read {
            path: path.clone(),
            source,
        })?;
        let mut inh = InheritFd::new();
        inh.set_key(key.clone());
        inh.set_fd(fds.inherit(f.into()));
        plan.opts.inherit_fd.push(inh);
    }
    let request = Request {
        opts: plan.opts,
        images_dir: open_dir(&req.images)?,
        work_dir: Some(open_dir(&work)?),
        log_path: Some(work.join(RESTORE_LOG)),
    };

    let old_bundle = v.meta.bundle.clone();
    // CRIU's pid once it runs, for the pause at pre-resume.
    let criu_seen = std::cell::Cell::new(None);
    let paused = v.meta.paused && !req.unpause;
    let mut adopted = false;
    let mut interrupted = None;
    let mut notify = |n: Notification| -> Reply {
        match n.script {
            Script::PostRestore => {
                // The last point where stopping loses nothing: CRIU kills the restored tasks,
                // which have not run yet, and everything made for them is undone.
                if let Some(name) =
                    super::interrupt::stop_at(format_args!("restore at post-restore"))
                {
                    interrupted = Some(name.clone());
                    return Reply::Failure(format!("interrupted by {name}"));
                }
                let Some(pid) = n.pid else {
                    return Reply::Failure("post-restore without a pid".into());
                };
                // Before anything may run: the sysctls CRIU does not restore.
                if let Err(e) = crate::oci::sysctl::write_in(pid, &v.meta.net_sysctls) {
                    return Reply::Failure(e.to_string());
                }
                if let Err(e) = gate(pid) {
                    return Reply::Failure(e);
                }
                let start_time = match process_start_time(pid) {
                    Ok((t, _)) => t,
                    Err(e) => return Reply::Failure(format!("restored pid {pid}: {e}")),
                };
                let state = adopted_state(
                    &v.meta.runc_state,
                    &Adoption {
                        id: &req.id,
                        pid,
                        start_time,
                        bundle: &v.cfg.bundle,
                        old_bundle: &old_bundle,
                        rootfs: &v.cfg.rootfs,
                        cgroup_paths: &v.cgroup_paths,
                        descriptors: descriptors_of(pid),
                        created: rfc3339_now(),
                    },
                );
                match write_state(&v.root, &req.id, &state) {
                    Ok(()) => {
                        adopted = true;
                        Reply::Success
                    }
                    Err(e) => Reply::Failure(format!("handing the container to runc: {e}")),
                }
            }
            Script::NetworkUnlock => {
                on_network_unlock();
                Reply::Success
            }
            // Where CRIU itself writes a restored freezer's state: the tasks are restored
            // and about to be let go. Frozen now, they stop before running an instruction.
            Script::PreResume if paused => {
                if let Err(e) = pause_restored(&v.cgroup_paths, criu_seen.get()) {
                    // CRIU resumes the tasks whatever the reply: say so rather than fail.
                    tracing::warn!("the container was paused at checkpoint but runs now: {e}");
                }
                Reply::Success
            }
            Script::OrphanPtsMaster => match (n.fd, &req.console_socket) {
                (Some(fd), Some(sock)) => match send_console(sock, fd) {
                    Ok(()) => Reply::Success,
                    Err(e) => Reply::Failure(e),
                },
                _ => Reply::Failure("no console socket for the restored terminal".into()),
            },
            _ => Reply::Success,
        }
    };
    let paths = v.cgroup_paths.clone();
    let before = |criu_pid: u32, opts: &mut crate::pb::CriuOpts| -> Result<(), String> {
        CgroupSet::enter(&paths, criu_pid).map_err(|e| e.to_string())?;
        criu_seen.set(Some(criu_pid));
        let cg = std::fs::read_to_string(format!("/proc/{criu_pid}/cgroup"))
            .map_err(|e| e.to_string())?;
        opts.cg_root.extend(cgroup_roots(&cg));
        ready()
    };
    tracing::info!(id = %req.id, images = %req.images.display(), "restoring");
    let result = criu.restore(request, fds, before, &mut notify);
    criu_root.release()?;
    if let Some(name) = interrupted {
        match result {
            // CRIU went on regardless: do not leave an orphan.
            Ok((_, pid)) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            Err(e) => tracing::debug!("the interrupted restore ended with: {e}"),
        }
        return Err(OpError::Interrupted(name));
    }
    let (version, pid) = match result {
        Ok((v, pid)) if adopted => (v, pid),
        Ok((_, pid)) => {
            // CRIU restored without telling us (no post-restore): do not leave an orphan.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(OpError::Invalid(
                "CRIU restored without a post-restore notification".into(),
            ));
        }
        Err(e) => {
            tracing::info!(
                "restore failed; CRIU's log is kept at {}",
                work.join(RESTORE_LOG).display()
            );
            return Err(e.into());
        }
    };
    // Success: runc owns the state dir and cgroups now.
    undo.state_dir = None;
    undo.work = None;
    if let Some(cg) = undo.cgroups.take() {
        cg.keep();
    }
    if req.work_dir.is_none() {
        if let Err(e) = remove_tree(&work) {
            tracing::warn!("cleanup: {e}");
        }
    }
    Ok(RestoreReport {
        criu_version: version.to_string(),
        container: req.id.clone(),
        pid,
        bundle: v.cfg.bundle.clone(),
        elapsed_ms: elapsed_ms(started),
        paused,
    })
}
