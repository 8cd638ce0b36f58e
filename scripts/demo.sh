#!/usr/bin/env bash
# The main job on one machine: set up, build ferry, start a busybox counter container under
# runc, checkpoint and restore it locally, then live-migrate it between two emulated hosts
# (two network namespaces joined by a veth pair, each with its own runc root, bundles dir and
# ferry instance), printing the counter and ferry's reports along the way.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo build --release --quiet
ferry=$PWD/target/release/ferry

run=/run/ferry-demo            # runc roots, images, token (state)
lib=/var/lib/ferry-demo        # bundles and the counter file (executable filesystem)
src_root=$run/src-runc
dst_root=$run/dst-runc
bundle=$lib/bundle
id=ferry-demo
ns_src=fdemo-src
ns_dst=fdemo-dst
serve_pid=""

cleanup() {
    [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null || true
    for r in "$src_root" "$dst_root"; do
        runc --root "$r" kill "$id" KILL >/dev/null 2>&1 || true
    done
    sleep 0.3
    for r in "$src_root" "$dst_root"; do
        runc --root "$r" delete -f "$id" >/dev/null 2>&1 || true
    done
    ip netns del "$ns_src" 2>/dev/null || true
    ip netns del "$ns_dst" 2>/dev/null || true
    # the (empty) parent cgroups of --cgroup-prefix
    for d in /sys/fs/cgroup/*/ferry-demo-dst /sys/fs/cgroup/memory/*/*/ferry-demo-dst; do
        [ -d "$d" ] && rmdir "$d" 2>/dev/null || true
    done
}
trap cleanup EXIT
cleanup
for d in "$run" "$lib"; do
    # Demo directories only; nothing is ever mounted below them.
    if grep -q " $d[/ ]" /proc/self/mountinfo; then echo "demo: $d has mounts below it; refusing to reset it" >&2; exit 1; fi
    rm -rf "$d"
done
mkdir -p "$src_root" "$dst_root" "$bundle/rootfs/bin" "$bundle/rootfs"/{proc,sys,dev,tmp,data} "$lib/data"
cp /bin/busybox "$bundle/rootfs/bin/busybox"
for t in sh sleep echo cat; do ln -s busybox "$bundle/rootfs/bin/$t"; done
(cd "$bundle" && runc spec)
python3 - "$bundle/config.json" "$lib/data" <<'PY'
import json, sys
p, data = sys.argv[1], sys.argv[2]
c = json.load(open(p))
c["process"]["terminal"] = False
c["process"]["args"] = ["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i >> /data/counter; sleep 0.1; done"]
c["root"]["readonly"] = False
c["mounts"].append({"destination": "/data", "type": "bind", "source": data, "options": ["rbind", "rw"]})
json.dump(c, open(p, "w"), indent=2)
PY
counter() { tail -n1 "$lib/data/counter"; }
continues() { # the counter file is one unbroken sequence 1, 2, 3, ...
    python3 -c "
import sys
v = [int(x) for x in open('$lib/data/counter').read().split()]
bad = [(a, b) for a, b in zip(v, v[1:]) if b != a + 1]
print('counter %d..%d, %d values, %s' % (v[0], v[-1], len(v), 'unbroken' if not bad and v[0] == 1 else 'BROKEN at %s' % bad[:3]))
sys.exit(1 if bad or v[0] != 1 else 0)"
}

echo "== 1. a counter container under runc (root $src_root)"
runc --root "$src_root" run -d --bundle "$bundle" "$id" </dev/null >/dev/null 2>&1
sleep 2
echo "counter: $(counter)"

echo "== 2. ferry checkpoint + ferry restore on this host"
"$ferry" checkpoint "$id" --images "$run/images" --runtime-root "$src_root" --json
echo "counter while checkpointed: $(counter)"
sleep 1
echo "counter one second later:   $(counter)   (frozen: no new values)"
"$ferry" restore "$id" --images "$run/images" --runtime-root "$src_root" --json </dev/null
sleep 1
echo "counter after restore: $(counter)"
runc --root "$src_root" list
continues

echo "== 3. live migration between two emulated hosts"
ip netns add "$ns_src"; ip netns add "$ns_dst"
ip -n "$ns_src" link add fdemo-s type veth peer name fdemo-d netns "$ns_dst"
ip -n "$ns_src" addr add 192.0.2.1/24 dev fdemo-s; ip -n "$ns_dst" addr add 192.0.2.2/24 dev fdemo-d
for n in "$ns_src" "$ns_dst"; do ip -n "$n" link set lo up; done
ip -n "$ns_src" link set fdemo-s up; ip -n "$ns_dst" link set fdemo-d up
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$run/token"; chmod 600 "$run/token"
coproc SERVE { exec nsenter --net="/run/netns/$ns_dst" -- "$ferry" serve --listen 192.0.2.2:0 \
    --token-file "$run/token" --bundles "$lib/dst-bundles" --runtime-root "$dst_root" \
    --work-dir "$run/dst-work" --cgroup-prefix ferry-demo-dst 2>"$run/serve.log"; }
serve_pid=$SERVE_PID
read -r _ addr <&"${SERVE[0]}"
echo "destination: ferry serve listening on $addr (netns $ns_dst)"
echo "counter before migration: $(counter)"
nsenter --net="/run/netns/$ns_src" -- "$ferry" migrate "$id" --to "$addr" --token-file "$run/token" \
    --runtime-root "$src_root" --mode auto
sleep 1
echo "counter after migration: $(counter)"
echo "source host's runc:"; runc --root "$src_root" list
echo "destination host's runc:"; runc --root "$dst_root" list
continues
echo "OK: checkpoint/restore and live migration kept the counter going (no reset, no repeat)"
