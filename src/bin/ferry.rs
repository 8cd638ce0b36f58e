//! `ferry`: checkpoint and restore runc containers through CRIU's RPC.
//!
//! Exit codes (also in the README): 0 success; 1 unexpected failure; 2 usage error;
//! 3 not found (container, images); 4 invalid input; 5 host cannot do it (CRIU missing or too
//! old, not root); 6 CRIU failed; 7 conflict (container exists / is not running); for
//! `ferry check`, 1 when checkpoint/restore cannot work here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use ferry::criu::Criu;
use ferry::oci::options::{DumpSettings, RestoreSettings};
use ferry::oci::state::DEFAULT_RUNC_ROOT;
use ferry::ops::checkpoint::{checkpoint, CheckpointRequest};
use ferry::ops::restore::{restore, RestoreRequest};
use ferry::ops::{check::check, ErrorKind, OpError};

#[derive(Parser)]
#[command(
    name = "ferry",
    version = concat!(env!("CARGO_PKG_VERSION"), " (migration protocol versions: 5)"),
    about = "Checkpoint, restore and live-migrate OCI containers with CRIU"
)]
struct Cli {
    /// More logging on stderr (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Longest wait for any single answer from CRIU, in seconds, at most a day (criu is killed
    /// after it).
    #[arg(long, value_name = "SECS", default_value_t = 300, global = true,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    timeout: u64,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Tell whether checkpoint/restore can work on this host and what is missing.
    Check {
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Checkpoint a running runc container into an images directory.
    Checkpoint(CheckpointArgs),
    /// Restore a checkpoint as a runc container (detached; runc owns it afterwards).
    Restore(RestoreArgs),
    /// Receive migrations (the destination host).
    Serve(ServeArgs),
    /// Live-migrate a running container to a `ferry serve` destination.
    Migrate(MigrateArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on (port 0: any free port; the bound address is printed first).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: String,
    /// File holding the shared token (mode 0600).
    #[arg(long, value_parser = abs_path, value_name = "FILE")]
    token_file: PathBuf,
    /// Where received bundles go (<DIR>/<id>).
    #[arg(long, value_parser = abs_path, value_name = "DIR", default_value = "/var/lib/ferry/bundles")]
    bundles: PathBuf,
    /// runc's state root on this host.
    #[arg(long, value_parser = abs_path, value_name = "DIR", default_value = DEFAULT_RUNC_ROOT)]
    runtime_root: PathBuf,
    /// Scratch space for incoming images.
    #[arg(long, value_parser = abs_path, value_name = "DIR", default_value = "/run/ferry/serve")]
    work_dir: PathBuf,
    /// Place restored containers' cgroups under this name (or NAME/NAME…: a path of
    /// names) in the parent of the cgroup each had on the source.
    #[arg(long, value_parser = cgroup_prefix, value_name = "NAME")]
    cgroup_prefix: Option<String>,
    /// Register received containers as tasks of this containerd (socket path), running
    /// under containerd-shim-ferry-v2; replaces --runtime-root with the shim's.
    #[arg(long, value_name = "ADDRESS")]
    containerd: Option<String>,
    /// containerd namespace for --containerd.
    #[arg(long, value_name = "NS", default_value = "default")]
    namespace: String,
    /// Containers with a network namespace given by path get a new one here with a veth
    /// per interface into a bridge, their addresses and routes (built-in setup). A plain
    /// BRIDGE takes every interface not named in an IFNAME=BRIDGE entry (repeatable).
    #[arg(long, value_name = "[IFNAME=]BRIDGE", conflicts_with = "netns_hook")]
    bridge: Vec<String>,
    /// Instead of the built-in setup: `PROG add|del <id> <netns-path>` configures the locked
    /// namespace ferry created (facts in FERRY_* variables; see the README).
    #[arg(long, value_name = "PROG")]
    netns_hook: Option<PathBuf>,
    /// Who writes the incoming pages: ferry (its own receiver of CRIU's page-server
    /// protocol, 1 MiB steps) or criu (a CRIU page server per round, 64 KiB steps).
    #[arg(long, value_name = "ferry|criu", default_value = "ferry")]
    page_server: String,
    #[command(flatten)]
    tls: TlsArgs,
}

/// TLS 1.3 with certificates on both sides: all three flags or none.
#[derive(Args)]
struct TlsArgs {
    /// This host's certificate (PEM; with TLS, every connection requires one from the peer).
    #[arg(long, value_parser = abs_path, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM, mode 0600).
    #[arg(long, value_parser = abs_path, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// CA certificate(s) the peer's certificate must be issued by (PEM).
    #[arg(long, value_parser = abs_path, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    fn files(
        &self,
    ) -> Result<Option<ferry::migrate::tls::TlsFiles>, ferry::migrate::tls::TlsError> {
        ferry::migrate::tls::TlsFiles::from_flags(
            self.tls_cert.clone(),
            self.tls_key.clone(),
            self.tls_ca.clone(),
        )
    }
}

#[derive(Args)]
struct MigrateArgs {
    /// Container id.
    id: String,
    /// The destination's `ferry serve` address.
    #[arg(long, value_name = "ADDR:PORT")]
    to: String,
    /// File holding the shared token (mode 0600).
    #[arg(long, value_parser = abs_path, value_name = "FILE")]
    token_file: PathBuf,
    /// auto, stop-copy, pre-copy, post-copy or hybrid.
    #[arg(long, default_value = "auto")]
    mode: String,
    /// Most pre-copy rounds.
    #[arg(long, default_value_t = 8)]
    max_rounds: u32,
    /// Freeze the pre-copy policy aims for (at least 1).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    target_downtime_ms: u64,
    /// What stops the pre-copy rounds: adaptive (ferry's), or the anchors' fixed rules
    /// p.haul and one-round, for comparisons.
    #[arg(long, default_value = "adaptive", value_name = "POLICY")]
    rounds_policy: String,
    /// Largest file the container deleted but keeps open whose content is saved with the
    /// checkpoint (bytes, or with a K, M or G suffix; at most 4G-1) [default: CRIU's, 1M].
    #[arg(long, value_parser = ghost_limit, value_name = "SIZE")]
    ghost_limit: Option<u32>,
    /// runc's state root (runc --root).
    #[arg(long, value_parser = abs_path, value_name = "DIR", default_value = DEFAULT_RUNC_ROOT)]
    runtime_root: PathBuf,
    /// The container is a task of this containerd (socket path), running under
    /// containerd-shim-ferry-v2; afterwards the task and container are deleted there.
    #[arg(long, value_name = "ADDRESS")]
    containerd: Option<String>,
    /// containerd namespace for --containerd.
    #[arg(long, value_name = "NS", default_value = "default")]
    namespace: String,
    /// Keep established TCP connections (CRIU's TCP repair, network locked while frozen);
    /// without it they are closed on the destination (CRIU's tcp_close).
    #[arg(long)]
    tcp_established: bool,
    /// Carry the file locks the container's processes hold (taken again on the
    /// destination); without it a container holding one is refused before the freeze.
    #[arg(long)]
    file_locks: bool,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Args)]
struct Common {
    /// runc's state root (runc --root).
    #[arg(long, value_parser = abs_path, value_name = "DIR", default_value = DEFAULT_RUNC_ROOT)]
    runtime_root: PathBuf,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Keep established TCP connections (CRIU's TCP repair).
    #[arg(long)]
    tcp_established: bool,
    /// Allow external (connected to the outside) unix sockets.
    #[arg(long)]
    ext_unix_sk: bool,
    /// Checkpoint/restore file locks.
    #[arg(long)]
    file_locks: bool,
    /// CRIU's work directory (log, stats).
    #[arg(long, value_parser = abs_path, value_name = "DIR")]
    work_dir: Option<PathBuf>,
}

#[derive(Args)]
struct CheckpointArgs {
    /// Container id.
    id: String,
    /// Directory for CRIU's images (created if missing; must be empty or hold an earlier
    /// checkpoint of the same container).
    #[arg(long, value_parser = abs_path, value_name = "DIR")]
    images: PathBuf,
    /// Leave the container running after the checkpoint.
    #[arg(long)]
    leave_running: bool,
    /// Largest file the container deleted but keeps open whose content is saved with the
    /// checkpoint (bytes, or with a K, M or G suffix; at most 4G-1) [default: CRIU's, 1M].
    #[arg(long, value_parser = ghost_limit, value_name = "SIZE")]
    ghost_limit: Option<u32>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct RestoreArgs {
    /// Container id to restore as.
    id: String,
    /// Directory holding a ferry checkpoint.
    #[arg(long, value_parser = abs_path, value_name = "DIR")]
    images: PathBuf,
    /// Bundle to restore into (default: the bundle recorded at checkpoint).
    #[arg(long, value_parser = abs_path, value_name = "DIR")]
    bundle: Option<PathBuf>,
    /// Restore another container's checkpoint under this id.
    #[arg(long)]
    rename: bool,
    /// Unix socket that receives the pty master of a container with a terminal.
    #[arg(long, value_parser = abs_path, value_name = "PATH")]
    console_socket: Option<PathBuf>,
    #[command(flatten)]
    common: Common,
}

/// Path arguments are made absolute against the current directory at parse time: CRIU runs
/// in its work directory and runc records the bundle path, so a relative path would be read
/// against the wrong directory later (a relative --work-dir made CRIU's restore fail to
/// mount its root).
fn abs_path(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("empty path".into());
    }
    std::path::absolute(s).map_err(|e| format!("cannot make {s} absolute: {e}"))
}

/// `--ghost-limit`: bytes, or a number with a K, M or G suffix (powers of 1024), within
/// CRIU's 32-bit field.
fn ghost_limit(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let (digits, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c.to_ascii_uppercase()),
        _ => (t, 'B'),
    };
    let shift = match unit {
        'B' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        _ => return Err(format!("{s:?}: the suffix must be K, M or G")),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{s:?} is not a size (bytes, or a number with K, M or G)"
        ));
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format!("{s:?} is over the most CRIU takes, {} bytes", u32::MAX))
}

/// The error line, with what the user can do about a failure ferry has a flag for.
fn with_hint(msg: String) -> String {
    if msg.contains("Can't dump ghost file") {
        format!(
            "{msg} (a file the container deleted but keeps open is larger than the limit; \
             --ghost-limit raises it)"
        )
    } else {
        msg
    }
}

/// `--cgroup-prefix`: cgroup names joined by `/`, which stay below the parent they are
/// placed in (no `.`, `..`, empty or absolute parts) and name no interface file.
fn cgroup_prefix(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("empty cgroup name".into());
    }
    if s.len() > 1024 {
        return Err(format!("{} bytes (at most 1024)", s.len()));
    }
    for part in s.split('/') {
        let why = if part.is_empty() {
            "an empty name (a leading, trailing or doubled '/')"
        } else if part == "." || part == ".." {
            "'.' or '..' (the prefix stays below the container's parent cgroup)"
        } else if part.len() > 255 {
            "a name longer than 255 bytes"
        } else if part.chars().any(char::is_control) {
            "a control character"
        } else if part.starts_with("cgroup.") {
            "a name of cgroup's own files (cgroup.*)"
        } else {
            continue;
        };
        return Err(format!("contains {why}"));
    }
    Ok(s.to_string())
}

fn exit_code(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::Internal => 1,
        ErrorKind::Interrupted => 10,
        ErrorKind::NotFound => 3,
        ErrorKind::Invalid => 4,
        ErrorKind::Environment => 5,
        ErrorKind::Criu => 6,
        ErrorKind::Conflict => 7,
        ErrorKind::Remote => 8,
        ErrorKind::Network => 9,
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// clap's message up to its usage block, on one line: a missing-arguments error lists the
/// arguments on the lines after its first, and those are the point of the message.
fn usage_error(text: &str) -> String {
    let head = text.split("\n\n").next().unwrap_or("invalid arguments");
    one_line(head.trim_start().trim_start_matches("error: "))
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}

/// Set by SIGINT/SIGTERM; `ferry serve` stops accepting and returns.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn install_stop_handlers() {
    use nix::sys::signal::{SaFlags, Signal};
    install_handlers(
        on_stop_signal,
        SaFlags::empty(),
        &[Signal::SIGINT, Signal::SIGTERM],
    );
}

extern "C" fn on_interrupt_signal(signal: libc::c_int) {
    ferry::ops::interrupt::request(signal);
}

/// For `checkpoint`, `restore` and `migrate`: SIGINT, SIGTERM and SIGHUP ask the operation to
/// stop where that loses nothing ([`ferry::ops::interrupt`]) instead of killing ferry
/// wherever it is. Killed while a post-copy migration serves its pages, ferry took the page
/// relay with it: CRIU's lazy dump failed and resumed the source while the destination ran
/// the container too (two copies), or the destination's copy waited forever for its pages;
/// killed in a restore, it left the restore's mounts and runc state behind.
fn install_interrupt_handlers() {
    use nix::sys::signal::{SaFlags, Signal};
    install_handlers(
        on_interrupt_signal,
        SaFlags::SA_RESTART,
        &[Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP],
    );
}

/// Installs `handler`, which must only store to atomics, for `signals`.
fn install_handlers(
    handler: extern "C" fn(libc::c_int),
    flags: nix::sys::signal::SaFlags,
    signals: &[nix::sys::signal::Signal],
) {
    use nix::sys::signal::{sigaction, SigAction, SigHandler, SigSet};
    let act = SigAction::new(SigHandler::Handler(handler), flags, SigSet::empty());
    for &s in signals {
        // SAFETY: both handlers passed here only store to an atomic, which is
        // async-signal-safe.
        let _ = unsafe { sigaction(s, &act) };
    }
}

fn serve_cmd(
    criu: Criu,
    a: ServeArgs,
    token: ferry::migrate::auth::Token,
    tls: Option<ferry::migrate::tls::TlsServer>,
    page_receiver: ferry::migrate::destination::PageReceiver,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use ferry::migrate::destination::{serve, ServeConfig};
    let mut runtime_root = a.runtime_root;
    let mut on_committed = None;
    if let Some(addr) = a.containerd.clone() {
        use ferry::shim::containerd;
        runtime_root = containerd::runc_root(&addr, &a.namespace);
        let (root, ns) = (runtime_root.clone(), a.namespace.clone());
        on_committed = Some(ferry::migrate::hook::CommitHook::new(
            move |id: &str, bundle: &std::path::Path, pid: i32| {
                containerd::register(&addr, &ns, &root, id, bundle, pid)
            },
        ));
    }
    let cfg = ServeConfig {
        token,
        bundles: a.bundles,
        runtime_root,
        on_committed,
        work_dir: a.work_dir,
        cgroup_prefix: a.cgroup_prefix,
        io_timeout: std::time::Duration::from_secs(300),
        net: match (a.bridge.is_empty(), a.netns_hook) {
            // Checked before (exit 4).
            (false, _) => Some(ferry::net::dest::NetSetup::Bridge(
                ferry::net::dest::Bridges::parse(&a.bridge)?,
            )),
            (true, Some(h)) => Some(ferry::net::dest::NetSetup::Hook(h)),
            (true, None) => None,
        },
        tls,
        page_receiver,
    };
    // The directories first: a wrong one fails before "listening" (and names its flag).
    cfg.make_dirs()?;
    let listener = std::net::TcpListener::bind(&a.listen)
        .with_context(|| format!("--listen {}: cannot listen there", a.listen))?;
    // Everything serve needs (handlers included) is in place before "listening": callers
    // take that line as ready.
    install_stop_handlers();
    println!("listening {}", listener.local_addr()?);
    use std::io::Write;
    std::io::stdout().flush()?;
    serve(listener, cfg, criu, &STOP)?;
    Ok(())
}

/// `HOST:PORT` (`[v6]:PORT` for an IPv6 address) in form; whether HOST resolves is the
/// connection's business.
fn host_and_port(to: &str) -> Result<(), &'static str> {
    let (host, port) = to.rsplit_once(':').ok_or("needs HOST:PORT")?;
    if host.is_empty() || (host.contains(':') && !(host.starts_with('[') && host.ends_with(']'))) {
        return Err("needs HOST:PORT (an IPv6 address in brackets)");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err("the port must be 1-65535"),
    }
}

fn migrate_cmd(criu: Criu, a: MigrateArgs) -> Result<(), (String, ErrorKind)> {
    use ferry::migrate::auth::Token;
    use ferry::migrate::policy::PolicyKind;
    use ferry::migrate::source::{migrate, MigrateRequest, Mode};
    install_interrupt_handlers();
    let mode = Mode::parse(&a.mode).ok_or_else(|| {
        (
            format!(
                "unknown --mode {:?} (auto, stop-copy, pre-copy, post-copy, hybrid)",
                a.mode
            ),
            ErrorKind::Invalid,
        )
    })?;
    let policy = PolicyKind::parse(&a.rounds_policy).ok_or_else(|| {
        (
            format!(
                "unknown --rounds-policy {:?} (adaptive, p.haul, one-round)",
                a.rounds_policy
            ),
            ErrorKind::Invalid,
        )
    })?;
    if a.max_rounds == 0 {
        return Err(("--max-rounds must be at least 1".into(), ErrorKind::Invalid));
    }
    if let Err(why) = host_and_port(&a.to) {
        return Err((format!("--to {}: {why}", a.to), ErrorKind::Invalid));
    }
    let token = Token::load(&a.token_file).map_err(|e| (e.to_string(), e.kind()))?;
    // Certificates are read and checked before anything touches the container.
    let tls_err = |e: ferry::migrate::tls::TlsError| (e.to_string(), ErrorKind::Invalid);
    let tls = match a.tls.files().map_err(tls_err)? {
        Some(files) => Some(files.client(&a.to).map_err(tls_err)?),
        None => None,
    };
    let req = MigrateRequest {
        id: a.id,
        to: a.to,
        token,
        mode,
        max_rounds: a.max_rounds,
        target_downtime_ms: a.target_downtime_ms,
        policy,
        runtime_root: match &a.containerd {
            Some(addr) => ferry::shim::containerd::runc_root(addr, &a.namespace),
            None => a.runtime_root,
        },
        tcp_established: a.tcp_established,
        file_locks: a.file_locks,
        ghost_limit: a.ghost_limit,
        progress: !a.json && std::io::IsTerminal::is_terminal(&std::io::stdout()),
        io_timeout: std::time::Duration::from_secs(300),
        tls,
    };
    let r = migrate(&criu, &req).map_err(|e| (e.to_string(), e.kind()))?;
    if let Some(addr) = &a.containerd {
        // The source's tasks ended at the commit; the shim reports the exit, and the task
        // and container leave this containerd.
        if let Err(e) = ferry::shim::containerd::remove(
            addr,
            &a.namespace,
            &r.container,
            std::time::Duration::from_secs(30),
        ) {
            tracing::warn!("migrated, but the source task is still in containerd: {e}");
        }
    }
    if a.json {
        println!("{}", serde_json::to_string(&r).unwrap_or_default());
    } else {
        println!(
            "migrated {} to {} ({}: {}): downtime {} ms (frozen {} ms), total {} ms, {} bytes sent, pid {} there",
            r.container, r.to, r.mode, r.mode_reason, r.downtime_ms, r.frozen_ms, r.total_ms, r.bytes_sent, r.restored_pid
        );
        let n = r.rounds.len();
        for (i, round) in r.rounds.iter().enumerate() {
            let what = if i + 1 == n { "final dump" } else { "pre-dump" };
            println!(
                "  round {} ({what}): {} pages written of {} scanned, {} bytes, {} ms",
                i + 1,
                round.pages_written,
                round.pages_scanned,
                round.bytes,
                round.ms
            );
        }
        if !r.rounds_reason.is_empty() {
            println!("  rounds stopped: {}", r.rounds_reason);
        }
        if r.paused {
            println!(
                "  paused, as it was here: `runc resume {}` there lets it go on",
                r.container
            );
        }
        if a.tcp_established {
            println!("  TCP connections carried over: {}", r.tcp_connections);
        } else if r.tcp_closed > 0 {
            println!(
                "  TCP connections closed (no --tcp-established): {}",
                r.tcp_closed
            );
        }
    }
    Ok(())
}

fn run(cli: Cli) -> Result<ExitCode, OpError> {
    let criu = Criu::from_env().with_timeout(std::time::Duration::from_secs(cli.timeout));
    match cli.command {
        Cmd::Serve(a) => {
            // Certificates are read and checked before the port is opened.
            let tls = match a
                .tls
                .files()
                .and_then(|f| f.map(|f| f.server()).transpose())
            {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("ferry: error: {}", one_line(&e.to_string()));
                    return Ok(ExitCode::from(exit_code(ErrorKind::Invalid)));
                }
            };
            if let Err(e) = ferry::net::dest::Bridges::parse(&a.bridge) {
                eprintln!("ferry: error: {}", one_line(&e.to_string()));
                return Ok(ExitCode::from(exit_code(ErrorKind::Invalid)));
            }
            use ferry::migrate::destination::PageReceiver;
            let Some(page_receiver) = PageReceiver::parse(&a.page_server) else {
                eprintln!(
                    "ferry: error: unknown --page-server {:?} (ferry, criu)",
                    a.page_server
                );
                return Ok(ExitCode::from(exit_code(ErrorKind::Invalid)));
            };
            // The token and the address are the caller's to get right: checked (exit 4)
            // before anything else, as the certificates are.
            let token = match ferry::migrate::auth::Token::load(&a.token_file) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("ferry: error: {}", one_line(&e.to_string()));
                    return Ok(ExitCode::from(exit_code(e.kind())));
                }
            };
            if let Err(e) = std::net::ToSocketAddrs::to_socket_addrs(a.listen.as_str()) {
                eprintln!(
                    "ferry: error: --listen {}: {}",
                    a.listen,
                    one_line(&e.to_string())
                );
                return Ok(ExitCode::from(exit_code(ErrorKind::Invalid)));
            }
            match serve_cmd(criu, a, token, tls, page_receiver) {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(e) => {
                    eprintln!("ferry: error: {}", one_line(&format!("{e:#}")));
                    let invalid = e.downcast_ref::<std::io::Error>().map(|e| e.kind())
                        == Some(std::io::ErrorKind::InvalidInput);
                    let kind = match invalid {
                        true => ErrorKind::Invalid,
                        false => ErrorKind::Environment,
                    };
                    Ok(ExitCode::from(exit_code(kind)))
                }
            }
        }
        Cmd::Migrate(a) => match migrate_cmd(criu, a) {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err((msg, kind)) => {
                eprintln!("ferry: error: {}", one_line(&with_hint(msg)));
                Ok(ExitCode::from(exit_code(kind)))
            }
        },
        Cmd::Check { json } => {
            let r = check(&criu);
            if json {
                print_json(&r).map_err(|e| OpError::Invalid(e.to_string()))?;
            } else {
                println!(
                    "criu:     {} ({})",
                    r.criu_version.as_deref().unwrap_or("missing"),
                    r.criu_path
                );
                println!("kernel:   {}", r.kernel);
                println!(
                    "features: mem_track={} lazy_pages={} pidfd_store={}",
                    r.features.mem_track, r.features.lazy_pages, r.features.pidfd_store
                );
                println!(
                    "runc:     {}",
                    r.runc_version.as_deref().unwrap_or("missing")
                );
                println!("netlock:  iptables={} nftables={}", r.iptables, r.nftables);
                println!("cgroups:  {}", r.cgroups);
                for w in &r.warnings {
                    println!("warning:  {w}");
                }
                for m in &r.missing {
                    println!("missing:  {m}");
                }
                println!(
                    "{}",
                    if r.ok {
                        "ok: checkpoint/restore can work here"
                    } else {
                        "NOT ok"
                    }
                );
            }
            Ok(if r.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Checkpoint(a) => {
            install_interrupt_handlers();
            let req = CheckpointRequest {
                id: a.id,
                runtime_root: a.common.runtime_root,
                images: a.images,
                work_dir: a.common.work_dir,
                settings: DumpSettings {
                    leave_running: a.leave_running,
                    tcp_established: a.common.tcp_established,
                    ghost_limit: a.ghost_limit,
                    network_lock: ferry::net::lock::host_method().map(|m| m.criu()),
                    ext_unix_sk: a.common.ext_unix_sk,
                    file_locks: a.common.file_locks,
                    ..Default::default()
                },
            };
            let r = checkpoint(&criu, &req)?;
            if a.common.json {
                print_json(&r).map_err(|e| OpError::Invalid(e.to_string()))?;
            } else {
                println!(
                    "checkpointed {} into {}: frozen {:.1} ms, {} pages written, {} ms total",
                    r.container,
                    r.images.display(),
                    r.stats.frozen_time_us as f64 / 1000.0,
                    r.stats.pages_written,
                    r.elapsed_ms
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Restore(a) => {
            install_interrupt_handlers();
            let req = RestoreRequest {
                id: a.id,
                runtime_root: a.common.runtime_root,
                images: a.images,
                bundle: a.bundle,
                rename: a.rename,
                work_dir: a.common.work_dir,
                console_socket: a.console_socket,
                settings: RestoreSettings {
                    tcp_established: a.common.tcp_established,
                    network_lock: ferry::net::lock::host_method().map(|m| m.criu()),
                    ext_unix_sk: a.common.ext_unix_sk,
                    file_locks: a.common.file_locks,
                    ..Default::default()
                },
                cgroup_paths: None,
                null_stdio: false,
                unpause: false,
            };
            let r = restore(&criu, &req)?;
            if a.common.json {
                print_json(&r).map_err(|e| OpError::Invalid(e.to_string()))?;
            } else {
                println!(
                    "restored {} as pid {} in {} ms{}",
                    r.container,
                    r.pid,
                    r.elapsed_ms,
                    match r.paused {
                        true => " (paused, as it was checkpointed: `runc resume` lets it go on)",
                        false => "",
                    }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind as K;
            if matches!(
                e.kind(),
                K::DisplayHelp | K::DisplayVersion | K::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            eprintln!(
                "ferry: error: {} (see 'ferry --help')",
                usage_error(&e.to_string())
            );
            return ExitCode::from(2);
        }
    };
    init_logging(cli.verbose);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: error: {}", one_line(&with_hint(e.to_string())));
            ExitCode::from(exit_code(e.kind()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_error(args: &[&str]) -> String {
        match Cli::try_parse_from(args) {
            Ok(_) => panic!("{args:?} parsed"),
            Err(e) => usage_error(&e.to_string()),
        }
    }

    #[test]
    fn missing_arguments_are_named() {
        let msg = parse_error(&["ferry", "migrate"]);
        assert!(
            msg.contains("<ID>") && msg.contains("--to") && msg.contains("--token-file"),
            "{msg}"
        );
        assert!(!msg.contains("Usage") && !msg.contains('\n'), "{msg}");
    }

    #[test]
    fn ghost_limits_are_sizes_criu_can_take() {
        assert_eq!(ghost_limit("0"), Ok(0));
        assert_eq!(ghost_limit("4096"), Ok(4096));
        assert_eq!(ghost_limit("64K"), Ok(64 << 10));
        assert_eq!(ghost_limit("16m"), Ok(16 << 20));
        assert_eq!(ghost_limit("3G"), Ok(3 << 30));
        assert_eq!(ghost_limit("4294967295"), Ok(u32::MAX));
        for bad in [
            "4G",
            "4294967296",
            "99999999999999999999",
            "18446744073709551615K",
        ] {
            let e = ghost_limit(bad).unwrap_err();
            assert!(e.contains("over the most CRIU takes"), "{bad}: {e}");
        }
        for bad in ["", "M", "-1", "1.5M", "1 M", "0x10"] {
            let e = ghost_limit(bad).unwrap_err();
            assert!(e.contains("is not a size"), "{bad}: {e}");
        }
        assert!(ghost_limit("10T").unwrap_err().contains("K, M or G"));
        let msg = parse_error(&[
            "ferry",
            "checkpoint",
            "x",
            "--images",
            "/i",
            "--ghost-limit",
            "5G",
        ]);
        assert!(
            msg.contains("--ghost-limit") && msg.contains("over the most"),
            "{msg}"
        );
    }

    #[test]
    fn a_ghost_file_over_the_limit_names_the_flag() {
        let criu = "criu dump failed (errno 0): (00.02) Error (criu/files-reg.c:1031): Can't \
                    dump ghost file /tmp/g of 2101248 size, increase limit";
        assert!(with_hint(criu.into()).ends_with("--ghost-limit raises it)"));
        assert_eq!(with_hint("other".into()), "other");
    }

    #[test]
    fn cgroup_prefixes_stay_below_the_parent() {
        let serve = |prefix: &str| {
            Cli::try_parse_from([
                "ferry",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--token-file",
                "/t",
                "--cgroup-prefix",
                prefix,
            ])
        };
        for ok in ["ferry-in", "delegated/ferry", "a.b-c_d"] {
            assert!(serve(ok).is_ok(), "{ok}");
        }
        for (bad, says) in [
            ("", "empty cgroup name"),
            ("/abs", "a leading"),
            ("a//b", "doubled"),
            ("../x", "'..'"),
            ("a/./b", "'.'"),
            ("cgroup.procs", "cgroup's own files"),
            ("a\nb", "control character"),
        ] {
            let msg = match serve(bad) {
                Ok(_) => panic!("{bad:?} parsed"),
                Err(e) => usage_error(&e.to_string()),
            };
            assert!(
                msg.contains("--cgroup-prefix") && msg.contains(says) && !msg.contains('\n'),
                "{bad:?}: {msg}"
            );
        }
    }

    #[test]
    fn zero_timeout_is_refused() {
        let msg = parse_error(&["ferry", "--timeout", "0", "check"]);
        assert!(msg.contains("--timeout") && msg.contains('0'), "{msg}");
        assert!(Cli::try_parse_from(["ferry", "--timeout", "1", "check"]).is_ok());
    }

    /// A wait past what the clock can express used to panic at the first answer from CRIU.
    #[test]
    fn timeout_longer_than_a_day_is_refused() {
        let msg = parse_error(&["ferry", "--timeout", "18446744073709551615", "check"]);
        assert!(msg.contains("--timeout") && msg.contains("86400"), "{msg}");
        assert!(Cli::try_parse_from(["ferry", "--timeout", "86400", "check"]).is_ok());
    }

    #[test]
    fn zero_target_downtime_is_refused() {
        let base = [
            "ferry",
            "migrate",
            "c",
            "--to",
            "127.0.0.1:1",
            "--token-file",
            "/t",
        ];
        let msg = parse_error(&[&base[..], &["--target-downtime-ms", "0"]].concat());
        assert!(
            msg.contains("--target-downtime-ms") && msg.contains('0'),
            "{msg}"
        );
        assert!(Cli::try_parse_from([&base[..], &["--target-downtime-ms", "1"]].concat()).is_ok());
    }
}
