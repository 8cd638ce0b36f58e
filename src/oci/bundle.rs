//! A bundle's `config.json`, read with `oci-spec` and reduced to what checkpoint/restore uses.
//!
//! Supported OCI fields (everything else in the spec is carried by CRIU's images as the running
//! container has it, or ignored because it only matters at creation):
//! - `root.path` (relative to the bundle or absolute), `root.readonly`;
//! - `mounts`: bind mounts (type `bind` or option `bind`/`rbind`) become CRIU external mounts;
//!   `cgroup` mounts on cgroup v1 are runc's per-controller bind mounts and are external too;
//!   proc, sysfs, tmpfs, devpts, mqueue and other kernel filesystems are dumped by CRIU;
//! - `linux.namespaces`: pid, network, ipc, uts, mount, cgroup; a `path` on net/pid makes
//!   the namespace external (restored by inheriting the namespace file), on ipc/uts/mnt it is
//!   joined on restore;
//! - `linux.maskedPaths` (files masked with /dev/null are external mounts), `linux.devices`;
//! - `process.terminal` (the pty master comes back through `orphan-pts-master`).
//!
//! Rejected with a clear error: user namespaces, a cgroup namespace given by path, OCI hooks
//! that a restore would have to run (prestart, createRuntime, createContainer, startContainer).

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};

use super::OciError;

pub const CONFIG_FILE: &str = "config.json";
/// Devices runc always creates in a container besides the spec's `linux.devices`.
pub const DEFAULT_DEVICES: [&str; 6] = [
    "/dev/null",
    "/dev/random",
    "/dev/full",
    "/dev/tty",
    "/dev/zero",
    "/dev/urandom",
];

/// The namespace kinds ferry deals with, named as CRIU names them.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum NsKind {
    Pid,
    Net,
    Ipc,
    Uts,
    Mnt,
    Cgroup,
    User,
    Time,
}

impl NsKind {
    /// CRIU's and /proc's name.
    pub fn name(self) -> &'static str {
        match self {
            NsKind::Pid => "pid",
            NsKind::Net => "net",
            NsKind::Ipc => "ipc",
            NsKind::Uts => "uts",
            NsKind::Mnt => "mnt",
            NsKind::Cgroup => "cgroup",
            NsKind::User => "user",
            NsKind::Time => "time",
        }
    }

    /// runc's key in state.json's namespace_paths.
    pub fn runc_key(self) -> &'static str {
        match self {
            NsKind::Pid => "NEWPID",
            NsKind::Net => "NEWNET",
            NsKind::Ipc => "NEWIPC",
            NsKind::Uts => "NEWUTS",
            NsKind::Mnt => "NEWNS",
            NsKind::Cgroup => "NEWCGROUP",
            NsKind::User => "NEWUSER",
            NsKind::Time => "NEWTIME",
        }
    }

    /// The key under which CRIU records an external namespace ("extRootNetNS", as runc does).
    pub fn external_key(self) -> String {
        let n = self.name();
        format!("extRoot{}{}NS", n[..1].to_uppercase(), &n[1..])
    }

    fn from_oci(t: LinuxNamespaceType) -> NsKind {
        match t {
            LinuxNamespaceType::Pid => NsKind::Pid,
            LinuxNamespaceType::Network => NsKind::Net,
            LinuxNamespaceType::Ipc => NsKind::Ipc,
            LinuxNamespaceType::Uts => NsKind::Uts,
            LinuxNamespaceType::Mount => NsKind::Mnt,
            LinuxNamespaceType::Cgroup => NsKind::Cgroup,
            LinuxNamespaceType::User => NsKind::User,
            LinuxNamespaceType::Time => NsKind::Time,
        }
    }
}

/// A namespace of the container: new, or given by path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub kind: NsKind,
    pub path: Option<PathBuf>,
}

/// A mount of the container as far as CRIU cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountKind {
    /// A bind mount from the host; `source` is absolute.
    Bind {
        source: PathBuf,
    },
    /// A `cgroup` mount (on cgroup v1: runc's per-controller bind mounts).
    Cgroup,
    Tmpfs,
    /// Any other kernel filesystem (proc, sysfs, devpts, mqueue…), dumped by CRIU itself.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub destination: String,
    pub kind: MountKind,
}

/// The parts of config.json that checkpoint and restore use.
#[derive(Debug, Clone)]
pub struct BundleConfig {
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    /// `root.readonly`.
    pub readonly: bool,
    /// `linux.sysctl` entries under `net.` (see [`super::sysctl`]).
    pub net_sysctls: std::collections::BTreeMap<String, String>,
    pub mounts: Vec<MountSpec>,
    pub namespaces: Vec<Namespace>,
    pub masked_paths: Vec<String>,
    pub devices: Vec<String>,
    pub terminal: bool,
}

impl BundleConfig {
    /// Loads `<bundle>/config.json` and checks it against what ferry supports.
    pub fn load(bundle: &Path) -> Result<BundleConfig, OciError> {
        let path = bundle.join(CONFIG_FILE);
        if !path.is_file() {
            return Err(OciError::Read {
                path,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no config.json in bundle",
                ),
            });
        }
        // config.json is bounded before the parser sees it.
        super::read_capped(&path, 16 * 1024 * 1024)?;
        let spec = Spec::load(&path).map_err(|source| OciError::Spec {
            path: path.clone(),
            source,
        })?;
        BundleConfig::from_spec(bundle, &path, &spec)
    }

    pub fn from_spec(bundle: &Path, path: &Path, spec: &Spec) -> Result<BundleConfig, OciError> {
        let unsupported = |what: String| OciError::Unsupported {
            path: path.to_path_buf(),
            what,
        };
        let root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .ok_or_else(|| unsupported("no root.path".into()))?;
        let readonly = spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false);
        let rootfs = if root.is_absolute() {
            root
        } else {
            bundle.join(root)
        };

        let mut mounts = Vec::new();
        for m in spec.mounts().as_deref().unwrap_or_default() {
            let destination = m.destination().to_string_lossy().into_owned();
            let opts = m.options().as_deref().unwrap_or_default();
            let typ = m.typ().as_deref().unwrap_or("");
            let is_bind = typ == "bind" || opts.iter().any(|o| o == "bind" || o == "rbind");
            let kind = if is_bind {
                let src = m.source().clone().ok_or_else(|| {
                    unsupported(format!("bind mount {destination} without a source"))
                })?;
                let source = if src.is_absolute() {
                    src
                } else {
                    bundle.join(src)
                };
                MountKind::Bind { source }
            } else {
                match typ {
                    "cgroup" | "cgroup2" => MountKind::Cgroup,
                    "tmpfs" => MountKind::Tmpfs,
                    _ => MountKind::Other,
                }
            };
            mounts.push(MountSpec { destination, kind });
        }

        let linux = spec.linux().as_ref();
        let mut namespaces = Vec::new();
        for ns in linux
            .and_then(|l| l.namespaces().as_ref())
            .into_iter()
            .flatten()
        {
            let kind = NsKind::from_oci(ns.typ());
            let path = ns.path().clone();
            match (kind, &path) {
                (NsKind::User, _) => {
                    return Err(unsupported(
                        "linux.namespaces: user namespaces are not supported".into(),
                    ))
                }
                (NsKind::Cgroup, Some(_)) => return Err(unsupported(
                    "linux.namespaces: a cgroup namespace given by path cannot be joined by CRIU"
                        .into(),
                )),
                _ => {}
            }
            namespaces.push(Namespace { kind, path });
        }

        if let Some(h) = spec.hooks() {
            let named = [
                ("prestart", h.prestart()),
                ("createRuntime", h.create_runtime()),
                ("createContainer", h.create_container()),
                ("startContainer", h.start_container()),
            ];
            if let Some((name, _)) = named
                .iter()
                .find(|(_, v)| v.as_ref().is_some_and(|v| !v.is_empty()))
            {
                return Err(unsupported(format!(
                    "hooks.{name}: ferry does not run OCI hooks on restore"
                )));
            }
        }

        let net_sysctls = super::sysctl::net_keys(
            linux
                .and_then(|l| l.sysctl().as_ref())
                .into_iter()
                .flatten(),
        )
        .map_err(|e| unsupported(format!("linux.sysctl: {e}")))?;
        let masked_paths = linux
            .and_then(|l| l.masked_paths().clone())
            .unwrap_or_default();
        let mut devices: Vec<String> = DEFAULT_DEVICES.iter().map(|s| s.to_string()).collect();
        for d in linux
            .and_then(|l| l.devices().as_ref())
            .into_iter()
            .flatten()
        {
            let p = d.path().to_string_lossy().into_owned();
            if !devices.contains(&p) {
                devices.push(p);
            }
        }
        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        Ok(BundleConfig {
            bundle: bundle.to_path_buf(),
            rootfs,
            readonly,
            net_sysctls,
            mounts,
            namespaces,
            masked_paths,
            devices,
            terminal,
        })
    }

    /// Whether CRIU can restore this root: it pivots into the restored root through a
    /// directory there, `/tmp` if it exists, else one it makes, which a read-only root does
    /// not allow. A read-only rootfs without `/tmp` could be checkpointed but never restored,
    /// so it is refused before anything is done.
    pub fn check_restorable_root(&self) -> Result<(), OciError> {
        if self.readonly && !self.rootfs.join("tmp").is_dir() {
            return Err(OciError::Unsupported {
                path: self.bundle.join(CONFIG_FILE),
                what: format!(
                    "root.readonly with no /tmp directory in {}: CRIU could not restore it (it \
                     pivots through a directory it must find or make there); add an empty \
                     /tmp to the image, or use a writable root",
                    self.rootfs.display()
                ),
            });
        }
        Ok(())
    }

    pub fn namespace(&self, kind: NsKind) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.kind == kind)
    }

    pub fn binds(&self) -> impl Iterator<Item = (&str, &Path)> {
        self.mounts.iter().filter_map(|m| match &m.kind {
            MountKind::Bind { source } => Some((m.destination.as_str(), source.as_path())),
            _ => None,
        })
    }

    /// The host path of the file at `path` in the container when a bind mount brings it
    /// (the deepest bind mount whose destination holds it); None for a path elsewhere (the
    /// rootfs, a tmpfs), and for one that is not absolute or has `.` or `..` components.
    pub fn bind_source_of(&self, path: &str) -> Option<PathBuf> {
        use std::path::Component;
        let path = Path::new(path);
        let mut parts = path.components();
        if parts.next() != Some(Component::RootDir)
            || !parts.all(|c| matches!(c, Component::Normal(_)))
        {
            return None;
        }
        self.binds()
            .filter_map(|(dest, source)| Some((dest, source, path.strip_prefix(dest).ok()?)))
            .max_by_key(|(dest, _, _)| Path::new(dest).components().count())
            .map(|(_, source, rest)| source.join(rest))
    }

    pub fn tmpfs_destinations(&self) -> Vec<&str> {
        self.mounts
            .iter()
            .filter(|m| m.kind == MountKind::Tmpfs)
            .map(|m| m.destination.as_str())
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A config like `runc spec` writes, with a bind mount and a netns path.
    pub fn sample_spec_json() -> serde_json::Value {
        serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"terminal": false, "user": {"uid": 0, "gid": 0}, "args": ["sh"], "cwd": "/"},
            "root": {"path": "rootfs", "readonly": false},
            "hostname": "t",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
                {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["ro"]},
                {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "rw"]},
                {"destination": "/etc/hosts", "source": "hosts", "options": ["bind", "ro"]}
            ],
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/n1"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts", "path": "/proc/1/ns/uts"}],
                "maskedPaths": ["/proc/kcore", "/proc/acpi"],
                "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}]
            }
        })
    }

    pub fn sample_config() -> BundleConfig {
        let spec: Spec = serde_json::from_value(sample_spec_json()).unwrap();
        BundleConfig::from_spec(Path::new("/b"), Path::new("/b/config.json"), &spec).unwrap()
    }

    #[test]
    fn mounts_and_namespaces_are_classified() {
        let c = sample_config();
        assert_eq!(c.rootfs, PathBuf::from("/b/rootfs"));
        let binds: Vec<_> = c.binds().collect();
        assert_eq!(
            binds,
            vec![
                ("/data", Path::new("/srv/data")),
                ("/etc/hosts", Path::new("/b/hosts"))
            ]
        );
        assert_eq!(
            c.namespace(NsKind::Net).unwrap().path,
            Some(PathBuf::from("/var/run/netns/n1"))
        );
        assert_eq!(c.tmpfs_destinations(), vec!["/dev"]);
        assert!(c.devices.contains(&"/dev/fuse".to_string()));
        assert_eq!(NsKind::Net.external_key(), "extRootNetNS");
        assert_eq!(NsKind::Pid.external_key(), "extRootPidNS");
    }

    #[test]
    fn a_bind_mounted_path_has_its_host_source() {
        let mut v = sample_spec_json();
        v["mounts"].as_array_mut().unwrap().push(serde_json::json!(
            {"destination": "/data/cache", "type": "bind", "source": "/fast/cache", "options": ["rbind"]}
        ));
        let spec: Spec = serde_json::from_value(v).unwrap();
        let c =
            BundleConfig::from_spec(Path::new("/b"), Path::new("/b/config.json"), &spec).unwrap();
        let of = |p: &str| c.bind_source_of(p);
        assert_eq!(
            of("/data/db/LOCK"),
            Some(PathBuf::from("/srv/data/db/LOCK"))
        );
        assert_eq!(of("/data"), Some(PathBuf::from("/srv/data")));
        assert_eq!(of("/data/cache/x"), Some(PathBuf::from("/fast/cache/x")));
        assert_eq!(of("/etc/hosts"), Some(PathBuf::from("/b/hosts")));
        assert_eq!(
            of("/database/x"),
            None,
            "a name that only starts like /data"
        );
        for not_bound in ["/tmp/app.lock", "/dev/shm/x", "/"] {
            assert_eq!(of(not_bound), None, "{not_bound}");
        }
        for odd in ["data/x", "/data/../etc/shadow", "/data/x/..", ""] {
            assert_eq!(of(odd), None, "{odd}");
        }
    }

    #[test]
    fn user_namespaces_and_hooks_are_rejected() {
        let mut v = sample_spec_json();
        v["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"type": "user"}));
        let spec: Spec = serde_json::from_value(v).unwrap();
        let e = BundleConfig::from_spec(Path::new("/b"), Path::new("/b/config.json"), &spec)
            .unwrap_err();
        assert!(e.to_string().contains("user namespaces"), "{e}");

        let mut v = sample_spec_json();
        v["hooks"] = serde_json::json!({"prestart": [{"path": "/bin/true"}]});
        let spec: Spec = serde_json::from_value(v).unwrap();
        let e = BundleConfig::from_spec(Path::new("/b"), Path::new("/b/config.json"), &spec)
            .unwrap_err();
        assert!(e.to_string().contains("hooks.prestart"), "{e}");
    }
}
