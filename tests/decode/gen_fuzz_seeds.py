#!/usr/bin/python3
"""Writes the seed corpora of the decoder fuzz targets: tests/fuzz/corpus/decode_<format>/.

Small files (a few KB at most), valid and invalid, one per interesting path: every PNG color
type, JPEG baseline/progressive/CMYK, NIfTI-1/2 both byte orders and gzip, DICOM in each
transfer syntax (via gdcmconv; HTJ2K via ojph_compress), and the size bombs of docs/reliability.md X2. Deterministic, so
that re-running it changes nothing. Usage: gen_fuzz_seeds.py [OUT_DIR]
"""
import gzip
import io
import os
import struct
import subprocess
import sys
import tempfile
import zlib

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian
from PIL import Image

ROOT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(os.path.abspath(__file__)), '..', 'fuzz', 'corpus')


def out(fmt, name, data):
    d = os.path.join(ROOT, 'decode_' + fmt)
    os.makedirs(d, exist_ok=True)
    assert len(data) <= 8192, (name, len(data))
    with open(os.path.join(d, name), 'wb') as f:
        f.write(data)


def png_chunk(t, d):
    return struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d))


def png(a, color, depth, interlace=0, palette=False):
    h, w = a.shape[:2]
    rows = b''
    for r in a.reshape(h, w, -1):
        if depth >= 8:
            rows += b'\0' + r.astype('>u2' if depth == 16 else 'u1').tobytes()
        else:
            bits = ''.join(format(int(v), '0%db' % depth) for v in r.reshape(-1))
            bits += '0' * (-len(bits) % 8)
            rows += b'\0' + int(bits, 2).to_bytes(len(bits) // 8, 'big')
    body = png_chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, depth, color, 0, 0, interlace))
    if palette:
        body += png_chunk(b'PLTE', bytes(range(48)))
    return b'\x89PNG\r\n\x1a\n' + body + png_chunk(b'IDAT', zlib.compress(rows)) + \
        png_chunk(b'IEND', b'')


def pngs():
    rng = np.random.default_rng(1)
    for color, depth, ch in [(0, 1, 1), (0, 2, 1), (0, 4, 1), (0, 8, 1), (0, 16, 1), (2, 8, 3),
                             (2, 16, 3), (3, 4, 1), (3, 8, 1), (4, 8, 2), (4, 16, 2), (6, 8, 4),
                             (6, 16, 4)]:
        a = rng.integers(0, min(2 ** depth, 16 if color == 3 else 2 ** depth), (6, 5, ch))
        out('png', 'c%d_d%d.png' % (color, depth), png(a, color, depth, palette=color == 3))
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (9, 7), np.uint8)).save(b, 'PNG')
    out('png', 'pillow_gray.png', b.getvalue())
    out('png', 'truncated.png', b.getvalue()[:45])
    out('png', 'bomb_1e6.png', b'\x89PNG\r\n\x1a\n' + png_chunk(
        b'IHDR', struct.pack('>IIBBBBB', 10 ** 6, 10 ** 6, 8, 6, 0, 0, 0)) + png_chunk(
        b'IDAT', zlib.compress(b'\0' * 64)) + png_chunk(b'IEND', b''))
    # Adam7, 8-bit gray, written with Pillow's decoder as the judge in the tests.
    a = rng.integers(0, 255, (9, 9, 1))
    raw = b''
    for x0, y0, dx, dy in [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
                           (1, 0, 2, 2), (0, 1, 1, 2)]:
        for r in a[y0::dy, x0::dx]:
            if r.size:
                raw += b'\0' + r.astype('u1').tobytes()
    out('png', 'adam7.png', b'\x89PNG\r\n\x1a\n' + png_chunk(
        b'IHDR', struct.pack('>IIBBBBB', 9, 9, 8, 0, 0, 0, 1)) + png_chunk(
        b'IDAT', zlib.compress(raw)) + png_chunk(b'IEND', b''))


def jpegs():
    rng = np.random.default_rng(2)
    base = rng.integers(0, 255, (16, 16, 3), np.uint8)
    for name, mode, kw in [('gray.jpg', 'L', {}), ('rgb420.jpg', 'RGB', {'subsampling': 2}),
                           ('rgb444_prog.jpg', 'RGB', {'subsampling': 0, 'progressive': True}),
                           ('cmyk.jpg', 'CMYK', {})]:
        a = base[:, :, 0] if mode == 'L' else base
        if mode == 'CMYK':
            a = np.concatenate([base, base[:, :, :1]], 2)
        b = io.BytesIO()
        Image.fromarray(a, mode).save(b, 'JPEG', quality=75, **kw)
        out('jpeg', name, b.getvalue())
        if name == 'rgb444_prog.jpg':
            d = b.getvalue()
            last = d.rfind(b'\xff\xda')
            out('jpeg', 'many_scans.jpg', d[:-2] + d[last:-2] * 20 + b'\xff\xd9')
            out('jpeg', 'truncated.jpg', d[:len(d) // 2])
    out('jpeg', 'bomb_65500.jpg', bytes.fromhex(
        'ffd8ffc0001108ffdcffdc03012200021100031100ffda000801010000' '3f00ffd9'))


def niftis(tmp):
    a = np.arange(4 * 3 * 2, dtype=np.int16).reshape(4, 3, 2) - 7
    for version, cls, hcls in [(1, nib.Nifti1Image, nib.Nifti1Header),
                               (2, nib.Nifti2Image, nib.Nifti2Header)]:
        for endian in '<>':
            h = hcls(endianness=endian)
            h.set_data_dtype(np.int16)
            img = cls(a, np.eye(4), h)
            img.header.set_slope_inter(0.5, 3.0)
            p = os.path.join(tmp, 'x.nii')
            nib.save(img, p)
            data = open(p, 'rb').read()
            tag = 'v%d_%s' % (version, 'le' if endian == '<' else 'be')
            out('nifti', tag + '.nii', data)
            out('nifti', tag + '.nii.gz', gzip.compress(data, 9, mtime=0))
    f = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 2, 2)
    nib.save(nib.Nifti1Image(f, np.eye(4)), os.path.join(tmp, 'f.nii'))
    out('nifti', 'float32.nii', open(os.path.join(tmp, 'f.nii'), 'rb').read())
    rgb = np.zeros((2, 2, 2), dtype=[('R', 'u1'), ('G', 'u1'), ('B', 'u1')])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), os.path.join(tmp, 'rgb.nii'))
    out('nifti', 'rgb24.nii', open(os.path.join(tmp, 'rgb.nii'), 'rb').read())
    h = bytearray(open(os.path.join(tmp, 'x.nii'), 'rb').read()[:352])
    h[0:4] = struct.pack('<i', 348)
    h[40:56] = struct.pack('<8h', 4, 32767, 32767, 32767, 32767, 1, 1, 1)
    h[70:74] = struct.pack('<hh', 4, 16)
    h[108:112] = struct.pack('<f', 352.0)
    h[344:348] = b'n+1\0'
    out('nifti', 'huge_dims.nii', bytes(h))
    out('nifti', 'bomb.nii.gz', gzip.compress(bytes(h) + b'\0' * (4 << 20), 9, mtime=0))
    out('nifti', 'truncated.nii', bytes(h[:200]))


def dicom_base(rows, cols, spp, bits, signed, pi, ts, pixels):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = '1.2.840.10008.5.1.4.1.1.7'
    meta.MediaStorageSOPInstanceUID = '1.2.3.4'
    meta.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b'\0' * 128
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = '1.2.3.4'
    ds.PatientName = 'Fuzz^Seed'
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, spp
    ds.PhotometricInterpretation = pi
    if spp > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = signed
    ds.RescaleSlope, ds.RescaleIntercept = '2', '-1024'
    ds.PixelData = pixels
    ds.is_little_endian = ts != ExplicitVRBigEndian
    ds.is_implicit_VR = ts == ImplicitVRLittleEndian
    return ds


def dicoms(tmp):
    rng = np.random.default_rng(3)
    ct = rng.integers(-1000, 1000, (16, 16)).astype(np.int16)
    rgb = rng.integers(0, 255, (16, 16, 3)).astype(np.uint8)
    for name, ts in [('explicit_le.dcm', ExplicitVRLittleEndian),
                     ('implicit_le.dcm', ImplicitVRLittleEndian),
                     ('explicit_be.dcm', ExplicitVRBigEndian)]:
        px = ct.astype('>i2' if ts == ExplicitVRBigEndian else '<i2').tobytes()
        ds = dicom_base(16, 16, 1, 16, 1, 'MONOCHROME2', ts, px)
        b = io.BytesIO()
        ds.save_as(b, write_like_original=False)
        out('dicom', name, b.getvalue())
        if name == 'explicit_le.dcm':
            raw = os.path.join(tmp, 'ct.dcm')
            open(raw, 'wb').write(b.getvalue())
            out('dicom', 'truncated.dcm', b.getvalue()[:len(b.getvalue()) - 100])
            out('dicom', 'meta_only.dcm', b.getvalue()[:300])
    for flag, name in [('-R', 'rle.dcm'), ('-J', 'jpeg_lossless.dcm'), ('-L', 'jpeg_ls.dcm'),
                       ('-K', 'j2k.dcm')]:
        enc = os.path.join(tmp, name)
        subprocess.run(['gdcmconv', flag, raw, enc], check=True, capture_output=True)
        out('dicom', name, open(enc, 'rb').read())
    # HTJ2K lossless (.4.201) by OpenJPH's ojph_compress; pydicom 2.3 knows no HTJ2K UID, so
    # the file is written as .4.100 (same padded length) and the UID bytes replaced.
    src = os.path.join(tmp, 'ct.raw')
    ct.astype('<i2').tofile(src)
    cs = os.path.join(tmp, 'ct.j2c')
    subprocess.run(['ojph_compress', '-i', src, '-o', cs, '-reversible', 'true', '-dims', '{16,16}',
                    '-num_comps', '1', '-signed', 'true', '-bit_depth', '16', '-downsamp',
                    '{1,1}'], check=True, capture_output=True)
    ds = dicom_base(16, 16, 1, 16, 1, 'MONOCHROME2', '1.2.840.10008.1.2.4.100',
                    encapsulate([open(cs, 'rb').read()]))
    ds.is_little_endian, ds.is_implicit_VR = True, False
    b = io.BytesIO()
    ds.save_as(b, write_like_original=False)
    data = b.getvalue()
    assert data.count(b'1.2.840.10008.1.2.4.100\0') == 1
    out('dicom', 'htj2k.dcm', data.replace(b'1.2.840.10008.1.2.4.100\0', b'1.2.840.10008.1.2.4.201\0'))
    ds = dicom_base(16, 16, 3, 8, 0, 'RGB', ExplicitVRLittleEndian, rgb.tobytes())
    rawc = os.path.join(tmp, 'rgb.dcm')
    ds.save_as(rawc, write_like_original=False)
    out('dicom', 'rgb.dcm', open(rawc, 'rb').read())
    for flag, name in [(['--lossy', '-J', '-q', '90'], 'jpeg_baseline.dcm'), (['-R'], 'rgb_rle.dcm')]:
        enc = os.path.join(tmp, name)
        subprocess.run(['gdcmconv'] + flag + [rawc, enc], check=True, capture_output=True)
        out('dicom', name, open(enc, 'rb').read())
    ds = dicom_base(16, 16, 1, 16, 1, 'MONOCHROME2', ExplicitVRLittleEndian, ct.tobytes())
    ds.NumberOfFrames = 2 ** 31
    del ds.Rows
    del ds.Columns
    ds.add_new(0x00280010, 'UL', 65535)
    ds.add_new(0x00280011, 'UL', 65535)
    b = io.BytesIO()
    ds.save_as(b, write_like_original=False)
    out('dicom', 'bomb_ul_rows.dcm', b.getvalue())
    # A Modality LUT Sequence (signed first mapped value, OW data), and one whose
    # descriptor declares more entries than its data holds.
    for name, entries, words in [('modality_lut.dcm', 256, 256),
                                 ('modality_lut_short.dcm', 4096, 64)]:
        ds = dicom_base(16, 16, 1, 16, 1, 'MONOCHROME2', ExplicitVRLittleEndian, ct.tobytes())
        del ds.RescaleSlope
        del ds.RescaleIntercept
        item = Dataset()
        item.add_new(0x00283002, 'SS', [entries, -128, 16])
        item.add_new(0x00283006, 'OW', (np.arange(words, dtype='<u2') * 251).tobytes())
        ds.ModalityLUTSequence = [item]
        b = io.BytesIO()
        ds.save_as(b, write_like_original=False)
        out('dicom', name, b.getvalue())


def main():
    with tempfile.TemporaryDirectory() as tmp:
        pngs()
        jpegs()
        niftis(tmp)
        dicoms(tmp)


if __name__ == '__main__':
    main()
