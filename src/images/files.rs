//! files.img: one entry per open file of the dumped tasks. ferry rewrites one thing in it
//! before a restore: the timer fds CRIU would bring back disarmed.
//!
//! A periodic timer fd that expired and was not read yet (its expirations pending, as one
//! whose period is shorter than the freeze always has) reports no time to its next expiry:
//! the kernel arms it again only when it is read. CRIU dumps that zero and restores it with
//! `timerfd_settime`, for which a zero expiry means "disarmed": the restored timer delivers
//! the pending expirations once and then never fires again (CRIU issue #3162, open). ferry
//! gives such a timer one period to its next expiry instead, which is where the kernel puts
//! it after the read; the pending count is restored as it was.

use std::path::Path;

use protobuf::Message;

use super::stats::IMG_COMMON_MAGIC;
use super::{entries, u32_at, ImageError};
use crate::pb::OpenFileEntry;

pub const FILES_IMAGE: &str = "files.img";
pub const FILES_MAGIC: u32 = 0x5630_3138;
/// CRIU's type of a timer fd in files.img.
const TIMERFD: u32 = 17;
/// Largest files.img read (a task with a million open files has one of about 100 MiB).
const MAX_FILES_IMAGE: u64 = 512 * 1024 * 1024;
/// Largest entry (a regular file's entry holds its path, at most PATH_MAX).
const MAX_ENTRY: u32 = 64 * 1024;

/// Gives every periodic timer fd in `dir`'s files.img that would be restored disarmed one
/// period to its next expiry (see the module's text). Returns how many were changed; the
/// image is replaced (through a new file renamed over it) only when some were. No files.img:
/// nothing to do.
pub fn rearm_pending_timerfds(dir: &Path) -> Result<usize, ImageError> {
    let path = dir.join(FILES_IMAGE);
    let buf = match super::read_capped(&path, MAX_FILES_IMAGE) {
        Err(ImageError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(0)
        }
        r => r?,
    };
    let (out, changed) = rearm_in(&path, &buf)?;
    if changed > 0 {
        let tmp = dir.join(format!(".{FILES_IMAGE}.ferry"));
        let io = |source| ImageError::Io {
            path: tmp.clone(),
            source,
        };
        std::fs::write(&tmp, &out).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
    }
    Ok(changed)
}

/// The image `buf` with its pending periodic timers re-armed, and how many there were.
fn rearm_in(path: &Path, buf: &[u8]) -> Result<(Vec<u8>, usize), ImageError> {
    if u32_at(buf, 0) != Some(IMG_COMMON_MAGIC) || u32_at(buf, 4) != Some(FILES_MAGIC) {
        return Err(ImageError::Foreign {
            path: path.to_path_buf(),
            what: "no files magic".into(),
        });
    }
    let bad = |e: protobuf::Error| ImageError::BadEntry {
        path: path.to_path_buf(),
        what: e.to_string(),
    };
    let mut out = buf[..8].to_vec();
    let mut changed = 0;
    for body in entries(path, buf, 8, MAX_ENTRY)? {
        let mut e = OpenFileEntry::parse_from_bytes(body).map_err(bad)?;
        let pending = e.type_() == TIMERFD
            && e.tfd.as_ref().is_some_and(|t| {
                t.vsec() == 0 && t.vnsec() == 0 && (t.isec() != 0 || t.insec() != 0)
            });
        if !pending {
            out.extend_from_slice(&(body.len() as u32).to_le_bytes());
            out.extend_from_slice(body);
            continue;
        }
        let t = e.tfd.mut_or_insert_default();
        tracing::info!(
            id = t.id(),
            ticks = t.ticks(),
            "a periodic timer fd with expirations pending: re-armed one period ahead"
        );
        let (isec, insec) = (t.isec(), t.insec());
        t.set_vsec(isec);
        t.set_vnsec(insec);
        changed += 1;
        let bytes = e.write_to_bytes().map_err(bad)?;
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    Ok((out, changed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::TimerfdSettings;

    fn image(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut b = IMG_COMMON_MAGIC.to_le_bytes().to_vec();
        b.extend_from_slice(&FILES_MAGIC.to_le_bytes());
        for e in entries {
            b.extend_from_slice(&(e.len() as u32).to_le_bytes());
            b.extend_from_slice(e);
        }
        b
    }

    fn timer(id: u32, value: (u64, u64), interval: (u64, u64)) -> Vec<u8> {
        let mut t = TimerfdSettings::new();
        t.set_id(id);
        t.set_flags(0o4002);
        t.set_fown(vec![8, 0, 16, 0]);
        t.set_clockid(1);
        t.set_ticks(3);
        t.set_settime_flags(0);
        t.set_vsec(value.0);
        t.set_vnsec(value.1);
        t.set_isec(interval.0);
        t.set_insec(interval.1);
        let mut e = OpenFileEntry::new();
        e.set_type(TIMERFD);
        e.set_id(id);
        e.tfd = Some(t).into();
        e.write_to_bytes().unwrap()
    }

    /// A regular file's entry: type 1, id, and field 3 (its settings), which this schema
    /// does not know.
    fn regular(id: u8) -> Vec<u8> {
        vec![0x08, 1, 0x10, id, 0x1a, 4, 0x08, id, 0x10, 7]
    }

    #[test]
    fn only_pending_periodic_timers_are_rearmed_and_the_rest_is_kept() {
        let path = Path::new("files.img");
        let entries = [
            regular(1),
            timer(2, (0, 0), (0, 50_000_000)),
            timer(3, (0, 7_000), (0, 50_000_000)),
            timer(4, (0, 0), (0, 0)),
            regular(5),
        ];
        let (out, n) = rearm_in(path, &image(&entries)).unwrap();
        assert_eq!(n, 1);
        let got = super::entries(path, &out, 8, MAX_ENTRY).unwrap();
        assert_eq!(got.len(), 5);
        for i in [0, 2, 3, 4] {
            assert_eq!(got[i], &entries[i][..], "entry {i} changed");
        }
        let e = OpenFileEntry::parse_from_bytes(got[1]).unwrap();
        let t = e.tfd.as_ref().unwrap();
        assert_eq!((t.vsec(), t.vnsec()), (0, 50_000_000));
        assert_eq!((t.isec(), t.insec(), t.ticks()), (0, 50_000_000, 3));
        assert_eq!(
            (t.id(), t.flags(), t.fown()),
            (2, 0o4002, &[8, 0, 16, 0][..])
        );

        let (same, n) = rearm_in(path, &image(&[regular(1)])).unwrap();
        assert_eq!((same, n), (image(&[regular(1)]), 0));
    }

    #[test]
    fn foreign_or_broken_images_are_refused() {
        let path = Path::new("files.img");
        let mut wrong = image(&[]);
        wrong[4] ^= 1;
        assert!(matches!(
            rearm_in(path, &wrong),
            Err(ImageError::Foreign { .. })
        ));
        let mut cut = image(&[timer(2, (0, 0), (1, 0))]);
        cut.truncate(cut.len() - 1);
        assert!(matches!(
            rearm_in(path, &cut),
            Err(ImageError::Truncated { .. })
        ));
        let mut huge = image(&[]);
        huge.extend_from_slice(&(MAX_ENTRY + 1).to_le_bytes());
        assert!(matches!(
            rearm_in(path, &huge),
            Err(ImageError::BadEntry { .. })
        ));
    }

    #[test]
    fn an_image_dir_without_files_img_is_left_alone_and_one_with_a_timer_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(rearm_pending_timerfds(dir.path()).unwrap(), 0);
        std::fs::write(
            dir.path().join(FILES_IMAGE),
            image(&[timer(9, (0, 0), (2, 0))]),
        )
        .unwrap();
        assert_eq!(rearm_pending_timerfds(dir.path()).unwrap(), 1);
        assert_eq!(
            rearm_pending_timerfds(dir.path()).unwrap(),
            0,
            "done already"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "no temporary file left");
    }
}
