//! The task service containerd talks to (task API v2): lifecycle through runc, checkpoint and
//! restore through ferry's own CRIU core ([`crate::ops`]).
//!
//! One container per shim. State lives behind one async mutex; events are queued in the
//! order the state changed (while the lock is held) and forwarded by one task, so containerd
//! sees create → start → exit → delete and exec-added → exec-started → exit in that order.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::api::{self, Status};
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::event::Event;
use containerd_shim::protos::events::task::{
    TaskCheckpointed, TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO,
    TaskPaused, TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageDyn, MessageField};
use containerd_shim::protos::shim::oci::{CheckpointOptions, ProcessDetails};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Context, Task, TtrpcContext, TtrpcResult};
use tokio::sync::{mpsc, Mutex};

use super::error::{Result, ShimError};
use super::io::{ConsoleSocket, ProcessIo, StdioSpec};
use super::reaper::ExitWatch;
use super::runc::{read_pid_file, ProcIo, RuncCli};
use super::task::{cgroups_mode, Container, Exit, Proc};
use crate::criu::Criu;
use crate::oci::options::{DumpSettings, RestoreSettings};
use crate::ops::checkpoint::{checkpoint, CheckpointRequest};
use crate::ops::restore::{restore_with_stdio, RestoreRequest};
use crate::runtime::mounts::remove_tree;

/// Where the shim binds console sockets (short: a socket path has at most 107 bytes).
const CONSOLE_DIR: &str = "/run/ferry/shim-pty";
/// How long a process's output may take to drain after it exits before its exit is reported.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long runc's console socket is awaited.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(30);

/// CRIU's logs copied into the bundle when a checkpoint or restore fails.
pub const DUMP_LOG_COPY: &str = "criu-dump.log";
pub const RESTORE_LOG_COPY: &str = "criu-restore.log";

type Envelope = (String, Box<dyn MessageDyn>);

/// The task service of one shim.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    id: String,
    namespace: String,
    runc_root: PathBuf,
    exit: Arc<ExitSignal>,
    state: Mutex<Option<Container>>,
    events: mpsc::UnboundedSender<Envelope>,
}

impl Service {
    pub fn new(
        id: &str,
        namespace: &str,
        runc_root: &Path,
        exit: Arc<ExitSignal>,
        publisher: RemotePublisher,
    ) -> Service {
        let (tx, mut rx) = mpsc::unbounded_channel::<Envelope>();
        let ns = namespace.to_string();
        tokio::spawn(async move {
            while let Some((topic, ev)) = rx.recv().await {
                if let Err(e) = publisher.publish(Context::default(), &topic, &ns, ev).await {
                    tracing::warn!("publishing {topic}: {e}");
                }
            }
        });
        Service {
            inner: Arc::new(Inner {
                id: id.to_string(),
                namespace: namespace.to_string(),
                runc_root: runc_root.to_path_buf(),
                exit,
                state: Mutex::new(None),
                events: tx,
            }),
        }
    }

    fn publish<E: Event + MessageDyn + 'static>(&self, ev: E) {
        let topic = ev.topic();
        tracing::debug!(topic, "event");
        let _ = self.inner.events.send((topic, Box::new(ev)));
    }

    fn runc(&self, bundle: &Path) -> RuncCli {
        RuncCli::new(&self.inner.runc_root, bundle)
    }

    fn criu() -> Criu {
        Criu::from_env()
    }

    /// Waits for `pid` on `watch`, then records its exit and publishes TaskExit.
    fn watch_exit(&self, mut watch: ExitWatch, exec_id: String, pid: i32) {
        let svc = self.clone();
        tokio::spawn(async move {
            watch.forget_others(&[pid]);
            let code = watch.wait(pid).await;
            drop(watch);
            svc.on_exit(&exec_id, pid, code).await;
        });
    }

    /// Watches a process that is not our child (an adopted container's init) through a
    /// pidfd; its exit status comes from /proc while it is a zombie of its real parent.
    fn watch_foreign_exit(&self, pid: i32) {
        let svc = self.clone();
        tokio::spawn(async move {
            let code = super::task::wait_foreign(pid).await;
            svc.on_exit("", pid, code).await;
        });
    }

    async fn on_exit(&self, exec_id: &str, pid: i32, code: i32) {
        tracing::info!(exec_id, pid, code, "process exited");
        // Let the output drain first (without the lock), so the process's last words reach
        // containerd before its exit does.
        let mut io = {
            let mut st = self.inner.state.lock().await;
            match st.as_mut().and_then(|c| c.process_mut(exec_id)) {
                Some(p) if p.pid == pid => std::mem::take(&mut p.io),
                _ => return,
            }
        };
        io.drain(DRAIN_TIMEOUT).await;
        let mut st = self.inner.state.lock().await;
        let Some(c) = st.as_mut() else { return };
        let cid = c.id.clone();
        let Some(p) = c.process_mut(exec_id) else {
            return;
        };
        p.io = io;
        let exit = Exit::now(code as u32);
        p.set_exited(exit);
        self.publish(TaskExit {
            container_id: cid.clone(),
            id: if exec_id.is_empty() {
                cid
            } else {
                exec_id.to_string()
            },
            pid: pid as u32,
            exit_status: exit.status,
            exited_at: MessageField::some(exit.timestamp()),
            ..Default::default()
        });
    }

    async fn create_task(&self, req: api::CreateTaskRequest) -> Result<api::CreateTaskResponse> {
        let mut st = self.inner.state.lock().await;
        if st.is_some() {
            return Err(ShimError::AlreadyExists(format!("task {}", req.id)));
        }
        let bundle = PathBuf::from(&req.bundle);
        let rootfs = bundle.join("rootfs");
        let mut mounted = false;
        for m in &req.rootfs {
            if !mounted {
                std::fs::create_dir_all(&rootfs)
                    .map_err(ShimError::io(format!("creating {}", rootfs.display())))?;
            }
            containerd_shim::util::mount_rootfs(m, &rootfs)
                .await
                .map_err(|e| ShimError::Internal(format!("mounting the rootfs: {e}")))?;
            mounted = true;
        }
        let stdio = StdioSpec {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let mut c = Container {
            id: req.id.clone(),
            bundle: bundle.clone(),
            rootfs: rootfs.clone(),
            rootfs_mounted: mounted,
            adopted: false,
            checkpoint: (!req.checkpoint.is_empty()).then(|| PathBuf::from(&req.checkpoint)),
            init: Proc::new(stdio.clone()),
            execs: HashMap::new(),
        };
        if let Some(pid) = super::containerd::take_adoption(&self.inner.runc_root, &c.id) {
            // A container ferry serve restored into our runc root: adopt it (Start only
            // reports it); nothing is created.
            let root = crate::oci::state::RuncRoot::open(&self.inner.runc_root)
                .map_err(|e| ShimError::Internal(e.to_string()))?;
            let rc = root
                .load(&c.id)
                .map_err(|e| ShimError::NotFound(format!("adopted container: {e}")))?;
            rc.check_running()
                .map_err(|e| ShimError::FailedPrecondition(format!("adopted container: {e}")))?;
            if rc.init_pid != pid {
                return Err(ShimError::FailedPrecondition(format!(
                    "adoption marker names pid {pid}, runc's state {}",
                    rc.init_pid
                )));
            }
            c.init.pid = pid;
            c.adopted = true;
        } else if c.checkpoint.is_none() {
            let res = self.runc_create(&mut c).await;
            if let Err(e) = res {
                unmount_rootfs(&c);
                return Err(e);
            }
        }
        tracing::info!(id = %c.id, pid = c.init.pid, checkpoint = ?c.checkpoint, "created");
        self.publish(TaskCreate {
            container_id: c.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            checkpoint: req.checkpoint.clone(),
            pid: c.init.pid as u32,
            ..Default::default()
        });
        let pid = c.init.pid as u32;
        *st = Some(c);
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    /// `runc create` with the init's stdio (pipes or a console socket).
    async fn runc_create(&self, c: &mut Container) -> Result<()> {
        let runc = self.runc(&c.bundle);
        let pid_file = c.bundle.join("init.pid");
        let _ = std::fs::remove_file(&pid_file);
        let mut watch = ExitWatch::new().await?;
        let bundle = c.bundle.to_string_lossy().into_owned();
        let pidf = pid_file.to_string_lossy().into_owned();
        let args = ["create", "--bundle", &bundle, "--pid-file", &pidf, &c.id];
        if c.init.stdio.terminal {
            let sock = ConsoleSocket::bind(Path::new(CONSOLE_DIR))?;
            let path = sock.path.clone();
            let master = tokio::spawn(sock.receive(CONSOLE_TIMEOUT));
            runc.spawn_with_io(&mut watch, &args, Some(ProcIo::Console(path)))
                .await?;
            let master = master
                .await
                .map_err(|e| ShimError::Internal(e.to_string()))??;
            c.init.io = ProcessIo::console(&c.init.stdio, master).await?;
        } else {
            let (fds, io) = ProcessIo::pipes(&c.init.stdio).await?;
            c.init.io = io;
            runc.spawn_with_io(&mut watch, &args, Some(ProcIo::Pipes(fds)))
                .await?;
        }
        let pid = read_pid_file(&pid_file)?;
        c.init.pid = pid;
        self.watch_exit(watch, String::new(), pid);
        Ok(())
    }

    async fn start_task(&self, req: api::StartRequest) -> Result<api::StartResponse> {
        let mut st = self.inner.state.lock().await;
        let c = container(&mut st, &req.id)?;
        if !req.exec_id.is_empty() {
            return self.start_exec(c, &req.exec_id).await;
        }
        if c.init.status != Status::CREATED {
            return Err(ShimError::FailedPrecondition(format!(
                "task {} is not in the created state",
                c.id
            )));
        }
        if c.adopted {
            // Already running (restored by ferry serve); its parent is not this shim.
            self.watch_foreign_exit(c.init.pid);
        } else if let Some(images) = c.checkpoint.clone() {
            match self.restore(c, &images).await {
                Ok(()) => {}
                Err(e) => {
                    // The task failed: it will never run. Report it stopped so that waiters
                    // and `ctr task ls` see it, and let delete clean up.
                    tracing::error!(id = %c.id, "restore failed: {e}");
                    let exit = Exit::now(255);
                    c.init.set_exited(exit);
                    self.publish(TaskExit {
                        container_id: c.id.clone(),
                        id: c.id.clone(),
                        pid: 0,
                        exit_status: exit.status,
                        exited_at: MessageField::some(exit.timestamp()),
                        ..Default::default()
                    });
                    return Err(e);
                }
            }
        } else {
            self.runc(&c.bundle).output(&["start", &c.id], None).await?;
        }
        if c.init.exit().is_none() {
            c.init.status = Status::RUNNING;
        }
        tracing::info!(id = %c.id, pid = c.init.pid, "started");
        self.publish(TaskStart {
            container_id: c.id.clone(),
            pid: c.init.pid as u32,
            ..Default::default()
        });
        Ok(api::StartResponse {
            pid: c.init.pid as u32,
            ..Default::default()
        })
    }

    /// Restores the checkpoint containerd unpacked, through ferry's restore.
    async fn restore(&self, c: &mut Container, images: &Path) -> Result<()> {
        let work = Path::new(crate::ops::restore::FERRY_RUN_DIR).join(format!(
            "shim-restore-{}-{}",
            c.id,
            std::process::id()
        ));
        let _ = remove_tree(&work);
        let mut console = None;
        let mut stdio = None;
        if c.init.stdio.terminal {
            console = Some(ConsoleSocket::bind(Path::new(CONSOLE_DIR))?);
        } else {
            let (fds, io) = ProcessIo::pipes(&c.init.stdio).await?;
            c.init.io = io;
            stdio = Some(fds);
        }
        let req = RestoreRequest {
            id: c.id.clone(),
            runtime_root: self.inner.runc_root.clone(),
            images: images.to_path_buf(),
            bundle: Some(c.bundle.clone()),
            rename: true,
            work_dir: Some(work.clone()),
            console_socket: console.as_ref().map(|s| s.path.clone()),
            settings: RestoreSettings {
                // What a checkpoint through this shim may hold (see `dump_settings`).
                tcp_established: true,
                ext_unix_sk: true,
                file_locks: true,
                ..Default::default()
            },
            cgroup_paths: None,
            null_stdio: false,
            unpause: true,
        };
        let master = console.map(|s| tokio::spawn(s.receive(Duration::from_secs(600))));
        // Taken before CRIU runs: the restored init is our child (rst_sibling) and may exit
        // before we learn its pid.
        let watch = ExitWatch::new().await?;
        let res = tokio::task::spawn_blocking(move || {
            restore_with_stdio(&Self::criu(), &req, stdio, &mut |_| Ok(()))
        })
        .await
        .map_err(|e| ShimError::Internal(e.to_string()))?;
        let log = work.join(crate::oci::options::RESTORE_LOG);
        let report = match res {
            Ok(r) => r,
            Err(source) => {
                if let Some(m) = master {
                    m.abort();
                }
                let _ = std::fs::copy(&log, c.bundle.join(RESTORE_LOG_COPY));
                let _ = remove_tree(&work);
                return Err(ShimError::Op {
                    op: "restore",
                    source,
                });
            }
        };
        let _ = remove_tree(&work);
        if let Some(m) = master {
            let fd = m.await.map_err(|e| ShimError::Internal(e.to_string()))??;
            c.init.io = ProcessIo::console(&c.init.stdio, fd).await?;
        }
        c.init.pid = report.pid;
        self.watch_exit(watch, String::new(), report.pid);
        Ok(())
    }

    async fn start_exec(&self, c: &mut Container, exec_id: &str) -> Result<api::StartResponse> {
        if c.init.status != Status::RUNNING && c.init.status != Status::PAUSED {
            return Err(ShimError::FailedPrecondition(format!(
                "task {} is not running",
                c.id
            )));
        }
        let runc = self.runc(&c.bundle);
        let cid = c.id.clone();
        let bundle = c.bundle.clone();
        let p = c
            .execs
            .get_mut(exec_id)
            .ok_or_else(|| ShimError::NotFound(format!("exec {exec_id}")))?;
        if p.status != Status::CREATED {
            return Err(ShimError::FailedPrecondition(format!(
                "exec {exec_id} was started already"
            )));
        }
        let spec_file = bundle.join(format!("exec-{exec_id}.json"));
        let pid_file = bundle.join(format!("exec-{exec_id}.pid"));
        std::fs::write(&spec_file, p.spec.as_deref().unwrap_or(b"{}"))
            .map_err(ShimError::io(format!("writing {}", spec_file.display())))?;
        let _ = std::fs::remove_file(&pid_file);
        let specf = spec_file.to_string_lossy().into_owned();
        let pidf = pid_file.to_string_lossy().into_owned();
        let args = [
            "exec",
            "--detach",
            "--process",
            &specf,
            "--pid-file",
            &pidf,
            &cid,
        ];
        let mut watch = ExitWatch::new().await?;
        let res = if p.stdio.terminal {
            let sock = ConsoleSocket::bind(Path::new(CONSOLE_DIR))?;
            let path = sock.path.clone();
            let master = tokio::spawn(sock.receive(CONSOLE_TIMEOUT));
            match runc
                .spawn_with_io(&mut watch, &args, Some(ProcIo::Console(path)))
                .await
            {
                Ok(()) => {
                    let m = master
                        .await
                        .map_err(|e| ShimError::Internal(e.to_string()))??;
                    p.io = ProcessIo::console(&p.stdio, m).await?;
                    Ok(())
                }
                Err(e) => {
                    master.abort();
                    Err(e)
                }
            }
        } else {
            let (fds, io) = ProcessIo::pipes(&p.stdio).await?;
            p.io = io;
            runc.spawn_with_io(&mut watch, &args, Some(ProcIo::Pipes(fds)))
                .await
        };
        let _ = std::fs::remove_file(&spec_file);
        res?;
        let pid = read_pid_file(&pid_file)?;
        let _ = std::fs::remove_file(&pid_file);
        p.pid = pid;
        p.status = Status::RUNNING;
        self.watch_exit(watch, exec_id.to_string(), pid);
        self.publish(TaskExecStarted {
            container_id: cid,
            exec_id: exec_id.to_string(),
            pid: pid as u32,
            ..Default::default()
        });
        Ok(api::StartResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn delete_task(&self, req: api::DeleteRequest) -> Result<api::DeleteResponse> {
        let mut st = self.inner.state.lock().await;
        let c = container(&mut st, &req.id)?;
        if !req.exec_id.is_empty() {
            let p = c
                .execs
                .get(&req.exec_id)
                .ok_or_else(|| ShimError::NotFound(format!("exec {}", req.exec_id)))?;
            if p.status == Status::RUNNING {
                return Err(ShimError::FailedPrecondition(format!(
                    "exec {} is running",
                    req.exec_id
                )));
            }
            let p = c.execs.remove(&req.exec_id).expect("checked");
            let exit = p.exit().unwrap_or_else(|| Exit::now(0));
            return Ok(api::DeleteResponse {
                pid: p.pid as u32,
                exit_status: exit.status,
                exited_at: MessageField::some(exit.timestamp()),
                ..Default::default()
            });
        }
        if matches!(c.init.status, Status::RUNNING | Status::PAUSED) {
            return Err(ShimError::FailedPrecondition(format!(
                "task {} is running; kill it first",
                c.id
            )));
        }
        if c.init.pid > 0 || c.checkpoint.is_none() {
            match self
                .runc(&c.bundle)
                .output(&["delete", "--force", &c.id], None)
                .await
            {
                Ok(_) => {}
                Err(e) if e.code() == containerd_shim::protos::ttrpc::Code::NOT_FOUND => {}
                Err(e) => tracing::warn!("runc delete {}: {e}", c.id),
            }
        }
        unmount_rootfs(c);
        let exit = c.init.exit().unwrap_or_else(|| Exit::now(0));
        let pid = c.init.pid.max(0) as u32;
        let cid = c.id.clone();
        *st = None;
        self.publish(TaskDelete {
            container_id: cid.clone(),
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(exit.timestamp()),
            id: cid,
            ..Default::default()
        });
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(exit.timestamp()),
            ..Default::default()
        })
    }

    async fn checkpoint_task(&self, req: api::CheckpointTaskRequest) -> Result<()> {
        let st = self.inner.state.lock().await;
        let c = st
            .as_ref()
            .filter(|c| c.id == req.id)
            .ok_or_else(|| ShimError::NotFound(format!("task {}", req.id)))?;
        if !matches!(c.init.status, Status::RUNNING | Status::PAUSED) {
            return Err(ShimError::FailedPrecondition(format!(
                "task {} is not running",
                c.id
            )));
        }
        let opts = checkpoint_options(req.options.as_ref())?;
        let images = if opts.image_path.is_empty() {
            PathBuf::from(&req.path)
        } else {
            PathBuf::from(&opts.image_path)
        };
        if images.as_os_str().is_empty() {
            return Err(ShimError::InvalidArgument(
                "checkpoint without a path".into(),
            ));
        }
        let work = (!opts.work_path.is_empty()).then(|| PathBuf::from(&opts.work_path));
        let creq = CheckpointRequest {
            id: c.id.clone(),
            runtime_root: self.inner.runc_root.clone(),
            images: images.clone(),
            work_dir: work.clone(),
            settings: dump_settings(&opts)?,
        };
        let bundle = c.bundle.clone();
        let cid = c.id.clone();
        // The lock stays held: nothing else may change the task while CRIU dumps it (an
        // `exit` checkpoint's exit is recorded after this returns).
        let res = tokio::task::spawn_blocking(move || checkpoint(&Self::criu(), &creq))
            .await
            .map_err(|e| ShimError::Internal(e.to_string()))?;
        let work = work.unwrap_or_else(|| images.clone());
        match res {
            Ok(report) => {
                tracing::info!(id = %cid, images = %images.display(), elapsed_ms = report.elapsed_ms, "checkpointed");
            }
            Err(source) => {
                let _ = std::fs::copy(
                    work.join(crate::oci::options::DUMP_LOG),
                    bundle.join(DUMP_LOG_COPY),
                );
                return Err(ShimError::Op {
                    op: "checkpoint",
                    source,
                });
            }
        }
        // containerd archives `req.path`: with an image_path of its own, copy the images
        // there too.
        if !req.path.is_empty() && Path::new(&req.path) != images {
            copy_flat_dir(&images, Path::new(&req.path))?;
        }
        self.publish(TaskCheckpointed {
            container_id: cid,
            checkpoint: req.path.clone(),
            ..Default::default()
        });
        Ok(())
    }
}

fn container<'a>(st: &'a mut Option<Container>, id: &str) -> Result<&'a mut Container> {
    st.as_mut()
        .filter(|c| c.id == id)
        .ok_or_else(|| ShimError::NotFound(format!("task {id}")))
}

fn unmount_rootfs(c: &Container) {
    if c.rootfs_mounted {
        let p = c.rootfs.to_string_lossy().into_owned();
        if let Err(e) = containerd_shim::mount::umount_recursive(Some(&p), 0) {
            tracing::warn!("unmounting {p}: {e}");
        }
    }
}

/// runc's CheckpointOptions from the request; absent or empty options are all defaults
/// (`ctr task checkpoint` sends none for runtimes other than runc).
pub fn checkpoint_options(any: Option<&Any>) -> Result<CheckpointOptions> {
    match any {
        None => Ok(CheckpointOptions::new()),
        Some(a) if a.value.is_empty() => Ok(CheckpointOptions::new()),
        Some(a) => {
            if !a.type_url.is_empty() && !a.type_url.ends_with("CheckpointOptions") {
                return Err(ShimError::InvalidArgument(format!(
                    "checkpoint options of type {:?}; expected runc's CheckpointOptions",
                    a.type_url
                )));
            }
            CheckpointOptions::parse_from_bytes(&a.value)
                .map_err(|e| ShimError::InvalidArgument(format!("checkpoint options: {e}")))
        }
    }
}

/// Maps runc's CheckpointOptions onto ferry's dump settings.
pub fn dump_settings(o: &CheckpointOptions) -> Result<DumpSettings> {
    let mut empty_ns = 0u32;
    for ns in &o.empty_namespaces {
        match ns.as_str() {
            "network" | "net" => empty_ns |= libc::CLONE_NEWNET as u32,
            other => {
                return Err(ShimError::InvalidArgument(format!(
                    "empty namespace {other:?}: CRIU can only restore an empty network namespace"
                )))
            }
        }
    }
    let cgroups = if o.cgroups_mode.is_empty() {
        None
    } else {
        Some(cgroups_mode(&o.cgroups_mode).ok_or_else(|| {
            ShimError::InvalidArgument(format!("cgroups mode {:?}", o.cgroups_mode))
        })?)
    };
    Ok(DumpSettings {
        leave_running: !o.exit,
        tcp_established: o.open_tcp,
        ext_unix_sk: o.external_unix_sockets,
        file_locks: o.file_locks,
        shell_job: o.terminal,
        cgroups_mode: cgroups,
        empty_ns,
        ..Default::default()
    })
}

/// Copies the regular files of `from` (CRIU's images are one flat directory) into `to`.
fn copy_flat_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(ShimError::io(format!("creating {}", to.display())))?;
    let rd =
        std::fs::read_dir(from).map_err(ShimError::io(format!("reading {}", from.display())))?;
    for e in rd.flatten() {
        if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
            std::fs::copy(e.path(), to.join(e.file_name()))
                .map_err(ShimError::io(format!("copying {}", e.path().display())))?;
        }
    }
    Ok(())
}

fn stdio_state(p: &Proc) -> (String, String, String, bool) {
    (
        p.stdio.stdin.clone(),
        p.stdio.stdout.clone(),
        p.stdio.stderr.clone(),
        p.stdio.terminal,
    )
}

#[async_trait]
impl Task for Service {
    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let mut st = self.inner.state.lock().await;
        let c = container(&mut st, &req.id)?;
        let bundle = c.bundle.to_string_lossy().into_owned();
        let p = c
            .process(&req.exec_id)
            .ok_or_else(|| ShimError::NotFound(format!("exec {}", req.exec_id)))?;
        let (stdin, stdout, stderr, terminal) = stdio_state(p);
        let exit = p.exit();
        Ok(api::StateResponse {
            id: if req.exec_id.is_empty() {
                req.id.clone()
            } else {
                req.exec_id.clone()
            },
            bundle,
            pid: p.pid.max(0) as u32,
            status: p.status.into(),
            stdin,
            stdout,
            stderr,
            terminal,
            exit_status: exit.map(|e| e.status).unwrap_or(0),
            exited_at: exit
                .map(|e| MessageField::some(e.timestamp()))
                .unwrap_or_default(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        Ok(self.create_task(req).await?)
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        Ok(self.start_task(req).await?)
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        Ok(self.delete_task(req).await?)
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let (bundle, execs) = {
            let mut st = self.inner.state.lock().await;
            let c = container(&mut st, &req.id)?;
            let execs: HashMap<i32, String> = c
                .execs
                .iter()
                .filter(|(_, p)| p.pid > 0)
                .map(|(k, p)| (p.pid, k.clone()))
                .collect();
            (c.bundle.clone(), execs)
        };
        let out = self
            .runc(&bundle)
            .output(&["ps", "--format", "json", &req.id], None)
            .await?;
        let pids: Vec<i32> = serde_json::from_slice(&out)
            .map_err(|e| ShimError::Internal(format!("runc ps output: {e}")))?;
        let mut processes = Vec::new();
        for pid in pids {
            let mut info = containerd_shim::protos::api::ProcessInfo {
                pid: pid as u32,
                ..Default::default()
            };
            if let Some(exec_id) = execs.get(&pid) {
                let d = ProcessDetails {
                    exec_id: exec_id.clone(),
                    ..Default::default()
                };
                let any = containerd_shim::util::convert_to_any(Box::new(d))
                    .map_err(|e| ShimError::Internal(e.to_string()))?;
                info.info = MessageField::some(any);
            }
            processes.push(info);
        }
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        let mut st = self.inner.state.lock().await;
        let c = container(&mut st, &req.id)?;
        self.runc(&c.bundle).output(&["pause", &c.id], None).await?;
        if c.init.status == Status::RUNNING {
            c.init.status = Status::PAUSED;
        }
        self.publish(TaskPaused {
            container_id: c.id.clone(),
            ..Default::default()
        });
        Ok(api::Empty::new())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        let mut st = self.inner.state.lock().await;
        let c = container(&mut st, &req.id)?;
        self.runc(&c.bundle)
            .output(&["resume", &c.id], None)
            .await?;
        if c.init.status == Status::PAUSED {
            c.init.status = Status::RUNNING;
        }
        self.publish(TaskResumed {
            container_id: c.id.clone(),
            ..Default::default()
        });
        Ok(api::Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        self.checkpoint_task(req).await?;
        Ok(api::Empty::new())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let mut st = self.inner.state.lock().await;
        let c = container(&mut st, &req.id)?;
        if req.exec_id.is_empty() {
            if c.init.exit().is_some() && !req.all {
                return Err(
                    ShimError::NotFound(format!("process {} already finished", c.id)).into(),
                );
            }
            if c.init.pid <= 0 {
                return Err(ShimError::FailedPrecondition(format!(
                    "task {} has no process yet",
                    c.id
                ))
                .into());
            }
            let sig = req.signal.to_string();
            let mut args = vec!["kill"];
            if req.all {
                args.push("--all");
            }
            args.push(&c.id);
            args.push(&sig);
            self.runc(&c.bundle).output(&args, None).await?;
        } else {
            let p = c
                .execs
                .get(&req.exec_id)
                .ok_or_else(|| ShimError::NotFound(format!("exec {}", req.exec_id)))?;
            if p.pid <= 0 || p.exit().is_some() {
                return Err(
                    ShimError::NotFound(format!("exec {} is not running", req.exec_id)).into(),
                );
            }
            let sig = nix::sys::signal::Signal::try_from(req.signal as i32)
                .map_err(|_| ShimError::InvalidArgument(format!("signal {}", req.signal)))?;
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), sig)
                .map_err(|e| ShimError::io("kill")(e.into()))?;
        }
        Ok(api::Empty::new())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let mut st = self.inner.state.lock().await;
        let c = container(&mut st, &req.id)?;
        if c.execs.contains_key(&req.exec_id) {
            return Err(ShimError::AlreadyExists(format!("exec {}", req.exec_id)).into());
        }
        if req.exec_id.is_empty() || req.exec_id.len() > 128 {
            return Err(ShimError::InvalidArgument("exec id".into()).into());
        }
        crate::oci::validate_id(&req.exec_id)
            .map_err(|e| ShimError::InvalidArgument(e.to_string()))?;
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| ShimError::InvalidArgument("exec without a process spec".into()))?;
        let mut p = Proc::new(StdioSpec {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        });
        p.spec = Some(spec);
        c.execs.insert(req.exec_id.clone(), p);
        self.publish(TaskExecAdded {
            container_id: c.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        });
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let mut st = self.inner.state.lock().await;
        let c = container(&mut st, &req.id)?;
        let p = c
            .process(&req.exec_id)
            .ok_or_else(|| ShimError::NotFound(format!("exec {}", req.exec_id)))?;
        p.io.resize(req.width, req.height)?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let mut st = self.inner.state.lock().await;
        let c = container(&mut st, &req.id)?;
        let p = c
            .process(&req.exec_id)
            .ok_or_else(|| ShimError::NotFound(format!("exec {}", req.exec_id)))?;
        if req.stdin {
            p.io.close_stdin();
        }
        Ok(api::Empty::new())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let bundle = {
            let mut st = self.inner.state.lock().await;
            container(&mut st, &req.id)?.bundle.clone()
        };
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| ShimError::InvalidArgument("update without resources".into()))?;
        // containerd sends runtime-spec LinuxResources as JSON; anything else is the caller's
        // mistake, not a runc failure.
        match serde_json::from_slice::<serde_json::Value>(&resources) {
            Ok(serde_json::Value::Object(_)) => {}
            Ok(_) => {
                return Err(ShimError::InvalidArgument(
                    "update: the resources are not a JSON object (runtime-spec LinuxResources)"
                        .into(),
                )
                .into())
            }
            Err(e) => {
                return Err(ShimError::InvalidArgument(format!(
                    "update: the resources are not JSON (runtime-spec LinuxResources): {e}"
                ))
                .into())
            }
        }
        self.runc(&bundle)
            .output(&["update", "--resources", "-", &req.id], Some(resources))
            .await?;
        Ok(api::Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let mut rx = {
            let mut st = self.inner.state.lock().await;
            let c = container(&mut st, &req.id)?;
            c.process(&req.exec_id)
                .ok_or_else(|| ShimError::NotFound(format!("exec {}", req.exec_id)))?
                .exit_watch()
        };
        let exit = loop {
            if let Some(e) = *rx.borrow_and_update() {
                break e;
            }
            if rx.changed().await.is_err() {
                // The process was deleted without an exit: report it as killed.
                break Exit::now(137);
            }
        };
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(exit.timestamp()),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let pid = {
            let mut st = self.inner.state.lock().await;
            let c = container(&mut st, &req.id)?;
            if c.init.pid <= 0 || c.init.exit().is_some() {
                return Err(
                    ShimError::FailedPrecondition(format!("task {} is not running", c.id)).into(),
                );
            }
            c.init.pid
        };
        let metrics = tokio::task::spawn_blocking(move || {
            let cg = containerd_shim::cgroup::get_cgroup(pid as u32)?;
            containerd_shim::cgroup::collect_metrics(&cg)
        })
        .await
        .map_err(|e| ShimError::Internal(e.to_string()))?
        .map_err(|e| ShimError::Internal(format!("cgroup metrics: {e}")))?;
        let any = containerd_shim::util::convert_to_any(Box::new(metrics))
            .map_err(|e| ShimError::Internal(e.to_string()))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let mut st = self.inner.state.lock().await;
        let task_pid = match st.as_mut().filter(|c| c.id == req.id) {
            Some(c) => c.init.pid.max(0) as u32,
            None => 0,
        };
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        let st = self.inner.state.lock().await;
        if st.is_some() {
            // containerd asks after every delete; the shim stays while it has a task.
            return Ok(api::Empty::new());
        }
        tracing::info!(id = %self.inner.id, ns = %self.inner.namespace, "shutting down");
        self.inner.exit.signal();
        Ok(api::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_absent_empty_and_set() {
        let o = checkpoint_options(None).unwrap();
        let s = dump_settings(&o).unwrap();
        assert!(s.leave_running);
        assert!(!s.file_locks);
        let empty = Any::new();
        assert!(
            dump_settings(&checkpoint_options(Some(&empty)).unwrap())
                .unwrap()
                .leave_running
        );

        let mut o = CheckpointOptions::new();
        o.exit = true;
        o.open_tcp = true;
        o.external_unix_sockets = true;
        o.file_locks = true;
        o.terminal = true;
        o.cgroups_mode = "soft".into();
        o.empty_namespaces = vec!["network".into()];
        o.image_path = "/x".into();
        let mut a = Any::new();
        a.type_url = "containerd.runc.v1.CheckpointOptions".into();
        a.value = o.write_to_bytes().unwrap();
        let back = checkpoint_options(Some(&a)).unwrap();
        assert_eq!(back.image_path, "/x");
        let s = dump_settings(&back).unwrap();
        assert!(!s.leave_running);
        assert!(s.tcp_established && s.ext_unix_sk && s.file_locks && s.shell_job);
        assert_eq!(s.empty_ns, libc::CLONE_NEWNET as u32);
        assert!(s.cgroups_mode.is_some());

        let mut bad = CheckpointOptions::new();
        bad.empty_namespaces = vec!["pid".into()];
        assert!(dump_settings(&bad).is_err());
        let mut bad = CheckpointOptions::new();
        bad.cgroups_mode = "weird".into();
        assert!(dump_settings(&bad).is_err());
        let mut wrong = Any::new();
        wrong.type_url = "some.Other".into();
        wrong.value = vec![1, 2];
        assert!(checkpoint_options(Some(&wrong)).is_err());
    }
}
