#!/usr/bin/env bash
# Installs what ferry needs on a Debian (bookworm) host: runc, containerd (the shim's tests
# start their own instances; nothing is enabled; trixie's containerd 1.7 is unpacked aside
# for a second run of those tests), iptables/nftables, busybox-static
# (demo and test containers), iproute2, openssl (TLS test certificates), a C toolchain, and
# the pinned CRIU built from source.
# Idempotent. Needs root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf 'setup: %s\n' "$*" >&2; }
[ "$(id -u)" -eq 0 ] || { log "error: must run as root"; exit 1; }

export DEBIAN_FRONTEND=noninteractive
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"

log "installing system packages"
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    runc containerd iptables nftables busybox-static iproute2 openssl build-essential pkg-config ca-certificates >/dev/null

log "installing the pinned CRIU"
bash vendor/criu/install.sh

log "unpacking Debian trixie's containerd 1.7 (the shim's tests run on 1.6 and 1.7)"
bash scripts/containerd-trixie.sh

# CRIU's lazy page server (post-copy) sizes its pipes to ~3.3 MiB; without CAP_SYS_RESOURCE
# (dropped in some sandboxes) that needs a larger fs.pipe-max-size.
if [ "$(cat /proc/sys/fs/pipe-max-size)" -lt 4194304 ]; then
    echo 4194304 > /proc/sys/fs/pipe-max-size || log "warning: cannot raise fs.pipe-max-size (post-copy may fail)"
fi

if [ -f "$HOME/.cargo/env" ]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null || { log "error: no Rust toolchain (cargo) on this machine; install rustup's stable toolchain"; exit 1; }
log "ready: $(criu --version | head -n1), $(runc --version | head -n1), $(cargo --version)"
