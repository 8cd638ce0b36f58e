#!/usr/bin/env bash
# Unpacks Debian trixie's containerd (1.7) into /usr/local/lib/ferry/containerd-trixie, beside
# bookworm's 1.6 from apt, so that scripts/test.sh runs the shim's tests on both. The package
# comes through apt (its index signature-checked against Debian's keyring) with a private
# configuration: the machine's own sources, lists and installed packages are not touched, and
# nothing is installed system-wide. Idempotent. Needs root.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

log() { printf 'containerd-trixie: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

dest=/usr/local/lib/ferry/containerd-trixie
want="1.7."
have() { "$dest/usr/bin/containerd" --version 2>/dev/null | awk '{print $3}'; }
if [ -x "$dest/usr/bin/containerd" ] && [ -x "$dest/usr/bin/ctr" ] && [[ "$(have)" == "$want"* ]]; then
    log "containerd $(have) already in $dest"
    exit 0
fi

uri=$(bash "$here/debian-archive-uri.sh") || die "no Debian archive URI to derive trixie's from"
work=/var/lib/ferry/apt-trixie
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/parts"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
{
    echo "Types: deb"
    echo "URIs: $uri"
    echo "Suites: trixie"
    echo "Components: main"
    [ -f "$keyring" ] && echo "Signed-By: $keyring"
} > "$work/trixie.sources"
apt_opts=(
    -o "Dir::Etc::SourceList=$work/trixie.sources"
    -o "Dir::Etc::SourceParts=$work/parts"
    -o "Dir::State::Lists=$work/lists"
    -o "Dir::Cache=$work/cache"
    -o "APT::Sandbox::User=root"
)
apt-get "${apt_opts[@]}" update -qq || die "apt-get update of trixie's index failed"
rm -f "$work"/containerd_*.deb
(cd "$work" && apt-get "${apt_opts[@]}" download -qq containerd) || die "cannot download trixie's containerd"
deb=$(ls "$work"/containerd_*.deb)
rm -rf "$dest.tmp"
mkdir -p "$(dirname "$dest")"
dpkg-deb -x "$deb" "$dest.tmp"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
[[ "$(have)" == "$want"* ]] || die "$deb unpacked, but its containerd says version '$(have)', not $want*"
log "containerd $(have) in $dest (from $(basename "$deb"))"
