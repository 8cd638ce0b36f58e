//! What ferry stores beside CRIU's images (`ferry.json`), validated on read.
//!
//! It records the facts a restore needs that CRIU's images do not carry: which container and
//! bundle the checkpoint came from, the container's stdio at checkpoint time (to re-inherit
//! pipes), which mount points were external and how to find their source again, and runc's
//! state at checkpoint time (to hand the restored container back to runc).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{read_capped, validate_id, write_replace, OciError};

pub const META_FILE: &str = "ferry.json";
pub const META_FORMAT: u32 = 1;
/// Cap on ferry.json.
pub const MAX_META: u64 = 8 * 1024 * 1024;
/// CRIU writes this first in every images dir.
pub const INVENTORY: &str = "inventory.img";

/// A cgroup v1 hierarchy bind-mounted into the container by runc.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupBind {
    /// Mount point inside the container (e.g. /sys/fs/cgroup/cpu,cpuacct).
    pub mountpoint: String,
    /// One controller of that hierarchy, as keyed in runc's cgroup_paths (e.g. "cpu",
    /// "name=systemd").
    pub controller: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: u32,
    pub container: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub criu_version: String,
    /// Seconds since the epoch.
    pub created: u64,
    pub leave_running: bool,
    /// readlink of the init's fds 0–2 at checkpoint time (e.g. "pipe:[1234]").
    pub descriptors: Vec<String>,
    pub cgroup_binds: Vec<CgroupBind>,
    /// Masked paths that were files (bind-mounted /dev/null).
    pub masked_files: Vec<String>,
    pub terminal: bool,
    /// runc's state.json at checkpoint time.
    pub runc_state: serde_json::Value,
    /// The dump took no network lock (see `options::skips_network_lock`), so the restore
    /// takes none either: CRIU would otherwise look for lock rules the images do not have.
    #[serde(default)]
    pub network_lock_skipped: bool,
    /// config.json's network sysctls with their values at checkpoint time, written into the
    /// restored container's network namespace (CRIU does not carry them).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub net_sysctls: std::collections::BTreeMap<String, String>,
    /// The container's cgroup limits (and, on v1, device rules) at checkpoint time (cgroup
    /// file of the host's layout → value), written into the restored container's new
    /// cgroups before CRIU runs.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub cgroup_settings: std::collections::BTreeMap<String, String>,
    /// The container was paused (its freezer frozen, `runc pause`) before the dump: the
    /// restore leaves it paused, as CRIU does when it restores a freezer's state itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

impl CheckpointMeta {
    /// Reads and validates `<dir>/ferry.json` and the presence of CRIU's images.
    pub fn load(dir: &Path) -> Result<CheckpointMeta, OciError> {
        let not = |why: String| OciError::NotCheckpoint {
            path: dir.to_path_buf(),
            why,
        };
        let file = dir.join(META_FILE);
        if !file.is_file() {
            let empty = std::fs::read_dir(dir)
                .map(|mut d| d.next().is_none())
                .unwrap_or(true);
            return Err(not(if empty {
                "the directory is empty".into()
            } else {
                format!("no {META_FILE}")
            }));
        }
        let m: CheckpointMeta = serde_json::from_slice(&read_capped(&file, MAX_META)?)
            .map_err(|e| not(format!("{META_FILE}: {e}")))?;
        if m.format != META_FORMAT {
            return Err(not(format!(
                "{META_FILE} has format {}, this ferry reads {META_FORMAT}",
                m.format
            )));
        }
        validate_id(&m.container).map_err(|e| not(e.to_string()))?;
        if m.descriptors.len() > 3 {
            return Err(not(format!(
                "{} stdio descriptors recorded (at most 3)",
                m.descriptors.len()
            )));
        }
        super::sysctl::validate(&m.net_sysctls).map_err(|e| not(e.to_string()))?;
        crate::runtime::cgroups::validate_settings(&m.cgroup_settings).map_err(not)?;
        if !dir.join(INVENTORY).is_file() {
            return Err(not(format!("CRIU's {INVENTORY} is missing")));
        }
        Ok(m)
    }

    /// Writes ferry.json into an images directory (called while the container is frozen; no
    /// fsync: the images CRIU wrote beside it are not synced either).
    pub fn save(&self, dir: &Path) -> Result<(), OciError> {
        let data = serde_json::to_vec_pretty(self).map_err(|source| OciError::Json {
            path: dir.join(META_FILE),
            source,
        })?;
        write_replace(&dir.join(META_FILE), &data, 0o600)
    }
}
