//! One connection of a migration, as the rest of ferry uses it: the TCP socket itself, or,
//! with TLS, the local socket that a pump thread stands behind (see [`super::tls`]). Either
//! can be read and written, cloned, shut down, handed to CRIU as `ps.fd` or to a relay.
//!
//! [`client`] and [`server`] set a connection up: TLS handshake when configured, then the
//! token handshake (inside TLS), then the pump.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::OwnedFd;
use std::time::Duration;

use super::auth::{client_handshake, server_handshake, Token};
use super::tls::{self, TlsClient, TlsLink, TlsServer};
use super::wire::{Hello, Role, WireError};
use super::MigrateError;

/// A migration connection.
pub enum Link {
    /// Plain TCP: ferry and CRIU use the socket directly.
    Tcp(TcpStream),
    /// TLS: the local end of a pump (an AF_UNIX stream socket).
    Tls(TlsLink),
}

impl Link {
    pub fn try_clone(&self) -> io::Result<Link> {
        Ok(match self {
            Link::Tcp(s) => Link::Tcp(s.try_clone()?),
            Link::Tls(t) => Link::Tls(t.try_clone()?),
        })
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Link::Tcp(s) => s.shutdown(how),
            Link::Tls(t) => t.local().shutdown(how),
        }
    }

    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Link::Tcp(s) => s.set_read_timeout(d),
            Link::Tls(t) => t.local().set_read_timeout(d),
        }
    }

    /// The longest wait for a read or a write (and, for TCP, the socket options of every
    /// migration connection: see `source::tune`).
    pub fn set_io_timeout(&self, d: Duration) {
        match self {
            Link::Tcp(s) => super::source::tune(s, d),
            Link::Tls(t) => {
                let _ = t.local().set_read_timeout(Some(d));
                let _ = t.local().set_write_timeout(Some(d));
            }
        }
    }

    /// A connection error in the words of the layer that failed: with TLS, the local socket
    /// only sees EOF when the pump gave up, and the pump knows why.
    pub fn explain(&self, e: WireError) -> WireError {
        match (self, e) {
            (Link::Tls(t), e @ (WireError::Closed | WireError::Io(_))) => match t.failure() {
                Some(why) => WireError::Io(io::Error::other(why)),
                None => e,
            },
            (_, e) => e,
        }
    }

    /// Before the process exits: ends sending and waits (at most `wait`) until what was
    /// written reached the network. Nothing to do for TCP (the kernel keeps sending after
    /// the process is gone).
    pub fn finish(&self, wait: Duration) {
        if let Link::Tls(t) = self {
            if !t.finish(wait) {
                tracing::debug!("TLS: not everything was sent within {wait:?}");
            }
        }
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Link::Tcp(s) => s.read(buf),
            Link::Tls(t) => t.local().read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Link::Tcp(s) => s.write(buf),
            Link::Tls(t) => t.local().write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl From<Link> for OwnedFd {
    fn from(l: Link) -> OwnedFd {
        match l {
            Link::Tcp(s) => OwnedFd::from(s),
            Link::Tls(t) => OwnedFd::from(t.into_local()),
        }
    }
}

/// What the relays need of either side: a byte stream that can be cloned (one thread per
/// direction) and half-closed.
pub trait Duplex: Read + Write + Send + Sized + 'static {
    fn try_clone(&self) -> io::Result<Self>;
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()>;
}

impl Duplex for TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        TcpStream::shutdown(self, how)
    }
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, d)
    }
}

impl Duplex for Link {
    fn try_clone(&self) -> io::Result<Self> {
        Link::try_clone(self)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        Link::shutdown(self, how)
    }
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        Link::set_read_timeout(self, d)
    }
}

/// A TLS error hidden in a connection error of the token handshake (TLS 1.3: a refused
/// client certificate is only reported after the client's side of the handshake ended).
fn tls_refined(e: MigrateError, peer: &str, server_side: bool) -> MigrateError {
    match &e {
        MigrateError::Wire(WireError::Io(io)) => match tls::explain_io(peer, server_side, io) {
            Some(t) => MigrateError::Tls(t),
            None => e,
        },
        _ => e,
    }
}

/// Source side: on a connected socket to `to`, TLS (when `tls` is given) then the token
/// handshake. Returns the connection and the session id (see [`client_handshake`]).
pub fn client(
    tcp: TcpStream,
    to: &str,
    tls: Option<&TlsClient>,
    token: &Token,
    role: Role,
    session: Option<&str>,
) -> Result<(Link, String), MigrateError> {
    let Some(cfg) = tls else {
        let mut tcp = tcp;
        let s = client_handshake(&mut tcp, token, role, session)?;
        return Ok((Link::Tcp(tcp), s));
    };
    let timeout = tcp.read_timeout().ok().flatten();
    let mut stream = tls::connect(tcp, cfg, to)?;
    let s = match client_handshake(&mut stream, token, role, session) {
        Ok(s) => s,
        Err(e @ MigrateError::Wire(WireError::Io(_) | WireError::Closed)) => {
            return Err(match tls::pending_alert(&mut stream, to) {
                Some(t) => MigrateError::Tls(t),
                None => tls_refined(e, to, false),
            })
        }
        Err(e) => return Err(e),
    };
    let rustls::StreamOwned { conn, sock } = stream;
    let link = Link::Tls(tls::spawn_pump(conn.into(), sock, to).map_err(WireError::Io)?);
    if let Some(t) = timeout {
        link.set_io_timeout(t);
    }
    Ok((link, s))
}

/// Destination side: on an accepted socket from `peer`, TLS (when `tls` is given) then the
/// token handshake. Returns the connection, the peer's Hello and the session id.
pub fn server(
    tcp: TcpStream,
    peer: &str,
    tls: Option<&TlsServer>,
    token: &Token,
    new_session: impl FnOnce() -> String,
) -> Result<(Link, Hello, String), MigrateError> {
    let Some(cfg) = tls else {
        let mut tcp = tcp;
        let (hello, s) = server_handshake(&mut tcp, token, new_session)?;
        return Ok((Link::Tcp(tcp), hello, s));
    };
    let mut stream = tls::accept(tcp, cfg, peer)?;
    let (hello, s) = server_handshake(&mut stream, token, new_session)
        .map_err(|e| tls_refined(e, peer, true))?;
    let rustls::StreamOwned { conn, sock } = stream;
    let link = Link::Tls(tls::spawn_pump(conn.into(), sock, peer).map_err(WireError::Io)?);
    Ok((link, hello, s))
}
