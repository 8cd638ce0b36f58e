//! Helpers for tests that run inside the VM rig (`tests/vm/run`, tests in `tests/vm_*.rs`).
//!
//! The rig runs those executables in the guest with `FERRY_IN_VM=1`, `FERRY_VM_QUICK=1` for
//! `--quick`, and `FERRY_VM_REPORT` naming a file whose lines it prints in its summary on
//! the host (libtest hides a passing test's output).

use std::fs::OpenOptions;
use std::io::Write;

/// Running in the rig's guest?
pub fn in_vm() -> bool {
    std::env::var_os("FERRY_IN_VM").is_some_and(|v| !v.is_empty())
}

/// `tests/vm/run --quick`: the smallest meaningful run (shrink sizes and rounds).
pub fn quick() -> bool {
    std::env::var_os("FERRY_VM_QUICK").is_some_and(|v| !v.is_empty())
}

/// A hint to add to a failure that is expected outside the rig.
pub fn where_hint() -> &'static str {
    if in_vm() {
        ""
    } else {
        " (FERRY_IN_VM is not set: this test is meant to run in the VM, `tests/vm/run`)"
    }
}

/// Print `line` on stderr and, in the rig, add it to the summary the host prints (e.g.
/// measured timings). One line; newlines are replaced.
pub fn report(line: &str) {
    let line = line.replace('\n', " ");
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("FERRY_VM_REPORT").filter(|p| !p.is_empty()) {
        let written = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            eprintln!("cannot append to FERRY_VM_REPORT {path:?}: {e}");
        }
    }
}
