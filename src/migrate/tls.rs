//! Optional TLS for migrations: TLS 1.3 only, both sides authenticated by certificates
//! issued by one CA (rustls with the ring provider).
//!
//! With `--tls-cert/--tls-key/--tls-ca`, each connection of a migration (control and data)
//! goes through three steps on its TCP socket:
//!
//! 1. the TLS handshake ([`connect`] on the source, [`accept`] on the destination): the
//!    destination presents its certificate and requires one from the source; both must chain
//!    to the CA of `--tls-ca`;
//! 2. the token handshake of [`super::auth`], inside TLS (defence in depth: a certificate
//!    alone migrates nothing, nor does the token alone);
//! 3. [`spawn_pump`]: a thread takes over the TLS session and ferry gets a local AF_UNIX
//!    socket in its place. CRIU's page server reads and writes a raw socket (`ps.fd`) and
//!    cannot speak TLS; the local socket is what it (or ferry's control channel, or the
//!    post-copy relays) uses exactly as it used the TCP socket, and the pump encrypts what
//!    it reads from the other end onto the TCP connection and decrypts what arrives into it.
//!
//! Names: the source checks the destination's certificate against the host part of `--to`
//! (an IP address must be in an IP SAN, a name in a DNS SAN). The destination checks only
//! that the source's certificate chains to its CA: any certificate of that CA may connect
//! (and still needs the token), so the CA should be one dedicated to ferry.
//!
//! Closing mirrors TCP. The local side's EOF (every descriptor of its end closed, or a
//! shutdown for writing) becomes `close_notify` and a TCP half-close once everything before
//! it was sent; the peer's `close_notify` becomes EOF on the local side. Anything abnormal —
//! a TLS or TCP error, a TCP EOF without `close_notify` (truncation), data arriving that the
//! local side can no longer take — aborts: the reason is kept ([`TlsLink::failure`]), the
//! local socket is shut down both ways (CRIU's page server then fails: it ends cleanly only
//! on its protocol's close command) and the TCP connection is reset.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    ClientConfig, ClientConnection, Connection, ConnectionCommon, RootCertStore, ServerConfig,
    ServerConnection, StreamOwned,
};

use super::auth::HANDSHAKE_CAP;
use super::wire::{ErrorMsg, Msg, MAGIC};

/// Largest certificate, key or CA file read.
pub const MAX_PEM_FILE: u64 = 1024 * 1024;
/// Plaintext moved per step in each direction by a pump.
const PUMP_CHUNK: usize = 256 * 1024;
/// Raw TLS bytes read from the network per system call.
const NET_READ: usize = 256 * 1024;
/// Once the local side has closed and everything went out: the longest wait for the peer to
/// close in turn before the connection is dropped.
const LINGER: Duration = Duration::from_secs(30);
/// How long the destination waits for a client's first bytes before its TLS handshake.
const SNIFF_WAIT: Duration = Duration::from_secs(10);

/// Wire kind of the Error a TLS destination sends back to a plaintext ferry.
pub const PLAINTEXT_REFUSED: &str = "tls";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--tls-cert, --tls-key and --tls-ca go together: {0} missing")]
    Incomplete(String),
    #[error("{what} {path}: {why}")]
    File {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("TLS setup: {0}")]
    Config(String),
    #[error("TLS with {peer}: {why}")]
    Handshake { peer: String, why: String },
}

/// The three files given on the command line.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// This host's certificate (chain), PEM.
    pub cert: PathBuf,
    /// Its private key (PKCS#8, RSA or EC), PEM, mode 0600.
    pub key: PathBuf,
    /// The CA certificate(s) that the peer's certificate must chain to, PEM.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// All three flags, or none (no TLS).
    pub fn from_flags(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
    ) -> Result<Option<TlsFiles>, TlsError> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles { cert, key, ca })),
            (cert, key, ca) => {
                let missing: Vec<&str> = [
                    ("--tls-cert", cert.is_none()),
                    ("--tls-key", key.is_none()),
                    ("--tls-ca", ca.is_none()),
                ]
                .into_iter()
                .filter(|(_, m)| *m)
                .map(|(name, _)| name)
                .collect();
                Err(TlsError::Incomplete(missing.join(" and ")))
            }
        }
    }

    /// The destination's configuration: presents `cert`, requires a client certificate
    /// issued by `ca`.
    pub fn server(&self) -> Result<TlsServer, TlsError> {
        let m = self.load()?;
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(m.roots, provider.clone())
            .build()
            .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(m.chain, m.key)
            .map_err(|e| self.key_error(e))?;
        // Every connection is a fresh, fully authenticated session: no resumption.
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(NoServerSessionStorage {});
        Ok(TlsServer {
            config: Arc::new(config),
        })
    }

    /// The source's configuration for the destination `to` (`HOST:PORT`): presents `cert`,
    /// requires the destination's certificate to be issued by `ca` for HOST.
    pub fn client(&self, to: &str) -> Result<TlsClient, TlsError> {
        let name = server_name(to)?;
        let m = self.load()?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(m.roots)
            .with_client_auth_cert(m.chain, m.key)
            .map_err(|e| self.key_error(e))?;
        config.resumption = Resumption::disabled();
        Ok(TlsClient {
            config: Arc::new(config),
            name,
        })
    }

    fn key_error(&self, e: rustls::Error) -> TlsError {
        TlsError::File {
            what: "--tls-key",
            path: self.key.clone(),
            why: format!("does not fit --tls-cert {} ({e})", self.cert.display()),
        }
    }

    fn load(&self) -> Result<Material, TlsError> {
        let chain = load_certs("--tls-cert", &self.cert)?;
        let key = load_key(&self.key)?;
        let mut roots = RootCertStore::empty();
        for c in load_certs("--tls-ca", &self.ca)? {
            roots.add(c).map_err(|e| TlsError::File {
                what: "--tls-ca",
                path: self.ca.clone(),
                why: format!("not a usable CA certificate ({e})"),
            })?;
        }
        Ok(Material {
            chain,
            key,
            roots: Arc::new(roots),
        })
    }
}

struct Material {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM file, capped at [`MAX_PEM_FILE`].
fn read_pem(what: &'static str, path: &Path) -> Result<(Vec<u8>, std::fs::Metadata), TlsError> {
    let bad = |why: String| TlsError::File {
        what,
        path: path.to_path_buf(),
        why,
    };
    let (f, meta) = crate::capped::open_regular(path).map_err(|e| bad(e.to_string()))?;
    if meta.len() > MAX_PEM_FILE {
        return Err(bad(format!("larger than {MAX_PEM_FILE} bytes")));
    }
    let mut buf = Vec::new();
    f.take(MAX_PEM_FILE)
        .read_to_end(&mut buf)
        .map_err(|e| bad(e.to_string()))?;
    Ok((buf, meta))
}

fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let (pem, _) = read_pem(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::File {
            what,
            path: path.to_path_buf(),
            why: format!("unreadable PEM ({e})"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::File {
            what,
            path: path.to_path_buf(),
            why: "no CERTIFICATE in it (PEM expected)".into(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let what = "--tls-key";
    let (pem, meta) = read_pem(what, path)?;
    let bad = |why: String| TlsError::File {
        what,
        path: path.to_path_buf(),
        why,
    };
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(bad("readable by group or others (chmod 600)".into()));
    }
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        bad(format!(
            "no private key in it (PEM: PKCS#8, RSA or EC key expected; {e})"
        ))
    })
}

/// The TLS server name of `HOST:PORT` (or `[V6]:PORT`, or a bare host): an IP address or a
/// DNS name.
pub fn server_name(to: &str) -> Result<ServerName<'static>, TlsError> {
    let host = match to.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => to,
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(host.to_string()).map_err(|_| {
        TlsError::Config(format!(
            "{host:?} (the host of --to) is neither an IP address nor a DNS name"
        ))
    })
}

/// The destination's TLS configuration.
#[derive(Clone)]
pub struct TlsServer {
    config: Arc<ServerConfig>,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsServer")
    }
}

/// The source's TLS configuration and the name the destination's certificate must hold.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsClient({:?})", self.name)
    }
}

impl TlsClient {
    /// The name checked in the destination's certificate.
    pub fn server_name(&self) -> String {
        match &self.name {
            ServerName::DnsName(d) => d.as_ref().to_string(),
            ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
            other => format!("{other:?}"),
        }
    }
}

/// Which end of a handshake this is (for the messages).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

/// Runs the handshake to its end on a blocking socket (its timeouts bound it).
fn complete_handshake<D>(conn: &mut ConnectionCommon<D>, tcp: &mut TcpStream) -> io::Result<()> {
    while conn.is_handshaking() {
        conn.complete_io(tcp)?;
    }
    while conn.wants_write() {
        conn.write_tls(tcp)?;
    }
    Ok(())
}

/// The rustls error inside an I/O error, if any.
fn tls_cause(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// A handshake failure in words that say what to check.
fn explain(peer: &str, side: Side, name: Option<&str>, e: &io::Error) -> TlsError {
    use io::ErrorKind as K;
    let why = match (tls_cause(e), side) {
        (Some(rustls::Error::InvalidCertificate(c)), Side::Client) => format!(
            "the destination's certificate is not accepted ({c}): it must be issued by the CA \
             of --tls-ca for {} (an IP address needs an IP SAN)",
            name.unwrap_or("the host of --to")
        ),
        (Some(rustls::Error::InvalidCertificate(c)), Side::Server) => format!(
            "the source's certificate is not accepted ({c}): it must be issued by the CA of \
             this side's --tls-ca"
        ),
        (Some(rustls::Error::AlertReceived(a)), Side::Client) => format!(
            "the destination refused this host's certificate (TLS alert {a:?}): --tls-cert \
             must be issued by the CA the destination trusts"
        ),
        (Some(rustls::Error::AlertReceived(a)), Side::Server) => format!(
            "the source refused the handshake (TLS alert {a:?}): does its --tls-ca hold the CA \
             of this side's certificate?"
        ),
        (Some(rustls::Error::NoCertificatesPresented), _) => {
            "the source presented no certificate".to_string()
        }
        (
            Some(
                rustls::Error::InvalidMessage(_)
                | rustls::Error::InappropriateMessage { .. }
                | rustls::Error::InappropriateHandshakeMessage { .. },
            ),
            _,
        ) => "the peer does not speak TLS (started without --tls-cert/--tls-key/--tls-ca?)"
            .to_string(),
        (Some(other), _) => other.to_string(),
        (None, Side::Client)
            if matches!(
                e.kind(),
                K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe
            ) =>
        {
            "the destination closed the connection during the TLS handshake (is its ferry \
             serve running without --tls-cert/--tls-key/--tls-ca?)"
                .to_string()
        }
        (None, Side::Server)
            if matches!(
                e.kind(),
                K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe
            ) =>
        {
            "the peer closed the connection during the TLS handshake".to_string()
        }
        (None, _) if matches!(e.kind(), K::WouldBlock | K::TimedOut) => {
            "no answer during the TLS handshake (timed out)".to_string()
        }
        (None, _) => e.to_string(),
    };
    TlsError::Handshake {
        peer: peer.to_string(),
        why,
    }
}

/// Source side: the TLS handshake on a connected socket. `to` names the peer in messages.
pub fn connect(
    tcp: TcpStream,
    client: &TlsClient,
    to: &str,
) -> Result<StreamOwned<ClientConnection, TcpStream>, TlsError> {
    let mut conn = ClientConnection::new(client.config.clone(), client.name.clone())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut tcp = tcp;
    complete_handshake(&mut conn, &mut tcp)
        .map_err(|e| explain(to, Side::Client, Some(&client.server_name()), &e))?;
    Ok(StreamOwned::new(conn, tcp))
}

/// Destination side: the TLS handshake on an accepted socket (its timeouts bound the wait).
/// A plaintext ferry is told in its own framing that TLS is required, then refused.
pub fn accept(
    tcp: TcpStream,
    server: &TlsServer,
    peer: &str,
) -> Result<StreamOwned<ServerConnection, TcpStream>, TlsError> {
    let mut tcp = tcp;
    if starts_with_frame_magic(&tcp) {
        refuse_plaintext(&mut tcp);
        return Err(TlsError::Handshake {
            peer: peer.to_string(),
            why: "a ferry without TLS connected (no --tls-cert/--tls-key/--tls-ca on the \
                  source); refused"
                .into(),
        });
    }
    let mut conn = ServerConnection::new(server.config.clone())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    complete_handshake(&mut conn, &mut tcp).map_err(|e| explain(peer, Side::Server, None, &e))?;
    Ok(StreamOwned::new(conn, tcp))
}

/// Whether the peer's first bytes are the control channel's frame magic (a plaintext ferry
/// always speaks first). Waits for two bytes at most [`SNIFF_WAIT`].
fn starts_with_frame_magic(tcp: &TcpStream) -> bool {
    let deadline = Instant::now() + SNIFF_WAIT;
    let mut buf = [0u8; 2];
    loop {
        match tcp.peek(&mut buf) {
            Ok(2) => return buf == MAGIC,
            Ok(0) | Err(_) => return false,
            Ok(_) if buf[0] != MAGIC[0] => return false,
            Ok(_) if Instant::now() > deadline => return false,
            Ok(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Answers a plaintext ferry's Hello with an Error it can show its user.
fn refuse_plaintext(tcp: &mut TcpStream) {
    let _ = Msg::read_from(tcp, HANDSHAKE_CAP);
    let _ = Msg::Error(ErrorMsg {
        kind: PLAINTEXT_REFUSED.into(),
        message: "this destination requires TLS: give ferry migrate --tls-cert, --tls-key and \
                  --tls-ca"
            .into(),
    })
    .write_to(tcp);
    let _ = tcp.shutdown(Shutdown::Write);
}

/// A TLS failure that surfaced after the handshake (TLS 1.3: a destination that refuses the
/// client's certificate says so with an alert after the client finished its handshake), in
/// the words of [`connect`]/[`accept`]; `None` if `e` carries no TLS error.
pub fn explain_io(peer: &str, server_side: bool, e: &io::Error) -> Option<TlsError> {
    tls_cause(e)?;
    let side = if server_side {
        Side::Server
    } else {
        Side::Client
    };
    Some(explain(peer, side, None, e))
}

/// Source side, after the token handshake failed on a connection error: a destination
/// that refused this host's certificate sent an alert and closed, and writing may have
/// failed before the alert was read. Reads what is left for that alert.
pub fn pending_alert(
    stream: &mut StreamOwned<ClientConnection, TcpStream>,
    to: &str,
) -> Option<TlsError> {
    let _ = stream.sock.set_read_timeout(Some(Duration::from_secs(1)));
    for _ in 0..64 {
        match stream.conn.read_tls(&mut stream.sock) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if let Err(e) = stream.conn.process_new_packets() {
            return Some(explain(
                to,
                Side::Client,
                None,
                &io::Error::new(io::ErrorKind::InvalidData, e),
            ));
        }
    }
    None
}

// ---------------------------------------------------------------------------------------
// The pump
// ---------------------------------------------------------------------------------------

/// What a pump shares with the handles of its local socket.
struct PumpState {
    peer: String,
    /// Why the pump aborted, once it did.
    failure: Mutex<Option<String>>,
    /// Set once everything the local side wrote went out (or the pump ended).
    sent_all: Mutex<bool>,
    sent_all_cv: Condvar,
}

impl PumpState {
    fn set_sent_all(&self) {
        *self.sent_all.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.sent_all_cv.notify_all();
    }
}

/// The local end of a TLS connection run by a pump thread.
pub struct TlsLink {
    local: UnixStream,
    state: Arc<PumpState>,
}

impl TlsLink {
    pub fn local(&self) -> &UnixStream {
        &self.local
    }

    pub fn into_local(self) -> UnixStream {
        self.local
    }

    pub fn try_clone(&self) -> io::Result<TlsLink> {
        Ok(TlsLink {
            local: self.local.try_clone()?,
            state: self.state.clone(),
        })
    }

    /// Why the TLS connection failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.state
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|f| format!("TLS connection with {}: {f}", self.state.peer))
    }

    /// Ends sending (for every handle of this link) and waits at most `wait` until what was
    /// written before went out to the network. For a process about to exit: a TCP socket's
    /// unsent data outlives its process, a pump's does not.
    pub fn finish(&self, wait: Duration) -> bool {
        let _ = self.local.shutdown(Shutdown::Write);
        let deadline = Instant::now() + wait;
        let mut done = self
            .state
            .sent_all
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while !*done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            done = self
                .state
                .sent_all_cv
                .wait_timeout(done, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

/// Hands a handshaken TLS connection to a pump thread; returns the local socket that stands
/// for it. `peer` names the other side in messages.
pub fn spawn_pump(conn: Connection, tcp: TcpStream, peer: &str) -> io::Result<TlsLink> {
    let (mine, theirs) = UnixStream::pair()?;
    tcp.set_nonblocking(true)?;
    mine.set_nonblocking(true)?;
    let state = Arc::new(PumpState {
        peer: peer.to_string(),
        failure: Mutex::new(None),
        sent_all: Mutex::new(false),
        sent_all_cv: Condvar::new(),
    });
    let mut conn = conn;
    // The pump applies its own back-pressure (it reads more plaintext only once the TLS
    // records of the last read went out).
    conn.set_buffer_limit(None);
    let pump = Pump {
        conn,
        tcp,
        local: mine,
        state: state.clone(),
        net: vec![0; NET_READ],
        net_start: 0,
        net_end: 0,
        down: Vec::with_capacity(PUMP_CHUNK + 64 * 1024),
        down_off: 0,
        up: vec![0; PUMP_CHUNK],
        local_eof: false,
        local_gone: false,
        tcp_eof: false,
        peer_done: false,
        local_shut: false,
        tcp_shut: false,
        local_hup: false,
        tcp_hup: false,
    };
    std::thread::Builder::new()
        .name("ferry-tls".into())
        .spawn(move || pump.run_to_end())?;
    Ok(TlsLink {
        local: theirs,
        state,
    })
}

struct Pump {
    conn: Connection,
    tcp: TcpStream,
    local: UnixStream,
    state: Arc<PumpState>,
    /// TLS bytes read from the network, not yet given to rustls: `net[net_start..net_end]`.
    net: Vec<u8>,
    net_start: usize,
    net_end: usize,
    /// Plaintext from the peer, not yet written to the local side: `down[down_off..]`.
    down: Vec<u8>,
    down_off: usize,
    /// Scratch for plaintext read from the local side.
    up: Vec<u8>,
    /// The local side sends no more (EOF read); close_notify is queued.
    local_eof: bool,
    /// The local side takes no more (its end is closed or shut down for reading).
    local_gone: bool,
    /// TCP EOF read.
    tcp_eof: bool,
    /// The peer's close_notify arrived.
    peer_done: bool,
    /// Local side told EOF (shutdown for writing on our end).
    local_shut: bool,
    /// close_notify and everything before it went out; TCP shut down for writing.
    tcp_shut: bool,
    local_hup: bool,
    tcp_hup: bool,
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

impl Pump {
    fn run_to_end(mut self) {
        match self.run() {
            Ok(()) => tracing::debug!(peer = %self.state.peer, "TLS connection closed"),
            Err(why) => {
                tracing::info!(peer = %self.state.peer, "TLS connection aborted: {why}");
                self.abort(why);
            }
        }
        self.state.set_sent_all();
    }

    /// Records `why`, then resets the connection and shuts the local socket both ways.
    fn abort(&mut self, why: String) {
        *self.state.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        // A queued alert, if any, is the peer's best explanation.
        let _ = self.conn.write_tls(&mut self.tcp);
        let _ = nix::sys::socket::setsockopt(
            &self.tcp,
            nix::sys::socket::sockopt::Linger,
            &libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        );
        let _ = self.local.shutdown(Shutdown::Both);
    }

    fn down_pending(&self) -> usize {
        self.down.len() - self.down_off
    }

    fn run(&mut self) -> Result<(), String> {
        let mut linger_until: Option<Instant> = None;
        loop {
            // Everything that can move towards the local side without waiting: decrypting
            // stops when `down` is full (leaving TLS bytes in `net`, or plaintext in rustls),
            // so go on while writing it out makes room.
            loop {
                self.decrypt()?;
                let before = self.down_pending();
                self.write_local();
                if self.down_pending() >= before || self.local_gone {
                    break;
                }
            }
            if self.local_gone && self.down_pending() > 0 {
                return Err("data arrived that the local side no longer reads".into());
            }
            if self.peer_done && self.down_pending() == 0 && !self.local_shut {
                let _ = self.local.shutdown(Shutdown::Write);
                self.local_shut = true;
            }
            if self.tcp_eof && self.net_start == self.net_end && !self.peer_done {
                if self.tcp_shut && self.local_gone {
                    return Ok(()); // closed after us, without close_notify: nothing is lost
                }
                return Err("the peer closed the connection without TLS close_notify".into());
            }
            self.write_net()?;
            if self.local_eof && !self.conn.wants_write() && !self.tcp_shut {
                let _ = self.tcp.shutdown(Shutdown::Write);
                self.tcp_shut = true;
                self.state.set_sent_all();
            }
            if self.tcp_shut && self.local_shut {
                return Ok(());
            }
            let mut timeout = PollTimeout::NONE;
            if self.tcp_shut && self.local_gone {
                let until = *linger_until.get_or_insert_with(|| Instant::now() + LINGER);
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(()); // the peer never closed: drop the connection
                }
                timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            }
            self.wait(timeout)?;
        }
    }

    /// Waits for the sockets and does the reads they allow.
    fn wait(&mut self, timeout: PollTimeout) -> Result<(), String> {
        let want_local_in = !self.local_eof && !self.conn.wants_write();
        let want_local_out = self.down_pending() > 0 && !self.local_gone;
        let want_net_in = !self.tcp_eof
            && !self.peer_done
            && self.net_start == self.net_end
            && self.down_pending() < PUMP_CHUNK;
        let want_net_out = self.conn.wants_write();
        let mut local_ev = PollFlags::empty();
        if want_local_in {
            local_ev |= PollFlags::POLLIN;
        }
        if want_local_out {
            local_ev |= PollFlags::POLLOUT;
        }
        let mut net_ev = PollFlags::empty();
        if want_net_in {
            net_ev |= PollFlags::POLLIN;
        }
        if want_net_out {
            net_ev |= PollFlags::POLLOUT;
        }
        // A socket that reported a hang-up is left out while nothing is wanted from it (else
        // poll would return at once, again and again).
        let poll_local = !local_ev.is_empty() || !self.local_hup;
        let poll_net = !net_ev.is_empty() || !self.tcp_hup;
        let (local_re, net_re) = {
            let mut fds = Vec::with_capacity(2);
            if poll_local {
                fds.push(PollFd::new(self.local.as_fd(), local_ev));
            }
            if poll_net {
                fds.push(PollFd::new(self.tcp.as_fd(), net_ev));
            }
            if fds.is_empty() {
                return Err("stalled: neither side can make progress".into());
            }
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => return Ok(()),
                Err(e) => return Err(format!("poll: {e}")),
            }
            let mut it = fds.iter();
            let l = if poll_local {
                it.next().and_then(|f| f.revents())
            } else {
                None
            };
            let n = if poll_net {
                it.next().and_then(|f| f.revents())
            } else {
                None
            };
            (
                l.unwrap_or(PollFlags::empty()),
                n.unwrap_or(PollFlags::empty()),
            )
        };
        let hup = PollFlags::POLLHUP | PollFlags::POLLERR;
        if local_re.intersects(hup) {
            self.local_hup = true;
            // The local end is closed or shut down: it can still be read to its end, but
            // nothing more can be delivered to it.
            self.local_gone = true;
        }
        if net_re.contains(PollFlags::POLLERR) {
            if let Ok(Some(e)) = self.tcp.take_error() {
                return Err(format!("connection: {e}"));
            }
        }
        if net_re.contains(PollFlags::POLLHUP) {
            self.tcp_hup = true;
        }
        if want_local_in && local_re.intersects(PollFlags::POLLIN | hup) {
            self.read_local()?;
        }
        if want_net_in && net_re.intersects(PollFlags::POLLIN | hup) {
            self.read_net()?;
        }
        Ok(())
    }

    /// Plaintext from the local side into TLS records.
    fn read_local(&mut self) -> Result<(), String> {
        match (&self.local).read(&mut self.up) {
            Ok(0) => {
                self.local_eof = true;
                self.conn.send_close_notify();
                Ok(())
            }
            Ok(n) => self
                .conn
                .writer()
                .write_all(&self.up[..n])
                .map_err(|e| format!("encrypting: {e}")),
            Err(e) if would_block(&e) => Ok(()),
            // ECONNRESET: the local end was closed with data of ours unread.
            Err(e) => Err(format!("local side: {e}")),
        }
    }

    /// TLS bytes from the network (into `net`, once rustls took the previous ones).
    fn read_net(&mut self) -> Result<(), String> {
        self.net_start = 0;
        self.net_end = 0;
        match (&self.tcp).read(&mut self.net) {
            Ok(0) => {
                self.tcp_eof = true;
                Ok(())
            }
            Ok(n) => {
                self.net_end = n;
                Ok(())
            }
            Err(e) if would_block(&e) => Ok(()),
            Err(e) => Err(format!("connection: {e}")),
        }
    }

    /// Feeds `net` to rustls and moves the plaintext into `down`, up to [`PUMP_CHUNK`].
    fn decrypt(&mut self) -> Result<(), String> {
        loop {
            self.take_plaintext()?;
            if self.peer_done || self.net_start == self.net_end || self.down_pending() >= PUMP_CHUNK
            {
                return Ok(());
            }
            let mut pending = &self.net[self.net_start..self.net_end];
            // `take_plaintext` just emptied rustls' plaintext buffer (`down` has room), so
            // this cannot fail for lack of room there.
            match self.conn.read_tls(&mut pending) {
                Ok(0) => return self.take_plaintext(),
                Ok(n) => self.net_start += n,
                Err(e) => return Err(format!("TLS: {e}")),
            }
            if let Err(e) = self.conn.process_new_packets() {
                let _ = self.conn.write_tls(&mut self.tcp);
                return Err(format!("TLS: {e}"));
            }
        }
    }

    /// Moves decrypted plaintext from rustls into `down`.
    fn take_plaintext(&mut self) -> Result<(), String> {
        if self.down_off > 0 {
            self.down.drain(..self.down_off);
            self.down_off = 0;
        }
        while !self.peer_done && self.down.len() < PUMP_CHUNK {
            let len = self.down.len();
            self.down.resize(len + 64 * 1024, 0);
            let r = self.conn.reader().read(&mut self.down[len..]);
            match r {
                Ok(0) => {
                    self.down.truncate(len);
                    self.peer_done = true;
                }
                Ok(n) => self.down.truncate(len + n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.down.truncate(len);
                    break;
                }
                Err(e) => {
                    self.down.truncate(len);
                    return Err(format!("TLS: {e}"));
                }
            }
        }
        Ok(())
    }

    /// Plaintext to the local side, as much as it takes.
    fn write_local(&mut self) {
        while self.down_pending() > 0 && !self.local_gone {
            match (&self.local).write(&self.down[self.down_off..]) {
                Ok(n) => self.down_off += n,
                Err(e) if would_block(&e) => return,
                // EPIPE: nobody reads the local side any more.
                Err(_) => self.local_gone = true,
            }
        }
    }

    /// TLS records to the network, as much as it takes.
    fn write_net(&mut self) -> Result<(), String> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.tcp) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if would_block(&e) => return Ok(()),
                Err(e) => return Err(format!("connection: {e}")),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::migrate::auth::Token;
    use crate::migrate::link::{self, Link};
    use crate::migrate::wire::{Role, WireError};
    use crate::migrate::MigrateError;
    use crate::ops::ErrorKind;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    use std::net::TcpListener;
    use std::os::unix::fs::OpenOptionsExt;

    /// A CA made at run time, and files of host certificates it issues.
    pub(crate) struct Pki {
        pub dir: tempfile::TempDir,
        pub ca: PathBuf,
        issuer: Issuer<'static, KeyPair>,
    }

    fn write(path: &Path, text: &str, mode: u32) {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    impl Pki {
        pub fn new(name: &str) -> Pki {
            let dir = tempfile::tempdir().unwrap();
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, name);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = p.self_signed(&key).unwrap();
            let ca = dir.path().join(format!("{name}.crt"));
            write(&ca, &cert.pem(), 0o644);
            Pki {
                dir,
                ca,
                issuer: Issuer::new(p, key),
            }
        }

        /// A host certificate for `sans` (usable as server and client), as TLS files that
        /// trust this CA.
        pub fn host(&self, name: &str, sans: &[&str]) -> TlsFiles {
            let key = KeyPair::generate().unwrap();
            let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
            let mut p = CertificateParams::new(sans).unwrap();
            p.distinguished_name.push(DnType::CommonName, name);
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = p.signed_by(&key, &self.issuer).unwrap();
            let files = TlsFiles {
                cert: self.dir.path().join(format!("{name}.crt")),
                key: self.dir.path().join(format!("{name}.key")),
                ca: self.ca.clone(),
            };
            write(&files.cert, &cert.pem(), 0o644);
            write(&files.key, &key.serialize_pem(), 0o600);
            files
        }
    }

    const TOKEN: &[u8] = b"0123456789abcdef0123";

    fn token() -> Token {
        Token::new(TOKEN).unwrap()
    }

    type Served = std::thread::JoinHandle<Result<(Link, String), MigrateError>>;

    /// A destination on 127.0.0.1 that sets up one connection (plain when `tls` is None);
    /// the thread returns what `link::server` returned.
    fn serve_one(tls: Option<TlsServer>) -> (String, Served) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || {
            let (tcp, peer) = l.accept().unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            link::server(tcp, &peer.to_string(), tls.as_ref(), &token(), || {
                "s1".into()
            })
            .map(|(link, _, s)| (link, s))
        });
        (addr, h)
    }

    /// A TLS connection over loopback between hosts of one CA, authenticated: (client, server).
    fn tls_pair() -> (Link, Link) {
        let pki = Pki::new("ca");
        let dst = pki.host("dst", &["127.0.0.1"]);
        let (addr, h) = serve_one(Some(dst.server().unwrap()));
        let client = pki.host("src", &[]).client(&addr).unwrap();
        let c = dial(&addr, &addr, Some(&client)).unwrap();
        let (s, _) = h.join().unwrap().unwrap();
        (c, s)
    }

    fn dial(addr: &str, to: &str, tls: Option<&TlsClient>) -> Result<Link, MigrateError> {
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        link::client(tcp, to, tls, &token(), Role::Control, None).map(|(l, _)| l)
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn flags_go_together() {
        let p = || Some(PathBuf::from("x"));
        assert!(TlsFiles::from_flags(None, None, None).unwrap().is_none());
        assert!(TlsFiles::from_flags(p(), p(), p()).unwrap().is_some());
        let e = TlsFiles::from_flags(p(), None, p()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--tls-cert, --tls-key and --tls-ca go together: --tls-key missing"
        );
        let e = TlsFiles::from_flags(None, None, p()).unwrap_err();
        assert!(e.to_string().ends_with("--tls-cert and --tls-key missing"));
    }

    #[test]
    fn server_names_come_from_to() {
        let ip = |s: &str| matches!(server_name(s).unwrap(), ServerName::IpAddress(_));
        assert!(ip("192.0.2.2:7000"));
        assert!(ip("[2001:db8::1]:7000"));
        assert!(ip("192.0.2.2"));
        assert!(matches!(
            server_name("dst.example:7000").unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(server_name("not a name:7000").is_err());
    }

    #[test]
    fn bad_files_are_named() {
        let pki = Pki::new("ca");
        let good = pki.host("dst", &["127.0.0.1"]);
        assert!(good.server().is_ok());
        assert!(good.client("127.0.0.1:1").is_ok());
        let d = pki.dir.path();

        let garbage = d.join("garbage.pem");
        write(&garbage, "-----BEGIN CERTIFICATE-----\n!!!!\n", 0o600);
        let empty = d.join("empty.pem");
        write(&empty, "", 0o600);
        // A FIFO: opening it for reading must not wait for a writer.
        let fifo = d.join("fifo.key");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let open_key = d.join("open.key");
        write(
            &open_key,
            &std::fs::read_to_string(&good.key).unwrap(),
            0o644,
        );
        let other = pki.host("other", &["127.0.0.1"]);

        let cases: Vec<(TlsFiles, &str, &str)> = vec![
            (
                TlsFiles {
                    cert: garbage.clone(),
                    ..good.clone()
                },
                "--tls-cert",
                "unreadable PEM",
            ),
            (
                TlsFiles {
                    cert: empty.clone(),
                    ..good.clone()
                },
                "--tls-cert",
                "no CERTIFICATE",
            ),
            (
                TlsFiles {
                    ca: garbage.clone(),
                    ..good.clone()
                },
                "--tls-ca",
                "unreadable PEM",
            ),
            (
                TlsFiles {
                    key: empty.clone(),
                    ..good.clone()
                },
                "--tls-key",
                "no private key",
            ),
            (
                TlsFiles {
                    key: good.cert.clone(),
                    ..good.clone()
                },
                "--tls-key",
                "readable by group or others",
            ),
            (
                TlsFiles {
                    key: open_key.clone(),
                    ..good.clone()
                },
                "--tls-key",
                "chmod 600",
            ),
            (
                TlsFiles {
                    key: other.key.clone(),
                    ..good.clone()
                },
                "--tls-key",
                "does not fit --tls-cert",
            ),
            (
                TlsFiles {
                    ca: d.join("missing.pem"),
                    ..good.clone()
                },
                "--tls-ca",
                "No such file",
            ),
            (
                TlsFiles {
                    key: fifo.clone(),
                    ..good.clone()
                },
                "--tls-key",
                "not a regular file",
            ),
            (
                TlsFiles {
                    ca: d.to_path_buf(),
                    ..good.clone()
                },
                "--tls-ca",
                "is a directory",
            ),
        ];
        for (files, flag, words) in cases {
            for r in [
                files.server().map(|_| ()),
                files.client("127.0.0.1:1").map(|_| ()),
            ] {
                let e = r.expect_err("bad TLS files accepted").to_string();
                assert!(
                    e.starts_with(flag) && e.contains(words) && !e.contains('\n'),
                    "{flag} / {words}: {e}"
                );
            }
        }
    }

    #[test]
    fn both_ways_at_once_then_half_closes() {
        let pki = Pki::new("ca");
        let dst = pki.host("dst", &["127.0.0.1"]);
        let src = pki.host("src", &["192.0.2.1"]);
        let (addr, h) = serve_one(Some(dst.server().unwrap()));
        let client = src.client(&addr).unwrap();
        let mut c = dial(&addr, &addr, Some(&client)).unwrap();
        let (mut s, session) = h.join().unwrap().unwrap();
        assert_eq!(session, "s1");
        assert!(matches!((&c, &s), (Link::Tls(_), Link::Tls(_))));

        // 8 MiB each way at the same time (neither side reads until it wrote everything would
        // deadlock without the pumps' buffering of both directions independently).
        let up = pattern(8 << 20, 1);
        let down = pattern(8 << 20, 2);
        let (up2, down2) = (up.clone(), down.clone());
        let mut s2 = s.try_clone().unwrap();
        let server = std::thread::spawn(move || {
            let w = std::thread::spawn(move || {
                s2.write_all(&down2).unwrap();
                s2
            });
            let mut got = vec![0u8; up2.len()];
            s.read_exact(&mut got).unwrap();
            assert!(got == up2, "upstream bytes differ");
            // The client's half-close arrives as EOF.
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty());
            let s2 = w.join().unwrap();
            // Still sending after the peer's half-close, then closing.
            let mut s2 = s2;
            s2.write_all(b"after").unwrap();
            drop(s2);
            drop(s);
        });
        let mut c2 = c.try_clone().unwrap();
        let w = std::thread::spawn(move || {
            c2.write_all(&up).unwrap();
            c2.shutdown(Shutdown::Write).unwrap();
        });
        let mut got = vec![0u8; down.len()];
        c.read_exact(&mut got).unwrap();
        assert!(got == down, "downstream bytes differ");
        w.join().unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"after");
        server.join().unwrap();
        let Link::Tls(t) = &c else { unreachable!() };
        assert!(t.failure().is_none(), "{:?}", t.failure());
    }

    /// Request and answer of odd sizes, one at a time: nothing may stay in a pump's
    /// buffers while the other side waits for it.
    #[test]
    fn ping_pong_never_stalls() {
        let (mut c, mut s) = tls_pair();
        let sizes = [
            1usize,
            4095,
            16_384,
            16_385,
            262_143,
            262_145,
            300_000,
            1 << 20,
            7,
        ];
        let echo = std::thread::spawn(move || {
            for &n in &sizes {
                let mut b = vec![0u8; n];
                s.read_exact(&mut b).unwrap();
                s.write_all(&b).unwrap();
            }
        });
        for (i, &n) in sizes.iter().enumerate() {
            let m = pattern(n, i as u8);
            c.write_all(&m).unwrap();
            let mut b = vec![0u8; n];
            c.read_exact(&mut b).unwrap();
            assert!(b == m, "answer {i} ({n} bytes) differs");
        }
        echo.join().unwrap();
    }

    /// A local side that reads late: the pump's buffers fill up, then drain completely
    /// while the peer waits for an answer (nothing may stay behind in them).
    #[test]
    fn a_late_reader_gets_everything() {
        let (mut c, mut s) = tls_pair();
        for round in 0..4u8 {
            let m = pattern((2 << 20) + 12_345 * usize::from(round), round);
            let (m2, n) = (m.clone(), m.len());
            let sender = std::thread::spawn(move || {
                s.write_all(&m2).unwrap();
                let mut ack = [0u8; 1];
                s.read_exact(&mut ack).unwrap();
                s
            });
            std::thread::sleep(Duration::from_millis(300));
            let mut b = vec![0u8; n];
            c.read_exact(&mut b).unwrap();
            assert!(b == m, "round {round} differs");
            c.write_all(&[round]).unwrap();
            s = sender.join().unwrap();
        }
    }

    #[test]
    fn finish_sends_everything_before_returning() {
        let (mut c, mut s) = tls_pair();
        let data = pattern(3 << 20, 7);
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            got
        });
        c.write_all(&data).unwrap();
        c.finish(Duration::from_secs(10));
        let Link::Tls(t) = &c else { unreachable!() };
        // Everything left the pump: the link can go (as at process exit).
        assert!(t.finish(Duration::ZERO));
        drop(c);
        assert!(reader.join().unwrap() == data);
    }

    #[test]
    fn an_untrusted_client_is_refused() {
        let pki = Pki::new("ca");
        let rogue = Pki::new("rogue-ca");
        let dst = pki.host("dst", &["127.0.0.1"]);
        // Signed by another CA, but trusting the right one.
        let mut src = rogue.host("src", &[]);
        src.ca = pki.ca.clone();
        let (addr, h) = serve_one(Some(dst.server().unwrap()));
        let c = dial(&addr, &addr, Some(&src.client(&addr).unwrap()));
        let s = h.join().unwrap();
        let se = s
            .err()
            .expect("server accepted an untrusted client")
            .to_string();
        assert!(se.contains("source's certificate is not accepted"), "{se}");
        let ce = c.err().expect("client went on").to_string();
        assert!(ce.contains("refused this host's certificate"), "{ce}");
    }

    #[test]
    fn a_destination_of_another_ca_or_name_is_refused() {
        let pki = Pki::new("ca");
        let rogue = Pki::new("rogue-ca");
        let src = pki.host("src", &[]);
        for (dst, to_host, words) in [
            (
                rogue.host("dst", &["127.0.0.1"]),
                "127.0.0.1",
                "not accepted",
            ),
            (pki.host("dst2", &["127.0.0.2"]), "127.0.0.1", "127.0.0.1"),
            (pki.host("dst3", &["dst.example"]), "127.0.0.1", "IP SAN"),
        ] {
            let (addr, h) = serve_one(Some(dst.server().unwrap()));
            let port = addr.rsplit_once(':').unwrap().1;
            let to = format!("{to_host}:{port}");
            let c = dial(&addr, &to, Some(&src.client(&to).unwrap()));
            let ce = c.err().expect("client accepted the destination");
            assert_eq!(ce.kind(), ErrorKind::Invalid);
            let ce = ce.to_string();
            assert!(ce.contains(words), "{ce}");
            let se = h.join().unwrap().err().expect("server went on").to_string();
            assert!(se.contains("source refused the handshake"), "{se}");
        }
    }

    #[test]
    fn plaintext_and_tls_do_not_mix() {
        let pki = Pki::new("ca");
        let dst = pki.host("dst", &["127.0.0.1"]);
        let src = pki.host("src", &[]);

        // A plaintext ferry against a TLS destination is told so, in its own framing.
        let (addr, h) = serve_one(Some(dst.server().unwrap()));
        let e = dial(&addr, &addr, None).err().expect("plaintext accepted");
        assert!(
            matches!(&e, MigrateError::Wire(WireError::Peer { kind, .. }) if kind == PLAINTEXT_REFUSED),
            "{e}"
        );
        assert_eq!(e.kind(), ErrorKind::Invalid);
        assert!(e.to_string().contains("requires TLS"), "{e}");
        let se = h.join().unwrap().err().unwrap().to_string();
        assert!(se.contains("without TLS"), "{se}");

        // A TLS source against a plaintext destination.
        let (addr, h) = serve_one(None);
        let e = dial(&addr, &addr, Some(&src.client(&addr).unwrap()))
            .err()
            .expect("TLS against plaintext");
        assert!(matches!(e, MigrateError::Tls(_)), "{e}");
        assert!(
            e.to_string()
                .contains("without --tls-cert/--tls-key/--tls-ca"),
            "{e}"
        );
        let se = h.join().unwrap().err().unwrap().to_string();
        assert!(se.contains("TLS"), "{se}");
    }

    #[test]
    fn a_truncated_connection_aborts_with_a_reason() {
        let pki = Pki::new("ca");
        let dst = pki.host("dst", &["127.0.0.1"]);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let server = dst.server().unwrap();
        let h = std::thread::spawn(move || {
            let (tcp, _) = l.accept().unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut s = accept(tcp, &server, "client").unwrap();
            crate::migrate::auth::server_handshake(&mut s, &token(), || "s".into()).unwrap();
            s.write_all(b"partial").unwrap();
            s.flush().unwrap();
            // The TCP connection ends without close_notify.
            drop(s);
        });
        let client = pki.host("src", &[]).client(&addr).unwrap();
        let mut c = dial(&addr, &addr, Some(&client)).unwrap();
        h.join().unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"partial");
        let why = c.explain(WireError::Closed).to_string();
        assert!(why.contains("without TLS close_notify"), "{why}");
        // Writes now fail instead of vanishing.
        std::thread::sleep(Duration::from_millis(50));
        assert!(c.write_all(&[0u8; 1 << 16]).is_err());
    }
}

#[cfg(test)]
mod throughput {
    use super::tests::Pki;
    use crate::migrate::auth::Token;
    use crate::migrate::link::{self, Link};
    use crate::migrate::wire::Role;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Instant;

    /// MiB/s of `total` bytes one way through a pair of links (`tls`: both ends pumped).
    fn one_way(tls: bool, total: usize) -> f64 {
        let pki = Pki::new("ca");
        let dst = pki.host("dst", &["127.0.0.1"]);
        let src = pki.host("src", &[]);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let server = tls.then(|| dst.server().unwrap());
        let h = std::thread::spawn(move || {
            let (tcp, peer) = l.accept().unwrap();
            let token = Token::new(b"0123456789abcdef0123").unwrap();
            let (mut s, _, _) =
                link::server(tcp, &peer.to_string(), server.as_ref(), &token, || {
                    "s".into()
                })
                .unwrap();
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0;
            loop {
                match s.read(&mut buf).unwrap() {
                    0 => break,
                    k => n += k,
                }
            }
            n
        });
        let client = tls.then(|| src.client(&addr).unwrap());
        let token = Token::new(b"0123456789abcdef0123").unwrap();
        let tcp = TcpStream::connect(&addr).unwrap();
        let (mut c, _) =
            link::client(tcp, &addr, client.as_ref(), &token, Role::Data, Some("s")).unwrap();
        let chunk = vec![0x5au8; 1 << 20];
        let start = Instant::now();
        for _ in 0..total / chunk.len() {
            c.write_all(&chunk).unwrap();
        }
        c.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(h.join().unwrap(), total);
        let secs = start.elapsed().as_secs_f64();
        if let Link::Tls(t) = &c {
            assert!(t.failure().is_none());
        }
        total as f64 / (1 << 20) as f64 / secs
    }

    /// Not a check: prints what the pumps cost on loopback (`cargo test --release --lib
    /// throughput -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn pump_throughput() {
        for _ in 0..3 {
            let plain = one_way(false, 1 << 30);
            let tls = one_way(true, 1 << 30);
            eprintln!("1 GiB over loopback: plain TCP {plain:.0} MiB/s, TLS pumps {tls:.0} MiB/s");
        }
    }
}
