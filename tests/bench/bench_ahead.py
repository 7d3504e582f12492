#!/usr/bin/python3
"""A shuffled first epoch over a dataset still downloading: GETs of items ahead of the job.

    /usr/bin/python3 tests/bench/bench_ahead.py --build build [--items 400] [--latency-ms 300]
                                                [--batch 32] [--batches 4]

Not a test: it prints figures measured in this run and never fails on speed. A fresh
dmcached (the build's) with an empty cache, and the emulator with a synthetic project of
--items items of 512 bytes, each file answered after --latency-ms. A client opens the
project online (which starts the prefetch job), then GETs --batches batches of --batch
items in a shuffled order while the job runs. Printed: how long the whole prefetch took
(from the OPEN to the job's end), each batch's wait, and the ratio of the whole prefetch
to the first batch's wait: what the first batch waited before a GET could move items
ahead of the job's walk was most of the prefetch (the item furthest along in index order).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.dirname(os.path.dirname(HERE))

CLIENT = '''
import json, sys, time, random
from dmcache import _lib
c = _lib.Client(sys.argv[1])
ds = c.open(_lib.SOURCE_DATAMINT, sys.argv[2], server=sys.argv[3], api_key=sys.argv[4], raw=True)
order = list(range(ds.items))
random.Random(1).shuffle(order)
b, out = int(sys.argv[6]), []
for k in range(int(sys.argv[5])):
    t = time.monotonic()
    its = ds.get(order[k * b:(k + 1) * b])
    assert all(x.status == 0 for x in its), [_lib.item_error(x) for x in its if x.status]
    ds.release(its)
    out.append(time.monotonic() - t)
print(json.dumps(out))
'''


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--build', required=True)
    ap.add_argument('--items', type=int, default=400)
    ap.add_argument('--latency-ms', type=int, default=300)
    ap.add_argument('--batch', type=int, default=32)
    ap.add_argument('--batches', type=int, default=4)
    args = ap.parse_args()
    build = os.path.abspath(args.build)
    os.environ['DMC_BUILD_ROOT'] = build
    os.environ['DMC_SOURCE_ROOT'] = SOURCE
    sys.path.insert(0, os.path.join(SOURCE, 'tests', 'emulator'))
    sys.path.insert(0, os.path.join(SOURCE, 'tests', 'integration'))
    from conftest import Daemon  # noqa: E402
    import client as emulator  # noqa: E402

    with emulator.Emulator(synthetic=['ahead:%d:512' % args.items]) as emu:
        emu.add_fault(path='/resources/.*/file$', latency_ms=args.latency_ms)
        top = tempfile.mkdtemp(prefix='dmc-bench-ahead-', dir='/tmp')
        d = Daemon(top)
        d.env.update(DATAMINT_API_KEY=emulator.KEY_ALL, DATAMINT_API_URL=emu.url)
        env = dict(d.env, PYTHONPATH=os.path.join(build, 'client', 'python'),
                   LD_LIBRARY_PATH=os.path.join(build, 'client'))
        try:
            t0 = time.monotonic()
            r = subprocess.run(['/usr/bin/python3', '-c', CLIENT, d.socket, 'ahead', emu.url,
                                emulator.KEY_ALL, str(args.batches), str(args.batch)],
                               env=env, capture_output=True, text=True, timeout=1800)
            if r.returncode != 0:
                sys.exit('the client failed: ' + r.stderr[-2000:])
            waits = json.loads(r.stdout.splitlines()[-1])
            while json.loads(d.cli('status', '--json').stdout)['counters'].get(
                    'prefetch_jobs', 0):
                time.sleep(0.05)
            whole = time.monotonic() - t0
        finally:
            d.stop()
    print('%d items, %d ms per file: the whole prefetch took %.2f s' %
          (args.items, args.latency_ms, whole))
    print('batches of %d shuffled items while it ran: %s s' %
          (args.batch, ', '.join('%.3f' % w for w in waits)))
    print('the whole prefetch / the first batch\'s wait: %.1fx' % (whole / waits[0]))


if __name__ == '__main__':
    main()
