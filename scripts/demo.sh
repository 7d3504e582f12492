#!/usr/bin/env bash
# The demo: installs what is missing, builds, then runs the main job on the bundled sample
# data: a Datamint server (the emulator, on loopback, serving the sample project), dmcached,
# a prefetch with its progress, the cache listing, and decoded items read back through
# shared memory. Everything it starts is stopped when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
build=${BUILD_DIR:-build}
[ -f "$build/build.ninja" ] || meson setup "$build" >/dev/null
ninja -C "$build" >/dev/null # the daemon, the CLI and the sample corpus

work=$(mktemp -d /tmp/dmcache-demo.XXXXXX)
daemon_pid=
emulator_pid=
cleanup() {
	[ -n "$daemon_pid" ] && kill -TERM "$daemon_pid" 2>/dev/null && wait "$daemon_pid" || true
	[ -n "$emulator_pid" ] && kill -TERM "$emulator_pid" 2>/dev/null && wait "$emulator_pid" || true
	rm -rf "$work"
}
trap cleanup EXIT
dmcache="$build/client/dmcache"
python=/usr/bin/python3

echo "== a Datamint server on loopback (tests/emulator), with the sample project"
mkfifo "$work/emu.out"
$python tests/emulator/emulator.py --corpus "$build/tests/data/corpus" --port 0 \
	>"$work/emu.out" 2>"$work/emulator.log" &
emulator_pid=$!
read -r info <"$work/emu.out"
url=$($python -c 'import json, sys; print(json.loads(sys.argv[1])["url"])' "$info")
echo "   $url"

export DMCACHE_SOCKET=$work/run/dmcached.sock
export DATAMINT_API_URL=$url
export DATAMINT_API_KEY=dmc-key-all # the emulator's demo key
mkdir -m 0700 "$work/run"

echo "== dmcached (socket $DMCACHE_SOCKET, cache $work/cache)"
"$build/daemon/dmcached" --cache-dir "$work/cache" 2>"$work/dmcached.log" &
daemon_pid=$!
for _ in $(seq 100); do
	"$dmcache" ping >/dev/null 2>&1 && break
	kill -0 "$daemon_pid" 2>/dev/null || { cat "$work/dmcached.log"; exit 1; }
	sleep 0.1
done

echo
echo "== dmcache prefetch sample"
"$dmcache" prefetch sample
echo
echo "== dmcache prefetch sample (again: everything comes from the cache)"
"$dmcache" prefetch sample
echo
echo "== dmcache ls"
"$dmcache" ls
echo
echo "== dmcache get: decoded items, written as .npy"
for i in 0 10 15; do
	"$dmcache" get sample "$i" -o "$work/item$i.npy"
done
$python - "$work" <<'PY'
import json, sys
import numpy as np
for i in (0, 10, 15):
    a = np.load('%s/item%d.npy' % (sys.argv[1], i))
    meta = json.load(open('%s/item%d.json' % (sys.argv[1], i)))
    print('   item %2d  %-22s %-8s %-18s min %6d max %6d' % (
        i, meta['resource']['filename'], a.dtype, a.shape, a.min(), a.max()))
PY
echo
echo "== dmcache verify"
"$dmcache" verify
echo
echo "== dmcache status"
"$dmcache" status
echo
echo "== stopping dmcached"
kill -TERM "$daemon_pid"
wait "$daemon_pid"
daemon_pid=
echo "   exit status 0; its log:"
sed 's/^/   /' "$work/dmcached.log"
