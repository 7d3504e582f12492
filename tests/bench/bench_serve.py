#!/usr/bin/python3
"""Serving benchmark (docs/benchmarks.md T1, T2, T3, T6, T7): warm-cache items into a
PyTorch-style loop, against a DataLoader + pydicom loop over the same files, in one run.

    /usr/bin/python3 tests/bench/bench_serve.py --build build [--items 2000] [--quick]

Not a test: it prints figures and ratios measured in the same run (docs/benchmarks.md), and never
fails on speed. What runs, on data it writes itself:

  data      --items CT-like 512x512 int16 slices (0.5 MiB each), uncompressed explicit-VR
            DICOM written with pydicom, in a local dataset folder as the Datamint client
            writes it (dataset.json + images/); a second folder, the hot set, holds hard
            links to the first 64 of them (32 MiB).
  daemon    a fresh dmcached (the build's, defaults) with its cache in the temp dir; both
            folders prefetched (`dmcache prefetch --source`), then every contender runs
            once to warm up, so every figure is a warm cache.
  (a)       the baseline: torch DataLoader(batch_size=32, num_workers=2, shuffle) over a
            Dataset whose __getitem__ is pydicom.dcmread(path).pixel_array
  (b)       dmcache.Dataset(return_dicom=False, return_metainfo=False) in the same
            DataLoader (the Datamint-style drop-in; int16 comes out unchanged)
  (c)       dmcache.Loader(batch_size=32, shuffle, metadata=False); (c') metadata=True,
            each item's meta['labels'] and meta['dicom'] (a pydicom Dataset) read: the
            first epoch parses every item's metadata, later ones reuse it (the Loader
            keeps it); both after a warm-up epoch, whose figures are kept too (first epoch);
            (c) again with regions on its STREAM path (hot items handed in place and
            gathered on the loop; the default copies batches into the arena, viewed)
  (d)       (a) with a per-item transform (flip, crop, float32, blur) in the workers
  (e)       dmcache.Loader(num_workers=2, transform=) with the same transform
  C API     client/dmcache-read (the example program) over every item: GETs of 32 in
            index order, and --stream --shuffle (the daemon's order, batches ahead)
  T2        the hot set read again and again through dmcache.Loader, in GB/s, against a
            single-thread memcpy (numpy.copyto) of the same bytes in this process
  T3        handoff: dmcache.Client GET of one hot 32-item batch (16 MiB) until the reply
            says where the items are, then RELEASE; p50/p99 over --handoff batches, on
            two connections one after the other: one opened with regions=True (DMC_OPEN_REGIONS:
            the hot items handed in place, no copy) and one without (each item copied
            into the arena, as before regions); the same for one item (the per-request
            cost). What the client then pays to make a batch tensor of the 32 items
            handed in place: one gathering copy into its own memory (what the Loader
            does) against a read-only view when they happen to lie back to back. STREAM
            of the hot set in batches of 32 on the same two connections: the wait in
            dmc_stream_next() per batch, in a loop that only releases and asks again
            (in place against copied). The in-place GET again in a loop that only GETs
            and releases (no gather between: the handoff with warm caches). Also the time a Loader loop waits in next() per
            batch, the default (copied into the arena) and in place. The daemon's heap
            (RssAnon) before and after the timed GETs (flat: no per-batch allocation).
  T6        a new process (torch and dmcache imported): Loader() + first batch, median
            of 3; dmcache-read's connect + OPEN + first batch; connect and OPEN alone
  T7        dmcache.Loader in a child process for --seconds alone, then the same child
            with a second one on the same snapshot started at the same moment: the
            first child's throughput with the second against without; twice: a bare
            loop (both clients compete for the 2 CPUs), and a loop with a simulated
            training step of --step-ms per batch (a sleep, as a GPU step leaves the
            CPU free)

Epoch figures are the median of --reps epochs (3 x --reps for the C API, interleaved);
the hot-set and memcpy figures the best of --reps runs (interference on a shared VM only
slows a run down).
"""
import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.dirname(os.path.dirname(HERE))
BATCH = 32
HOT_ITEMS = 64
SIDE = 512
ITEMS_MAX = 100000       # 50 GiB of slices: refuse to fill the disk by a typo
TIMEOUT = 600

# the targets of docs/benchmarks.md
T1_ITEMS_S, T1_GB_S, T1_RATIO = 2000, 1.0, 20
T2_RATIO = 0.5
T3_P50_US, T3_P99_US = 100, 1000
T6_FIRST_S = 1.0
T7_COST = 0.10
RSS_FLAT_KIB = 1024  # heap growth over the timed GETs that still counts as flat


# ------------------------------------------------------------------------------ children
# The same file runs as a child process for T6 and T7: `--child MODE FOLDER`, with the
# build's package on PYTHONPATH and DMCACHE_SOCKET set by the parent.

def child_first_batch(folder):
    t0 = time.monotonic()
    import torch  # noqa: F401  (a training script has it loaded already)
    import dmcache
    t1 = time.monotonic()
    loader = dmcache.Loader(folder, batch_size=BATCH, shuffle=True, metadata=False)
    batch = next(iter(loader))
    t2 = time.monotonic()
    assert len(batch.indices) == min(BATCH, loader.items)
    loader.close()
    print(json.dumps({'import_s': t1 - t0, 'first_batch_s': t2 - t1}))


def child_loader_run(folder, seconds, phases):
    """For each step length in `phases` (ms of simulated training per batch, 0: none),
    waits for the parent's 'go' line, loops over the Loader for `seconds` and prints
    its figures as one JSON line."""
    import torch  # noqa: F401
    import dmcache
    loader = dmcache.Loader(folder, batch_size=BATCH, shuffle=True, metadata=False)
    next(iter(loader))  # connections open, arenas mapped
    print('ready', flush=True)
    epoch = 0
    for step_ms in phases:
        sys.stdin.readline()  # the parent's start signal
        t0 = time.monotonic()
        deadline = t0 + seconds
        items = nbytes = 0
        while time.monotonic() < deadline:
            loader.set_epoch(epoch)
            for b in loader:
                items += len(b.indices)
                nbytes += b.images.nelement() * b.images.element_size()
                if step_ms:
                    time.sleep(step_ms / 1e3)  # a GPU step: the CPU is free meanwhile
                if time.monotonic() >= deadline:
                    break
            epoch += 1
        dt = time.monotonic() - t0
        print(json.dumps({'items': items, 'bytes': nbytes, 'seconds': dt}), flush=True)
    loader.close()


# ------------------------------------------------------------------------------ the data

def make_folders(work, n):
    """The dataset folder (n CT-like slices) and the hot-set folder (hard links)."""
    import numpy as np
    sys.path.insert(0, os.path.join(SOURCE, 'tests', 'data'))
    import gen_corpus
    folder = os.path.join(work, 'datasets', 'ct')
    os.makedirs(os.path.join(folder, 'images'))
    bases = [gen_corpus.ct_slice(z, 16)[0] for z in range(16)]
    # every slice different (the store keeps identical content once): a base slice
    # plus a window of a noise pool that starts at the item's own offset
    rng = np.random.default_rng(7)
    pool = rng.integers(-8, 9, size=SIDE * SIDE + n, dtype=np.int16)
    resources, paths = [], []
    for i in range(n):
        px = bases[i % 16] + pool[i:i + SIDE * SIDE].reshape(SIDE, SIDE)
        data = gen_corpus.dicom_bytes(px, pixel_repr=1, intercept=-1024.0,
                                      key=('bench-serve', i // 16, i), z=i % 16)
        rel = 'images/ct%05d.dcm' % i
        with open(os.path.join(folder, rel), 'wb') as f:
            f.write(data)
        paths.append(os.path.join(folder, rel))
        resources.append({'id': 'ct-%05d' % i, 'file': rel, 'filename': 'ct%05d.dcm' % i,
                          'annotations': []})
    with open(os.path.join(folder, 'dataset.json'), 'w') as f:
        json.dump({'name': 'bench-ct', 'updated_at': '2026-01-01T00:00:00.000Z',
                   'all_annotations': False, 'resources': resources}, f)
    hot = os.path.join(work, 'datasets', 'hot')
    os.makedirs(os.path.join(hot, 'images'))
    for r in resources[:HOT_ITEMS]:
        os.link(os.path.join(folder, r['file']), os.path.join(hot, r['file']))
    with open(os.path.join(hot, 'dataset.json'), 'w') as f:
        json.dump({'name': 'bench-hot', 'updated_at': '2026-01-01T00:00:00.000Z',
                   'all_annotations': False, 'resources': resources[:HOT_ITEMS]}, f)
    return folder, hot, paths


def load_integration(build):
    """The integration suite's conftest (Daemon, paths), built at `build`."""
    os.environ['DMC_BUILD_ROOT'] = build
    sys.path.append(os.path.join(SOURCE, 'tests', 'integration'))
    import modload
    return modload.integration_conftest()


def prefetch(d, folder):
    t0 = time.monotonic()
    r = d.cli('prefetch', '--json', '--source', folder, timeout=TIMEOUT)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit('prefetch of %s failed (%d):\n%s%s' % (folder, r.returncode,
                                                                r.stdout[-2000:], r.stderr))
    return dt


# ------------------------------------------------------------------------------ contenders

class DicomFiles:
    """The baseline users have today: pydicom in DataLoader workers, every epoch."""

    def __init__(self, paths, transform=None):
        self.paths = paths
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import pydicom
        import torch
        a = pydicom.dcmread(self.paths[i]).pixel_array
        x = torch.from_numpy(a.reshape(1, 1, a.shape[0], a.shape[1]))
        return self.transform(x) if self.transform is not None else x


def augment(x):
    """The per-item augmentation of (d) and (e): a flip, a 448x448 crop, float32 scaled to
    about [0, 1] and a 3x3 box blur (CPU work of a typical training transform)."""
    import torch
    x = torch.flip(x, dims=[-1])[..., 32:480, 32:480].to(torch.float32)
    x = (x + 1024.0) / 4096.0
    return torch.nn.functional.avg_pool2d(x.reshape(1, 1, 448, 448), 3, stride=1,
                                          padding=1).reshape(1, 1, 448, 448)


def epoch_of(iterable, read_meta=False):
    """(items, bytes, seconds) of one pass over a loader yielding tensors or Batches;
    read_meta: each item's meta['labels'] and meta['dicom'] read too."""
    items = nbytes = 0
    t0 = time.monotonic()
    for b in iterable:
        images = b.images if hasattr(b, 'images') else b
        items += images.shape[0]
        nbytes += images.nelement() * images.element_size()
        if read_meta:
            for m in b.meta:
                m['labels'], m['dicom']
    return items, nbytes, time.monotonic() - t0


def run_epochs(make, reps, set_epoch=None, warmup=True, read_meta=False, first=None):
    """A warm-up epoch (worker processes started, the files in the page cache), then
    `reps`; returns per-epoch (items/s, bytes/s). first: a list the warm-up epoch's
    (items/s, bytes/s) is appended to."""
    it = make()
    out = []
    for e in range(reps + warmup):
        if set_epoch:
            set_epoch(it, e)
        items, nbytes, dt = epoch_of(it, read_meta)
        if e or not warmup:
            out.append((items / dt, nbytes / dt))
        elif first is not None:
            first.append((items / dt, nbytes / dt))
    return out


def percentile(xs, p):
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def rss_kib(pid, field='VmRSS'):
    """A memory figure of /proc/PID/status in KiB: VmRSS (with the shared memory the
    process touched: arenas count), RssAnon (its private heap)."""
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    return 0


def daemon_counters(dmcache, d):
    c = dmcache.Client(d.socket)
    try:
        return c.status()['counters']
    finally:
        c.close()


def child_env(build, d):
    env = dict(os.environ, DMCACHE_SOCKET=d.socket,
               PYTHONPATH=os.path.join(build, 'client', 'python'))
    env.pop('LD_PRELOAD', None)
    return env


def run_children(build, d, folder, seconds, count, phases):
    """`count` loader-run children, each phase started in all of them at once; returns
    per phase the list of their results."""
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), '--child', 'run',
                               folder, '--seconds', str(seconds),
                               '--phases', ','.join(map(str, phases))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=child_env(build, d)) for _ in range(count)]
    try:
        for p in procs:
            line = p.stdout.readline()
            if line.strip() != 'ready':
                raise SystemExit('a loader child did not start: %r' % line)
        out = []
        for _ in phases:
            for p in procs:
                p.stdin.write('go\n')
                p.stdin.flush()
            res = []
            for p in procs:
                line = p.stdout.readline()
                if not line.startswith('{'):
                    raise SystemExit('a loader child failed: %r' % line)
                res.append(json.loads(line))
            out.append(res)
        for p in procs:
            p.stdin.close()
            if p.wait(timeout=TIMEOUT) != 0:
                raise SystemExit('a loader child failed (%d)' % p.returncode)
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def dmcache_read(build, d, folder, epochs, limit=None, extra=()):
    cmd = [os.path.join(build, 'client', 'dmcache-read'), '--socket', d.socket, '--source',
           folder, '--epochs', str(epochs), '--batch', str(BATCH)] + list(extra)
    if limit:
        cmd += ['--limit', str(limit)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    if r.returncode != 0:
        raise SystemExit('dmcache-read failed (%d): %s' % (r.returncode, r.stderr))
    per_epoch = []
    first_ms = None
    for line in r.stdout.splitlines():
        w = line.split()
        if line.startswith('epoch '):
            items, secs, mbs = int(w[2]), float(w[5]), float(w[-2])
            per_epoch.append((items / secs, mbs * 1e6))
        elif line.startswith('total:'):
            first_ms = float(w[w.index('batch') + 1])
    return per_epoch, first_ms


# ------------------------------------------------------------------------------ main

def machine_facts():
    cpu = ''
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return {'cpu': cpu, 'cpus': os.cpu_count(), 'kernel': platform.release(),
            'python': platform.python_version(), 'loadavg': os.getloadavg()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--build', default=os.path.join(SOURCE, 'build'),
                    help='build directory (a release build for figures that mean something)')
    ap.add_argument('--items', type=int, default=2000, help='CT slices (0.5 MiB each)')
    ap.add_argument('--reps', type=int, default=3, help='measured epochs / runs per figure')
    ap.add_argument('--seconds', type=float, default=2.5, help='T7 run length per child')
    ap.add_argument('--step-ms', type=int, default=20,
                    help='T7: simulated training step per batch of 32 (a sleep)')
    ap.add_argument('--phases', default='0', help=argparse.SUPPRESS)
    ap.add_argument('--handoff', type=int, help='GETs timed for T3 (default 200; 50 with '
                    '--quick)')
    ap.add_argument('--quick', action='store_true',
                    help='256 items, 1 rep, short runs: a smoke run, not figures')
    ap.add_argument('--work-dir', help='where the temp dir goes (default: $TMPDIR)')
    ap.add_argument('--json', help='also write the results here')
    ap.add_argument('--child', nargs=2, metavar=('MODE', 'FOLDER'), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, folder = args.child
        if mode == 'first':
            child_first_batch(folder)
        else:
            child_loader_run(folder, args.seconds, [int(x) for x in args.phases.split(',')])
        return 0
    if args.quick:
        args.items, args.reps, args.seconds = 256, 1, 1.0
    if args.handoff is None:
        args.handoff = 50 if args.quick else 200
    if not HOT_ITEMS <= args.items <= ITEMS_MAX:
        ap.error('--items must be %d to %d' % (HOT_ITEMS, ITEMS_MAX))
    if args.reps < 1 or args.handoff < 2 or not 0.2 <= args.seconds <= 60 or \
            not 0 <= args.step_ms <= 10000:
        ap.error('--reps >= 1, --handoff >= 2, --seconds 0.2 to 60, --step-ms 0 to 10000')
    build = os.path.abspath(args.build)
    for exe in ('daemon/dmcached', 'client/dmcache', 'client/dmcache-read',
                'client/python/dmcache/__init__.py'):
        if not os.path.exists(os.path.join(build, exe)):
            raise SystemExit('%s not found: run ninja -C %s' % (exe, build))
    sys.path.insert(0, os.path.join(build, 'client', 'python'))
    import numpy as np
    import torch
    import dmcache
    from torch.utils.data import DataLoader
    integration = load_integration(build)

    facts = machine_facts()
    t_start = time.monotonic()
    res = {'items': args.items, 'reps': args.reps, 'facts': facts}
    with tempfile.TemporaryDirectory(prefix='dmc-bs-', dir=args.work_dir) as work:
        t0 = time.monotonic()
        folder, hot, paths = make_folders(work, args.items)
        res['generate_s'] = time.monotonic() - t0
        print('data: %d slices in %.1f s (%s)' % (args.items, res['generate_s'], folder),
              file=sys.stderr)
        d = integration.Daemon(os.path.join(work, 'd'), start=False)
        d.args.remove('-v')  # notice level: no line per request
        d.start()
        try:
            res['prefetch_s'] = prefetch(d, folder)
            prefetch(d, hot)
            print('prefetch: %.1f s' % res['prefetch_s'], file=sys.stderr)
            os.environ['DMCACHE_SOCKET'] = d.socket
            measure(args, build, d, folder, hot, paths, res, np, torch, dmcache, DataLoader)
        finally:
            rc, _ = d.stop()
            d.notify.close()
            if rc != 0:
                print('dmcached exited with %r:\n%s' % (rc, d.log()[-4000:]), file=sys.stderr)
    res['total_s'] = time.monotonic() - t_start
    res['facts']['loadavg_end'] = os.getloadavg()
    report(args, res)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(res, f, indent=1)
    return 0


def measure(args, build, d, folder, hot, paths, res, np, torch, dmcache, DataLoader):
    reps = args.reps
    t_stage = [time.monotonic()]

    def log(s):
        now = time.monotonic()
        print('%6.1f s  %s' % (now - t_stage[0], s), file=sys.stderr, flush=True)
    g = torch.Generator()
    g.manual_seed(0)

    def dataloader(ds):
        return DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=2,
                          persistent_workers=True, generator=g)

    counters0 = daemon_counters(dmcache, d)
    # T1: items/s of each contender, warm
    log('(a) DataLoader(num_workers=2) + pydicom')
    res['a'] = run_epochs(lambda: dataloader(DicomFiles(paths)), reps)
    log('(b) dmcache.Dataset + DataLoader(num_workers=2)')
    res['b'] = run_epochs(lambda: dataloader(dmcache.Dataset(
        root=os.path.dirname(folder), dataset_name=os.path.basename(folder),
        return_dicom=False, return_metainfo=False)), reps)
    class RegionLoader(dmcache.Loader):
        _regions = True  # STREAM batches' hot items in place, gathered on the loop

    for key, meta, cls in (('c', False, dmcache.Loader), ('c_meta', True, dmcache.Loader),
                           ('c_regions', False, RegionLoader)):
        log('(c) dmcache.Loader, metadata=%s%s' % (meta, '' if cls is dmcache.Loader
                                                   else ', with regions'))
        res[key + '_first'] = []
        res[key] = run_epochs(lambda: cls(folder, batch_size=BATCH, shuffle=True,
                                          metadata=meta), reps,
                              set_epoch=lambda it, e: it.set_epoch(e), read_meta=meta,
                              first=res[key + '_first'])
    # transforms in worker processes: DataLoader's (over pydicom) against the Loader's
    log('(d) DataLoader(num_workers=2) + pydicom + transform')
    res['d'] = run_epochs(lambda: dataloader(DicomFiles(paths, augment)), reps)
    log('(e) dmcache.Loader(num_workers=2, transform=)')
    res['e'] = run_epochs(lambda: dmcache.Loader(folder, batch_size=BATCH, shuffle=True,
                                                 metadata=False, num_workers=2,
                                                 transform=augment), reps,
                          set_epoch=lambda it, e: it.set_epoch(e))
    log('C API: dmcache-read, GET and --stream --shuffle')
    # C epochs are short (a fraction of a second when hot): more of them, interleaved
    res['c_api'], res['c_stream'] = [], []
    for _ in range(reps):
        res['c_api'] += dmcache_read(build, d, folder, 3)[0]
        res['c_stream'] += dmcache_read(build, d, folder, 3, extra=['--stream', '--shuffle'])[0]

    # T2: hot items through the Loader against memcpy of the same bytes
    log('T2: hot set')
    hot_bytes = HOT_ITEMS * SIDE * SIDE * 2
    src = np.random.default_rng(1).integers(0, 255, hot_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    memcpy = []
    for _ in range(reps):
        np.copyto(dst, src)
        best = 0.0
        for _ in range(20):
            t0 = time.perf_counter()
            np.copyto(dst, src)
            best = max(best, hot_bytes / (time.perf_counter() - t0))
        memcpy.append(best)
    hot_loader = dmcache.Loader(hot, batch_size=BATCH, shuffle=True, metadata=False)
    hot_runs = []
    for r in range(reps + 1):
        nbytes, t0, e = 0, time.monotonic(), 0
        while time.monotonic() - t0 < 1.0:
            hot_loader.set_epoch(e)
            nbytes += epoch_of(hot_loader)[1]
            e += 1
        if r:
            hot_runs.append(nbytes / (time.monotonic() - t0))
    hot_loader.close()
    res['memcpy_Bps'] = max(memcpy)
    res['hot_loader_Bps'] = max(hot_runs)
    per_epoch, _ = dmcache_read(build, d, hot, 40)
    res['hot_c_api_Bps'] = max(bps for _, bps in per_epoch[1:])

    # T3: handoff latency of a hot batch, and what a Loader loop waits per batch; the
    # in-place handoff (regions) and the copy into the arena, in turns on two connections
    log('T3: handoff')
    import numpy as np
    c_new, c_old = dmcache.Client(d.socket), dmcache.Client(d.socket)
    o_new = c_new.open(dmcache._lib.SOURCE_LOCAL, hot, regions=True)
    o_old = c_old.open(dmcache._lib.SOURCE_LOCAL, hot)
    idx = list(range(BATCH))
    lat, lat_old, gather, view = [], [], [], []
    contiguous = 0
    # one connection after the other, each alone: taken in turns, the copying
    # connection's 16 MiB memmove on the daemon left the in-place path's GETs with cold
    # caches, which measured the other path rather than this one's handoff
    rss0 = None
    for ods, out in ((o_new, lat), (o_old, lat_old)):
        for i in range(args.handoff + 20):
            if i == 20 and rss0 is None:  # warmed up: the daemon's heap stays flat from here
                rss0 = rss_kib(d.proc.pid, 'RssAnon')
            t0 = time.perf_counter()
            items = ods.get(idx)
            dt = time.perf_counter() - t0
            if any(it.status for it in items):
                raise SystemExit('a hot item failed')
            if ods is o_new:
                if not all(it.region for it in items):
                    raise SystemExit('a hot item was not handed in place')
                # the client's batch tensor: one gathering copy into its own memory ...
                first = items[0]
                dt_np = np.dtype(dmcache._lib.DTYPES[first.dtype])
                t1 = time.perf_counter()
                batch = np.empty((len(items),) + tuple(first.shape), dt_np)
                for k, it in enumerate(items):
                    batch[k] = np.frombuffer(dmcache._lib.item_bytes(it), dt_np).reshape(
                        tuple(it.shape))
                t2 = time.perf_counter()
                # ... or a view, possible only when the items lie back to back
                if all(items[k + 1].data == items[k].data + items[k].nbytes
                       for k in range(len(items) - 1)):
                    contiguous += 1
                    t3 = time.perf_counter()
                    buf = (ctypes.c_char * (first.nbytes * len(items))).from_address(first.data)
                    v = np.frombuffer(buf, dt_np).reshape(batch.shape)
                    t4 = time.perf_counter()
                    assert np.array_equal(v[-1], batch[-1])
                    if i >= 20:
                        view.append(t4 - t3)
                if i >= 20:
                    gather.append(t2 - t1)
                del batch
            ods.release(items)
            if i >= 20:
                out.append(dt)
    rss1 = rss_kib(d.proc.pid, 'RssAnon')
    batch_bytes = sum(it.nbytes for it in items)
    # the same in-place GET in a loop that does nothing else (GET, RELEASE): the handoff
    # with warm caches, against the loop above whose gather of 16 MiB leaves them cold
    lat_bare = []
    for i in range(args.handoff + 20):
        t0 = time.perf_counter()
        items = o_new.get(idx)
        dt = time.perf_counter() - t0
        o_new.release(items)
        if i >= 20:
            lat_bare.append(dt)
    lat1, lat1_old = [], []  # one item: the per-request cost without the bulk of a batch
    for k in range(0, HOT_ITEMS, BATCH):  # every hot item in the region once, untimed
        o_new.release(o_new.get(list(range(k, min(k + BATCH, HOT_ITEMS)))))
    for ods, out in ((o_new, lat1), (o_old, lat1_old)):
        for i in range(args.handoff + 20):
            t0 = time.perf_counter()
            items = ods.get([i % HOT_ITEMS])
            dt = time.perf_counter() - t0
            ods.release(items)
            if i >= 20:
                out.append(dt)
    # STREAM of the hot snapshot, batches of 32 (16 MiB): dmc_stream_next()'s wait until
    # the batch event says where the items are, in a loop that only releases and asks
    # again (the daemon's per-batch work, or the first batch of each epoch's stream)
    snext, snext_old = [], []
    e = 0
    while len(snext) < args.handoff:
        for ods, out in ((o_new, snext), (o_old, snext_old)):
            st = ods.stream(BATCH, seed=1, epoch=e, shuffle=True)
            try:
                while True:
                    t0 = time.perf_counter()
                    b = st.next()
                    dt = time.perf_counter() - t0
                    if b is None:
                        break
                    if b.in_region != (b.n if ods is o_new else 0):
                        raise SystemExit('a hot STREAM item was not handed as expected')
                    if e:
                        out.append(dt)
                    st.release(b)
            finally:
                st.close()
        e += 1
    c1 = daemon_counters(dmcache, d)
    res['region_committed'] = c1.get('serve_region_committed_bytes', 0)
    for ods, c in ((o_new, c_new), (o_old, c_old)):
        ods.close()
        c.close()

    class RegionLoader(dmcache.Loader):
        _regions = True  # STREAM batches' hot items in place, gathered on the loop

    waits = {}
    for key, cls in (('loader_wait_us', RegionLoader), ('loader_wait_old_us', dmcache.Loader)):
        wait = waits[key] = []
        hot_loader = cls(hot, batch_size=BATCH, shuffle=True, metadata=False)
        e = 0
        while len(wait) < max(2, args.handoff // 2):
            hot_loader.set_epoch(e)
            it = iter(hot_loader)
            while True:
                t0 = time.perf_counter()
                try:
                    next(it)
                except StopIteration:
                    break
                wait.append(time.perf_counter() - t0)
            e += 1
        hot_loader.close()
    pct = lambda xs: (percentile(xs, 50) * 1e6, percentile(xs, 99) * 1e6)  # noqa: E731
    res['handoff_us'] = pct(lat)
    res['handoff_old_us'] = pct(lat_old)
    res['handoff_bare_us'] = pct(lat_bare)
    res['handoff1_us'] = pct(lat1)
    res['handoff1_old_us'] = pct(lat1_old)
    res['gather_us'] = pct(gather)
    res['view_us'] = pct(view) if view else None
    res['contiguous'] = (contiguous, args.handoff + 20)
    res['stream_us'] = pct(snext)
    res['stream_old_us'] = pct(snext_old)
    for key, wait in waits.items():
        res[key] = pct(wait)
    res['batch_bytes'] = batch_bytes
    res['rss_kib'] = (rss0, rss1)

    # T6: a new process to its first batch
    log('T6: first batch')
    first = []
    for _ in range(3):
        r = subprocess.run([sys.executable, os.path.abspath(__file__), '--child', 'first',
                            folder], capture_output=True, text=True, timeout=TIMEOUT,
                           env=child_env(build, d))
        if r.returncode != 0:
            raise SystemExit('first-batch child failed:\n' + r.stderr)
        first.append(json.loads(r.stdout.strip().splitlines()[-1]))
    res['first_batch_s'] = statistics.median(x['first_batch_s'] for x in first)
    res['import_s'] = statistics.median(x['import_s'] for x in first)
    c_first = [dmcache_read(build, d, folder, 1, limit=BATCH)[1] for _ in range(3)]
    opens = []
    for _ in range(3):
        # the daemon frees a closed connection's arena on its loop: let it finish, so
        # that the connect below measures the connect alone
        time.sleep(0.5)
        t0 = time.perf_counter()
        client = dmcache.Client(d.socket)
        t1 = time.perf_counter()
        ods = client.open(dmcache._lib.SOURCE_LOCAL, folder)
        t2 = time.perf_counter()
        ods.close()
        client.close()
        opens.append((t1 - t0, t2 - t1))
    res['connect_ms'] = statistics.median(o[0] for o in opens) * 1e3
    res['open_ms'] = statistics.median(o[1] for o in opens) * 1e3
    res['first_batch_c_ms'] = statistics.median(c_first)

    # T7: a second client on the same snapshot
    log('T7: one client, then two')
    phases = (0, args.step_ms)
    alone = run_children(build, d, folder, args.seconds, 1, phases)
    both = run_children(build, d, folder, args.seconds, 2, phases)
    rate = lambda r: r['items'] / r['seconds']  # noqa: E731
    res['t7'] = [{'step_ms': phases[k], 'alone': rate(alone[k][0]), 'first': rate(both[k][0]),
                  'second': rate(both[k][1])} for k in range(len(phases))]
    res['rss_kib_end'] = rss_kib(d.proc.pid)
    c1 = daemon_counters(dmcache, d)
    res['counters'] = {k: c1[k] - counters0.get(k, 0) for k in c1 if k.endswith('_total')}


def report(args, res):
    def med(key, k=0):
        return statistics.median(x[k] for x in res[key])

    def verdict(ok):
        return 'met' if ok else 'not met'

    a, b, c, cm, capi = med('a'), med('b'), med('c'), med('c_meta'), med('c_api')
    c_first, cm_first = med('c_first'), med('c_meta_first')
    d_, e_ = med('d'), med('e')
    c_gbs = med('c', 1) / 1e9
    hot, mc, hot_c = res['hot_loader_Bps'], res['memcpy_Bps'], res['hot_c_api_Bps']
    p50, p99 = res['handoff_us']
    w50, w99 = res['loader_wait_us']
    rss0, rss1 = res['rss_kib']
    rows = [
        ('(a) DataLoader(num_workers=2) + pydicom', '%.0f items/s' % a, 'baseline', ''),
        ('(b) dmcache.Dataset + DataLoader(num_workers=2)',
         '%.0f items/s (%.1fx a)' % (b, b / a), '', ''),
        ('(c) dmcache.Loader, batch 32', '%.0f items/s, %.2f GB/s' % (c, c_gbs),
         'T1: >= %d items/s, >= %.0f GB/s' % (T1_ITEMS_S, T1_GB_S),
         verdict(c >= T1_ITEMS_S and c_gbs >= T1_GB_S)),
        ('(c) / (a)', '%.1fx' % (c / a), 'T1: >= %dx' % T1_RATIO, verdict(c / a >= T1_RATIO)),
        ('(c) with regions (STREAM batches in place, gathered on the loop)',
         '%.0f items/s (%.2fx c)' % (med('c_regions'), med('c_regions') / c), '', ''),
        ("(c') dmcache.Loader, metadata=True, labels and DICOM header read",
         '%.0f items/s (%.2fx c)' % (cm, cm / c), '', ''),
        ("(c') its first epoch (every item's metadata parsed), against (c)'s first",
         '%.0f items/s (%.2fx c)' % (cm_first, cm_first / c_first), '', ''),
        ('(d) DataLoader(num_workers=2) + pydicom + transform', '%.0f items/s' % d_, '', ''),
        ('(e) dmcache.Loader(num_workers=2, transform=), same transform',
         '%.0f items/s (%.1fx d)' % (e_, e_ / d_), '', ''),
        ('C API (dmcache-read), batch 32, every byte read', '%.0f items/s, %.2f GB/s' % (
            capi, med('c_api', 1) / 1e9), '', ''),
        ('C API STREAM (dmcache-read --stream --shuffle), batch 32',
         '%.0f items/s, %.2f GB/s' % (med('c_stream'), med('c_stream', 1) / 1e9), '', ''),
        ('hot items via dmcache.Loader', '%.2f GB/s' % (hot / 1e9), '', ''),
        ('single-thread memcpy (numpy), same bytes', '%.2f GB/s' % (mc / 1e9), '', ''),
        ('hot Loader / memcpy', '%.2f' % (hot / mc), 'T2: >= %.1f' % T2_RATIO,
         verdict(hot / mc >= T2_RATIO)),
        ('hot items via C API / memcpy', '%.2f (%.2f GB/s)' % (hot_c / mc, hot_c / 1e9), '', ''),
        ('handoff of a hot %.0f MiB batch by GET, in place (regions), p50 / p99' % (
            res['batch_bytes'] / 2**20),
         '%.0f / %.0f us' % (p50, p99), 'T3: <= %d / %d us' % (T3_P50_US, T3_P99_US),
         verdict(p50 <= T3_P50_US and p99 <= T3_P99_US)),
        ('the same in a loop of GET + RELEASE only (no gather between: warm caches)',
         '%.0f / %.0f us' % res['handoff_bare_us'], '', ''),
        ('the same, copied into the arena (without regions), p50 / p99',
         '%.0f / %.0f us' % res['handoff_old_us'], '', ''),
        ('hot %.0f MiB STREAM batch in place (regions): dmc_stream_next() wait, p50 / p99' % (
            res['batch_bytes'] / 2**20), '%.0f / %.0f us' % res['stream_us'],
         'T3: <= %d / %d us' % (T3_P50_US, T3_P99_US),
         verdict(res['stream_us'][0] <= T3_P50_US and res['stream_us'][1] <= T3_P99_US)),
        ('the same STREAM copied into the arena (without regions), p50 / p99',
         '%.0f / %.0f us' % res['stream_old_us'], '', ''),
        ('handoff, GET of one hot item (0.5 MiB), in place, p50 / p99', '%.0f / %.0f us' % (
            res['handoff1_us']), '', ''),
        ('the same, copied into the arena, p50 / p99', '%.0f / %.0f us' % (
            res['handoff1_old_us']), '', ''),
        ('client: batch tensor of the 32 in-place items, one gathering copy, p50 / p99',
         '%.0f / %.0f us' % res['gather_us'], '', ''),
        ('client: the same as a read-only view (items back to back in %d of %d batches), '
         'p50 / p99' % res['contiguous'],
         '%.0f / %.0f us' % res['view_us'] if res['view_us'] else 'never back to back', '',
         ''),
        ('regions: memory the daemon holds for them', '%.1f MiB' % (
            res['region_committed'] / 2**20), '', ''),
        ('Loader loop: wait in next() per batch (in place: gathered), p50 / p99',
         '%.0f / %.0f us' % (w50, w99), '', ''),
        ('the same by default (copied into the arena, viewed), p50 / p99',
         '%.0f / %.0f us' % res['loader_wait_old_us'], '', ''),
        ('daemon heap (RssAnon) over the timed GETs', '%.1f -> %.1f MiB' % (
            rss0 / 1024, rss1 / 1024), 'T3: flat', verdict(rss1 - rss0 <= RSS_FLAT_KIB)),
        ('daemon VmRSS at the end (arenas of closed clients gone)', '%.1f MiB' % (
            res['rss_kib_end'] / 1024), '', ''),
        ('first batch: new process, Loader() + next()', '%.0f ms' % (res['first_batch_s'] * 1e3),
         'T6: <= %.0f ms' % (T6_FIRST_S * 1e3), verdict(res['first_batch_s'] <= T6_FIRST_S)),
        ('first batch: C API connect + OPEN + GET', '%.1f ms' % res['first_batch_c_ms'], '', ''),
        ('of which connect / OPEN of the %d-item snapshot' % res['items'], '%.1f / %.1f ms' % (
            res['connect_ms'], res['open_ms']), '', ''),
    ]
    for t in res['t7']:
        what = 'Loader process' if not t['step_ms'] else \
            'Loader process with a %d ms training step per batch' % t['step_ms']
        cost = 1 - t['first'] / t['alone'] if t['alone'] else 0.0
        rows += [
            ('one %s alone' % what, '%.0f items/s' % t['alone'], '', ''),
            ('the same with a second on the snapshot', '%.0f items/s (second: %.0f)' % (
                t['first'], t['second']), '', ''),
            ('cost of the second client', '%.0f %%' % (cost * 100),
             'T7: <= %.0f %%' % (T7_COST * 100), verdict(cost <= T7_COST)),
        ]
    cnt = res['counters']
    served = cnt.get('serve_items_total', 0)
    if served:
        how = ['%.3f decoded' % (cnt.get('serve_items_decoded_total', 0) / served)]
        for k, name in (('serve_items_from_tensor_cache_total', 'from stored tensors'),
                        ('serve_hot_hits_total', 'from memory (hot)')):
            if k in cnt:
                how.append('%.3f %s' % (cnt[k] / served, name))
        rows.append(('daemon: per item served (%d items)' % served, ', '.join(how), '', ''))
    f = res['facts']
    print('Serving benchmark: %d CT slices 512x512 int16 (%.0f MiB), warm cache; %s, %d CPUs, '
          'load %.1f -> %.1f; data %.0f s, prefetch %.1f s, run %.0f s' % (
              res['items'], res['items'] * SIDE * SIDE * 2 / 2**20, f['cpu'], f['cpus'],
              f['loadavg'][0], f['loadavg_end'][0], res['generate_s'], res['prefetch_s'],
              res['total_s']))
    print('Median of %d epochs (hot set, memcpy: best of %d runs)\n' % (args.reps, args.reps))
    print('| measurement | result | target | |')
    print('|---|---:|---|---|')
    for r in rows:
        print('| %s | %s | %s | %s |' % r)


if __name__ == '__main__':
    sys.exit(main())
