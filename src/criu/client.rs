//! Typed CRIU requests over [`Swrk`].
//!
//! One operation per swrk process, except that VERSION, FEATURE_CHECK, CPUINFO_* and
//! PAGE_SERVER(_CHLD) may keep the session open, and that after a PRE_DUMP CRIU waits on the
//! same socket for another PRE_DUMP or the final DUMP ([`PreDumpSession`]).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::log::excerpt_from_file;
use super::notify::{Notification, Notify, Reply, Script};
use super::swrk::{bare_request, ChildFds, Received, Swrk};
use super::{CriuError, Result};
use crate::pb::{criu_req_type, CriuFeatures, CriuNotify, CriuOpts};

/// Oldest CRIU ferry works with.
pub const MIN_VERSION: (u32, u32) = (4, 0);
pub const MIN_VERSION_TEXT: &str = "4.0";
/// Default limit for one step of an operation (one response from CRIU).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// CRIU's version as reported by the VERSION request.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct CriuVersion {
    pub major: u32,
    pub minor: u32,
    pub sublevel: u32,
}

impl std::fmt::Display for CriuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.sublevel)
    }
}

impl CriuVersion {
    /// Parses "4.2.1" / "4.2" (e.g. from `criu --version` or a peer).
    pub fn parse(s: &str) -> Option<CriuVersion> {
        let mut it = s.trim().split('.').map(|p| p.parse::<u32>());
        let major = it.next()?.ok()?;
        let minor = it.next()?.ok()?;
        let sublevel = match it.next() {
            Some(v) => v.ok()?,
            None => 0,
        };
        Some(CriuVersion {
            major,
            minor,
            sublevel,
        })
    }

    pub fn at_least(&self, major: u32, minor: u32) -> bool {
        (self.major, self.minor) >= (major, minor)
    }
}

/// Kernel/CRIU features from FEATURE_CHECK.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Features {
    pub mem_track: bool,
    pub lazy_pages: bool,
    pub pidfd_store: bool,
}

/// What a DUMP or RESTORE needs besides its options: the descriptors its option fields refer to.
pub struct Request {
    pub opts: CriuOpts,
    /// Kept open for the call: images_dir_fd / work_dir_fd refer to these by number in our
    /// process (CRIU opens them through /proc/<client>/fd).
    pub images_dir: OwnedFd,
    pub work_dir: Option<OwnedFd>,
    /// Where CRIU writes its log (work dir / log_file), to quote on failure.
    pub log_path: Option<PathBuf>,
}

impl Request {
    /// Fills in the descriptor-number fields from the owned descriptors.
    fn bind_fds(&mut self) {
        self.opts.set_images_dir_fd(self.images_dir.as_raw_fd());
        if let Some(w) = &self.work_dir {
            self.opts.set_work_dir_fd(w.as_raw_fd());
        }
    }
}

/// Outcome of a successful DUMP.
#[derive(Debug, Clone, Default)]
pub struct DumpOutcome {
    /// CRIU's `dump.restored` (true when the dump was of a restored-from-lazy task tree).
    pub restored: bool,
}

/// A running page server started through the RPC.
#[derive(Debug, Clone)]
pub struct PageServer {
    pub pid: i32,
    pub port: i32,
}

impl PageServer {
    /// Waits until the page-server process has exited (it does once the dumping side sent
    /// its last pages and closed; only then are its images complete on disk). The process
    /// is CRIU's grandchild of ours, so it is watched through a pidfd. False on timeout.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        if self.pid <= 0 {
            return true;
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid, 0) };
        if fd < 0 {
            // ESRCH: already gone.
            return std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        }
        // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let mut p = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut p, 1, ms) };
            if n > 0 {
                return true;
            }
            if n == 0 || left.is_zero() {
                return false;
            }
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return false;
            }
        }
    }
}

/// Entry point: where criu is and how long to wait for it.
#[derive(Debug, Clone)]
pub struct Criu {
    path: PathBuf,
    timeout: Duration,
}

impl Criu {
    pub fn new(path: impl Into<PathBuf>) -> Criu {
        Criu {
            path: path.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// `$FERRY_CRIU` if set, else `criu` from PATH (falling back to /usr/local/sbin/criu).
    pub fn from_env() -> Criu {
        if let Some(p) = std::env::var_os("FERRY_CRIU") {
            return Criu::new(PathBuf::from(p));
        }
        let path = std::env::var_os("PATH")
            .and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join("criu"))
                    .find(|p| p.is_file())
            })
            .unwrap_or_else(|| PathBuf::from("/usr/local/sbin/criu"));
        Criu::new(path)
    }

    pub fn with_timeout(mut self, t: Duration) -> Criu {
        self.timeout = t;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Starts a swrk session with the given child descriptors.
    pub fn spawn(&self, fds: ChildFds) -> Result<Swrk> {
        if !self.path.exists() {
            return Err(CriuError::NotFound {
                path: self.path.clone(),
                min: MIN_VERSION_TEXT.into(),
            });
        }
        Swrk::spawn(&self.path, fds)
    }

    /// VERSION.
    pub fn version(&self) -> Result<CriuVersion> {
        let mut s = self.spawn(ChildFds::default())?;
        let v = version_on(&mut s, self.timeout, false)?;
        s.finish(Duration::from_secs(2));
        Ok(v)
    }

    /// VERSION, failing with [`CriuError::TooOld`] below [`MIN_VERSION`].
    pub fn require_version(&self) -> Result<CriuVersion> {
        require_min(self.version()?)
    }

    /// A session for one operation whose CRIU version was checked on the same socket first
    /// (VERSION with keep_open), so an operation costs one criu process.
    pub fn session(&self, fds: ChildFds) -> Result<(Swrk, CriuVersion)> {
        let mut s = self.spawn(fds)?;
        let v = require_min(version_on(&mut s, self.timeout, true)?)?;
        Ok((s, v))
    }

    /// FEATURE_CHECK for mem_track, lazy_pages and pidfd_store.
    pub fn features(&self) -> Result<Features> {
        let mut s = self.spawn(ChildFds::default())?;
        let f = features_on(&mut s, self.timeout, false)?;
        s.finish(Duration::from_secs(2));
        Ok(f)
    }

    /// CHECK: CRIU's own test that checkpoint/restore can work on this kernel.
    pub fn check(&self) -> Result<()> {
        let mut s = self.spawn(ChildFds::default())?;
        let mut req = bare_request(criu_req_type::CHECK);
        req.opts = protobuf::MessageField::some(log_opts_only());
        s.send(&req, "check")?;
        let r = s.recv("check", Some(self.timeout))?;
        expect_success(&r, criu_req_type::CHECK, "check", None)?;
        s.finish(Duration::from_secs(2));
        Ok(())
    }

    /// DUMP (the final one when not leave_running).
    pub fn dump(
        &self,
        req: Request,
        fds: ChildFds,
        notify: &mut dyn Notify,
    ) -> Result<(CriuVersion, DumpOutcome)> {
        let (mut s, v) = self.session(fds)?;
        let out = run_dump(&mut s, req, notify, self.timeout);
        s.finish(Duration::from_secs(5));
        Ok((v, out?))
    }

    /// RESTORE; `before` runs with the criu pid right after spawn, while criu starts up, and
    /// before the request is sent (to place criu in the container's cgroups and add
    /// `cg_root`; moving a process into a cgroup v2 group costs ≈ 10 ms here, which overlaps
    /// criu's exec this way). Returns the restored init's pid.
    pub fn restore(
        &self,
        mut req: Request,
        fds: ChildFds,
        before: impl FnOnce(u32, &mut CriuOpts) -> std::result::Result<(), String>,
        notify: &mut dyn Notify,
    ) -> Result<(CriuVersion, i32)> {
        let mut s = self.spawn(fds)?;
        let pid = s.pid().unwrap_or(0);
        if let Err(reason) = before(pid, &mut req.opts) {
            s.kill();
            return Err(CriuError::Notify {
                script: "prepare-restore".into(),
                reason,
            });
        }
        let v = match version_on(&mut s, self.timeout, true).and_then(require_min) {
            Ok(v) => v,
            Err(e) => {
                s.kill();
                return Err(e);
            }
        };
        req.bind_fds();
        let mut creq = bare_request(criu_req_type::RESTORE);
        creq.opts = protobuf::MessageField::some(req.opts.clone());
        let out = (|| {
            s.send(&creq, "restore")?;
            let r = drive(
                &mut s,
                criu_req_type::RESTORE,
                "restore",
                notify,
                self.timeout,
                req.log_path.as_deref(),
            )?;
            let pid = r.resp.restore.as_ref().map(|x| x.pid()).unwrap_or(0);
            if pid <= 0 {
                return Err(CriuError::Protocol {
                    op: "restore",
                    detail: "restore response without a pid".into(),
                });
            }
            Ok(pid)
        })();
        s.finish(Duration::from_secs(5));
        Ok((v, out?))
    }

    /// Starts an iterative pre-dump session (PRE_DUMP rounds, then the final DUMP).
    pub fn pre_dump_session(&self, fds: ChildFds) -> Result<PreDumpSession> {
        Ok(PreDumpSession {
            swrk: self.session(fds)?.0,
            timeout: self.timeout,
            rounds: 0,
        })
    }

    /// PAGE_SERVER (or PAGE_SERVER_CHLD when `as_child`): starts a page server receiving into
    /// `req`'s images dir; the swrk session is returned so that its lifetime can be tied to
    /// the caller's.
    pub fn page_server(
        &self,
        mut req: Request,
        fds: ChildFds,
        as_child: bool,
    ) -> Result<(PageServer, Swrk)> {
        let mut s = self.spawn(fds)?;
        req.bind_fds();
        let kind = if as_child {
            criu_req_type::PAGE_SERVER_CHLD
        } else {
            criu_req_type::PAGE_SERVER
        };
        let mut creq = bare_request(kind);
        creq.opts = protobuf::MessageField::some(req.opts);
        creq.set_keep_open(true);
        s.send(&creq, "page-server")?;
        let r = s.recv("page-server", Some(self.timeout))?;
        // CRIU answers PAGE_SERVER_CHLD with a PAGE_SERVER response.
        expect_success(
            &r,
            criu_req_type::PAGE_SERVER,
            "page-server",
            req.log_path.as_deref(),
        )?;
        let ps = r.resp.ps.as_ref().ok_or_else(|| CriuError::Protocol {
            op: "page-server",
            detail: "response without page server info".into(),
        })?;
        Ok((
            PageServer {
                pid: ps.pid(),
                port: ps.port(),
            },
            s,
        ))
    }

    /// CPUINFO_DUMP into `req`'s images dir (cpuinfo.img).
    pub fn cpuinfo_dump(&self, req: Request) -> Result<()> {
        self.cpuinfo(req, criu_req_type::CPUINFO_DUMP, "cpuinfo-dump")
    }

    /// CPUINFO_CHECK of the cpuinfo.img in `req`'s images dir against this host.
    pub fn cpuinfo_check(&self, req: Request) -> Result<()> {
        self.cpuinfo(req, criu_req_type::CPUINFO_CHECK, "cpuinfo-check")
    }

    fn cpuinfo(&self, mut req: Request, kind: criu_req_type, op: &'static str) -> Result<()> {
        let mut s = self.spawn(ChildFds::default())?;
        req.bind_fds();
        let mut creq = bare_request(kind);
        creq.opts = protobuf::MessageField::some(req.opts);
        s.send(&creq, op)?;
        let r = s.recv(op, Some(self.timeout))?;
        let out = expect_success(&r, kind, op, req.log_path.as_deref());
        s.finish(Duration::from_secs(2));
        out
    }
}

/// An open pre-dump session: any number of PRE_DUMP rounds, then the final DUMP.
pub struct PreDumpSession {
    swrk: Swrk,
    timeout: Duration,
    rounds: u32,
}

impl PreDumpSession {
    /// A pre-dump session on an already open connection.
    pub fn on(swrk: Swrk, timeout: Duration) -> PreDumpSession {
        PreDumpSession {
            swrk,
            timeout,
            rounds: 0,
        }
    }

    pub fn rounds(&self) -> u32 {
        self.rounds
    }

    /// One PRE_DUMP round. The tasks run again once it returns.
    pub fn pre_dump(&mut self, req: Request, notify: &mut dyn Notify) -> Result<()> {
        run_pre_dump(&mut self.swrk, req, notify, self.timeout)?;
        self.rounds += 1;
        Ok(())
    }

    /// The final DUMP on the same session.
    pub fn dump(mut self, req: Request, notify: &mut dyn Notify) -> Result<DumpOutcome> {
        let out = run_dump(&mut self.swrk, req, notify, self.timeout);
        self.swrk.finish(Duration::from_secs(5));
        out
    }
}

/// One PRE_DUMP round on an open session (see [`Criu::session`]); any number of them may
/// precede the final DUMP on the same session. CRIU runs each round in a child of the swrk
/// process, so descriptors the session inherited (a page-server socket) stay open for the
/// next round.
pub fn run_pre_dump(
    s: &mut Swrk,
    mut req: Request,
    notify: &mut dyn Notify,
    timeout: Duration,
) -> Result<()> {
    req.bind_fds();
    let mut creq = bare_request(criu_req_type::PRE_DUMP);
    creq.opts = protobuf::MessageField::some(req.opts);
    s.send(&creq, "pre-dump")?;
    drive(
        s,
        criu_req_type::PRE_DUMP,
        "pre-dump",
        notify,
        timeout,
        req.log_path.as_deref(),
    )?;
    Ok(())
}

/// DUMP on an open session (see [`Criu::session`]).
pub fn run_dump(
    s: &mut Swrk,
    mut req: Request,
    notify: &mut dyn Notify,
    timeout: Duration,
) -> Result<DumpOutcome> {
    req.bind_fds();
    let mut creq = bare_request(criu_req_type::DUMP);
    creq.opts = protobuf::MessageField::some(req.opts);
    s.send(&creq, "dump")?;
    let r = drive(
        s,
        criu_req_type::DUMP,
        "dump",
        notify,
        timeout,
        req.log_path.as_deref(),
    )?;
    Ok(DumpOutcome {
        restored: r.resp.dump.as_ref().map(|d| d.restored()).unwrap_or(false),
    })
}

/// The message loop of one operation: answers notifications until the final response.
pub fn drive(
    s: &mut Swrk,
    kind: criu_req_type,
    op: &'static str,
    notify: &mut dyn Notify,
    timeout: Duration,
    log: Option<&Path>,
) -> Result<Received> {
    loop {
        let mut r = s.recv(op, Some(timeout))?;
        if r.resp.type_() != criu_req_type::NOTIFY {
            expect_success(&r, kind, op, log)?;
            return Ok(r);
        }
        if !r.resp.success() {
            return Err(failure(&r, op, log));
        }
        let n: &CriuNotify = r.resp.notify.as_ref().ok_or_else(|| CriuError::Protocol {
            op,
            detail: "NOTIFY without notify body".into(),
        })?;
        let script = Script::parse(n.script());
        let pid = n.pid.filter(|p| *p > 0);
        let fd = if script == Script::OrphanPtsMaster {
            let fd = r.fds.pop();
            if fd.is_none() {
                return Err(CriuError::Protocol {
                    op,
                    detail: "orphan-pts-master without a descriptor".into(),
                });
            }
            fd
        } else {
            None
        };
        tracing::debug!(op, script = %script, ?pid, "criu notification");
        let name = script.name().to_string();
        let verdict = match notify.notify(Notification { script, pid, fd }) {
            Reply::Success => Ok(()),
            Reply::Failure(reason) => Err(reason),
            Reply::Hold(wait) => wait(),
        };
        let mut ans = bare_request(criu_req_type::NOTIFY);
        ans.set_notify_success(verdict.is_ok());
        s.send(&ans, op)?;
        if let Err(reason) = verdict {
            // CRIU now fails the operation (and resumes dumped tasks); drain its answer so the
            // child exits, and report our reason rather than CRIU's echo of it.
            let _ = s.recv(op, Some(timeout));
            return Err(CriuError::Notify {
                script: name,
                reason,
            });
        }
    }
}

fn expect_success(
    r: &Received,
    kind: criu_req_type,
    op: &'static str,
    log: Option<&Path>,
) -> Result<()> {
    if !r.resp.success() {
        return Err(failure(r, op, log));
    }
    if r.resp.type_() != kind {
        return Err(CriuError::Protocol {
            op,
            detail: format!("expected a {kind:?} response, got {:?}", r.resp.type_()),
        });
    }
    Ok(())
}

fn failure(r: &Received, op: &'static str, log: Option<&Path>) -> CriuError {
    let lines = log.map(excerpt_from_file).unwrap_or_default();
    let excerpt = if lines.is_empty() {
        match r.resp.cr_errmsg.as_deref() {
            Some(m) if !m.is_empty() && !m.contains("RLIMIT_NOFILE") => format!(": {}", m.trim()),
            _ => String::new(),
        }
    } else {
        format!(": {}", lines.join(" | "))
    };
    CriuError::Failed {
        op,
        errno: r.resp.cr_errno(),
        excerpt,
        log: log.map(Path::to_path_buf),
    }
}

fn require_min(v: CriuVersion) -> Result<CriuVersion> {
    if v.at_least(MIN_VERSION.0, MIN_VERSION.1) {
        Ok(v)
    } else {
        Err(CriuError::TooOld {
            found: v.to_string(),
            min: MIN_VERSION_TEXT.into(),
        })
    }
}

fn log_opts_only() -> CriuOpts {
    let mut o = CriuOpts::new();
    o.set_images_dir_fd(-1);
    o
}

/// VERSION on an open session (`keep_open`: the session stays usable for another request).
pub fn version_on(s: &mut Swrk, timeout: Duration, keep_open: bool) -> Result<CriuVersion> {
    let mut req = bare_request(criu_req_type::VERSION);
    req.set_keep_open(keep_open);
    s.send(&req, "version")?;
    let r = s.recv("version", Some(timeout))?;
    expect_success(&r, criu_req_type::VERSION, "version", None)?;
    let v = r.resp.version.as_ref().ok_or_else(|| CriuError::Protocol {
        op: "version",
        detail: "VERSION response without version".into(),
    })?;
    let cap = |x: i32| u32::try_from(x).unwrap_or(0);
    Ok(CriuVersion {
        major: cap(v.major_number()),
        minor: cap(v.minor_number()),
        sublevel: cap(v.sublevel()),
    })
}

/// FEATURE_CHECK on an open session.
pub fn features_on(s: &mut Swrk, timeout: Duration, keep_open: bool) -> Result<Features> {
    let mut req = bare_request(criu_req_type::FEATURE_CHECK);
    req.set_keep_open(keep_open);
    let mut f = CriuFeatures::new();
    f.set_mem_track(true);
    f.set_lazy_pages(true);
    f.set_pidfd_store(true);
    req.features = protobuf::MessageField::some(f);
    s.send(&req, "feature-check")?;
    let r = s.recv("feature-check", Some(timeout))?;
    // CRIU answers FEATURE_CHECK with success=false when any asked feature is missing, but
    // still reports each feature; read them either way.
    if r.resp.type_() != criu_req_type::FEATURE_CHECK {
        return Err(CriuError::Protocol {
            op: "feature-check",
            detail: format!("got a {:?} response", r.resp.type_()),
        });
    }
    let f = r.resp.features.as_ref();
    Ok(Features {
        mem_track: f.map(|f| f.mem_track()).unwrap_or(false),
        lazy_pages: f.map(|f| f.lazy_pages()).unwrap_or(false),
        pidfd_store: f.map(|f| f.pidfd_store()).unwrap_or(false),
    })
}
