#!/usr/bin/env bash
# Live migration (ferry serve / ferry migrate) vs the runc baseline (runc checkpoint + copy
# of the images over TCP + runc restore, what `docker checkpoint` + a copy + `docker start
# --checkpoint` do), on memwriter containers, between two emulated hosts on this machine.
#
#   sudo bash benches/migrate.sh
#   sudo SIZES="64 256" RATES="16" MODES="baseline stop-copy" REPEAT=1 bash benches/migrate.sh
#
# Environment (all optional):
#   SIZES    memwriter sizes in MiB            (default "64 256 1024")
#   RATES    dirty rates in MiB/s              (default "0 16 64")
#   MODES    baseline and/or ferry modes       (default "baseline stop-copy post-copy",
#            plus pre-copy when `ferry check` reports dirty-memory tracking)
#   REPEAT   runs per (size, rate, mode); the table shows medians   (default 3)
#   RAW_MIB  MiB per raw TCP throughput sample (3 samples)          (default 1024)
#   LOG_DIR  where results, ferry serve's stderr and failure logs are kept
#            (default /var/tmp/ferry-bench-logs-<pid>)
#   TRACE    if set, ferry migrate runs with -vv and its stderr is kept in LOG_DIR
#   SERVE_WORK  ferry serve --work-dir (default under /var/tmp; e.g. a tmpfs to compare)
#   PAGE_SERVER  ferry serve --page-server: ferry (its own receiver, the default) or criu
#            (a CRIU page server per round), to compare the two
#   ROOTFS_MIB  extra MiB of files (random, 8 MiB each) in every container's rootfs, as a
#            real image would have (default 0: busybox + memwriter, ≈2 MiB)
#
# The two hosts are network namespaces joined by a veth pair (source 192.0.2.1, destination
# 192.0.2.2, documentation range), each with its own runc root and bundles dir; they share
# the filesystem and the cgroup filesystem (the destination's `ferry serve` runs with
# --cgroup-prefix ferry-bench-dst). ferry and the baseline's network ends run in the hosts'
# namespaces through `nsenter --net` (not `ip netns exec`, which would hide /sys/fs/cgroup).
#
# Between runs the script syncs (untimed), so that no run is throttled by the writeback of
# the images an earlier run left dirty in the page cache.
#
# Each run starts a fresh container on the source (busybox + memwriter rootfs, stdio
# /dev/null, a host dir bind-mounted at /data where memwriter appends its check lines), waits
# until its memory is filled and checked, migrates it, then checks that it keeps writing
# `ok` lines on the destination with an unbroken seq (otherwise the row says FAIL), and
# removes it. Prints one table with downtime, total time and bytes sent, each as a ratio to
# the baseline of the same size and rate, and bytes / RSS; then the raw TCP throughput
# between the namespaces and the issue's targets with PASS / FAIL / N/A.
#
# Needs root, runc, criu, cargo, gcc, iproute2, util-linux (nsenter), python3, tar and
# busybox-static. Cleans up after itself (containers, cgroups, namespaces, mounts, dirs).
set -euo pipefail

die() { echo "migrate-bench: error: $*" >&2; exit 1; }
log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
[ "$(id -u)" -eq 0 ] || die "must run as root"
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
for p in runc criu cargo gcc ip nsenter tar timeout; do
    command -v "$p" >/dev/null || die "$p not found"
done
python=/usr/bin/python3
[ -x "$python" ] || python=$(command -v python3) || die "python3 not found"
busybox=""
for b in /bin/busybox /usr/bin/busybox; do
    [ -x "$b" ] && { busybox=$b; break; }
done
[ -n "$busybox" ] || die "busybox not found (apt-get install busybox-static)"

SIZES=${SIZES:-64 256 1024}
RATES=${RATES:-0 16 64}
REPEAT=${REPEAT:-3}
RAW_MIB=${RAW_MIB:-1024}
ROOTFS_MIB=${ROOTFS_MIB:-0}
PAGE_SERVER=${PAGE_SERVER:-ferry}
for v in $SIZES $RATES $REPEAT $RAW_MIB $ROOTFS_MIB; do
    [[ $v =~ ^[0-9]+$ ]] || die "SIZES, RATES, REPEAT, RAW_MIB and ROOTFS_MIB take non-negative integers (got '$v')"
done
[ "$REPEAT" -ge 1 ] || die "REPEAT must be ≥ 1"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
log "building ferry (release)..."
(cd "$repo" && cargo build --release --quiet --bin ferry)
ferry=$repo/target/release/ferry
[ -x "$ferry" ] || die "no $ferry after build"

check_json=$("$ferry" check --json 2>/dev/null || true)
mem_track=$(printf '%s' "$check_json" | "$python" -c \
    'import json,sys; print(str(json.load(sys.stdin)["features"]["mem_track"]).lower())' 2>/dev/null || echo unknown)
if [ -z "${MODES:-}" ]; then
    MODES="baseline stop-copy post-copy"
    [ "$mem_track" = true ] && MODES="$MODES pre-copy"
fi
for m in $MODES; do
    case $m in baseline|stop-copy|post-copy|pre-copy|hybrid|auto) ;; *) die "unknown mode '$m'" ;; esac
done

# --- scratch space, hosts ------------------------------------------------------------------
tag=fb$$
src_ns=fbsrc-$$ dst_ns=fbdst-$$
src_veth=fbs$$ dst_veth=fbd$$
SRC_IP=192.0.2.1 DST_IP=192.0.2.2
CG_PREFIX=ferry-bench-dst
state_base=/run/ferry-bench-$$
work=/var/tmp/ferry-bench-$$
LOG_DIR=${LOG_DIR:-/var/tmp/ferry-bench-logs-$$}
src_root=$state_base/src/runc dst_root=$state_base/dst/runc
src_bundles=$work/src/bundles dst_bundles=$work/dst/bundles
serve_work=${SERVE_WORK:-$work/dst/serve-work}
token=$work/token
helper=$work/helper.py
results=$LOG_DIR/results.tsv
serve_pid=""
bg_pids=()   # background helpers (receivers, gap watcher): killed by cleanup if still there
netns_made=""
orig_pipe_max=""

BENCH_NAME=migrate-bench
# shellcheck source=benches/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

in_src() { nsenter --net="/run/netns/$src_ns" -- "$@"; }
in_dst() { nsenter --net="/run/netns/$dst_ns" -- "$@"; }

state_status() { # root id
    { runc --root "$1" state "$2" 2>/dev/null || true; } | awk -F'"' '/"status"/ { print $4; exit }'
}

# Kill and delete container $2 in runc root $1 (best effort, idempotent).
stop_in_root() {
    local root=$1 id=$2 st
    unmount_below "$root/$id/criu-root"
    st=$(state_status "$root" "$id")
    [ -n "$st" ] || return 0
    [ "$st" = paused ] && runc --root "$root" resume "$id" >/dev/null 2>&1
    runc --root "$root" kill "$id" KILL >/dev/null 2>&1 || true
    for _ in $(seq 100); do
        [ "$(state_status "$root" "$id")" = running ] || break
        sleep 0.05
    done
    # A criu-root left mounted by a failed restore would make `delete -f` remove the
    # bundle's rootfs through it: detach it first.
    unmount_below "$root/$id/criu-root"
    runc --root "$root" delete -f "$id" >/dev/null 2>&1 || true
    unmount_below "$root/$id/criu-root"
}

# Our cgroup dirs (named after our container ids), deepest first.
our_cgroups() {
    find /sys/fs/cgroup -mindepth 2 -maxdepth 4 -type d -name "$tag-*" 2>/dev/null |
        awk '{ print length($0) "\t" $0 }' | sort -rn | cut -f2-
}

netns_ino() { stat -L -c %i "/run/netns/$1" 2>/dev/null || true; }

# SIGKILL what ferry may have left behind: criu processes in our two namespaces, processes
# in cgroups named after our containers (thawed first: a frozen task cannot die).
reap_leftovers() {
    local ino p link d
    for ino in $(netns_ino "$src_ns") $(netns_ino "$dst_ns"); do
        for p in /proc/[0-9]*; do
            link=$(readlink "$p/ns/net" 2>/dev/null) || continue
            [ "$link" = "net:[$ino]" ] || continue
            [ "$(cat "$p/comm" 2>/dev/null)" = criu ] || continue
            echo "migrate-bench: killing leftover criu (pid ${p#/proc/})" >&2
            kill -KILL "${p#/proc/}" 2>/dev/null || true
        done
    done
    while IFS= read -r d; do
        [ -n "$d" ] || continue
        [ -f "$d/freezer.state" ] && echo THAWED >"$d/freezer.state" 2>/dev/null
        for p in $(cat "$d/cgroup.procs" 2>/dev/null); do
            echo "migrate-bench: killing leftover pid $p in $d" >&2
            kill -KILL "$p" 2>/dev/null || true
        done
    done < <(our_cgroups)
}

stop_serve() {
    [ -n "$serve_pid" ] || return 0
    kill -TERM "$serve_pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$serve_pid" 2>/dev/null || break
        sleep 0.05
    done
    kill -KILL "$serve_pid" 2>/dev/null || true
    wait "$serve_pid" 2>/dev/null || true
    serve_pid=""
}

cleanup() {
    set +e
    local p
    for p in "${bg_pids[@]}"; do
        kill -KILL "$p" 2>/dev/null
    done
    stop_serve
    local root id d
    for root in "$src_root" "$dst_root"; do
        [ -d "$root" ] || continue
        for id in $(runc --root "$root" list -q 2>/dev/null) $(ls "$root" 2>/dev/null); do
            stop_in_root "$root" "$id"
        done
    done
    reap_leftovers
    sleep 0.2
    while IFS= read -r d; do
        [ -n "$d" ] && rmdir "$d" 2>/dev/null
    done < <(our_cgroups)
    for d in /sys/fs/cgroup/*/"$CG_PREFIX"; do
        [ -d "$d" ] && rmdir "$d" 2>/dev/null
    done
    if [ -n "$netns_made" ]; then
        ip netns del "$src_ns" 2>/dev/null
        ip netns del "$dst_ns" 2>/dev/null
    fi
    [ -n "$orig_pipe_max" ] && echo "$orig_pipe_max" >/proc/sys/fs/pipe-max-size
    for d in /run/ferry/*-"$tag"-*; do
        [ -e "$d" ] && safe_rm "$d"
    done
    [ -f "$work/serve.err" ] && [ -d "$LOG_DIR" ] && cp "$work/serve.err" "$LOG_DIR/serve.stderr"
    safe_rm "$state_base"
    safe_rm "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$src_root" "$dst_root" "$src_bundles" "$dst_bundles" "$serve_work" "$work/data" \
    "$work/runs" "$LOG_DIR"
: >"$results"

# CRIU's lazy page server (post-copy) needs fs.pipe-max-size ≥ 3.3 MiB without CAP_SYS_RESOURCE.
if [ "$(cat /proc/sys/fs/pipe-max-size)" -lt 4194304 ]; then
    orig_pipe_max=$(cat /proc/sys/fs/pipe-max-size)
    echo 4194304 >/proc/sys/fs/pipe-max-size || die "cannot raise fs.pipe-max-size"
fi

# --- python helpers: config.json, ferry's JSON, TCP sender/receiver, the report -----------
cat >"$helper" <<'PY'
import json, os, socket, statistics, sys, time

def config(template, out, mib, rate, data):
    spec = json.load(open(template))
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["/bin/memwriter", mib, rate, "/data/mem.log"]
    spec["root"]["readonly"] = False
    spec["mounts"].append({"destination": "/data", "type": "bind", "source": data,
                           "options": ["rbind", "rw"]})
    json.dump(spec, open(out, "w"), indent=2)

def migrate_fields(path):
    v = json.load(open(path))
    r = (v.get("rounds") or [{}])[0]
    print(v["mode"], v["downtime_ms"], v["total_ms"], v["bytes_sent"], v["frozen_ms"],
          r.get("bytes", 0), r.get("ms", 0))

def recv(ip, portfile, out, resfile):
    s = socket.socket()
    s.bind((ip, 0))
    s.listen(1)
    with open(portfile + ".tmp", "w") as f:
        f.write(str(s.getsockname()[1]))
    os.rename(portfile + ".tmp", portfile)
    c, _ = s.accept()
    t0 = time.monotonic()
    buf = bytearray(4 << 20)
    mv = memoryview(buf)
    n = 0
    tar = None
    if out == "null":
        fd = None
    elif out.startswith("tar:"):  # unpack the stream into a directory
        import subprocess
        tar = subprocess.Popen(["tar", "x", "-C", out[4:]], stdin=subprocess.PIPE)
        fd = tar.stdin.fileno()
    else:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    while True:
        k = c.recv_into(buf)
        if k == 0:
            break
        n += k
        if fd is not None:
            off = 0
            while off < k:
                off += os.write(fd, mv[off:k])
    if tar is not None:
        tar.stdin.close()
        if tar.wait() != 0:
            sys.exit("tar x failed")
    ms = (time.monotonic() - t0) * 1000
    with open(resfile, "w") as f:
        f.write(f"{n} {ms:.1f}\n")

def send(ip, port, nbytes=None):
    deadline = time.monotonic() + 10
    while True:
        try:
            c = socket.create_connection((ip, int(port)), timeout=1)
            c.settimeout(None)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    if nbytes is None:
        while True:
            b = os.read(0, 4 << 20)
            if not b:
                break
            c.sendall(b)
    else:
        left = int(nbytes)
        chunk = b"\0" * (4 << 20)
        while left > 0:
            k = min(left, len(chunk))
            c.sendall(chunk[:k] if k < len(chunk) else chunk)
            left -= k
    c.shutdown(socket.SHUT_WR)
    c.recv(1)
    c.close()

def gapwatch(path, stopfile, out):
    """Longest interval between two growths of `path` (memwriter appends one line per check)
    until `stopfile` exists: the stall the workload itself saw across the migration."""
    last_size, last_t, gap = -1, None, 0.0
    watch_dir = os.path.dirname(stopfile)
    while not os.path.exists(stopfile) and os.path.isdir(watch_dir):
        try:
            size = os.stat(path).st_size
        except OSError:
            size = -1
        if size != last_size:
            t = time.monotonic()
            if last_t is not None and last_size >= 0:
                gap = max(gap, t - last_t)
            last_size, last_t = size, t
        time.sleep(0.005)
    with open(out, "w") as f:
        f.write(f"{gap * 1000:.0f}\n")

def fmt_ratio(a, b):
    return f"{a / b:.3f}" if (a is not None and b) else "-"

def report(results, rawfile, mem_track, sizes, rates, modes):
    rows = {}
    for line in open(results):
        f = line.rstrip("\n").split("\t")
        if len(f) < 13:
            continue
        size, rate, mode, rep, status = int(f[0]), int(f[1]), f[2], f[3], f[4]
        num = lambda x: float(x) if x not in ("", "-") else None
        rows.setdefault((size, rate, mode), []).append(dict(
            status=status, down=num(f[5]), total=num(f[6]), bytes=num(f[7]), rss=num(f[8]),
            page_bytes=num(f[9]), page_ms=num(f[10]), frozen=num(f[11]), gap=num(f[12]),
            note=f[13] if len(f) > 13 else ""))
    def med(runs, k):
        v = [r[k] for r in runs if r["status"] == "ok" and r[k] is not None]
        return statistics.median(v) if v else None
    agg = {}
    for key, runs in rows.items():
        nok = sum(r["status"] == "ok" for r in runs)
        agg[key] = dict(
            status="ok" if nok == len(runs) else f"FAIL({len(runs) - nok}/{len(runs)})",
            down=med(runs, "down"), total=med(runs, "total"), bytes=med(runs, "bytes"),
            rss=med(runs, "rss"), page_bytes=med(runs, "page_bytes"), page_ms=med(runs, "page_ms"),
            gap=med(runs, "gap"), runs=runs)
    MiB = 1 << 20
    hdr = ("size", "rate", "mode", "status", "downtime_ms", "total_ms", "bytes_MiB", "RSS_MiB",
           "down/base", "total/base", "bytes/base", "bytes/RSS", "max_gap_ms")
    fmt = "{:>5} {:>5} {:<10} {:<10} {:>11} {:>9} {:>10} {:>8} {:>10} {:>10} {:>10} {:>9} {:>10}"
    print("Size in MiB, dirty rate in MiB/s; medians of the ok runs; ratios to the baseline"
          " of the same size and rate.")
    print("max_gap_ms: longest interval between two memwriter check lines seen from the host"
          " across the migration (a check reads all memory, ~200 ms apart when undisturbed).")
    print()
    print(fmt.format(*hdr))
    order = {m: i for i, m in enumerate(modes)}
    for key in sorted(agg, key=lambda k: (k[0], k[1], order.get(k[2], 99))):
        a = agg[key]
        b = agg.get((key[0], key[1], "baseline"))
        ok = a["status"] == "ok"
        bd = b["down"] if b and b["status"] == "ok" else None
        bt = b["total"] if b and b["status"] == "ok" else None
        bb = b["bytes"] if b and b["status"] == "ok" else None
        f0 = lambda x, p=0: (f"{x:.{p}f}" if x is not None else "-")
        print(fmt.format(key[0], key[1], key[2], a["status"],
                         f0(a["down"]), f0(a["total"]),
                         f0(a["bytes"] / MiB if a["bytes"] is not None else None, 1),
                         f0(a["rss"] / MiB if a["rss"] is not None else None, 1),
                         fmt_ratio(a["down"], bd) if ok else "-",
                         fmt_ratio(a["total"], bt) if ok else "-",
                         fmt_ratio(a["bytes"], bb) if ok else "-",
                         fmt_ratio(a["bytes"], a["rss"]) if ok else "-",
                         f0(a["gap"])))
    # Where the time goes, medians per row; failures verbatim.
    import re
    print()
    print("Breakdown (medians): baseline = runc checkpoint / copy (tar over TCP) / runc restore;"
          " ferry = CRIU frozen_ms / page round (CRIU memdump: collecting and writing the pages).")
    for key in sorted(agg, key=lambda k: (k[0], k[1], order.get(k[2], 99))):
        runs = [r for r in agg[key]["runs"] if r["status"] == "ok"]
        if not runs:
            continue
        if key[2] == "baseline":
            ph = [re.search(r"checkpoint (\d+) / copy (\d+) / restore (\d+)", r["note"]) for r in runs]
            ph = [tuple(int(x) for x in m.groups()) for m in ph if m]
            if ph:
                c, t, rs = (statistics.median(p[i] for p in ph) for i in range(3))
                print(f"  {key[0]:>5} {key[1]:>3} {key[2]:<10} checkpoint {c:.0f} / copy {t:.0f} / restore {rs:.0f} ms")
        else:
            fr = statistics.median(r["frozen"] for r in runs)
            pm = statistics.median(r["page_ms"] for r in runs)
            pb = statistics.median(r["page_bytes"] for r in runs)
            pages = (f"page round {pb / MiB:.0f} MiB in {pm:.0f} ms" if pm else
                     f"{pb / MiB:.0f} MiB of pages sent on demand after the restore")
            print(f"  {key[0]:>5} {key[1]:>3} {key[2]:<10} frozen {fr:.0f} ms; {pages}")
    fails = [(k, r) for k, runs in rows.items() for r in runs if r["status"] != "ok"]
    if fails:
        print()
        print("Failures:")
        for k, r in fails:
            print(f"  {k[0]:>5} {k[1]:>3} {k[2]:<10} {r['note']}")

    # raw TCP and page throughput
    raw = []
    for line in open(rawfile):
        n, ms = line.split()
        if float(ms) > 0:
            raw.append(int(n) / MiB / (float(ms) / 1000))
    raw_med = statistics.median(raw) if raw else None
    print()
    if raw:
        print("raw TCP 192.0.2.1 -> 192.0.2.2 (one connection, python3 sendall/recv_into): "
              + ", ".join(f"{x:.0f}" for x in raw) + f" MiB/s, median {raw_med:.0f} MiB/s")
    sc = [k for k in agg if k[2] == "stop-copy" and agg[k]["status"] == "ok"]
    page = None
    if sc:
        k = max(sc, key=lambda k: (k[0], -k[1]))
        a = agg[k]
        if a["page_ms"]:
            page = a["page_bytes"] / MiB / (a["page_ms"] / 1000)
            conservative = a["bytes"] / MiB / (a["down"] / 1000) if a["down"] else None
            print(f"stop-copy page throughput ({k[0]} MiB at {k[1]} MiB/s): "
                  f"{a['page_bytes'] / MiB:.1f} MiB in {a['page_ms']:.0f} ms of CRIU memdump (collect + write)"
                  f" = {page:.0f} MiB/s; bytes_sent / downtime = {conservative:.0f} MiB/s")
    # targets
    print()
    print("Targets:")
    def line(name, verdict, why):
        print(f"  [{verdict}] {name}: {why}")
    ferry_modes = [m for m in modes if m != "baseline"]
    # 1
    b = agg.get((1024, 16, "baseline"))
    cands = [(agg[(1024, 16, m)]["down"], m) for m in ferry_modes
             if (1024, 16, m) in agg and agg[(1024, 16, m)]["status"] == "ok"]
    if b and b["status"] == "ok" and cands:
        d, m = min(cands)
        r = d / b["down"]
        line("downtime <= 0.05x baseline, 1 GiB at 16 MiB/s, best mode",
             "PASS" if r <= 0.05 else "FAIL",
             f"{m} {d:.0f} ms vs baseline {b['down']:.0f} ms = {r:.3f}x")
    else:
        line("downtime <= 0.05x baseline, 1 GiB at 16 MiB/s, best mode", "N/A",
             "needs a successful baseline and ferry run at 1024 MiB, 16 MiB/s")
    # 2
    got = False
    for rate in rates:
        a, s = agg.get((1024, rate, "post-copy")), agg.get((64, rate, "post-copy"))
        if a and s and a["status"] == "ok" and s["status"] == "ok":
            got = True
            r = a["down"] / s["down"]
            line(f"post-copy downtime 1 GiB <= 1.2x 64 MiB (rate {rate} MiB/s)",
                 "PASS" if r <= 1.2 else "FAIL",
                 f"{a['down']:.0f} ms vs {s['down']:.0f} ms = {r:.2f}x")
    if not got:
        line("post-copy downtime 1 GiB <= 1.2x 64 MiB", "N/A",
             "needs successful post-copy runs at 64 and 1024 MiB at the same rate")
    # 3
    pc = [k for k in agg if k[2] == "pre-copy" and k[1] == 16]
    if pc and mem_track != "true" and all(agg[k]["status"] != "ok" for k in pc):
        refusal = next((r["note"] for k in pc for r in agg[k]["runs"] if r["note"]), "")
        line("pre-copy bytes sent <= 1.2x RSS at 16 MiB/s", "N/A",
             "this kernel has no soft-dirty tracking (ferry check: mem_track=false); " + refusal)
    elif pc:
        for k in sorted(pc):
            a = agg[k]
            if a["status"] != "ok":
                line(f"pre-copy bytes sent <= 1.2x RSS at 16 MiB/s ({k[0]} MiB)", "FAIL",
                     "pre-copy migration failed: " + "; ".join(r["note"] for r in a["runs"] if r["note"]))
            else:
                r = a["bytes"] / a["rss"]
                line(f"pre-copy bytes sent <= 1.2x RSS at 16 MiB/s ({k[0]} MiB)",
                     "PASS" if r <= 1.2 else "FAIL", f"{r:.3f}x")
    else:
        why = ("not run: this kernel has no soft-dirty tracking (ferry check: mem_track=false),"
               " so ferry refuses pre-copy" if mem_track != "true" else "pre-copy not in MODES")
        line("pre-copy bytes sent <= 1.2x RSS at 16 MiB/s", "N/A", why)
    # 4
    if page and raw_med:
        r = page / raw_med
        line("page throughput >= 0.8x raw TCP", "PASS" if r >= 0.8 else "FAIL",
             f"stop-copy {page:.0f} MiB/s vs raw TCP {raw_med:.0f} MiB/s = {r:.2f}x")
    else:
        line("page throughput >= 0.8x raw TCP", "N/A", "needs a successful stop-copy run")

if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "config":
        config(*args)
    elif cmd == "fields":
        migrate_fields(*args)
    elif cmd == "gapwatch":
        gapwatch(*args)
    elif cmd == "recv":
        recv(*args)
    elif cmd == "send":
        send(*args)
    elif cmd == "report":
        report(args[0], args[1], args[2], [int(x) for x in args[3].split()],
               [int(x) for x in args[4].split()], args[5].split())
    else:
        sys.exit(f"unknown helper command {cmd}")
PY

# --- network: two namespaces joined by a veth pair -------------------------------------------
log "creating namespaces $src_ns ($SRC_IP) and $dst_ns ($DST_IP)"
ip netns del "$src_ns" 2>/dev/null || true
ip netns del "$dst_ns" 2>/dev/null || true
netns_made=1
ip netns add "$src_ns"
ip netns add "$dst_ns"
ip -n "$src_ns" link add "$src_veth" type veth peer name "$dst_veth" netns "$dst_ns"
ip -n "$src_ns" addr add "$SRC_IP/24" dev "$src_veth"
ip -n "$dst_ns" addr add "$DST_IP/24" dev "$dst_veth"
for ns in "$src_ns" "$dst_ns"; do ip -n "$ns" link set lo up; done
ip -n "$src_ns" link set "$src_veth" up
ip -n "$dst_ns" link set "$dst_veth" up
# (The first raw TCP sample below connects with retries for up to 10 s: the link check.)

# --- workload: memwriter + busybox rootfs template -------------------------------------------
memwriter=$work/memwriter
gcc -O2 -Wall -static -o "$memwriter" "$repo/tests/workloads/memwriter.c"
template=$work/template
mkdir -p "$template"/rootfs/{bin,proc,sys,dev,tmp,etc,data}
cp "$busybox" "$template/rootfs/bin/busybox"
for a in $("$busybox" --list); do
    [ "$a" = busybox ] || ln -sf busybox "$template/rootfs/bin/$a"
done
install -m 0755 "$memwriter" "$template/rootfs/bin/memwriter"
if [ "$ROOTFS_MIB" -gt 0 ]; then
    mkdir -p "$template/rootfs/opt/app"
    for i in $(seq $(((ROOTFS_MIB + 7) / 8))); do
        head -c $((8 << 20)) /dev/urandom >"$template/rootfs/opt/app/blob-$i"
    done
fi
(cd "$template" && runc spec)

# --- token and ferry serve ---------------------------------------------------------------------
(umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$token")
chmod 600 "$token"
NO_COLOR=1 nsenter --net="/run/netns/$dst_ns" -- "$ferry" -v serve --listen "$DST_IP:0" --token-file "$token" --bundles "$dst_bundles" \
    --runtime-root "$dst_root" --work-dir "$serve_work" --cgroup-prefix "$CG_PREFIX" \
    --page-server "$PAGE_SERVER" </dev/null >"$work/serve.out" 2>"$work/serve.err" &
serve_pid=$!
addr=""
for _ in $(seq 200); do
    addr=$(awk 'NR == 1 && $1 == "listening" { print $2 }' "$work/serve.out" 2>/dev/null)
    [ -n "$addr" ] && break
    kill -0 "$serve_pid" 2>/dev/null || break
    sleep 0.05
done
[ -n "$addr" ] || die "ferry serve did not print its listening line; stderr: $(cat "$work/serve.err")"
log "ferry serve (pid $serve_pid) listening on $addr"

# --- helpers for one run -----------------------------------------------------------------------
now_ns() { date +%s%N; }
ms_between() { echo $(( ($2 - $1) / 1000000 )); }
lines_in() { [ -f "$1" ] && wc -l <"$1" || echo 0; }

wait_lines() { # file n timeout_s
    local deadline=$(( $(date +%s) + $3 ))
    while [ "$(lines_in "$1")" -lt "$2" ]; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.05
    done
}

# Prints nothing when the memwriter output is healthy (seq 1, 2, 3, … all `ok`), else the
# first problem.
mw_problem() {
    awk 'NF < 3 || $1 != NR || $2 != "ok" { printf "line %d: %s", NR, $0; exit }' "$1"
}

rss_bytes() { # root id
    local pid
    pid=$({ runc --root "$1" state "$2" 2>/dev/null || true; } | awk -F'[:,]' '/"pid"/ { gsub(/ /, "", $2); print $2; exit }')
    awk '/^VmRSS:/ { print $2 * 1024 }' "/proc/$pid/status" 2>/dev/null || echo ""
}

# Start memwriter <mib> <rate> as container <id> on the source and wait for its first two
# check lines (memory filled and verified); sets $data_out and $rss, or $setup_err and fails.
start_workload() {
    local id=$1 mib=$2 rate=$3 bundle=$src_bundles/$1 data=$work/data/$1 p
    setup_err="" rss=""
    mkdir -p "$bundle" "$data"
    cp -a "$template/rootfs" "$bundle/rootfs"
    local copied=$SECONDS
    "$python" "$helper" config "$template/config.json" "$bundle/config.json" "$mib" "$rate" "$data"
    data_out=$data/mem.log
    if ! runc --root "$src_root" run -d --bundle "$bundle" "$id" </dev/null >/dev/null 2>&1; then
        setup_err="runc run failed"
    elif ! wait_lines "$data_out" 2 180; then
        setup_err="memwriter wrote no check lines within 180 s"
    else
        # An image's files are old: let the copy age past the few seconds within which
        # ferry re-reads a just-changed file in the frozen rootfs round (until 2026-11-23
        # only with ROOTFS_MIB; before that, busybox's 2 MiB were hashed again in every
        # freeze, ≈ 10 ms).
        if [ $((SECONDS - copied)) -lt 4 ]; then
            sleep $((4 - (SECONDS - copied)))
        fi
        p=$(mw_problem "$data_out")
        [ -z "$p" ] || setup_err="memwriter not ok before migration: $p"
    fi
    [ -z "$setup_err" ] || return 1
    rss=$(rss_bytes "$src_root" "$id")
}

# After a migration that ended with $1 lines written: the container runs in root $2, writes
# at least 3 more lines, and the whole file is seq 1, 2, 3, … all `ok`. Prints the problem.
verify_continues() {
    local have=$1 root=$2 id=$3 st p
    st=$(state_status "$root" "$id")
    [ "$st" = running ] || { echo "not running on the destination (state: ${st:-absent})"; return 1; }
    wait_lines "$data_out" $((have + 3)) 120 \
        || { echo "memwriter stopped writing after the migration ($(lines_in "$data_out") lines, had $have)"; return 1; }
    p=$(mw_problem "$data_out")
    [ -z "$p" ] || { echo "memwriter output broken: $p"; return 1; }
}

# Watch the memwriter output for the longest pause between lines (see gapwatch).
gap_start() {
    rm -f "$work/gap.stop" "$work/gap.out"
    "$python" "$helper" gapwatch "$data_out" "$work/gap.stop" "$work/gap.out" &
    gap_pid=$!
    bg_pids+=("$gap_pid")
}
gap_stop() { # sets $gap
    touch "$work/gap.stop"
    wait "$gap_pid" 2>/dev/null || true
    gap=$(cat "$work/gap.out" 2>/dev/null || echo -)
}

teardown_run() {
    local id=$1
    stop_in_root "$src_root" "$id"
    stop_in_root "$dst_root" "$id"
    local d
    for d in /sys/fs/cgroup/*/"$CG_PREFIX/$id" /sys/fs/cgroup/*/"$id"; do
        [ -d "$d" ] && rmdir "$d" 2>/dev/null
    done
    safe_rm "$dst_bundles/$id"
    safe_rm "$src_bundles/$id"
    safe_rm "$work/data/$id"
    safe_rm "$work/base/$id"
    # Flush what this run wrote (the baseline's images and copy: 2 GiB at 1 GiB), untimed, so
    # that the next run does not wait for this one's writeback.
    sync
}

record() { # size rate mode rep status down total bytes rss page_bytes page_ms frozen gap note
    local IFS=$'\t'
    echo "$*" >>"$results"
}

run_ferry() { # id mib rate mode rep
    local id=$1 mib=$2 rate=$3 mode=$4 rep=$5 msg rc have
    local out=$work/runs/$id.json err=$LOG_DIR/$id.migrate.stderr
    if ! start_workload "$id" "$mib" "$rate"; then
        record "$mib" "$rate" "$mode" "$rep" FAIL - - - - - - - - "setup: $setup_err"
        return
    fi
    gap_start
    set +e
    in_src timeout 600 "$ferry" ${TRACE:+-vv} migrate "$id" --to "$addr" --token-file "$token" \
        --runtime-root "$src_root" --mode "$mode" --json </dev/null >"$out" 2>"$err"
    rc=$?
    set -e
    have=$(lines_in "$data_out")
    if [ "$rc" -ne 0 ]; then
        gap_stop
        record "$mib" "$rate" "$mode" "$rep" FAIL - - - "$rss" - - - - \
            "ferry migrate exit $rc: $(tr '\n' ' ' <"$err" | cut -c1-400)"
        return
    fi
    local m down total bytes frozen pb pms
    read -r m down total bytes frozen pb pms < <("$python" "$helper" fields "$out")
    [ -n "${TRACE:-}" ] || rm -f "$err"
    if [ "$m" != "$mode" ] && [ "$mode" != auto ]; then
        gap_stop
        record "$mib" "$rate" "$mode" "$rep" FAIL "$down" "$total" "$bytes" "$rss" "$pb" "$pms" "$frozen" - \
            "asked for $mode, ferry used $m"
        return
    fi
    if ! msg=$(verify_continues "$have" "$dst_root" "$id"); then
        gap_stop
        record "$mib" "$rate" "$mode" "$rep" FAIL "$down" "$total" "$bytes" "$rss" "$pb" "$pms" "$frozen" - "$msg"
        return
    fi
    gap_stop
    record "$mib" "$rate" "$mode" "$rep" ok "$down" "$total" "$bytes" "$rss" "$pb" "$pms" "$frozen" "$gap" \
        "frozen ${frozen} ms, page round $((pb / 1048576)) MiB in ${pms} ms"
}

run_baseline() { # id mib rate rep
    local id=$1 mib=$2 rate=$3 rep=$4 msg have
    local b=$work/base/$id
    if ! start_workload "$id" "$mib" "$rate"; then
        record "$mib" "$rate" baseline "$rep" FAIL - - - - - - - - "setup: $setup_err"
        return
    fi
    mkdir -p "$b/img" "$b/ckpt-work" "$b/img-dst" "$b/restore-work"
    # The receiver on the destination listens before the clock starts.
    nsenter --net="/run/netns/$dst_ns" -- "$python" "$helper" recv "$DST_IP" "$b/port" "tar:$b/img-dst" "$b/recv.res" &
    local rpid=$!
    bg_pids+=("$rpid")
    for _ in $(seq 200); do [ -f "$b/port" ] && break; sleep 0.02; done
    local port
    port=$(cat "$b/port")
    local t0 t1 t2 t3 fail=""
    gap_start
    t0=$(now_ns)
    if ! in_src timeout 600 runc --root "$src_root" checkpoint --image-path "$b/img" \
        --work-path "$b/ckpt-work" "$id" </dev/null >"$b/ckpt.out" 2>&1; then
        fail="runc checkpoint failed: $(tail -n 3 "$b/ckpt-work/dump.log" 2>/dev/null | tr '\n' ' ')"
    fi
    t1=$(now_ns)
    if [ -z "$fail" ]; then
        tar c -C "$b/img" . | in_src "$python" "$helper" send "$DST_IP" "$port" || fail="copy: sender failed"
    else
        in_src "$python" "$helper" send "$DST_IP" "$port" </dev/null || true
    fi
    wait "$rpid" || { [ -n "$fail" ] || fail="copy: receiver (tar x) failed"; }
    t2=$(now_ns)
    if [ -z "$fail" ] && ! in_dst timeout 600 runc --root "$dst_root" restore -d --image-path "$b/img-dst" \
        --work-path "$b/restore-work" --bundle "$src_bundles/$id" "$id" </dev/null >/dev/null 2>&1; then
        fail="runc restore failed: $(tail -n 3 "$b/restore-work/restore.log" 2>/dev/null | tr '\n' ' ')"
    fi
    t3=$(now_ns)
    have=$(lines_in "$data_out")
    if [ -n "$fail" ]; then
        gap_stop
        record "$mib" "$rate" baseline "$rep" FAIL - - - "$rss" - - - - "$fail"
        return
    fi
    local wire img_bytes
    read -r wire _ <"$b/recv.res"
    img_bytes=$(du -sb "$b/img" | cut -f1)
    if ! msg=$(verify_continues "$have" "$dst_root" "$id"); then
        gap_stop
        record "$mib" "$rate" baseline "$rep" FAIL "$(ms_between "$t0" "$t3")" "$(ms_between "$t0" "$t3")" \
            "$wire" "$rss" - - - - "$msg"
        return
    fi
    gap_stop
    record "$mib" "$rate" baseline "$rep" ok "$(ms_between "$t0" "$t3")" "$(ms_between "$t0" "$t3")" \
        "$wire" "$rss" - - - "$gap" \
        "checkpoint $(ms_between "$t0" "$t1") / copy $(ms_between "$t1" "$t2") / restore $(ms_between "$t2" "$t3") ms; images $((img_bytes / 1048576)) MiB, tar stream $((wire / 1048576)) MiB"
}

# --- raw TCP throughput between the namespaces ------------------------------------------------
rawfile=$LOG_DIR/raw_tcp.txt
: >"$rawfile"
log "raw TCP throughput: 3 x $RAW_MIB MiB from $SRC_IP to $DST_IP"
for i in 1 2 3; do
    rd=$work/raw$i
    mkdir -p "$rd"
    nsenter --net="/run/netns/$dst_ns" -- "$python" "$helper" recv "$DST_IP" "$rd/port" null "$rd/res" &
    rp=$!
    bg_pids+=("$rp")
    for _ in $(seq 200); do [ -f "$rd/port" ] && break; sleep 0.02; done
    in_src "$python" "$helper" send "$DST_IP" "$(cat "$rd/port")" $((RAW_MIB * 1048576))
    wait "$rp"
    cat "$rd/res" >>"$rawfile"
    rm -rf -- "$rd"
done

# --- the runs ------------------------------------------------------------------------------------
started=$(date +%s)
log "sizes: $SIZES MiB; rates: $RATES MiB/s; modes: $MODES; repeat: $REPEAT"
for mib in $SIZES; do
    for rate in $RATES; do
        for rep in $(seq "$REPEAT"); do
            for mode in $MODES; do
                id=$tag-${mib}m-${rate}r-$mode-$rep
                log "run: $mib MiB, $rate MiB/s, $mode (#$rep)"
                if [ "$mode" = baseline ]; then
                    run_baseline "$id" "$mib" "$rate" "$rep"
                else
                    run_ferry "$id" "$mib" "$rate" "$mode" "$rep"
                fi
                log "  -> $(tail -n 1 "$results" | cut -f5-8,13- | tr '\t' ' ')"
                teardown_run "$id"
            done
        done
    done
done
log "runs took $(( $(date +%s) - started )) s"

echo
echo "ferry $(cd "$repo" && git describe --always --dirty 2>/dev/null || echo '?'), criu $(criu --version | awk '/Version/ { print $2; exit }'), $(runc --version | head -n1), kernel $(uname -r), $(nproc) CPUs; $(date -u '+%F %H:%M UTC')"
echo "SIZES=\"$SIZES\" RATES=\"$RATES\" MODES=\"$MODES\" REPEAT=$REPEAT RAW_MIB=$RAW_MIB ROOTFS_MIB=$ROOTFS_MIB PAGE_SERVER=$PAGE_SERVER"
echo
"$python" "$helper" report "$results" "$rawfile" "$mem_track" "$SIZES" "$RATES" "$MODES"
echo
echo "(results, failure logs and ferry serve's stderr: $LOG_DIR)"
