#!/usr/bin/env bash
# The demo: installs what is missing, builds, then runs the main job on the bundled sample
# data: a Datamint server (the emulator, on loopback, serving the sample project), dmcached,
# a prefetch with its progress, the cache listing, decoded items read back through shared
# memory, the C API's example program (items/s), and PyTorch-style loops over
# dmcache.Loader and over dmcache.Dataset in a DataLoader with two workers (items/s).
# Everything it starts is stopped when it ends.
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
echo "== client/examples/dmcache-read.c: the C API (open, get, release), 3 epochs"
"$build/client/dmcache-read" sample --epochs 3 | sed 's/^/   /'
echo
echo "== a PyTorch-style loop: dmcache.Loader, then dmcache.Dataset + DataLoader(num_workers=2)"
PYTHONPATH="$build/client/python" $python - <<'PY'
import time

import torch
from torch.utils.data import DataLoader

import dmcache

EPOCHS = 3


def size_of(images):
    if isinstance(images, torch.Tensor):
        return images.nelement() * images.element_size()
    return sum(x.nelement() * x.element_size() for x in images)


def run(name, loader, n_of):
    for epoch in range(EPOCHS):
        if hasattr(loader, 'set_epoch'):
            loader.set_epoch(epoch)
        items = nbytes = 0
        t0 = time.monotonic()
        for batch in loader:           # a training step would use the tensors here
            images = batch[0]
            items += n_of(batch)
            nbytes += size_of(images)
        dt = time.monotonic() - t0
        print('   %-40s epoch %d: %3d items, %5.1f MB in %6.1f ms: %7.0f items/s' % (
            name, epoch, items, nbytes / 1e6, dt * 1e3, items / dt))


# batches straight from the daemon's shared memory, in DistributedSampler's order; the
# sample's items differ in shape, so each batch is a list of tensors (collate='list')
loader = dmcache.Loader('sample', batch_size=8, shuffle=True, seed=0, collate='list')
run('dmcache.Loader(batch_size=8)', loader, lambda b: len(b.indices))
loader.close()

# the Datamint client's Dataset, served by the daemon: (image, dicom_metainfo, metainfo)
# per item, converted as the client converts them, in two DataLoader worker processes
ds = dmcache.Dataset(dataset_name='sample')
dl = DataLoader(ds, batch_size=8, shuffle=True, num_workers=2, collate_fn=dmcache.collate,
                persistent_workers=True)
run('dmcache.Dataset + DataLoader(workers=2)', dl, lambda b: len(b[2]))
image, dicom_metainfo, metainfo = ds[0]
print('   ds[0]: image %s %s, %s %s, labels %s' % (
    tuple(image.shape), image.dtype, dicom_metainfo.Modality, metainfo['filename'],
    metainfo['labels']))
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
