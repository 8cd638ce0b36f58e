//! Byte relays for post-copy: CRIU's lazy-pages traffic crosses the authenticated data
//! connection instead of a port CRIU opens to the network. On the source, CRIU's lazy page
//! server listens on loopback only and ferry connects to it; on the destination, ferry listens
//! on loopback for CRIU's lazy-pages daemon. The data connection is a [`Link`]: with TLS,
//! the local end of its pump, so the relay is the same either way.

use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::link::{Duplex, Link};

/// A relay thread; it yields the bytes copied each way.
pub type RelayHandle = JoinHandle<std::io::Result<(u64, u64)>>;
use std::time::{Duration, Instant};

/// Copies both ways until both directions end; returns bytes (a→b, b→a).
pub fn pump<A: Duplex, B: Duplex>(a: A, b: B) -> std::io::Result<(u64, u64)> {
    let (a2, b2) = (a.try_clone()?, b.try_clone()?);
    let _ = a.set_read_timeout(None);
    let _ = b.set_read_timeout(None);
    let back = std::thread::spawn(move || copy_then_close(b2, a2));
    let fwd = copy_then_close(a, b);
    let back = back.join().unwrap_or(0);
    Ok((fwd, back))
}

fn copy_then_close(mut from: impl Duplex, mut to: impl Duplex) -> u64 {
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => {
                if std::io::Write::write_all(&mut to, &buf[..k]).is_err() {
                    break;
                }
                n += k as u64;
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    n
}

/// A free loopback port (bound and released: CRIU binds it right after).
pub fn free_loopback_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Source side: connects to CRIU's lazy page server on 127.0.0.1:`port` as soon as it
/// listens (it starts after post-dump), then relays it to `data`.
pub struct SourceRelay {
    handle: RelayHandle,
    local: Arc<Mutex<Option<TcpStream>>>,
    poisoned: Arc<AtomicBool>,
}

impl SourceRelay {
    pub fn start(port: u16, data: Link, wait: Duration) -> SourceRelay {
        let local: Arc<Mutex<Option<TcpStream>>> = Arc::new(Mutex::new(None));
        let poisoned = Arc::new(AtomicBool::new(false));
        let (l2, p2) = (local.clone(), poisoned.clone());
        let handle = std::thread::spawn(move || {
            let deadline = Instant::now() + wait;
            let conn = loop {
                match TcpStream::connect(("127.0.0.1", port)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            };
            let _ = conn.set_nodelay(true);
            *l2.lock().unwrap_or_else(|e| e.into_inner()) = conn.try_clone().ok();
            if p2.load(Ordering::SeqCst) {
                poison_stream(&conn);
                return Err(std::io::Error::other("poisoned"));
            }
            pump(data, conn)
        });
        SourceRelay {
            handle,
            local,
            poisoned,
        }
    }

    /// A handle that can poison this relay from another thread.
    pub fn poisoner(&self) -> Poisoner {
        Poisoner {
            local: self.local.clone(),
            poisoned: self.poisoned.clone(),
        }
    }

    pub fn join(self) -> std::io::Result<(u64, u64)> {
        self.handle
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("relay panicked")))
    }
}

/// Makes CRIU's lazy page server fail, so that the source dump fails and CRIU resumes the
/// tasks instead of ending them (an orderly close would count as a finished transfer).
#[derive(Clone)]
pub struct Poisoner {
    local: Arc<Mutex<Option<TcpStream>>>,
    poisoned: Arc<AtomicBool>,
}

impl Poisoner {
    pub fn poison(&self) {
        self.poisoned.store(true, Ordering::SeqCst);
        if let Some(s) = self
            .local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            poison_stream(s);
        }
    }
}

/// A truncated page-server command, then close: CRIU reads a short command and fails.
fn poison_stream(s: &TcpStream) {
    let mut w = s;
    let _ = std::io::Write::write_all(&mut w, &[0xff]);
    let _ = s.shutdown(Shutdown::Both);
}

/// Destination side: a loopback listener for CRIU's lazy-pages daemon; the first connection
/// is relayed to `data`.
pub fn destination_relay(data: Link, wait: Duration) -> std::io::Result<(u16, RelayHandle)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    l.set_nonblocking(true)?;
    let h = std::thread::spawn(move || {
        let deadline = Instant::now() + wait;
        let local = loop {
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
        pump(local, data)
    });
    Ok((port, h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn relays_both_ways_and_closes() {
        // data connection: x <-> y ; destination relay listens for "lazy-pages" (z)
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut x = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (y, _) = l.accept().unwrap();
        let (port, h) = destination_relay(Link::Tcp(y), Duration::from_secs(5)).unwrap();
        let mut z = TcpStream::connect(("127.0.0.1", port)).unwrap();
        z.write_all(b"request").unwrap();
        let mut buf = [0u8; 7];
        x.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"request");
        x.write_all(b"pages").unwrap();
        let mut buf = [0u8; 5];
        z.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pages");
        drop(z);
        x.shutdown(Shutdown::Write).unwrap();
        let (a, b) = h.join().unwrap().unwrap();
        assert_eq!((a, b), (7, 5));
    }
}
