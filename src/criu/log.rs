//! Picking the lines of CRIU's log that explain a failure.
//!
//! CRIU's `cr_errmsg` is the first "Error" line of its log even when the operation succeeded
//! (on this kind of host a harmless RLIMIT_NOFILE complaint), so it is never taken as the cause.
//! Instead the last error lines of the log file are reported.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// Most of a log file that is read (its tail).
const LOG_TAIL_BYTES: u64 = 256 * 1024;
/// How many lines go into an excerpt.
const EXCERPT_LINES: usize = 4;

/// Lines that CRIU logs as errors although nothing went wrong.
fn is_noise(line: &str) -> bool {
    line.contains("RLIMIT_NOFILE") || line.contains("kdat cache")
}

/// A log line without CRIU's leading `(seconds)` timestamp.
fn body(line: &str) -> &str {
    let l = line.trim();
    match l.strip_prefix('(').and_then(|r| r.split_once(") ")) {
        Some((t, rest)) if t.bytes().all(|b| b.is_ascii_digit() || b == b'.') => rest,
        _ => l,
    }
}

/// The relevant lines of CRIU's log text: the last error lines (a line repeated but for the
/// timestamp counted once, where it came last), or else its last lines.
pub fn excerpt_from_text(text: &str) -> Vec<String> {
    let mut errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error") && !is_noise(l))
        .collect();
    // Each complaint once, where it was last made.
    let mut seen = std::collections::HashSet::new();
    errors.reverse();
    errors.retain(|l| seen.insert(body(l)));
    errors.reverse();
    let pick: Vec<&str> = if errors.is_empty() {
        text.lines().filter(|l| !l.trim().is_empty()).collect()
    } else {
        errors
    };
    let start = pick.len().saturating_sub(EXCERPT_LINES);
    pick[start..].iter().map(|l| l.trim().to_string()).collect()
}

/// Reads the tail of a CRIU log file (capped) and returns its relevant lines.
pub fn excerpt_from_file(path: &Path) -> Vec<String> {
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > LOG_TAIL_BYTES && f.seek(SeekFrom::Start(len - LOG_TAIL_BYTES)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    if f.take(LOG_TAIL_BYTES).read_to_end(&mut buf).is_err() {
        return Vec::new();
    }
    excerpt_from_text(&String::from_utf8_lossy(&buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rlimit_noise_is_not_the_cause() {
        let log = "(00.001) Error (criu/util.c:123): RLIMIT_NOFILE hard limit\n\
                   (00.002) dumping\n\
                   (00.100) Error (criu/mount.c:1): Mount 12 ./data (master_id: 9 shared_id: 0) has unreachable sharing\n\
                   (00.101) Error (criu/cr-dump.c:2): Dumping FAILED.\n";
        let ex = excerpt_from_text(log);
        assert_eq!(ex.len(), 2);
        assert!(ex[0].contains("unreachable sharing"));
        assert!(ex.iter().all(|l| !l.contains("RLIMIT_NOFILE")));
    }

    #[test]
    fn a_repeated_error_is_reported_once() {
        let log = "(00.068537) Error (criu/bfd.c:131): bfd: Error flushing image: No space left on device\n\
                   (00.068600) Error (criu/bfd.c:131): bfd: Error flushing image: No space left on device\n\
                   (00.069025) Error (criu/namespaces.c:1163): Namespaces dumping finished with error 65280\n\
                   (00.069046) Error (criu/bfd.c:131): bfd: Error flushing image: No space left on device\n\
                   (00.069555) Error (criu/cr-dump.c:1975): Dumping FAILED.\n";
        assert_eq!(
            excerpt_from_text(log),
            vec![
                "(00.069025) Error (criu/namespaces.c:1163): Namespaces dumping finished with error 65280",
                "(00.069046) Error (criu/bfd.c:131): bfd: Error flushing image: No space left on device",
                "(00.069555) Error (criu/cr-dump.c:1975): Dumping FAILED.",
            ]
        );
    }

    #[test]
    fn without_errors_the_tail_is_reported() {
        let log: String = (0..10).map(|i| format!("line {i}\n")).collect();
        assert_eq!(
            excerpt_from_text(&log),
            vec!["line 6", "line 7", "line 8", "line 9"]
        );
    }
}
