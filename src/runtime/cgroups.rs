//! The restored container's cgroups: created before CRIU runs, with criu placed inside (CRIU
//! then restores the tasks under `cg_root`), removed again if the restore fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{io_err, RuntimeError};

/// In a cgroup v2 directory, enables for its children every controller it has (as runc
/// and systemd do for the cgroups they make), so that a new child has the limit files.
/// Nothing on v1 or on a controller-less v2 hierarchy; a failure (the kernel refuses it for
/// a cgroup that holds processes) is logged, and a limit then missing fails the restore.
fn enable_controllers(dir: &Path) {
    let Ok(have) = std::fs::read_to_string(dir.join("cgroup.controllers")) else {
        return;
    };
    let on = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    let missing: Vec<String> = have
        .split_whitespace()
        .filter(|c| !on.split_whitespace().any(|o| o == *c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return;
    }
    let path = dir.join("cgroup.subtree_control");
    if let Err(e) = std::fs::write(&path, missing.join(" ")) {
        tracing::warn!(
            "cannot enable {} in {}: {e}",
            missing.join(" "),
            path.display()
        );
    }
}

/// Cgroup directories created for one restore.
#[derive(Debug, Default)]
pub struct CgroupSet {
    created: Vec<PathBuf>,
}

/// Only paths below the cgroup filesystems are touched.
pub(super) const CGROUP_FS: &str = "/sys/fs/cgroup/";

pub(super) fn check_path(p: &Path) -> Result<(), RuntimeError> {
    let s = p.to_string_lossy();
    if !s.starts_with(CGROUP_FS) || s.split('/').any(|c| c == "..") {
        return Err(RuntimeError::Cgroup {
            path: p.to_path_buf(),
            why: format!("not a path below {CGROUP_FS}"),
        });
    }
    Ok(())
}

/// `dir` and those of its ancestors that exist, inside the cgroup filesystem.
pub(super) fn existing_up_from(dir: &Path) -> impl Iterator<Item = &Path> {
    dir.ancestors()
        .take_while(|a| a.as_os_str().len() >= CGROUP_FS.len())
        .filter(|a| a.is_dir())
}

/// Whether a cgroup directory holds processes.
pub fn has_processes(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| !s.trim().is_empty())
        .unwrap_or(false)
}

impl CgroupSet {
    /// Creates every directory of `paths` (controller → dir) that is missing. Fails if one
    /// already holds processes (another container lives there).
    pub fn create(paths: &BTreeMap<String, String>) -> Result<CgroupSet, RuntimeError> {
        let mut set = CgroupSet::default();
        let mut dirs: Vec<PathBuf> = paths.values().map(PathBuf::from).collect();
        dirs.sort();
        dirs.dedup();
        for d in &dirs {
            check_path(d)?;
            if has_processes(d) {
                return Err(RuntimeError::Cgroup {
                    path: d.clone(),
                    why: "already holds processes of another container".into(),
                });
            }
        }
        for d in dirs {
            set.ensure(&d)?;
        }
        Ok(set)
    }

    /// Creates `dir` and its missing parents, remembering what it created. Restores running
    /// side by side (two migrations into one `ferry serve`) may create a shared parent, such
    /// as the `--cgroup-prefix` dir, at the same moment, or remove it as empty just before
    /// this one creates a child in it: made by the other, it is used as it is (and left to
    /// it); removed, it is made again.
    fn ensure(&mut self, dir: &Path) -> Result<(), RuntimeError> {
        for attempt in 0.. {
            if dir.is_dir() {
                return Ok(());
            }
            if let Some(parent) = dir.parent() {
                if parent.as_os_str().len() > CGROUP_FS.len() {
                    self.ensure(parent)?;
                }
                enable_controllers(parent);
            }
            match std::fs::create_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {
                    return Ok(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempt < 3 => continue,
                Err(e) => return Err(io_err("create cgroup", dir)(e)),
            }
        }
        self.created.push(dir.to_path_buf());
        // A new cgroup v1 cpuset has no cpus/mems: copy the parent's, as runc does.
        if dir.to_string_lossy().contains("/cpuset") {
            for f in ["cpuset.cpus", "cpuset.mems"] {
                let own = dir.join(f);
                let empty = std::fs::read_to_string(&own)
                    .map(|s| s.trim().is_empty())
                    .unwrap_or(false);
                if empty {
                    if let Some(v) = dir
                        .parent()
                        .and_then(|p| std::fs::read_to_string(p.join(f)).ok())
                    {
                        std::fs::write(&own, v.trim()).map_err(io_err("write", &own))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves `pid` into every cgroup of `paths`.
    pub fn enter(paths: &BTreeMap<String, String>, pid: u32) -> Result<(), RuntimeError> {
        let mut dirs: Vec<&String> = paths.values().collect();
        dirs.sort();
        dirs.dedup();
        for d in dirs {
            let procs = Path::new(d).join("cgroup.procs");
            std::fs::write(&procs, pid.to_string()).map_err(io_err("enter cgroup", &procs))?;
        }
        Ok(())
    }

    /// Kills every process left in the directories this set created (a failed or timed-out
    /// restore may leave CRIU's helpers or half-restored tasks behind), thawing a frozen
    /// freezer first, and waits (bounded) until they are empty.
    pub fn kill_all(&self) {
        for d in &self.created {
            let state = d.join("freezer.state");
            if state.exists() {
                let _ = std::fs::write(&state, "THAWED");
            }
        }
        kill_until_empty(&self.created);
    }

    /// Removes the directories this set created (deepest first; rmdir only, which the kernel
    /// refuses for a cgroup that still has processes or children).
    pub fn remove(&mut self) {
        while let Some(d) = self.created.pop() {
            if let Err(e) = std::fs::remove_dir(&d) {
                tracing::warn!("cleanup: cannot remove cgroup {}: {e}", d.display());
            }
        }
    }

    /// Keeps the directories (the restore succeeded; runc owns them now).
    pub fn keep(mut self) {
        self.created.clear();
    }
}

/// The cgroup v1 files of a container's limits that a restore writes back into its new
/// cgroups, in this order (a period before its quota, the memory limit before memory+swap),
/// each with the field of runc's config (`state.json` `config.cgroups`) that sets it. CRIU
/// keeps them in its images but, for cgroups that exist before it runs (ferry makes them, as
/// runc does), restores none; runc's own restore sets them from its config first. Only the
/// ones runc's config sets are carried: a source's default (a CPU list, a block I/O weight)
/// means nothing to, or may not exist on, a destination of another size or kernel.
pub const LIMIT_FILES: [(&str, &[&str]); 11] = [
    ("memory.limit_in_bytes", &["memory"]),
    ("memory.memsw.limit_in_bytes", &["memory_swap"]),
    ("memory.soft_limit_in_bytes", &["memory_reservation"]),
    ("memory.swappiness", &["memory_swappiness"]),
    ("cpu.shares", &["cpu_shares"]),
    ("cpu.cfs_period_us", &["cpu_period"]),
    ("cpu.cfs_quota_us", &["cpu_quota"]),
    ("pids.max", &["pids_limit"]),
    ("blkio.weight", &["blkio_weight"]),
    ("cpuset.cpus", &["cpuset_cpus"]),
    ("cpuset.mems", &["cpuset_mems"]),
];
/// The same on a cgroup v2-only host, where runc writes the v2 files (memory before
/// memory+swap; the block I/O weight goes to BFQ's file where the kernel has it).
pub const LIMIT_FILES_V2: [(&str, &[&str]); 10] = [
    ("memory.max", &["memory"]),
    ("memory.swap.max", &["memory_swap"]),
    ("memory.low", &["memory_reservation"]),
    ("cpu.weight", &["cpu_weight", "cpu_shares"]),
    ("cpu.max", &["cpu_quota", "cpu_period"]),
    ("pids.max", &["pids_limit"]),
    ("io.bfq.weight", &["blkio_weight"]),
    ("io.weight", &["blkio_weight"]),
    ("cpuset.cpus", &["cpuset_cpus"]),
    ("cpuset.mems", &["cpuset_mems"]),
];
/// The device rules (v1): a new cgroup allows every device until they are written back.
pub const DEVICES_LIST: &str = "devices.list";
/// Longest value kept (devices.list can be long).
const MAX_SETTING: u64 = 64 * 1024;

/// `memory.limit_in_bytes` → the controller key of runc's `cgroup_paths` (`memory`).
fn controller_of(file: &str) -> &str {
    file.split_once('.').map_or(file, |(c, _)| c)
}

/// runc's `cgroup_paths` of a cgroup v2-only host: the one hierarchy, under the key "" (a
/// hybrid host has its v1 controllers besides, and its "" is the controller-less
/// `unified/`).
fn v2_dir(paths: &BTreeMap<String, String>) -> Option<&String> {
    match paths.get("") {
        Some(d) if paths.len() == 1 => Some(d),
        _ => None,
    }
}

/// The cgroup layout of a container (its runc `cgroup_paths`): "v2" on a v2-only host,
/// else "v1" (v1 controllers, with or without the controller-less `unified/`).
pub fn layout_of(paths: &BTreeMap<String, String>) -> &'static str {
    if v2_dir(paths).is_some() {
        "v2"
    } else {
        "v1"
    }
}

/// This host's cgroup layout, as [`layout_of`] names it: "v2" when /sys/fs/cgroup is the
/// cgroup2 hierarchy itself.
pub fn host_layout() -> &'static str {
    if Path::new(CGROUP_FS).join("cgroup.controllers").exists() {
        "v2"
    } else {
        "v1"
    }
}

/// A container of layout `theirs` can be restored with its limits and device rules on a
/// host of layout `mine` (the same one; ferry does not translate v1 ↔ v2).
pub fn check_layout(theirs: &str, mine: &str) -> Result<(), String> {
    let name = |l: &str| match l {
        "v2" => "cgroup v2-only",
        "v1" => "cgroup v1",
        _ => "unknown-cgroup",
    };
    if theirs == mine {
        return Ok(());
    }
    Err(format!(
        "the container runs on a {} host and this host is {}: its limits and device rules \
         cannot be carried between the layouts",
        name(theirs),
        name(mine)
    ))
}

/// Longest CPU or memory-node list parsed (a peer sends them; a kernel's list of 8192 CPUs,
/// every other one, is ≈ 40 KiB).
const MAX_LIST: usize = 64 * 1024;

/// A kernel CPU or memory-node list ("0-3,8,10-11") as sorted, merged, inclusive ranges.
fn parse_list(s: &str) -> Result<Vec<(u64, u64)>, String> {
    let s = s.trim();
    if s.len() > MAX_LIST {
        return Err(format!("a CPU or node list of {} bytes", s.len()));
    }
    let bad = || format!("{s:?} is not a CPU or node list");
    let mut ranges = Vec::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let part = part.trim();
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let num = |x: &str| x.trim().parse::<u32>().map(u64::from).map_err(|_| bad());
        let (a, b) = (num(a)?, num(b)?);
        if a > b {
            return Err(bad());
        }
        ranges.push((a, b));
    }
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match merged.last_mut() {
            Some(last) if a <= last.1 + 1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    Ok(merged)
}

/// The members of `want` that `have` lacks (both as from [`parse_list`]).
fn list_minus(want: &[(u64, u64)], have: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(a, b) in want {
        // The lowest member of a..=b not yet known to be covered.
        let mut next = a;
        for &(c, d) in have {
            if d < next {
                continue;
            }
            if c > b {
                break;
            }
            if c > next {
                out.push((next, c - 1));
            }
            next = d + 1;
        }
        if next <= b {
            out.push((next, b));
        }
    }
    out
}

fn list_text(ranges: &[(u64, u64)]) -> String {
    if ranges.is_empty() {
        return "none".into();
    }
    let parts: Vec<String> = ranges
        .iter()
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect();
    parts.join(",")
}

/// Whether this host can give a container's cgroup to be made at `dir` the CPUs and memory
/// nodes it is pinned to (`cpus`, `mems`: its `cpuset.cpus` / `cpuset.mems`). On cgroup v1
/// the kernel takes only a subset of the parent's lists, and the directories a restore makes
/// copy their parent's, so the nearest existing ancestor of `dir` decides; on cgroup v2 it
/// takes whatever the host has (the root's effective lists) and narrows it to the parent's
/// by itself. A list this host does not show is left to the restore.
pub fn check_cpuset(dir: &Path, cpus: Option<&str>, mems: Option<&str>) -> Result<(), String> {
    check_path(dir).map_err(|e| e.to_string())?;
    let v2 = host_layout() == "v2";
    let holder = if v2 {
        Some(PathBuf::from(CGROUP_FS))
    } else {
        existing_up_from(dir)
            .find(|a| *a != dir)
            .map(Path::to_path_buf)
    };
    match holder {
        Some(holder) => cpuset_fits(&holder, v2, cpus, mems),
        None => Ok(()),
    }
}

/// [`check_cpuset`] against the lists of the cgroup directory `holder` (on v2 its effective
/// ones).
fn cpuset_fits(
    holder: &Path,
    v2: bool,
    cpus: Option<&str>,
    mems: Option<&str>,
) -> Result<(), String> {
    for (want, what, v1_file, v2_file) in [
        (cpus, "CPUs", "cpuset.cpus", "cpuset.cpus.effective"),
        (mems, "memory nodes", "cpuset.mems", "cpuset.mems.effective"),
    ] {
        let Some(want) = want else { continue };
        let file = holder.join(if v2 { v2_file } else { v1_file });
        let Ok(have) = crate::capped::read_capped(&file, MAX_LIST as u64) else {
            continue;
        };
        let wanted = parse_list(want).map_err(|e| format!("the container's {v1_file}: {e}"))?;
        let have = parse_list(&String::from_utf8_lossy(&have))
            .map_err(|e| format!("{}: {e}", file.display()))?;
        let lacking = list_minus(&wanted, &have);
        if !lacking.is_empty() {
            let place = if v2 {
                "this host".to_string()
            } else {
                format!("this host's cpuset {}", holder.display())
            };
            return Err(format!(
                "the container is pinned to {what} {} ({v1_file}) and {place} has only {}: \
                 {} missing",
                list_text(&wanted),
                list_text(&have),
                list_text(&lacking)
            ));
        }
    }
    Ok(())
}

/// Where the kernel lists the huge page sizes it has (`hugepages-2048kB`, …).
const HUGEPAGES: &str = "/sys/kernel/mm/hugepages";

/// Whether the limits `settings` (from [`read_settings`]) can be written into the cgroups
/// of `paths` (controller → dir; the restore's, not made yet) as [`apply_settings`] will
/// write them: a migration's destination asks before the source freezes. The nearest
/// existing cgroup above each dir decides. Below a root it has the files the restore's
/// cgroups will have (v1: those of its controller; v2: those of the controllers its parent
/// gives it, which the restore enables all the way down). A root has no limit files of its
/// own, so there it is enough that the hierarchy exists (v1) or offers the controller (v2
/// `cgroup.controllers`). Huge page limits need the size in the kernel. "No limit" values
/// pass, as in the restore; so do the v1 device rules (every v1 hierarchy has them).
pub fn check_settable(
    paths: &BTreeMap<String, String>,
    settings: &BTreeMap<String, String>,
) -> Result<(), String> {
    for d in paths.values() {
        check_path(Path::new(d)).map_err(|e| e.to_string())?;
    }
    settable(paths, settings, Path::new(HUGEPAGES))
}

/// [`check_settable`], with the kernel's huge page sizes listed in `hugepages`.
fn settable(
    paths: &BTreeMap<String, String>,
    settings: &BTreeMap<String, String>,
    hugepages: &Path,
) -> Result<(), String> {
    let v2 = v2_dir(paths).is_some();
    let is_cgroup = |d: &Path| d.join("cgroup.procs").exists();
    for (file, value) in settings {
        if file == DEVICES_LIST || is_unlimited(value) {
            continue;
        }
        let lacks = |why: String| format!("the container's {file} is {value} and {why}");
        let controller = controller_of(file);
        if let Some(kb) = hugetlb_kb(file) {
            let sized = hugepages.join(format!("hugepages-{kb}kB"));
            if !sized.is_dir() {
                return Err(lacks(format!(
                    "this host has no huge pages of that size ({} does not exist)",
                    sized.display()
                )));
            }
        }
        let Some(dir) = dir_of(paths, file) else {
            return Err(lacks(format!(
                "this host has no {controller} cgroup for it"
            )));
        };
        let Some(have) = Path::new(dir).ancestors().find(|a| is_cgroup(a)) else {
            return Err(lacks(format!(
                "this host has no cgroup hierarchy with the {controller} controller above {dir}"
            )));
        };
        let root = !have.parent().is_some_and(is_cgroup);
        if !root {
            if !have.join(file).exists() {
                return Err(lacks(format!(
                    "this host's cgroup {} has no {file}, so neither would the container's \
                     cgroup under it",
                    have.display()
                )));
            }
        } else if v2 {
            let offered = crate::capped::read_capped(&have.join("cgroup.controllers"), 4096)
                .map(|b| String::from_utf8_lossy(&b).trim().to_string())
                .unwrap_or_default();
            if !offered.split_whitespace().any(|c| c == controller) {
                return Err(lacks(format!(
                    "this host's cgroup v2 has no {controller} controller (cgroup.controllers: \
                     {offered:?})"
                )));
            }
        }
    }
    Ok(())
}

/// The page size in KiB of a huge page limit file (`hugetlb.2MB.max` → 2048).
fn hugetlb_kb(file: &str) -> Option<u64> {
    let size = file.strip_prefix("hugetlb.")?.split('.').next()?;
    if !is_page_size(size) {
        return None;
    }
    let digits = size.trim_end_matches(|c: char| c.is_ascii_uppercase());
    let unit = match &size[digits.len()..] {
        "KB" => 1,
        "MB" => 1024,
        _ => 1024 * 1024,
    };
    digits.parse::<u64>().ok()?.checked_mul(unit)
}

/// The limit table of a layout: [`LIMIT_FILES_V2`] on v2, else [`LIMIT_FILES`].
fn limit_table(v2: bool) -> &'static [(&'static str, &'static [&'static str])] {
    if v2 {
        &LIMIT_FILES_V2
    } else {
        &LIMIT_FILES
    }
}

/// Where `file` lives: its controller's dir on v1, the one dir on v2.
pub fn dir_of<'a>(paths: &'a BTreeMap<String, String>, file: &str) -> Option<&'a String> {
    v2_dir(paths).or_else(|| paths.get(controller_of(file)))
}

/// Values meaning "no limit": a destination without the file loses nothing.
pub(super) fn is_unlimited(v: &str) -> bool {
    matches!(
        v,
        "max" | "-1" | "9223372036854771712" | "9223372036854775807"
    )
}

/// Whether runc's config field `field` sets a limit: a non-empty string, a non-zero number,
/// or (swappiness, where 0 is a value) any number; absent and null are unset.
fn is_set(config: &serde_json::Value, field: &str) -> bool {
    match &config[field] {
        serde_json::Value::String(s) => !s.is_empty(),
        serde_json::Value::Number(n) => field == "memory_swappiness" || n.as_i64() != Some(0),
        _ => false,
    }
}

/// The container's limits (and, on v1, device rules) as they are now in its cgroup
/// directories (`paths`: controller → dir, as runc records them), to be written back by
/// [`apply_settings`]. `config`: runc's cgroup config (`state.json` `config.cgroups`); only
/// the limits it sets are read. Files a kernel does not have are skipped. On v2 the device
/// rules are not files: [`apply_settings`] takes them from runc's config.
pub fn read_settings(
    paths: &BTreeMap<String, String>,
    config: &serde_json::Value,
) -> Result<BTreeMap<String, String>, RuntimeError> {
    let v2 = v2_dir(paths).is_some();
    let mut files: Vec<String> = limit_table(v2)
        .iter()
        .filter(|(_, fields)| fields.iter().any(|f| is_set(config, f)))
        .map(|(f, _)| f.to_string())
        .collect();
    files.extend(hugetlb_files(config, v2)?);
    if !v2 {
        files.push(DEVICES_LIST.into());
    } else if let Some(unified) = config["unified"].as_object() {
        // runc's map of raw v2 files (`linux.resources.unified`), after the table's.
        if unified.len() > MAX_UNIFIED {
            return Err(RuntimeError::Cgroup {
                path: PathBuf::from(CGROUP_FS),
                why: format!(
                    "{} unified cgroup settings (at most {MAX_UNIFIED})",
                    unified.len()
                ),
            });
        }
        for name in unified.keys() {
            if !is_unified_name(name) {
                return Err(RuntimeError::Cgroup {
                    path: PathBuf::from(name),
                    why: "not a cgroup v2 interface file ferry carries".into(),
                });
            }
            if !files.contains(name) {
                files.push(name.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    for f in files {
        let Some(dir) = dir_of(paths, &f) else {
            continue;
        };
        let path = Path::new(dir).join(&f);
        if !path.exists() {
            continue;
        }
        let v =
            crate::capped::read_capped(&path, MAX_SETTING).map_err(|e| RuntimeError::Cgroup {
                path: path.clone(),
                why: match e {
                    crate::capped::CappedError::Io(e) => e.to_string(),
                    crate::capped::CappedError::TooLarge(n) => format!("{n} bytes"),
                },
            })?;
        out.insert(
            f.to_string(),
            String::from_utf8_lossy(&v).trim_end().to_string(),
        );
    }
    Ok(out)
}

/// Most huge page sizes carried (x86-64 has two).
const MAX_HUGETLB: usize = 8;

/// A huge page size as the kernel names it in hugetlb files: `2MB`, `1GB`, `64KB`.
fn is_page_size(s: &str) -> bool {
    let digits = s.trim_end_matches(|c: char| c.is_ascii_uppercase());
    matches!(&s[digits.len()..], "KB" | "MB" | "GB")
        && !digits.is_empty()
        && digits.len() <= 6
        && digits.chars().all(|c| c.is_ascii_digit())
}

/// A v1 huge page limit file: `hugetlb.<size>.limit_in_bytes`.
fn is_hugetlb_v1_name(name: &str) -> bool {
    name.strip_prefix("hugetlb.")
        .and_then(|r| r.strip_suffix(".limit_in_bytes"))
        .is_some_and(is_page_size)
}

/// The huge page limit files of runc's `hugetlb_limit` list (`[{"page_size", "limit"}]`):
/// `hugetlb.<size>.limit_in_bytes` on v1, `hugetlb.<size>.max` on v2.
fn hugetlb_files(config: &serde_json::Value, v2: bool) -> Result<Vec<String>, RuntimeError> {
    let Some(list) = config["hugetlb_limit"].as_array() else {
        return Ok(Vec::new());
    };
    let bad = |why: String| RuntimeError::Cgroup {
        path: PathBuf::from("hugetlb"),
        why,
    };
    if list.len() > MAX_HUGETLB {
        return Err(bad(format!(
            "{} huge page limits (at most {MAX_HUGETLB})",
            list.len()
        )));
    }
    let mut out = Vec::new();
    for e in list {
        let size = e["page_size"].as_str().unwrap_or("");
        if !is_page_size(size) {
            return Err(bad(format!("huge page size {size:?} in {e}")));
        }
        out.push(if v2 {
            format!("hugetlb.{size}.max")
        } else {
            format!("hugetlb.{size}.limit_in_bytes")
        });
    }
    Ok(out)
}

/// Most entries of runc's `unified` map carried.
const MAX_UNIFIED: usize = 64;

/// A name from runc's `unified` map (or v2's huge page files) that ferry writes back:
/// `<controller>.<file>`, the controller of lowercase letters and `_`, the file of letters
/// (page sizes: `hugetlb.2MB.max`), digits, `_` and `.`; not the core `cgroup.*` files
/// (processes, freezing, killing) nor a v1-only file (so a v1 checkpoint's settings never
/// pass for v2).
fn is_unified_name(name: &str) -> bool {
    let v1_only = (LIMIT_FILES.iter().any(|(f, _)| *f == name)
        && !LIMIT_FILES_V2.iter().any(|(f, _)| *f == name))
        || name.starts_with("devices.")
        || is_hugetlb_v1_name(name);
    name.len() <= 64
        && !v1_only
        && name.split_once('.').is_some_and(|(c, f)| {
            !c.is_empty()
                && c != "cgroup"
                && c.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                && !f.is_empty()
                && f.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        })
}

/// Checks settings read from a checkpoint or a peer: known files (the tables, the v1 device
/// list, v2 files of runc's `unified` map), bounded values.
pub fn validate_settings(settings: &BTreeMap<String, String>) -> Result<(), String> {
    if settings.len() > LIMIT_FILES.len() + LIMIT_FILES_V2.len() + 1 + MAX_UNIFIED + MAX_HUGETLB {
        return Err(format!("{} cgroup settings", settings.len()));
    }
    for (k, v) in settings {
        let known = LIMIT_FILES
            .iter()
            .chain(&LIMIT_FILES_V2)
            .any(|(f, _)| f == k)
            || k == DEVICES_LIST
            || is_unified_name(k)
            || is_hugetlb_v1_name(k);
        if !known {
            return Err(format!("cgroup setting {k:?} is not one ferry writes"));
        }
        if v.len() as u64 > MAX_SETTING || v.contains('\0') {
            return Err(format!(
                "cgroup setting {k}: value too long or with a NUL byte"
            ));
        }
    }
    Ok(())
}

/// Writes `settings` (from [`read_settings`]) into the cgroups of `paths`: the limits in
/// table order, then the device rules: on v1 the recorded list (deny all, allow each listed
/// rule), on v2 an eBPF program built from `devices`, runc's rule list (`config.cgroups.
/// devices` of its state.json; see [`super::devfilter`]). A file this host lacks is an error
/// unless its value is "no limit"; so are settings of the other cgroup layout.
pub fn apply_settings(
    paths: &BTreeMap<String, String>,
    settings: &BTreeMap<String, String>,
    devices: &serde_json::Value,
) -> Result<(), RuntimeError> {
    let write = |file: &str, value: &str| -> Result<(), RuntimeError> {
        let Some(dir) = dir_of(paths, file) else {
            return Err(RuntimeError::Cgroup {
                path: PathBuf::from(file),
                why: format!("no {} cgroup here for {file}={value}", controller_of(file)),
            });
        };
        let path = Path::new(dir).join(file);
        std::fs::write(&path, value).map_err(|e| RuntimeError::Cgroup {
            path: path.clone(),
            why: format!("writing {value:?}: {e}"),
        })
    };
    let v2 = v2_dir(paths);
    let table = limit_table(v2.is_some());
    // Files outside the table, written after it: huge page limits, and on v2 runc's
    // `unified` files (which include v2's huge page files).
    let is_extra = |k: &str| {
        !table.iter().any(|(f, _)| *f == k)
            && if v2.is_some() {
                is_unified_name(k)
            } else {
                is_hugetlb_v1_name(k)
            }
    };
    for (k, v) in settings {
        let ours =
            table.iter().any(|(f, _)| f == k) || is_extra(k) || (v2.is_none() && k == DEVICES_LIST);
        if !ours && !is_unlimited(v) {
            let (here, there) = if v2.is_some() {
                ("v2-only", "v1")
            } else {
                ("v1", "v2-only")
            };
            return Err(RuntimeError::Cgroup {
                path: PathBuf::from(k),
                why: format!(
                    "the container's {k} is {v}: it was checkpointed on a cgroup {there} host \
                     and this host is cgroup {here}"
                ),
            });
        }
    }
    for (f, _) in table {
        let Some(v) = settings.get(*f) else { continue };
        let here = dir_of(paths, f).is_some_and(|d| Path::new(d).join(f).exists());
        if !here {
            if is_unlimited(v) {
                continue;
            }
            return Err(RuntimeError::Cgroup {
                path: PathBuf::from(f),
                why: format!("the container's {f} is {v} and this host's cgroups have no {f}"),
            });
        }
        write(f, v)?;
    }
    for (k, v) in settings {
        if is_extra(k) {
            write(k, v)?;
        }
    }
    if let Some(dir) = v2 {
        let attached = super::devfilter::parse_rules(devices).and_then(|rules| {
            if rules.is_empty() {
                return Ok(());
            }
            super::devfilter::attach(Path::new(dir), &rules)
        });
        attached.map_err(|e| RuntimeError::Cgroup {
            path: PathBuf::from(dir),
            why: e.to_string(),
        })?;
    } else if let Some(list) = settings.get(DEVICES_LIST) {
        write("devices.deny", "a")?;
        for rule in list.lines().filter(|l| !l.trim().is_empty()) {
            write("devices.allow", rule)?;
        }
    } else if devices.as_array().is_some_and(|l| !l.is_empty()) {
        // A new v1 device cgroup allows everything: never leave the container so.
        return Err(RuntimeError::Cgroup {
            path: PathBuf::from(DEVICES_LIST),
            why: "the checkpoint carries no cgroup v1 device rules for a container that has \
                  some (checkpointed on a cgroup v2-only host?)"
                .into(),
        });
    }
    Ok(())
}

/// The processes (thread group ids) in the cgroup directory `dir`; None where it cannot be
/// read.
pub fn procs(dir: &Path) -> Option<Vec<i32>> {
    let text = std::fs::read_to_string(dir.join("cgroup.procs")).ok()?;
    Some(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Most processes [`strays`] looks at, and most parents it follows from each.
pub(crate) const MAX_STRAY_SCAN: usize = 65_536;
const MAX_ANCESTRY: usize = 1024;

/// The processes among `pids` (a cgroup's) that do not descend from `init` (pid, command
/// name):
/// a dump of `init`'s tree leaves them behind, CRIU only warning of an "unexpected process
/// in the freezer cgroup" (e.g. one `runc exec` started: its parent is runc, not the
/// container's init). Meant for a frozen cgroup, whose tree cannot change; a process whose
/// ancestry cannot be read is not counted.
pub fn strays(pids: &[i32], init: i32) -> Vec<(i32, String)> {
    let descends = |pid: i32| -> bool {
        let mut cur = pid;
        for _ in 0..MAX_ANCESTRY {
            if cur == init {
                return true;
            }
            match crate::oci::state::process_parent(cur) {
                Some(p) if p > 1 => cur = p,
                Some(_) => return false,
                None => return true,
            }
        }
        true
    };
    pids.iter()
        .copied()
        .take(MAX_STRAY_SCAN)
        .filter(|&p| !descends(p))
        .map(|p| (p, crate::oci::state::process_comm(p)))
        .collect()
}

/// SIGKILLs every process in the cgroup directory `dir`; returns how many there were.
fn kill_procs(dir: &Path) -> usize {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let mut n = 0;
    for pid in procs(dir).unwrap_or_default() {
        n += 1;
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    n
}

/// SIGKILLs every process in the cgroup directories `dirs` until they are empty (bounded:
/// 5 s). Frozen ones die once thawed.
fn kill_until_empty(dirs: &[PathBuf]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let left: usize = dirs.iter().map(|d| kill_procs(d)).sum();
        if left == 0 || std::time::Instant::now() > deadline {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Kills every process of the freezer cgroup `dir` without letting any run again: SIGKILL
/// while they are frozen (as [`freeze`] left them, or running if it could not), then thaw,
/// so that they die on their way back to user space; waits (bounded) until it is empty.
pub fn kill_frozen(dir: &Path) {
    kill_procs(dir);
    if let Err(e) = thaw(dir) {
        tracing::warn!("{e}");
    }
    kill_until_empty(&[dir.to_path_buf()]);
}

/// Whether a freezer cgroup (v1 `freezer.state`, v2 `cgroup.freeze`) is frozen, if readable.
pub fn is_frozen(dir: &Path) -> Option<bool> {
    if let Ok(s) = std::fs::read_to_string(dir.join("freezer.state")) {
        return Some(s.trim() != "THAWED");
    }
    std::fs::read_to_string(dir.join("cgroup.freeze"))
        .ok()
        .map(|s| s.trim() == "1")
}

/// Asks a freezer cgroup to freeze (v1 `freezer.state` FROZEN, v2 `cgroup.freeze` 1) and
/// returns the file and value written; the tasks freeze as they next leave the kernel.
pub fn start_freeze(dir: &Path) -> Result<(PathBuf, &'static str), RuntimeError> {
    let v1 = dir.join("freezer.state");
    let (file, value) = if v1.exists() {
        (v1, "FROZEN")
    } else {
        (dir.join("cgroup.freeze"), "1")
    };
    std::fs::write(&file, value).map_err(io_err("freeze", &file))?;
    Ok((file, value))
}

/// The path of the freezer's hierarchy in a `/proc/PID/cgroup` text: the v1 line naming
/// `freezer` when `v1`, else the v2 line (`0::/path`).
fn freezer_path_in(proc_cgroup: &str, v1: bool) -> Option<&str> {
    proc_cgroup.lines().find_map(|line| {
        let mut it = line.splitn(3, ':');
        let (id, ctrls, path) = (it.next()?, it.next()?, it.next()?);
        let hit = match v1 {
            true => ctrls.split(',').any(|c| c == "freezer"),
            false => id == "0" && ctrls.is_empty(),
        };
        hit.then_some(path)
    })
}

/// The freezer cgroup `pid` should move to so that freezing `frozen` (where `pid` is now,
/// as `pid_cgroup`, its /proc/PID/cgroup, says) leaves it running: the one of the same
/// hierarchy that `home_cgroup` (another process's /proc/PID/cgroup) names.
pub fn freezer_home(frozen: &Path, pid_cgroup: &str, home_cgroup: &str) -> Option<PathBuf> {
    let v1 = frozen.join("freezer.state").exists();
    let now = freezer_path_in(pid_cgroup, v1)?;
    let home = freezer_path_in(home_cgroup, v1)?;
    let frozen = frozen.to_str()?;
    let mount = match now {
        "/" => frozen,
        _ => frozen.strip_suffix(now)?,
    };
    Some(PathBuf::from(format!(
        "{}{home}",
        mount.trim_end_matches('/')
    )))
}

/// Freezes a freezer cgroup and waits until it is frozen, polling every millisecond.
///
/// CRIU freezes with 100 ms sleeps between checks; a container that ferry froze already is
/// seized at once (CRIU thaws it again after a successful dump, the tasks staying seized).
pub fn freeze(dir: &Path, timeout: std::time::Duration) -> Result<(), RuntimeError> {
    let (file, value) = start_freeze(dir)?;
    let started = std::time::Instant::now();
    let mut rewritten = started;
    loop {
        if is_frozen_complete(dir) {
            return Ok(());
        }
        if started.elapsed() > timeout {
            let _ = thaw(dir);
            return Err(RuntimeError::Cgroup {
                path: dir.to_path_buf(),
                why: format!("not frozen after {timeout:?}"),
            });
        }
        // A v1 freezer can stall in FREEZING; writing FROZEN again retries it.
        if rewritten.elapsed() > std::time::Duration::from_millis(50) {
            let _ = std::fs::write(&file, value);
            rewritten = std::time::Instant::now();
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Frozen and not in transition (v1 FROZEN, v2 `frozen 1` in cgroup.events).
fn is_frozen_complete(dir: &Path) -> bool {
    if let Ok(s) = std::fs::read_to_string(dir.join("freezer.state")) {
        return s.trim() == "FROZEN";
    }
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map(|s| s.lines().any(|l| l.trim() == "frozen 1"))
        .unwrap_or(false)
}

/// Thaws a freezer cgroup.
pub fn thaw(dir: &Path) -> Result<(), RuntimeError> {
    let v1 = dir.join("freezer.state");
    if v1.exists() {
        return std::fs::write(&v1, "THAWED").map_err(io_err("thaw", &v1));
    }
    let v2 = dir.join("cgroup.freeze");
    std::fs::write(&v2, "0").map_err(io_err("thaw", &v2))
}

/// The cgroup paths of a container restored as `new_id`, derived from the checkpointed ones:
/// a last component equal to the old id is replaced, as runc names a container's cgroup after it.
pub fn renamed_paths(
    paths: &BTreeMap<String, String>,
    old_id: &str,
    new_id: &str,
) -> BTreeMap<String, String> {
    paths
        .iter()
        .map(|(k, v)| {
            let p = Path::new(v);
            let renamed = match p.file_name() {
                Some(n) if n == old_id && old_id != new_id => {
                    p.with_file_name(new_id).to_string_lossy().into_owned()
                }
                _ => v.clone(),
            };
            (k.clone(), renamed)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two restores making the same parent at once (the `--cgroup-prefix` dir of two
    /// migrations into one serve) both succeed; only the one that made a dir owns it.
    #[test]
    fn concurrent_creators_of_one_parent_both_succeed() {
        let root = tempfile::tempdir().unwrap();
        for i in 0..200 {
            let shared = root.path().join(format!("prefix-{i}"));
            let made: Vec<Vec<PathBuf>> = std::thread::scope(|s| {
                let hs: Vec<_> = ["a", "b"]
                    .iter()
                    .map(|c| {
                        let dir = shared.join(c);
                        s.spawn(move || {
                            let mut set = CgroupSet::default();
                            set.ensure(&dir).unwrap();
                            set.created
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let owners = made.iter().filter(|c| c.contains(&shared)).count();
            assert_eq!(owners, 1, "{made:?}");
            assert!(made
                .iter()
                .all(|c| c.last().is_some_and(|d| d.parent() == Some(&shared))));
        }
    }

    #[test]
    fn limits_the_cgroups_here_cannot_take_are_found_before_the_restore() {
        let t = tempfile::tempdir().unwrap();
        let touch = |rel: &str, text: &str| {
            let p = t.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        // v2: the root offers four controllers; "nopids" below it got no pids from it.
        touch("v2/cgroup.procs", "");
        touch("v2/cgroup.controllers", "cpu memory pids hugetlb\n");
        touch("v2/nopids/cgroup.procs", "");
        touch("v2/nopids/memory.max", "max");
        touch("hp/hugepages-2048kB/nr_hugepages", "0");
        let hp = t.path().join("hp");
        let v2 =
            |dir: &str| BTreeMap::from([(String::new(), t.path().join(dir).display().to_string())]);
        let one = |file: &str, value: &str| BTreeMap::from([(file.into(), value.into())]);
        let check = |paths: &BTreeMap<String, String>, file: &str, value: &str| {
            settable(paths, &one(file, value), &hp)
        };
        let under = v2("v2/nopids/prefix/ctr");
        check(&under, "memory.max", "268435456").unwrap();
        check(&under, "pids.max", "max").unwrap();
        let e = check(&under, "pids.max", "99").unwrap_err();
        assert!(
            e.starts_with("the container's pids.max is 99 and this host's cgroup ")
                && e.contains("/v2/nopids has no pids.max"),
            "{e}"
        );
        let at_root = v2("v2/ctr");
        check(&at_root, "pids.max", "99").unwrap();
        check(&at_root, "hugetlb.2MB.max", "4194304").unwrap();
        let e = check(&at_root, "io.weight", "100").unwrap_err();
        assert!(e.contains("no io controller"), "{e}");
        let e = check(&at_root, "hugetlb.1GB.max", "1073741824").unwrap_err();
        assert!(e.contains("hugepages-1048576kB does not exist"), "{e}");
        // v1: a memory hierarchy, no pids one; the device rules are every hierarchy's.
        touch("v1/memory/cgroup.procs", "");
        let v1 = BTreeMap::from([
            (
                "memory".to_string(),
                t.path().join("v1/memory/p/c").display().to_string(),
            ),
            (
                "pids".to_string(),
                t.path().join("v1/pids/p/c").display().to_string(),
            ),
        ]);
        check(&v1, "memory.limit_in_bytes", "268435456").unwrap();
        check(&v1, DEVICES_LIST, "c 1:3 rwm").unwrap();
        let e = check(&v1, "pids.max", "99").unwrap_err();
        assert!(
            e.contains("no cgroup hierarchy with the pids controller"),
            "{e}"
        );
        let e = check(&v1, "cpu.shares", "512").unwrap_err();
        assert!(e.contains("no cpu cgroup for it"), "{e}");
        assert_eq!(hugetlb_kb("hugetlb.64KB.limit_in_bytes"), Some(64));
        assert_eq!(hugetlb_kb("hugetlb.x.max"), None);
        // Paths outside the cgroup filesystem are refused as such.
        let e = check_settable(&at_root, &one("pids.max", "99")).unwrap_err();
        assert!(e.contains("not a path below"), "{e}");
    }

    #[test]
    fn settings_go_back_in_order_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = BTreeMap::new();
        for c in ["memory", "cpu", "pids", "devices"] {
            let d = dir.path().join(c);
            std::fs::create_dir(&d).unwrap();
            paths.insert(c.to_string(), d.display().to_string());
        }
        for f in [
            "memory/memory.limit_in_bytes",
            "cpu/cpu.shares",
            "pids/pids.max",
        ] {
            std::fs::write(dir.path().join(f), "0").unwrap();
        }
        std::fs::write(dir.path().join("devices/devices.list"), "c 1:3 rwm\n").unwrap();
        // runc's config sets these three (swappiness 0 is a value); pids_limit 0 is unset.
        let config = serde_json::json!({
            "memory": 268435456, "cpu_shares": 512, "memory_swappiness": 0,
            "pids_limit": 0, "cpuset_cpus": "", "memory_swap": null
        });
        std::fs::write(dir.path().join("memory/memory.swappiness"), "0").unwrap();
        let read = read_settings(&paths, &config).unwrap();
        assert_eq!(
            read.keys().collect::<Vec<_>>(),
            [
                "cpu.shares",
                "devices.list",
                "memory.limit_in_bytes",
                "memory.swappiness"
            ]
        );
        let mut want = read.clone();
        want.insert("memory.limit_in_bytes".into(), "268435456".into());
        want.insert("devices.list".into(), "b *:* m\nc 1:3 rwm".into());
        // No such file here, but no limit either: nothing is lost.
        want.insert(
            "memory.memsw.limit_in_bytes".into(),
            "9223372036854771712".into(),
        );
        apply_settings(&paths, &want, &serde_json::Value::Null).unwrap();
        let got = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert_eq!(got("memory/memory.limit_in_bytes"), "268435456");
        // (plain files here: the last rule written is what stays)
        assert_eq!(got("devices/devices.deny"), "a");
        assert_eq!(got("devices/devices.allow"), "c 1:3 rwm");
        // A limit this host cannot hold is an error, not dropped.
        want.insert("memory.memsw.limit_in_bytes".into(), "536870912".into());
        assert!(apply_settings(&paths, &want, &serde_json::Value::Null).is_err());
        // From a checkpoint or a peer: known files only.
        validate_settings(&read).unwrap();
        let mut bad = read.clone();
        bad.insert("cgroup.procs".into(), "1".into());
        assert!(validate_settings(&bad).is_err());
        assert_eq!(controller_of("cpu.cfs_quota_us"), "cpu");
    }

    #[test]
    fn v2_settings_are_the_v2_files_and_layouts_do_not_mix() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = BTreeMap::new();
        paths.insert(String::new(), dir.path().display().to_string());
        for f in [
            "memory.max",
            "cpu.max",
            "cpu.weight",
            "pids.max",
            "io.weight",
        ] {
            std::fs::write(dir.path().join(f), "max").unwrap();
        }
        std::fs::write(dir.path().join("cpu.max"), "50000 100000").unwrap();
        let config = serde_json::json!({
            "memory": 268435456, "cpu_quota": 50000, "cpu_shares": 512, "cpu_weight": 20,
            "pids_limit": 0, "blkio_weight": 0
        });
        std::fs::write(dir.path().join("memory.high"), "201326592").unwrap();
        let mut config = config;
        config["unified"] = serde_json::json!({"memory.high": "201326592"});
        let read = read_settings(&paths, &config).unwrap();
        assert_eq!(
            read.keys().collect::<Vec<_>>(),
            ["cpu.max", "cpu.weight", "memory.high", "memory.max"]
        );
        // Huge page limits: v2's file; a bad page size is refused.
        std::fs::write(dir.path().join("hugetlb.2MB.max"), "2097152").unwrap();
        let mut c = config.clone();
        c["hugetlb_limit"] = serde_json::json!([{"page_size": "2MB", "limit": 2097152}]);
        assert_eq!(
            read_settings(&paths, &c).unwrap()["hugetlb.2MB.max"],
            "2097152"
        );
        c["hugetlb_limit"] = serde_json::json!([{"page_size": "../x", "limit": 1}]);
        assert!(read_settings(&paths, &c).is_err());
        let mut huge = BTreeMap::new();
        huge.insert("hugetlb.2MB.max".to_string(), "4194304".to_string());
        validate_settings(&huge).unwrap();
        apply_settings(&paths, &huge, &serde_json::Value::Null).unwrap();
        let huge_file = std::fs::read_to_string(dir.path().join("hugetlb.2MB.max")).unwrap();
        assert_eq!(huge_file, "4194304");
        assert!(is_hugetlb_v1_name("hugetlb.1GB.limit_in_bytes"));
        assert!(!is_unified_name("hugetlb.1GB.limit_in_bytes"));
        for bad in [
            "hugetlb.1Gb.limit_in_bytes",
            "hugetlb.MB.limit_in_bytes",
            "hugetlb.2MB.max",
        ] {
            assert!(!is_hugetlb_v1_name(bad), "{bad}");
        }
        for bad in [
            "cgroup.procs",
            "memory",
            "../memory.max",
            "Memory.max",
            ".max",
        ] {
            assert!(!is_unified_name(bad), "{bad}");
            let mut c = config.clone();
            c["unified"] = serde_json::json!({ bad: "1" });
            assert!(read_settings(&paths, &c).is_err(), "{bad}");
        }
        assert_eq!(read["cpu.max"], "50000 100000");
        let mut want = read.clone();
        want.insert("memory.max".into(), "268435456".into());
        apply_settings(&paths, &want, &serde_json::Value::Null).unwrap();
        let got = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert_eq!(got("memory.max"), "268435456");
        validate_settings(&want).unwrap();
        // A v1 checkpoint's limit, or its device list, on a v2 host: refused, not dropped.
        for (k, v) in [
            ("memory.limit_in_bytes", "268435456"),
            (DEVICES_LIST, "a *:* m"),
        ] {
            let mut v1 = want.clone();
            v1.insert(k.into(), v.into());
            let e = apply_settings(&paths, &v1, &serde_json::Value::Null).unwrap_err();
            assert!(e.to_string().contains("cgroup v1 host"), "{e}");
        }
        // The other way: a v2 checkpoint's limits, or none but no device list, on v1.
        let v1dir = tempfile::tempdir().unwrap();
        let mut v1paths = BTreeMap::new();
        for c in ["memory", "devices"] {
            let d = v1dir.path().join(c);
            std::fs::create_dir(&d).unwrap();
            v1paths.insert(c.to_string(), d.display().to_string());
        }
        let e = apply_settings(&v1paths, &want, &serde_json::Value::Null).unwrap_err();
        assert!(e.to_string().contains("cgroup v2-only host"), "{e}");
        let rules = serde_json::json!([{"allow": false, "type": 97}]);
        let e = apply_settings(&v1paths, &BTreeMap::new(), &rules).unwrap_err();
        assert!(e.to_string().contains("no cgroup v1 device rules"), "{e}");
    }

    #[test]
    fn layouts_must_match() {
        let mut v2 = BTreeMap::new();
        v2.insert(String::new(), "/sys/fs/cgroup/c1".to_string());
        let mut hybrid = v2.clone();
        hybrid.insert("memory".into(), "/sys/fs/cgroup/memory/c1".into());
        assert_eq!(layout_of(&v2), "v2");
        assert_eq!(layout_of(&hybrid), "v1");
        check_layout("v1", "v1").unwrap();
        check_layout("v2", "v2").unwrap();
        let e = check_layout("v1", "v2").unwrap_err();
        assert!(
            e.contains("cgroup v1 host and this host is cgroup v2-only"),
            "{e}"
        );
        assert!(check_layout("v3", "v1").is_err());
        assert!(["v1", "v2"].contains(&host_layout()));
    }

    #[test]
    fn rename_replaces_only_the_id_component() {
        let mut m = BTreeMap::new();
        m.insert("cpu".to_string(), "/sys/fs/cgroup/cpu/c1".to_string());
        m.insert(
            "memory".to_string(),
            "/sys/fs/cgroup/memory/x/c1".to_string(),
        );
        m.insert("pids".to_string(), "/sys/fs/cgroup/pids/custom".to_string());
        let r = renamed_paths(&m, "c1", "c2");
        assert_eq!(r["cpu"], "/sys/fs/cgroup/cpu/c2");
        assert_eq!(r["memory"], "/sys/fs/cgroup/memory/x/c2");
        assert_eq!(r["pids"], "/sys/fs/cgroup/pids/custom");
    }

    #[test]
    fn paths_outside_cgroupfs_are_refused() {
        let mut m = BTreeMap::new();
        m.insert("cpu".to_string(), "/etc/evil".to_string());
        assert!(CgroupSet::create(&m).is_err());
        m.insert("cpu".to_string(), "/sys/fs/cgroup/../../etc".to_string());
        assert!(CgroupSet::create(&m).is_err());
    }

    #[test]
    fn cpu_lists_parse_merge_and_subtract() {
        assert_eq!(
            parse_list("0-3,8,10-11\n").unwrap(),
            vec![(0, 3), (8, 8), (10, 11)]
        );
        assert_eq!(parse_list("4,0-1,2-3").unwrap(), vec![(0, 4)]);
        assert_eq!(parse_list("").unwrap(), vec![]);
        for bad in ["3-1", "a", "1-", "-1", "0-4294967296", "1:2"] {
            assert!(parse_list(bad).is_err(), "{bad}");
        }
        assert!(parse_list(&"1,".repeat(MAX_LIST)).is_err());
        // The largest id does not overflow the "next uncovered" counter.
        assert_eq!(
            parse_list("4294967295").unwrap(),
            vec![(4294967295, 4294967295)]
        );
        let l = |s: &str| parse_list(s).unwrap();
        assert!(list_minus(&l("0-3"), &l("0-7")).is_empty());
        assert!(list_minus(&l("4294967295"), &l("0-4294967295")).is_empty());
        assert_eq!(list_text(&list_minus(&l("0-7"), &l("1-2,5"))), "0,3-4,6-7");
        assert_eq!(list_text(&list_minus(&l("1,6-9"), &l("0-1,8"))), "6-7,9");
        assert_eq!(list_text(&list_minus(&l("1"), &l(""))), "1");
        assert_eq!(list_text(&l("")), "none");
    }

    #[test]
    fn a_cpuset_fits_within_the_holders_lists() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("cpuset.cpus"), "0-1\n").unwrap();
        std::fs::write(d.join("cpuset.mems"), "0\n").unwrap();
        std::fs::write(d.join("cpuset.cpus.effective"), "0\n").unwrap();
        assert!(cpuset_fits(d, false, Some("1"), Some("0")).is_ok());
        assert!(cpuset_fits(d, false, None, None).is_ok());
        let e = cpuset_fits(d, false, Some("0-3"), None).unwrap_err();
        let want = format!(
            "the container is pinned to CPUs 0-3 (cpuset.cpus) and this host's cpuset {} has \
             only 0-1: 2-3 missing",
            d.display()
        );
        assert_eq!(e, want);
        let e = cpuset_fits(d, false, None, Some("0,1")).unwrap_err();
        assert!(
            e.contains("memory nodes 0-1 (cpuset.mems)") && e.ends_with(": 1 missing"),
            "{e}"
        );
        // v2: the effective lists; one the host does not show is left to the restore.
        assert!(cpuset_fits(d, true, None, Some("5")).is_ok());
        let e = cpuset_fits(d, true, Some("1"), None).unwrap_err();
        assert_eq!(
            e,
            "the container is pinned to CPUs 1 (cpuset.cpus) and this host has only 0: 1 missing"
        );
        let e = cpuset_fits(d, false, Some("x"), None).unwrap_err();
        assert!(e.starts_with("the container's cpuset.cpus: "), "{e}");
    }

    #[test]
    fn a_cpuset_outside_the_cgroup_fs_is_refused() {
        let e = check_cpuset(Path::new("/etc/x"), Some("0"), None).unwrap_err();
        assert!(e.contains("not a path below"), "{e}");
        let e = check_cpuset(Path::new("/sys/fs/cgroup/../x"), Some("0"), None).unwrap_err();
        assert!(e.contains("not a path below"), "{e}");
    }

    #[test]
    fn freezer_home_is_the_same_hierarchy_under_the_other_path() {
        let dir = tempfile::tempdir().unwrap();
        let frozen = dir.path().join("ferry-dst/c1");
        std::fs::create_dir_all(&frozen).unwrap();
        let v1_now = "12:freezer:/ferry-dst/c1\n3:cpu,cpuacct:/ferry-dst/c1\n0::/ferry-dst/c1\n";
        let v1_home = "12:freezer:/user.slice\n3:cpu,cpuacct:/\n0::/x\n";
        // v2 (no freezer.state): the "0::" line.
        assert_eq!(
            freezer_home(&frozen, v1_now, v1_home),
            Some(dir.path().join("x"))
        );
        std::fs::write(frozen.join("freezer.state"), "THAWED").unwrap();
        assert_eq!(
            freezer_home(&frozen, v1_now, v1_home),
            Some(dir.path().join("user.slice"))
        );
        let root_home = "12:freezer:/\n";
        assert_eq!(
            freezer_home(&frozen, v1_now, root_home),
            Some(dir.path().to_path_buf())
        );
        // Not where the process is said to be, or no freezer line: no answer.
        assert_eq!(freezer_home(&frozen, "12:freezer:/other\n", v1_home), None);
        assert_eq!(
            freezer_home(&frozen, "3:cpu:/ferry-dst/c1\n", v1_home),
            None
        );
    }

    #[test]
    fn strays_are_the_processes_init_is_no_ancestor_of() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id() as i32;
        std::fs::write(dir.path().join("cgroup.procs"), format!("{me}\n")).unwrap();
        let pids = procs(dir.path()).unwrap();
        assert_eq!(pids, vec![me]);
        let parent = std::os::unix::process::parent_id() as i32;
        assert_eq!(strays(&pids, me), vec![]);
        assert_eq!(strays(&pids, parent), vec![]);
        // No ancestor of this process: its chain ends at pid 1 first.
        let s = strays(&pids, i32::MAX);
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!(s[0].0, me);
        assert!(!s[0].1.is_empty(), "{s:?}");
    }
}
