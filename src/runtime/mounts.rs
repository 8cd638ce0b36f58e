//! Mount handling that cannot delete through a mount.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::{io_err, RuntimeError};
use crate::oci::options::parse_mountinfo;

/// Mount points at or below `path` (from /proc/self/mountinfo).
pub fn mounts_under(path: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    parse_mountinfo(&text)
        .into_iter()
        .map(|m| PathBuf::from(m.mountpoint))
        .filter(|m| m.starts_with(path))
        .collect()
}

pub fn is_mount_point(path: &Path) -> bool {
    mounts_under(path).iter().any(|m| m == path)
}

/// A private recursive bind mount that is unmounted (lazily) and whose mount point directory
/// is removed when dropped.
pub struct BindMount {
    target: Option<PathBuf>,
}

impl BindMount {
    /// Bind-mounts `source` (recursively) on `target`, creating `target`, and makes it private.
    pub fn new(source: &Path, target: &Path) -> Result<BindMount, RuntimeError> {
        std::fs::create_dir_all(target).map_err(io_err("create", target))?;
        mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|source| RuntimeError::Mount {
            what: "bind",
            target: target.to_path_buf(),
            source,
        })?;
        let guard = BindMount {
            target: Some(target.to_path_buf()),
        };
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_PRIVATE | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|source| RuntimeError::Mount {
            what: "make-rprivate",
            target: target.to_path_buf(),
            source,
        })?;
        Ok(guard)
    }

    pub fn path(&self) -> &Path {
        self.target.as_deref().unwrap_or(Path::new(""))
    }

    /// Unmounts now and removes the (then empty) mount point directory.
    pub fn release(mut self) -> Result<(), RuntimeError> {
        self.release_inner()
    }

    fn release_inner(&mut self) -> Result<(), RuntimeError> {
        let Some(t) = self.target.take() else {
            return Ok(());
        };
        match umount2(&t, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(source) => {
                return Err(RuntimeError::Mount {
                    what: "unmount",
                    target: t,
                    source,
                })
            }
        }
        // Only the empty mount point goes; never anything that might still be a mount.
        if is_mount_point(&t) {
            return Err(RuntimeError::Refused {
                path: t,
                why: "still a mount point after unmounting".into(),
            });
        }
        std::fs::remove_dir(&t).map_err(io_err("remove", &t))
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        if let Err(e) = self.release_inner() {
            tracing::warn!("cleanup: {e}");
        }
    }
}

/// Lazily unmounts every mount at or below `path`, deepest first (e.g. CRIU's cgroup yard
/// left in its work dir by a killed criu).
pub fn unmount_under(path: &Path) -> Result<(), RuntimeError> {
    let mut m = mounts_under(path);
    m.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in m {
        match umount2(&p, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(source) => {
                return Err(RuntimeError::Mount {
                    what: "unmount",
                    target: p,
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Removes a directory tree that ferry created, refusing if any mount point is at or below it
/// and never following a path onto another filesystem.
pub fn remove_tree(path: &Path) -> Result<(), RuntimeError> {
    if !path.exists() {
        return Ok(());
    }
    let m = mounts_under(path);
    if !m.is_empty() {
        return Err(RuntimeError::Refused {
            path: path.to_path_buf(),
            why: format!("{} is mounted there", m[0].display()),
        });
    }
    let dev = std::fs::symlink_metadata(path)
        .map_err(io_err("stat", path))?
        .dev();
    remove_same_dev(path, dev)
}

fn remove_same_dev(path: &Path, dev: u64) -> Result<(), RuntimeError> {
    let meta = std::fs::symlink_metadata(path).map_err(io_err("stat", path))?;
    if meta.dev() != dev {
        return Err(RuntimeError::Refused {
            path: path.to_path_buf(),
            why: "it is on another filesystem".into(),
        });
    }
    if meta.is_dir() {
        for e in std::fs::read_dir(path).map_err(io_err("list", path))? {
            let e = e.map_err(io_err("list", path))?;
            remove_same_dev(&e.path(), dev)?;
        }
        std::fs::remove_dir(path).map_err(io_err("remove", path))
    } else {
        std::fs::remove_file(path).map_err(io_err("remove", path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_tree_removes_plain_trees() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("x");
        std::fs::create_dir_all(t.join("a/b")).unwrap();
        std::fs::write(t.join("a/b/f"), "1").unwrap();
        std::os::unix::fs::symlink("/etc", t.join("link")).unwrap();
        remove_tree(&t).unwrap();
        assert!(!t.exists());
        assert!(Path::new("/etc").exists());
    }
}
