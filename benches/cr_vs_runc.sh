#!/usr/bin/env bash
# Wall-clock of one checkpoint + restore cycle with ferry vs with runc (which drives the
# criu CLI), on the same busybox counter container.
#
#   sudo benches/cr_vs_runc.sh [RUNS]      (RUNS defaults to 5)
#
# Each run starts a fresh counter container, then does one ferry cycle
# (`ferry checkpoint` + `ferry restore`) and one runc cycle (`runc checkpoint
# --image-path` + `runc restore -d`) on that same container, alternating which tool goes
# first. Prints per-run times, the medians and the ratio ferry/runc. Needs root, runc,
# criu and busybox-static. Cleans up after itself (containers, mounts, scratch dirs).
set -euo pipefail

runs=${1:-5}
if ! [[ $runs =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [RUNS]   (RUNS: positive integer, default 5)" >&2
    exit 2
fi

die() { echo "cr_vs_runc: error: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "must run as root"
export PATH="/usr/local/sbin:$PATH:/usr/sbin:/sbin"
for p in runc criu cargo; do
    command -v "$p" >/dev/null || die "$p not found"
done
busybox=""
for b in /bin/busybox /usr/bin/busybox; do
    [ -x "$b" ] && { busybox=$b; break; }
done
[ -n "$busybox" ] || die "busybox not found (apt-get install busybox-static)"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
echo "building ferry (release)..." >&2
(cd "$repo" && cargo build --release --quiet --bin ferry)
ferry=$repo/target/release/ferry
[ -x "$ferry" ] || die "no $ferry after build"

id=ferry-bench-$$
state_base=/run/ferry-bench-$$
rroot=$state_base/runc
work=$(mktemp -d /var/tmp/ferry-bench.XXXXXX)
bundle=$work/bundle
mkdir -p "$rroot"

runc_() { runc --root "$rroot" "$@"; }

BENCH_NAME=cr_vs_runc
# shellcheck source=benches/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

stop_container() {
    if runc_ state "$id" >/dev/null 2>&1; then
        runc_ kill "$id" KILL >/dev/null 2>&1 || true
        for _ in $(seq 50); do
            [ "$(runc_ state "$id" 2>/dev/null | awk -F'"' '/"status"/ { print $4 }')" = running ] || break
            sleep 0.1
        done
        # A criu-root left mounted by a failed restore would make `delete -f` remove the
        # bundle's rootfs through it: detach it first.
        unmount_below "$rroot/$id/criu-root"
        runc_ delete -f "$id" >/dev/null 2>&1 || true
    fi
    unmount_below "$rroot/$id/criu-root"
}

cleanup() {
    stop_container
    safe_rm "$state_base"
    safe_rm "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- bundle: static busybox rootfs running a counter --------------------------------------
mkdir -p "$bundle"/rootfs/{bin,proc,sys,dev,tmp,etc}
cp "$busybox" "$bundle/rootfs/bin/busybox"
for a in $("$busybox" --list); do
    [ "$a" = busybox ] || ln -sf busybox "$bundle/rootfs/bin/$a"
done
(cd "$bundle" && runc spec)
sed -i \
    -e 's/"terminal": true/"terminal": false/' \
    -e 's/"readonly": true/"readonly": false/' \
    -e 's|^\([[:space:]]*\)"sh"$|\1"sh", "-c", "i=0; while true; do i=$((i+1)); echo $i; sleep 0.05; done"|' \
    "$bundle/config.json"
grep -q '"terminal": false' "$bundle/config.json" && grep -q 'while true' "$bundle/config.json" \
    || die "could not adapt runc spec's config.json"

now_ns() { date +%s%N; }
ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", (b - a) / 1e6 }'; }

assert_running() {
    [ "$(runc_ state "$id" 2>/dev/null | awk -F'"' '/"status"/ { print $4 }')" = running ] \
        || die "$1: container $id is not running afterwards"
}

# Container stdio is /dev/null: both tools can dump and reopen it (runc cannot dump a
# host regular file outside the container's mounts).
start_container() {
    runc_ run -d --bundle "$bundle" "$id" </dev/null >/dev/null 2>&1 || die "runc run failed"
    sleep 0.5
    assert_running "runc run"
}

ferry_cycle() { # $1: images dir; prints "checkpoint_ms restore_ms"
    local t0 t1 t2
    t0=$(now_ns)
    "$ferry" checkpoint "$id" --images "$1" --runtime-root "$rroot" >/dev/null \
        || die "ferry checkpoint failed"
    t1=$(now_ns)
    "$ferry" restore "$id" --images "$1" --runtime-root "$rroot" </dev/null >/dev/null \
        || die "ferry restore failed"
    t2=$(now_ns)
    assert_running "ferry restore"
    echo "$(ms "$t0" "$t1") $(ms "$t1" "$t2")"
}

runc_cycle() { # $1: images dir
    local t0 t1 t2
    t0=$(now_ns)
    runc_ checkpoint --image-path "$1" "$id" >/dev/null || die "runc checkpoint failed"
    t1=$(now_ns)
    runc_ restore -d --image-path "$1" --bundle "$bundle" "$id" </dev/null >/dev/null 2>&1 \
        || die "runc restore failed (see $1/restore.log)"
    t2=$(now_ns)
    assert_running "runc restore"
    echo "$(ms "$t0" "$t1") $(ms "$t1" "$t2")"
}

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

printf '%-4s %-6s %12s %12s %10s   %12s %12s %10s\n' run first \
    ferry_ckpt ferry_rest ferry_tot runc_ckpt runc_rest runc_tot
ferry_tots=() runc_tots=() ferry_cks=() runc_cks=() ferry_rss=() runc_rss=()
for i in $(seq "$runs"); do
    start_container
    fdir=$work/run$i-ferry rdir=$work/run$i-runc
    mkdir -p "$fdir" "$rdir"
    # Command substitutions (not `< <(...)`) so that a failing cycle stops the script.
    if (( i % 2 )); then
        first=ferry
        fres=$(ferry_cycle "$fdir")
        rres=$(runc_cycle "$rdir")
    else
        first=runc
        rres=$(runc_cycle "$rdir")
        fres=$(ferry_cycle "$fdir")
    fi
    read -r fc fr <<<"$fres"
    read -r rc rr <<<"$rres"
    ft=$(awk -v a="$fc" -v b="$fr" 'BEGIN { printf "%.1f", a + b }')
    rt=$(awk -v a="$rc" -v b="$rr" 'BEGIN { printf "%.1f", a + b }')
    printf '%-4s %-6s %10s ms %10s ms %7s ms   %10s ms %10s ms %7s ms\n' \
        "$i" "$first" "$fc" "$fr" "$ft" "$rc" "$rr" "$rt"
    ferry_tots+=("$ft") runc_tots+=("$rt") ferry_cks+=("$fc") runc_cks+=("$rc")
    ferry_rss+=("$fr") runc_rss+=("$rr")
    stop_container
    safe_rm "$fdir"
    safe_rm "$rdir"
done

med() { printf '%s\n' "$@" | median; }
mf=$(med "${ferry_tots[@]}") mr=$(med "${runc_tots[@]}")
echo
printf 'median checkpoint: ferry %s ms, runc %s ms\n' "$(med "${ferry_cks[@]}")" "$(med "${runc_cks[@]}")"
printf 'median restore:    ferry %s ms, runc %s ms\n' "$(med "${ferry_rss[@]}")" "$(med "${runc_rss[@]}")"
printf 'median total:      ferry %s ms, runc %s ms\n' "$mf" "$mr"
awk -v f="$mf" -v r="$mr" 'BEGIN { if (r > 0) printf "ratio ferry/runc (median totals): %.2f\n", f / r }'
