"""The generated corpus is complete, matches its manifest, and decodes to what the manifest
says with independent readers (GDCM, Pillow, nibabel)."""
import collections
import gzip
import hashlib
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

warnings.filterwarnings('ignore')
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'emulator'))
from client import corpus_dir  # noqa: E402


@pytest.fixture(scope='module')
def corpus():
    d = corpus_dir()
    with open(os.path.join(d, 'manifest.json')) as f:
        return d, json.load(f)


def digest(arr, dtype):
    return hashlib.sha256(np.ascontiguousarray(arr, dtype=np.dtype(dtype).newbyteorder('<')).tobytes()).hexdigest()


def read(d, e):
    with open(os.path.join(d, e['path']), 'rb') as f:
        return f.read()


def test_manifest_matches_files(corpus):
    d, man = corpus
    assert set(man['projects']) >= {'sample', 'pydicom', 'ct', 'formats', 'bad'}
    total = 0
    for e in man['files']:
        data = read(d, e)
        assert len(data) == e['size'] and hashlib.sha256(data).hexdigest() == e['sha256'], e['path']
        total += len(data)
    assert total < 200e6
    keys = json.load(open(os.path.join(d, 'keys.json')))
    assert keys['admin_key'] and {k['key'] for k in keys['keys']} >= {'dmc-key-all', 'dmc-key-sample'}
    for name in man['projects']:
        p = json.load(open(os.path.join(d, 'projects', name, 'project.json')))
        files = {e['path'] for e in man['files']}
        for r in p['resources']:
            assert os.path.join('projects', name, r['file']) in files
            for a in r['annotations']:
                if a.get('file'):
                    assert os.path.join('projects', name, a['file']) in files
    sample = json.load(open(os.path.join(d, 'projects', 'sample', 'project.json')))
    assert 15 <= len(sample['resources']) <= 25
    kinds = collections.Counter(r['mimetype'] for r in sample['resources'])
    assert set(kinds) == {'application/dicom', 'image/png', 'image/jpeg', 'application/nifti'}
    segs = [a for r in sample['resources'] for a in r['annotations'] if a['type'] == 'segmentation']
    assert len(segs) >= 3


def test_every_pydicom_test_file_is_there(corpus):
    import pydicom.data
    d, man = corpus
    base = os.path.dirname(pydicom.data.get_testdata_file('CT_small.dcm'))
    ours = {e['source'].split(':', 1)[1] for e in man['files'] if e['project'] == 'pydicom'}
    for dp, _, fs in os.walk(base):
        for f in fs:
            rel = os.path.relpath(os.path.join(dp, f), os.path.dirname(base))
            if f.endswith('.dcm') or ('/dicomdirtests/' in '/' + rel and '.' not in f):
                assert rel in ours, rel
    syntaxes = {e.get('transfer_syntax') for e in man['files'] if e['project'] == 'pydicom'}
    for ts in ('1.2.840.10008.1.2', '1.2.840.10008.1.2.1', '1.2.840.10008.1.2.2',
               '1.2.840.10008.1.2.1.99', '1.2.840.10008.1.2.5', '1.2.840.10008.1.2.4.50',
               '1.2.840.10008.1.2.4.51', '1.2.840.10008.1.2.4.70', '1.2.840.10008.1.2.4.80',
               '1.2.840.10008.1.2.4.90', '1.2.840.10008.1.2.4.91'):
        assert ts in syntaxes, ts
    assert any(e.get('shape', [1])[0] > 1 for e in man['files'] if e['project'] == 'pydicom')
    assert any('pydicom_decode_error' in e or 'pydicom_error' in e or 'header_error' in e
               for e in man['files'] if e['project'] == 'pydicom')


def test_ct_series_decode_bit_exact_with_gdcm(corpus):
    import gdcm
    gdcm.Trace.WarningOff()
    d, man = corpus
    ct = [e for e in man['files'] if e['project'] == 'ct']
    assert len(ct) == 2 * 6 * 6
    assert collections.Counter(e['transfer_syntax'] for e in ct) == collections.Counter(
        {ts: 12 for ts in ('1.2.840.10008.1.2.1', '1.2.840.10008.1.2', '1.2.840.10008.1.2.5',
                           '1.2.840.10008.1.2.4.70', '1.2.840.10008.1.2.4.80',
                           '1.2.840.10008.1.2.4.90')})
    for e in ct + [x for x in man['files'] if x['project'] == 'sample' and x.get('format') == 'dicom'
                   and x.get('pixels_sha256') and 'source' not in x]:
        r = gdcm.ImageReader()
        r.SetFileName(os.path.join(d, e['path']))
        assert r.Read(), e['path']
        img = r.GetImage()
        buf = img.GetBuffer().encode('utf-8', 'surrogateescape')
        arr = np.frombuffer(buf, dtype=e['dtype']).reshape(e['shape'])
        assert digest(arr, e['dtype']) == e['pixels_sha256'], e['path']


def test_png_and_nifti_decode_exactly(corpus):
    import nibabel as nib
    from PIL import Image
    d, man = corpus
    checked = 0
    for e in man['files']:
        if e.get('format') == 'png' and e.get('compare') == 'exact':
            if e['png_bit_depth'] == 16 and e['shape'][1] > 1:
                continue  # Pillow 9 cannot hold 16-bit colour without converting it
            im = Image.open(os.path.join(d, e['path']))
            a = np.asarray(im)
            if im.mode == '1':
                a = a.astype(np.uint8)
            elif e['png_color_type'] == 0 and e['png_bit_depth'] in (2, 4):
                a = a // (255 // ((1 << e['png_bit_depth']) - 1))  # Pillow scales to 8 bits
            a = a[None, None] if a.ndim == 2 else a.transpose(2, 0, 1)[None]
            assert list(a.shape) == e['shape'], e['path']
            assert digest(a, e['dtype']) == e['pixels_sha256'], e['path']
            checked += 1
        elif e.get('format', '').startswith('nifti') and e.get('valid') and e.get('pixels_sha256'):
            img = nib.load(os.path.join(d, e['path']))
            a = np.asanyarray(img.dataobj.get_unscaled())
            assert str(a.dtype) == e['dtype'], e['path']
            a = a.transpose(2, 1, 0)[:, None]
            assert list(a.shape) == e['shape'] and digest(a, e['dtype']) == e['pixels_sha256']
            slope, inter = img.dataobj.slope, img.dataobj.inter
            if e.get('scl_slope') is not None:
                assert (slope, inter) == (e['scl_slope'], e['scl_inter'])
            checked += 1
        elif e.get('format') == 'jpeg' and e.get('compare') == 'psnr':
            a = np.asarray(Image.open(os.path.join(d, e['path'])))
            a = a[None, None] if a.ndim == 2 else a.transpose(2, 0, 1)[None]
            assert list(a.shape) == e['shape'] and digest(a, 'uint8') == e['pixels_sha256']
            checked += 1
    assert checked >= 50


def test_bad_inputs_are_what_they_claim(corpus):
    import nibabel as nib
    from PIL import Image
    d, man = corpus
    bad = {os.path.basename(e['path']): e for e in man['files'] if e['project'] == 'bad'}
    assert all(e['bad'] and e['expect'] for e in bad.values())
    for ext in ('dcm', 'png', 'jpg', 'nii', 'nii.gz'):
        assert 'truncated.%s' % ext in bad or 'truncated_ct.%s' % ext in bad
    with pytest.raises(Image.DecompressionBombError):
        Image.open(os.path.join(d, bad['huge_65500.jpg']['path']))
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        assert Image.open(os.path.join(d, bad['huge_65500.jpg']['path'])).size == (65500, 65500)
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    assert bad['huge_65500.jpg']['size'] < 20000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(os.path.join(d, bad['huge_1e6.png']['path']))
    assert bad['huge_dims.nii']['size'] == 377
    hdr = nib.Nifti1Header.from_fileobj(open(os.path.join(d, bad['huge_dims.nii']['path']), 'rb'))
    assert tuple(hdr['dim'][:4]) == (3, 32767, 32767, 32767)
    bomb = bad['bomb.nii.gz']
    assert bomb['inflated_size'] / bomb['size'] > 500
    with gzip.open(os.path.join(d, bomb['path'])) as f:
        assert len(f.read(1 << 16)) == 1 << 16
    assert bad['many_scans.jpg']['scans'] > 100
    assert read(d, bad['many_scans.jpg']).count(b'\xff\xda') == bad['many_scans.jpg']['scans']
    for name in ('truncated.png', 'bad_magic.png', 'bad_crc.png'):
        with pytest.raises(Exception):
            Image.open(os.path.join(d, bad[name]['path'])).load()
    with pytest.raises(Exception):
        nib.load(os.path.join(d, bad['bad_magic.nii']['path'])).get_fdata()
    import pydicom
    ds = pydicom.dcmread(os.path.join(d, bad['huge_frames_ul.dcm']['path']))
    assert ds['Rows'].VR == 'UL' and int(ds.NumberOfFrames) == 1 << 31


def test_generation_is_deterministic(corpus, tmp_path):
    d, man = corpus
    out = tmp_path / 'again'
    r = subprocess.run(['/usr/bin/python3', os.path.join(HERE, 'gen_corpus.py'), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.load(open(out / 'manifest.json'))
    assert again == man
