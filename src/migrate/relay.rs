//! Byte relays for post-copy: CRIU's lazy-pages traffic crosses the authenticated data
//! connection instead of a port CRIU opens to the network. On the source, CRIU's lazy page
//! server listens on loopback only and ferry connects to it; on the destination, ferry listens
//! on loopback for CRIU's lazy-pages daemon. The data connection is a [`Link`]: with TLS,
//! the local end of its pump, so the relay is the same either way.

use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::link::{Duplex, Link};

/// A relay thread; it yields the bytes copied each way.
pub type RelayHandle = JoinHandle<std::io::Result<(u64, u64)>>;
use std::time::{Duration, Instant};

fn copy_then_close(from: impl Duplex, mut to: impl Duplex) -> u64 {
    let (n, _) = copy_until_end(from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
    n
}

/// Which end stopped a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopped {
    /// The reader ended (EOF or error).
    Reader,
    /// Writing failed.
    Writer,
}

/// Copies `from` into `to` until `from` ends (EOF or error) or `to` fails; `to` stays open.
/// Returns the bytes copied and which end stopped it.
fn copy_until_end(mut from: impl std::io::Read, to: &mut impl std::io::Write) -> (u64, Stopped) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return (n, Stopped::Reader),
            Ok(k) => {
                if to.write_all(&buf[..k]).is_err() {
                    return (n, Stopped::Writer);
                }
                n += k as u64;
            }
        }
    }
}

/// The destination's relay between CRIU's lazy-pages daemon (`local`) and the source
/// (`data`): page requests go out until the daemon's end closes (it has every page, or it
/// failed), pages come in until the source's end closes. When the pages stop while the
/// daemon still waits for some (the source's ferry or host died, the link broke), `broken`
/// runs before the daemon is told: the daemon then fails and exits, and with it goes the
/// registration of the container's missing memory, which would read as zero-filled pages
/// from then on. Returns bytes (requests, pages).
fn pump_pages(
    local: TcpStream,
    data: Link,
    broken: Box<dyn FnOnce() + Send>,
) -> std::io::Result<(u64, u64)> {
    let (local2, mut data2) = (local.try_clone()?, data.try_clone()?);
    let _ = local.set_read_timeout(None);
    let _ = data.set_read_timeout(None);
    let daemon_ended = Arc::new(AtomicBool::new(false));
    let ended = daemon_ended.clone();
    let requests = std::thread::spawn(move || {
        let (n, stopped) = copy_until_end(local2, &mut data2);
        if stopped == Stopped::Reader {
            ended.store(true, Ordering::SeqCst);
        }
        let _ = data2.shutdown(Shutdown::Write);
        n
    });
    let (pages, _) = copy_until_end(data, &mut &local);
    if !daemon_ended.load(Ordering::SeqCst) {
        broken();
    }
    let _ = local.shutdown(Shutdown::Write);
    let requests = requests.join().unwrap_or(0);
    Ok((requests, pages))
}

fn join_relay(h: RelayHandle) -> std::io::Result<(u64, u64)> {
    h.join()
        .unwrap_or_else(|_| Err(std::io::Error::other("relay panicked")))
}

/// A free loopback port (bound and released: CRIU binds it right after).
pub fn free_loopback_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Source side: connects to CRIU's lazy page server on 127.0.0.1:`port` as soon as it
/// listens (it starts after post-dump), then relays it to `data`.
///
/// CRIU takes an orderly close of its page-server connection for a finished transfer and
/// then ends the dumped tasks; so the end of the destination's stream reaches CRIU as such
/// only once the destination confirmed the commit ([`Verdict::commit`]). Until then, and
/// after [`Verdict::fail`], CRIU gets a broken command instead: its dump fails and the
/// source tasks stay. (The destination closes the stream both when its lazy-pages daemon has
/// every page — possibly before the confirmation arrives — and when its restore failed.)
pub struct SourceRelay {
    handle: RelayHandle,
    verdict: Verdict,
}

impl SourceRelay {
    pub fn start(port: u16, data: Link, wait: Duration) -> SourceRelay {
        let verdict = Verdict {
            inner: Arc::new(VerdictInner {
                decided: Mutex::new(None),
                changed: Condvar::new(),
                local: Mutex::new(None),
                data_end: data.try_clone().ok(),
                poisoned: AtomicBool::new(false),
                criu_ended: AtomicBool::new(false),
            }),
        };
        let v2 = verdict.clone();
        let handle = std::thread::spawn(move || {
            let deadline = Instant::now() + wait;
            let conn = loop {
                // Failed before CRIU listened: it may still do so (the post-dump reply went
                // out before the destination failed) and would then wait in accept for
                // ever, so connect and poison it; unless it has ended without listening.
                if v2.decided() == Some(false) && v2.inner.criu_ended.load(Ordering::SeqCst) {
                    return Err(std::io::Error::other("poisoned"));
                }
                match TcpStream::connect(("127.0.0.1", port)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            };
            let _ = conn.set_nodelay(true);
            *v2.inner.local.lock().unwrap_or_else(|e| e.into_inner()) = conn.try_clone().ok();
            if v2.decided() == Some(false) {
                v2.poison(&conn);
                return Err(std::io::Error::other("poisoned"));
            }
            let (data2, conn2) = (data.try_clone()?, conn.try_clone()?);
            let _ = data.set_read_timeout(None);
            let _ = conn.set_read_timeout(None);
            // CRIU → destination: pages, until CRIU closes.
            let back = std::thread::spawn(move || copy_then_close(conn2, data2));
            // Destination → CRIU: requests, until the destination closes; then the verdict.
            let (fwd, _) = copy_until_end(data, &mut &conn);
            if v2.wait(wait) == Some(true) {
                let _ = conn.shutdown(Shutdown::Write);
            } else {
                v2.poison(&conn);
            }
            let back = back.join().unwrap_or(0);
            Ok((fwd, back))
        });
        SourceRelay { handle, verdict }
    }

    /// The handle through which the commit's outcome reaches the relay.
    pub fn verdict(&self) -> Verdict {
        self.verdict.clone()
    }

    /// CRIU's dump has ended: a relay that has not connected yet stops trying once the
    /// migration failed (a failed dump may never have listened).
    pub fn criu_ended(&self) {
        self.verdict.inner.criu_ended.store(true, Ordering::SeqCst);
    }

    pub fn join(self) -> std::io::Result<(u64, u64)> {
        join_relay(self.handle)
    }
}

struct VerdictInner {
    decided: Mutex<Option<bool>>,
    changed: Condvar,
    local: Mutex<Option<TcpStream>>,
    data_end: Option<Link>,
    /// CRIU's stream was poisoned ([`fail`](Verdict::fail) and the relay thread both may).
    poisoned: AtomicBool,
    /// See [`SourceRelay::criu_ended`].
    criu_ended: AtomicBool,
}

/// The commit's outcome for a [`SourceRelay`]: decided once, by the first call.
#[derive(Clone)]
pub struct Verdict {
    inner: Arc<VerdictInner>,
}

impl Verdict {
    /// The destination confirmed: CRIU may finish the transfer when the stream ends.
    pub fn commit(&self) {
        self.decide(true);
    }

    /// The migration failed: CRIU's lazy page server gets a broken command now (its dump
    /// fails, the tasks stay), and the stream to the destination ends, so that neither
    /// side's relay waits for the other.
    pub fn fail(&self) {
        if !self.decide(false) {
            return;
        }
        if let Some(s) = self
            .inner
            .local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            self.poison(s);
        }
        if let Some(d) = self.inner.data_end.as_ref() {
            let _ = d.shutdown(Shutdown::Both);
        }
    }

    /// Poisons CRIU's stream `s`, once: a second truncated command would be noise after the
    /// first (and could reach CRIU before the shutdown of the first).
    fn poison(&self, s: &TcpStream) {
        if !self.inner.poisoned.swap(true, Ordering::SeqCst) {
            poison_stream(s);
        }
    }

    /// Records `v` unless already decided; true if this call decided.
    fn decide(&self, v: bool) -> bool {
        let mut d = self.inner.decided.lock().unwrap_or_else(|e| e.into_inner());
        if d.is_some() {
            return false;
        }
        *d = Some(v);
        self.inner.changed.notify_all();
        true
    }

    fn decided(&self) -> Option<bool> {
        *self.inner.decided.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits up to `limit` for the outcome.
    fn wait(&self, limit: Duration) -> Option<bool> {
        let d = self.inner.decided.lock().unwrap_or_else(|e| e.into_inner());
        let (d, _) = self
            .inner
            .changed
            .wait_timeout_while(d, limit, |d| d.is_none())
            .unwrap_or_else(|e| e.into_inner());
        *d
    }
}

/// A truncated page-server command, then close: CRIU reads a short command and fails.
fn poison_stream(s: &TcpStream) {
    let mut w = s;
    let _ = std::io::Write::write_all(&mut w, &[0xff]);
    let _ = s.shutdown(Shutdown::Both);
}

/// Destination side: a loopback listener for CRIU's lazy-pages daemon; the first connection
/// is relayed to `data` (see [`pump_pages`] for `broken`).
pub fn destination_relay(
    data: Link,
    wait: Duration,
    broken: Box<dyn FnOnce() + Send>,
) -> std::io::Result<DestinationRelay> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    l.set_nonblocking(true)?;
    let data_end = data.try_clone()?;
    let cancelled = Arc::new(AtomicBool::new(false));
    let c2 = cancelled.clone();
    let handle = std::thread::spawn(move || {
        let deadline = Instant::now() + wait;
        let local = loop {
            if c2.load(Ordering::SeqCst) {
                return Err(std::io::Error::other("cancelled"));
            }
            match l.accept() {
                Ok((s, _)) => break s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Err(e) => return Err(e),
            }
        };
        local.set_nonblocking(false)?;
        let _ = local.set_nodelay(true);
        pump_pages(local, data, broken)
    });
    Ok(DestinationRelay {
        port,
        handle,
        data_end,
        cancelled,
    })
}

/// The destination's relay thread and what ends it early.
pub struct DestinationRelay {
    /// Where the lazy-pages daemon is to connect.
    pub port: u16,
    handle: RelayHandle,
    data_end: Link,
    cancelled: Arc<AtomicBool>,
}

impl DestinationRelay {
    /// Waits until both directions ended; yields the bytes copied each way.
    pub fn join(self) -> std::io::Result<(u64, u64)> {
        join_relay(self.handle)
    }

    /// The migration failed: close the data connection (the source's CRIU sees its lazy
    /// page server's peer go and fails, so the source resumes) and stop waiting for a
    /// daemon that will not come.
    pub fn cancel(self) {
        self.cancelled.store(true, Ordering::SeqCst);
        let _ = self.data_end.shutdown(Shutdown::Both);
        let _ = self.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A `broken` hook for [`destination_relay`] that records whether it ran.
    fn broken_probe() -> (Box<dyn FnOnce() + Send>, Arc<AtomicBool>) {
        let ran = Arc::new(AtomicBool::new(false));
        let r2 = ran.clone();
        (Box::new(move || r2.store(true, Ordering::SeqCst)), ran)
    }

    /// Data connection x <-> y; the destination relay listens for "lazy-pages" (z).
    fn relay_pair(broken: Box<dyn FnOnce() + Send>) -> (TcpStream, DestinationRelay) {
        let (x, y) = tcp_pair();
        let h = destination_relay(Link::Tcp(y), Duration::from_secs(5), broken).unwrap();
        (x, h)
    }

    /// Two ends of one loopback TCP connection.
    fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let x = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (y, _) = l.accept().unwrap();
        (x, y)
    }

    #[test]
    fn relays_both_ways_and_closes() {
        let (broken, ran) = broken_probe();
        let (mut x, h) = relay_pair(broken);
        let mut z = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
        z.write_all(b"request").unwrap();
        let mut buf = [0u8; 7];
        x.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"request");
        x.write_all(b"pages").unwrap();
        let mut buf = [0u8; 5];
        z.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pages");
        // The daemon has everything: it closes first, and only then does the source.
        drop(z);
        let mut rest = [0u8; 1];
        assert_eq!(
            x.read(&mut rest).unwrap(),
            0,
            "the daemon's end did not reach x"
        );
        x.shutdown(Shutdown::Write).unwrap();
        let (a, b) = h.join().unwrap();
        assert_eq!((a, b), (7, 5));
        assert!(
            !ran.load(Ordering::SeqCst),
            "broken ran after a complete transfer"
        );
    }

    /// The source's pages stop while the daemon still waits for some: `broken` runs, and
    /// only after it does the daemon read the end of its stream.
    #[test]
    fn pages_ending_before_the_daemon_is_done_run_broken_first() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let (x, h) = relay_pair(Box::new(move || {
            std::thread::sleep(Duration::from_millis(200));
            s2.lock().unwrap().push("broken");
        }));
        let mut z = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
        z.write_all(b"request").unwrap();
        drop(x);
        let mut buf = Vec::new();
        let _ = z.read_to_end(&mut buf);
        seen.lock().unwrap().push("daemon saw the end");
        assert_eq!(*seen.lock().unwrap(), ["broken", "daemon saw the end"]);
        drop(z);
        h.join().unwrap();
    }

    /// A cancelled relay whose daemon never connected closes the data connection at once
    /// (the peer reads EOF) and its thread ends well before its wait.
    #[test]
    fn cancel_before_the_daemon_connects_closes_the_data_connection() {
        let (mut x, y) = tcp_pair();
        let h = destination_relay(Link::Tcp(y), Duration::from_secs(120), Box::new(|| ())).unwrap();
        x.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let t0 = Instant::now();
        h.cancel();
        let mut buf = [0u8; 1];
        assert_eq!(x.read(&mut buf).unwrap(), 0, "data connection not closed");
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    }

    /// The destination ends its stream before the commit is confirmed (its lazy-pages
    /// daemon can have every page by then): CRIU sees the orderly end only after commit().
    /// Ended by a failure instead, CRIU reads a broken command.
    #[test]
    fn source_relay_ends_criu_s_stream_by_the_verdict() {
        for committed in [true, false] {
            let criu = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = criu.local_addr().unwrap().port();
            let (mut x, y) = tcp_pair();
            let r = SourceRelay::start(port, Link::Tcp(y), Duration::from_secs(20));
            let (mut c, _) = criu.accept().unwrap();
            c.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            x.write_all(b"req").unwrap();
            x.shutdown(Shutdown::Write).unwrap();
            let mut buf = [0u8; 3];
            c.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"req");
            let e = c.read(&mut buf).unwrap_err();
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "CRIU saw the stream end before the verdict: {e}"
            );
            if committed {
                r.verdict().commit();
            } else {
                r.verdict().fail();
            }
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest);
            if committed {
                assert!(rest.is_empty(), "{rest:?}");
            } else {
                assert_eq!(rest, [0xff]);
            }
            drop(c);
            r.join().unwrap();
        }
    }

    /// A poisoned source relay stops trying to reach a CRIU that never listens, once its
    /// dump has ended.
    #[test]
    fn poisoned_source_relay_stops_connecting() {
        let (_x, y) = tcp_pair();
        let port = free_loopback_port().unwrap();
        let r = SourceRelay::start(port, Link::Tcp(y), Duration::from_secs(120));
        let t0 = Instant::now();
        r.verdict().fail();
        r.criu_ended();
        assert!(r.join().is_err());
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    }

    /// The migration fails before CRIU's lazy page server listens, and it listens after
    /// that (the post-dump reply went out first): the relay still connects and poisons it,
    /// so that CRIU does not wait in accept for ever.
    #[test]
    fn a_source_relay_failed_early_poisons_a_late_listener() {
        let (_x, y) = tcp_pair();
        let port = free_loopback_port().unwrap();
        let r = SourceRelay::start(port, Link::Tcp(y), Duration::from_secs(120));
        r.verdict().fail();
        std::thread::sleep(Duration::from_millis(100));
        let criu = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let (mut c, _) = criu.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert_eq!(got, [0xff], "a truncated command, then the end");
        r.criu_ended();
        assert!(r.join().is_err());
    }
}
