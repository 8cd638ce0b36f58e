//! ferry and containerd: where the shim keeps runc's state for one containerd, and the two
//! ends of migrating a containerd task (see docs/ARCHITECTURE.md, "Migrating a containerd
//! task").
//!
//! - The shim's runc root is derived from containerd's address and the namespace, so
//!   `ferry migrate --containerd` and `ferry serve --containerd` find it from the same two
//!   facts containerd gives the shim.
//! - The destination (`ferry serve --containerd`) receives and restores the container with
//!   the unchanged migration engine into that runc root, leaves an adoption marker next to
//!   runc's state and asks containerd (through `ctr`) to run a container with the received
//!   spec under the ferry shim; the shim's Create finds the marker and adopts the running
//!   container instead of creating one.
//! - The source (`ferry migrate --containerd`) migrates the task from that runc root, then
//!   deletes the stopped task and its container from the source containerd.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The adoption marker's file name inside `<runc root>/<id>/` (runc ignores other files).
pub const ADOPT_MARKER: &str = "ferry-adopt.json";

/// runc's state root for the ferry shims of one containerd and namespace.
pub fn runc_root(address: &str, namespace: &str) -> PathBuf {
    let address = address.trim_start_matches("unix://");
    let digest = Sha256::digest(address.as_bytes());
    let tag: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    Path::new("/run/ferry/containerd").join(tag).join(namespace)
}

/// Marks `<root>/<id>` (a running container runc knows) for adoption by the shim.
pub fn mark_for_adoption(root: &Path, id: &str, pid: i32) -> std::io::Result<()> {
    let path = root.join(id).join(ADOPT_MARKER);
    std::fs::write(path, serde_json::json!({ "pid": pid }).to_string())
}

/// Takes (removes) the adoption marker of `<root>/<id>`; the pid it names if there was one.
pub fn take_adoption(root: &Path, id: &str) -> Option<i32> {
    use std::io::Read;
    let path = root.join(id).join(ADOPT_MARKER);
    let mut text = String::new();
    let read = std::fs::File::open(&path).and_then(|f| f.take(4096).read_to_string(&mut text));
    let _ = std::fs::remove_file(&path);
    read.ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["pid"].as_i64().map(|p| p as i32).filter(|p| *p > 0)
}

fn ctr(address: &str, namespace: &str, args: &[&str]) -> Result<String, String> {
    let bin = std::env::var_os("FERRY_CTR").unwrap_or_else(|| "ctr".into());
    let out = Command::new(&bin)
        .arg("-a")
        .arg(address.trim_start_matches("unix://"))
        .arg("-n")
        .arg(namespace)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ctr: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "ctr {}: {}",
            args.join(" "),
            err.lines().last().unwrap_or("failed").trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Registers the running container `id` (runc root `root`, bundle `bundle`) as a task of the
/// containerd at `address`, running under the ferry shim.
pub fn register(
    address: &str,
    namespace: &str,
    root: &Path,
    id: &str,
    bundle: &Path,
    pid: i32,
) -> Result<(), String> {
    let cfg_path = bundle.join("config.json");
    // The bundle's config was received from the source and checked by the engine (its
    // size is capped on the wire).
    let text =
        std::fs::read_to_string(&cfg_path).map_err(|e| format!("{}: {e}", cfg_path.display()))?;
    let mut spec: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", cfg_path.display()))?;
    // containerd's bundle is elsewhere: the rootfs path must be absolute.
    let root_path = spec["root"]["path"]
        .as_str()
        .unwrap_or("rootfs")
        .to_string();
    let abs = if Path::new(&root_path).is_absolute() {
        PathBuf::from(root_path)
    } else {
        bundle.join(root_path)
    };
    spec["root"]["path"] = serde_json::Value::String(abs.to_string_lossy().into_owned());
    let spec_path = bundle.join("config.containerd.json");
    std::fs::write(&spec_path, spec.to_string())
        .map_err(|e| format!("{}: {e}", spec_path.display()))?;
    mark_for_adoption(root, id, pid).map_err(|e| format!("adoption marker: {e}"))?;
    let res = ctr(
        address,
        namespace,
        &[
            "run",
            "-d",
            "--null-io",
            "--runtime",
            super::RUNTIME_TYPE,
            "--config",
            &spec_path.to_string_lossy(),
            id,
        ],
    );
    if res.is_err() {
        let _ = take_adoption(root, id);
    }
    res.map(|_| ())
}

/// Deletes the (stopped, or stopping) task `id` and its container from containerd.
pub fn remove(address: &str, namespace: &str, id: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        match ctr(address, namespace, &["task", "delete", id]) {
            Ok(_) => break,
            Err(e) if e.contains("not found") => break,
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    ctr(address, namespace, &["container", "rm", id]).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_per_containerd_and_namespace() {
        let a = runc_root("/run/a/c.sock", "default");
        let b = runc_root("unix:///run/a/c.sock", "default");
        let c = runc_root("/run/b/c.sock", "default");
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.ends_with("default"));
        assert!(a.starts_with("/run/ferry/containerd"));
    }

    #[test]
    fn adoption_marker_round_trip() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("c1")).unwrap();
        assert_eq!(take_adoption(d.path(), "c1"), None);
        mark_for_adoption(d.path(), "c1", 42).unwrap();
        assert_eq!(take_adoption(d.path(), "c1"), Some(42));
        assert_eq!(take_adoption(d.path(), "c1"), None);
    }
}
