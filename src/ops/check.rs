//! `ferry check`: can checkpoint/restore work on this host, and what is missing.

use serde::Serialize;

use crate::criu::client::MIN_VERSION_TEXT;
use crate::criu::{Criu, Features};
use crate::runtime::runc::Runc;

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub ok: bool,
    pub criu_path: String,
    pub criu_version: Option<String>,
    pub features: Features,
    pub kernel: String,
    pub root: bool,
    pub capabilities: Vec<String>,
    pub iptables: bool,
    pub nftables: bool,
    pub runc_version: Option<String>,
    /// What prevents checkpoint/restore (empty when ok).
    pub missing: Vec<String>,
    /// What works but limits ferry (e.g. no dirty-memory tracking: no pre-copy).
    pub warnings: Vec<String>,
}

const NEEDED_CAPS: [caps::Capability; 3] = [
    caps::Capability::CAP_SYS_ADMIN,
    caps::Capability::CAP_SYS_PTRACE,
    caps::Capability::CAP_NET_ADMIN,
];

fn on_path(name: &str) -> bool {
    [
        "/usr/sbin",
        "/sbin",
        "/usr/bin",
        "/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
    ]
    .iter()
    .map(|d| std::path::Path::new(d).join(name))
    .chain(
        std::env::var_os("PATH")
            .map(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join(name))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default(),
    )
    .any(|p| p.is_file())
}

pub fn check(criu: &Criu) -> CheckReport {
    let mut missing = Vec::new();
    let mut warnings = Vec::new();
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let root = nix::unistd::geteuid().is_root();
    if !root {
        missing.push("root privileges".to_string());
    }
    let mut capabilities = Vec::new();
    for c in NEEDED_CAPS {
        if caps::has_cap(None, caps::CapSet::Effective, c).unwrap_or(false) {
            capabilities.push(c.to_string());
        } else {
            missing.push(format!("capability {c}"));
        }
    }
    if !caps::has_cap(
        None,
        caps::CapSet::Effective,
        caps::Capability::CAP_SYS_RESOURCE,
    )
    .unwrap_or(false)
    {
        warnings.push("no CAP_SYS_RESOURCE: CRIU cannot raise RLIMIT_NOFILE (containers with very many open files may fail)".into());
    }
    let mut criu_version = None;
    let mut features = Features::default();
    match criu.require_version() {
        Ok(v) => {
            criu_version = Some(v.to_string());
            match criu.features() {
                Ok(f) => features = f,
                Err(e) => missing.push(format!("CRIU feature check: {e}")),
            }
            if root {
                if let Err(e) = criu.check() {
                    missing.push(format!("criu check: {e}"));
                }
            }
        }
        Err(e) => missing.push(format!("CRIU >= {MIN_VERSION_TEXT}: {e}")),
    }
    if criu_version.is_some() && !features.mem_track {
        warnings.push("no dirty memory tracking (kernel without CONFIG_MEM_SOFT_DIRTY): pre-copy migration is unavailable".into());
    }
    if let (true, Err(w)) = (features.lazy_pages, crate::migrate::lazy_pages_ready()) {
        warnings.push(w);
    }
    if criu_version.is_some() && !features.lazy_pages {
        warnings.push("no lazy pages (userfaultfd): post-copy migration is unavailable".into());
    }
    let iptables = on_path("iptables-restore");
    let nftables = on_path("nft");
    if !iptables && !nftables {
        missing.push("iptables-restore or nft (CRIU's network lock)".into());
    }
    let runc_version = Runc::new(std::path::Path::new("/run/runc")).version().ok();
    if runc_version.is_none() {
        missing.push("runc".into());
    }
    CheckReport {
        ok: missing.is_empty(),
        criu_path: criu.path().display().to_string(),
        criu_version,
        features,
        kernel,
        root,
        capabilities,
        iptables,
        nftables,
        runc_version,
        missing,
        warnings,
    }
}
