//! The network sysctls of config.json (`linux.sysctl` keys under `net.`), which CRIU does not
//! carry.
//!
//! runc writes `linux.sysctl` into the container's namespaces when it creates the container.
//! CRIU restores the IPC and UTS ones with their namespaces, and of the network namespace
//! only a few (`net.ipv4.ping_group_range`, per-interface `conf`), so values such as Docker's
//! default `net.ipv4.ip_unprivileged_port_start=0` or `net.core.somaxconn` came back as the
//! kernel's defaults after a restore: a non-root server could no longer bind port 80. ferry
//! reads the current values of those keys in the container's network namespace at checkpoint
//! time (a value changed since the create is kept), stores them in `ferry.json`, and writes
//! them into the restored container's network namespace at `post-restore`, before the tasks
//! run again.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

/// Most entries accepted (from config.json, ferry.json or a peer).
pub const MAX_ENTRIES: usize = 64;
/// Longest value accepted (and read from /proc/sys).
pub const MAX_VALUE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("sysctl {key:?}: {why}")]
    Invalid { key: String, why: String },
    #[error("{0} network sysctls (at most {MAX_ENTRIES})")]
    TooMany(usize),
    #[error("network namespace of pid {pid}: {source}")]
    Netns { pid: i32, source: std::io::Error },
    #[error("sysctl {key}={value:?} in the network namespace of pid {pid}: {source}")]
    Write {
        key: String,
        value: String,
        pid: i32,
        source: std::io::Error,
    },
}

/// `net.` keys of config.json's `linux.sysctl` (all of them checked, in key order).
pub fn net_keys<'a>(
    sysctls: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<BTreeMap<String, String>, SysctlError> {
    let net: BTreeMap<String, String> = sysctls
        .into_iter()
        .filter(|(k, _)| k.starts_with("net."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    validate(&net)?;
    Ok(net)
}

/// Keys ferry can map onto `/proc/sys` (`net.` and then names of letters, digits, `_`, `-`,
/// separated by single dots), values without NUL and of bounded length.
pub fn validate(entries: &BTreeMap<String, String>) -> Result<(), SysctlError> {
    if entries.len() > MAX_ENTRIES {
        return Err(SysctlError::TooMany(entries.len()));
    }
    for (key, value) in entries {
        let bad = |why: &str| SysctlError::Invalid {
            key: key.chars().take(100).collect(),
            why: why.into(),
        };
        let parts_ok = key.len() <= 256
            && key.starts_with("net.")
            && key.split('.').all(|p| {
                !p.is_empty()
                    && p.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            });
        if !parts_ok {
            return Err(bad(
                "not a network sysctl ferry can carry (net.NAME.NAME…, names of letters, \
                 digits, '_' and '-')",
            ));
        }
        if value.len() > MAX_VALUE || value.contains('\0') {
            return Err(bad("value too long or with a NUL byte"));
        }
    }
    Ok(())
}

/// `/proc/sys/net/…` of a key.
fn proc_path(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

/// Runs `f` on a thread that joined the network namespace of `pid` (a `/proc/sys/net` file
/// opened there is that namespace's).
fn in_netns_of<T: Send>(
    pid: i32,
    f: impl FnOnce() -> Result<T, SysctlError> + Send,
) -> Result<T, SysctlError> {
    let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
    crate::net::on_ns_thread(&ns, f).map_err(|e| SysctlError::Netns {
        pid,
        source: match e {
            crate::net::NetError::Netns { source, .. } => source,
            other => std::io::Error::other(other.to_string()),
        },
    })?
}

/// The current values of `keys` in the network namespace of `pid`; a key that cannot be read
/// keeps the value given (config.json's).
pub fn read_in(
    pid: i32,
    keys: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, SysctlError> {
    if keys.is_empty() {
        return Ok(BTreeMap::new());
    }
    in_netns_of(pid, || {
        Ok(keys
            .iter()
            .map(|(k, given)| {
                let now = super::read_capped(&proc_path(k), MAX_VALUE as u64).map(|v| {
                    String::from_utf8_lossy(&v)
                        .trim_end_matches('\n')
                        .to_string()
                });
                match now {
                    Ok(v) => (k.clone(), v),
                    Err(e) => {
                        tracing::warn!("sysctl {k}: {e}; config.json's value is kept");
                        (k.clone(), given.clone())
                    }
                }
            })
            .collect())
    })
}

/// Writes `entries` into the network namespace of `pid`.
pub fn write_in(pid: i32, entries: &BTreeMap<String, String>) -> Result<(), SysctlError> {
    if entries.is_empty() {
        return Ok(());
    }
    validate(entries)?;
    in_netns_of(pid, || {
        for (key, value) in entries {
            let w = std::fs::OpenOptions::new()
                .write(true)
                .open(proc_path(key))
                .and_then(|mut f| f.write_all(value.as_bytes()));
            w.map_err(|source| SysctlError::Write {
                key: key.clone(),
                value: value.clone(),
                pid,
                source,
            })?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn only_network_keys_are_taken_and_checked() {
        let all = map(&[
            ("net.ipv4.ip_unprivileged_port_start", "0"),
            ("kernel.shmmax", "1"),
            ("net.ipv4.conf.eth0-1.rp_filter", "2"),
        ]);
        let net = net_keys(&all).unwrap();
        assert_eq!(
            net.keys().collect::<Vec<_>>(),
            [
                "net.ipv4.conf.eth0-1.rp_filter",
                "net.ipv4.ip_unprivileged_port_start"
            ]
        );
        assert_eq!(
            proc_path("net.ipv4.ping_group_range"),
            PathBuf::from("/proc/sys/net/ipv4/ping_group_range")
        );
        for bad in [
            "net..x",
            "net.ipv4/../../x",
            "net.",
            "net.a b",
            "net.ipv4.x\n",
        ] {
            assert!(net_keys(&map(&[(bad, "1")])).is_err(), "{bad:?}");
        }
        assert!(
            validate(&map(&[("kernel.x", "1")])).is_err(),
            "a peer's non-net key"
        );
        assert!(validate(&map(&[("net.core.x", "a\0b")])).is_err());
        let many: BTreeMap<String, String> = (0..=MAX_ENTRIES)
            .map(|i| (format!("net.core.k{i}"), "1".to_string()))
            .collect();
        assert!(matches!(validate(&many), Err(SysctlError::TooMany(65))));
    }
}
