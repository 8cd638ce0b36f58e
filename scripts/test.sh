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
