//! `containerd-shim-ferry-v2`: a containerd runtime shim (task API v2, runtime type
//! `io.containerd.ferry.v2`) that runs containers through runc and checkpoints, restores and
//! live-migrates them through ferry's own CRIU core.
//!
//! - [`service`]: the task service (lifecycle, checkpoint, restore, events),
//! - [`task`]: the container and its processes as the shim sees them,
//! - [`io`]: stdio through pipes (re-inheritable by a restore) and consoles,
//! - [`runc`]: runc calls whose exits come from the subreaper monitor ([`reaper`]),
//! - [`error`]: the shim's errors and their single mapping onto ttrpc codes.
//!
//! Logs: `tracing` events become `log` records (tracing's `log` feature, no subscriber is
//! installed in the shim), which containerd-shim's logger writes to the bundle's `log` fifo.

pub mod containerd;
pub mod error;
pub mod io;
pub mod reaper;
pub mod runc;
pub mod service;
pub mod task;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::api::DeleteResponse;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Error, Flags, StartOpts};

use runc::RuncCli;
use service::Service;

/// The runtime type containerd knows the shim by.
pub const RUNTIME_TYPE: &str = "io.containerd.ferry.v2";

/// The shim process's entry points (start, delete, serve).
pub struct FerryShim {
    id: String,
    namespace: String,
    /// containerd's address (its ttrpc events address is separate).
    address: String,
    bundle: PathBuf,
    exit: Arc<ExitSignal>,
}

#[async_trait]
impl Shim for FerryShim {
    type T = Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        // containerd starts the shim in the bundle directory.
        let bundle = std::env::current_dir().unwrap_or_default();
        FerryShim {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            address: args.address.clone(),
            bundle,
            exit: Arc::new(ExitSignal::default()),
        }
    }

    /// Starts the serving shim; nothing but its address may reach stdout.
    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let grouping = opts.id.clone();
        let address = spawn(opts, &grouping, Vec::new()).await?;
        containerd_shim::util::write_str_to_file("address", &address).await?;
        Ok(address)
    }

    /// The `delete` action: containerd's cleanup after a shim died or a task was torn down.
    /// Idempotent: a container runc no longer knows and an unmounted rootfs are fine.
    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        let root = containerd::runc_root(&self.address, &self.namespace);
        let runc = RuncCli::new(&root, &self.bundle);
        if let Err(e) = runc.output(&["delete", "--force", &self.id], None).await {
            tracing::debug!("runc delete {}: {e}", self.id);
        }
        let rootfs = self.bundle.join("rootfs");
        let _ = containerd_shim::mount::umount_recursive(Some(&rootfs.to_string_lossy()), 0);
        Ok(DeleteResponse {
            pid: 0,
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: MessageField::some(task::timestamp(std::time::SystemTime::now())),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        Service::new(
            &self.id,
            &self.namespace,
            &containerd::runc_root(&self.address, &self.namespace),
            self.exit.clone(),
            publisher,
        )
    }
}
