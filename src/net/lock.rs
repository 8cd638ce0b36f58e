//! The network lock.
//!
//! On the source CRIU locks the container's namespace itself: with the namespace external
//! (given by path), CRIU still counts it as the dumped task's own (it differs from CRIU's),
//! so at `network-lock` it switches into it and installs its `CRIU` rules (iptables chain or
//! nftables table) that drop everything but its repair traffic. A failed dump unlocks
//! (`network-unlock`); a successful one leaves the rules and the tasks die, and ferry then
//! removes the whole namespace.
//!
//! On the destination the namespace is new and CRIU restores no rules into an external
//! namespace, so ferry locks it itself, before an address exists in it, with rules of its
//! own name ([`LOCK_NAME`]); they go when the restored container is committed (just before
//! CRIU unlocks and turns TCP repair off) or with the namespace on failure. Without this, a
//! packet of a migrating connection reaching the destination before its socket is restored
//! would be answered with a RST.
//!
//! The method follows the host: iptables when `iptables-restore` is there (CRIU's default),
//! otherwise nftables (`FERRY_NET_LOCK` overrides); the same choice is given to CRIU. With
//! iptables, ferry's lock goes into `ip6tables` too for a container with IPv6 addresses (CRIU
//! locks both families on the source); nftables' table of family `inet` holds both.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;

use super::{in_ns_cmd, joined, run, NetError};
use crate::pb::CriuNetworkLockMethod;

/// Name of ferry's lock chain (iptables) / table (nftables, family inet).
pub const LOCK_NAME: &str = "FERRY-LOCK";
/// CRIU's mark for its own repair traffic (libsoccr's SOCCR_MARK): let through like CRIU does.
const SOCCR_MARK: &str = "0xC114";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMethod {
    Iptables,
    Nftables,
}

impl LockMethod {
    pub fn name(self) -> &'static str {
        match self {
            LockMethod::Iptables => "iptables",
            LockMethod::Nftables => "nftables",
        }
    }

    pub fn criu(self) -> CriuNetworkLockMethod {
        match self {
            LockMethod::Iptables => CriuNetworkLockMethod::IPTABLES,
            LockMethod::Nftables => CriuNetworkLockMethod::NFTABLES,
        }
    }
}

pub(crate) fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

/// The method this host can use: iptables if present, else nftables, else none.
/// `FERRY_NET_LOCK=iptables|nftables` overrides the choice (both on a host that has both).
pub fn host_method() -> Option<LockMethod> {
    match std::env::var("FERRY_NET_LOCK").as_deref() {
        Ok("iptables") => return Some(LockMethod::Iptables),
        Ok("nftables") => return Some(LockMethod::Nftables),
        _ => {}
    }
    if on_path("iptables-restore") {
        Some(LockMethod::Iptables)
    } else if on_path("nft") {
        Some(LockMethod::Nftables)
    } else {
        None
    }
}

/// The rules that lock a namespace (input for `iptables-restore --noflush` / `nft -f -`).
pub fn lock_script(m: LockMethod) -> String {
    match m {
        LockMethod::Iptables => format!(
            "*filter\n:{n} - [0:0]\n-I INPUT -j {n}\n-I OUTPUT -j {n}\n\
             -A {n} -m mark --mark {SOCCR_MARK} -j ACCEPT\n-A {n} -j DROP\nCOMMIT\n",
            n = LOCK_NAME
        ),
        LockMethod::Nftables => format!(
            "table inet {n} {{\n\
             \tchain input {{ type filter hook input priority -300; policy drop; meta mark {SOCCR_MARK} accept; }}\n\
             \tchain output {{ type filter hook output priority -300; policy drop; meta mark {SOCCR_MARK} accept; }}\n}}\n",
            n = LOCK_NAME
        ),
    }
}

/// The rules that undo [`lock_script`].
pub fn unlock_script(m: LockMethod) -> String {
    match m {
        LockMethod::Iptables => format!(
            "*filter\n:{n} - [0:0]\n-D INPUT -j {n}\n-D OUTPUT -j {n}\n-X {n}\nCOMMIT\n",
            n = LOCK_NAME
        ),
        LockMethod::Nftables => format!("delete table inet {LOCK_NAME}\n"),
    }
}

/// The restore programs that take the lock script for `m`, each with the program that lists
/// its rules: iptables locks IPv4 with `iptables` and, with `ipv6`, IPv6 with `ip6tables`
/// (when the host has it); the nftables table of family `inet` covers both.
fn programs(m: LockMethod, ipv6: bool) -> Vec<(&'static str, &'static str)> {
    match m {
        LockMethod::Iptables => {
            let mut v = vec![("iptables-restore", "iptables")];
            if ipv6 && on_path("ip6tables-restore") {
                v.push(("ip6tables-restore", "ip6tables"));
            }
            v
        }
        LockMethod::Nftables => vec![("nft", "nft")],
    }
}

/// Whether the lock `m` can hold IPv6 on this host.
pub fn covers_ipv6(m: LockMethod) -> bool {
    m == LockMethod::Nftables || on_path("ip6tables-restore")
}

/// Feeds `script` to `prog` (`nft -f -`, or an `*tables-restore --noflush`) inside the
/// namespace at `netns`.
pub(crate) fn feed(netns: &Path, prog: &str, script: &str) -> Result<(), NetError> {
    let mut cmd = in_ns_cmd(netns, prog);
    if prog == "nft" {
        cmd.args(["-f", "-"]);
    } else {
        cmd.arg("--noflush");
    }
    let what = format!("{prog} in {}", netns.display());
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NetError::Command {
            what: what.clone(),
            why: e.to_string(),
        })?;
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(script.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| NetError::Command {
        what: what.clone(),
        why: e.to_string(),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Command {
            what,
            why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Locks the namespace at `netns`: nothing in or out but CRIU's repair traffic; IPv6 too
/// with `ipv6` (a container with IPv6 addresses: see [`covers_ipv6`]). Without IPv6
/// addresses there is nothing to hold there, and each table costs time in the freeze when
/// it is removed.
pub fn lock(netns: &Path, m: LockMethod, ipv6: bool) -> Result<(), NetError> {
    for (prog, _) in programs(m, ipv6) {
        feed(netns, prog, &lock_script(m))?;
    }
    tracing::debug!(netns = %netns.display(), method = m.name(), ipv6, "network locked");
    Ok(())
}

/// Removes ferry's lock (as [`lock`] made it) from the namespace; nothing to do where it is
/// not there. The tables are unlocked side by side: removing a chain takes ≈ 15 ms here, and
/// this runs while the restored container waits to resume.
pub fn unlock(netns: &Path, m: LockMethod, ipv6: bool) -> Result<(), NetError> {
    let one = |prog: &str, list: &str| -> Result<(), NetError> {
        if is_locked_by(netns, list)? {
            feed(netns, prog, &unlock_script(m))?;
        }
        Ok(())
    };
    let progs = programs(m, ipv6);
    std::thread::scope(|s| {
        let others: Vec<_> = progs[1..]
            .iter()
            .map(|&(prog, list)| s.spawn(move || one(prog, list)))
            .collect();
        let mut result = one(progs[0].0, progs[0].1);
        for h in others {
            result = result.and(joined(h, "unlock"));
        }
        result
    })?;
    tracing::debug!(netns = %netns.display(), method = m.name(), "network unlocked");
    Ok(())
}

/// Whether the rules listed by `list` (`iptables`, `ip6tables`, `nft`) hold ferry's lock.
fn is_locked_by(netns: &Path, list: &str) -> Result<bool, NetError> {
    let text = if list == "nft" {
        run(in_ns_cmd(netns, "nft").args(["list", "tables"]))?
    } else {
        run(in_ns_cmd(netns, list).args(["-S"]))?
    };
    Ok(text.contains(LOCK_NAME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_name_the_lock_and_let_criu_through() {
        for m in [LockMethod::Iptables, LockMethod::Nftables] {
            let l = lock_script(m);
            assert!(l.contains(LOCK_NAME) && l.contains(SOCCR_MARK), "{l}");
            assert!(unlock_script(m).contains(LOCK_NAME));
        }
        assert!(lock_script(LockMethod::Nftables).contains("policy drop"));
        assert!(lock_script(LockMethod::Iptables).contains("-j DROP"));
        assert_eq!(LockMethod::Nftables.criu(), CriuNetworkLockMethod::NFTABLES);
        // IPv4 only unless asked; nftables' inet table is both.
        assert_eq!(
            programs(LockMethod::Iptables, false),
            [("iptables-restore", "iptables")]
        );
        assert_eq!(programs(LockMethod::Nftables, true), [("nft", "nft")]);
        assert!(covers_ipv6(LockMethod::Nftables));
    }
}
