//! The runc binary, called the way the shim needs: every call's exit is awaited through the
//! subreaper monitor ([`ExitWatch`]), output is read on blocking threads, and errors carry
//! runc's own last words (from its JSON log for `create` and `exec`, whose stdio belongs to
//! the container).

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::error::{Result, ShimError};
use super::reaper::ExitWatch;

/// Most bytes of runc output kept (`runc ps` of a large container is the largest).
const MAX_OUTPUT: u64 = 4 << 20;

#[derive(Debug, Clone)]
pub struct RuncCli {
    pub bin: PathBuf,
    pub root: PathBuf,
    /// runc's `--log` (JSON lines) for create/exec errors.
    pub log: PathBuf,
}

/// What a container process gets as stdio, or its console socket.
pub enum ProcIo {
    Pipes([OwnedFd; 3]),
    Console(PathBuf),
}

fn read_capped(r: impl Read + Send + 'static) -> tokio::task::JoinHandle<Vec<u8>> {
    tokio::task::spawn_blocking(move || {
        let mut buf = Vec::new();
        let _ = r.take(MAX_OUTPUT).read_to_end(&mut buf);
        buf
    })
}

impl RuncCli {
    pub fn new(root: &Path, bundle: &Path) -> RuncCli {
        let bin = std::env::var_os("FERRY_RUNC")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("runc"));
        RuncCli {
            bin,
            root: root.to_path_buf(),
            log: bundle.join("runc-log.json"),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root").arg(&self.root).args(args);
        c
    }

    /// Runs runc with captured output; fails with runc's last stderr line.
    pub async fn output(&self, args: &[&str], stdin: Option<Vec<u8>>) -> Result<Vec<u8>> {
        let mut watch = ExitWatch::new().await?;
        let mut cmd = self.command(args);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| self.fail(args, e.to_string()))?;
        let pid = child.id() as i32;
        if let (Some(mut w), Some(data)) = (child.stdin.take(), stdin) {
            tokio::task::spawn_blocking(move || {
                use std::io::Write;
                let _ = w.write_all(&data);
            });
        }
        let out = read_capped(child.stdout.take().expect("piped stdout"));
        let err = read_capped(child.stderr.take().expect("piped stderr"));
        let code = watch.wait(pid).await;
        let out = out.await.unwrap_or_default();
        let err = err.await.unwrap_or_default();
        if code != 0 {
            let why = crate::runtime::last_line(&err).unwrap_or_else(|| "failed".into());
            return Err(self.fail(args, format!("{why} (exit {code})")));
        }
        Ok(out)
    }

    fn fail(&self, args: &[&str], why: String) -> ShimError {
        ShimError::Runc {
            args: args.join(" "),
            why,
        }
    }

    /// The last error runc wrote to its JSON log (read from its last 64 KiB).
    fn last_logged_error(&self) -> Option<String> {
        let text = read_tail(&self.log, 64 * 1024)?;
        text.lines().rev().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v["level"] == "error").then(|| v["msg"].as_str().unwrap_or("").to_string())
        })
    }

    /// Runs `create` or `exec`, whose stdio is the container process's. `watch` must have
    /// been taken before: the caller goes on waiting on it for the container process.
    pub async fn spawn_with_io(
        &self,
        watch: &mut ExitWatch,
        args: &[&str],
        io: Option<ProcIo>,
    ) -> Result<()> {
        let mut full: Vec<String> = vec![
            "--log".into(),
            self.log.to_string_lossy().into_owned(),
            "--log-format".into(),
            "json".into(),
        ];
        let mut console: Option<PathBuf> = None;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--root").arg(&self.root);
        match io {
            Some(ProcIo::Pipes([i, o, e])) => {
                cmd.stdin(Stdio::from(i))
                    .stdout(Stdio::from(o))
                    .stderr(Stdio::from(e));
            }
            Some(ProcIo::Console(p)) => {
                console = Some(p);
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
            }
            None => {
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
            }
        }
        // Global flags first, then the subcommand and its flags.
        let (sub, rest) = args.split_first().expect("a subcommand");
        cmd.args(&full).arg(sub);
        if let Some(p) = &console {
            cmd.arg("--console-socket").arg(p);
        }
        cmd.args(rest);
        full.push((*sub).to_string());
        let mut child = cmd.spawn().map_err(|e| self.fail(args, e.to_string()))?;
        let pid = child.id() as i32;
        // The parent-side copies of the container's stdio must not stay open in `cmd`.
        drop(cmd);
        let _ = child.stdin.take();
        let code = watch.wait(pid).await;
        if code != 0 {
            let why = self
                .last_logged_error()
                .unwrap_or_else(|| format!("exit status {code}"));
            return Err(self.fail(args, why));
        }
        Ok(())
    }
}

/// The last `max` bytes of a file, as text.
fn read_tail(path: &Path, max: u64) -> Option<String> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max))).ok()?;
    let mut buf = Vec::new();
    f.take(max).read_to_end(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// Reads a pid file runc wrote (at most 64 bytes).
pub fn read_pid_file(path: &Path) -> Result<i32> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(64).read_to_string(&mut text))
        .map_err(ShimError::io(format!(
            "reading pid file {}",
            path.display()
        )))?;
    text.trim()
        .parse::<i32>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ShimError::Internal(format!("pid file {}: {text:?}", path.display())))
}
