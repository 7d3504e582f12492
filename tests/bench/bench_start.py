#!/usr/bin/python3
"""Start benchmark (docs/benchmarks.md, "A daemon restart after a clean stop"): dmcached's
restart to READY=1 over a store of N blobs, with the clean-shutdown record a clean stop
leaves, against the same start without it (the record removed: the full reconciliation,
index check included), and the first OPEN of the N-item snapshot after each.

    /usr/bin/python3 tests/bench/bench_start.py --build build [--items 200000]
                                                [--item-size 64] [--reps 3]
                                                [--work-dir DIR]

Not a test: it prints figures measured in this run and never fails on speed. What runs:
the emulator's synthetic project of --items items of --item-size bytes, prefetched once
into a fresh cache (timed); then --reps rounds of: SIGTERM (timed: the stop writes the
record), start to READY with the record (its log line says how many directories it
walked), OPEN; SIGTERM, the record removed (as after kill -9), start with start_walk=0 (the
whole check before READY), OPEN; SIGTERM, the record removed, start with the default
start_walk (the rest of the check in the background), OPEN, and the time until the
background check is done. The page cache is warm
in both (the same files, read the same way); the first stop after the prefetch also
settles the 256 directories the prefetch changed (a listing against the index's rows, a
fstatat per blob).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.dirname(os.path.dirname(HERE))
TIMEOUT = 7200
KEY = 'dmc-key-all'

sys.path.append(os.path.join(SOURCE, 'tests', 'integration'))
import modload  # noqa: E402


def load(build, name, path):
    os.environ['DMC_BUILD_ROOT'] = build
    os.environ.setdefault('DMC_SOURCE_ROOT', SOURCE)
    return modload.load(name, path)


def start_line(d):
    lines = [ln for ln in d.log().splitlines()
             if 'clean start:' in ln or 'full reconciliation because' in ln]
    return lines[-1].split(': ', 2)[-1] if lines else '?'


def status(d):
    r = d.cli('status', '--json')
    return json.loads(r.stdout)['counters'] if r.returncode == 0 else {}


def timed_start(d):
    t0 = time.monotonic()
    d.start(expect_ready=False)
    if not d.notify.wait_for('READY=1', timeout=TIMEOUT, proc=d.proc):
        raise SystemExit('dmcached did not start:\n' + d.log()[-4000:])
    return time.monotonic() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--build', default=os.path.join(SOURCE, 'build'))
    ap.add_argument('--items', type=int, default=200000)
    ap.add_argument('--item-size', type=int, default=64)
    ap.add_argument('--reps', type=int, default=3)
    ap.add_argument('--work-dir', help='where the temp dir goes (default: $TMPDIR)')
    args = ap.parse_args()
    if args.items < 1 or args.item_size < 1 or args.reps < 1:
        ap.error('--items, --item-size and --reps: positive')
    build = os.path.abspath(args.build)
    sys.path.insert(0, os.path.join(build, 'client', 'python'))
    from dmcache import _lib
    integration = load(build, 'dmc_integration_conftest',
                       os.path.join(SOURCE, 'tests', 'integration', 'conftest.py'))
    emulator = load(build, 'dmc_emulator_client',
                    os.path.join(SOURCE, 'tests', 'emulator', 'client.py'))
    bench_open = load(build, 'dmc_bench_open', os.path.join(HERE, 'bench_open.py'))
    project = 'st%d' % args.items
    res = {'clean': [], 'full': [], 'walk': [], 'clean_open': [], 'full_open': [],
           'walk_open': [], 'walk_done': [], 'stop': [], 'lines': set()}
    with tempfile.TemporaryDirectory(prefix='dmc-bs-', dir=args.work_dir) as work, \
            emulator.Emulator(synthetic=['%s:%d:%d' % (project, args.items,
                                                       args.item_size)]) as emu:
        d = integration.Daemon(os.path.join(work, 'd'), start=False)
        d.env['DATAMINT_API_KEY'] = KEY
        d.env['DATAMINT_API_URL'] = emu.url
        d.start()
        try:
            t0 = time.monotonic()
            r = d.cli('prefetch', project, timeout=TIMEOUT)
            if r.returncode != 0:
                raise SystemExit('prefetch failed:\n' + r.stdout[-2000:] + r.stderr)
            print('prefetched %d items in %.1f s' % (args.items, time.monotonic() - t0),
                  file=sys.stderr)
            record = os.path.join(d.cache, 'clean-shutdown')
            base_args = list(d.args)
            for rep in range(args.reps):
                for mode in ('clean', 'full', 'walk'):
                    rc, dt = d.stop(timeout=600)
                    if rc != 0:
                        raise SystemExit('dmcached exited with %r:\n%s' % (rc, d.log()[-4000:]))
                    res['stop'].append(dt)
                    if not os.path.exists(record):
                        raise SystemExit('no clean-shutdown record:\n' + d.log()[-4000:])
                    if mode != 'clean':
                        os.unlink(record)
                    # full: the whole check before READY (start_walk=0); walk: the default,
                    # 250 ms of it, the rest in the background
                    d.args = base_args + (['-o', 'start_walk=0'] if mode == 'full' else [])
                    t0 = time.monotonic()
                    res[mode].append(timed_start(d))
                    res['lines'].add(start_line(d))
                    res[mode + '_open'].append(bench_open.open_once(
                        _lib, d.socket, _lib.SOURCE_DATAMINT, project, emu.url, False,
                        False)[0])
                    checked = ''
                    if mode == 'walk':
                        while status(d).get('cache_unchecked_dirs'):
                            time.sleep(0.02)
                        res['walk_done'].append(time.monotonic() - t0)
                        checked = ', whole check done %.2f s after the start' % (
                            res['walk_done'][-1])
                    print('round %d %s: READY in %.2f s, OPEN %.1f ms%s (%s)' % (
                        rep, mode, res[mode][-1], res[mode + '_open'][-1] * 1e3, checked,
                        start_line(d)), file=sys.stderr)
        finally:
            d.stop(timeout=600)
            d.notify.close()
    c, f = statistics.median(res['clean']), statistics.median(res['full'])
    print('| start to READY, %d blobs | median of %d | first OPEN after it |' % (
        args.items, args.reps))
    print('|---|---:|---:|')
    print('| with the clean-shutdown record | %.3f s | %.1f ms |' % (
        c, statistics.median(res['clean_open']) * 1e3))
    print('| without it (after a crash), the whole check first (start_walk=0) | %.3f s | '
          '%.1f ms |' % (f, statistics.median(res['full_open']) * 1e3))
    print('| without it, the default start_walk (250 ms), the rest in the background | '
          '%.3f s | %.1f ms |' % (statistics.median(res['walk']),
                                  statistics.median(res['walk_open']) * 1e3))
    print('ratio full / clean: %.1fx; background check done %.2f s after the start '
          '(median)' % (f / c, statistics.median(res['walk_done'])))
    print('stops (SIGTERM to exit, record written): first after the prefetch %.2f s, '
          'then median %.2f s' % (res['stop'][0], statistics.median(res['stop'][1:] or
                                                                      res['stop'])))
    print('start log lines seen: %s' % '; '.join(sorted(res['lines'])))
    return 0


if __name__ == '__main__':
    sys.exit(main())
