#!/usr/bin/env bash
# Build and install the pinned CRIU (the `criu` binary only) into /usr/local/sbin.
#
# Debian bookworm's criu 3.17 fails on newer kernels (vDSO error), so we build the
# version pinned in vendor/criu/VERSION from Debian's source package of a newer suite.
# The deb-src entry is derived from this machine's own apt sources (no mirror host is
# written in the repository). Idempotent: does nothing when criu >= the pinned major.minor
# is already on PATH. Needs root.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=vendor/criu/VERSION
. "$here/VERSION"   # CRIU_VERSION, CRIU_DEB_VERSION, CRIU_ORIG_SHA256, CRIU_SUITES

log() { printf 'vendor/criu: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (installs packages and /usr/local/sbin/criu)"

# CRIU probes the kernel at the start of every run (≈ 40–80 ms here) unless it finds the
# facts it cached in RUNDIR/criu.kdat; it keeps that cache only on a tmpfs (so that a reboot
# drops it). Debian mounts /run as a tmpfs; where /run is not one (some VMs), CRIU is built
# with RUNDIR=/run/criu and a small tmpfs is mounted there, here, on every setup.
if [ "$(stat -f -c %T /run 2>/dev/null)" = tmpfs ]; then
    rundir=/run
else
    rundir=/run/criu
    mkdir -p -m 0700 "$rundir"
    if ! mountpoint -q "$rundir"; then
        mount -t tmpfs -o size=1m,mode=0700,nosuid,nodev,noexec ferry-criu-cache "$rundir" \
            || die "cannot mount a tmpfs on $rundir for CRIU's kernel-facts cache"
    fi
fi

want_mm=${CRIU_VERSION%.*}
have=$( (command -v criu >/dev/null && criu --version 2>/dev/null | awk '/^Version:/{print $2}') || true)
if [ -n "$have" ] && [ "$(printf '%s\n%s\n' "$want_mm" "$have" | sort -V | head -n1)" = "$want_mm" ]; then
    # The cache file's path is compiled in: rebuild a criu that looks for it elsewhere.
    if grep -qaF "$rundir/criu.kdat" "$(command -v criu)"; then
        log "criu $have already installed ($(command -v criu)); nothing to do"
        exit 0
    fi
    log "criu $have ($(command -v criu)) keeps its kernel-facts cache outside $rundir; rebuilding"
fi

export DEBIAN_FRONTEND=noninteractive

# 1. A deb-src entry for the newer suites, derived from the machine's own Debian source.
src_file=/etc/apt/sources.list.d/ferry-criu-src.sources
if [ ! -f "$src_file" ]; then
    uri=$(bash "$here/../../scripts/debian-archive-uri.sh") \
        || die "cannot find a Debian archive URI in this machine's apt sources"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    {
        echo "Types: deb-src"
        echo "URIs: $uri"
        echo "Suites: $CRIU_SUITES"
        echo "Components: main"
        [ -f "$keyring" ] && echo "Signed-By: $keyring"
    } > "$src_file"
    log "added deb-src entry for $CRIU_SUITES from $uri"
fi

# 2. Build dependencies from bookworm (binary packages stay on the machine's own suite).
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    build-essential pkg-config dpkg-dev xz-utils \
    libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler python3-protobuf \
    libnl-3-dev libnet1-dev libcap-dev libaio-dev libbsd-dev libgnutls28-dev uuid-dev \
    libnftables-dev iptables >/dev/null

# 3. The pinned source package, verified against the pinned sha256 of the orig tarball.
work=$(mktemp -d /tmp/ferry-criu-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get source --download-only --tar-only -qq "criu=$CRIU_DEB_VERSION" >/dev/null \
    || die "apt could not fetch source criu=$CRIU_DEB_VERSION from suites $CRIU_SUITES"
orig="criu_${CRIU_VERSION}.orig.tar.xz"
[ -f "$orig" ] || die "source download did not produce $orig"
echo "$CRIU_ORIG_SHA256  $orig" | sha256sum -c --quiet - || die "sha256 mismatch for $orig"
tar -xf "$orig"
cd "criu-${CRIU_VERSION}"

# 4. Build only the criu binary and install it.
make -j"$(nproc)" criu RUNDIR="$rundir" >build.log 2>&1 || { tail -n 40 build.log >&2; die "make criu failed"; }
install -D -m 0755 criu/criu /usr/local/sbin/criu
hash -r
log "installed $(/usr/local/sbin/criu --version | awk '/^Version:/{print $2}') to /usr/local/sbin/criu (kernel-facts cache in $rundir)"
