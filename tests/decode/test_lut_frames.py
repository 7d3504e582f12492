"""The DICOM Modality LUT Sequence and single-frame decoding, against pydicom and nibabel.

dmcache-decode (in-process, and through the sandboxed worker pool with --pool) with --lut
must give what pydicom's apply_modality_lut gives on pydicom's pixel_array: 8- and 16-bit
LUTs, unsigned and signed pixel data (the first mapped value is then signed), LUT Data as
OW and as US, explicit and implicit VR, a descriptor of 0 entries (65536), values below and
above the mapped range. A LUT that lies about its length, has no data or entries of an
impossible size fails with decode_failed, never a crash, and only when --lut asks for it.

--frame N (DECODE_F_FRAME) of a multi-frame DICOM and of a 4-D NIfTI volume, through the
pool, must equal frame N of pydicom's and nibabel's arrays.
"""
import json
import os
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixel_data_handlers.util import apply_modality_lut
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian

BUILD = os.environ.get('DMC_BUILD_ROOT', os.path.join(os.path.dirname(__file__), '..', '..', 'build'))
TOOL = os.path.join(BUILD, 'daemon', 'dmcache-decode')
EXIT_DECODE = 4
TOOL_ENV = dict(os.environ)
TOOL_ENV.setdefault('LSAN_OPTIONS', 'suppressions=' + os.path.join(os.path.dirname(
    os.path.abspath(__file__)), 'lsan.supp'))


def run(path, tmp, *opts, pool=False):
    out = os.path.join(tmp, 'out.npy')
    if os.path.exists(out):
        os.unlink(out)
    args = [TOOL] + (['--pool'] if pool else []) + list(opts) + [str(path), '-o', out]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60, env=TOOL_ENV)
    assert 'runtime error:' not in r.stderr, r.stderr
    assert 'Sanitizer' not in r.stderr, r.stderr
    return r.returncode, (np.load(out) if r.returncode == 0 else None), r.stderr


def probe(path, *opts, pool=False):
    """--probe: the descriptor as JSON, no pixels decoded."""
    args = [TOOL, '--probe'] + (['--pool'] if pool else []) + list(opts) + [str(path)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60, env=TOOL_ENV)
    assert 'runtime error:' not in r.stderr, r.stderr
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def write_dicom(path, pixels, signed, lut=None, syntax=ExplicitVRLittleEndian, rescale=False):
    """A MONOCHROME2 image (frames, rows, cols) with an optional Modality LUT Sequence.

    lut: dict(entries, first, bits, data (list of ints), vr 'OW' or 'US', desc_vm 3).
    """
    frames, rows, cols = pixels.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = '1.2.840.10008.5.1.4.1.1.7'
    meta.MediaStorageSOPInstanceUID = '1.2.3.4.5.6.7.8.9'
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.is_little_endian = syntax != ExplicitVRBigEndian
    ds.is_implicit_VR = syntax == ImplicitVRLittleEndian
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = 'OT'
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = 'MONOCHROME2'
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, cols
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    if rescale:
        ds.RescaleSlope = '2'
        ds.RescaleIntercept = '-5'
    if lut is not None:
        item = Dataset()
        n, first, lbits = lut['entries'], lut['first'], lut['bits']
        desc = [n, first, lbits][:lut.get('desc_vm', 3)]
        if signed:
            # SS as stored: the first value wraps like the 16-bit word it is.
            desc = [v - 65536 if v > 32767 else v for v in desc]
        item.add_new(0x00283002, 'SS' if signed else 'US', desc)
        data = lut['data']
        if data is not None:
            if lut.get('vr', 'OW') == 'OW':
                order = '<' if ds.is_little_endian else '>'
                item.add_new(0x00283006, 'OW', np.asarray(data, order + 'u2').tobytes())
            else:
                item.add_new(0x00283006, 'US', list(data))
        item.LUTExplanation = 'test'
        item.ModalityLUTType = 'HU'
        ds.ModalityLUTSequence = Sequence([item])
    order = '<' if ds.is_little_endian else '>'
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(order)).tobytes()
    ds.save_as(str(path), write_like_original=False)


def reference(path, wide=True):
    """apply_modality_lut on pixel_array. wide: on the array as int64 first, because
    pydicom computes `arr - first_map` in the pixel dtype, which wraps for int8/int16 when
    a value minus a negative first mapped value leaves that type (tests/decode/README.md)."""
    ds = pydicom.dcmread(str(path))
    arr = ds.pixel_array
    out = apply_modality_lut(arr.astype(np.int64) if wide else arr, ds)
    frames = int(getattr(ds, 'NumberOfFrames', 1) or 1)
    return out.reshape(frames, 1, ds.Rows, ds.Columns)


def lut_data(n, bits, rng):
    top = 255 if bits == 8 else 65535
    return [int(v) for v in rng.integers(0, top + 1, n)]


CASES = {
    # name: (pixel dtype, signed, entries, first, bits, vr, syntax)
    'u16-lut16-ow-explicit': (np.uint16, False, 4096, 100, 16, 'OW', ExplicitVRLittleEndian),
    'i16-lut16-us-implicit': (np.int16, True, 3000, -1024, 16, 'US', ImplicitVRLittleEndian),
    'i16-lut16-ow-explicit': (np.int16, True, 2000, 200, 16, 'OW', ExplicitVRLittleEndian),
    'u8-lut8-ow-explicit': (np.uint8, False, 200, 10, 8, 'OW', ExplicitVRLittleEndian),
    'i8-lut8-us-explicit': (np.int8, True, 100, -50, 8, 'US', ExplicitVRLittleEndian),
    'u16-lut8-ow-implicit': (np.uint16, False, 256, 1000, 8, 'OW', ImplicitVRLittleEndian),
    'u16-65536-entries': (np.uint16, False, 0, 0, 16, 'OW', ExplicitVRLittleEndian),
    'u16-lut16-ow-big-endian': (np.uint16, False, 4096, 100, 16, 'OW', ExplicitVRBigEndian),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_lut_sequence_matches_pydicom(name, tmp_path):
    dt, signed, n, first, bits, vr, syntax = CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    span = n or 65536
    info = np.iinfo(dt)
    # Values below, inside and above the mapped range.
    lo = max(int(info.min), first - 300)
    hi = min(int(info.max), first + span + 300)
    px = rng.integers(lo, hi + 1, (3, 7, 9)).astype(dt)
    px.flat[0], px.flat[1] = lo, hi
    path = tmp_path / 'lut.dcm'
    write_dicom(path, px, signed, dict(entries=n, first=first, bits=bits,
                                       data=lut_data(span, bits, rng), vr=vr), syntax)
    ref = reference(path)
    assert ref.dtype == (np.uint8 if bits == 8 else np.uint16)
    if hi - first <= info.max:
        # No wrap in pydicom's own arithmetic: its plain result is the same.
        assert np.array_equal(reference(path, wide=False), ref)
    for pool in (False, True):
        rc, ours, err = run(path, tmp_path, '--lut', pool=pool)
        assert rc == 0, err
        assert ours.dtype == ref.dtype
        assert np.array_equal(ours, ref)
        # The raw values are untouched without --lut.
        rc, raw, err = run(path, tmp_path, pool=pool)
        assert rc == 0, err
        assert np.array_equal(raw, px.reshape(3, 1, 7, 9))
    # An asked-for dtype converts the LUT's output; one frame of it through the pool.
    rc, f32, err = run(path, tmp_path, '--lut', '--dtype', 'float32', '--frame', '2', pool=True)
    assert rc == 0, err
    assert f32.dtype == np.float32
    assert np.array_equal(f32, ref[2:].astype(np.float32))


def test_lut_sequence_wins_over_rescale(tmp_path):
    """pydicom applies the LUT Sequence when both it and Rescale Slope/Intercept exist."""
    rng = np.random.default_rng(7)
    px = rng.integers(0, 600, (1, 5, 6)).astype(np.uint16)
    path = tmp_path / 'both.dcm'
    write_dicom(path, px, False, dict(entries=512, first=0, bits=16,
                                      data=lut_data(512, 16, rng)), rescale=True)
    ref = reference(path)
    assert ref.dtype == np.uint16
    rc, ours, err = run(path, tmp_path, '--lut')
    assert rc == 0, err
    assert np.array_equal(ours, ref)


@pytest.mark.filterwarnings('ignore::DeprecationWarning')
def test_8bit_lut_words_keep_their_low_byte(tmp_path):
    """An 8-bit LUT whose 16-bit words exceed 255: pydicom's uint8 array of them keeps
    the low byte (numpy wraps, with a DeprecationWarning); so do we."""
    rng = np.random.default_rng(11)
    px = rng.integers(0, 300, (2, 4, 6)).astype(np.uint16)
    words = [int(v) for v in rng.integers(256, 65536, 256)]
    path = tmp_path / 'wide.dcm'
    write_dicom(path, px, False, dict(entries=256, first=20, bits=8, data=words))
    ref = reference(path)
    assert ref.dtype == np.uint8
    rc, ours, err = run(path, tmp_path, '--lut', pool=True)
    assert rc == 0, err
    assert np.array_equal(ours, ref)


BAD_LUTS = {
    # descriptor says 4096 entries, LUT Data holds 256
    'truncated-data': (dict(entries=4096, first=0, bits=16, data=list(range(256))),
                       'shorter than its descriptor'),
    # 0 entries means 65536: 100 words are far too few
    'zero-means-65536': (dict(entries=0, first=0, bits=16, data=list(range(100))),
                         'shorter than its descriptor'),
    'no-data': (dict(entries=16, first=0, bits=16, data=None), 'no LUT Data'),
    'two-value-descriptor': (dict(entries=16, first=0, bits=16, data=list(range(16)),
                                  desc_vm=2), 'LUT Descriptor'),
    'twelve-bit-entries': (dict(entries=16, first=0, bits=12, data=list(range(16))),
                           '8 or 16 bits'),
}


@pytest.mark.parametrize('name', sorted(BAD_LUTS))
def test_lying_lut_fails_cleanly(name, tmp_path):
    lut, reason = BAD_LUTS[name]
    px = np.arange(4 * 5, dtype=np.uint16).reshape(1, 4, 5)
    path = tmp_path / 'bad.dcm'
    write_dicom(path, px, False, lut)
    for pool in (False, True):
        rc, _, err = run(path, tmp_path, '--lut', pool=pool)
        assert rc == EXIT_DECODE, err
        assert 'decode_failed' in err and reason in err, err
        # Without --lut the image itself is fine.
        rc, raw, err = run(path, tmp_path, pool=pool)
        assert rc == 0, err
        assert np.array_equal(raw[:, 0], px)


# ---- one frame (DECODE_F_FRAME) through the pool ----

@pytest.mark.parametrize('name', ['SC_rgb_rle_2frame.dcm', 'SC_rgb_rle_16bit_2frame.dcm',
                                  'rtdose.dcm', 'rtdose_expb.dcm'])
def test_one_dicom_frame_through_pool(name, tmp_path):
    path = pydicom.data.get_testdata_file(name)
    ds = pydicom.dcmread(path)
    ref = ds.pixel_array
    frames = int(ds.NumberOfFrames)
    assert frames > 1
    # The frame count from a probe-only job, as the daemon learns it.
    for pool in (False, True):
        d = probe(path, pool=pool)
        assert d['frames'] == frames and d['shape'][0] == frames
        d = probe(path, '--frame', '1', pool=pool)
        assert d['frames'] == frames and d['shape'][0] == 1
        assert d['nbytes'] == ref[1].nbytes
    for f in (0, frames - 1):
        rc, one, err = run(path, tmp_path, '--frame', str(f), pool=True)
        assert rc == 0, err
        want = ref[f]
        want = want[np.newaxis] if ds.SamplesPerPixel == 1 else want.transpose(2, 0, 1)
        assert one.shape == (1,) + want.shape
        assert np.array_equal(one[0], want)
    rc, _, err = run(path, tmp_path, '--frame', str(frames), pool=True)
    assert rc != 0 and 'invalid_argument' in err, err


def test_one_nifti_frame_through_pool(tmp_path):
    rng = np.random.default_rng(3)
    a = rng.integers(-1000, 1000, (6, 5, 4, 3)).astype(np.int16)  # x, y, z, t
    img = nib.Nifti1Image(a, np.eye(4))
    img.header.set_slope_inter(0.5, 10)
    path = tmp_path / 'v.nii.gz'
    nib.save(img, str(path))
    back = nib.load(str(path))
    raw, fdata = np.asarray(back.dataobj.get_unscaled()), back.get_fdata()
    d = probe(path, pool=True)
    assert d['frames'] == 12 and d['shape'] == [12, 1, 5, 6] and d['dtype'] == 'int16'
    for z, t in ((0, 0), (3, 1), (2, 2)):
        f = t * 4 + z  # frames run over z, then t
        rc, one, err = run(path, tmp_path, '--frame', str(f), pool=True)
        assert rc == 0, err
        assert one.shape == (1, 1, 5, 6)
        assert np.array_equal(one[0, 0], raw[:, :, z, t].T)
        rc, one, err = run(path, tmp_path, '--frame', str(f), '--lut', '--dtype', 'float64',
                           pool=True)
        assert rc == 0, err
        assert np.array_equal(one[0, 0], fdata[:, :, z, t].T)
