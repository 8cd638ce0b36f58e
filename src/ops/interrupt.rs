//! A request to stop a checkpoint, a restore or a migration (the binary's SIGINT, SIGTERM
//! and SIGHUP handlers make it). It is honoured only where stopping loses nothing: before
//! the container is frozen, at CRIU's `post-dump` notification, where failing the dump makes
//! CRIU resume the tasks, and at `post-restore`, where failing the restore makes CRIU kill
//! the restored tasks before they ran. Once a migration's commit has begun the request is
//! ignored and the migration finishes: stopping then could leave the container nowhere or in
//! two places.

use std::sync::atomic::{AtomicI32, Ordering};

use super::OpError;

/// The signal that asked to stop, 0 for none.
static REQUESTED: AtomicI32 = AtomicI32::new(0);

/// Asks the running operation to stop. Async-signal-safe (one atomic store).
pub fn request(signal: i32) {
    REQUESTED.store(signal, Ordering::Relaxed);
}

/// The signal that asked to stop, if one did.
pub fn requested() -> Option<i32> {
    match REQUESTED.load(Ordering::Relaxed) {
        0 => None,
        s => Some(s),
    }
}

/// `Err(OpError::Interrupted)` once a stop was requested.
pub fn check() -> Result<(), OpError> {
    match requested() {
        None => Ok(()),
        Some(s) => Err(OpError::Interrupted(signal_name(s))),
    }
}

/// At a point where failing the operation loses nothing (a CRIU notification named by
/// `point`, e.g. "dump at PostDump", formatted only then): the name of the signal that asked
/// to stop, logged, or None to go on.
pub fn stop_at(point: std::fmt::Arguments<'_>) -> Option<String> {
    let name = signal_name(requested()?);
    tracing::info!("{name}: failing the {point}");
    Some(name)
}

/// "SIGINT" for 2; the number for a signal without a name.
pub fn signal_name(signal: i32) -> String {
    nix::sys::signal::Signal::try_from(signal)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {signal}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(signal_name(libc::SIGINT), "SIGINT");
        assert_eq!(signal_name(libc::SIGTERM), "SIGTERM");
        assert_eq!(signal_name(1000), "signal 1000");
    }
}
