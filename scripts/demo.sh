#!/usr/bin/env bash
# The demo: installs what is missing, builds, starts dmcached on a private socket and
# shows what the daemon reports. Everything it starts is stopped when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
build=${BUILD_DIR:-build}
[ -f "$build/build.ninja" ] || meson setup "$build" >/dev/null
ninja -C "$build" >/dev/null

work=$(mktemp -d /tmp/dmcache-demo.XXXXXX)
daemon_pid=
cleanup() {
	[ -n "$daemon_pid" ] && kill -TERM "$daemon_pid" 2>/dev/null && wait "$daemon_pid" || true
	rm -rf "$work"
}
trap cleanup EXIT

export DMCACHE_SOCKET=$work/run/dmcached.sock
mkdir -m 0700 "$work/run"

echo "== starting dmcached (socket $DMCACHE_SOCKET, cache $work/cache)"
"$build/daemon/dmcached" --cache-dir "$work/cache" 2>"$work/dmcached.log" &
daemon_pid=$!
for _ in $(seq 100); do
	"$build/client/dmcache" ping >/dev/null 2>&1 && break
	kill -0 "$daemon_pid" 2>/dev/null || { cat "$work/dmcached.log"; exit 1; }
	sleep 0.1
done

echo "== dmcache status"
"$build/client/dmcache" status
echo
echo "== dmcache status --json"
"$build/client/dmcache" status --json
echo
echo "== stopping dmcached"
kill -TERM "$daemon_pid"
wait "$daemon_pid"
daemon_pid=
cat "$work/dmcached.log"
