//! ferry: checkpoint and live-migrate running OCI containers by speaking CRIU's RPC
//! directly over `criu swrk`.
//!
//! Data flows through the modules in this order:
//! - [`criu`]: the swrk transport and typed requests,
//! - [`images`]: CRIU image files ferry reads (stats),
//! - [`oci`]: the runtime's state and the bundle, mapped onto CRIU options,
//! - [`runtime`]: handing a restored container back to runc, cleanup that never crosses mounts,
//! - [`ops`]: the operations (check, checkpoint, restore) that the binaries call,
//! - [`migrate`]: live migration (`ferry serve` / `ferry migrate`),
//! - [`net`]: network continuity (locks, the destination namespace, ARP),
//! - [`shim`]: the containerd runtime shim `containerd-shim-ferry-v2`.

mod capped;
pub mod criu;
pub mod images;
pub mod migrate;
pub mod net;
pub mod oci;
pub mod ops;
pub mod runtime;
pub mod shim;

/// Generated CRIU protobuf types (from `criu-proto/`).
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/criu_proto/mod.rs"));
}

/// The generated types under Rust-style names.
pub mod pb {
    pub use crate::proto::files::{
        Open_file_entry as OpenFileEntry, Timerfd_settings as TimerfdSettings,
    };
    pub use crate::proto::pagemap::{Pagemap_entry as PagemapEntry, Pagemap_head as PagemapHead};
    pub use crate::proto::rpc::{
        Cgroup_root as CgroupRoot, Criu_cg_mode as CriuCgMode, Criu_dump_resp as CriuDumpResp,
        Criu_features as CriuFeatures, Criu_network_lock_method as CriuNetworkLockMethod,
        Criu_notify as CriuNotify, Criu_opts as CriuOpts,
        Criu_page_server_info as CriuPageServerInfo, Criu_pre_dump_mode as CriuPreDumpMode,
        Criu_req as CriuReq, Criu_req_type as criu_req_type, Criu_resp as CriuResp,
        Criu_restore_resp as CriuRestoreResp, Criu_version as CriuVersionMsg,
        Ext_mount_map as ExtMountMap, Inherit_fd as InheritFd, Join_namespace as JoinNamespace,
    };
    pub use crate::proto::stats::{
        Dump_stats_entry as DumpStatsEntry, Restore_stats_entry as RestoreStatsEntry,
        Stats_entry as StatsEntry,
    };
}
