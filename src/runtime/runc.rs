//! Handing a restored container back to runc.
//!
//! runc 1.1 keeps a container's state in `<root>/<id>/state.json` and trusts it once the init
//! pid is alive with the recorded start time (field 22 of /proc/<pid>/stat). ferry keeps the
//! state from checkpoint time and patches what the restore changed: id, init pid and start
//! time, creation time, namespace paths (recomputed from the pid), stdio descriptors, cgroup
//! paths, and host paths that moved with the bundle. runc then lists, execs into, signals,
//! deletes and checkpoints the container as if it had started it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::{io_err, RuntimeError};
use crate::oci::state::{RuncRoot, STATE_FILE};
use crate::oci::write_atomic;

/// What changed for a restored container.
#[derive(Debug, Clone)]
pub struct Adoption<'a> {
    pub id: &'a str,
    pub pid: i32,
    pub start_time: u64,
    pub bundle: &'a Path,
    pub old_bundle: &'a Path,
    pub rootfs: &'a Path,
    pub cgroup_paths: &'a BTreeMap<String, String>,
    pub descriptors: Vec<String>,
    pub created: String,
}

/// /proc name of a runc namespace key.
fn ns_proc_name(runc_key: &str) -> Option<&'static str> {
    Some(match runc_key {
        "NEWNS" => "mnt",
        "NEWNET" => "net",
        "NEWPID" => "pid",
        "NEWIPC" => "ipc",
        "NEWUTS" => "uts",
        "NEWUSER" => "user",
        "NEWCGROUP" => "cgroup",
        "NEWTIME" => "time",
        _ => return None,
    })
}

fn rebase(s: &str, old: &Path, new: &Path) -> Option<String> {
    let rest = Path::new(s).strip_prefix(old).ok()?;
    Some(new.join(rest).to_string_lossy().into_owned())
}

/// runc's state for the restored container, from the checkpoint-time state.
pub fn adopted_state(template: &Value, a: &Adoption) -> Value {
    let mut s = template.clone();
    let old_id = s["id"].as_str().unwrap_or_default().to_string();
    s["id"] = Value::from(a.id);
    s["init_process_pid"] = Value::from(a.pid);
    s["init_process_start"] = Value::from(a.start_time);
    s["created"] = Value::from(a.created.clone());
    s["cgroup_paths"] = serde_json::to_value(a.cgroup_paths).unwrap_or(Value::Null);
    s["external_descriptors"] = Value::from(a.descriptors.clone());
    if let Some(ns) = s["namespace_paths"].as_object_mut() {
        for (k, v) in ns.iter_mut() {
            if let Some(name) = ns_proc_name(k) {
                *v = Value::from(format!("/proc/{}/ns/{name}", a.pid));
            }
        }
    }
    let c = &mut s["config"];
    c["rootfs"] = Value::from(a.rootfs.to_string_lossy().into_owned());
    if let Some(labels) = c["labels"].as_array_mut() {
        for l in labels.iter_mut() {
            if l.as_str().is_some_and(|x| x.starts_with("bundle=")) {
                *l = Value::from(format!("bundle={}", a.bundle.display()));
            }
        }
    }
    if c["cgroups"]["name"].as_str() == Some(old_id.as_str()) {
        c["cgroups"]["name"] = Value::from(a.id);
    }
    if a.bundle != a.old_bundle {
        if let Some(mounts) = c["mounts"].as_array_mut() {
            for m in mounts {
                if let Some(new) = m["source"]
                    .as_str()
                    .and_then(|src| rebase(src, a.old_bundle, a.bundle))
                {
                    m["source"] = Value::from(new);
                }
            }
        }
    }
    s
}

/// Writes the state for `id`, creating `<root>/<id>` (0711) if needed.
pub fn write_state(root: &RuncRoot, id: &str, state: &Value) -> Result<(), RuntimeError> {
    let dir = root.container_dir(id);
    if !dir.exists() {
        std::fs::create_dir(&dir).map_err(io_err("create", &dir))?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711));
    }
    let data = serde_json::to_vec(state).unwrap_or_default();
    write_atomic(&dir.join(STATE_FILE), &data, 0o600)?;
    Ok(())
}

/// RFC 3339 UTC timestamp with nanoseconds (what runc writes).
pub fn rfc3339_now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d.as_secs(), d.subsec_nanos())
}

pub fn rfc3339(secs: u64, nanos: u32) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // civil-from-days (proleptic Gregorian)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The runc binary for one state root.
#[derive(Debug, Clone)]
pub struct Runc {
    bin: PathBuf,
    root: PathBuf,
}

impl Runc {
    /// `$FERRY_RUNC` or `runc` from PATH.
    pub fn new(root: &Path) -> Runc {
        let bin = std::env::var_os("FERRY_RUNC")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("runc"));
        Runc {
            bin,
            root: root.to_path_buf(),
        }
    }

    fn run(&self, args: &[&str]) -> Result<String, RuntimeError> {
        let out = Command::new(&self.bin)
            .arg("--root")
            .arg(&self.root)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| RuntimeError::Runc {
                args: args.join(" "),
                why: e.to_string(),
            })?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(RuntimeError::Runc {
                args: args.join(" "),
                why: err.lines().last().unwrap_or("failed").trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `runc delete` of a stopped container (removes its state and cgroups).
    pub fn delete(&self, id: &str) -> Result<(), RuntimeError> {
        self.run(&["delete", id]).map(|_| ())
    }

    /// `runc --version`'s first line's version ("1.1.5+ds1").
    pub fn version(&self) -> Result<String, RuntimeError> {
        let out = Command::new(&self.bin)
            .arg("--version")
            .output()
            .map_err(|e| RuntimeError::Runc {
                args: "--version".into(),
                why: e.to_string(),
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or("unknown")
            .to_string())
    }
}

/// Major and minor of a runc version as `runc --version` gives it ("1.1.5+ds1" → (1, 1)).
fn minor_version(v: &str) -> Option<(u32, u32)> {
    let mut parts = v.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Whether this host's runc (`mine`, from [`Runc::version`]) can take over a container the
/// runc `theirs` ran: it must be there, and not of an older minor release (its state file
/// and cgroup handling change between those; patch releases keep them). A version that
/// does not parse is not compared.
pub fn check_adoptable(mine: &str, theirs: &str) -> Result<(), String> {
    let Some(m) = minor_version(mine) else {
        return Err(format!(
            "this host's runc gives no version ({mine:?}); set FERRY_RUNC or put runc in PATH"
        ));
    };
    match minor_version(theirs) {
        Some(t) if m < t => Err(format!(
            "this host's runc {mine} is older than the source's {theirs} (a runc of an older \
             minor release may not take over a container a newer one ran)"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runc_takes_over_from_its_own_or_an_older_minor_release() {
        assert_eq!(minor_version("1.1.5+ds1"), Some((1, 1)));
        assert_eq!(minor_version("1.2.0-rc.1"), Some((1, 2)));
        assert_eq!(minor_version("unknown"), None);
        check_adoptable("1.1.5+ds1", "1.1.12").unwrap();
        check_adoptable("1.2.0", "1.1.5+ds1").unwrap();
        check_adoptable("1.1.5", "unknown").unwrap();
        let e = check_adoptable("1.0.0", "1.1.5+ds1").unwrap_err();
        assert!(
            e.contains("runc 1.0.0 is older than the source's 1.1.5+ds1"),
            "{e}"
        );
        let e = check_adoptable("unknown", "1.1.5").unwrap_err();
        assert!(e.contains("no version"), "{e}");
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(1_795_392_000, 5), "2026-11-23T00:00:00.000000005Z");
        assert_eq!(rfc3339(951_782_400, 0), "2000-02-29T00:00:00.000000000Z");
    }

    #[test]
    fn adopted_state_patches_what_changed() {
        let t = serde_json::json!({
            "id": "c1", "init_process_pid": 10, "init_process_start": 5, "created": "x",
            "cgroup_paths": {"cpu": "/sys/fs/cgroup/cpu/c1"},
            "namespace_paths": {"NEWNET": "/proc/10/ns/net", "NEWNS": "/proc/10/ns/mnt"},
            "external_descriptors": ["/dev/null", "pipe:[1]", "pipe:[1]"],
            "config": {"rootfs": "/old/rootfs", "labels": ["bundle=/old", "other=1"],
                       "cgroups": {"name": "c1"},
                       "mounts": [{"source": "/old/data", "destination": "/data"}, {"source": "proc"}]}
        });
        let mut cg = BTreeMap::new();
        cg.insert("cpu".to_string(), "/sys/fs/cgroup/cpu/c2".to_string());
        let s = adopted_state(
            &t,
            &Adoption {
                id: "c2",
                pid: 99,
                start_time: 1234,
                bundle: Path::new("/new"),
                old_bundle: Path::new("/old"),
                rootfs: Path::new("/new/rootfs"),
                cgroup_paths: &cg,
                descriptors: vec!["/dev/null".into(), "pipe:[2]".into(), "pipe:[2]".into()],
                created: "2026-01-01T00:00:00.000000000Z".into(),
            },
        );
        assert_eq!(s["id"], "c2");
        assert_eq!(s["init_process_pid"], 99);
        assert_eq!(s["init_process_start"], 1234);
        assert_eq!(s["namespace_paths"]["NEWNET"], "/proc/99/ns/net");
        assert_eq!(s["namespace_paths"]["NEWNS"], "/proc/99/ns/mnt");
        assert_eq!(s["cgroup_paths"]["cpu"], "/sys/fs/cgroup/cpu/c2");
        assert_eq!(s["external_descriptors"][1], "pipe:[2]");
        assert_eq!(s["config"]["rootfs"], "/new/rootfs");
        assert_eq!(s["config"]["labels"][0], "bundle=/new");
        assert_eq!(s["config"]["labels"][1], "other=1");
        assert_eq!(s["config"]["cgroups"]["name"], "c2");
        assert_eq!(s["config"]["mounts"][0]["source"], "/new/data");
        assert_eq!(s["config"]["mounts"][1]["source"], "proc");
    }
}
