//! The one path from a container's bundle and runtime state to CRIU options.
//!
//! Facts about the running container are gathered through [`Host`] (the seam in front of the
//! OS, so that the mapping itself is tested without root), then [`dump_options`] and
//! [`restore_options`] build the options the way runc does for the same bundle:
//!
//! Dump: pid = init; root = rootfs; manage_cgroups; freeze_cgroup = the freezer cgroup; every
//! bind mount is an external mount (key = value = its destination); each cgroup v1 hierarchy
//! runc bind-mounted is external; masked files (bind-mounted /dev/null) are external with value
//! "/dev/null"; device nodes are external in case they are bind mounts; net/pid namespaces
//! given by path are external (`net[<inode>]:extRootNetNS`); notify scripts and
//! orphan_pts_master are on.
//!
//! Restore: root = a private bind mount of the rootfs; external mounts map the recorded key to
//! this host's source (bind source, the new container's cgroup dir, /dev/null, the device);
//! external namespaces are inherited descriptors under the same key; other namespaces given by
//! path are joined; pipes on stdio are re-inherited from the criu child's fds 0–2;
//! rst_sibling makes the restored init our child.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::bundle::{BundleConfig, MountKind, NsKind};
use super::meta::{CgroupBind, CheckpointMeta};
use super::state::RuncContainer;
use super::OciError;
use crate::pb::{
    CgroupRoot, CriuCgMode, CriuNetworkLockMethod, CriuOpts, ExtMountMap, InheritFd, JoinNamespace,
};

/// CRIU's log verbosity used for dumps and restores (4 = debug: what runc uses).
pub const LOG_LEVEL: i32 = 4;
pub const DUMP_LOG: &str = "dump.log";
pub const RESTORE_LOG: &str = "restore.log";

/// The OS facts the mapping needs.
pub trait Host {
    /// Inode of a namespace file.
    fn ns_inode(&self, path: &Path) -> std::io::Result<u64>;
    /// Whether a path inside the container's root exists and is a directory.
    fn container_path_kind(&self, pid: i32, path: &str) -> std::io::Result<Option<bool>>;
    /// /proc/<pid>/mountinfo.
    fn mountinfo(&self, pid: i32) -> std::io::Result<String>;
    /// readlink /proc/<pid>/fd/<fd>.
    fn fd_target(&self, pid: i32, fd: i32) -> std::io::Result<String>;
    /// Names of the network interfaces in `pid`'s network namespace (/proc/<pid>/net/dev).
    fn net_devices(&self, pid: i32) -> std::io::Result<Vec<String>>;
}

/// The real OS.
pub struct RealHost;

impl Host for RealHost {
    fn ns_inode(&self, path: &Path) -> std::io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(std::fs::metadata(path)?.ino())
    }

    fn container_path_kind(&self, pid: i32, path: &str) -> std::io::Result<Option<bool>> {
        let p = format!("/proc/{pid}/root/{}", path.trim_start_matches('/'));
        match std::fs::metadata(p) {
            Ok(m) => Ok(Some(m.is_dir())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn mountinfo(&self, pid: i32) -> std::io::Result<String> {
        std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
    }

    fn fd_target(&self, pid: i32, fd: i32) -> std::io::Result<String> {
        Ok(std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))?
            .to_string_lossy()
            .into_owned())
    }

    fn net_devices(&self, pid: i32) -> std::io::Result<Vec<String>> {
        use std::io::Read;
        let mut text = String::new();
        std::fs::File::open(format!("/proc/{pid}/net/dev"))?
            .take(MAX_NET_DEV)
            .read_to_string(&mut text)?;
        Ok(parse_net_dev(&text))
    }
}

/// Cap on /proc/<pid>/net/dev (about 130 bytes a device).
const MAX_NET_DEV: u64 = 1 << 20;

/// Interface names from /proc/net/dev (two header lines, then `name: counters…`).
fn parse_net_dev(text: &str) -> Vec<String> {
    text.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':'))
        .map(|(name, _)| name.trim().to_string())
        .collect()
}

/// Facts about a running container needed to dump it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpFacts {
    pub pid: i32,
    pub rootfs: PathBuf,
    pub freeze_cgroup: Option<String>,
    /// Namespaces given by path that CRIU must treat as external, with their inodes.
    pub external_ns: Vec<(NsKind, u64)>,
    pub masked_files: Vec<String>,
    pub cgroup_binds: Vec<CgroupBind>,
    pub descriptors: Vec<String>,
    /// The container has a network namespace of its own (runc made it, not given by path)
    /// with no interface but `lo`: nothing outside can reach it.
    pub loopback_only_netns: bool,
}

/// Optional CRIU behaviour for dumps (runc's CheckpointOptions, roughly).
#[derive(Debug, Clone, Default)]
pub struct DumpSettings {
    pub leave_running: bool,
    pub tcp_established: bool,
    /// Established connections are not dumped; the restore closes them (CRIU's tcp_close).
    pub tcp_close: bool,
    /// CRIU's network lock method (None: CRIU's default, iptables).
    pub network_lock: Option<CriuNetworkLockMethod>,
    pub ext_unix_sk: bool,
    pub file_locks: bool,
    pub shell_job: bool,
    pub cgroups_mode: Option<CriuCgMode>,
    /// Namespaces (CLONE_NEW* bits) to restore empty (CRIU's `empty_ns`; only network).
    pub empty_ns: u32,
    /// Largest deleted-but-open file whose content goes into the images (CRIU's
    /// `ghost_limit`; None: CRIU's default, 1 MiB).
    pub ghost_limit: Option<u32>,
}

/// CRIU's `ghost_limit` when none is given: 1 MiB.
pub const CRIU_GHOST_LIMIT: u64 = 1 << 20;

/// Optional CRIU behaviour for restores.
#[derive(Debug, Clone, Default)]
pub struct RestoreSettings {
    pub tcp_established: bool,
    /// The dump was made with tcp_close: restore those sockets closed.
    pub tcp_close: bool,
    pub network_lock: Option<CriuNetworkLockMethod>,
    pub ext_unix_sk: bool,
    pub file_locks: bool,
    pub shell_job: bool,
    pub lazy_pages: bool,
    pub cgroups_mode: Option<CriuCgMode>,
}

/// Words in a cgroup v1 mount's super options that are not controller names.
const NOT_CONTROLLERS: [&str; 7] = [
    "rw",
    "ro",
    "xattr",
    "noprefix",
    "clone_children",
    "cpuset_v2_mode",
    "nsdelegate",
];

/// One parsed mountinfo line (the fields ferry uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub root: String,
    pub mountpoint: String,
    pub fstype: String,
    pub super_options: String,
}

/// Parses /proc/<pid>/mountinfo text (octal escapes in paths are decoded).
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            Some(MountInfo {
                root: unescape(pre.get(3)?),
                mountpoint: unescape(pre.get(4)?),
                fstype: post.first()?.to_string(),
                super_options: post.get(2).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The controller a cgroup v1 mount stands for, from its super options.
fn cgroup_controller(super_options: &str) -> Option<String> {
    super_options
        .split(',')
        .find(|o| !NOT_CONTROLLERS.contains(o) && (!o.contains('=') || o.starts_with("name=")))
        .map(str::to_string)
}

/// Gathers what a dump needs from the running container.
pub fn gather_dump_facts(
    host: &dyn Host,
    cfg: &BundleConfig,
    c: &RuncContainer,
) -> Result<DumpFacts, OciError> {
    let pid = c.init_pid;
    let proc_err = |what: &str, source: std::io::Error| OciError::Read {
        path: PathBuf::from(format!("/proc/{pid}/{what}")),
        source,
    };
    let mut external_ns = Vec::new();
    for ns in &cfg.namespaces {
        if let (NsKind::Net | NsKind::Pid, Some(path)) = (ns.kind, &ns.path) {
            let ino = host.ns_inode(path).map_err(|source| OciError::Read {
                path: path.clone(),
                source,
            })?;
            external_ns.push((ns.kind, ino));
        }
    }
    let mut masked_files = Vec::new();
    for p in &cfg.masked_paths {
        if let Some(false) = host
            .container_path_kind(pid, p)
            .map_err(|e| proc_err("root", e))?
        {
            masked_files.push(p.clone());
        }
    }
    let cgroup_dests: Vec<&str> = cfg
        .mounts
        .iter()
        .filter(|m| m.kind == MountKind::Cgroup)
        .map(|m| m.destination.as_str())
        .collect();
    let mut cgroup_binds = Vec::new();
    if !cgroup_dests.is_empty() {
        let mi = host.mountinfo(pid).map_err(|e| proc_err("mountinfo", e))?;
        for m in parse_mountinfo(&mi) {
            let under = cgroup_dests.iter().any(|d| {
                m.mountpoint
                    .strip_prefix(d)
                    .is_some_and(|rest| rest.starts_with('/'))
            });
            if under && m.fstype == "cgroup" {
                if let Some(controller) = cgroup_controller(&m.super_options) {
                    cgroup_binds.push(CgroupBind {
                        mountpoint: m.mountpoint.clone(),
                        controller,
                    });
                }
            }
        }
    }
    let mut descriptors = Vec::new();
    for fd in 0..3 {
        descriptors.push(
            host.fd_target(pid, fd)
                .unwrap_or_else(|_| "/dev/null".into()),
        );
    }
    let own_netns = cfg.namespace(NsKind::Net).is_some_and(|n| n.path.is_none());
    let loopback_only_netns = own_netns
        && host
            .net_devices(pid)
            .map(|d| d.iter().all(|n| n == "lo"))
            .unwrap_or(false);
    Ok(DumpFacts {
        pid,
        rootfs: cfg.rootfs.clone(),
        freeze_cgroup: c.freeze_cgroup().map(str::to_string),
        external_ns,
        masked_files,
        cgroup_binds,
        descriptors,
        loopback_only_netns,
    })
}

/// Whether the dump can go without CRIU's network lock: the container's own namespace has
/// only `lo` (no packet from outside can arrive while it is frozen) and no established
/// connection is carried over in repair mode (`tcp_established`), which is what the lock
/// protects. The lock costs the freeze its `iptables-restore` runs (two on the dump, two
/// more on the restore to remove the rules again), tens of milliseconds each. The interfaces
/// are read before the freeze; one moved into the namespace in between would go unlocked
/// (which needs a host administrator doing so during a checkpoint).
pub fn skips_network_lock(f: &DumpFacts, s: &DumpSettings) -> bool {
    f.loopback_only_netns && !s.tcp_established
}

fn ext_mnt(key: &str, val: &str) -> ExtMountMap {
    let mut m = ExtMountMap::new();
    m.set_key(key.to_string());
    m.set_val(val.to_string());
    m
}

/// Options common to dumps and restores.
fn base_opts(log_file: &str) -> CriuOpts {
    let mut o = CriuOpts::new();
    o.set_images_dir_fd(-1);
    o.set_log_level(LOG_LEVEL);
    o.set_log_file(log_file.to_string());
    o.set_manage_cgroups(true);
    o.set_notify_scripts(true);
    o.set_orphan_pts_master(true);
    o
}

/// CRIU options for dumping the container (images/work dir fds are filled in by the caller).
pub fn dump_options(cfg: &BundleConfig, f: &DumpFacts, s: &DumpSettings) -> CriuOpts {
    let mut o = base_opts(DUMP_LOG);
    o.set_pid(f.pid);
    o.set_root(f.rootfs.to_string_lossy().into_owned());
    o.set_leave_running(s.leave_running);
    o.set_tcp_established(s.tcp_established);
    if s.tcp_close {
        o.set_tcp_close(true);
    }
    if skips_network_lock(f, s) {
        o.set_network_lock(CriuNetworkLockMethod::SKIP);
    } else if let Some(m) = s.network_lock {
        o.set_network_lock(m);
    }
    o.set_ext_unix_sk(s.ext_unix_sk);
    o.set_file_locks(s.file_locks);
    o.set_shell_job(s.shell_job);
    if let Some(m) = s.cgroups_mode {
        o.set_manage_cgroups_mode(m);
    }
    if s.empty_ns != 0 {
        o.set_empty_ns(s.empty_ns);
    }
    if let Some(n) = s.ghost_limit {
        o.set_ghost_limit(n);
    }
    if let Some(fc) = &f.freeze_cgroup {
        o.set_freeze_cgroup(fc.clone());
    }
    for (kind, ino) in &f.external_ns {
        o.external
            .push(format!("{}[{}]:{}", kind.name(), ino, kind.external_key()));
    }
    for (dest, _) in cfg.binds() {
        o.ext_mnt.push(ext_mnt(dest, dest));
    }
    for b in &f.cgroup_binds {
        o.ext_mnt.push(ext_mnt(&b.mountpoint, &b.mountpoint));
    }
    for m in &f.masked_files {
        o.ext_mnt.push(ext_mnt(m, "/dev/null"));
    }
    for d in &cfg.devices {
        o.ext_mnt.push(ext_mnt(d, d));
    }
    o
}

/// A restore's options plus the descriptors the criu child must inherit for them.
#[derive(Debug, Clone)]
pub struct RestorePlan {
    pub opts: CriuOpts,
    /// External namespaces: CRIU key → namespace file to open and pass to the child. The
    /// caller adds the inherit_fd entries once it knows the child's fd numbers.
    pub inherit_ns: Vec<(String, PathBuf)>,
}

/// CRIU options for restoring `meta`'s images as a container configured by `cfg`.
///
/// `criu_root` is the private bind mount of the rootfs; `cgroup_paths` are the new container's
/// cgroup directories (controller → absolute path), as they will be written to runc's state.
pub fn restore_options(
    cfg: &BundleConfig,
    meta: &CheckpointMeta,
    criu_root: &Path,
    cgroup_paths: &BTreeMap<String, String>,
    s: &RestoreSettings,
) -> Result<RestorePlan, OciError> {
    let mut o = base_opts(RESTORE_LOG);
    o.set_root(criu_root.to_string_lossy().into_owned());
    o.set_rst_sibling(true);
    o.set_evasive_devices(true);
    o.set_tcp_established(s.tcp_established);
    if s.tcp_close {
        o.set_tcp_close(true);
    }
    // A dump without the lock left no rules to remove (and a lock taken now would stay).
    if meta.network_lock_skipped {
        o.set_network_lock(CriuNetworkLockMethod::SKIP);
    } else if let Some(m) = s.network_lock {
        o.set_network_lock(m);
    }
    o.set_ext_unix_sk(s.ext_unix_sk);
    o.set_file_locks(s.file_locks);
    o.set_shell_job(s.shell_job);
    o.set_lazy_pages(s.lazy_pages);
    if let Some(m) = s.cgroups_mode {
        o.set_manage_cgroups_mode(m);
    }
    let mut inherit_ns = Vec::new();
    for ns in &cfg.namespaces {
        let Some(path) = &ns.path else { continue };
        match ns.kind {
            NsKind::Net | NsKind::Pid => inherit_ns.push((ns.kind.external_key(), path.clone())),
            kind => {
                let mut j = JoinNamespace::new();
                j.set_ns(kind.name().to_string());
                j.set_ns_file(path.to_string_lossy().into_owned());
                o.join_ns.push(j);
            }
        }
    }
    for (dest, source) in cfg.binds() {
        o.ext_mnt.push(ext_mnt(dest, &source.to_string_lossy()));
    }
    for b in &meta.cgroup_binds {
        let dir = cgroup_paths
            .get(&b.controller)
            .ok_or_else(|| OciError::Unsupported {
                path: cfg.bundle.join(super::bundle::CONFIG_FILE),
                what: format!(
                    "no cgroup for controller {:?} (needed by {})",
                    b.controller, b.mountpoint
                ),
            })?;
        o.ext_mnt.push(ext_mnt(&b.mountpoint, dir));
    }
    if !meta.masked_files.is_empty() {
        o.ext_mnt.push(ext_mnt("/dev/null", "/dev/null"));
    }
    for d in &cfg.devices {
        o.ext_mnt.push(ext_mnt(d, d));
    }
    for (i, d) in meta.descriptors.iter().enumerate() {
        if d.starts_with("pipe:") {
            let mut f = InheritFd::new();
            f.set_key(d.clone());
            f.set_fd(i as i32);
            o.inherit_fd.push(f);
        }
    }
    Ok(RestorePlan {
        opts: o,
        inherit_ns,
    })
}

/// cg_root entries for a process: one per controller in /proc/<pid>/cgroup ("" for v2).
pub fn cgroup_roots(proc_cgroup: &str) -> Vec<CgroupRoot> {
    let mut out = Vec::new();
    for line in proc_cgroup.lines() {
        let mut it = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let names: Vec<&str> = if ctrls.is_empty() {
            vec![""]
        } else {
            ctrls.split(',').collect()
        };
        for name in names {
            let mut r = CgroupRoot::new();
            r.set_ctrl(name.to_string());
            r.set_path(path.to_string());
            out.push(r);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::bundle::tests::sample_config;

    struct FakeHost;

    impl Host for FakeHost {
        fn ns_inode(&self, path: &Path) -> std::io::Result<u64> {
            assert_eq!(path, Path::new("/var/run/netns/n1"));
            Ok(4026532000)
        }
        fn container_path_kind(&self, _pid: i32, path: &str) -> std::io::Result<Option<bool>> {
            Ok(match path {
                "/proc/kcore" => Some(false),
                "/proc/acpi" => Some(true),
                _ => None,
            })
        }
        fn mountinfo(&self, _pid: i32) -> std::io::Result<String> {
            Ok("65 43 254:0 /b/rootfs / rw - ext4 /dev/vda rw\n\
                72 71 0:45 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                73 72 0:29 /c1 /sys/fs/cgroup/cpu,cpuacct ro - cgroup cgroup rw,cpu,cpuacct\n\
                81 72 0:37 /c1 /sys/fs/cgroup/systemd ro - cgroup cgroup rw,xattr,name=systemd\n\
                90 65 254:0 /srv/data /data rw - ext4 /dev/vda rw\n"
                .into())
        }
        fn fd_target(&self, _pid: i32, fd: i32) -> std::io::Result<String> {
            Ok(if fd == 0 {
                "/dev/null".into()
            } else {
                "pipe:[777]".into()
            })
        }
        fn net_devices(&self, _pid: i32) -> std::io::Result<Vec<String>> {
            Ok(vec!["lo".into()])
        }
    }

    fn container() -> RuncContainer {
        let raw = serde_json::json!({
            "init_process_pid": 4242, "init_process_start": 1,
            "cgroup_paths": {"freezer": "/sys/fs/cgroup/freezer/c1"},
            "config": {"rootfs": "/b/rootfs", "labels": ["bundle=/b"]}
        });
        RuncContainer::from_raw("c1", Path::new("s"), raw).unwrap()
    }

    fn keys(o: &CriuOpts) -> Vec<(String, String)> {
        o.ext_mnt
            .iter()
            .map(|m| (m.key().to_string(), m.val().to_string()))
            .collect()
    }

    #[test]
    fn dump_maps_bundle_like_runc() {
        let cfg = sample_config();
        let f = gather_dump_facts(&FakeHost, &cfg, &container()).unwrap();
        assert_eq!(f.masked_files, vec!["/proc/kcore"]);
        assert_eq!(f.descriptors, vec!["/dev/null", "pipe:[777]", "pipe:[777]"]);
        assert_eq!(
            f.cgroup_binds,
            vec![
                CgroupBind {
                    mountpoint: "/sys/fs/cgroup/cpu,cpuacct".into(),
                    controller: "cpu".into()
                },
                CgroupBind {
                    mountpoint: "/sys/fs/cgroup/systemd".into(),
                    controller: "name=systemd".into()
                },
            ]
        );
        let o = dump_options(&cfg, &f, &DumpSettings::default());
        assert_eq!(o.pid(), 4242);
        assert_eq!(o.root(), "/b/rootfs");
        assert_eq!(o.freeze_cgroup(), "/sys/fs/cgroup/freezer/c1");
        assert!(o.manage_cgroups() && o.notify_scripts() && o.orphan_pts_master());
        assert_eq!(o.external, vec!["net[4026532000]:extRootNetNS".to_string()]);
        let k = keys(&o);
        assert!(k.contains(&("/data".into(), "/data".into())));
        assert!(k.contains(&("/etc/hosts".into(), "/etc/hosts".into())));
        assert!(k.contains(&(
            "/sys/fs/cgroup/systemd".into(),
            "/sys/fs/cgroup/systemd".into()
        )));
        assert!(k.contains(&("/proc/kcore".into(), "/dev/null".into())));
        assert!(k.contains(&("/dev/fuse".into(), "/dev/fuse".into())));
        assert!(!k.iter().any(|(key, _)| key == "/proc/acpi"));
    }

    #[test]
    fn restore_maps_keys_to_this_hosts_sources() {
        let cfg = sample_config();
        let f = gather_dump_facts(&FakeHost, &cfg, &container()).unwrap();
        let meta = CheckpointMeta {
            format: 1,
            container: "c1".into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            criu_version: "4.2.1".into(),
            created: 0,
            leave_running: false,
            descriptors: f.descriptors.clone(),
            cgroup_binds: f.cgroup_binds.clone(),
            masked_files: f.masked_files.clone(),
            terminal: false,
            runc_state: serde_json::Value::Null,
            network_lock_skipped: false,
            net_sysctls: BTreeMap::new(),
            cgroup_settings: BTreeMap::new(),
            paused: false,
        };
        let mut cg = BTreeMap::new();
        cg.insert(
            "cpu".to_string(),
            "/sys/fs/cgroup/cpu,cpuacct/c2".to_string(),
        );
        cg.insert(
            "name=systemd".to_string(),
            "/sys/fs/cgroup/systemd/c2".to_string(),
        );
        let plan = restore_options(
            &cfg,
            &meta,
            Path::new("/run/ferry/x/criu-root"),
            &cg,
            &RestoreSettings::default(),
        )
        .unwrap();
        let o = &plan.opts;
        assert_eq!(o.root(), "/run/ferry/x/criu-root");
        assert!(o.rst_sibling() && o.evasive_devices());
        let k = keys(o);
        assert!(k.contains(&("/data".into(), "/srv/data".into())));
        assert!(k.contains(&("/etc/hosts".into(), "/b/hosts".into())));
        assert!(k.contains(&(
            "/sys/fs/cgroup/cpu,cpuacct".into(),
            "/sys/fs/cgroup/cpu,cpuacct/c2".into()
        )));
        assert!(k.contains(&("/dev/null".into(), "/dev/null".into())));
        assert_eq!(
            plan.inherit_ns,
            vec![(
                "extRootNetNS".to_string(),
                PathBuf::from("/var/run/netns/n1")
            )]
        );
        assert_eq!(o.join_ns.len(), 1);
        assert_eq!(
            (o.join_ns[0].ns(), o.join_ns[0].ns_file()),
            ("uts", "/proc/1/ns/uts")
        );
        let inh: Vec<_> = o
            .inherit_fd
            .iter()
            .map(|f| (f.key().to_string(), f.fd()))
            .collect();
        assert_eq!(
            inh,
            vec![("pipe:[777]".to_string(), 1), ("pipe:[777]".to_string(), 2)]
        );

        // The restore takes the lock the dump took: none when it skipped it.
        let iptables = RestoreSettings {
            network_lock: Some(CriuNetworkLockMethod::IPTABLES),
            ..Default::default()
        };
        let lock = |meta: &CheckpointMeta| {
            restore_options(&cfg, meta, Path::new("/r"), &cg, &iptables)
                .unwrap()
                .opts
                .network_lock()
        };
        assert_eq!(lock(&meta), CriuNetworkLockMethod::IPTABLES);
        let skipped = CheckpointMeta {
            network_lock_skipped: true,
            ..meta.clone()
        };
        assert_eq!(lock(&skipped), CriuNetworkLockMethod::SKIP);

        cg.remove("cpu");
        assert!(restore_options(
            &cfg,
            &meta,
            Path::new("/r"),
            &cg,
            &RestoreSettings::default()
        )
        .is_err());
    }

    #[test]
    fn net_dev_names() {
        let text = "Inter-|   Receive |  Transmit\n face |bytes    packets\n    \
                    lo: 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n  eth0: 1 2 0 0 0 0 0 0 3 4 0 0 0 0 0 0\n";
        assert_eq!(parse_net_dev(text), vec!["lo", "eth0"]);
        assert!(parse_net_dev("").is_empty());
    }

    /// The lock is skipped only for a namespace of the container's own with nothing but `lo`,
    /// and never when established connections are carried over; the restore follows the
    /// dump's choice whatever the host's method.
    #[test]
    fn network_lock_skipped_only_for_a_loopback_only_namespace() {
        let mut cfg = sample_config();
        let mut f = gather_dump_facts(&FakeHost, &cfg, &container()).unwrap();
        // sample_config's network namespace is given by path: never skipped.
        assert!(!f.loopback_only_netns);
        let iptables = DumpSettings {
            network_lock: Some(CriuNetworkLockMethod::IPTABLES),
            ..Default::default()
        };
        assert_eq!(
            dump_options(&cfg, &f, &iptables).network_lock(),
            CriuNetworkLockMethod::IPTABLES
        );
        for ns in cfg.namespaces.iter_mut() {
            if ns.kind == NsKind::Net {
                ns.path = None;
            }
        }
        f = gather_dump_facts(&FakeHost, &cfg, &container()).unwrap();
        assert!(f.loopback_only_netns);
        assert!(skips_network_lock(&f, &iptables));
        assert_eq!(
            dump_options(&cfg, &f, &iptables).network_lock(),
            CriuNetworkLockMethod::SKIP
        );
        let kept = DumpSettings {
            tcp_established: true,
            ..iptables.clone()
        };
        assert!(!skips_network_lock(&f, &kept));
        assert_eq!(
            dump_options(&cfg, &f, &kept).network_lock(),
            CriuNetworkLockMethod::IPTABLES
        );
        f.loopback_only_netns = false;
        assert!(!skips_network_lock(&f, &iptables));
    }

    #[test]
    fn cg_roots_per_controller() {
        let r = cgroup_roots("2:cpu,cpuacct:/c2\n9:name=systemd:/c2\n0::/c2\n");
        let v: Vec<_> = r
            .iter()
            .map(|c| (c.ctrl().to_string(), c.path().to_string()))
            .collect();
        assert_eq!(
            v,
            vec![
                ("cpu".into(), "/c2".into()),
                ("cpuacct".into(), "/c2".into()),
                ("name=systemd".into(), "/c2".into()),
                ("".into(), "/c2".into())
            ]
        );
    }

    #[test]
    fn mountinfo_escapes() {
        let m = parse_mountinfo("1 2 0:1 / /a\\040b rw - tmpfs t rw\n");
        assert_eq!(m[0].mountpoint, "/a b");
    }
}
