#!/usr/bin/env bash
# Prints the Debian archive URI this machine's own apt sources use (the first one that is not
# the security archive), so that entries for other suites can be derived from it: no mirror
# host is written in this repository. Fails when there is none.
set -euo pipefail
uri=""
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    uri=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' \
        /etc/apt/sources.list.d/debian.sources)
fi
if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' \
        /etc/apt/sources.list)
fi
[ -n "$uri" ] || { echo "cannot find a Debian archive URI in this machine's apt sources" >&2; exit 1; }
echo "$uri"
