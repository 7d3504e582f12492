"""DICOM transfer syntaxes beyond pydicom 2.3's reach, and the ones we refuse (tests/decode/README.md).

  - HTJ2K (.4.201 lossless, .4.202 lossless RPCL, .4.203) written by OpenJPH's ojph_compress
    (the HTJ2K reference encoder, Debian's openjph-tools) from arrays made here, encapsulated
    by pydicom: decoded by dmcache-decode (OpenJPEG), in-process and in the worker pool, must
    equal the original pixels (lossless) or OpenJPH's own ojph_expand output (lossy);
  - encapsulated JPEG 2000 whose fragment holds bytes that look like a sequence delimiter:
    fragments are taken by item length, as pydicom does; pixels equal pydicom's;
  - syntaxes we do not decode fail with decode_failed and a message naming the UID and the
    syntax, as do 1-bit RLE and a corrupt JPEG lossless stream;
  - the codec libraries' messages (OpenJPEG's, GDCM's bundled libjpeg's) stay off stderr
    unless --verbose asks for them.
pydicom 2.3 knows no HTJ2K UID, so files are written under a stand-in syntax of the same
encoding whose UID has the same padded length, then the UID bytes are replaced.
"""
import os
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.encaps import encapsulate, generate_pixel_data_frame
from pydicom.pixel_data_handlers import pillow_handler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_reference import EXIT_DECODE, make_ct, pydicom_reference, run  # noqa: E402

warnings.simplefilter('ignore')

HTJ2K = {'.201': 'High-Throughput JPEG 2000 Image Compression (Lossless Only)',
         '.202': 'High-Throughput JPEG 2000 with RPCL Options Image Compression (Lossless Only)',
         '.203': 'High-Throughput JPEG 2000 Image Compression'}
TS = '1.2.840.10008.1.2'


def write_with_syntax(ds, frames, uid, path):
    """ds with the encapsulated frames, saved under transfer syntax `uid`."""
    padded = uid + ('\0' if len(uid) % 2 else '')
    stand_in = {22: TS + '.4.90', 24: TS + '.4.100\0'}[len(padded)]
    ds.file_meta.TransferSyntaxUID = stand_in.rstrip('\0')
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.PixelData = encapsulate(frames, has_bot=len(frames) > 1)
    ds['PixelData'].VR = 'OB'
    ds['PixelData'].is_undefined_length = True
    ds.NumberOfFrames = len(frames)
    ds.save_as(path, write_like_original=False)
    data = open(path, 'rb').read()
    old = stand_in.encode() if len(stand_in) % 2 == 0 else stand_in.encode() + b'\0'
    assert data.count(old) == 1
    open(path, 'wb').write(data.replace(old, padded.encode()))


def ojph(arr, path, tmp, *opts):
    """arr (H, W) or (H, W, 3) through ojph_compress into the codestream `path`."""
    if arr.ndim == 3:
        src = os.path.join(tmp, 'in.ppm')
        h, w, _ = arr.shape
        open(src, 'wb').write(b'P6\n%d %d\n255\n' % (w, h) + arr.astype(np.uint8).tobytes())
        args = ['-i', src]
    else:
        src = os.path.join(tmp, 'in.raw')
        arr.astype(arr.dtype.newbyteorder('<')).tofile(src)
        bits = {np.dtype(np.int16): 16, np.dtype(np.uint16): 12, np.dtype(np.uint8): 8}[arr.dtype]
        args = ['-i', src, '-dims', '{%d,%d}' % (arr.shape[1], arr.shape[0]), '-num_comps', '1',
                '-signed', 'true' if arr.dtype.kind == 'i' else 'false', '-bit_depth', str(bits),
                '-downsamp', '{1,1}']
    subprocess.run(['ojph_compress'] + args + ['-o', path] + list(opts), check=True,
                   capture_output=True)
    data = open(path, 'rb').read()
    assert data[:4] == b'\xff\x4f\xff\x51'
    # The CAP marker (0xFF50) with Part 15 bits: a real HTJ2K codestream.
    assert b'\xff\x50' in data[:200]
    return data


def mr_dataset(rows, cols, spp, bits, signed):
    ds = pydicom.dcmread(pydicom.data.get_testdata_file('MR_small.dcm'))
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, spp
    ds.PhotometricInterpretation = 'RGB' if spp == 3 else 'MONOCHROME2'
    if spp == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, int(signed)
    for k in ('WindowCenter', 'WindowWidth'):
        if k in ds:
            del ds[k]
    return ds


HTJ2K_CASES = {
    # name: (syntax, shape (F, H, W[, 3]), dtype, ojph options, lossless)
    'ct-int16': ('.201', (1, 128, 128), np.int16, ['-reversible', 'true'], True),
    'mr-uint12-2frames-rpcl': ('.202', (2, 64, 72), np.uint16,
                               ['-reversible', 'true', '-prog_order', 'RPCL'], True),
    'rgb-uint8': ('.203', (1, 48, 64, 3), np.uint8, ['-reversible', 'true'], True),
    'rgb-uint8-lossy': ('.203', (1, 48, 64, 3), np.uint8, ['-qstep', '0.01'], False),
}


@pytest.mark.parametrize('case', sorted(HTJ2K_CASES))
def test_htj2k(case, tmp_path):
    suffix, shape, dtype, opts, lossless = HTJ2K_CASES[case]
    rng = np.random.default_rng(len(case))
    if dtype == np.int16:
        truth = make_ct(str(tmp_path / 'ct.dcm'), size=shape[1])[None]
    elif dtype == np.uint16:
        yy, xx = np.mgrid[0:shape[1], 0:shape[2]]
        truth = np.stack([(xx * 37 + yy * 11 + 900 * f) % 4096 for f in range(shape[0])])
        truth = (truth + rng.integers(0, 40, truth.shape)).clip(0, 4095).astype(np.uint16)
    else:
        yy, xx = np.mgrid[0:shape[1], 0:shape[2]]
        base = np.stack([(xx * 4) % 256, (yy * 5) % 256, (xx + 2 * yy) % 256], -1)
        truth = (base + rng.integers(0, 8, base.shape)).clip(0, 255).astype(np.uint8)[None]
    frames, expected = [], []
    for f in range(shape[0]):
        cs = str(tmp_path / ('f%d.j2c' % f))
        frames.append(ojph(truth[f], cs, str(tmp_path), *opts))
        if lossless:
            expected.append(truth[f])
        else:
            out = str(tmp_path / 'exp.ppm')
            subprocess.run(['ojph_expand', '-i', cs, '-o', out], check=True, capture_output=True)
            raw = open(out, 'rb').read()
            expected.append(np.frombuffer(raw[-truth[f].size:], np.uint8).reshape(truth[f].shape))
    spp = 3 if len(shape) == 4 else 1
    bits = {np.dtype(np.int16): 16, np.dtype(np.uint16): 12, np.dtype(np.uint8): 8}[np.dtype(dtype)]
    ds = mr_dataset(shape[1], shape[2], spp, bits, dtype == np.int16)
    uid = TS + '.4' + suffix
    path = tmp_path / ('htj2k-%s.dcm' % case)
    write_with_syntax(ds, frames, uid, str(path))
    assert pydicom.dcmread(str(path)).file_meta.TransferSyntaxUID == uid
    want = np.stack(expected)
    want = want[:, None] if spp == 1 else want.transpose(0, 3, 1, 2)
    for pool in (False, True):
        rc, ours, err, meta, _ = run(path, tmp_path, pool=pool, meta=True)
        assert rc == 0, err
        assert meta['codec'] == 'htj2k'
        assert ours.dtype == want.dtype and ours.shape == want.shape
        if lossless:
            assert np.array_equal(ours, want)
        else:
            # OpenJPEG against OpenJPH's own decoder of the same lossy codestream.
            assert np.abs(ours.astype(int) - want.astype(int)).max() <= 1
            assert np.abs(ours.astype(int) - truth.transpose(0, 3, 1, 2).astype(int)).mean() < 4
    last = shape[0] - 1
    rc, one, err, _, _ = run(path, tmp_path, '--frame', str(last), pool=True)
    assert rc == 0, err
    if lossless:
        assert np.array_equal(one, want[last:])


def test_fragment_with_delimiter_bytes(tmp_path):
    """A JPEG 2000 fragment whose bytes hold FFFE,E0DD (in a COM marker segment, so the
    codestream stays valid): the fragment is taken by its item length, as pydicom does."""
    src = pydicom.data.get_testdata_file('JPEG2000.dcm')
    ds0, ref = pydicom_reference(src)
    ds = pydicom.dcmread(src)
    cs = next(generate_pixel_data_frame(ds.PixelData, 1))
    assert cs[:4] == b'\xff\x4f\xff\x51'
    siz_end = 4 + int.from_bytes(cs[4:6], 'big')
    body = b'\x00\x00' + b'\xfe\xff\xdd\xe0\x00\x00\x00\x00' * 4  # Rcom 0: binary
    com = b'\xff\x64' + (len(body) + 2).to_bytes(2, 'big') + body
    cs2 = cs[:siz_end] + com + cs[siz_end:]
    ds.PixelData = encapsulate([cs2])
    path = tmp_path / 'j2k-delim.dcm'
    ds.save_as(str(path))
    # pydicom's parser reads the fragment whole, and Pillow (OpenJPEG) decodes it.
    saved = pydicom.config.pixel_data_handlers
    try:
        pydicom.config.pixel_data_handlers = [pillow_handler]
        d2 = pydicom.dcmread(str(path))
        assert next(generate_pixel_data_frame(d2.PixelData, 1)) == cs2
        pill = d2.pixel_array
    finally:
        pydicom.config.pixel_data_handlers = saved
    assert np.array_equal(pill, ref)
    for pool in (False, True):
        rc, ours, err, meta, _ = run(path, tmp_path, pool=pool, meta=True)
        assert rc == 0, err
        assert meta['codec'] == 'jpeg-2000'
        assert np.array_equal(ours[0, 0], pill)


def test_pydicom_embedded_delimiter_file(tmp_path):
    """pydicom's JPEG2000-embedded-sequence-delimiter.dcm: 4 bytes of the codestream's SIZ
    marker were overwritten with FFFE,E0DD (its README: "almost certainly not a valid JPEG
    anymore"). The fragment is read whole (250 bytes, as pydicom reads it) and OpenJPEG
    refuses its header: a clear decode_failed about the codestream, not the DICOM framing."""
    path = pydicom.data.get_testdata_file('JPEG2000-embedded-sequence-delimiter.dcm')
    ds = pydicom.dcmread(path)
    frag = next(generate_pixel_data_frame(ds.PixelData, 1))
    assert len(frag) == 250 and frag[6:10] == b'\xfe\xff\xdd\xe0'
    for pool in (False, True):
        rc, _, err, _, _ = run(path, tmp_path, pool=pool)
        assert rc == EXIT_DECODE, err
        assert 'decode_failed' in err
        assert '1.2.840.10008.1.2.4.91' in err and 'codestream header is corrupt' in err
        assert 'tiles' in err  # OpenJPEG's reason: the overwritten image width


def test_unsupported_syntaxes_named(tmp_path):
    ds = pydicom.dcmread(pydicom.data.get_testdata_file('CT_small.dcm'))
    raw = ds.PixelData
    cases = {
        TS + '.8.1': ('Deflated Image Frame Compression', [zlib.compress(raw)[2:-4]]),
        TS + '.4.100': ('MPEG2 Main Profile / Main Level', [b'\x00\x00\x01\xb3' + b'\0' * 60]),
        TS + '.4.110': ('JPEG XL Lossless', [b'\xff\x0a' + b'\0' * 62]),
    }
    for uid, (name, frames) in cases.items():
        d = pydicom.dcmread(pydicom.data.get_testdata_file('CT_small.dcm'))
        path = tmp_path / 'u.dcm'
        write_with_syntax(d, frames, uid, str(path))
        for pool in (False, True):
            rc, _, err, _, _ = run(path, tmp_path, pool=pool)
            assert rc == EXIT_DECODE, err
            assert 'decode_failed' in err
            assert 'transfer syntax %s (%s) is not supported' % (uid, name) in err, err
            assert 'Serious bug' not in err


def test_rle_1bit_refused(tmp_path):
    ds = pydicom.dcmread(pydicom.data.get_testdata_file('MR_small_RLE.dcm'))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    path = tmp_path / 'rle1.dcm'
    ds.save_as(str(path))
    with pytest.raises(NotImplementedError):  # pydicom refuses it too
        pydicom.dcmread(str(path)).pixel_array
    rc, _, err, _, _ = run(path, tmp_path, pool=True)
    assert rc == EXIT_DECODE, err
    assert 'BitsAllocated 1 in transfer syntax 1.2.840.10008.1.2.5 (RLE Lossless) is not ' \
           'supported' in err


def test_corrupt_jpeg_lossless(tmp_path):
    raw = tmp_path / 'ct.dcm'
    make_ct(str(raw), size=128)
    enc = tmp_path / 'ctj.dcm'
    subprocess.run(['gdcmconv', '-J', str(raw), str(enc)], check=True, capture_output=True)
    ds = pydicom.dcmread(str(enc))
    assert ds.file_meta.TransferSyntaxUID == TS + '.4.70'
    b = bytearray(next(generate_pixel_data_frame(ds.PixelData, 1)))
    for i in range(len(b) // 3, len(b) // 3 + 400):
        b[i] = (b[i] * 7 + 13) & 0xff
    ds.PixelData = encapsulate([bytes(b)])
    bad = tmp_path / 'ctj-bad.dcm'
    ds.save_as(str(bad))
    for pool in (False, True):
        rc, _, err, _, _ = run(bad, tmp_path, pool=pool)
        assert rc == EXIT_DECODE, err
        assert 'the JPEG lossless stream is corrupt (transfer syntax 1.2.840.10008.1.2.4.70' in err
        assert 'pvrg' not in err
        assert 'Corrupt JPEG data' not in err  # libjpeg's warning: only with --verbose


def test_codec_messages_only_with_verbose(tmp_path):
    path = pydicom.data.get_testdata_file('JPEG2000-embedded-sequence-delimiter.dcm')
    rc, _, err, _, _ = run(path, tmp_path)
    assert rc == EXIT_DECODE
    assert err.count('\n') == 1 and err.startswith('dmcache-decode: ' + path), err
    rc, _, err, _, _ = run(path, tmp_path, '--verbose')
    assert rc == EXIT_DECODE
    assert 'dmcache-decode: openjpeg: error: Invalid number of tiles' in err
    # GDCM's bundled libjpeg prints these with fprintf(stderr) on pydicom's 12-bit JPEG.
    lossy = pydicom.data.get_testdata_file('JPEG-lossy.dcm')
    rc, _, err, _, _ = run(lossy, tmp_path)
    assert rc == 0 and err == '', err
    rc, _, err, _, _ = run(lossy, tmp_path, '--verbose')
    assert rc == 0
    assert 'dmcache-decode: gdcm: Unsupported JPEG data precision 12\n' in err, err
    # The hook inherited by a sandboxed worker must not make it call what seccomp forbids.
    rc, ours, err, _, _ = run(lossy, tmp_path, '--verbose', pool=True)
    assert rc == 0, err
