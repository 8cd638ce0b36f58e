#!/usr/bin/env bash
# The test command: sets the host up (scripts/setup.sh), then runs the whole suite on real
# CRIU and runc. Unit tests need no root; integration tests do, and fail (never skip) when
# CI is set and a prerequisite is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
criu --version | head -n1; runc --version | head -n1; cargo --version
cargo test --release -- --test-threads=1
# The containerd shim again, on Debian trixie's containerd 1.7 (scripts/containerd-trixie.sh).
echo "test.sh: the containerd suite again, on containerd 1.7" >&2
FERRY_TEST_CONTAINERD_DIR=/usr/local/lib/ferry/containerd-trixie/usr/bin \
    FERRY_TEST_CONTAINERD_VERSION=1.7. \
    cargo test --release --test containerd -- --test-threads=1
