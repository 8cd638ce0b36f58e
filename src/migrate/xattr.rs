//! Extended attributes the rootfs sync carries.
//!
//! Carried: `user.*` (applications' own), `trusted.*`, `security.capability` (file
//! capabilities: a binary granted `cap_net_bind_service` or `cap_net_raw` without being
//! set-user-ID) and POSIX ACLs (`system.posix_acl_access`, `system.posix_acl_default`). Not
//! carried: the rest of `security.*` (SELinux labels, IMA/EVM), which belong to the host's
//! own policy, and are neither read on the source nor touched on the destination.
//!
//! Every name and value is capped as the kernel caps them: names 255 bytes, a file's list of
//! names and its values 64 KiB each.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::auth::hex;

/// A node's carried extended attributes: name → value, hex-encoded (as on the wire).
pub type Xattrs = BTreeMap<String, String>;

/// Longest attribute name (XATTR_NAME_MAX).
const NAME_MAX: usize = 255;
/// Most bytes of names listed, and of values together, for one node (XATTR_LIST_MAX,
/// XATTR_SIZE_MAX).
pub const BYTES_MAX: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum XattrError {
    #[error("{path}: {what}: {source}")]
    Io {
        path: String,
        what: String,
        source: std::io::Error,
    },
    #[error("{path}: more than {BYTES_MAX} bytes of extended attributes")]
    TooLarge { path: String },
    #[error("{path}: extended attribute {name:?} is not one ferry carries")]
    NotCarried { path: String, name: String },
    #[error("{path}: extended attribute {name}: value is not hex")]
    BadValue { path: String, name: String },
}

impl XattrError {
    /// Whether this is the node being gone or replaced (the walk skips it then).
    pub fn io(&self) -> Option<&std::io::Error> {
        match self {
            XattrError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Whether the sync carries the attribute `name`.
pub fn carried(name: &str) -> bool {
    name.len() <= NAME_MAX
        && (name.starts_with("user.")
            || name.starts_with("trusted.")
            || matches!(
                name,
                "security.capability" | "system.posix_acl_access" | "system.posix_acl_default"
            ))
}

fn cpath(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| einval())
}

/// Calls `f(buf, len)` (an l*xattr call filling `buf`) with a buffer of the size it asks for
/// with a null buffer; None when that is over `cap`. A list or value that grows in between
/// is asked for again (a few times, then ERANGE).
fn sized(
    cap: usize,
    mut f: impl FnMut(*mut libc::c_void, usize) -> libc::ssize_t,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut tries = 0;
    loop {
        let n = f(std::ptr::null_mut(), 0);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = n as usize;
        if n > cap {
            return Ok(None);
        }
        let mut buf = vec![0u8; n];
        let got = f(buf.as_mut_ptr().cast(), buf.len());
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(Some(buf));
        }
        let e = std::io::Error::last_os_error();
        tries += 1;
        if e.raw_os_error() != Some(libc::ERANGE) || tries == 3 {
            return Err(e);
        }
    }
}

/// The carried attributes of `p` itself (a symlink is not followed). A filesystem without
/// extended attributes has none.
pub fn read(p: &Path) -> Result<Xattrs, XattrError> {
    read_as(p, p)
}

/// [`read`], naming the node `shown` in errors.
pub fn read_as(p: &Path, shown: &Path) -> Result<Xattrs, XattrError> {
    let path = || shown.display().to_string();
    let io = |what: &str, source| XattrError::Io {
        path: path(),
        what: what.into(),
        source,
    };
    let c = cpath(p).map_err(|e| io("listing extended attributes", e))?;
    // SAFETY: `c` is a NUL-terminated path; the buffer is null with size 0, or `buf` with
    // its own length.
    let list = match sized(BYTES_MAX, |buf, len| unsafe {
        libc::llistxattr(c.as_ptr(), buf.cast(), len)
    }) {
        Ok(Some(l)) => l,
        Ok(None) => return Err(XattrError::TooLarge { path: path() }),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Xattrs::new()),
        Err(e) => return Err(io("listing extended attributes", e)),
    };
    let mut out = Xattrs::new();
    let mut total = 0;
    for name in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let Ok(name) = std::str::from_utf8(name) else {
            continue; // not a name any carried namespace has
        };
        if !carried(name) {
            continue;
        }
        let cname = CString::new(name).expect("no NUL inside a listed name");
        // SAFETY: as above; `cname` is a NUL-terminated attribute name.
        let value = match sized(BYTES_MAX - total, |buf, len| unsafe {
            libc::lgetxattr(c.as_ptr(), cname.as_ptr(), buf, len)
        }) {
            Ok(Some(v)) => v,
            Ok(None) => return Err(XattrError::TooLarge { path: path() }),
            // Removed since it was listed.
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => continue,
            Err(e) => return Err(io(&format!("reading extended attribute {name}"), e)),
        };
        total += value.len();
        out.insert(name.to_string(), hex(&value));
    }
    Ok(out)
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || s.len() > 2 * BYTES_MAX {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Checks attributes from the peer: carried names only, hex values within the caps.
pub fn check(p: &Path, want: &Xattrs) -> Result<(), XattrError> {
    let mut total = 0;
    for (name, value) in want {
        if !carried(name) {
            return Err(XattrError::NotCarried {
                path: p.display().to_string(),
                name: name.clone(),
            });
        }
        total += value.len() / 2;
        if unhex(value).is_none() {
            return Err(XattrError::BadValue {
                path: p.display().to_string(),
                name: name.clone(),
            });
        }
    }
    if total > BYTES_MAX {
        return Err(XattrError::TooLarge {
            path: p.display().to_string(),
        });
    }
    Ok(())
}

/// Makes the carried attributes of `p` (not following a symlink) `want`, given that they
/// are `have` now: sets what differs, removes what `want` lacks.
pub fn apply(p: &Path, want: &Xattrs, have: &Xattrs) -> Result<(), XattrError> {
    check(p, want)?;
    let io = |what: String, source| XattrError::Io {
        path: p.display().to_string(),
        what,
        source,
    };
    let c = cpath(p).map_err(|e| io("setting extended attributes".into(), e))?;
    for name in have.keys().filter(|n| !want.contains_key(*n)) {
        let cname =
            CString::new(name.as_str()).map_err(|_| io(format!("removing {name:?}"), einval()))?;
        // SAFETY: both are NUL-terminated strings that outlive the call.
        if unsafe { libc::lremovexattr(c.as_ptr(), cname.as_ptr()) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENODATA) {
                return Err(io(format!("removing extended attribute {name}"), e));
            }
        }
    }
    for (name, value) in want.iter().filter(|(n, v)| have.get(*n) != Some(*v)) {
        let bytes = unhex(value).expect("checked above");
        let cname =
            CString::new(name.as_str()).map_err(|_| io(format!("setting {name:?}"), einval()))?;
        // SAFETY: NUL-terminated path and name; `bytes` is valid for its length.
        let r = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            return Err(io(format!("setting extended attribute {name}"), e));
        }
    }
    Ok(())
}

/// A path or name with a NUL byte inside.
fn einval() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EINVAL)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Sets `name` on `p` itself.
    pub(in crate::migrate) fn set(p: &Path, name: &str, v: &[u8]) -> std::io::Result<()> {
        let c = cpath(p).unwrap();
        let n = CString::new(name).unwrap();
        // SAFETY: NUL-terminated strings; `v` valid for its length.
        let r = unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    #[test]
    fn names_carried() {
        for n in [
            "user.mime_type",
            "trusted.x",
            "security.capability",
            "system.posix_acl_access",
            "system.posix_acl_default",
        ] {
            assert!(carried(n), "{n}");
        }
        for n in [
            "security.selinux",
            "security.ima",
            "system.nfs4_acl",
            "other.x",
            "user",
        ] {
            assert!(!carried(n), "{n}");
        }
        assert!(!carried(&format!("user.{}", "x".repeat(NAME_MAX))));
    }

    #[test]
    fn read_then_apply_round_trips_and_removes_extras() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "x").unwrap();
        std::fs::write(&b, "x").unwrap();
        if let Err(e) = set(&a, "user.one", b"1\0\xff") {
            eprintln!("skipping: no user xattrs on {}: {e}", dir.path().display());
            return;
        }
        set(&a, "user.two", b"").unwrap();
        set(&b, "user.stale", b"old").unwrap();
        let want = read(&a).unwrap();
        assert_eq!(want.get("user.one").map(String::as_str), Some("3100ff"));
        assert_eq!(want.get("user.two").map(String::as_str), Some(""));
        let have = read(&b).unwrap();
        apply(&b, &want, &have).unwrap();
        assert_eq!(read(&b).unwrap(), want);
    }

    #[test]
    fn peer_values_are_checked() {
        let p = Path::new("f");
        let one = |n: &str, v: &str| Xattrs::from([(n.to_string(), v.to_string())]);
        assert!(check(p, &one("user.a", "00ff")).is_ok());
        assert!(matches!(
            check(p, &one("security.selinux", "00")),
            Err(XattrError::NotCarried { .. })
        ));
        for bad in ["0", "zz", "0g"] {
            assert!(matches!(
                check(p, &one("user.a", bad)),
                Err(XattrError::BadValue { .. })
            ));
        }
        let big = "00".repeat(BYTES_MAX / 2 + 1);
        let two = Xattrs::from([("user.a".into(), big.clone()), ("user.b".into(), big)]);
        assert!(matches!(check(p, &two), Err(XattrError::TooLarge { .. })));
    }
}
