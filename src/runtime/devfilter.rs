//! A container's device rules on a cgroup v2 host: an eBPF program of type
//! `BPF_PROG_TYPE_CGROUP_DEVICE` attached to its cgroup (v2 has no `devices.*` files).
//! Neither CRIU nor `runc update` puts it back after a restore, and a cgroup without one
//! lets its tasks open every device node they can see or make, so ferry builds one from
//! runc's rule list (`state.json` `config.cgroups.devices`) and attaches it before CRIU
//! restores anything into the cgroup.
//!
//! The program reads the kernel's `bpf_cgroup_dev_ctx` (`access_type` = access << 16 |
//! type, `major`, `minor`) and tries the rules from the last to the first: the first that
//! matches decides (so a later rule overrides an earlier one, as when runc writes them into
//! a v1 cgroup one after the other); a request no rule matches is allowed, as a v1 cgroup
//! without rules would. An allow rule matches a request whose accesses it all grants; a
//! deny rule one that asks for any access it names.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// Most rules ferry turns into a program (runc's defaults are a dozen).
pub const MAX_RULES: usize = 1024;

/// One of runc's device rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub allow: bool,
    /// `'a'` (all), `'c'` or `'b'`.
    pub kind: char,
    /// `None`: any.
    pub major: Option<u32>,
    pub minor: Option<u32>,
    /// Bits: 1 mknod, 2 read, 4 write (the kernel's `BPF_DEVCG_ACC_*`).
    pub access: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum DevFilterError {
    #[error("device rule {index}: {why}")]
    BadRule { index: usize, why: String },
    #[error("{0} device rules (ferry takes at most {MAX_RULES})")]
    TooMany(usize),
    #[error("loading the device rules' eBPF program: {0}")]
    Load(String),
    #[error("attaching the device rules' eBPF program to {path}: {source}")]
    Attach {
        path: String,
        source: std::io::Error,
    },
}

/// runc's rule list (`[{"allow", "type" (a rune: 97/98/99), "major", "minor" (-1: any),
/// "permissions" ("rwm")}]`). `null` is no rules.
pub fn parse_rules(v: &serde_json::Value) -> Result<Vec<Rule>, DevFilterError> {
    let Some(list) = v.as_array() else {
        if v.is_null() {
            return Ok(Vec::new());
        }
        return Err(DevFilterError::BadRule {
            index: 0,
            why: "the rule list is not an array".into(),
        });
    };
    if list.len() > MAX_RULES {
        return Err(DevFilterError::TooMany(list.len()));
    }
    let mut out = Vec::with_capacity(list.len());
    for (index, r) in list.iter().enumerate() {
        let bad = |why: String| DevFilterError::BadRule { index, why };
        let allow = r["allow"]
            .as_bool()
            .ok_or_else(|| bad(format!("no boolean \"allow\" in {r}")))?;
        let kind = match r["type"].as_u64() {
            Some(97) => 'a',
            Some(98) => 'b',
            Some(99) => 'c',
            _ => return Err(bad(format!("type is not a, b or c in {r}"))),
        };
        let number = |key: &str| -> Result<Option<u32>, DevFilterError> {
            match r[key].as_i64() {
                Some(-1) => Ok(None),
                Some(n) if (0..=i64::from(u32::MAX >> 1)).contains(&n) => Ok(Some(n as u32)),
                _ => Err(bad(format!("{key} is not -1 or a device number in {r}"))),
            }
        };
        let (major, minor) = (number("major")?, number("minor")?);
        let perms = r["permissions"].as_str().unwrap_or("");
        let mut access = 0;
        for c in perms.chars() {
            access |= match c {
                'm' => 1,
                'r' => 2,
                'w' => 4,
                _ => return Err(bad(format!("permissions {perms:?} are not of r, w, m"))),
            };
        }
        out.push(Rule {
            allow,
            kind,
            major,
            minor,
            access,
        });
    }
    Ok(out)
}

/// One eBPF instruction, as the kernel takes it (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0xf),
        off,
        imm,
    }
}

// Opcodes used (class | size/op | source).
const LDX_W: u8 = 0x61; // BPF_LDX | BPF_W | BPF_MEM
const MOV64_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
const MOV64_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const AND64_K: u8 = 0x57; // BPF_ALU64 | BPF_AND | BPF_K
const RSH64_K: u8 = 0x77; // BPF_ALU64 | BPF_RSH | BPF_K
const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const JEQ_K: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

/// `BPF_DEVCG_DEV_BLOCK` / `BPF_DEVCG_DEV_CHAR`.
fn kind_code(kind: char) -> Option<i32> {
    match kind {
        'b' => Some(1),
        'c' => Some(2),
        _ => None,
    }
}

/// The program for `rules` (see the module doc). Registers: r1 the context, r2 the
/// requested access, r3 the device type, r4 major, r5 minor, r6 scratch, r0 the verdict.
pub fn program(rules: &[Rule]) -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_W, 2, 1, 0, 0),
        insn(MOV64_X, 3, 2, 0, 0),
        insn(AND64_K, 3, 0, 0, 0xffff),
        insn(RSH64_K, 2, 0, 0, 16),
        insn(LDX_W, 4, 1, 4, 0),
        insn(LDX_W, 5, 1, 8, 0),
    ];
    for r in rules.iter().rev() {
        // The tests of one rule, each jumping past the rule's block when it fails; the
        // offsets are filled in once the block's length is known.
        let mut block: Vec<Insn> = Vec::new();
        let mut jumps: Vec<usize> = Vec::new();
        if let Some(t) = kind_code(r.kind) {
            jumps.push(block.len());
            block.push(insn(JNE_K, 3, 0, 0, t));
        }
        for (reg, n) in [(4, r.major), (5, r.minor)] {
            if let Some(n) = n {
                jumps.push(block.len());
                block.push(insn(JNE_K, reg, 0, 0, n as i32));
            }
        }
        if r.allow && r.access != 7 {
            // Every requested access granted: (access & !granted) == 0.
            block.push(insn(MOV64_X, 6, 2, 0, 0));
            block.push(insn(AND64_K, 6, 0, 0, (!r.access & 7) as i32));
            jumps.push(block.len());
            block.push(insn(JNE_K, 6, 0, 0, 0));
        } else if !r.allow {
            // Any requested access denied: (access & denied) != 0.
            block.push(insn(MOV64_X, 6, 2, 0, 0));
            block.push(insn(AND64_K, 6, 0, 0, r.access as i32));
            jumps.push(block.len());
            block.push(insn(JEQ_K, 6, 0, 0, 0));
        }
        block.push(insn(MOV64_K, 0, 0, 0, i32::from(r.allow)));
        block.push(insn(EXIT, 0, 0, 0, 0));
        let len = block.len();
        for j in jumps {
            // Target: the instruction after the block (pc + 1 + off).
            block[j].off = (len - j - 1) as i16;
        }
        p.extend(block);
    }
    p.push(insn(MOV64_K, 0, 0, 0, 1));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

/// `BPF_PROG_LOAD`'s part of `union bpf_attr` that ferry sets (the kernel zero-fills the
/// rest of its larger struct).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `BPF_PROG_ATTACH`'s part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
/// Other programs may stay attached (runc attaches its own the same way).
const BPF_F_ALLOW_MULTI: u32 = 2;
/// Verifier log kept when a load fails.
const LOG_SIZE: usize = 64 * 1024;

fn load(prog: &[Insn]) -> Result<OwnedFd, DevFilterError> {
    let license = c"Apache-2.0";
    let try_load = |log: Option<&mut Vec<u8>>| -> Result<OwnedFd, std::io::Error> {
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
            insn_cnt: prog.len() as u32,
            insns: prog.as_ptr() as u64,
            license: license.as_ptr() as u64,
            ..Default::default()
        };
        attr.prog_name[..12].copy_from_slice(b"ferry_devcg\0");
        if let Some(buf) = log {
            attr.log_level = 1;
            attr.log_size = buf.len() as u32;
            attr.log_buf = buf.as_mut_ptr() as u64;
        }
        // SAFETY: attr is BPF_PROG_LOAD's layout; the pointers in it (instructions,
        // license, log buffer) outlive the call and the log buffer is log_size bytes long.
        let fd = unsafe { bpf(BPF_PROG_LOAD, &attr)? };
        // SAFETY: a successful BPF_PROG_LOAD returns a new file descriptor that we own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    };
    match try_load(None) {
        Ok(fd) => Ok(fd),
        Err(e) => {
            // Again with the verifier's log, to say why.
            let mut buf = vec![0u8; LOG_SIZE];
            let _ = try_load(Some(&mut buf));
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            Err(DevFilterError::Load(match super::last_line(&buf[..end]) {
                Some(last) => format!("{e}: {last}"),
                None => e.to_string(),
            }))
        }
    }
}

/// The bpf(2) system call with `attr`, one of the `#[repr(C)]` bpf_attr prefixes above.
///
/// # Safety
/// `attr` must be the bpf_attr layout `cmd` expects, and every pointer in it must be valid
/// (and as long as the length beside it) for the duration of the call.
unsafe fn bpf<A>(cmd: libc::c_long, attr: &A) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a live, initialised value of exactly the size passed; the caller
    // vouches for its layout and its pointers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const A,
            std::mem::size_of::<A>(),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Builds the program for `rules` and attaches it to the cgroup v2 directory `dir`.
pub fn attach(dir: &Path, rules: &[Rule]) -> Result<(), DevFilterError> {
    let prog = load(&program(rules))?;
    let attach_err = |source| DevFilterError::Attach {
        path: dir.display().to_string(),
        source,
    };
    let cg = std::fs::File::open(dir).map_err(attach_err)?;
    let attr = ProgAttachAttr {
        target_fd: cg.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        replace_bpf_fd: 0,
    };
    // SAFETY: attr is BPF_PROG_ATTACH's layout and holds no pointers; both fds are open for
    // the duration of the call. The attachment keeps its own reference to the program.
    unsafe { bpf(BPF_PROG_ATTACH, &attr) }.map_err(attach_err)?;
    tracing::debug!(dir = %dir.display(), rules = rules.len(), "device rules attached");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `prog` the way the kernel would for one request (a tiny interpreter of the
    /// instructions `program` emits).
    fn run(prog: &[Insn], kind: u32, major: u32, minor: u32, access: u32) -> u64 {
        let ctx = [(access << 16) | kind, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            let k = i.imm as i64 as u64;
            pc += 1;
            match i.code {
                LDX_W => r[dst] = u64::from(ctx[i.off as usize / 4]),
                MOV64_X => r[dst] = r[src],
                MOV64_K => r[dst] = k,
                AND64_K => r[dst] &= k,
                RSH64_K => r[dst] >>= k,
                JNE_K if r[dst] != k => pc += i.off as usize,
                JEQ_K if r[dst] == k => pc += i.off as usize,
                JNE_K | JEQ_K => {}
                EXIT => return r[0],
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    fn runc_defaults() -> serde_json::Value {
        serde_json::json!([
            {"allow": false, "type": 97, "major": -1, "minor": -1, "permissions": "rwm"},
            {"allow": true, "type": 99, "major": -1, "minor": -1, "permissions": "m"},
            {"allow": true, "type": 98, "major": -1, "minor": -1, "permissions": "m"},
            {"allow": true, "type": 99, "major": 1, "minor": 3, "permissions": "rwm"},
            {"allow": true, "type": 99, "major": 136, "minor": -1, "permissions": "rwm"},
            {"allow": true, "type": 99, "major": 1, "minor": 9, "permissions": "r"},
            {"allow": false, "type": 99, "major": 136, "minor": 7, "permissions": "w"}
        ])
    }

    #[test]
    fn runc_rules_decide_as_written() {
        let rules = parse_rules(&runc_defaults()).unwrap();
        assert_eq!(rules[4].major, Some(136));
        assert_eq!(rules[4].minor, None);
        let p = program(&rules);
        let (c, b) = (2, 1);
        let (m, r, w) = (1, 2, 4);
        // /dev/null: everything.
        assert_eq!(run(&p, c, 1, 3, r | w), 1);
        // Any char or block node may be made, not opened.
        assert_eq!(run(&p, c, 10, 183, m), 1);
        assert_eq!(run(&p, b, 8, 0, m), 1);
        assert_eq!(run(&p, c, 10, 183, r), 0);
        assert_eq!(run(&p, b, 8, 0, r | w), 0);
        // A read-only rule: read yes, read+write no.
        assert_eq!(run(&p, c, 1, 9, r), 1);
        assert_eq!(run(&p, c, 1, 9, r | w), 0);
        // A later deny overrides an earlier allow, for what it names only.
        assert_eq!(run(&p, c, 136, 7, r), 1);
        assert_eq!(run(&p, c, 136, 7, w), 0);
        assert_eq!(run(&p, c, 136, 8, r | w), 1);
        // Same numbers, other type.
        assert_eq!(run(&p, b, 1, 3, r), 0);
        // No rules: no restriction.
        assert_eq!(run(&program(&[]), c, 10, 183, r | w), 1);
    }

    #[test]
    fn bad_rules_are_refused() {
        let bad = [
            serde_json::json!({"allow": true}),
            serde_json::json!([{"allow": true, "type": 120, "major": 1, "minor": 1, "permissions": "r"}]),
            serde_json::json!([{"allow": true, "type": 99, "major": -2, "minor": 1, "permissions": "r"}]),
            serde_json::json!([{"allow": true, "type": 99, "major": 1, "minor": 1, "permissions": "rx"}]),
            serde_json::json!([{"type": 99, "major": 1, "minor": 1, "permissions": "r"}]),
        ];
        for b in bad {
            assert!(parse_rules(&b).is_err(), "{b}");
        }
        assert!(parse_rules(&serde_json::Value::Null).unwrap().is_empty());
        let many = serde_json::Value::Array(vec![runc_defaults()[0].clone(); MAX_RULES + 1]);
        assert!(matches!(
            parse_rules(&many),
            Err(DevFilterError::TooMany(_))
        ));
    }
}
