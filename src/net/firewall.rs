//! The container namespace's own firewall (a service mesh's interception rules, a
//! container's own filter), which CRIU does not carry for a namespace given by path.
//!
//! The source reads it with `iptables-save` and `ip6tables-save` inside the namespace (the
//! host's iptables, whichever backend; the backend travels with the rules and must match on
//! the destination). Tables of nftables that iptables did not make (any family `inet`,
//! `bridge`, `netdev`, or a name of its own) are not carried: such a namespace is refused, as
//! it would arrive without them. The destination restores the rules into the new namespace
//! before anything else is there, ferry's lock included (which then goes in front of them).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{in_ns_cmd, lock, run, NetError};

/// Largest `*-save` output carried, per family.
pub const MAX_RULES_TEXT: usize = 1024 * 1024;

/// The tables iptables (its nf_tables backend included) makes: families `ip`/`ip6`.
const IPTABLES_TABLES: [&str; 5] = ["filter", "nat", "mangle", "raw", "security"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Firewall {
    /// The iptables backend that saved the rules: `nf_tables` or `legacy`.
    pub backend: String,
    /// `iptables-save` output (empty: no IPv4 tables).
    pub v4: String,
    /// `ip6tables-save` output (empty: no IPv6 tables).
    pub v6: String,
}

/// The backend of this host's `iptables` (`iptables v1.8.9 (nf_tables)` → `nf_tables`).
fn host_backend() -> Option<String> {
    let v = run(std::process::Command::new("iptables").arg("--version")).ok()?;
    let inner = v.split_once('(')?.1.split_once(')')?.0;
    Some(inner.to_string())
}

/// Whether `*-save` output holds a table.
fn has_tables(save: &str) -> bool {
    save.lines().any(|l| l.starts_with('*'))
}

/// The nftables tables (`nft list tables` lines) that iptables did not make.
fn native_tables(listing: &str, backend: Option<&str>) -> Vec<String> {
    listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table "))
        .filter(|t| {
            let made_by_iptables = backend == Some("nf_tables")
                && matches!(
                    t.split_once(' '),
                    Some(("ip" | "ip6", name)) if IPTABLES_TABLES.contains(&name)
                );
            !made_by_iptables
        })
        .map(str::to_string)
        .collect()
}

/// Reads the firewall of the namespace at `netns`; None when it has no rules.
pub fn gather(netns: &Path) -> Result<Option<Firewall>, NetError> {
    let backend = host_backend();
    if lock::on_path("nft") {
        let tables = run(in_ns_cmd(netns, "nft").args(["list", "tables"]))?;
        let native = native_tables(&tables, backend.as_deref());
        if !native.is_empty() {
            return Err(NetError::Unsupported(format!(
                "the network namespace has nftables tables of its own ({}); ferry carries \
                 iptables rules only, and the container would arrive without them",
                native.join(", ")
            )));
        }
    }
    let Some(backend) = backend else {
        return Ok(None);
    };
    let save = |prog: &str| -> Result<String, NetError> {
        if !lock::on_path(prog) {
            return Ok(String::new());
        }
        let text = run(&mut in_ns_cmd(netns, prog))?;
        Ok(if has_tables(&text) {
            text
        } else {
            String::new()
        })
    };
    let fw = Firewall {
        backend,
        v4: save("iptables-save")?,
        v6: save("ip6tables-save")?,
    };
    Ok((!fw.v4.is_empty() || !fw.v6.is_empty()).then_some(fw))
}

impl Firewall {
    /// Sizes and a backend name, before anything is done with a peer's rules.
    pub fn validate(&self) -> Result<(), NetError> {
        if !matches!(self.backend.as_str(), "nf_tables" | "legacy") {
            return Err(NetError::Invalid(format!(
                "network facts: iptables backend {:?}",
                self.backend.chars().take(40).collect::<String>()
            )));
        }
        if self.v4.len() > MAX_RULES_TEXT || self.v6.len() > MAX_RULES_TEXT {
            return Err(NetError::Invalid(
                "network facts: firewall rules too large".into(),
            ));
        }
        Ok(())
    }

    /// Whether this host can restore the rules (an iptables of the same backend, and
    /// ip6tables for IPv6 rules); the reason when not.
    pub fn check_host(&self) -> Result<(), NetError> {
        let here = host_backend();
        if here.as_deref() != Some(self.backend.as_str()) {
            return Err(NetError::Unsupported(format!(
                "the container's namespace has iptables rules ({} backend) and this host's \
                 iptables is {}",
                self.backend,
                here.map_or("missing".into(), |b| format!("the {b} backend"))
            )));
        }
        if !self.v6.is_empty() && !lock::on_path("ip6tables-restore") {
            return Err(NetError::Unsupported(
                "the container's namespace has ip6tables rules and this host has no \
                 ip6tables-restore"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Restores the rules into the (new, empty) namespace at `netns`.
    pub fn apply(&self, netns: &Path) -> Result<(), NetError> {
        for (prog, text) in [
            ("iptables-restore", &self.v4),
            ("ip6tables-restore", &self.v6),
        ] {
            if !text.is_empty() {
                lock::feed(netns, prog, text)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_own_tables_are_not_native() {
        let listing = "table ip filter\ntable ip nat\ntable ip6 mangle\ntable inet mesh\n\
                       table ip custom\ntable bridge filter\n";
        assert_eq!(
            native_tables(listing, Some("nf_tables")),
            ["inet mesh", "ip custom", "bridge filter"]
        );
        // With the legacy backend every nftables table is the namespace's own.
        assert_eq!(native_tables("table ip filter\n", Some("legacy")).len(), 1);
        assert!(native_tables("", Some("nf_tables")).is_empty());
        assert!(has_tables(
            "# Generated\n*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n"
        ));
        assert!(!has_tables("# Generated by iptables-save\n"));
    }

    #[test]
    fn peer_rules_are_checked() {
        let mut f = Firewall {
            backend: "nf_tables".into(),
            v4: "*filter\nCOMMIT\n".into(),
            v6: String::new(),
        };
        f.validate().unwrap();
        f.backend = "bpf".into();
        assert!(f.validate().is_err());
        f.backend = "legacy".into();
        f.v6 = "x".repeat(MAX_RULES_TEXT + 1);
        assert!(f.validate().is_err());
    }
}
