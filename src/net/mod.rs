//! Network continuity for containers whose network namespace is given by path (CNI style).
//!
//! - [`facts`]: what the source's namespace looks like (interfaces, MACs, addresses, routes),
//!   read with `ip -j` inside it, carried to the destination in the Prepare message,
//! - [`firewall`]: the namespace's own iptables rules, carried with the facts,
//! - [`lock`]: the network lock (iptables or nftables, whichever the host has): the method
//!   CRIU uses on the source, and ferry's own lock of the destination namespace from its
//!   creation until the restored container may run,
//! - [`arp`]: raw ARP frames: the clash probe (RFC 5227) and the gratuitous announcement,
//! - [`ndp`]: the same for IPv6 (neighbour solicitations as in duplicate address detection,
//!   unsolicited neighbour advertisements),
//! - [`dest`]: the destination's namespace: the built-in setup (veth into a bridge) or a
//!   user's `--netns-hook`, the clash check, unlock, announcement, removal.

pub mod arp;
pub mod dest;
pub mod facts;
pub mod firewall;
pub mod lock;
pub mod ndp;
mod packet;

use crate::runtime::last_line;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{what}: {why}")]
    Command { what: String, why: String },
    #[error("network namespace {path}: {source}")]
    Netns {
        path: String,
        source: std::io::Error,
    },
    #[error("reading the network facts: {0}")]
    Facts(String),
    #[error("address {addr} is already in use on the destination (answered by {mac})")]
    Clash { addr: String, mac: String },
    #[error("{proto} on {ifname}: {source}")]
    Packet {
        proto: &'static str,
        ifname: String,
        source: std::io::Error,
    },
    #[error("--netns-hook {prog} {action} (interface {ifname}): {why}")]
    Hook {
        prog: String,
        action: &'static str,
        ifname: String,
        why: String,
    },
    #[error("{0}")]
    Invalid(String),
    /// What this namespace holds that ferry cannot carry.
    #[error("{0}")]
    Unsupported(String),
}

/// Largest output accepted from `ip -j` or a hook.
const MAX_OUTPUT: usize = 1024 * 1024;

/// Runs a command to completion; its stdout on success, the last stderr line otherwise.
pub(crate) fn run(cmd: &mut Command) -> Result<String, NetError> {
    let what = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| NetError::Command {
            what: what.clone(),
            why: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(NetError::Command {
            what,
            why: format!(
                "{} {}",
                out.status,
                last_line(&out.stderr).unwrap_or_default()
            ),
        });
    }
    if out.stdout.len() > MAX_OUTPUT {
        return Err(NetError::Command {
            what,
            why: "output too large".into(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `nsenter --net=<path> -- <prog> <args…>`: a program inside a network namespace given by
/// path (only the network namespace changes).
pub(crate) fn in_ns_cmd(netns: &Path, prog: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", netns.display()))
        .arg("--")
        .arg(prog);
    c
}

/// Runs `f` on a thread that joined the network namespace at `netns` (sockets it creates
/// live there; the calling thread is untouched).
pub(crate) fn on_ns_thread<T: Send>(
    netns: &Path,
    f: impl FnOnce() -> T + Send,
) -> Result<T, NetError> {
    let file = std::fs::File::open(netns).map_err(|source| NetError::Netns {
        path: netns.display().to_string(),
        source,
    })?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: `file` is an open namespace file kept alive for the call; setns only
            // changes the network namespace of this short-lived thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(NetError::Netns {
                    path: netns.display().to_string(),
                    source: std::io::Error::last_os_error(),
                });
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err(NetError::Invalid("network thread panicked".into())))
    })
}

/// The result of a scoped helper thread (`what` names it should it have panicked).
pub(crate) fn joined<T>(
    h: std::thread::ScopedJoinHandle<'_, Result<T, NetError>>,
    what: &str,
) -> Result<T, NetError> {
    h.join()
        .unwrap_or_else(|_| Err(NetError::Invalid(format!("{what} thread panicked"))))
}

/// Runs `a` on this thread and `b` on a helper (which starts in this thread's network
/// namespace) at the same time: the IPv4 and IPv6 halves of a probe or an announcement.
pub(crate) fn side_by_side<A, B: Send>(
    a: impl FnOnce() -> Result<A, NetError>,
    b: impl FnOnce() -> Result<B, NetError> + Send,
    what_b: &str,
) -> (Result<A, NetError>, Result<B, NetError>) {
    std::thread::scope(|s| {
        let hb = s.spawn(b);
        let ra = a();
        (ra, joined(hb, what_b))
    })
}

/// The path of the container's network namespace when config.json gives one.
pub fn netns_path(cfg: &crate::oci::bundle::BundleConfig) -> Option<std::path::PathBuf> {
    cfg.namespaces
        .iter()
        .find(|n| n.kind == crate::oci::bundle::NsKind::Net)
        .and_then(|n| n.path.clone())
}

/// Established TCP connections in the network namespace of `pid` (IPv4 and IPv6), from
/// /proc/<pid>/net/tcp{,6} (state `01`), counted on a thread: the tables are opened now (an
/// open table keeps its namespace), read there. Reading one walks the kernel's whole TCP
/// hash table, ≈ 5 ms here: too long for a migration's freeze, where the count is taken.
pub fn established_tcp_in_background(pid: i32) -> std::thread::JoinHandle<u64> {
    let files: Vec<std::fs::File> = ["tcp", "tcp6"]
        .iter()
        .filter_map(|f| std::fs::File::open(format!("/proc/{pid}/net/{f}")).ok())
        .collect();
    std::thread::spawn(move || {
        files
            .into_iter()
            .map(|f| count_established(std::io::BufReader::new(f)))
            .sum()
    })
}

/// Lines of a /proc/net/tcp table whose state column is `01` (ESTABLISHED), read line by
/// line: the table has a line per socket of the container, which holds as many as it likes.
/// A read error ends the count.
pub fn count_established(table: impl std::io::BufRead) -> u64 {
    table
        .lines()
        .skip(1)
        .map_while(Result::ok)
        .filter(|l| l.split_whitespace().nth(3) == Some("01"))
        .count() as u64
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_established_rows() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue\n\
                 0: 0100000A:1F90 00000000:0000 0A 00000000:00000000\n\
                 1: 0100000A:1F90 6400000A:D1C2 01 00000000:00000000\n\
                 2: 0100000A:1F90 6400000A:D1C4 01 00000000:00000000\n\
                 3: 0100000A:1F90 6400000A:D1C6 06 00000000:00000000\n";
        assert_eq!(super::count_established(t.as_bytes()), 2);
    }
}
