#!/usr/bin/env bash
# The main job on one machine: set up, build ferry, start a busybox counter container under
# runc, checkpoint it with ferry, restore it, and show that the counter continues.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo build --release --quiet
ferry=$PWD/target/release/ferry

base=/run/ferry-demo
root=$base/runc
bundle=$base/bundle
images=$base/images
id=ferry-demo
cleanup() {
    runc --root "$root" kill "$id" KILL >/dev/null 2>&1 || true
    sleep 0.2
    runc --root "$root" delete -f "$id" >/dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup
# The demo's own directory; nothing is ever mounted below it.
if grep -q " $base" /proc/self/mountinfo; then echo "demo: $base has mounts below it; refusing to reset it" >&2; exit 1; fi
rm -rf "$base"
mkdir -p "$root" "$bundle/rootfs/bin" "$bundle/rootfs"/{proc,sys,dev,tmp}
cp /bin/busybox "$bundle/rootfs/bin/busybox"
for t in sh sleep echo cat; do ln -s busybox "$bundle/rootfs/bin/$t"; done
(cd "$bundle" && runc spec)
python3 - "$bundle/config.json" <<'PY'
import json, sys
p = sys.argv[1]
c = json.load(open(p))
c["process"]["terminal"] = False
c["process"]["args"] = ["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done"]
c["root"]["readonly"] = False
json.dump(c, open(p, "w"), indent=2)
PY

echo "== starting counter container '$id'"
runc --root "$root" run -d --bundle "$bundle" "$id" </dev/null 2>&1 | cat >"$base/before.log" &
sleep 2
echo "counter before checkpoint: $(tail -n1 "$base/before.log")"

echo "== ferry checkpoint"
"$ferry" checkpoint "$id" --images "$images" --runtime-root "$root" --json
wait || true
last=$(tail -n1 "$base/before.log")
echo "counter when frozen: $last   (container gone from runc: $(runc --root "$root" list -q | grep -c "^$id$" || true))"

echo "== ferry restore"
"$ferry" restore "$id" --images "$images" --runtime-root "$root" </dev/null 2>&1 | cat >"$base/after.log" &
sleep 2
first=$(grep -m1 -x '[0-9][0-9]*' "$base/after.log" || true)
echo "counter after restore: $first ... $(tail -n1 "$base/after.log")"
runc --root "$root" list
if [ "$first" = "$((last + 1))" ]; then
    echo "OK: the counter continued from $last to $first (no reset, no repeat)"
else
    echo "FAILED: counter was $last before, $first after" >&2
    exit 1
fi
