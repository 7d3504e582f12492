#!/usr/bin/python3
"""OPEN benchmark (docs/benchmarks.md T6): what opening a stored snapshot costs as it grows,
and what one `dmcache get` costs as a whole process.

    /usr/bin/python3 tests/bench/bench_open.py --build build [--sizes 100,10000,100000]
                                               [--million] [--local 10000] [--reps 5]
                                               [--item-size 4096] [--work-dir DIR]

Not a test: it prints figures measured in this run and never fails on speed. What runs:

  data      the emulator's synthetic projects of N items of 4 KiB (--item-size; generated
            on demand, served over loopback HTTP), one per size; --million adds 1,000,000 items
            (about 4 GiB downloaded and stored: minutes, and disk); a local dataset folder
            of --local small PNG files (dataset.json as the Datamint client writes it)
  daemon    a fresh dmcached (the build's, notice level) with its cache in the temp dir;
            every project prefetched once (`dmcache prefetch`), timed
  OPEN      connect + HELLO + OPEN + CLOSE through libdmcache (dmcache._lib.Client), median
            and max of --reps: warm (the daemon has opened the snapshot before), online
            (the caller's key checked against the server's listing, as every online OPEN
            is) and offline (DMC_OPEN_OFFLINE: the caller's grant only); then once after a
            daemon restart (cold: the first OPEN of a new daemon process)
  reprove   the local folder prefetched a second time: every file proved again through
            new descriptors (by the unchanged inode: nothing read)
  first     OPEN + GET of item 0 as the stored file (DMC_OPEN_RAW: the synthetic items are
            not images) + RELEASE
  RSS       the daemon's VmRSS with the snapshot open on one connection, against the
            daemon idle after start (the snapshot's cost beyond the empty daemon)
  get       `dmcache get sample 0 -o x.npy` (a decoded DICOM item, hot) as a process,
            median of --reps
"""
import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.dirname(os.path.dirname(HERE))
TIMEOUT = 7200
KEY = 'dmc-key-all'
# a 1x1 gray PNG: what the local folder's items are
PNG = base64.b64decode('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgAB'
                       'SK+kcQAAAABJRU5ErkJggg==')

sys.path.append(os.path.join(SOURCE, 'tests', 'integration'))
import modload  # noqa: E402


def load(build, name, path):
    """The module at `path` as `name`, after pointing DMC_BUILD_ROOT at `build` (the
    integration suite's conftest reads it when loaded)."""
    os.environ['DMC_BUILD_ROOT'] = build
    os.environ.setdefault('DMC_SOURCE_ROOT', SOURCE)
    return modload.load(name, path)


def rss_kib(pid):
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    return 0


def ms(x):
    return '%.1f ms' % (x * 1000) if x < 10 else '%.1f s' % x


def make_local(work, n):
    folder = os.path.join(work, 'local-%d' % n)
    os.makedirs(os.path.join(folder, 'images'))
    resources = []
    for i in range(n):
        name = 'img%07d.png' % i
        with open(os.path.join(folder, 'images', name), 'wb') as f:
            f.write(PNG)
        resources.append({'id': 'local-%07d' % i, 'file': 'images/' + name,
                          'mimetype': 'image/png', 'annotations': []})
    with open(os.path.join(folder, 'dataset.json'), 'w') as f:
        json.dump({'name': 'local-%d' % n, 'updated_at': '2026-01-01T00:00:00Z',
                   'total_resource': n, 'all_annotations': False, 'resources': resources}, f)
    return folder


def open_once(_lib, socket_path, source, project, server, offline, first):
    t0 = time.monotonic()
    c = _lib.Client(socket_path)
    try:
        remote = source == _lib.SOURCE_DATAMINT
        ds = c.open(source, project, server=server if remote else None,
                    api_key=KEY if remote else None, offline=offline, raw=first)
        t_open = time.monotonic() - t0
        if first:
            items = ds.get([0])
            if items[0].status != 0:
                raise SystemExit('GET of item 0 of %s failed: %s' % (project,
                                                                    items[0].message))
            ds.release(items)
        dt = time.monotonic() - t0
        ds.close()
    finally:
        c.close()
    return t_open, dt


def measure_open(_lib, d, source, project, server, reps):
    row = {}
    open_once(_lib, d.socket, source, project, server, False, False)  # warm it
    for name, offline in (('online', False), ('offline', True)):
        if source != _lib.SOURCE_DATAMINT and offline:
            continue
        xs = [open_once(_lib, d.socket, source, project, server, offline, False)[0]
              for _ in range(reps)]
        row[name] = (statistics.median(xs), max(xs))
    row['first'] = statistics.median(
        open_once(_lib, d.socket, source, project, server, False, True)[1] for _ in range(reps))
    c = _lib.Client(d.socket)
    try:
        remote = source == _lib.SOURCE_DATAMINT
        ds = c.open(source, project, server=server if remote else None,
                    api_key=KEY if remote else None)
        row['rss_kib'] = rss_kib(d.proc.pid)
        row['items'] = ds.items
        ds.close()
    finally:
        c.close()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--build', default=os.path.join(SOURCE, 'build'))
    ap.add_argument('--sizes', default='100,10000,100000',
                    help='synthetic project sizes (items), comma-separated')
    ap.add_argument('--million', action='store_true', help='also a 1,000,000-item project')
    ap.add_argument('--local', type=int, default=10000, help='items of the local folder '
                    '(0: none)')
    ap.add_argument('--item-size', type=int, default=4096,
                    help='bytes of each synthetic item (smaller items make --million '
                    'quicker to prefetch; the OPEN does not read them)')
    ap.add_argument('--reps', type=int, default=5)
    ap.add_argument('--work-dir', help='where the temp dir goes (default: $TMPDIR)')
    ap.add_argument('--json', help='also write the results here')
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(',') if x]
    if args.million:
        sizes.append(1000000)
    if not sizes or min(sizes) < 1 or args.reps < 1 or args.local < 0 or args.item_size < 1:
        ap.error('--sizes: positive item counts; --reps >= 1; --local >= 0; --item-size >= 1')
    build = os.path.abspath(args.build)
    for exe in ('daemon/dmcached', 'client/dmcache', 'client/python/dmcache/__init__.py'):
        if not os.path.exists(os.path.join(build, exe)):
            raise SystemExit('%s not found: run ninja -C %s' % (exe, build))
    sys.path.insert(0, os.path.join(build, 'client', 'python'))
    from dmcache import _lib
    integration = load(build, 'dmc_integration_conftest',
                       os.path.join(SOURCE, 'tests', 'integration', 'conftest.py'))
    emulator = load(build, 'dmc_emulator_client',
                    os.path.join(SOURCE, 'tests', 'emulator', 'client.py'))
    res = {'sizes': sizes, 'rows': {}, 'prefetch': {}}
    synthetic = ['o%d:%d:%d' % (n, n, args.item_size) for n in sizes]
    with tempfile.TemporaryDirectory(prefix='dmc-bo-', dir=args.work_dir) as work, \
            emulator.Emulator(synthetic=synthetic) as emu:
        local = make_local(work, args.local) if args.local else None
        d = integration.Daemon(os.path.join(work, 'd'), start=False)
        d.args.remove('-v')
        d.env['DATAMINT_API_KEY'] = KEY
        d.env['DATAMINT_API_URL'] = emu.url
        d.start()
        try:
            time.sleep(0.5)
            res['rss_idle_kib'] = rss_kib(d.proc.pid)
            projects = [(_lib.SOURCE_DATAMINT, 'o%d' % n, n) for n in sizes]
            if local:
                projects.append((_lib.SOURCE_LOCAL, local, args.local))
            for source, project, n in projects:
                t0 = time.monotonic()
                cmd = ['prefetch', '--json'] + (['--source', project]
                                                 if source == _lib.SOURCE_LOCAL else [project])
                r = d.cli(*cmd, timeout=TIMEOUT)
                if r.returncode != 0:
                    raise SystemExit('prefetch of %s failed:\n%s%s' % (project, r.stdout[-2000:],
                                                                       r.stderr))
                res['prefetch'][n if source == _lib.SOURCE_DATAMINT else 'local'] = \
                    time.monotonic() - t0
                print('prefetched %s (%d items) in %.1f s' % (os.path.basename(project), n,
                                                              time.monotonic() - t0),
                      file=sys.stderr)
                if source == _lib.SOURCE_LOCAL:
                    # again: every file proved again through new descriptors, none read
                    t0 = time.monotonic()
                    r = d.cli(*cmd, timeout=TIMEOUT)
                    if r.returncode != 0:
                        raise SystemExit('prefetch of %s failed:\n%s' % (project, r.stderr))
                    res['reprove_s'] = time.monotonic() - t0
                    res['local_n'] = n
            for source, project, n in projects:
                key = ('local %d' % n) if source == _lib.SOURCE_LOCAL else '%d' % n
                res['rows'][key] = measure_open(_lib, d, source, project, emu.url, args.reps)
                print('measured %s: %s' % (key, json.dumps(res['rows'][key])), file=sys.stderr)
            # dmcache get of a hot decoded item, as a whole process
            r = d.cli('prefetch', 'sample', timeout=TIMEOUT)
            if r.returncode != 0:
                raise SystemExit('prefetch of sample failed:\n' + r.stderr)
            out = os.path.join(work, 'x.npy')
            xs = []
            for i in range(args.reps + 1):
                t0 = time.monotonic()
                r = d.cli('get', 'sample', '0', '-o', out)
                if r.returncode != 0:
                    raise SystemExit('dmcache get failed:\n' + r.stderr)
                xs.append(time.monotonic() - t0)
            res['get_process_s'] = statistics.median(xs[1:])
            # cold: a new daemon process, its first OPEN of each snapshot (the start itself
            # reconciles the store with the index: timed apart, until READY)
            d.stop(timeout=600)
            t0 = time.monotonic()
            d.start(expect_ready=False)
            if not d.notify.wait_for('READY=1', timeout=TIMEOUT, proc=d.proc):
                raise SystemExit('dmcached did not restart:\n' + d.log()[-4000:])
            res['start_s'] = time.monotonic() - t0
            print('restarted in %.1f s' % res['start_s'], file=sys.stderr)
            for source, project, n in projects:
                key = ('local %d' % n) if source == _lib.SOURCE_LOCAL else '%d' % n
                res['rows'][key]['cold'] = open_once(_lib, d.socket, source, project, emu.url,
                                                     False, False)[0]
        finally:
            rc, _ = d.stop(timeout=600)
            d.notify.close()
            if rc != 0:
                print('dmcached exited with %r:\n%s' % (rc, d.log()[-4000:]), file=sys.stderr)
    report(res)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(res, f, indent=1)
    return 0


def report(res):
    print('| snapshot | prefetch | OPEN warm online p50 / max | offline p50 / max | '
          'OPEN after restart | OPEN + first item | daemon RSS open - idle |')
    print('|---|---:|---:|---:|---:|---:|---:|')
    for key, row in res['rows'].items():
        pf = res['prefetch'].get('local' if key.startswith('local') else int(key))
        off = row.get('offline')
        print('| %s items | %s | %s / %s | %s | %s | %s | %.1f MiB |' % (
            key, ms(pf) if pf is not None else '-', ms(row['online'][0]), ms(row['online'][1]),
            '%s / %s' % (ms(off[0]), ms(off[1])) if off else '-', ms(row['cold']),
            ms(row['first']), (row['rss_kib'] - res['rss_idle_kib']) / 1024))
    print('\n`dmcache get sample 0 -o x.npy` (hot, whole process): %s (target <= 20 ms)'
          % ms(res['get_process_s']))
    if 'reprove_s' in res:
        print('local folder prefetched again (every file proved again, none read): %s, '
              '%.1f us per file' % (ms(res['reprove_s']), res['reprove_s'] / res['local_n'] * 1e6))
    print('daemon restart to READY (before the OPENs after restart): %s' % ms(res['start_s']))
    print('targets (T6): OPEN of a warm snapshot of any size <= 5 ms (with the first hot '
          'batch); <= 10 ms warm and <= 1 s after a restart at 1M items; RSS <= 64 MiB '
          'beyond the hot set at 1M items')


if __name__ == '__main__':
    sys.exit(main())
