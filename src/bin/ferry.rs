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
    version,
    about = "Checkpoint, restore and live-migrate OCI containers with CRIU"
)]
struct Cli {
    /// More logging on stderr (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Longest wait for any single answer from CRIU, in seconds (criu is killed after it).
    #[arg(long, value_name = "SECS", default_value_t = 300, global = true)]
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
}

#[derive(Args)]
struct Common {
    /// runc's state root (runc --root).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_RUNC_ROOT)]
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
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
}

#[derive(Args)]
struct CheckpointArgs {
    /// Container id.
    id: String,
    /// Directory for CRIU's images (created if missing; must be empty or hold an earlier
    /// checkpoint of the same container).
    #[arg(long, value_name = "DIR")]
    images: PathBuf,
    /// Leave the container running after the checkpoint.
    #[arg(long)]
    leave_running: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct RestoreArgs {
    /// Container id to restore as.
    id: String,
    /// Directory holding a ferry checkpoint.
    #[arg(long, value_name = "DIR")]
    images: PathBuf,
    /// Bundle to restore into (default: the bundle recorded at checkpoint).
    #[arg(long, value_name = "DIR")]
    bundle: Option<PathBuf>,
    /// Restore another container's checkpoint under this id.
    #[arg(long)]
    rename: bool,
    /// Unix socket that receives the pty master of a container with a terminal.
    #[arg(long, value_name = "PATH")]
    console_socket: Option<PathBuf>,
    #[command(flatten)]
    common: Common,
}

fn exit_code(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::Internal => 1,
        ErrorKind::NotFound => 3,
        ErrorKind::Invalid => 4,
        ErrorKind::Environment => 5,
        ErrorKind::Criu => 6,
        ErrorKind::Conflict => 7,
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
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

fn run(cli: Cli) -> Result<ExitCode, OpError> {
    let criu = Criu::from_env().with_timeout(std::time::Duration::from_secs(cli.timeout.max(1)));
    match cli.command {
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
            let req = CheckpointRequest {
                id: a.id,
                runtime_root: a.common.runtime_root,
                images: a.images,
                work_dir: a.common.work_dir,
                settings: DumpSettings {
                    leave_running: a.leave_running,
                    tcp_established: a.common.tcp_established,
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
                    ext_unix_sk: a.common.ext_unix_sk,
                    file_locks: a.common.file_locks,
                    ..Default::default()
                },
                cgroup_paths: None,
            };
            let r = restore(&criu, &req)?;
            if a.common.json {
                print_json(&r).map_err(|e| OpError::Invalid(e.to_string()))?;
            } else {
                println!(
                    "restored {} as pid {} in {} ms",
                    r.container, r.pid, r.elapsed_ms
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
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!(
                "ferry: error: {} (see 'ferry --help')",
                one_line(first.trim_start_matches("error: "))
            );
            return ExitCode::from(2);
        }
    };
    init_logging(cli.verbose);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: error: {}", one_line(&e.to_string()));
            ExitCode::from(exit_code(e.kind()))
        }
    }
}
