#!/usr/bin/env bash
# A throwaway single-host Ceph cluster on loopback for the tier tests: one monitor, one OSD
# on memstore (its objects in memory, bounded), one RADOS Gateway (beast frontend), an S3
# user and a bucket. Nothing outside DIR is written; nothing listens beyond 127.0.0.1.
#
#   tests/tier/ceph.sh start DIR [BUCKET]   brings it up, waits until the gateway answers a
#                                           signed request, and writes DIR/env:
#                                             TIER_ENDPOINT=http://127.0.0.1:PORT
#                                             TIER_BUCKET=...  TIER_REGION=default
#                                             TIER_ACCESS_KEY=... TIER_SECRET_KEY=...
#                                             TIER_RGW_PID=... (and the other daemons' pids)
#                                           then prints that file
#   tests/tier/ceph.sh stop DIR             stops every daemon it started (by pid) and
#                                           removes DIR
#   tests/tier/ceph.sh rgw-stop DIR         stops the gateway only (the "tier down" fault)
#   tests/tier/ceph.sh rgw-start DIR        starts it again on the same port
#
# Needs the Debian packages ceph-mon, ceph-osd, radosgw, ceph-common (scripts/install-deps.sh
# installs them) and curl; runs as root or any user. Memory: memstore is capped at
# CEPH_MEMSTORE_MB (default 768) and the daemons' caches are kept small; the whole cluster
# stays under about 1.5 GiB. Authentication inside the cluster is off (cephx none): the
# cluster lives only as long as the test run, on loopback; the S3 side is authenticated
# (SigV4 with the user's keys) as on a real gateway. Signing with curl 7.88's AWS SigV4
# (--aws-sigv4, CURLOPT_AWS_SIGV4): the gateway refuses a request without an
# x-amz-content-sha256 header (SignatureDoesNotMatch), which this curl does not add by
# itself; given (the body's SHA-256 in hex, or UNSIGNED-PAYLOAD), it is signed. Start: ~16 s,
# ~110 MiB of RSS for the three daemons.
set -euo pipefail

cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { sed -n '2,22p' "$0" >&2; exit 2; }

free_port() {
	/usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() { # seconds (wall clock), what, command...
	local limit=$1 what=$2 end=$((SECONDS + $1))
	shift 2
	until "$@" >/dev/null 2>>"$dir/log/wait.log"; do
		if [ "$SECONDS" -ge "$end" ]; then
			echo "ceph.sh: $what not ready after ${limit}s; last lines of the logs:" >&2
			tail -n 20 "$dir"/log/*.log >&2 || true
			return 1
		fi
		sleep 0.25
	done
}

# A signed request without a body. curl 7.88 signs x-amz-content-sha256 when it is given
# but does not add it, and the gateway wants it: the SHA-256 of the empty body.
EMPTY_SHA256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
s3() { # method, path, extra curl args... (signed with the user's keys)
	local m=$1 p=$2
	shift 2
	curl -sS -f -X "$m" --aws-sigv4 "aws:amz:$TIER_REGION:s3" \
		--user "$TIER_ACCESS_KEY:$TIER_SECRET_KEY" -H "x-amz-content-sha256: $EMPTY_SHA256" \
		"$@" "$TIER_ENDPOINT$p"
}

start_rgw() {
	# shellcheck disable=SC1091
	. "$dir/env"
	radosgw -c "$dir/ceph.conf" -n client.rgw.a --rgw-frontends \
		"beast endpoint=127.0.0.1:$TIER_PORT" --pid-file "$dir/run/rgw.pid" \
		--log-file "$dir/log/rgw.log" </dev/null
	wait_for 120 "the RADOS Gateway" curl -sf "http://127.0.0.1:$TIER_PORT/"
	sed -i '/^TIER_RGW_PID=/d' "$dir/env"
	echo "TIER_RGW_PID=$(cat "$dir/run/rgw.pid")" >>"$dir/env"
}

stop_pidfile() {
	local f=$1 pid
	[ -f "$f" ] || return 0
	pid=$(cat "$f")
	kill "$pid" 2>/dev/null || true
	for _ in $(seq 1 40); do
		kill -0 "$pid" 2>/dev/null || { rm -f "$f"; return 0; }
		sleep 0.25
	done
	kill -9 "$pid" 2>/dev/null || true
	rm -f "$f"
}

case $cmd in
start)
	bucket=${3:-dmcache-tier}
	start=$(date +%s)
	rm -rf "$dir"
	mkdir -p "$dir"/{mon,osd,run,log,rgw}
	dir=$(cd "$dir" && pwd)
	fsid=$(cat /proc/sys/kernel/random/uuid)
	mon_port=$(free_port)
	rgw_port=$(free_port)
	cat >"$dir/ceph.conf" <<CONF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$mon_port
public network = 127.0.0.0/8
auth cluster required = none
auth service required = none
auth client required = none
run dir = $dir/run
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
pid file = $dir/run/\$name.pid
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
osd crush chooseleaf type = 0
ms bind ipv4 = true
ms bind ipv6 = false
# auth none still negotiates a connection mode: crc (no encryption on loopback)
ms mon client mode = crc
ms client mode = crc
client mount timeout = 30
rados mon op timeout = 30
rados osd op timeout = 30
[mon]
mon data = $dir/mon/\$name
mon allow pool delete = true
[osd]
osd data = $dir/osd/\$name
osd objectstore = memstore
memstore device bytes = $(( ${CEPH_MEMSTORE_MB:-768} << 20 ))
osd memory target = 268435456
osd max object size = 134217728
[client.rgw.a]
rgw data = $dir/rgw
rgw dns name = localhost
rgw enable usage log = false
rgw cache enabled = true
rgw thread pool size = 32
rgw max chunk size = 4194304
CONF
	cat >"$dir/env" <<ENV
TIER_DIR=$dir
TIER_PORT=$rgw_port
TIER_ENDPOINT=http://127.0.0.1:$rgw_port
TIER_BUCKET=$bucket
TIER_REGION=default
ENV
	conf=(-c "$dir/ceph.conf")
	ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
	monmaptool --create --addv a "[v2:127.0.0.1:$mon_port]" --fsid "$fsid" "$dir/monmap" >/dev/null
	ceph-mon "${conf[@]}" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.keyring" 2>>"$dir/log/setup.log"
	ceph-mon "${conf[@]}" -i a </dev/null 2>>"$dir/log/setup.log"
	wait_for 90 "the monitor" timeout 5 ceph "${conf[@]}" mon stat
	echo "TIER_MON_PID=$(cat "$dir/run/mon.a.pid")" >>"$dir/env"

	id=$(ceph "${conf[@]}" osd create)
	mkdir -p "$dir/osd/osd.$id"
	ceph-osd "${conf[@]}" -i "$id" --mkfs 2>>"$dir/log/setup.log"
	ceph-osd "${conf[@]}" -i "$id" </dev/null 2>>"$dir/log/setup.log"
	wait_for 120 "the OSD" sh -c "ceph ${conf[*]} osd stat -f json | grep -q '\"num_up_osds\":1'"
	echo "TIER_OSD_PID=$(cat "$dir/run/osd.$id.pid")" >>"$dir/env"

	start_rgw
	. "$dir/env"
	access=$(head -c 15 /dev/urandom | base32 | tr -d '=' | head -c 20)
	secret=$(head -c 30 /dev/urandom | base64 | tr -d '/+=' | head -c 40)
	radosgw-admin "${conf[@]}" user create --uid tier --display-name tier \
		--access-key "$access" --secret-key "$secret" >/dev/null 2>>"$dir/log/setup.log"
	cat >>"$dir/env" <<ENV
TIER_ACCESS_KEY=$access
TIER_SECRET_KEY=$secret
ENV
	. "$dir/env"
	wait_for 120 "the bucket" s3 PUT "/$bucket"
	echo "TIER_START_SECONDS=$(( $(date +%s) - start ))" >>"$dir/env"
	cat "$dir/env"
	;;
stop)
	[ -d "$dir" ] || exit 0
	for f in "$dir"/run/rgw.pid "$dir"/run/osd.*.pid "$dir"/run/mon.*.pid; do
		stop_pidfile "$f"
	done
	rm -rf "$dir"
	;;
rgw-stop)
	stop_pidfile "$dir/run/rgw.pid"
	;;
rgw-start)
	start_rgw
	;;
*)
	echo "ceph.sh: unknown command '$cmd'" >&2
	exit 2
	;;
esac
