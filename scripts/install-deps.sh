#!/usr/bin/env bash
# Installs the Debian 12 packages dmcache needs to build, test, benchmark and run the demo.
# Idempotent and quiet when everything is present. Needs root (or sudo) only to install.
set -euo pipefail

pkgs=(
	# build
	meson ninja-build pkg-config gcc g++ clang llvm libclang-rt-14-dev
	scdoc # the manual pages
	# libraries
	libuv1-dev libcurl4-openssl-dev libsqlite3-dev libzstd-dev libturbojpeg0-dev
	libgdcm-dev libgdcm-tools libspng-dev libsystemd-dev libjansson-dev libinih-dev
	libyaml-dev libseccomp-dev libssl-dev libdeflate-dev zlib1g-dev
	libopenjp2-7-dev # JPEG 2000 and HTJ2K (OpenJPEG >= 2.5)
	# tools the tests use
	sqlite3 curl systemd strace util-linux e2fsprogs zstd libjpeg-turbo-progs
	openjph-tools # ojph_compress writes the HTJ2K test files
	libfaketime # the daemon's wall clock jumps (faults-clock)
	# the cluster tier's tests: a throwaway Ceph cluster with a RADOS Gateway (tests/tier/ceph.sh)
	ceph-mon ceph-osd radosgw ceph-common
	# the operator's side: promtool (prometheus) and node_exporter for `dmcache metrics`
	prometheus prometheus-node-exporter
	# man(1) renders the pages in a test; zsh loads the completion
	man-db zsh
	# the Debian packages (debian/, built and installed by the test ops-deb)
	build-essential debhelper dh-python dpkg-dev fakeroot lintian
	# Python: the package, the emulator, tests and reference decoders
	python3 python3-numpy python3-pytest python3-pydicom python3-pil python3-nibabel
	python3-gdcm python3-torch python3-torchvision python3-yaml python3-trustme
)

missing=()
for p in "${pkgs[@]}"; do
	if ! dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
		missing+=("$p")
	fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "install-deps: installing ${#missing[@]} package(s): ${missing[*]}" >&2
sudo=
[ "$(id -u)" -eq 0 ] || sudo=sudo
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
