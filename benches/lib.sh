# Shared by the benchmark scripts (sourced, not run). Needs $BENCH_NAME for messages.
#
# After a failed restore runc can leave bind mounts (e.g. <runc root>/<id>/criu-root) inside
# scratch dirs; `rm -rf` would delete through them into the bundle. These helpers unmount
# first and refuse to remove a tree that still has a mount below it.

# Mount points at or below $1 (from our mount namespace), deepest first.
mounts_below() {
    awk -v d="$1" '{ mp = $5; gsub(/\\040/, " ", mp); if (mp == d || index(mp, d "/") == 1) print mp }' \
        /proc/self/mountinfo | awk '{ print length($0) "\t" $0 }' | sort -rn | cut -f2-
}

unmount_below() {
    local m
    while IFS= read -r m; do
        [ -n "$m" ] && umount -l "$m" 2>/dev/null || true
    done < <(mounts_below "$1")
}

# Remove a scratch dir, never through a mount point.
safe_rm() {
    [ -e "$1" ] || return 0
    unmount_below "$1"
    if [ -n "$(mounts_below "$1")" ]; then
        echo "${BENCH_NAME:-bench}: not removing $1: still mounted below it" >&2
        return 0
    fi
    rm -rf -- "$1"
}
