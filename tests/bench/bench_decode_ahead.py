#!/usr/bin/python3
"""The first epoch after `dmcache prefetch` against after `dmcache prefetch --decode`.

    /usr/bin/python3 tests/bench/bench_decode_ahead.py --build build [--project ct] [--reps 3]

Not a test: it prints figures measured in this run and never fails on speed. For each of
--reps rounds, each way (plain, --decode) and each reader: a fresh dmcached (the build's,
notice level) with an empty cache in the temp dir, `dmcache prefetch [--decode] PROJECT`
from the emulator on the test corpus (timed), then one epoch over the snapshot, timed,
with either (a) `dmcache.Dataset` in a `torch.utils.data.DataLoader(batch_size=None,
num_workers=0)` (in-process: the workers' start-up would dominate an epoch of 72 items)
or (b) `dmcache.Loader(batch_size=8, collate='list')` (ct mixes int16 and uint16 items).
Medians of the rounds; the ratio is --decode over plain, measured in the same run.
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
KEY = 'dmc-key-all'

sys.path.insert(0, HERE)
from bench_open import load  # noqa: E402


def epoch_dataset(dmcache, torch, d, emu, project):
    ds = dmcache.Dataset(dataset_name=project, api_key=KEY, server_url=emu.url,
                         socket=d.socket)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0,
                                     collate_fn=lambda x: x)
    t0 = time.monotonic()
    n = sum(1 for _ in dl)
    return n / (time.monotonic() - t0)


def epoch_loader(dmcache, d, emu, project):
    ld = dmcache.Loader(project, batch_size=8, collate='list', api_key=KEY, server_url=emu.url,
                        socket=d.socket)
    t0 = time.monotonic()
    n = 0
    for batch in ld:
        x = batch['image'] if isinstance(batch, dict) else batch[0]
        n += len(x)
    return n / (time.monotonic() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--build', required=True)
    ap.add_argument('--project', default='ct')
    ap.add_argument('--reps', type=int, default=3)
    args = ap.parse_args()
    build = os.path.abspath(args.build)
    sys.path.insert(0, os.path.join(build, 'client', 'python'))
    os.environ.setdefault('LD_LIBRARY_PATH', os.path.join(build, 'client'))
    import torch
    import dmcache
    integration = load(build, 'dmc_integration_conftest',
                       os.path.join(SOURCE, 'tests', 'integration', 'conftest.py'))
    emulator = load(build, 'dmc_emulator_client',
                    os.path.join(SOURCE, 'tests', 'emulator', 'client.py'))
    res = {w: {'prefetch_s': [], 'dataset': [], 'loader': []} for w in ('plain', 'decode')}
    with tempfile.TemporaryDirectory(prefix='dmc-bd-') as work, emulator.Emulator() as emu:
        for rnd in range(args.reps):
            for way in ('plain', 'decode'):
                for reader in ('dataset', 'loader'):
                    d = integration.Daemon(os.path.join(work, '%s-%s%d' % (way, reader, rnd)),
                                           start=False)
                    d.args.remove('-v')
                    d.env.update(DATAMINT_API_KEY=KEY, DATAMINT_API_URL=emu.url)
                    d.start()
                    try:
                        t0 = time.monotonic()
                        r = d.cli('prefetch', *(['--decode'] if way == 'decode' else []),
                                  args.project, timeout=600)
                        if r.returncode != 0:
                            raise SystemExit('prefetch failed: %s' % r.stderr)
                        res[way]['prefetch_s'].append(time.monotonic() - t0)
                        if reader == 'dataset':
                            res[way][reader].append(epoch_dataset(dmcache, torch, d, emu,
                                                                  args.project))
                        else:
                            res[way][reader].append(epoch_loader(dmcache, d, emu,
                                                                 args.project))
                    finally:
                        d.stop()
    med = {w: {k: statistics.median(v) for k, v in r.items()} for w, r in res.items()}
    print(json.dumps({'project': args.project, 'reps': args.reps, 'median': med,
                      'runs': res}, indent=1))
    for k, name in (('dataset', 'Dataset + DataLoader(num_workers=0)'),
                    ('loader', "Loader(batch_size=8, collate='list')")):
        print('%-45s first epoch: %.0f items/s plain, %.0f items/s after --decode (%.2fx)'
              % (name, med['plain'][k], med['decode'][k], med['decode'][k] / med['plain'][k]))
    print('prefetch: %.2f s plain, %.2f s with --decode' % (med['plain']['prefetch_s'],
                                                           med['decode']['prefetch_s']))


if __name__ == '__main__':
    main()
