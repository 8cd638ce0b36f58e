//! `ferry checkpoint`: dump a runc container into an images directory.
//!
//! The metadata restore needs (`ferry.json`) is written during CRIU's `post-dump`
//! notification, while the tasks are still frozen: if it cannot be written, the notification
//! fails and CRIU resumes the container untouched. Without `--leave-running` the dumped
//! container is then deleted from runc, as `runc checkpoint` does.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::{elapsed_ms, open_dir, require_root, OpError};
use crate::criu::client::{run_dump, Request};
use crate::criu::swrk::{ChildFds, Swrk};
use crate::criu::{Criu, Notification, Notify, Reply, Script};
use crate::images::stats::DUMP_STATS_FILE;
use crate::images::{read_dump_stats, DumpStats};
use crate::oci::bundle::BundleConfig;
use crate::oci::meta::{CheckpointMeta, META_FILE, META_FORMAT};
use crate::oci::options::{
    dump_options, gather_dump_facts, skips_network_lock, DumpSettings, RealHost, DUMP_LOG,
};
use crate::oci::state::{RuncContainer, RuncRoot};
use crate::oci::OciError;
use crate::pb::CriuOpts;
use crate::runtime::cgroups::{freeze, is_frozen, thaw};
use crate::runtime::runc::Runc;

#[derive(Debug, Clone)]
pub struct CheckpointRequest {
    pub id: String,
    pub runtime_root: PathBuf,
    pub images: PathBuf,
    /// CRIU's work dir (log, stats); the images dir when absent.
    pub work_dir: Option<PathBuf>,
    pub settings: DumpSettings,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckpointReport {
    pub criu_version: String,
    pub container: String,
    pub images: PathBuf,
    pub leave_running: bool,
    #[serde(flatten)]
    pub stats: DumpStats,
    pub elapsed_ms: u64,
}

/// Checks that `images` may receive a checkpoint of `id`: missing or empty, or an earlier
/// ferry checkpoint of the same container, or what a failed checkpoint left (only CRIU's
/// log, see [`discard_partial_images`]).
fn prepare_images_dir(images: &Path, id: &str) -> Result<(), OpError> {
    if !images.exists() {
        std::fs::create_dir_all(images).map_err(|source| OciError::Write {
            path: images.to_path_buf(),
            source,
        })?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(images, std::fs::Permissions::from_mode(0o700));
        return Ok(());
    }
    if !images.is_dir() {
        return Err(OpError::Invalid(format!(
            "images path {} is not a directory",
            images.display()
        )));
    }
    let empty = std::fs::read_dir(images)
        .map(|d| {
            d.flatten()
                .all(|e| e.file_name() == DUMP_LOG && e.file_type().is_ok_and(|t| t.is_file()))
        })
        .unwrap_or(false);
    if empty {
        return Ok(());
    }
    match CheckpointMeta::load(images) {
        Ok(m) if m.container == id => Ok(()),
        Ok(m) => Err(OpError::Invalid(format!(
            "images directory {} holds a checkpoint of container {:?}; use another directory",
            images.display(),
            m.container
        ))),
        Err(_) => Err(OpError::Invalid(format!(
            "images directory {} is not empty and holds no ferry checkpoint; use an empty directory",
            images.display()
        ))),
    }
}

/// After a failed dump: removes the images CRIU wrote (and the stale ones of an earlier
/// checkpoint there, which no `ferry.json` vouches for any more), so that they neither hold
/// the disk (a dump that filled it) nor block a retry into the same directory. CRIU's log
/// stays for the operator. Only regular files with CRIU's image names go; subdirectories
/// and anything else are left alone.
fn discard_partial_images(images: &Path) {
    let Ok(dir) = std::fs::read_dir(images) else {
        return;
    };
    let mut removed = 0u32;
    for e in dir.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let criu_made = name.ends_with(".img") || name == DUMP_STATS_FILE;
        if criu_made && e.file_type().is_ok_and(|t| t.is_file()) {
            match std::fs::remove_file(e.path()) {
                Ok(()) => removed += 1,
                Err(err) => tracing::warn!(file = %e.path().display(), "{err}"),
            }
        }
    }
    if removed > 0 {
        tracing::info!(
            removed,
            images = %images.display(),
            "removed the images of the failed dump (CRIU's log stays)"
        );
    }
}

/// A container ready to be dumped: its state, bundle, the CRIU options built for it and the
/// metadata a restore will need. Shared by `ferry checkpoint` and `ferry migrate`.
pub struct DumpJob {
    pub container: RuncContainer,
    pub cfg: BundleConfig,
    pub opts: CriuOpts,
    pub meta: CheckpointMeta,
    freezer: Option<PathBuf>,
    /// Held while the job lives: one dump of a container at a time.
    _lock: ContainerLock,
}

/// Where the locks of [`ContainerLock::take`] live.
const LOCK_DIR: &str = "locks";

/// The lock of one container for one checkpoint or migration: a file under /run/ferry,
/// flocked, and removed when released. The file of a holder that was killed (SIGKILL, so
/// no `Drop`) stays behind unlocked; the next [`ContainerLock::take`] of any container
/// removes it.
struct ContainerLock {
    path: PathBuf,
    _file: nix::fcntl::Flock<std::fs::File>,
}

/// How many lock files one [`ContainerLock::take`] looks at for stale ones.
const LOCK_SWEEP_MAX: usize = 64;

impl ContainerLock {
    /// Takes the lock of container `id` of the runc root `root`, without waiting. A second
    /// dump at the same time is refused: its CRIU could not seize the tasks the first one
    /// holds, and after failing it would act on a freezer the first one owns.
    fn take(root: &Path, id: &str) -> Result<ContainerLock, OpError> {
        Self::take_in(
            &Path::new(super::restore::FERRY_RUN_DIR).join(LOCK_DIR),
            root,
            id,
        )
    }

    fn take_in(dir: &Path, root: &Path, id: &str) -> Result<ContainerLock, OpError> {
        use std::os::unix::ffi::OsStrExt;
        let env = |e: &dyn std::fmt::Display| {
            OpError::Environment(format!("lock for {id:?} in {}: {e}", dir.display()))
        };
        std::fs::create_dir_all(dir).map_err(|e| env(&e))?;
        let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
        // FNV-1a of the root's path: one lock per root and id, whatever the path's length.
        let hash = root
            .as_os_str()
            .as_bytes()
            .iter()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
            });
        let path = dir.join(format!("{hash:016x}-{id}"));
        sweep_stale_locks(dir, &path);
        // A holder removes the file as it lets go: a lock taken on a file no longer at
        // `path` locks nothing, so take it again on the new one (bounded).
        for _ in 0..16 {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| env(&e))?;
            let file = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
                .map_err(|(_, e)| match e {
                nix::errno::Errno::EWOULDBLOCK => OpError::Conflict(format!(
                    "a checkpoint or migration of container {id:?} is already under way"
                )),
                e => env(&e),
            })?;
            if still_at(&file, &path) {
                return Ok(ContainerLock { path, _file: file });
            }
        }
        Err(env(&"the lock file keeps being replaced"))
    }
}

/// Whether the open `file` is still the one at `path`.
fn still_at(file: &std::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(held), Ok(now)) => held.ino() == now.ino() && held.dev() == now.dev(),
        _ => false,
    }
}

/// Removes the lock files in `dir` (other than `keep`) that nobody holds: left by a ferry
/// that was killed. Each is removed only while locked and still in place, as a holder
/// removes its own, so a taker that opened it meanwhile finds it gone and takes a new one.
/// Best effort, and at most [`LOCK_SWEEP_MAX`] entries per call.
fn sweep_stale_locks(dir: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten().take(LOCK_SWEEP_MAX) {
        let path = entry.path();
        if path == keep || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let Ok(file) = std::fs::OpenOptions::new().write(true).open(&path) else {
            continue;
        };
        let Ok(held) = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        else {
            continue; // held: a dump under way
        };
        if still_at(&held, &path) && std::fs::remove_file(&path).is_ok() {
            tracing::debug!(lock = %path.display(), "removed a stale lock file");
        }
    }
}

impl Drop for ContainerLock {
    fn drop(&mut self) {
        // Removed while still held (the flock goes with the file after this).
        let _ = std::fs::remove_file(&self.path);
    }
}

impl DumpJob {
    /// Loads the running container and builds its dump options.
    pub fn prepare(
        runtime_root: &Path,
        id: &str,
        settings: &DumpSettings,
        criu_version: &str,
    ) -> Result<DumpJob, OpError> {
        let root = RuncRoot::open(runtime_root)?;
        let c = root.load(id)?;
        c.check_running()?;
        let lock = ContainerLock::take(runtime_root, id)?;
        let pids = container_pids(&c);
        if let Some(e) = seize_refusal(&c.id, &pids) {
            return Err(e);
        }
        if !settings.file_locks {
            if let Some(e) = locks_not_carried(&c.id, &pids) {
                return Err(e);
            }
        }
        let cfg = BundleConfig::load(&c.bundle)?;
        cfg.check_restorable_root()?;
        let facts = gather_dump_facts(&RealHost, &cfg, &c)?;
        let opts = dump_options(&cfg, &facts, settings);
        tracing::debug!(
            lock = ?opts.network_lock(),
            loopback_only_netns = facts.loopback_only_netns,
            "network lock for the dump"
        );
        let freezer = c.freeze_cgroup().map(PathBuf::from);
        // Paused (`runc pause`) before ferry froze it: it stays so whatever happens.
        let was_frozen = freezer.as_deref().and_then(is_frozen).unwrap_or(false);
        let meta = CheckpointMeta {
            format: META_FORMAT,
            container: id.to_string(),
            bundle: c.bundle.clone(),
            rootfs: cfg.rootfs.clone(),
            criu_version: criu_version.to_string(),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            leave_running: settings.leave_running,
            descriptors: facts.descriptors.clone(),
            cgroup_binds: facts.cgroup_binds.clone(),
            masked_files: facts.masked_files.clone(),
            terminal: cfg.terminal,
            runc_state: c.raw.clone(),
            network_lock_skipped: skips_network_lock(&facts, settings),
            net_sysctls: crate::oci::sysctl::read_in(c.init_pid, &cfg.net_sysctls)
                .map_err(|e| OpError::Invalid(e.to_string()))?,
            cgroup_settings: crate::runtime::cgroups::read_settings(
                &c.cgroup_paths,
                &c.raw["config"]["cgroups"],
            )?,
            paused: was_frozen,
        };
        Ok(DumpJob {
            container: c,
            cfg,
            opts,
            meta,
            freezer,
            _lock: lock,
        })
    }

    /// The container's processes (thread group ids), from its freezer cgroup.
    pub fn tasks(&self) -> Option<Vec<i32>> {
        crate::runtime::cgroups::procs(self.freezer.as_ref()?)
    }

    /// DUMPs on the session, freezing the container itself (1 ms polls; CRIU's own loop
    /// sleeps 100 ms) as late as CRIU lets it: at CRIU's `pre-dump` notification, which
    /// comes after CRIU took the request and before it looks at the freezer and seizes the
    /// tasks (it waits for the answer). Returns when the freeze began (None when the
    /// container was frozen already, or CRIU froze it). Call [`DumpJob::settle_freezer`]
    /// afterwards in every case.
    pub fn run(
        &self,
        session: &mut Swrk,
        request: Request,
        notify: &mut dyn Notify,
        timeout: Duration,
    ) -> Result<Option<Instant>, OpError> {
        let to_freeze = self.freezer.as_deref().filter(|_| !self.meta.paused);
        let mut frozen_at = None;
        let mut freeze_failed = None;
        let mut stray_failed = None;
        let mut interrupted = None;
        let mut freezing_notify = |n: Notification| -> Reply {
            // The last points where stopping loses nothing: before the freeze, and before
            // post-dump is answered (CRIU then resumes the tasks). A migration's commit
            // begins in the answer to post-dump; an interrupt after it is not looked at.
            if matches!(n.script, Script::PreDump | Script::PostDump) {
                if let Some(name) =
                    super::interrupt::stop_at(format_args!("dump at {:?}", n.script))
                {
                    interrupted = Some(name.clone());
                    return Reply::Failure(format!("interrupted by {name}"));
                }
            }
            if let (true, Some(f), None) = (n.script == Script::PreDump, to_freeze, frozen_at) {
                let at = Instant::now();
                frozen_at = Some(at);
                if let Err(e) = freeze(f, Duration::from_secs(10)) {
                    let text = e.to_string();
                    freeze_failed = Some(e);
                    return Reply::Failure(text);
                }
                tracing::debug!(ms = at.elapsed().as_millis() as u64, "container frozen");
            }
            // Frozen (by ferry or paused before): processes CRIU would leave behind fail
            // the dump here, before CRIU seizes anything.
            if let (true, Some(f)) = (n.script == Script::PreDump, self.freezer.as_deref()) {
                let init = self.container.init_pid;
                let pids = crate::runtime::cgroups::procs(f);
                let strays =
                    crate::runtime::cgroups::strays(pids.as_deref().unwrap_or_default(), init);
                let refusal = if strays.is_empty() {
                    seize_refusal(&self.container.id, &pids.unwrap_or_else(|| vec![init]))
                } else {
                    Some(stray_error(&self.container.id, &strays))
                };
                if let Some(e) = refusal {
                    let text = e.to_string();
                    stray_failed = Some(e);
                    return Reply::Failure(text);
                }
            }
            notify.notify(n)
        };
        let dumped = run_dump(session, request, &mut freezing_notify, timeout);
        if let Some(e) = freeze_failed {
            return Err(e.into());
        }
        if let Some(e) = stray_failed {
            return Err(e);
        }
        if let Some(name) = interrupted {
            if let Err(e) = dumped {
                tracing::debug!("the interrupted dump ended with: {e}");
            }
            return Err(OpError::Interrupted(name));
        }
        if dumped.is_err() {
            // It ended under the dump: say so rather than quote what CRIU made of it.
            self.container.check_running()?;
        }
        dumped?;
        Ok(frozen_at)
    }

    /// CRIU puts the freezer back in the state it found, which is frozen since ferry froze it
    /// (and a criu that died or was killed may leave it frozen too): a container that was
    /// running before must not stay frozen, unless `keep_frozen` (a migration whose outcome
    /// is unknown keeps the source paused rather than risk two running copies).
    pub fn settle_freezer(&self, keep_frozen: bool) {
        if let Some(f) = self.freezer.as_deref() {
            if !self.meta.paused && !keep_frozen && is_frozen(f) == Some(true) {
                if let Err(t) = thaw(f) {
                    tracing::warn!("cannot thaw {} after the dump: {t}", f.display());
                }
            }
        }
    }
}

/// The container's processes: those of its freezer cgroup, or its init alone where that
/// cannot be read.
pub(crate) fn container_pids(c: &RuncContainer) -> Vec<i32> {
    c.freeze_cgroup()
        .and_then(|f| crate::runtime::cgroups::procs(Path::new(f)))
        .unwrap_or_else(|| vec![c.init_pid])
}

/// What of the container's processes `pids` keeps CRIU from dumping them (the two checks
/// below, in that order), each process's /proc status read once for both. Before the freeze,
/// and again once frozen.
fn seize_refusal(id: &str, pids: &[i32]) -> Option<OpError> {
    let statuses: Vec<(i32, String)> = pids
        .iter()
        .take(crate::runtime::cgroups::MAX_STRAY_SCAN)
        .filter_map(|&p| Some((p, crate::oci::state::process_status(p)?)))
        .collect();
    unseizable_task(id, &statuses).or_else(|| limits_unreadable(id, &statuses))
}

/// A process that CRIU cannot seize (see [`crate::oci::state::unseizable`]), among the
/// processes and /proc status texts `statuses`: a stopped one made the dump hang until
/// CRIU's timeout with the container frozen (and `runc checkpoint` as well).
fn unseizable_task(id: &str, statuses: &[(i32, String)]) -> Option<OpError> {
    let (pid, why) = statuses
        .iter()
        .find_map(|(p, s)| Some((*p, crate::oci::state::unseizable(*p, s)?)))?;
    Some(OpError::Conflict(format!(
        "container {id:?} has a process CRIU cannot checkpoint: pid {pid} ({}) is {why}",
        crate::oci::state::process_comm(pid)
    )))
}

/// A process of the container holding a file lock fails a dump without CRIU's `file_locks`
/// once the container is frozen ("Some file locks are hold by dumping tasks"): found here,
/// before the freeze. (One taken between now and the freeze still fails the dump, with
/// CRIU's message.)
fn locks_not_carried(id: &str, pids: &[i32]) -> Option<OpError> {
    let lock = crate::runtime::locks::held_locks(pids, 1)
        .into_iter()
        .next()?;
    Some(OpError::Invalid(format!(
        "container {id:?} holds a file lock (pid {} ({}): {} on {}), which is carried only when \
         asked: pass --file-locks (the lock is taken again where the container is restored)",
        lock.pid,
        crate::oci::state::process_comm(lock.pid),
        lock.lock.kind,
        lock.path.display()
    )))
}

/// CRIU reads each process's resource limits with prlimit(2), which the kernel allows on a
/// process whose real, effective or saved user or group id differs from the caller's only
/// with CAP_SYS_RESOURCE. A ferry without it (a restricted service unit or container) would
/// see such a container's dump fail once frozen ("Can't get rlimit … Operation not
/// permitted"): found here instead, among the processes and /proc status texts `statuses`.
fn limits_unreadable(id: &str, statuses: &[(i32, String)]) -> Option<OpError> {
    use caps::{CapSet, Capability};
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SYS_RESOURCE).unwrap_or(true) {
        return None;
    }
    let (uid, gid) = (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    let (pid, ids) = statuses
        .iter()
        .filter_map(|(p, s)| Some((*p, crate::oci::state::status_ids(s)?)))
        .find(|(_, ids)| {
            ids[..3].iter().any(|&u| u != uid) || ids[3..].iter().any(|&g| g != gid)
        })?;
    Some(OpError::Environment(format!(
        "container {id:?} runs pid {pid} ({}) as uid {} gid {}, and this ferry lacks \
         CAP_SYS_RESOURCE, without which CRIU cannot read the resource limits of another \
         user's process: run ferry with that capability",
        crate::oci::state::process_comm(pid),
        ids[1],
        ids[4]
    )))
}

/// Processes outside the init's tree: a checkpoint would lose them.
fn stray_error(id: &str, strays: &[(i32, String)]) -> OpError {
    let named: Vec<String> = strays
        .iter()
        .take(5)
        .map(|(pid, comm)| format!("{pid} ({comm})"))
        .collect();
    OpError::Conflict(format!(
        "container {id:?} has {} process(es) outside its init's process tree, which a \
         checkpoint would lose: pid {}{} (runc exec started? end them first)",
        strays.len(),
        named.join(", "),
        if strays.len() > 5 { ", …" } else { "" }
    ))
}

pub fn checkpoint(criu: &Criu, req: &CheckpointRequest) -> Result<CheckpointReport, OpError> {
    let started = Instant::now();
    require_root()?;
    let (mut session, version) = criu.session(ChildFds::default())?;
    let job = DumpJob::prepare(
        &req.runtime_root,
        &req.id,
        &req.settings,
        &version.to_string(),
    )?;
    prepare_images_dir(&req.images, &req.id)?;
    let work = req.work_dir.clone().unwrap_or_else(|| req.images.clone());
    if work != req.images {
        std::fs::create_dir_all(&work).map_err(|source| OciError::Write {
            path: work.clone(),
            source,
        })?;
    }
    // A stale ferry.json from an earlier checkpoint must not vouch for these images.
    let _ = std::fs::remove_file(req.images.join(META_FILE));

    let request = Request {
        opts: job.opts.clone(),
        images_dir: open_dir(&req.images)?,
        work_dir: Some(open_dir(&work)?),
        log_path: Some(work.join(DUMP_LOG)),
    };
    let images = req.images.clone();
    let mut saved = false;
    let mut notify = |n: Notification| -> Reply {
        if n.script == Script::PostDump {
            return match job.meta.save(&images) {
                Ok(()) => {
                    saved = true;
                    Reply::Success
                }
                Err(e) => Reply::Failure(e.to_string()),
            };
        }
        Reply::Success
    };
    tracing::info!(id = %req.id, images = %req.images.display(), "dumping");
    let dumped = job.run(&mut session, request, &mut notify, criu.timeout());
    session.finish(Duration::from_secs(5));
    job.settle_freezer(false);
    if let Err(e) = dumped {
        // CRIU's log is in the same place and may be cut short: name the cause here. (Only
        // for CRIU's failures: an interrupt or a refusal keeps its own message and code.)
        // Looked at before the partial images go, which gives the room back.
        let criu_failed = matches!(e, OpError::Criu(_));
        let full = [&req.images, &work]
            .into_iter()
            .filter(|_| criu_failed)
            .find_map(|d| crate::runtime::memroom::ran_full(d).map(|free| (d, free)));
        discard_partial_images(&req.images);
        return Err(match full {
            Some((dir, free)) => OpError::Environment(format!(
                "no room left for the images: the filesystem of {} has {free} bytes free \
                 (the container runs on; {e})",
                dir.display()
            )),
            None => e,
        });
    }
    if !saved {
        job.meta.save(&req.images)?;
    }
    if work != req.images {
        let _ = std::fs::copy(work.join(DUMP_STATS_FILE), req.images.join(DUMP_STATS_FILE));
    }
    let stats = read_dump_stats(&work)?;

    if !req.settings.leave_running {
        // The tasks are gone; remove the stopped container from runc as `runc checkpoint` does.
        if let Err(e) = Runc::new(&req.runtime_root).delete(&req.id) {
            tracing::warn!(
                "checkpointed container {} could not be deleted from runc: {e}",
                req.id
            );
        }
    }
    Ok(CheckpointReport {
        criu_version: version.to_string(),
        container: req.id.clone(),
        images: req.images.clone(),
        leave_running: req.settings.leave_running,
        stats,
        elapsed_ms: elapsed_ms(started),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_failed_dump_leaves_only_the_log_and_the_dir_takes_a_retry() {
        let t = tempfile::tempdir().unwrap();
        let images = t.path();
        for f in [
            "pages-1.img",
            "inventory.img",
            "stats-dump",
            DUMP_LOG,
            "notes.txt",
        ] {
            std::fs::write(images.join(f), "x").unwrap();
        }
        std::fs::create_dir(images.join("sub.img")).unwrap();
        discard_partial_images(images);
        assert_eq!(names(images), [DUMP_LOG, "notes.txt", "sub.img"]);
        // Someone else's files: not a failed checkpoint's remains.
        assert!(prepare_images_dir(images, "c").is_err());
        std::fs::remove_file(images.join("notes.txt")).unwrap();
        std::fs::remove_dir(images.join("sub.img")).unwrap();
        // Only CRIU's log: taken as empty.
        prepare_images_dir(images, "c").unwrap();
        // A directory named like the log is not the log.
        std::fs::remove_file(images.join(DUMP_LOG)).unwrap();
        std::fs::create_dir(images.join(DUMP_LOG)).unwrap();
        assert!(prepare_images_dir(images, "c").is_err());
    }

    #[test]
    fn a_lock_is_exclusive_and_a_killed_holders_file_is_swept() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("locks");
        let root = t.path();
        let a = ContainerLock::take_in(&dir, root, "a").unwrap();
        let again = ContainerLock::take_in(&dir, root, "a");
        assert!(
            matches!(again, Err(OpError::Conflict(_))),
            "{:?}",
            again.err()
        );
        // Left by a holder that was killed: the file, unlocked.
        std::fs::write(dir.join("0123456789abcdef-gone"), "").unwrap();
        std::fs::create_dir(dir.join("not-a-lock")).unwrap();
        let b = ContainerLock::take_in(&dir, root, "b").unwrap();
        let mut left = names(&dir);
        left.retain(|n| !n.ends_with("-a") && !n.ends_with("-b"));
        assert_eq!(left, ["not-a-lock"], "the stale file stays");
        // The held ones are not swept, and go when released.
        assert_eq!(names(&dir).len(), 3);
        drop((a, b));
        assert_eq!(names(&dir), ["not-a-lock"]);
        ContainerLock::take_in(&dir, root, "a").unwrap();
    }
}
