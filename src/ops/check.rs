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
    /// The cgroup layout: "v1" (v1 controllers, possibly with cgroup2 at `unified/`) or "v2"
    /// (v2 only); migrations go only between hosts of the same layout.
    pub cgroups: &'static str,
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
        warnings.push(
            "no CAP_SYS_RESOURCE: containers running as another user than ferry cannot be \
             checkpointed (CRIU cannot read their resource limits), and CRIU cannot raise \
             RLIMIT_NOFILE (containers with very many open files may fail)"
                .into(),
        );
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
    if criu_version.is_some() {
        if let Some(w) = kdat_cache_warning(criu.path()) {
            warnings.push(w);
        }
    }
    let iptables = on_path("iptables-restore");
    let nftables = on_path("nft");
    if !iptables && !nftables {
        missing.push("iptables-restore or nft (CRIU's network lock)".into());
    }
    if let Some(m) = crate::net::lock::host_method() {
        if !crate::net::lock::covers_ipv6(m) {
            warnings.push(ipv6_lock_warning(m));
        }
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
        cgroups: crate::runtime::cgroups::host_layout(),
        missing,
        warnings,
    }
}

/// The network lock this host would use cannot hold IPv6 (iptables without ip6tables).
fn ipv6_lock_warning(m: crate::net::lock::LockMethod) -> String {
    format!(
        "the network lock ({}) has no ip6tables-restore: containers with IPv6 addresses \
         cannot migrate to or from here with network continuity",
        m.name()
    )
}

/// CRIU keeps what it learnt about the kernel in `<RUNDIR>/criu.kdat` (RUNDIR is compiled in,
/// `/run` by default) and only on a tmpfs; without it every CRIU run probes the kernel again,
/// ≈ 40–80 ms on the development VM, inside a restore and so inside a migration's downtime.
/// The directory is read from the binary; no warning when it cannot be found.
fn kdat_cache_warning(criu: &std::path::Path) -> Option<String> {
    const MAX_BINARY: u64 = 64 * 1024 * 1024;
    let bin = crate::capped::read_capped(criu, MAX_BINARY).ok()?;
    let dir = kdat_cache_dir(&bin)?;
    let on_tmpfs = nix::sys::statfs::statfs(dir.as_path())
        .map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        .unwrap_or(false);
    (!on_tmpfs).then(|| {
        format!(
            "{} is not a tmpfs, so CRIU cannot keep its kernel-facts cache there and probes the \
             kernel on every run (tens of ms per restore); vendor/criu/install.sh builds CRIU \
             for a tmpfs of its own on such hosts",
            dir.display()
        )
    })
}

/// The directory of the absolute `…/criu.kdat` path string compiled into a CRIU binary.
fn kdat_cache_dir(bin: &[u8]) -> Option<std::path::PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    const NAME: &[u8] = b"/criu.kdat\0";
    let at = bin.windows(NAME.len()).position(|w| w == NAME)?;
    let start = bin[..at].iter().rposition(|&b| b == 0).map_or(0, |i| i + 1);
    let dir = &bin[start..at];
    (dir.first() == Some(&b'/') && dir.iter().all(|b| b.is_ascii_graphic()))
        .then(|| std::path::PathBuf::from(std::ffi::OsStr::from_bytes(dir)))
}

#[cfg(test)]
mod tests {
    use super::kdat_cache_dir;
    use std::path::Path;

    #[test]
    fn finds_the_compiled_in_cache_directory() {
        let bin = b"\x7fELF\0junk\0/run/criu/criu.kdat\0/run/criu/criu.kdat.tmp\0more\0";
        assert_eq!(kdat_cache_dir(bin).as_deref(), Some(Path::new("/run/criu")));
        let bin = b"abc\0/run/criu.kdat\0";
        assert_eq!(kdat_cache_dir(bin).as_deref(), Some(Path::new("/run")));
        assert_eq!(kdat_cache_dir(b"no such string\0"), None);
        // A relative or odd string is not taken for a path.
        assert_eq!(kdat_cache_dir(b"\0criu.kdat\0"), None);
        assert_eq!(kdat_cache_dir(b"\0%s/criu.kdat\0"), None);
    }
}
