#!/usr/bin/python3
"""Decode benchmark (docs/benchmarks.md T5): items/s per format and transfer syntax, one run.

For each input kind it measures, in the same run and on one core each:
  ours      dmcache's decoders in-process (probe + decode into a reused buffer)
  pool      the same through the sandboxed worker pool (one worker, one job at a time)
  bare tj   a bare TurboJPEG loop (JPEG inputs): the T5 target is ours >= 0.9 of it
  gdcm      GDCM called directly (ImageReader + GetBuffer) (DICOM inputs)
  ref       what users run today: pydicom pixel_array (DICOM), Pillow (PNG, JPEG),
            nibabel get_fdata/dataobj (NIfTI)
  zstd-1    decompressing the decoded tensor with zstd level 1: the caching policy
            (decode.h) keeps the tensor of a lossless codec when decoding costs >= 2x this
and prints a table of items/s with the ratios. Each figure is the best of 3 runs of
--seconds (interference on a shared VM only ever slows a run down). Not a test; figures
vary between runs, ratios measured in one run are what to compare.

  /usr/bin/python3 tests/bench/bench_decode.py --build BUILD [--seconds 0.5] [--json OUT]
  ninja -C BUILD bench-decode
"""
import argparse
import gzip
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
from PIL import Image

warnings.simplefilter('ignore')
N_FILES = 6  # distinct inputs per kind, cycled


def ct_slices(tmp, n):
    base = pydicom.dcmread(pydicom.data.get_testdata_file('CT_small.dcm'))
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        a = np.kron(base.pixel_array, np.ones((4, 4), np.int16))
        a = (a + rng.normal(0, 12, a.shape)).astype(np.int16)
        ds = pydicom.dcmread(pydicom.data.get_testdata_file('CT_small.dcm'))
        ds.Rows = ds.Columns = 512
        ds.PixelData = a.tobytes()
        p = os.path.join(tmp, 'ct%d.dcm' % i)
        ds.save_as(p, write_like_original=False)
        paths.append(p)
    return paths


def photo(i, h=512, w=512):
    """1/f-like noise RGB, as the JPEG figures of tests/bench/README.md use."""
    rng = np.random.default_rng(100 + i)
    f = np.fft.fftfreq(h)[:, None] ** 2 + np.fft.fftfreq(w)[None, :] ** 2
    f[0, 0] = 1
    chans = []
    for _ in range(3):
        spec = (rng.normal(size=(h, w)) + 1j * rng.normal(size=(h, w))) / f ** 0.6
        c = np.real(np.fft.ifft2(spec))
        chans.append((c - c.min()) / (c.max() - c.min()) * 255)
    return np.stack(chans, -1).astype(np.uint8)


def make_inputs(tmp):
    kinds = {}
    ct = ct_slices(tmp, N_FILES)
    kinds['DICOM CT raw (.1.2.1)'] = ct
    dfl = []
    for i, p in enumerate(ct):
        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
        q = os.path.join(tmp, 'dfl%d.dcm' % i)
        ds.save_as(q, write_like_original=False)
        dfl.append(q)
    kinds['DICOM CT deflate (.1.2.1.99)'] = dfl
    for flag, name in [('-R', 'RLE (.5)'), ('-J', 'JPEG lossless (.4.70)'),
                       ('-L', 'JPEG-LS (.4.80)'), ('-K', 'JPEG 2000 (.4.90)')]:
        out = []
        for i, p in enumerate(ct):
            q = os.path.join(tmp, '%s%d.dcm' % (flag[1], i))
            subprocess.run(['gdcmconv', flag, p, q], check=True, capture_output=True)
            out.append(q)
        kinds['DICOM CT ' + name] = out
    rgb_dcm, jpgs, grays, pngs, png16 = [], [], [], [], []
    tmpl = pydicom.dcmread(pydicom.data.get_testdata_file('SC_rgb_rle.dcm'))
    tmpl.decompress()
    for i in range(N_FILES):
        img = photo(i)
        b = io.BytesIO()
        Image.fromarray(img).save(b, 'JPEG', quality=90)
        p = os.path.join(tmp, 'p%d.jpg' % i)
        open(p, 'wb').write(b.getvalue())
        jpgs.append(p)
        p = os.path.join(tmp, 'g%d.jpg' % i)
        Image.fromarray(img[:, :, 0]).save(p, 'JPEG', quality=90)
        grays.append(p)
        p = os.path.join(tmp, 'p%d.png' % i)
        Image.fromarray(img).save(p, 'PNG')
        pngs.append(p)
        p = os.path.join(tmp, 'g%d.png' % i)
        Image.fromarray((img[:, :, 0].astype(np.uint16) * 257), 'I;16').save(p, 'PNG')
        png16.append(p)
        ds = tmpl.copy()
        ds.Rows = ds.Columns = 512
        ds.PixelData = img.tobytes()
        raw = os.path.join(tmp, 'rgb%d.dcm' % i)
        ds.save_as(raw, write_like_original=False)
        q = os.path.join(tmp, 'rgbj%d.dcm' % i)
        subprocess.run(['gdcmconv', '--lossy', '-J', '-q', '90', raw, q], check=True,
                       capture_output=True)
        rgb_dcm.append(q)
    kinds['DICOM RGB JPEG baseline (.4.50)'] = rgb_dcm
    # 12-bit JPEG extended: pydicom's own 1024x256 test file (gdcmconv cannot write one).
    kinds['DICOM 12-bit JPEG extended (.4.51)'] = [
        pydicom.data.get_testdata_file('JPGExtended.dcm')]
    kinds['JPEG RGB 512x512 q90'] = jpgs
    kinds['JPEG gray 512x512 q90'] = grays
    kinds['PNG RGB8 512x512'] = pngs
    kinds['PNG gray16 512x512'] = png16
    nii, niigz = [], []
    for i in range(2):
        rng = np.random.default_rng(200 + i)
        v = (np.kron(rng.integers(-1000, 1000, (32, 32, 8)), np.ones((8, 8, 8))) +
             rng.normal(0, 10, (256, 256, 64))).astype(np.int16)
        p = os.path.join(tmp, 'v%d.nii' % i)
        nib.save(nib.Nifti1Image(v, np.eye(4)), p)
        nii.append(p)
        q = p + '.gz'
        open(q, 'wb').write(gzip.compress(open(p, 'rb').read(), 6))
        niigz.append(q)
    kinds['NIfTI 256x256x64 int16 .nii'] = nii
    kinds['NIfTI 256x256x64 int16 .nii.gz'] = niigz
    return kinds


REPS = 3


def helper(h, mode, seconds, files):
    """Best of REPS runs: on a shared VM interference only ever slows a run down."""
    best = None
    for _ in range(REPS):
        r = subprocess.run([h, mode, str(seconds)] + files, capture_output=True, text=True)
        if r.returncode != 0:
            return None
        j = json.loads(r.stdout)
        if best is None or j['per_s'] > best['per_s']:
            best = j
    return best


def reference(kind, seconds, files):
    """pydicom / Pillow / nibabel over in-memory bytes, items/s."""
    data = [open(f, 'rb').read() for f in files]
    if kind.startswith('DICOM'):
        def one(b):
            return pydicom.dcmread(io.BytesIO(b)).pixel_array
    elif kind.startswith(('JPEG', 'PNG')):
        def one(b):
            return np.array(Image.open(io.BytesIO(b)))
    else:
        def one(b):
            fh = nib.FileHolder(fileobj=io.BytesIO(b))
            img = nib.Nifti1Image.from_file_map({'header': fh, 'image': fh})
            return np.asanyarray(img.dataobj)
    try:
        one(data[0])
    except Exception as e:  # noqa: BLE001
        return None, type(e).__name__
    best = 0
    for _ in range(REPS):
        n = 0
        t0 = time.perf_counter()
        while True:
            one(data[n % len(data)])
            n += 1
            t = time.perf_counter() - t0
            if t >= seconds:
                break
        best = max(best, n / t)
    return best, None


def kind_is_lossy(kind):
    """Lossy codecs: their tensors are 5-10x the file, so they are decoded on the fly."""
    return 'baseline' in kind or 'extended' in kind or kind.startswith('JPEG ')


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--build', required=True)
    ap.add_argument('--seconds', type=float, default=0.5)
    ap.add_argument('--json')
    a = ap.parse_args()
    h = os.path.join(a.build, 'tests', 'decode', 'bench_decode_helper')
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        kinds = make_inputs(tmp)
        for kind, files in kinds.items():
            r = {'kind': kind}
            ours = helper(h, 'ours', a.seconds, files)
            r['ours'] = ours['per_s'] if ours else None
            r['bytes'] = ours['bytes'] if ours else None
            pool = helper(h, 'pool', a.seconds, files)
            r['pool'] = pool['per_s'] if pool else None
            if 'JPEG' in kind and 'DICOM' not in kind:
                t = helper(h, 'tj', a.seconds, files)
                r['tj'] = t['per_s'] if t else None
            if kind.startswith('DICOM'):
                g = helper(h, 'gdcm', a.seconds, files)
                r['gdcm'] = g['per_s'] if g else None
            if kind.endswith('.nii.gz'):
                # nibabel on .nii.gz: gunzip, then the same array read
                why = None
                gz = [open(f, 'rb').read() for f in files]
                ref = 0
                for _ in range(REPS):
                    n, t0 = 0, time.perf_counter()
                    while time.perf_counter() - t0 < a.seconds:
                        fh = nib.FileHolder(fileobj=io.BytesIO(gzip.decompress(gz[n % len(gz)])))
                        np.asanyarray(nib.Nifti1Image.from_file_map(
                            {'header': fh, 'image': fh}).dataobj)
                        n += 1
                    ref = max(ref, n / (time.perf_counter() - t0))
            else:
                ref, why = reference(kind, a.seconds, files)
            r['ref'] = ref
            r['ref_error'] = why
            z = helper(h, 'zstd', a.seconds, files)
            r['zstd'] = z['per_s'] if z else None
            r['zstd_ratio'] = z['zstd_ratio'] if z else None
            rows.append(r)
            print('.', end='', file=sys.stderr, flush=True)
    print(file=sys.stderr)

    def f(v):
        return '-' if v is None else ('%.0f' % v if v >= 10 else '%.1f' % v)

    def ratio(x, y):
        return '-' if not x or not y else '%.2f' % (x / y)
    print('| input | ours | pool | bare TurboJPEG | GDCM direct | reference | zstd-1 of tensor |'
          ' ours/TJ | ours/GDCM | ours/ref | zstd vs decode | store tensor |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        refname = 'pydicom' if r['kind'].startswith('DICOM') else (
            'nibabel' if 'NIfTI' in r['kind'] else 'Pillow')
        ref = f(r['ref']) + ' (%s)' % refname if r['ref'] else 'fails (%s)' % r['ref_error']
        cost = ratio(r.get('zstd'), r.get('ours'))
        lossy = kind_is_lossy(r['kind'])
        store = '-' if cost == '-' else ('yes' if float(cost) >= 2 and not lossy else 'no')
        print('| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |' % (
            r['kind'], f(r['ours']), f(r['pool']), f(r.get('tj')), f(r.get('gdcm')), ref,
            f(r['zstd']), ratio(r['ours'], r.get('tj')), ratio(r['ours'], r.get('gdcm')),
            ratio(r['ours'], r['ref']), cost, store))
    print('\nitems/s on one core (best of %d runs of %.1f s); "zstd vs decode" = zstd-1 '
          'decompressions per decode of the same tensor; store tensor = lossless codec and '
          'zstd vs decode >= 2 (decode.h).' % (REPS, a.seconds))
    if a.json:
        json.dump(rows, open(a.json, 'w'), indent=1)


if __name__ == '__main__':
    main()
