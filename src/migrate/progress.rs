//! Progress of a migration on a terminal: one line per memory round.
//!
//! CRIU writes the pages into the data connection itself, so ferry cannot count them as they
//! pass; it watches the connection instead: the kernel's count of bytes the peer has
//! acknowledged (`TCP_INFO`), read from ferry's own copy of the socket. Nothing is drawn
//! unless enabled (`ferry migrate` enables it when stdout is a terminal and `--json` is off).

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Offset of `tcpi_bytes_acked` in the kernel's `struct tcp_info` (8 one-byte fields, 24
/// u32 fields, then the u64s pacing_rate, max_pacing_rate, bytes_acked).
const BYTES_ACKED_OFFSET: usize = 120;

/// Bytes of `s`'s output the peer has acknowledged so far (0 if the kernel does not say).
pub fn bytes_acked(s: &TcpStream) -> u64 {
    let mut buf = [0u8; 256];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `buf`, which is that long, and
    // stores the written length in `len`.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 || (len as usize) < BYTES_ACKED_OFFSET + 8 {
        return 0;
    }
    let mut v = [0u8; 8];
    v.copy_from_slice(&buf[BYTES_ACKED_OFFSET..BYTES_ACKED_OFFSET + 8]);
    u64::from_ne_bytes(v)
}

/// The terminal display, or nothing.
pub struct Progress {
    multi: Option<MultiProgress>,
}

impl Progress {
    pub fn new(enabled: bool) -> Progress {
        Progress {
            multi: enabled.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
        }
    }

    /// Starts a line for one transfer; `sent` tells the bytes moved so far.
    pub fn stage(&self, label: String, sent: impl Fn() -> u64 + Send + 'static) -> Stage {
        let Some(multi) = &self.multi else {
            return Stage {
                bar: None,
                stop: Arc::new(AtomicBool::new(true)),
                thread: None,
            };
        };
        let bar = multi.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {prefix:<24} {bytes:>10} {bytes_per_sec:>12} {elapsed:>4} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_prefix(label);
        let stop = Arc::new(AtomicBool::new(false));
        let (b, st) = (bar.clone(), stop.clone());
        let base = sent();
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                b.set_position(sent().saturating_sub(base));
                b.tick();
                std::thread::sleep(Duration::from_millis(100));
            }
            b.set_position(sent().saturating_sub(base));
        });
        Stage {
            bar: Some(bar),
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // indicatif leaves the cursor at the end of the last line.
        if self.multi.is_some() {
            eprintln!();
        }
    }
}

/// One line; ends when finished or dropped.
pub struct Stage {
    bar: Option<ProgressBar>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Stage {
    /// Ends the line with a note (e.g. the policy's decision).
    pub fn finish(mut self, note: &str) {
        self.end();
        if let Some(b) = &self.bar {
            b.finish_with_message(note.to_string());
        }
    }

    fn end(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        self.end();
        if let Some(b) = &self.bar {
            if !b.is_finished() {
                b.abandon();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn acked_bytes_are_counted_on_loopback() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let before = bytes_acked(&c);
        c.write_all(&[7u8; 100_000]).unwrap();
        let mut got = vec![0u8; 100_000];
        s.read_exact(&mut got).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while bytes_acked(&c) < before + 100_000 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(bytes_acked(&c) >= before + 100_000, "{}", bytes_acked(&c));
    }

    #[test]
    fn disabled_progress_draws_nothing_and_ends() {
        let p = Progress::new(false);
        let s = p.stage("round 1".into(), || 5);
        s.finish("done");
    }
}
