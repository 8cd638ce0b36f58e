//! Live migration over TLS (`--tls-cert/--tls-key/--tls-ca` on both sides) between the two
//! emulated hosts of `common::TwoHosts`, with real CRIU and runc.
//!
//! Certificates are made at run time with the `openssl` CLI, by the same commands as the
//! README's recipe (a CA, one certificate per host with an IP SAN), so that recipe is tested
//! too. No key is ever committed.
//!
//! Needs what tests/migrate.rs needs plus `openssl`; without them the tests print
//! `skipping: …` and pass, unless `CI` is set. Run with `--test-threads=1`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::migration::*;
use common::*;

fn require_tls_rig() -> bool {
    if !require_two_hosts() {
        return false;
    }
    if find_program("openssl").is_some() {
        return true;
    }
    let reason = "`openssl` not found (apt-get install openssl)";
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("CI is set, refusing to skip: {reason}");
    }
    eprintln!("skipping: {reason}");
    false
}

// ---------------------------------------------------------------------------------------
// Certificates, as the README makes them
// ---------------------------------------------------------------------------------------

fn openssl(dir: &Path, args: &[&str]) {
    let mut c = Command::new("openssl");
    c.current_dir(dir).args(args);
    must(run_output(&mut c), &format!("openssl {}", args.join(" ")));
}

/// A CA in its own directory.
struct Pki {
    dir: PathBuf,
    ca: PathBuf,
}

/// A host's certificate and key.
struct HostCert {
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn new(dir: PathBuf, cn: &str) -> Pki {
        fs::create_dir_all(&dir).unwrap();
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "825",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        Pki {
            ca: dir.join("ca.crt"),
            dir,
        }
    }

    /// A certificate for host `name` with subjectAltName `san` (e.g. `IP:192.0.2.2`),
    /// usable as server and client.
    fn host(&self, name: &str, san: &str) -> HostCert {
        openssl(
            &self.dir,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        fs::write(
            self.dir.join(format!("{name}.ext")),
            format!(
                "subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n\
                 basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            ),
        )
        .unwrap();
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "825",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.crt"),
            ],
        );
        let key = self.dir.join(format!("{name}.key"));
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        HostCert {
            cert: self.dir.join(format!("{name}.crt")),
            key,
        }
    }
}

/// `--tls-cert C --tls-key K --tls-ca CA`.
fn tls_flags(h: &HostCert, ca: &Path) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        h.cert.display().to_string(),
        "--tls-key".into(),
        h.key.display().to_string(),
        "--tls-ca".into(),
        ca.display().to_string(),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The two hosts with a CA and a certificate each (for their IP addresses).
struct TlsHosts {
    th: TwoHosts,
    pki: Pki,
    src: HostCert,
    dst: HostCert,
}

impl TlsHosts {
    fn new(name: &str) -> TlsHosts {
        let th = TwoHosts::new(name);
        let pki = Pki::new(th.work_base.join("pki"), "ferry test CA");
        let src = pki.host("src", &format!("IP:{SRC_IP}"));
        let dst = pki.host("dst", &format!("IP:{DST_IP}"));
        TlsHosts { th, pki, src, dst }
    }

    fn serve_tls(&self) -> Serve {
        self.th.serve(&strs(&tls_flags(&self.dst, &self.pki.ca)))
    }

    fn migrate_tls(&self, id: &str, addr: &str, mode: &str) -> FerryOut {
        let mut a = vec!["--mode".to_string(), mode.to_string()];
        a.extend(tls_flags(&self.src, &self.pki.ca));
        self.th.migrate(id, addr, &strs(&a))
    }
}

// ---------------------------------------------------------------------------------------
// What crosses the wire
// ---------------------------------------------------------------------------------------

/// What a capture on the source's veth saw.
#[derive(Debug, Default)]
struct Seen {
    packets: u64,
    /// Packets whose bytes contain the needle.
    hits: u64,
    /// The first TCP payload bytes sent to the serve port (first connection's first bytes).
    first_payload: Option<Vec<u8>>,
}

/// A packet capture (AF_PACKET) on the source's veth, in the source namespace, until
/// stopped or until `budget` bytes were seen (the handshakes and the Prepare message come
/// first; the pages after them need not be scanned).
struct Capture {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<Seen>,
}

impl Capture {
    fn start(th: &TwoHosts, needle: Vec<u8>, port: u16, budget: u64) -> Capture {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let stop = Arc::new(AtomicBool::new(false));
        let (ns, veth, stop2) = (th.src_ns.clone(), th.src_veth.clone(), stop.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = thread::spawn(move || {
            in_netns(&ns, || {
                let proto = (libc::ETH_P_ALL as u16).to_be();
                // SAFETY: plain socket(2) call; the result is checked before use.
                let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32) };
                assert!(
                    raw >= 0,
                    "AF_PACKET socket: {}",
                    std::io::Error::last_os_error()
                );
                // SAFETY: `raw` is a new descriptor that nothing else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                let name = std::ffi::CString::new(veth.clone()).unwrap();
                // SAFETY: if_nametoindex reads a NUL-terminated string that outlives the call.
                let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
                assert!(ifindex > 0, "no interface {veth}");
                // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
                let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = proto;
                sll.sll_ifindex = ifindex as i32;
                // SAFETY: bind(2) with a pointer to a live sockaddr_ll and its exact size.
                let rc = unsafe {
                    libc::bind(
                        fd.as_raw_fd(),
                        (&sll as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    )
                };
                assert_eq!(rc, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 100_000,
                };
                // SAFETY: setsockopt with a pointer to a live timeval and its exact size.
                unsafe {
                    libc::setsockopt(
                        fd.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_RCVTIMEO,
                        (&tv as *const libc::timeval).cast(),
                        std::mem::size_of::<libc::timeval>() as u32,
                    )
                };
                tx.send(()).unwrap();
                let mut seen = Seen::default();
                let mut bytes = 0u64;
                let mut buf = vec![0u8; 65536 + 256];
                while !stop2.load(Ordering::SeqCst) && bytes < budget {
                    // SAFETY: recv(2) into a live buffer of the given length.
                    let n = unsafe {
                        libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                    };
                    if n <= 0 {
                        continue;
                    }
                    let pkt = &buf[..n as usize];
                    bytes += n as u64;
                    seen.packets += 1;
                    if pkt.windows(needle.len()).any(|w| w == needle.as_slice()) {
                        seen.hits += 1;
                    }
                    if seen.first_payload.is_none() {
                        if let Some(p) = tcp_payload_to(pkt, port) {
                            seen.first_payload = Some(p[..p.len().min(8)].to_vec());
                        }
                    }
                }
                seen
            })
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("packet capture did not start");
        Capture { stop, handle }
    }

    fn finish(self) -> Seen {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap()
    }
}

/// The TCP payload of an Ethernet/IPv4 frame sent to `port`, if non-empty.
fn tcp_payload_to(pkt: &[u8], port: u16) -> Option<&[u8]> {
    if pkt.len() < 14 + 20 || pkt[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &pkt[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[9] != 6 || ip.len() < ihl + 20 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
    let tcp = &ip[ihl..total];
    if u16::from_be_bytes([tcp[2], tcp[3]]) != port {
        return None;
    }
    let off = usize::from(tcp[12] >> 4) * 4;
    (tcp.len() > off).then(|| &tcp[off..])
}

/// The bytes the source's Prepare message carries in the clear without TLS.
fn prepare_needle(id: &str) -> Vec<u8> {
    format!("\"container\":\"{id}\"").into_bytes()
}

// ---------------------------------------------------------------------------------------
// Successful migrations
// ---------------------------------------------------------------------------------------

/// Two 256 MiB memwriters, one migrated in the clear and one over TLS (stop-copy), each to
/// its own `ferry serve` on the destination, with a capture on the link: in the clear the
/// first bytes are a ferry frame and the Prepare message is readable; over TLS the first
/// bytes are a TLS handshake record and it is not. Both arrive intact and keep going. The
/// two times are printed (the cost of TLS).
#[test]
fn tls_stop_copy_256m_encrypted_on_the_wire() {
    if !require_tls_rig() {
        return;
    }
    let h = TlsHosts::new("tlswire");
    let th = &h.th;
    let plain_w = start_memwriter(th, "-plain", 256, 16);
    let tls_w = start_memwriter(th, "-tls", 256, 16);
    let plain = th.serve(&[]);
    let tls = h.serve_tls();

    let cap = Capture::start(th, prepare_needle(&plain_w.id), plain.port, 8 << 20);
    let out = th.migrate(&plain_w.id, &plain.addr, &["--mode", "stop-copy"]);
    let seen_plain = cap.finish();
    let v_plain = migrate_json(&out, Some("stop-copy"));
    assert_migrated(th, &plain_w.id, &v_plain);

    let cap = Capture::start(th, prepare_needle(&tls_w.id), tls.port, 8 << 20);
    let out = h.migrate_tls(&tls_w.id, &tls.addr, "stop-copy");
    let seen_tls = cap.finish();
    let v_tls = migrate_json(&out, Some("stop-copy"));
    assert_migrated(th, &tls_w.id, &v_tls);
    assert!(
        json_u64(&v_tls, "bytes_sent") >= 256 * MIB,
        "bytes_sent below the workload's 256 MiB: {v_tls}"
    );

    eprintln!("capture without TLS: {seen_plain:?}\ncapture with TLS: {seen_tls:?}");
    // The capture works: in the clear it sees the frame magic and the Prepare message.
    assert_eq!(
        seen_plain.first_payload.as_deref().map(|p| &p[..2]),
        Some(&b"FY"[..]),
        "first bytes without TLS"
    );
    assert!(seen_plain.hits > 0, "the capture missed the clear Prepare");
    // With TLS: a TLS handshake record first (content type 22, version 3.x), and nothing of
    // the control channel in the clear.
    let first = seen_tls.first_payload.clone().expect("no TCP payload seen");
    assert_eq!(
        &first[..2],
        &[0x16, 0x03],
        "first bytes with TLS: {first:02x?}"
    );
    assert_eq!(
        seen_tls.hits, 0,
        "the Prepare message crossed the link in the clear"
    );

    for w in [&plain_w, &tls_w] {
        let n = read_memwriter_lines(&w.out).len();
        assert_memwriter_continues(&w.out, n, 5);
    }
    eprintln!(
        "256 MiB stop-copy: without TLS total {} ms, downtime {} ms; with TLS total {} ms, \
         downtime {} ms",
        json_u64(&v_plain, "total_ms"),
        json_u64(&v_plain, "downtime_ms"),
        json_u64(&v_tls, "total_ms"),
        json_u64(&v_tls, "downtime_ms")
    );
    assert!(plain.is_alive() && tls.is_alive());
    th.dst_runc().kill_and_delete(&plain_w.id);
    th.dst_runc().kill_and_delete(&tls_w.id);
    th.finish();
}

/// Post-copy over TLS: the lazy pages come through the relays over the TLS data connection;
/// the memwriter's first full check after the restore pulls every page, and all are right.
#[test]
fn tls_memwriter_post_copy_256m() {
    if !require_tls_rig() {
        return;
    }
    let h = TlsHosts::new("tlspost");
    let th = &h.th;
    let w = start_memwriter(th, "", 256, 16);
    let serve = h.serve_tls();
    let out = h.migrate_tls(&w.id, &serve.addr, "post-copy");
    let v = assert_memwriter_migrated(th, &w, &out, Some("post-copy"), 10);
    eprintln!("migrate (post-copy, TLS): {v}");
    assert!(serve.is_alive(), "ferry serve exited after a migration");
    th.dst_runc().kill_and_delete(&w.id);
    th.finish();
}

// ---------------------------------------------------------------------------------------
// Refusals: the source keeps running, the destination stays clean, serve stays up
// ---------------------------------------------------------------------------------------

/// Exit 4 with one error line containing `words`; then the source counter is healthy, the
/// destination clean, `serve` alive.
#[track_caller]
fn assert_refused(h: &TlsHosts, w: &Workload, serve: &Serve, out: &FerryOut, words: &str) {
    assert_failed_with(out, &[4]);
    assert!(out.stderr.contains(words), "expected {words:?}: {out:?}");
    assert_source_counter_healthy(&h.th, w);
    h.th.assert_dst_clean(&w.id, DST_CLEAN_T);
    assert!(
        !h.th.dst_bundle(&w.id).join("rootfs").exists(),
        "a refused peer got a rootfs copied"
    );
    assert!(serve.is_alive(), "ferry serve exited after a refused peer");
}

/// One TLS `ferry serve` refuses, in turn: a source whose certificate another CA issued,
/// a source that does not trust the destination's CA, a source without TLS; a TLS source
/// is refused by a plaintext serve. Each fails with exit 4 and one clear line, the source
/// container keeps counting, the destination stays clean. Then the same TLS serve receives
/// the counter (stop-copy) and it goes on counting.
#[test]
fn tls_refusals_then_counter_stop_copy() {
    if !require_tls_rig() {
        return;
    }
    let h = TlsHosts::new("tlsrefuse");
    let th = &h.th;
    let rogue = Pki::new(th.work_base.join("rogue"), "rogue CA");
    let rogue_src = rogue.host("src", &format!("IP:{SRC_IP}"));
    let w = start_counter(th, "");
    let serve = h.serve_tls();
    let threads = || {
        fs::read_dir(format!("/proc/{}/task", serve.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let idle_threads = threads();
    let migrate = |flags: Vec<String>| {
        let mut a = vec!["--mode".to_string(), "stop-copy".to_string()];
        a.extend(flags);
        th.migrate(&w.id, &serve.addr, &strs(&a))
    };

    // A client certificate of another CA (trusting the right one).
    let out = migrate(tls_flags(&rogue_src, &h.pki.ca));
    assert_refused(&h, &w, &serve, &out, "refused this host's certificate");
    // A client that trusts another CA: the destination's certificate is not accepted.
    let out = migrate(tls_flags(&h.src, &rogue.ca));
    assert_refused(
        &h,
        &w,
        &serve,
        &out,
        "destination's certificate is not accepted",
    );
    // No TLS at all.
    let out = migrate(vec![]);
    assert_refused(&h, &w, &serve, &out, "requires TLS");
    let err = serve.stderr();
    assert!(
        err.contains("certificate is not accepted") && err.contains("without TLS"),
        "serve's log does not say why it refused:\n{err}"
    );

    // TLS against a plaintext serve.
    let plain = th.serve(&[]);
    let out = {
        let mut a = vec!["--mode".to_string(), "stop-copy".to_string()];
        a.extend(tls_flags(&h.src, &h.pki.ca));
        th.migrate(&w.id, &plain.addr, &strs(&a))
    };
    assert_refused(
        &h,
        &w,
        &plain,
        &out,
        "without --tls-cert/--tls-key/--tls-ca",
    );
    assert!(
        plain.stderr().contains("the peer uses TLS"),
        "plaintext serve's log:\n{}",
        plain.stderr()
    );

    // Garbage on the TLS port: the connection is dropped.
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: 192.0.2.2\r\n\r\n"[..],
        &[0u8; 4096][..],
    ] {
        use std::io::{Read, Write};
        let mut c = th.connect_from_src(&serve.addr);
        let _ = c.write_all(junk);
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break, // closed (or reset)
                Ok(_) => {}              // a TLS alert first
            }
        }
    }

    // The TLS serve still works.
    let out = h.migrate_tls(&w.id, &serve.addr, "stop-copy");
    assert_counter_migrated(th, &w, &out, Some("stop-copy"), 20);
    // Every connection thread and TLS pump of this serve ended.
    let start = Instant::now();
    while threads() > idle_threads && start.elapsed() < Duration::from_secs(45) {
        thread::sleep(Duration::from_millis(100));
    }
    // Where each of serve's threads waits (kernel wait channel, syscall), for the message.
    let waits = || {
        fs::read_dir(format!("/proc/{}/task", serve.pid()))
            .map(|d| {
                d.flatten()
                    .map(|t| {
                        let read = |f: &str| {
                            fs::read_to_string(t.path().join(f))
                                .unwrap_or_default()
                                .trim()
                                .to_string()
                        };
                        let syscall = read("syscall");
                        let nr = syscall.split(' ').next().unwrap_or("").to_string();
                        format!(
                            "{}: wchan {} syscall {nr}",
                            t.file_name().to_string_lossy(),
                            read("wchan")
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        threads(),
        idle_threads,
        "ferry serve has threads left after the migrations ended: {:?}",
        waits()
    );
    eprintln!(
        "serve back to {idle_threads} threads after {:?}",
        start.elapsed()
    );
    assert!(serve.is_alive());
    th.dst_runc().kill_and_delete(&w.id);
    th.finish();
}

/// The flags go together and the files are checked before anything happens: one flag
/// missing, or an unreadable / garbage file, fails `ferry migrate` and `ferry serve` with
/// exit 4 and one line; the source container is not touched.
#[test]
fn tls_flags_checked_first() {
    if !require_tls_rig() {
        return;
    }
    let h = TlsHosts::new("tlsflags");
    let th = &h.th;
    let w = start_counter(th, "");
    let garbage = th.work_base.join("garbage.pem");
    fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nnot base64 !!!\n").unwrap();
    let all = tls_flags(&h.src, &h.pki.ca);
    let token = th.token.display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (all[..4].to_vec(), "--tls-ca missing"),
        (all[2..].to_vec(), "--tls-cert missing"),
        (
            vec![all[0].clone(), all[1].clone()],
            "--tls-key and --tls-ca missing",
        ),
        (
            {
                let mut a = all.clone();
                a[1] = garbage.display().to_string();
                a
            },
            "--tls-cert",
        ),
        (
            {
                let mut a = all.clone();
                a[5] = th.work_base.join("missing.pem").display().to_string();
                a
            },
            "--tls-ca",
        ),
        (
            {
                let mut a = all.clone();
                a[3] = h.dst.key.display().to_string();
                a
            },
            "does not fit --tls-cert",
        ),
    ];
    for (flags, words) in &cases {
        let out = th.migrate(&w.id, "192.0.2.2:9", &strs(flags));
        out.assert_error(4);
        assert!(out.stderr.contains(words), "expected {words:?}: {out:?}");
        let mut serve_args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--token-file".into(),
            token.clone(),
        ];
        serve_args.extend(flags.iter().cloned());
        let out = ferry(&serve_args);
        out.assert_error(4);
        assert!(out.stdout.is_empty(), "serve started: {out:?}");
        assert!(out.stderr.contains(words), "expected {words:?}: {out:?}");
    }
    assert_source_counter_healthy(th, &w);
    th.src_runc().kill_and_delete(&w.id);
    th.finish();
}

/// Run a TLS stop-copy migration of `w` to `serve` and call `inject` once 32 MiB crossed the
/// link (memory is on its way). Returns the migration's result.
fn migrate_tls_with_fault(
    h: &TlsHosts,
    w: &Workload,
    serve: &Serve,
    inject: impl FnOnce(),
) -> FerryOut {
    let th = &h.th;
    let base = th.src_tx_bytes();
    thread::scope(|sc| {
        let m = sc.spawn(|| h.migrate_tls(&w.id, &serve.addr, "stop-copy"));
        let start = Instant::now();
        while !m.is_finished()
            && th.src_tx_bytes().saturating_sub(base) < 32 * MIB
            && start.elapsed() < Duration::from_secs(60)
        {
            thread::sleep(Duration::from_millis(1));
        }
        assert!(!m.is_finished(), "the migration ended before the fault");
        inject();
        let t0 = Instant::now();
        let out = m.join().unwrap();
        eprintln!("ferry migrate ended {:?} after the fault", t0.elapsed());
        out
    })
}

/// `ferry serve` is SIGKILLed while memory crosses the TLS link: the pumps end, `ferry
/// migrate` fails, the source memwriter resumes intact, nothing is left on the destination,
/// and a retry to a fresh TLS serve succeeds.
#[test]
fn tls_serve_killed_mid_transfer() {
    if !require_tls_rig() {
        return;
    }
    let h = TlsHosts::new("tlskill");
    let th = &h.th;
    let w = start_memwriter(th, "", 256, 16);
    let serve = h.serve_tls();
    let out = migrate_tls_with_fault(&h, &w, &serve, || serve.kill_hard());
    assert_memwriter_not_migrated(th, &w, &out, &[6, 8, 9], DST_CLEAN_T);

    let serve2 = h.serve_tls();
    let out = h.migrate_tls(&w.id, &serve2.addr, "stop-copy");
    assert_memwriter_migrated(th, &w, &out, Some("stop-copy"), 5);
    th.dst_runc().kill_and_delete(&w.id);
    th.finish();
}

/// The link dies while memory crosses it over TLS and stays down: the pumps notice by the TCP
/// timeouts (no hang), `ferry migrate` fails, the source resumes intact, the destination
/// cleans up by itself; with the link back, a retry to the same TLS serve succeeds.
#[test]
fn tls_link_cut_during_dump() {
    if !require_tls_rig() {
        return;
    }
    let h = TlsHosts::new("tlslink");
    let th = &h.th;
    let w = start_memwriter(th, "", 256, 16);
    let serve = h.serve_tls();
    let t0 = Instant::now();
    let out = migrate_tls_with_fault(&h, &w, &serve, || th.cut_link());
    eprintln!("failed migration took {:?}", t0.elapsed());
    assert_memwriter_not_migrated(th, &w, &out, &[6, 8, 9], Duration::from_secs(120));
    assert!(serve.is_alive(), "ferry serve exited after losing a peer");

    th.restore_link();
    let out = h.migrate_tls(&w.id, &serve.addr, "stop-copy");
    assert_memwriter_migrated(th, &w, &out, Some("stop-copy"), 5);
    th.dst_runc().kill_and_delete(&w.id);
    th.finish();
}

#[test]
fn zz_no_leftovers() {
    if !require_tls_rig() {
        return;
    }
    assert_no_leftovers();
}
