//! How many pages a container's processes have written since their soft-dirty bits were last
//! cleared — which CRIU does to every task it pre-dumps with `track_mem`, while they are
//! frozen. Bit 55 of an entry of `/proc/PID/pagemap` is the page's soft-dirty bit, bit 63
//! present, bit 62 swapped. Only private writable mappings count (what a dump writes as the
//! process's memory); the vDSO and friends are skipped.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::migrate::policy::PAGE;

#[derive(Debug, thiserror::Error)]
pub enum SoftDirtyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("process {0} maps more than ferry scans ({MAX_PAGEMAP_BYTES} bytes of page map)")]
    TooLarge(i32),
}

/// Most bytes of `/proc/PID/maps` read per process.
const MAX_MAPS_BYTES: u64 = 16 << 20;
/// Most bytes of page map read per call, over all processes: 8 per page of address space
/// scanned, so 64 GiB of private writable mappings.
const MAX_PAGEMAP_BYTES: u64 = 128 << 20;
/// Page map entries read at once.
const CHUNK: usize = 8192;

const SOFT_DIRTY: u64 = 1 << 55;
const SWAPPED: u64 = 1 << 62;
const PRESENT: u64 = 1 << 63;

/// Soft-dirty pages, present or swapped, in the private writable mappings of `pids`.
pub fn dirty_pages(pids: &[i32]) -> Result<u64, SoftDirtyError> {
    let mut budget = MAX_PAGEMAP_BYTES / 8;
    let mut total = 0u64;
    for &pid in pids {
        let maps_path = PathBuf::from(format!("/proc/{pid}/maps"));
        let io = |path: &PathBuf| {
            let path = path.clone();
            move |source| SoftDirtyError::Io { path, source }
        };
        let mut maps = String::new();
        File::open(&maps_path)
            .and_then(|f| f.take(MAX_MAPS_BYTES).read_to_string(&mut maps))
            .map_err(io(&maps_path))?;
        let map_path = PathBuf::from(format!("/proc/{pid}/pagemap"));
        let pagemap = File::open(&map_path).map_err(io(&map_path))?;
        let mut buf = vec![0u8; CHUNK * 8];
        for (start, end) in maps.lines().filter_map(private_writable) {
            let pages = (end - start) / PAGE;
            if pages > budget {
                return Err(SoftDirtyError::TooLarge(pid));
            }
            budget -= pages;
            let mut at = start / PAGE;
            let stop = end / PAGE;
            while at < stop {
                let n = ((stop - at) as usize).min(CHUNK);
                let got = pagemap
                    .read_at(&mut buf[..n * 8], at * 8)
                    .map_err(io(&map_path))?;
                if got == 0 {
                    break;
                }
                total += count_dirty(&buf[..got - got % 8]);
                at += (got / 8) as u64;
            }
        }
    }
    Ok(total)
}

/// The page map entries in `entries` that are soft-dirty and present or swapped.
fn count_dirty(entries: &[u8]) -> u64 {
    entries
        .chunks_exact(8)
        .map(|e| u64::from_ne_bytes(e.try_into().expect("8 bytes")))
        .filter(|e| e & SOFT_DIRTY != 0 && e & (PRESENT | SWAPPED) != 0)
        .count() as u64
}

/// The address range of a `/proc/PID/maps` line of a private writable mapping.
fn private_writable(line: &str) -> Option<(u64, u64)> {
    let mut f = line.split_whitespace();
    let (range, perms) = (f.next()?, f.next()?);
    if perms.len() < 4 || &perms[1..2] != "w" || &perms[3..4] != "p" {
        return None;
    }
    let name = f.nth(3).unwrap_or("");
    if matches!(name, "[vdso]" | "[vvar]" | "[vsyscall]" | "[vvar_vclock]") {
        return None;
    }
    let (a, b) = range.split_once('-')?;
    let (a, b) = (
        u64::from_str_radix(a, 16).ok()?,
        u64::from_str_radix(b, 16).ok()?,
    );
    (b > a).then_some((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_private_writable_mappings_count() {
        assert_eq!(
            private_writable("7f00-7f10 rw-p 00000000 00:00 0 "),
            Some((0x7f00, 0x7f10))
        );
        assert_eq!(
            private_writable("55d0-55e0 rw-p 00002000 fd:00 123 /bin/busybox"),
            Some((0x55d0, 0x55e0))
        );
        assert_eq!(private_writable("7f00-7f10 r--p 00000000 00:00 0"), None);
        assert_eq!(
            private_writable("7f00-7f10 rw-s 00000000 00:05 7 /dev/zero"),
            None
        );
        assert_eq!(
            private_writable("7f00-7f10 rw-p 00000000 00:00 0 [vvar]"),
            None
        );
        assert_eq!(private_writable("7f10-7f00 rw-p 00000000 00:00 0"), None);
        assert_eq!(private_writable("garbage"), None);
    }

    #[test]
    fn entries_count_when_soft_dirty_and_present_or_swapped() {
        let entries: Vec<u8> = [
            SOFT_DIRTY | PRESENT,
            SOFT_DIRTY | SWAPPED,
            SOFT_DIRTY,
            PRESENT,
            0,
        ]
        .iter()
        .flat_map(|e| e.to_ne_bytes())
        .collect();
        assert_eq!(count_dirty(&entries), 2);
    }

    #[test]
    fn this_process_can_be_scanned() {
        // Whether this kernel tracks soft-dirty or not, the scan itself works (as root; an
        // unprivileged reader sees zeroed frame numbers but the flags all the same).
        let me = std::process::id() as i32;
        assert!(dirty_pages(&[me]).is_ok());
        assert!(matches!(
            dirty_pages(&[i32::MAX]),
            Err(SoftDirtyError::Io { .. })
        ));
    }
}
