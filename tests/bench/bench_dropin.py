#!/usr/bin/python3
"""The drop-in path against the Datamint client's, in the client's own usage.

    /usr/bin/python3 tests/bench/bench_dropin.py --build build [--items 1000]
        [--compressed 240] [--reps 3] [--quick] [--first-only] [--only uncompressed]
        [--read-bytes]

Not a test: it prints figures and ratios measured in the same run (docs/benchmarks.md,
"The drop-in path") and never fails on speed. Both sides run in the DataLoader of the
client's user guide: `DataLoader(ds, batch_size=8, num_workers=2, shuffle=True)`, workers
restarted every epoch (persistent_workers=False, the default), items collated as a list
(ct mixes dtypes; the collation costs both sides the same).

  client    the Datamint client's Dataset approximated: __getitem__ does what the client's
            does for a downloaded DICOM (pydicom.dcmread of the file, pixel_array, shaped
            (frames, C, H, W), uint16 min-max scaled to uint8 then float32 / 255, uint8
            float32 / 255, other dtypes unchanged), lets the pixel data go (PixelData
            None, as the client does once the image is decoded) and returns (image, dicom,
            metainfo) as the client of the user guide does (dicom: the pydicom Dataset it
            read)
  dmcache   dmcache.Dataset(root=, dataset_name=) over the same folder, prefetched by a
            fresh dmcached, with its defaults (the guide's (image, dicom, metainfo))

  data      --items uncompressed CT-like 512x512 int16 slices (tests/bench/bench_serve.py's
            folder), and --compressed slices of the same kind converted by gdcmconv, a
            quarter each to JPEG-LS, JPEG 2000, RLE and JPEG lossless
  warm      epochs after a warm-up epoch (the daemon's cache warm, the files in the page
            cache): median of --reps, per data set
  first     the first epoch: the client's first pass over freshly written files against
            dmcache.Dataset's first epoch on a fresh daemon with an empty cache (median of
            --reps such pairs, each pair run back to back), right
            after `dmcache prefetch --decode --source` (every item decoded ahead: the
            tensors left in the daemon's memory, the compressed ones also stored);
            --first-only measures these alone, --only one data set
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.dirname(os.path.dirname(HERE))
BATCH = 8
SYNTAXES = (('jpegls', '-L'), ('j2k', '-K'), ('rle', '-R'), ('jpeg', '-J'))

sys.path.insert(0, HERE)
from bench_serve import load_integration, make_folders, prefetch  # noqa: E402


class ClientLike:
    """What the Datamint client's Dataset.__getitem__ does with a downloaded DICOM file."""

    def __init__(self, paths, records):
        self.paths = paths
        self.records = records

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import numpy as np
        import pydicom
        import torch
        ds = pydicom.dcmread(self.paths[i])
        a = ds.pixel_array
        n = int(getattr(ds, 'NumberOfFrames', 1) or 1)
        c = int(getattr(ds, 'SamplesPerPixel', 1) or 1)
        if a.ndim == 2:
            a = a.reshape(1, 1, *a.shape)
        elif a.ndim == 3:
            a = a.reshape(n, 1, *a.shape[1:]) if (a.shape[0] == 1 or n > 1) else \
                a.transpose(2, 0, 1)[None]
        elif a.ndim == 4:
            a = a.transpose(0, 3, 1, 2)
        if c > 1 and a.ndim == 4 and a.shape[1] != c:
            raise ValueError('unexpected shape %r' % (a.shape,))
        if a.dtype == np.uint16:
            lo, hi = int(a.min()), int(a.max())
            a = ((a.astype(np.float32) - lo) / max(hi - lo, 1) * 255).astype(np.uint8)
        x = torch.from_numpy(np.ascontiguousarray(a))
        if x.dtype == torch.uint8:
            x = x.to(torch.float32) / 255
        # the client lets the pixel data go once the image is decoded (the decoded array
        # too): it does not travel with the dicom to the main process
        ds._pixel_array = None
        ds.PixelData = None
        return x, ds, self.records[i]


def as_list(batch):
    return batch


# --read-bytes: the loop reads every byte of every image (stacks each batch's images, as
# default_collate or a copy to the GPU would), not only its shape
READ_BYTES = False


def epoch(loader):
    import torch
    t0 = time.monotonic()
    n = 0
    for b in loader:
        n += len(b)
        for item in b:
            item[0].shape
        if READ_BYTES:
            torch.stack([item[0] for item in b])
    return n / (time.monotonic() - t0)


def dataloader(torch, ds, seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=2, shuffle=True,
                                       collate_fn=as_list, generator=g)


def compress(folder, out, n):
    """n slices of `folder` converted by gdcmconv, a quarter per syntax, as a dataset folder."""
    with open(os.path.join(folder, 'dataset.json')) as f:
        meta = json.load(f)
    os.makedirs(os.path.join(out, 'images'))
    resources = []
    for i, r in enumerate(meta['resources'][:n]):
        name, flag = SYNTAXES[i % len(SYNTAXES)]
        rel = 'images/%s-%05d.dcm' % (name, i)
        subprocess.run(['gdcmconv', flag, os.path.join(folder, r['file']),
                        os.path.join(out, rel)], check=True, capture_output=True)
        resources.append(dict(r, id='c-%05d' % i, file=rel, filename=os.path.basename(rel)))
    with open(os.path.join(out, 'dataset.json'), 'w') as f:
        json.dump(dict(meta, name='bench-compressed', resources=resources), f)


def records(folder):
    with open(os.path.join(folder, 'dataset.json')) as f:
        res = json.load(f)['resources']
    return [os.path.join(folder, r['file']) for r in res], \
        [{k: v for k, v in r.items() if k != 'annotations'} for r in res]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--build', default=os.path.join(SOURCE, 'build'))
    ap.add_argument('--items', type=int, default=1000, help='uncompressed slices')
    ap.add_argument('--compressed', type=int, default=240, help='compressed slices')
    ap.add_argument('--reps', type=int, default=3)
    ap.add_argument('--quick', action='store_true', help='a smoke run: 96/48 items, 1 rep')
    ap.add_argument('--first-only', action='store_true',
                    help='measure only the first epochs (no warm epochs)')
    ap.add_argument('--only', choices=('uncompressed', 'compressed'),
                    help='measure only this data set')
    ap.add_argument('--read-bytes', action='store_true',
                    help="the loop stacks each batch's images (reads every byte), as "
                    'default_collate or a copy to the GPU would')
    ap.add_argument('--json', help='also write the results here')
    args = ap.parse_args()
    global READ_BYTES
    READ_BYTES = args.read_bytes
    if args.quick:
        args.items, args.compressed, args.reps = 96, 48, 1
    if args.items < 64 or args.compressed < 8 or args.reps < 1:
        ap.error('--items >= 64, --compressed >= 8, --reps >= 1')
    build = os.path.abspath(args.build)
    sys.path.insert(0, os.path.join(build, 'client', 'python'))
    os.environ.setdefault('LD_LIBRARY_PATH', os.path.join(build, 'client'))
    import torch
    import dmcache
    integration = load_integration(build)
    res = {'items': args.items, 'compressed': args.compressed, 'reps': args.reps,
           'read_bytes': args.read_bytes,
           'loadavg_start': os.getloadavg()}

    def log(s):
        print('%s  %s' % (time.strftime('%H:%M:%S'), s), file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix='dmc-bdi-') as work:
        folder, _hot, _paths = make_folders(work, args.items)
        comp = os.path.join(work, 'datasets', 'compressed')
        if args.only != 'uncompressed':
            compress(folder, comp, args.compressed)
        sets = tuple(s for s in (('uncompressed', folder), ('compressed', comp))
                     if args.only in (None, s[0]))
        log('data written')
        for name, path in sets:
            paths, recs = records(path)
            r = res[name] = {}
            r['client_firsts'], r['dmcache_firsts'], r['prefetch_decode_ss'] = [], [], []
            for rep in range(args.reps):  # each pair close in time: the load changes
                # the client's first pass: the files were just written (page cache warm,
                # as right after the client's download); nothing else is cached
                r['client_firsts'].append(
                    epoch(dataloader(torch, ClientLike(paths, recs), rep)))
                # dmcache's first epoch: a fresh daemon, an empty cache, prefetch --decode
                d = integration.Daemon(os.path.join(work, 'first-%s-%d' % (name, rep)),
                                       start=False)
                d.args.remove('-v')
                d.start()
                try:
                    t0 = time.monotonic()
                    rr = d.cli('prefetch', '--decode', '--source', path, timeout=1800)
                    if rr.returncode != 0:
                        raise SystemExit('prefetch --decode failed: %s' % rr.stderr)
                    r['prefetch_decode_ss'].append(time.monotonic() - t0)
                    os.environ['DMCACHE_SOCKET'] = d.socket
                    r['dmcache_firsts'].append(epoch(dataloader(torch, dmcache.Dataset(
                        root=os.path.dirname(path), dataset_name=os.path.basename(path)), rep)))
                finally:
                    d.stop()
                    shutil.rmtree(d.dir, ignore_errors=True)
            r['client_first'] = statistics.median(r['client_firsts'])
            r['dmcache_first'] = statistics.median(r['dmcache_firsts'])
            r['prefetch_decode_s'] = statistics.median(r['prefetch_decode_ss'])
            log('%s: first epochs measured' % name)
            if args.first_only:
                continue
            # warm epochs: a daemon that prefetched the folder, each side warmed once
            d = integration.Daemon(os.path.join(work, 'warm-' + name), start=False)
            d.args.remove('-v')
            d.start()
            try:
                prefetch(d, path)
                os.environ['DMCACHE_SOCKET'] = d.socket
                make = {
                    'client': lambda: ClientLike(paths, recs),
                    'dmcache': lambda: dmcache.Dataset(root=os.path.dirname(path),
                                                       dataset_name=os.path.basename(path)),
                }
                for side in make:
                    epoch(dataloader(torch, make[side](), 1))
                    r[side] = []
                for rep in range(args.reps):  # interleaved: the load changes over time
                    for side in make:
                        r[side].append(epoch(dataloader(torch, make[side](), 2 + rep)))
            finally:
                d.stop()
            log('%s: warm epochs measured' % name)
    res['loadavg_end'] = os.getloadavg()
    print(json.dumps(res, indent=1))
    print()
    print('| %d + %d slices, DataLoader(batch_size=8, num_workers=2, shuffle=True)%s '
          '| client | dmcache.Dataset | ratio | target |'
          % (args.items, args.compressed, ', every byte read' if args.read_bytes else ''))
    print('|---|---:|---:|---:|---|')
    for name, _ in sets:
        r = res[name]
        if not args.first_only:
            c, m = statistics.median(r['client']), statistics.median(r['dmcache'])
            print('| %s, warm epochs (median of %d) | %.0f items/s | %.0f items/s | %.2fx | '
                  '>= 3x: %s |' % (name, args.reps, c, m, m / c,
                                   'met' if m >= 3 * c else 'not met'))
        c, m = r['client_first'], r['dmcache_first']
        print('| %s, first epoch (median of %d; dmcache after `prefetch --decode`, %.1f s) | '
              '%.0f items/s | %.0f items/s | %.2fx | >= 1x: %s |'
              % (name, args.reps, r['prefetch_decode_s'], c, m, m / c,
                 'met' if m >= c else 'not met'))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(res, f, indent=1)


if __name__ == '__main__':
    main()
