"""Decoders against independent reference decoders (docs/reliability.md X2, X4;
docs/benchmarks.md T5).

dmcache-decode (in-process, and through the sandboxed worker pool with --pool) decodes:
  - every DICOM file with pixel data that Debian's python3-pydicom ships, compared with
    pydicom's pixel_array (numpy/RLE/Pillow handlers; python3-gdcm where those cannot);
  - CT-like 512x512 slices converted by gdcmconv to RLE, JPEG lossless, JPEG-LS, JPEG 2000,
    and an RGB image to JPEG baseline;
  - PNGs of every bit depth and color type (written by a small encoder here, interlaced
    too), compared with Pillow;
  - JPEGs written by Pillow (gray/RGB/CMYK, baseline/progressive, 4:2:0/4:4:4);
  - NIfTI-1/2, .nii/.nii.gz, both byte orders, several dtypes, with and without scl_slope,
    compared with nibabel;
and a bad-input set that must end with a clear error (exit 3 limit_exceeded or 4
decode_failed) quickly and never crash. Known differences are in tests/decode/README.md.
"""
import gzip
import io
import json
import os
import struct
import subprocess
import time
import warnings
import zlib

import nibabel as nib
import numpy as np
import pydicom
import pydicom.config
import pydicom.data
import pytest
from PIL import Image
from pydicom.pixel_data_handlers import (gdcm_handler, numpy_handler, pillow_handler,
                                         rle_handler)
from pydicom.pixel_data_handlers.util import convert_color_space

BUILD = os.environ.get('DMC_BUILD_ROOT', os.path.join(os.path.dirname(__file__), '..', '..', 'build'))
TOOL = os.path.join(BUILD, 'daemon', 'dmcache-decode')
EXIT_LIMIT, EXIT_DECODE = 3, 4
# Sanitizer builds: third-party leaks on error paths are suppressed (see lsan.supp).
TOOL_ENV = dict(os.environ)
TOOL_ENV.setdefault('LSAN_OPTIONS', 'suppressions=' + os.path.join(os.path.dirname(
    os.path.abspath(__file__)), 'lsan.supp'))
LOSSY_TS = {'1.2.840.10008.1.2.4.50', '1.2.840.10008.1.2.4.51', '1.2.840.10008.1.2.4.91'}

# Known differences, each with its reason (tests/decode/README.md).
KNOWN = {
    # Its codestream's SIZ marker was overwritten with FFFE,E0DD (pydicom's README: "almost
    # certainly not a valid JPEG anymore"). We read the fragment whole, as pydicom does, and
    # OpenJPEG refuses the header; pydicom's gdcm handler returns uninitialised memory
    # (different on each run) after the same failure. test_syntaxes.py has the details.
    'JPEG2000-embedded-sequence-delimiter.dcm': 'codestream header is corrupt',
}

warnings.simplefilter('ignore')


def run(path, tmp, *opts, pool=False, meta=False):
    out = os.path.join(tmp, 'out.npy')
    mpath = os.path.join(tmp, 'out.json')
    for p in (out, mpath):
        if os.path.exists(p):
            os.unlink(p)
    args = [TOOL] + (['--pool'] if pool else []) + list(opts) + [str(path), '-o', out]
    if meta:
        args += ['--meta', mpath]
    t = time.monotonic()
    r = subprocess.run(args, capture_output=True, text=True, timeout=60, env=TOOL_ENV)
    took = time.monotonic() - t
    # A sanitizer build reports undefined behaviour without failing the process.
    assert 'runtime error:' not in r.stderr, r.stderr
    assert 'Sanitizer' not in r.stderr, r.stderr
    arr = np.load(out) if r.returncode == 0 else None
    m = json.load(open(mpath)) if r.returncode == 0 and meta else None
    return r.returncode, arr, r.stderr, m, took


def psnr(a, b, peak):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float('inf') if mse == 0 else 10 * np.log10(peak * peak / mse)


# ---- DICOM ----

def pydicom_reference(path):
    """pixel_array with pydicom's own handlers, then with python3-gdcm."""
    saved = pydicom.config.pixel_data_handlers
    last = None
    try:
        for handlers in ([numpy_handler, rle_handler, pillow_handler], [gdcm_handler]):
            pydicom.config.pixel_data_handlers = handlers
            try:
                ds = pydicom.dcmread(path, force=True)
                return ds, ds.pixel_array
            except Exception as e:  # noqa: BLE001 - any failure means "try the next"
                last = e
    finally:
        pydicom.config.pixel_data_handlers = saved
    raise last


def as_fchw(ds, a):
    n = int(getattr(ds, 'NumberOfFrames', 1) or 1)
    spp = int(getattr(ds, 'SamplesPerPixel', 1))
    pi = str(getattr(ds, 'PhotometricInterpretation', ''))
    if spp == 3 and pi in ('YBR_FULL', 'YBR_FULL_422'):
        a = convert_color_space(a, pi, 'RGB', per_frame=n > 1)
    if spp == 1:
        a = a.reshape(n, 1, ds.Rows, ds.Columns)
    else:
        a = a.reshape(n, ds.Rows, ds.Columns, spp).transpose(0, 3, 1, 2)
    return a.astype(a.dtype.newbyteorder('='))


def pydicom_image_files():
    files = []
    for f in sorted(set(pydicom.data.get_testdata_files())):
        if os.path.isdir(f) or f.endswith(('.json', '.txt', '.dump', '.gz')):
            continue
        try:
            ds = pydicom.dcmread(f, force=True, stop_before_pixels=False)
        except Exception:  # noqa: BLE001
            continue
        if any(k in ds for k in ('PixelData', 'FloatPixelData', 'DoubleFloatPixelData')):
            files.append(f)
    return files


def compare(ours, ref, ts, name):
    assert ours.shape == ref.shape, name
    assert ours.dtype == ref.dtype, name
    if ts in LOSSY_TS:
        peak = 255.0 if ref.dtype == np.uint8 else float(max(1, int(ref.max()) - int(ref.min())))
        assert psnr(ours, ref, peak) >= 50, name
    else:
        assert np.array_equal(ours, ref), name


@pytest.mark.parametrize('path', pydicom_image_files(), ids=os.path.basename)
def test_pydicom_files(path, tmp_path):
    name = os.path.basename(path)
    rc, ours, err, meta, _ = run(path, tmp_path, meta=True)
    try:
        ds, ref = pydicom_reference(path)
    except Exception:  # noqa: BLE001
        ref = None
    if name in KNOWN:
        assert rc == EXIT_DECODE, err
        assert KNOWN[name] in err
        return
    if ref is None:
        # The references cannot decode it: we must fail with a clear error, in the pool too
        # (GDCM aborts on some of these; a worker absorbs that).
        rc, _, err, _, _ = run(path, tmp_path, pool=True)
        assert rc in (EXIT_LIMIT, EXIT_DECODE), err
        assert 'decode_failed' in err or 'limit_exceeded' in err
        return
    assert rc == 0, err
    ts = str(ds.file_meta.TransferSyntaxUID)
    compare(ours, as_fchw(ds, ref), ts, name)
    hdr = meta['header']
    assert hdr['00280010']['Value'] == [ds.Rows]
    assert '7FE00010' not in hdr
    assert meta['shape'] == list(ours.shape)


@pytest.mark.parametrize('name', ['SC_rgb_rle_2frame.dcm', 'rtdose.dcm', 'SC_rgb_jpeg_dcmtk.dcm',
                                  'JPEG2000.dcm', 'MR_small_jpeg_ls_lossless.dcm', 'CT_small.dcm'])
def test_pool_and_frames_agree(name, tmp_path):
    path = pydicom.data.get_testdata_file(name)
    rc, whole, err, _, _ = run(path, tmp_path)
    assert rc == 0, err
    rc, pooled, err, _, _ = run(path, tmp_path, pool=True)
    assert rc == 0, err
    assert np.array_equal(whole, pooled)
    for pool in (False, True):
        rc, frames, err, _, _ = run(path, tmp_path, '--frames', pool=pool)
        assert rc == 0, err
        assert np.array_equal(whole, frames)
    last = whole.shape[0] - 1
    rc, one, err, _, _ = run(path, tmp_path, '--frame', str(last))
    assert rc == 0, err
    assert np.array_equal(whole[last:], one)


def test_modality_lut(tmp_path):
    path = pydicom.data.get_testdata_file('CT_small.dcm')
    ds = pydicom.dcmread(path)
    ref = pydicom.pixel_data_handlers.util.apply_modality_lut(ds.pixel_array, ds)
    rc, f32, err, meta, _ = run(path, tmp_path, '--lut', meta=True)
    assert rc == 0, err
    assert f32.dtype == np.float32
    assert np.array_equal(f32[0, 0], ref.astype(np.float32))
    assert meta['lut_applied'] is True
    rc, f64, err, _, _ = run(path, tmp_path, '--lut', '--dtype', 'float64', pool=True)
    assert rc == 0, err
    assert np.array_equal(f64[0, 0], ref)


CT_SYNTAXES = {
    'rle': ('-R', '1.2.840.10008.1.2.5'),
    'jpeg-lossless': ('-J', '1.2.840.10008.1.2.4.70'),
    'jpeg-ls': ('-L', '1.2.840.10008.1.2.4.80'),
    'jpeg-2000': ('-K', '1.2.840.10008.1.2.4.90'),
}


def make_ct(path, seed=1, size=512):
    """A CT-like int16 slice: pydicom's CT_small upscaled, plus noise."""
    ds = pydicom.dcmread(pydicom.data.get_testdata_file('CT_small.dcm'))
    rng = np.random.default_rng(seed)
    a = np.kron(ds.pixel_array, np.ones((size // 128, size // 128), np.int16))
    a = (a + rng.normal(0, 12, a.shape)).astype(np.int16)
    ds.Rows, ds.Columns = size, size
    ds.PixelData = a.tobytes()
    ds.save_as(path, write_like_original=False)
    return a


@pytest.mark.parametrize('syntax', sorted(CT_SYNTAXES))
def test_ct_slices_gdcmconv(syntax, tmp_path):
    raw = tmp_path / 'ct.dcm'
    truth = make_ct(str(raw))
    flag, uid = CT_SYNTAXES[syntax]
    enc = tmp_path / ('ct-%s.dcm' % syntax)
    subprocess.run(['gdcmconv', flag, str(raw), str(enc)], check=True, capture_output=True)
    ds = pydicom.dcmread(str(enc))
    assert ds.file_meta.TransferSyntaxUID == uid
    for pool in (False, True):
        rc, ours, err, meta, _ = run(enc, tmp_path, pool=pool, meta=True)
        assert rc == 0, err
        assert meta['codec'] == syntax
        assert ours.shape == (1, 1, 512, 512) and ours.dtype == np.int16
        assert np.array_equal(ours[0, 0], truth)  # lossless: the original pixels
    _, ref = pydicom_reference(str(enc))
    assert np.array_equal(ours[0, 0], ref)


def test_rgb_jpeg_baseline_gdcmconv(tmp_path):
    """8-bit RGB secondary capture, JPEG baseline by gdcmconv: TurboJPEG vs pydicom."""
    ds = pydicom.dcmread(pydicom.data.get_testdata_file('SC_rgb_rle.dcm'))
    ds.decompress()
    yy, xx = np.mgrid[0:ds.Rows, 0:ds.Columns]
    img = np.stack([(xx * 2) % 256, (yy * 3) % 256, (xx + yy) % 256], -1).astype(np.uint8)
    ds.PixelData = img.tobytes()
    raw = tmp_path / 'rgb.dcm'
    ds.save_as(str(raw), write_like_original=False)
    enc = tmp_path / 'rgb-jpeg.dcm'
    subprocess.run(['gdcmconv', '--lossy', '-J', '-q', '95', str(raw), str(enc)], check=True,
                   capture_output=True)
    dse = pydicom.dcmread(str(enc))
    assert dse.file_meta.TransferSyntaxUID == '1.2.840.10008.1.2.4.50'
    rc, ours, err, meta, _ = run(enc, tmp_path, pool=True, meta=True)
    assert rc == 0, err
    assert meta['codec'] == 'jpeg'
    dse2, ref = pydicom_reference(str(enc))
    compare(ours, as_fchw(dse2, ref), '1.2.840.10008.1.2.4.50', 'rgb-jpeg')


# ---- PNG: a small independent encoder, so that every bit depth and color type exists ----

PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
PNG_CASES = [(0, 1), (0, 2), (0, 4), (0, 8), (0, 16), (2, 8), (2, 16), (3, 1), (3, 2), (3, 4),
             (3, 8), (4, 8), (4, 16), (6, 8), (6, 16)]
ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
         (0, 1, 1, 2)]


def png_rows(a, depth):
    """Packed scanlines (filter byte 0) of an (h, w, c) array."""
    out = b''
    for row in a:
        if depth >= 8:
            dt = '>u2' if depth == 16 else 'u1'
            out += b'\0' + row.astype(dt).tobytes()
        else:
            bits = ''.join(format(int(v), '0%db' % depth) for v in row.reshape(-1))
            bits += '0' * (-len(bits) % 8)
            out += b'\0' + int(bits, 2).to_bytes(len(bits) // 8, 'big') if bits else b'\0'
    return out


def png_encode(a, color, depth, interlace=False):
    h, w, c = a.shape

    def chunk(t, d):
        return struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d))
    ihdr = struct.pack('>IIBBBBB', w, h, depth, color, 0, 0, 1 if interlace else 0)
    if interlace:
        raw = b''
        for x0, y0, dx, dy in ADAM7:
            sub = a[y0::dy, x0::dx]
            if sub.size:
                raw += png_rows(sub, depth)
    else:
        raw = png_rows(a, depth)
    body = chunk(b'IHDR', ihdr)
    if color == 3:
        pal = bytes(v for i in range(2 ** depth)
                    for v in (i * 7 % 256, i * 13 % 256, i * 29 % 256))
        body += chunk(b'PLTE', pal)
    body += chunk(b'IDAT', zlib.compress(raw, 6)) + chunk(b'IEND', b'')
    return b'\x89PNG\r\n\x1a\n' + body


@pytest.mark.parametrize('interlace', [False, True], ids=['plain', 'adam7'])
@pytest.mark.parametrize('color,depth', PNG_CASES, ids=lambda v: str(v))
def test_png(color, depth, interlace, tmp_path):
    rng = np.random.default_rng(color * 100 + depth)
    h, w, c = 13, 11, PNG_CHANNELS[color]
    a = rng.integers(0, 2 ** depth, (h, w, c), dtype=np.uint32)
    p = tmp_path / 'x.png'
    p.write_bytes(png_encode(a, color, depth, interlace))
    rc, ours, err, meta, _ = run(p, tmp_path, meta=True)
    assert rc == 0, err
    assert ours.shape == (1, c, h, w)
    assert meta['header']['bit_depth'] == depth
    truth = a.transpose(2, 0, 1)[None]
    pil = np.array(Image.open(p))
    if pil.ndim == 2:
        pil = pil[:, :, None]
    pil = pil.transpose(2, 0, 1)[None]
    if depth == 16:
        assert ours.dtype == np.uint16
        assert np.array_equal(ours, truth)
        if color == 0:
            assert np.array_equal(ours, pil)              # Pillow: int32 "I", same values
        elif color == 4:
            # Pillow opens 16-bit gray+alpha as 8-bit RGBA: gray repeated, high bytes.
            for k in range(3):
                assert np.array_equal(ours[:, 0] >> 8, pil[:, k])
            assert np.array_equal(ours[:, 1] >> 8, pil[:, 3])
        else:
            assert np.array_equal(ours >> 8, pil)         # Pillow keeps the high byte
    else:
        assert ours.dtype == np.uint8
        if color == 0 and depth < 8:
            scale = {1: 1, 2: 85, 4: 17}[depth]           # Pillow's L;2 / L;4; "1" is bool
            assert np.array_equal(ours, truth * scale)
        else:
            assert np.array_equal(ours, truth)
        assert np.array_equal(ours, pil.astype(np.uint8))


def test_png_mask_aligned_with_image(tmp_path):
    img = np.arange(24 * 16, dtype=np.uint8).reshape(24, 16)
    mask = ((img % 3) == 0).astype(np.uint8) * 255
    Image.fromarray(img).save(tmp_path / 'img.png')
    Image.fromarray(mask).save(tmp_path / 'mask.png')
    _, a, _, _, _ = run(tmp_path / 'img.png', tmp_path)
    _, m, _, _, _ = run(tmp_path / 'mask.png', tmp_path, pool=True)
    assert a.shape == m.shape == (1, 1, 24, 16)
    assert np.array_equal(m[0, 0] == 255, mask == 255)


# ---- JPEG (Pillow writes, Pillow is the reference) ----

JPEG_CASES = [('L', 0, False), ('L', 0, True), ('RGB', 2, False), ('RGB', 2, True),
              ('RGB', 0, False), ('RGB', 0, True), ('CMYK', 0, False)]


@pytest.mark.parametrize('mode,subsampling,progressive', JPEG_CASES, ids=str)
def test_jpeg(mode, subsampling, progressive, tmp_path):
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:96, 0:128]
    base = ((np.sin(xx / 9.0) + np.cos(yy / 7.0)) * 60 + 128).astype(np.uint8)
    chans = {'L': 1, 'RGB': 3, 'CMYK': 4}[mode]
    a = np.stack([np.roll(base, 5 * k, 1) for k in range(chans)], -1)
    a = np.clip(a.astype(int) + rng.integers(-3, 4, a.shape), 0, 255).astype(np.uint8)
    im = Image.fromarray(a[:, :, 0] if chans == 1 else a, mode)
    p = tmp_path / 'x.jpg'
    im.save(p, 'JPEG', quality=90, subsampling=subsampling, progressive=progressive)
    for pool in (False, True):
        rc, ours, err, meta, _ = run(p, tmp_path, pool=pool, meta=True)
        assert rc == 0, err
        assert meta['header']['progressive'] is progressive
        ref = np.array(Image.open(p))
        ref = ref[None, None] if ref.ndim == 2 else ref.transpose(2, 0, 1)[None]
        assert ours.shape == ref.shape and ours.dtype == np.uint8
        assert psnr(ours, ref, 255.0) >= 50


# ---- NIfTI (nibabel writes, nibabel is the reference) ----

NII_DTYPES = [np.uint8, np.int16, np.int32, np.float32, np.float64, np.uint16, np.int8]


def nii_make(path, version, dtype, endian, slope, shape=(7, 5, 4)):
    rng = np.random.default_rng(3)
    if np.issubdtype(dtype, np.floating):
        a = rng.normal(0, 100, shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        a = rng.integers(max(info.min, -30000), min(info.max, 30000), shape).astype(dtype)
    cls = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    hdr_cls = nib.Nifti1Header if version == 1 else nib.Nifti2Header
    hdr = hdr_cls(endianness=endian)
    hdr.set_data_dtype(dtype)
    img = cls(a, np.diag([0.5, 0.75, 2.0, 1.0]), hdr)
    if slope is not None:
        img.header.set_slope_inter(*slope)
    nib.save(img, str(path))
    return nib.load(str(path))


@pytest.mark.parametrize('version', [1, 2])
@pytest.mark.parametrize('gz', [False, True], ids=['nii', 'nii.gz'])
@pytest.mark.parametrize('endian', ['<', '>'])
@pytest.mark.parametrize('slope', [None, (2.5, -10.0)], ids=['raw', 'scaled'])
@pytest.mark.parametrize('dtype', NII_DTYPES, ids=lambda d: np.dtype(d).name)
def test_nifti(version, gz, endian, slope, dtype, tmp_path):
    path = tmp_path / ('x.nii.gz' if gz else 'x.nii')
    img = nii_make(path, version, dtype, endian, slope)
    rc, ours, err, meta, _ = run(path, tmp_path, meta=True)
    assert rc == 0, err
    raw = np.asanyarray(img.dataobj.get_unscaled())
    want = raw.transpose(2, 1, 0)[:, None]
    assert ours.dtype == raw.dtype.newbyteorder('=')
    assert np.array_equal(ours, want)
    assert meta['header']['version'] == version
    assert meta['codec'] == ('nifti-gz' if gz else 'nifti')
    # get_fdata() bit for bit with float64 output; float32 as its rounding.
    fdata = img.get_fdata().transpose(2, 1, 0)[:, None]
    rc, f64, err, _, _ = run(path, tmp_path, '--lut', '--dtype', 'float64')
    assert rc == 0, err
    assert np.array_equal(f64, fdata)
    rc, f32, err, _, _ = run(path, tmp_path, '--lut', pool=True)
    assert rc == 0, err
    assert f32.dtype == np.float32
    assert np.array_equal(f32, fdata.astype(np.float32))


def test_nifti_4d_frames_and_rgb(tmp_path):
    a = np.arange(3 * 4 * 5 * 2, dtype=np.int16).reshape(3, 4, 5, 2)
    nib.save(nib.Nifti1Image(a, np.eye(4)), str(tmp_path / 'v.nii'))
    rc, ours, err, _, _ = run(tmp_path / 'v.nii', tmp_path)
    assert rc == 0, err
    assert ours.shape == (10, 1, 4, 3)  # frames = z, then t
    assert np.array_equal(ours[:, 0], a.transpose(3, 2, 1, 0).reshape(10, 4, 3))
    rc, f7, err, _, _ = run(tmp_path / 'v.nii', tmp_path, '--frame', '7')
    assert rc == 0, err
    assert np.array_equal(f7[0, 0], a[:, :, 2, 1].T)

    rgb = np.zeros((4, 3, 2), dtype=[('R', 'u1'), ('G', 'u1'), ('B', 'u1')])
    rgb['R'] = np.arange(24).reshape(4, 3, 2)
    rgb['G'] = 100
    rgb['B'] = 200
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(tmp_path / 'rgb.nii'))
    rc, ours, err, _, _ = run(tmp_path / 'rgb.nii', tmp_path)
    assert rc == 0, err
    assert ours.shape == (2, 3, 3, 4)
    assert np.array_equal(ours[:, 0], rgb['R'].transpose(2, 1, 0))
    assert (ours[:, 1] == 100).all() and (ours[:, 2] == 200).all()


# ---- bad inputs: a clear error, quickly, never a crash ----

def png_bomb():
    ihdr = struct.pack('>IIBBBBB', 10 ** 6, 10 ** 6, 8, 6, 0, 0, 0)

    def chunk(t, d):
        return struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) +
            chunk(b'IDAT', zlib.compress(b'\0' * 1000)) + chunk(b'IEND', b''))


def jpeg_bomb():
    return bytes.fromhex('ffd8ffc0001108ffdcffdc030122000211000311'
                         '00ffda000801010000' '3f00ffd9')


def jpeg_many_scans(tmp):
    """A progressive JPEG whose last scan is repeated 800 times (libjpeg-turbo LJT-01-003)."""
    im = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8))
    b = io.BytesIO()
    im.save(b, 'JPEG', progressive=True, quality=80)
    data = b.getvalue()
    last = data.rfind(b'\xff\xda')
    scan = data[last:-2]
    return data[:-2] + scan * 800 + b'\xff\xd9'


def nifti_header(dims, dtype_code=4, bitpix=16):
    h = bytearray(352)
    struct.pack_into('<i', h, 0, 348)
    struct.pack_into('<8h', h, 40, *dims)
    struct.pack_into('<hh', h, 70, dtype_code, bitpix)
    struct.pack_into('<f', h, 108, 352.0)
    struct.pack_into('<f', h, 112, 1.0)
    h[344:348] = b'n+1\0'
    return bytes(h)


def dicom_bomb(tmp):
    ds = pydicom.dcmread(pydicom.data.get_testdata_file('CT_small.dcm'))
    ds.NumberOfFrames = 2 ** 31
    del ds.Rows
    del ds.Columns
    ds.add_new(0x00280010, 'UL', 65535)
    ds.add_new(0x00280011, 'UL', 65535)
    ds.PixelData = b'\0' * 64
    p = os.path.join(tmp, 'bomb.dcm')
    ds.save_as(p, write_like_original=False)
    return open(p, 'rb').read()


def bad_inputs(tmp):
    ct = open(pydicom.data.get_testdata_file('CT_small.dcm'), 'rb').read()
    jpg = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(jpg, 'JPEG')
    png = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(png, 'PNG')
    nii = nifti_header([3, 16, 16, 16, 1, 1, 1, 1]) + b'\1\0' * 4096
    bomb_payload = nifti_header([3, 1024, 1024, 64, 1, 1, 1, 1]) + b'\0' * (1024 * 1024 * 64 * 2)
    return {
        'wrong_magic': (b'GIF89a' + b'\0' * 200, EXIT_DECODE, None),
        'empty': (b'', EXIT_DECODE, None),
        'dicom_truncated': (ct[:len(ct) // 2], EXIT_DECODE, None),
        'dicom_header_only': (ct[:300], EXIT_DECODE, None),
        'jpeg_truncated': (jpg.getvalue()[:len(jpg.getvalue()) // 2], EXIT_DECODE, None),
        'png_truncated': (png.getvalue()[:60], EXIT_DECODE, None),
        'nifti_truncated': (nii[:1000], EXIT_DECODE, None),
        'jpeg_65500': (jpeg_bomb(), EXIT_LIMIT, None),
        'png_1e6': (png_bomb(), EXIT_LIMIT, None),
        'nifti_huge_dims': (nifti_header([4, 32767, 32767, 32767, 32767, 1, 1, 1]),
                            EXIT_LIMIT, None),
        'nifti_gzip_bomb': (gzip.compress(bomb_payload, 9), EXIT_LIMIT,
                            ['--max-decode-bytes', str(64 << 20)]),
        'dicom_ul_rows_2e31_frames': (dicom_bomb(tmp), EXIT_LIMIT, None),
        'jpeg_800_scans': (jpeg_many_scans(tmp), EXIT_DECODE, None),
    }


BAD_NAMES = ['wrong_magic', 'empty', 'dicom_truncated', 'dicom_header_only', 'jpeg_truncated',
             'png_truncated', 'nifti_truncated', 'jpeg_65500', 'png_1e6', 'nifti_huge_dims',
             'nifti_gzip_bomb', 'dicom_ul_rows_2e31_frames', 'jpeg_800_scans']


@pytest.fixture(scope='module')
def bad_set(tmp_path_factory):
    return bad_inputs(str(tmp_path_factory.mktemp('bad')))


@pytest.mark.parametrize('name', BAD_NAMES)
@pytest.mark.parametrize('pool', [False, True], ids=['local', 'pool'])
def test_bad_input(name, pool, bad_set, tmp_path):
    data, want, opts = bad_set[name]
    p = tmp_path / name
    p.write_bytes(data)
    rc, _, err, _, took = run(p, tmp_path, *(opts or []), pool=pool)
    assert rc == want, err
    assert ('limit_exceeded' if want == EXIT_LIMIT else 'decode_failed') in err
    # Size bombs end within a second, CPU bombs within two (docs/reliability.md X2).
    assert took < (1.0 if want == EXIT_LIMIT else 2.0), took
