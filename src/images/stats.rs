//! `stats-dump` and `stats-restore`: what CRIU measured during a dump or restore.
//!
//! Layout: u32 service magic (0x55105940), u32 stats magic (0x57093306), then one entry
//! (u32 length + packed `stats_entry`). CRIU writes them to its work directory.

use std::path::Path;

use protobuf::Message;

use super::{u32_at, ImageError};
use crate::pb::StatsEntry;

pub const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
pub const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
pub const STATS_MAGIC: u32 = 0x5709_3306;
/// Largest stats file read (real ones are about a hundred bytes).
pub const MAX_STATS_FILE: u64 = 64 * 1024;
/// Largest entry accepted.
pub const MAX_ENTRY: u32 = 16 * 1024;

pub const DUMP_STATS_FILE: &str = "stats-dump";
pub const RESTORE_STATS_FILE: &str = "stats-restore";

/// Dump statistics (times in microseconds, counts in pages).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DumpStats {
    pub freezing_time_us: u64,
    pub frozen_time_us: u64,
    pub memdump_time_us: u64,
    pub memwrite_time_us: u64,
    pub pages_scanned: u64,
    pub pages_skipped_parent: u64,
    pub pages_written: u64,
    pub pages_lazy: u64,
}

impl DumpStats {
    /// What happened since `earlier`. CRIU keeps its dump statistics in memory shared by the
    /// processes of one swrk session, so after pre-dump rounds on the same session every
    /// counter and time in stats-dump is the running total of all rounds so far.
    pub fn since(&self, earlier: &DumpStats) -> DumpStats {
        DumpStats {
            freezing_time_us: self
                .freezing_time_us
                .saturating_sub(earlier.freezing_time_us),
            frozen_time_us: self.frozen_time_us.saturating_sub(earlier.frozen_time_us),
            memdump_time_us: self.memdump_time_us.saturating_sub(earlier.memdump_time_us),
            memwrite_time_us: self
                .memwrite_time_us
                .saturating_sub(earlier.memwrite_time_us),
            pages_scanned: self.pages_scanned.saturating_sub(earlier.pages_scanned),
            pages_skipped_parent: self
                .pages_skipped_parent
                .saturating_sub(earlier.pages_skipped_parent),
            pages_written: self.pages_written.saturating_sub(earlier.pages_written),
            pages_lazy: self.pages_lazy.saturating_sub(earlier.pages_lazy),
        }
    }
}

/// Restore statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RestoreStats {
    pub pages_compared: u64,
    pub pages_skipped_cow: u64,
    pub forking_time_us: u64,
    pub restore_time_us: u64,
    pub pages_restored: u64,
}

/// Decodes a whole stats image held in memory.
pub fn parse_stats(path: &Path, buf: &[u8]) -> Result<StatsEntry, ImageError> {
    let p = || path.to_path_buf();
    let first = u32_at(buf, 0).ok_or_else(|| ImageError::Truncated {
        path: p(),
        what: format!("{} bytes, no magic", buf.len()),
    })?;
    if first != IMG_SERVICE_MAGIC {
        return Err(ImageError::Foreign {
            path: p(),
            what: format!(
                "first magic {first:#010x}, expected service magic {IMG_SERVICE_MAGIC:#010x}"
            ),
        });
    }
    let second = u32_at(buf, 4).ok_or_else(|| ImageError::Truncated {
        path: p(),
        what: "no stats magic".into(),
    })?;
    if second != STATS_MAGIC {
        return Err(ImageError::Foreign {
            path: p(),
            what: format!("magic {second:#010x} is not the stats magic {STATS_MAGIC:#010x}"),
        });
    }
    let len = u32_at(buf, 8).ok_or_else(|| ImageError::Truncated {
        path: p(),
        what: "no entry".into(),
    })?;
    if len > MAX_ENTRY {
        return Err(ImageError::BadEntry {
            path: p(),
            what: format!("entry length {len} exceeds the cap of {MAX_ENTRY}"),
        });
    }
    let body = buf
        .get(12..12 + len as usize)
        .ok_or_else(|| ImageError::Truncated {
            path: p(),
            what: format!(
                "entry of {len} bytes, {} present",
                buf.len().saturating_sub(12)
            ),
        })?;
    if buf.len() > 12 + len as usize {
        return Err(ImageError::BadEntry {
            path: p(),
            what: format!(
                "{} trailing bytes after the entry",
                buf.len() - 12 - len as usize
            ),
        });
    }
    let e = StatsEntry::parse_from_bytes(body).map_err(|e| ImageError::BadEntry {
        path: p(),
        what: e.to_string(),
    })?;
    Ok(e)
}

/// Reads a stats image from a file (capped at [`MAX_STATS_FILE`]).
pub fn read_stats(path: &Path) -> Result<StatsEntry, ImageError> {
    parse_stats(path, &super::read_capped(path, MAX_STATS_FILE)?)
}

/// Reads `stats-dump` from a directory.
pub fn read_dump_stats(dir: &Path) -> Result<DumpStats, ImageError> {
    let path = dir.join(DUMP_STATS_FILE);
    let e = read_stats(&path)?;
    let d = e.dump.as_ref().ok_or_else(|| ImageError::BadEntry {
        path: path.clone(),
        what: "no dump statistics in entry".into(),
    })?;
    Ok(DumpStats {
        freezing_time_us: d.freezing_time().into(),
        frozen_time_us: d.frozen_time().into(),
        memdump_time_us: d.memdump_time().into(),
        memwrite_time_us: d.memwrite_time().into(),
        pages_scanned: d.pages_scanned(),
        pages_skipped_parent: d.pages_skipped_parent(),
        pages_written: d.pages_written(),
        pages_lazy: d.pages_lazy(),
    })
}

/// Reads `stats-restore` from a directory.
pub fn read_restore_stats(dir: &Path) -> Result<RestoreStats, ImageError> {
    let path = dir.join(RESTORE_STATS_FILE);
    let e = read_stats(&path)?;
    let r = e.restore.as_ref().ok_or_else(|| ImageError::BadEntry {
        path: path.clone(),
        what: "no restore statistics in entry".into(),
    })?;
    Ok(RestoreStats {
        pages_compared: r.pages_compared(),
        pages_skipped_cow: r.pages_skipped_cow(),
        forking_time_us: r.forking_time().into(),
        restore_time_us: r.restore_time().into(),
        pages_restored: r.pages_restored(),
    })
}

/// Encodes a stats image (for tests and fixtures).
pub fn encode_stats(e: &StatsEntry) -> Vec<u8> {
    let body = e.write_to_bytes().unwrap_or_default();
    let mut out = Vec::with_capacity(12 + body.len());
    out.extend_from_slice(&IMG_SERVICE_MAGIC.to_le_bytes());
    out.extend_from_slice(&STATS_MAGIC.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::DumpStatsEntry;

    fn sample() -> StatsEntry {
        let mut d = DumpStatsEntry::new();
        d.set_freezing_time(120);
        d.set_frozen_time(5400);
        d.set_memdump_time(800);
        d.set_memwrite_time(700);
        d.set_pages_scanned(9000);
        d.set_pages_skipped_parent(10);
        d.set_pages_written(8990);
        d.set_pages_lazy(0);
        let mut e = StatsEntry::new();
        e.dump = protobuf::MessageField::some(d);
        e
    }

    #[test]
    fn round_trip_dump_stats() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DUMP_STATS_FILE), encode_stats(&sample())).unwrap();
        let s = read_dump_stats(dir.path()).unwrap();
        assert_eq!(s.frozen_time_us, 5400);
        assert_eq!(s.pages_written, 8990);
    }

    #[test]
    fn truncations_are_reported_as_truncated() {
        let full = encode_stats(&sample());
        let p = Path::new("stats-dump");
        for cut in [0, 3, 5, 9, 13, full.len() - 1] {
            match parse_stats(p, &full[..cut]) {
                Err(ImageError::Truncated { .. }) => {}
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn foreign_magic_is_rejected() {
        let mut buf = encode_stats(&sample());
        buf[4..8].copy_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
        assert!(matches!(
            parse_stats(Path::new("x"), &buf),
            Err(ImageError::Foreign { .. })
        ));
        let text = b"{\"not\": \"an image\"}";
        assert!(matches!(
            parse_stats(Path::new("x"), text),
            Err(ImageError::Foreign { .. })
        ));
    }

    #[test]
    fn oversized_entry_length_is_capped_before_use() {
        let mut buf = encode_stats(&sample());
        buf[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            parse_stats(Path::new("x"), &buf),
            Err(ImageError::BadEntry { .. })
        ));
    }

    #[test]
    fn missing_required_fields_fail_to_decode() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&IMG_SERVICE_MAGIC.to_le_bytes());
        buf.extend_from_slice(&STATS_MAGIC.to_le_bytes());
        // an entry holding an empty dump_stats_entry (field 1, length 0): required fields absent
        buf.extend_from_slice(&2u32.to_le_bytes());
        buf.extend_from_slice(&[0x0a, 0x00]);
        assert!(matches!(
            parse_stats(Path::new("x"), &buf),
            Err(ImageError::BadEntry { .. })
        ));
    }
}
