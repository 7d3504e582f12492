#!/usr/bin/python3
"""Build the dmcache test corpus deterministically from Debian packages, without network.

    /usr/bin/python3 tests/data/gen_corpus.py OUTDIR [--stamp FILE] [--jobs N]

Writes OUTDIR (replacing it atomically) with:
  manifest.json               every file: path, sha256, size, format, dtype/shape, what is wrong
  keys.json                   API keys of the emulator and the projects each one may see
  projects/<name>/project.json  the project as the emulator serves it (resources, annotations)
  projects/<name>/files/...     resource files;  projects/<name>/masks/...  segmentation masks

Sources: pydicom's own test files (located through pydicom.data, never a hard-coded path),
CT-like slices drawn with numpy and re-encoded by GDCM's gdcmconv, PNG written by a small
encoder below (every bit depth and colour type), JPEG by Pillow and cjpeg, NIfTI-1/2 headers
by nibabel. Same inputs give byte-identical output: no clocks, no random UIDs, gzip mtime 0.
See tests/data/README.md for the layout and the meaning of every manifest field.
"""
import argparse
import concurrent.futures
import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import uuid
import warnings
import zlib

import numpy as np

warnings.filterwarnings('ignore')

import nibabel as nib  # noqa: E402
import pydicom  # noqa: E402
import pydicom.data  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from PIL import Image  # noqa: E402

CORPUS_VERSION = 1
NS = uuid.UUID('5b0f6f0e-2d7c-4c55-9d8e-0d3c0a7e1a11')  # namespace of every corpus id
UID_ROOT = '1.2.826.0.1.3680043.10.1183.'  # deterministic DICOM UIDs live below this root

# The API keys of the emulator (tests/emulator/README.md). Test fixtures, not secrets.
KEYS = {
    'admin_key': 'dmc-admin-key',
    'keys': [
        {'key': 'dmc-key-all', 'user': 'alice@example.org', 'projects': '*'},
        {'key': 'dmc-key-sample', 'user': 'bob@example.org', 'projects': ['sample']},
        {'key': 'dmc-key-ct', 'user': 'carol@example.org', 'projects': ['ct', 'pydicom']},
        {'key': 'dmc-key-none', 'user': 'dave@example.org', 'projects': []},
    ],
}

TS = {
    'explicit': '1.2.840.10008.1.2.1',
    'implicit': '1.2.840.10008.1.2',
    'rle': '1.2.840.10008.1.2.5',
    'jpeg-lossless': '1.2.840.10008.1.2.4.70',
    'jpeg-ls': '1.2.840.10008.1.2.4.80',
    'j2k': '1.2.840.10008.1.2.4.90',
}
GDCMCONV_FLAGS = {'implicit': ['-M'], 'rle': ['-R'], 'jpeg-lossless': ['-J'],
                  'jpeg-ls': ['-L'], 'j2k': ['-K']}
# Transfer syntaxes whose pixels must decode bit-exactly.
LOSSLESS_TS = {'1.2.840.10008.1.2', '1.2.840.10008.1.2.1', '1.2.840.10008.1.2.2',
               '1.2.840.10008.1.2.1.99', '1.2.840.10008.1.2.5', '1.2.840.10008.1.2.4.57',
               '1.2.840.10008.1.2.4.70', '1.2.840.10008.1.2.4.80', '1.2.840.10008.1.2.4.90'}
NIFTI_MIME = 'application/nifti'  # the mimetype the clients dispatch on (tests/emulator/README.md)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def pixels_sha256(arr, dtype):
    """Digest of pixels in the project layout (frames, channels, height, width), C order,
    little-endian, in the source dtype."""
    return sha256(np.ascontiguousarray(arr, dtype=np.dtype(dtype).newbyteorder('<')).tobytes())


def uid(*parts):
    return UID_ROOT + str(uuid.uuid5(NS, '/'.join(map(str, parts))).int)[:30]


def rid(*parts):
    return str(uuid.uuid5(NS, '/'.join(map(str, parts))))


def ts_at(seconds):
    """Deterministic ISO-8601 timestamps with milliseconds and Z, as Datamint writes them."""
    d, s = divmod(int(seconds), 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return '2025-01-%02dT%02d:%02d:%02d.000Z' % (15 + d, h, m, s)


# --------------------------------------------------------------------------------------
# PNG: a tiny encoder so that every bit depth and colour type is under our control.
def _png_chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def png_bytes(arr, color_type, bit_depth, palette=None, width=None, height=None):
    """arr: (H, W) or (H, W, C) of sample values. Returns the PNG file."""
    arr = np.asarray(arr)
    h, w = arr.shape[:2]
    rows = []
    for y in range(h):
        row = arr[y].reshape(-1)
        if bit_depth == 16:
            b = row.astype('>u2').tobytes()
        elif bit_depth == 8:
            b = row.astype(np.uint8).tobytes()
        else:
            per = 8 // bit_depth
            vals = row.astype(np.uint8)
            pad = (-len(vals)) % per
            vals = np.concatenate([vals, np.zeros(pad, np.uint8)]).reshape(-1, per)
            shifts = np.arange(per - 1, -1, -1, dtype=np.uint8) * bit_depth
            b = (vals << shifts).sum(axis=1).astype(np.uint8).tobytes()
        rows.append(b'\x00' + b)
    ihdr = struct.pack('>IIBBBBB', width or w, height or h, bit_depth, color_type, 0, 0, 0)
    out = b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', ihdr)
    if palette is not None:
        out += _png_chunk(b'PLTE', bytes(np.asarray(palette, np.uint8).reshape(-1)))
    out += _png_chunk(b'IDAT', zlib.compress(b''.join(rows), 6)) + _png_chunk(b'IEND', b'')
    return out


def pattern(h, w, seed):
    """A smooth, deterministic test picture in [0, 1)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    v = (np.sin(x / (7.0 + seed)) * np.cos(y / (11.0 + seed)) + 1) / 2
    v = 0.7 * v + 0.3 * ((x + 2 * y + 37 * seed) % 97) / 97.0
    return np.clip(v, 0, 0.999999)


# --------------------------------------------------------------------------------------
# CT-like slices.
def ct_slice(z, nz, size=512):
    """Hounsfield units of an abdominal CT-like slice: air, body, lungs, liver, spine, noise."""
    rng = np.random.default_rng(1000 + z)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    c = size / 2
    t = z / max(1, nz - 1)
    hu = np.full((size, size), -1000.0)
    body = ((x - c) / (0.42 * size)) ** 2 + ((y - c) / (0.32 * size)) ** 2 < 1
    hu[body] = 30
    for sx in (-1, 1):
        lung = ((x - c - sx * 0.17 * size) / (0.11 * size)) ** 2 + \
            ((y - c + 0.03 * size) / ((0.16 - 0.08 * t) * size)) ** 2 < 1
        hu[lung & body] = -850
    liver = ((x - c + 0.12 * size) / (0.16 * size)) ** 2 + ((y - c) / ((0.05 + 0.12 * t) * size)) ** 2 < 1
    hu[liver & body] = 60
    spine = (x - c) ** 2 + (y - c - 0.2 * size) ** 2 < (0.045 * size) ** 2
    hu[spine] = 700
    hu += rng.normal(0, 12, hu.shape)
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16), liver & body, spine


def dicom_bytes(arr, *, pixel_repr, modality='CT', intercept=0.0, key=(), frames=1,
                sop_class='1.2.840.10008.5.1.4.1.1.2', z=0, extra=None):
    """An explicit-VR little-endian DICOM file; arr (H, W) or (F, H, W) of stored values."""
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = sop_class
    fm.MediaStorageSOPInstanceUID = uid('sop', *key)
    fm.TransferSyntaxUID = TS['explicit']
    fm.ImplementationClassUID = UID_ROOT + '1'
    fm.ImplementationVersionName = 'DMCACHE_CORPUS'
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = fm.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid('study', *key[:1])
    ds.SeriesInstanceUID = uid('series', *key[:2])
    ds.FrameOfReferenceUID = uid('for', *key[:1])
    ds.PatientName = 'Phantom^CT'
    ds.PatientID = 'DMC-%s' % key[0]
    ds.StudyDate = '20250115'
    ds.Modality = modality
    ds.InstanceNumber = z + 1
    ds.ImagePositionPatient = [-250.0, -250.0, float(-2.5 * z)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.977, 0.977]
    ds.SliceThickness = 2.5
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = 'MONOCHROME2'
    ds.Rows, ds.Columns = arr.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = pixel_repr
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = 1
    ds.RescaleType = 'HU'
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(arr, dtype='<u2' if pixel_repr == 0 else '<i2').tobytes()
    ds.is_little_endian = True
    ds.is_implicit_VR = False
    bio = io.BytesIO()
    ds.save_as(bio, write_like_original=False)
    return bio.getvalue()


def gdcmconv(data, syntax, tmpdir, name):
    src = os.path.join(tmpdir, name + '.in.dcm')
    dst = os.path.join(tmpdir, name + '.out.dcm')
    with open(src, 'wb') as f:
        f.write(data)
    subprocess.run(['gdcmconv', '--quiet'] + GDCMCONV_FLAGS[syntax] + [src, dst], check=True)
    with open(dst, 'rb') as f:
        out = f.read()
    os.unlink(src)
    os.unlink(dst)
    got = pydicom.dcmread(io.BytesIO(out), stop_before_pixels=True).file_meta.TransferSyntaxUID
    if got != TS[syntax]:
        raise RuntimeError('gdcmconv produced %s, wanted %s for %s' % (got, TS[syntax], name))
    return out


# --------------------------------------------------------------------------------------
# NIfTI written from nibabel's header objects, so the stored values and scaling are exact.
def nifti_bytes(arr, version, slope=None, inter=None):
    """arr: (x, y, z) in its stored dtype."""
    hdr = nib.Nifti1Header() if version == 1 else nib.Nifti2Header()
    hdr.set_data_shape(arr.shape)
    hdr.set_data_dtype(arr.dtype)
    aff = np.diag([0.8, 0.8, 2.5, 1.0])
    hdr.set_qform(aff, code=1)
    hdr.set_sform(aff, code=1)
    hdr.set_xyzt_units('mm', 'sec')
    if slope is not None:
        hdr['scl_slope'] = slope
        hdr['scl_inter'] = inter
    else:
        hdr['scl_slope'] = np.nan
        hdr['scl_inter'] = np.nan
    off = 352 if version == 1 else 544
    hdr['vox_offset'] = off
    hdr['magic'] = b'n+1' if version == 1 else b'n+2'
    block = hdr.binaryblock
    return block + b'\x00' * (off - len(block)) + np.asfortranarray(arr).tobytes(order='F')


def jpeg_scan_blocks(data):
    """(start, end) of each scan of a JPEG: optional DHT segments, SOS, entropy-coded data."""
    i, blocks, start = 2, [], None
    while i < len(data):
        if data[i] != 0xFF:
            raise ValueError('bad JPEG marker at %d' % i)
        m = data[i + 1]
        if m == 0xD9:
            break
        seglen = struct.unpack('>H', data[i + 2:i + 4])[0]
        if m == 0xC4 and start is None:
            start = i
        if m != 0xDA:
            if m != 0xC4:
                start = None
            i += 2 + seglen
            continue
        if start is None:
            start = i
        i += 2 + seglen
        while not (data[i] == 0xFF and data[i + 1] not in (0x00,) and not 0xD0 <= data[i + 1] <= 0xD7):
            i += 1
        blocks.append((start, i))
        start = None
    return blocks


def gz(data):
    return gzip.compress(data, compresslevel=6, mtime=0)


# --------------------------------------------------------------------------------------
class Corpus:
    def __init__(self, root):
        self.root = root
        self.manifest = []
        self.projects = {}
        self.clock = 0

    def project(self, name, description):
        p = {'name': name, 'description': description, 'created_by': 'alice@example.org',
             'created_at': ts_at(len(self.projects) * 60), 'resources': []}
        self.projects[name] = p
        return p

    def write(self, project, rel, data, **meta):
        path = os.path.join('projects', project, rel)
        full = os.path.join(self.root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, 'wb') as f:
            f.write(data)
        entry = {'path': path, 'project': project, 'sha256': sha256(data), 'size': len(data)}
        entry.update(meta)
        entry.setdefault('valid', True)
        self.manifest.append(entry)
        return entry

    def resource(self, project, rel, data, *, filename=None, mimetype, modality=None,
                 channel=None, tags=(), status='published', metadata=None, annotations=(),
                 **meta):
        entry = self.write(project, rel, data, mimetype=mimetype, **meta)
        p = self.projects[project]
        resource_id = rid('resource', project, rel)
        entry['resource_id'] = resource_id
        self.clock += 1
        anns = []
        for i, a in enumerate(annotations):
            a = dict(a)
            a['id'] = rid('annotation', project, rel, i)
            a.setdefault('created_by', 'annotator1@example.org')
            a.setdefault('status', 'published')
            a.setdefault('scope', 'image' if a.get('frame_index') is None else 'frame')
            a['created_at'] = ts_at(self.clock * 10 + 3600 + i)
            anns.append(a)
        p['resources'].append({
            'id': resource_id, 'file': rel, 'filename': filename or os.path.basename(rel),
            'mimetype': mimetype, 'modality': modality, 'channel': channel, 'tags': list(tags),
            'status': status, 'created_at': ts_at(self.clock * 10), 'size': len(data),
            'sha256': entry['sha256'], 'metadata': metadata or {}, 'annotations': anns})
        return entry

    def mask(self, project, rel, data, **meta):
        e = self.write(project, rel, data, role='mask', **meta)
        return rel, e

    def finish(self):
        for name, p in self.projects.items():
            with open(os.path.join(self.root, 'projects', name, 'project.json'), 'w') as f:
                json.dump(p, f, indent=1, sort_keys=True)
        with open(os.path.join(self.root, 'keys.json'), 'w') as f:
            json.dump(KEYS, f, indent=1)
        self.manifest.sort(key=lambda e: e['path'])
        with open(os.path.join(self.root, 'manifest.json'), 'w') as f:
            json.dump({'version': CORPUS_VERSION,
                       'projects': sorted(self.projects),
                       'files': self.manifest}, f, indent=1, sort_keys=True)


# --------------------------------------------------------------------------------------
def _quiet_gdcm():
    try:
        import gdcm
        gdcm.Trace.WarningOff()
        gdcm.Trace.ErrorOff()
    except Exception:
        pass


def reference_pixels(data):
    """pydicom's pixel_array in the (frames, channels, rows, columns) layout."""
    _quiet_gdcm()
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    a = ds.pixel_array
    frames = int(ds.get('NumberOfFrames', 1) or 1)
    spp = int(ds.get('SamplesPerPixel', 1))
    if frames > 1 and spp > 1:
        return a.transpose(0, 3, 1, 2)
    if frames > 1:
        return a[:, None]
    if spp > 1:
        return a.transpose(2, 0, 1)[None]
    return a[None, None]


def reference_digests_elsewhere(paths, perturb):
    """Reference digests computed in a child whose malloc fills fresh memory with `perturb`
    (glibc MALLOC_PERTURB_): a decoder that reads memory it never wrote shows up here."""
    env = dict(os.environ, MALLOC_PERTURB_=str(perturb))
    r = subprocess.run([sys.executable, os.path.abspath(__file__), '--reference-digests'],
                       input=json.dumps(paths), capture_output=True, text=True, env=env, check=True)
    return json.loads(r.stdout)


def _reference_digests_main():
    out = {}
    for path in json.load(sys.stdin):
        try:
            with open(path, 'rb') as f:
                a = reference_pixels(f.read())
            out[path] = pixels_sha256(a, a.dtype)
        except Exception:
            out[path] = None
    sys.stdout.write(json.dumps(out))


def dicom_meta(data):
    """What a decoder should produce for a DICOM file, read with pydicom."""
    m = {'format': 'dicom'}
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as e:  # deliberately broken files
        m['pydicom_error'] = '%s: %s' % (type(e).__name__, str(e)[:200])
        return m
    fm = getattr(ds, 'file_meta', None)
    tsuid = str(fm.get('TransferSyntaxUID', '')) if fm is not None else ''
    m['transfer_syntax'] = tsuid or None
    m['sop_class'] = str(ds.get('SOPClassUID', '')) or None
    m['has_preamble'] = data[128:132] == b'DICM'
    try:
        has_pixels = 'PixelData' in ds or 'FloatPixelData' in ds or 'DoubleFloatPixelData' in ds
    except Exception:
        has_pixels = False
    m['has_pixels'] = has_pixels
    if not has_pixels:
        return m
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get('NumberOfFrames', 1) or 1)
        spp = int(ds.get('SamplesPerPixel', 1))
        ba = int(ds.BitsAllocated)
        pr = int(ds.get('PixelRepresentation', 0))
        m['photometric'] = str(ds.get('PhotometricInterpretation', ''))
        m['bits_allocated'] = ba
        m['bits_stored'] = int(ds.get('BitsStored', ba))
        m['pixel_representation'] = pr
        if 'FloatPixelData' in ds:
            dtype = 'float32'
        elif 'DoubleFloatPixelData' in ds:
            dtype = 'float64'
        else:
            dtype = {1: 'uint8', 8: 'uint8', 16: 'uint16', 32: 'uint32'}.get(ba)
            if dtype and pr == 1 and ba > 1:
                dtype = dtype[1:]
        m['dtype'] = dtype
        m['shape'] = [frames, spp, rows, cols]
    except Exception as e:
        m['header_error'] = '%s: %s' % (type(e).__name__, str(e)[:200])
        return m
    try:
        _quiet_gdcm()
        arr = reference_pixels(data)
        m['reference'] = 'pydicom %s pixel_array' % pydicom.__version__
        m['reference_shape'] = list(arr.shape)
        m['reference_dtype'] = str(arr.dtype)
        digest = pixels_sha256(arr, arr.dtype)
        again = reference_pixels(data)
        if pixels_sha256(again, again.dtype) != digest:
            # The reference reads memory it never wrote for this file: no stable answer.
            m['reference_unstable'] = True
            m['compare'] = 'none'
            return m
        m['pixels_sha256'] = digest
        ybr = m['photometric'].startswith('YBR')
        m['compare'] = 'exact' if (tsuid in LOSSLESS_TS and not ybr) else 'psnr'
    except Exception as e:
        m['pydicom_decode_error'] = '%s: %s' % (type(e).__name__, str(e)[:200])
    return m


def build_pydicom(c):
    """Every DICOM file Debian's python3-pydicom ships as test data."""
    c.project('pydicom', 'Every DICOM test file shipped by python3-pydicom %s' % pydicom.__version__)
    base = os.path.dirname(pydicom.data.get_testdata_file('CT_small.dcm'))
    dataroot = os.path.dirname(base)
    files = [os.path.join(dp, f) for dp, _, fs in os.walk(base) for f in fs]
    files += pydicom.data.get_charset_files('*') + pydicom.data.get_palette_files('*')
    seen = set()
    pending = []
    for path in sorted(set(files)):
        rel = os.path.relpath(path, dataroot)
        if rel in seen or path.endswith(('.py', '.pyc', '.txt', '.json', '.dump')):
            continue
        seen.add(rel)
        with open(path, 'rb') as f:
            data = f.read()
        if path.endswith('.gz'):
            meta = {'format': 'gzip', 'note': 'gzip-compressed DICOM (not a DICOM stream)'}
            mime = 'application/gzip'
        else:
            meta = dicom_meta(data)
            if 'pydicom_error' in meta:
                continue  # not DICOM at all
            mime = 'application/dicom'
        tags = ['pydicom', rel.split('/')[0]]
        broken = [k for k in ('pydicom_error', 'header_error', 'pydicom_decode_error') if k in meta]
        if broken:
            tags.append('reference-fails')
        pending.append((path, rel, data, meta, mime, tags))
    with_pixels = [x[0] for x in pending if 'pixels_sha256' in x[3]]
    runs = [reference_digests_elsewhere(with_pixels, v) for v in (85, 170)]
    for path, rel, data, meta, mime, tags in pending:
        if 'pixels_sha256' in meta and any(r.get(path) != meta['pixels_sha256'] for r in runs):
            del meta['pixels_sha256']
            meta['reference_unstable'] = True
            meta['compare'] = 'none'
        out = 'files/' + rel.replace('/', '__')
        c.resource('pydicom', out, data, filename=rel.replace('/', '_'), mimetype=mime,
                   modality=None, channel='pydicom', tags=tags, source='pydicom:' + rel, **meta)


def build_ct(c, tmpdir, jobs):
    """CT-like series, 512x512, int16 and uint16, in six transfer syntaxes (§4.6 DICOM)."""
    c.project('ct', 'CT-like 512x512 series in every lossless transfer syntax GDCM writes')
    nz = 6
    raws = []
    for kind, pr, icpt in (('int16', 1, 0.0), ('uint16', 0, -1024.0)):
        for z in range(nz):
            hu = ct_slice(z, nz)[0]
            stored = hu if pr == 1 else (hu.astype(np.int32) + 1024).astype(np.uint16)
            raws.append((kind, pr, icpt, z, stored))
    work = []
    for kind, pr, icpt, z, stored in raws:
        for syn in TS:
            work.append((kind, pr, icpt, z, stored, syn))

    def one(w):
        kind, pr, icpt, z, stored, syn = w
        key = ('ct', '%s-%s' % (kind, syn), z)
        data = dicom_bytes(stored, pixel_repr=pr, intercept=icpt, key=key, z=z,
                           extra={'SeriesDescription': 'CT %s %s' % (kind, syn)})
        if syn != 'explicit':
            data = gdcmconv(data, syn, tmpdir, '%s_%s_%d' % (kind, syn, z))
        return w, data

    with concurrent.futures.ThreadPoolExecutor(jobs) as ex:
        results = list(ex.map(one, work))
    for (kind, pr, icpt, z, stored, syn), data in results:
        c.resource('ct', 'files/%s/%s/slice_%03d.dcm' % (kind, syn, z), data,
                   filename='%s_%s_%03d.dcm' % (kind, syn, z), mimetype='application/dicom',
                   modality='CT', channel='ct-%s' % kind, tags=['ct', kind, syn],
                   metadata={'width': 512, 'height': 512},
                   format='dicom', transfer_syntax=TS[syn], dtype=kind, shape=[1, 1, 512, 512],
                   rescale_intercept=icpt, rescale_slope=1.0, compare='exact',
                   pixels_sha256=pixels_sha256(stored[None, None], kind))


PNG_VARIANTS = [
    # name, color type, bit depth, channels
    ('gray1', 0, 1, 1), ('gray2', 0, 2, 1), ('gray4', 0, 4, 1), ('gray8', 0, 8, 1),
    ('gray16', 0, 16, 1), ('graya8', 4, 8, 2), ('graya16', 4, 16, 2), ('rgb8', 2, 8, 3),
    ('rgb16', 2, 16, 3), ('rgba8', 6, 8, 4), ('rgba16', 6, 16, 4), ('palette8', 3, 8, 1),
    ('palette4', 3, 4, 1), ('palette1', 3, 1, 1),
]


def png_variant(name, ct, bd, ch, h, w, seed):
    maxv = (1 << bd) - 1
    planes = [np.floor(pattern(h, w, seed + k) * (maxv + 1)).astype(np.uint32) for k in range(ch)]
    arr = np.stack(planes, axis=-1) if ch > 1 else planes[0]
    palette = None
    if ct == 3:
        n = 1 << bd
        palette = [((i * 37) % 256, (i * 91) % 256, (255 - i * 13) % 256) for i in range(n)]
    dtype = 'uint16' if bd == 16 else 'uint8'
    chw = arr.transpose(2, 0, 1) if ch > 1 else arr[None]
    return png_bytes(arr, ct, bd, palette), dtype, chw[None]


def build_formats(c, tmpdir):
    """PNG, JPEG and NIfTI in every variant the decoders must handle (§4.6)."""
    c.project('formats', 'PNG (all bit depths and colour types), JPEG, NIfTI-1/2 variants')
    h, w = 96, 128
    for i, (name, ct, bd, ch) in enumerate(PNG_VARIANTS):
        data, dtype, arr = png_variant(name, ct, bd, ch, h, w, i)
        c.resource('formats', 'files/png/%s.png' % name, data, mimetype='image/png',
                   modality='OT', channel='formats-png', tags=['png', name],
                   metadata={'width': w, 'height': h}, format='png', png_color_type=ct,
                   png_bit_depth=bd, dtype=dtype, shape=[1, ch, h, w], compare='exact',
                   pixels_sha256=pixels_sha256(arr, dtype),
                   note='palette images decode to indices; 1/2/4-bit to their sample values'
                   if ct == 3 or bd < 8 else None)
    # JPEG with Pillow (libjpeg-turbo): gray/RGB, baseline/progressive, 4:2:0/4:4:4.
    jh, jw = 384, 512
    gray = (pattern(jh, jw, 3) * 256).astype(np.uint8)
    rgb = np.stack([(pattern(jh, jw, s) * 256).astype(np.uint8) for s in (4, 5, 6)], -1)
    for name, arr, prog, sub in (('gray_baseline', gray, False, None),
                                 ('gray_progressive', gray, True, None),
                                 ('rgb_baseline_420', rgb, False, 2),
                                 ('rgb_baseline_444', rgb, False, 0),
                                 ('rgb_progressive_420', rgb, True, 2),
                                 ('rgb_progressive_444', rgb, True, 0)):
        bio = io.BytesIO()
        kw = {'quality': 90, 'progressive': prog, 'optimize': False}
        if sub is not None:
            kw['subsampling'] = sub
        Image.fromarray(arr).save(bio, 'JPEG', **kw)
        data = bio.getvalue()
        ref = np.asarray(Image.open(io.BytesIO(data)))
        ch = 1 if ref.ndim == 2 else ref.shape[2]
        refc = ref[None, None] if ch == 1 else ref.transpose(2, 0, 1)[None]
        c.resource('formats', 'files/jpeg/%s.jpg' % name, data, mimetype='image/jpeg',
                   modality='OT', channel='formats-jpeg', tags=['jpeg', name],
                   metadata={'width': jw, 'height': jh}, format='jpeg', progressive=prog,
                   subsampling={None: None, 2: '4:2:0', 0: '4:4:4'}[sub], dtype='uint8',
                   shape=[1, ch, jh, jw], compare='psnr',
                   reference='Pillow %s (libjpeg-turbo)' % Image.__version__,
                   pixels_sha256=pixels_sha256(refc, 'uint8'),
                   source_pixels_sha256=pixels_sha256(
                       arr[None, None] if ch == 1 else arr.transpose(2, 0, 1)[None], 'uint8'))
    # NIfTI-1 and NIfTI-2, .nii and .nii.gz, four dtypes, with and without scaling.
    nx, ny, nz = 40, 32, 10
    base = pattern(ny * nz, nx, 9).reshape(nz, ny, nx).transpose(2, 1, 0)  # (x, y, z)
    vols = {'int16': (base * 4000 - 1000).astype(np.int16),
            'uint8': (base * 256).astype(np.uint8),
            'float32': (base * 10 - 3).astype(np.float32),
            'float64': (base * 1e3 - 7).astype(np.float64)}
    for version in (1, 2):
        for dt, vol in vols.items():
            scalings = [(None, None)]
            if dt in ('int16', 'uint8'):
                scalings.append((2.0, -1024.0) if dt == 'int16' else (0.5, 10.0))
            for slope, inter in scalings:
                raw = nifti_bytes(vol, version, slope, inter)
                tag = '%s%s' % (dt, '_scaled' if slope is not None else '')
                arr = vol.transpose(2, 1, 0)[:, None]  # (z, 1, y, x), as the Datamint client
                for ext, data in (('.nii', raw), ('.nii.gz', gz(raw))):
                    c.resource('formats', 'files/nifti/nifti%d_%s%s' % (version, tag, ext), data,
                               mimetype=NIFTI_MIME, modality='MR', channel='formats-nifti',
                               tags=['nifti', 'nifti%d' % version, tag],
                               metadata={'frame_count': nz}, format='nifti%d' % version,
                               gzip=ext == '.nii.gz', dtype=dt, shape=[nz, 1, ny, nx],
                               nifti_dims=[nx, ny, nz], scl_slope=slope, scl_inter=inter,
                               compare='exact', pixels_sha256=pixels_sha256(arr, dt),
                               note='pixels_sha256 is of the stored (unscaled) values')


def build_sample(c, tmpdir):
    """The small mixed project the demo serves: CT slices, a multi-frame DICOM, PNG, JPEG,
    NIfTI, with image labels, frame labels, a category and segmentation masks (§4.4)."""
    c.project('sample', 'Small mixed demo project: CT, PNG, JPEG, NIfTI with labels and masks')
    nz = 8
    for z in range(nz):
        hu, liver, spine = ct_slice(z, nz)
        syn = 'explicit' if z < 4 else 'jpeg-lossless'
        data = dicom_bytes(hu, pixel_repr=1, key=('sample', 'ct', z), z=z,
                           extra={'SeriesDescription': 'Sample abdomen CT', 'PatientSex': 'F',
                                  'PatientAge': '054Y', 'PatientWeight': '80.0000'})
        if syn != 'explicit':
            data = gdcmconv(data, syn, tmpdir, 'sample_%d' % z)
        anns = []
        if z in (2, 3, 5):
            mrel, _ = c.mask('sample', 'masks/ct_%03d_liver.png' % z,
                             png_bytes(liver.astype(np.uint8) * 255, 0, 8), format='png',
                             dtype='uint8', shape=[1, 1, 512, 512],
                             pixels_sha256=pixels_sha256((liver.astype(np.uint8) * 255)[None, None], 'uint8'))
            anns.append({'type': 'segmentation', 'identifier': 'Liver', 'frame_index': 0,
                         'file': mrel})
        if z == 3:
            mrel, _ = c.mask('sample', 'masks/ct_%03d_spine.png' % z,
                             png_bytes(spine.astype(np.uint8) * 255, 0, 8), format='png',
                             dtype='uint8', shape=[1, 1, 512, 512],
                             pixels_sha256=pixels_sha256((spine.astype(np.uint8) * 255)[None, None], 'uint8'))
            anns.append({'type': 'segmentation', 'identifier': 'Spine', 'frame_index': 0,
                         'file': mrel, 'created_by': 'annotator2@example.org'})
        anns.append({'type': 'label', 'identifier': 'liver_visible' if z >= 2 else 'no_liver'})
        if z == 6:
            anns.append({'type': 'label', 'identifier': 'lesion', 'status': 'new',
                         'created_by': 'annotator2@example.org'})
        c.resource('sample', 'files/ct_%03d.dcm' % z, data, mimetype='application/dicom',
                   modality='CT', channel='CT scans', tags=['ct', 'abdomen'],
                   metadata={'width': 512, 'height': 512}, annotations=anns, format='dicom',
                   transfer_syntax=TS[syn], dtype='int16', shape=[1, 1, 512, 512],
                   compare='exact', pixels_sha256=pixels_sha256(hu[None, None], 'int16'))
    # Multi-frame DICOM with frame labels.
    frames = np.stack([(ct_slice(z, 4, 128)[0].astype(np.int32) + 1024).astype(np.uint16)
                       for z in range(4)])
    data = dicom_bytes(frames, pixel_repr=0, intercept=-1024.0, key=('sample', 'mf', 0),
                       frames=4, sop_class='1.2.840.10008.5.1.4.1.1.7.3', modality='OT',
                       extra={'PatientSex': 'M', 'SliceLocation': '-0.0'})
    c.resource('sample', 'files/multiframe_4x128.dcm', data, mimetype='application/dicom',
               modality='OT', channel='CT scans', tags=['multiframe'],
               metadata={'width': 128, 'height': 128, 'frame_count': 4},
               annotations=[{'type': 'label', 'identifier': 'contrast', 'frame_index': 1},
                            {'type': 'label', 'identifier': 'contrast', 'frame_index': 2},
                            {'type': 'label', 'identifier': 'artifact', 'frame_index': 3}],
               format='dicom', transfer_syntax=TS['explicit'], dtype='uint16',
               shape=[4, 1, 128, 128], compare='exact',
               pixels_sha256=pixels_sha256(frames[:, None], 'uint16'))
    # One of pydicom's own files.
    with open(pydicom.data.get_testdata_file('MR_small.dcm'), 'rb') as f:
        data = f.read()
    c.resource('sample', 'files/MR_small.dcm', data, mimetype='application/dicom', modality='MR',
               channel='pydicom', tags=['mr'], metadata={'width': 64, 'height': 64},
               annotations=[{'type': 'category', 'identifier': 'quality', 'value': 'good'}],
               source='pydicom:test_files/MR_small.dcm', **dicom_meta(data))
    # PNGs.
    for i, (name, ct, bd, ch, size, label, status) in enumerate((
            ('xray_gray8', 0, 8, 1, 512, 'fracture', 'published'),
            ('xray_gray16', 0, 16, 1, 256, 'normal', 'published'),
            ('photo_rgb8', 2, 8, 3, 256, 'normal', 'inbox'),
            ('overlay_rgba8', 6, 8, 4, 128, 'fracture', 'published'))):
        data, dtype, arr = png_variant(name, ct, bd, ch, size, size, 20 + i)
        c.resource('sample', 'files/%s.png' % name, data, mimetype='image/png', modality='DX',
                   channel='xray', tags=['png'], status=status,
                   metadata={'width': size, 'height': size},
                   annotations=[{'type': 'label', 'identifier': label}], format='png',
                   png_color_type=ct, png_bit_depth=bd, dtype=dtype, shape=[1, ch, size, size],
                   compare='exact', pixels_sha256=pixels_sha256(arr, dtype))
    # JPEGs.
    for i, (name, mode, prog, status) in enumerate((('us_gray', 'L', False, 'published'),
                                                    ('derm_rgb', 'RGB', False, 'inbox'),
                                                    ('derm_rgb_progressive', 'RGB', True, 'published'))):
        n = 1 if mode == 'L' else 3
        arr = np.stack([(pattern(256, 320, 30 + i + k) * 256).astype(np.uint8) for k in range(n)], -1)
        img = Image.fromarray(arr[:, :, 0] if n == 1 else arr)
        bio = io.BytesIO()
        img.save(bio, 'JPEG', quality=88, progressive=prog)
        data = bio.getvalue()
        ref = np.asarray(Image.open(io.BytesIO(data)))
        refc = ref[None, None] if n == 1 else ref.transpose(2, 0, 1)[None]
        c.resource('sample', 'files/%s.jpg' % name, data, mimetype='image/jpeg',
                   modality='US' if n == 1 else 'XC', channel='photos', tags=['jpeg'],
                   status=status, metadata={'width': 320, 'height': 256},
                   annotations=[{'type': 'category', 'identifier': 'BIRADS', 'value': str(2 + i)}],
                   format='jpeg', progressive=prog, dtype='uint8', shape=[1, n, 256, 320],
                   compare='psnr', reference='Pillow %s (libjpeg-turbo)' % Image.__version__,
                   pixels_sha256=pixels_sha256(refc, 'uint8'))
    # NIfTI volumes, one with a volume segmentation (label map, §3.6 volume upload).
    nx, ny, nz2 = 64, 48, 12
    yy, xx = np.mgrid[0:ny, 0:nx]
    vol = np.stack([(np.hypot(xx - 32, yy - 24) * 20 + z * 50 - 900) for z in range(nz2)], -1)
    vol = vol.transpose(1, 0, 2).astype(np.int16)  # (x, y, z)
    seg = np.zeros(vol.shape, np.uint8)
    seg[20:40, 14:30, 3:9] = 1
    seg[44:52, 20:28, 5:7] = 2
    mrel, _ = c.mask('sample', 'masks/brain_seg.nii.gz', gz(nifti_bytes(seg, 1)), format='nifti1',
                     gzip=True, dtype='uint8', shape=[nz2, 1, ny, nx],
                     pixels_sha256=pixels_sha256(seg.transpose(2, 1, 0)[:, None], 'uint8'),
                     segmentation_map={'1': 'Tumor', '2': 'Edema'})
    c.resource('sample', 'files/brain_int16_scaled.nii.gz', gz(nifti_bytes(vol, 1, 1.0, -100.0)),
               mimetype=NIFTI_MIME, modality='MR', channel='nifti', tags=['nifti', 'brain'],
               metadata={'frame_count': nz2},
               annotations=[{'type': 'segmentation', 'identifier': 'Tumor', 'file': mrel,
                             'values': 1},
                            {'type': 'segmentation', 'identifier': 'Edema', 'file': mrel,
                             'values': 2},
                            {'type': 'label', 'identifier': 'tumor'}],
               format='nifti1', gzip=True, dtype='int16', shape=[nz2, 1, ny, nx],
               scl_slope=1.0, scl_inter=-100.0, compare='exact',
               pixels_sha256=pixels_sha256(vol.transpose(2, 1, 0)[:, None], 'int16'))
    f32 = (vol.astype(np.float32) / 7.0)
    c.resource('sample', 'files/perfusion_float32.nii', nifti_bytes(f32, 2), mimetype=NIFTI_MIME,
               modality='MR', channel='nifti', tags=['nifti'], metadata={'frame_count': nz2},
               annotations=[{'type': 'label', 'identifier': 'normal'}],
               format='nifti2', gzip=False, dtype='float32', shape=[nz2, 1, ny, nx],
               compare='exact', pixels_sha256=pixels_sha256(f32.transpose(2, 1, 0)[:, None], 'float32'))


def build_xray(c):
    """The Datamint guide's example data: 8 X-rays of one size, each with PatientSex and an
    image label 'fracture' or 'normal', so both guide examples (a DataLoader stacking the
    images, dicom_metainfo.PatientSex, 'fracture' in metainfo['labels']) run unchanged."""
    c.project('xray', 'Guide example: digital X-rays with PatientSex and fracture labels')
    for i in range(8):
        px = (pattern(64, 48, 60 + i) * 4000 + 100).astype(np.uint16)
        sex = 'F' if i % 3 else 'M'
        data = dicom_bytes(px, pixel_repr=0, modality='DX', key=('xray', 'dx', i), z=i,
                           sop_class='1.2.840.10008.5.1.4.1.1.1.1',
                           extra={'PatientSex': sex, 'BodyPartExamined': 'HAND'})
        label = 'fracture' if i % 2 == 0 else 'normal'
        c.resource('xray', 'files/xr_%02d.dcm' % i, data, mimetype='application/dicom',
                   modality='DX', channel='xray', tags=['xray'],
                   metadata={'width': 48, 'height': 64},
                   annotations=[{'type': 'label', 'identifier': label}], format='dicom',
                   transfer_syntax=TS['explicit'], dtype='uint16', shape=[1, 1, 64, 48],
                   compare='exact', pixels_sha256=pixels_sha256(px[None, None], 'uint16'),
                   patient_sex=sex)


def build_bad(c, tmpdir):
    """Inputs a decoder must refuse cleanly (docs/reliability.md X1, X2, X5)."""
    c.project('bad', 'Truncated, wrong-magic, size-bomb and hostile-metadata inputs')

    def bad(rel, data, mime, fmt, expect, what, **kw):
        c.resource('bad', 'files/' + rel, data, mimetype=mime, modality='OT', channel='bad',
                   tags=['bad', expect], format=fmt, valid=False, expect=expect, bad=what, **kw)

    hu = ct_slice(0, 1, 128)[0]
    dcm = dicom_bytes(hu, pixel_repr=1, key=('bad', 'ct', 0))
    dcm_ls = gdcmconv(dcm, 'jpeg-ls', tmpdir, 'bad_ls')
    png8, _, _ = png_variant('gray8', 0, 8, 1, 128, 128, 1)
    rgb = np.stack([(pattern(128, 160, s) * 256).astype(np.uint8) for s in (1, 2, 3)], -1)
    bio = io.BytesIO()
    Image.fromarray(rgb).save(bio, 'JPEG', quality=85)
    jpg = bio.getvalue()
    nii = nifti_bytes(hu[:, :, None].astype(np.int16).repeat(4, 2), 1)
    niigz = gz(nii)

    # Truncated files of each format.
    bad('truncated_ct.dcm', dcm[:len(dcm) * 6 // 10], 'application/dicom', 'dicom',
        'decode_failed', 'truncated at 60%: PixelData shorter than Rows*Columns*2')
    bad('truncated_ct_jpegls.dcm', dcm_ls[:len(dcm_ls) // 2], 'application/dicom', 'dicom',
        'decode_failed', 'JPEG-LS DICOM truncated at 50% inside the codestream')
    bad('truncated_header.dcm', dcm[:200], 'application/dicom', 'dicom', 'decode_failed',
        'truncated inside the file meta group')
    bad('truncated.png', png8[:len(png8) // 2], 'image/png', 'png', 'decode_failed',
        'truncated inside IDAT, no IEND')
    bad('truncated.jpg', jpg[:len(jpg) // 2], 'image/jpeg', 'jpeg', 'decode_failed',
        'truncated at 50%: no EOI (libjpeg-turbo warns "premature end of data")')
    bad('truncated.nii', nii[:352 + 1000], NIFTI_MIME, 'nifti1', 'decode_failed',
        'header intact, voxel data 1000 of %d bytes' % (len(nii) - 352))
    bad('truncated.nii.gz', niigz[:len(niigz) // 2], NIFTI_MIME, 'nifti1', 'decode_failed',
        'gzip stream cut in half (no trailer)')
    bad('empty.dcm', b'', 'application/dicom', 'dicom', 'decode_failed', 'zero bytes')
    bad('only_soi.jpg', b'\xff\xd8', 'image/jpeg', 'jpeg', 'decode_failed', 'SOI marker only')
    # Wrong magic.
    bad('bad_magic.png', b'\x89PNX' + png8[4:], 'image/png', 'png', 'decode_failed',
        'PNG signature altered')
    bad('bad_magic.jpg', b'\x00\x00' + jpg[2:], 'image/jpeg', 'jpeg', 'decode_failed',
        'SOI marker replaced by zeros')
    bad('bad_magic.dcm', dcm[:128] + b'DICX' + dcm[132:], 'application/dicom', 'dicom',
        'decode_failed', "'DICX' instead of 'DICM' at offset 128")
    bad('bad_magic.nii', nii[:344] + b'x+1\x00' + nii[348:], NIFTI_MIME, 'nifti1', 'decode_failed',
        "magic 'x+1' instead of 'n+1'")
    bad('bad_sizeof_hdr.nii', struct.pack('<i', 123) + nii[4:], NIFTI_MIME, 'nifti1',
        'decode_failed', 'sizeof_hdr 123 instead of 348')
    crc_png = bytearray(png8)
    crc_png[29] ^= 0xFF  # last byte of the IHDR CRC
    bad('bad_crc.png', bytes(crc_png), 'image/png', 'png', 'decode_failed', 'IHDR CRC wrong')
    # Declared sizes far beyond the data.
    j = bytearray(jpg)
    i = 2
    while i < len(j):
        marker, seglen = j[i + 1], struct.unpack('>H', j[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC2):
            j[i + 5:i + 9] = struct.pack('>HH', 65500, 65500)
            break
        i += 2 + seglen
    bad('huge_65500.jpg', bytes(j), 'image/jpeg', 'jpeg', 'limit_exceeded',
        'SOF declares 65500x65500 (12 GiB RGB) over a 160x128 bitstream',
        declared_shape=[1, 3, 65500, 65500])
    ihdr = struct.pack('>IIBBBBB', 10 ** 6, 10 ** 6, 8, 2, 0, 0, 0)
    hpng = b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', ihdr) + \
        _png_chunk(b'IDAT', zlib.compress(b'\x00' * 3001 * 4)) + _png_chunk(b'IEND', b'')
    bad('huge_1e6.png', hpng, 'image/png', 'png', 'limit_exceeded',
        'IHDR declares 1,000,000 x 1,000,000 RGB (3 TB) with 4 rows of data',
        declared_shape=[1, 3, 10 ** 6, 10 ** 6])
    h1 = nib.Nifti1Header()
    h1.set_data_dtype(np.int16)
    h1['dim'] = [3, 32767, 32767, 32767, 1, 1, 1, 1]
    h1['vox_offset'] = 352
    h1['magic'] = b'n+1'
    hn = h1.binaryblock + b'\x00' * 4 + b'\x00' * 25
    bad('huge_dims.nii', hn, NIFTI_MIME, 'nifti1', 'limit_exceeded',
        '377-byte NIfTI-1 declaring 32767^3 int16 voxels (70 TB)', declared_shape=[32767, 1, 32767, 32767])
    h2 = nib.Nifti2Header()
    h2.set_data_dtype(np.float64)
    h2['dim'] = [3, 1 << 40, 1 << 20, 1 << 10, 1, 1, 1, 1]
    h2['vox_offset'] = 544
    h2['magic'] = b'n+2'
    bad('huge_dims_nifti2.nii', h2.binaryblock + b'\x00' * 4 + b'\x00' * 64, NIFTI_MIME, 'nifti2',
        'limit_exceeded', 'NIfTI-2 declaring 2^40 x 2^20 x 2^10 float64 voxels (64-bit overflow bait)',
        declared_shape=[1 << 10, 1, 1 << 20, 1 << 40])
    hb = nib.Nifti1Header()
    hb.set_data_dtype(np.uint8)
    hb.set_data_shape((1024, 1024, 256))
    hb['vox_offset'] = 352
    hb['magic'] = b'n+1'
    zc = zlib.compressobj(9, zlib.DEFLATED, 31)
    zc_parts = [zc.compress(hb.binaryblock + b'\x00' * 4)]
    zero = b'\x00' * (1 << 20)
    for _ in range(256):
        zc_parts.append(zc.compress(zero))
    zc_parts.append(zc.flush())
    bomb = b''.join(zc_parts)
    bomb = bomb[:4] + b'\x00\x00\x00\x00' + bomb[8:]  # gzip mtime 0 (already 0 with wbits 31)
    bad('bomb.nii.gz', bomb, NIFTI_MIME, 'nifti1', 'limit_exceeded',
        'gzip bomb: %d bytes inflate to 256 MiB + 352 (ratio ~%d:1); header consistent'
        % (len(bomb), (256 << 20) // len(bomb)), declared_shape=[256, 1, 1024, 1024],
        inflated_size=(256 << 20) + 352)
    # DICOM size bombs.
    ds = pydicom.dcmread(io.BytesIO(dcm))
    ds.Rows = 65535
    ds.Columns = 65535
    ds['Rows'].VR = 'UL'
    ds['Columns'].VR = 'UL'
    ds.NumberOfFrames = '2147483648'
    bio = io.BytesIO()
    ds.save_as(bio, write_like_original=True)
    bad('huge_frames_ul.dcm', bio.getvalue(), 'application/dicom', 'dicom', 'limit_exceeded',
        'Rows/Columns encoded as UL 65535, NumberOfFrames 2^31, 32 KiB of PixelData',
        declared_shape=[1 << 31, 1, 65535, 65535])
    ds = pydicom.dcmread(io.BytesIO(dcm))
    ds.Rows = 65535
    ds.Columns = 65535
    bio = io.BytesIO()
    ds.save_as(bio, write_like_original=True)
    bad('huge_rows.dcm', bio.getvalue(), 'application/dicom', 'dicom', 'limit_exceeded',
        'Rows=Columns=65535 (8 GiB) with 32 KiB of PixelData', declared_shape=[1, 1, 65535, 65535])
    pos = dcm.rfind(b'\xe0\x7f\x10\x00OW')
    beyond = dcm[:pos + 8] + struct.pack('<I', 100 << 20) + dcm[pos + 12:]
    bad('pixeldata_len_beyond_eof.dcm', beyond, 'application/dicom', 'dicom', 'decode_failed',
        'PixelData length field says 100 MiB, file ends after 32 KiB')
    # CPU bomb: progressive JPEG with far more than 100 scans (libjpeg-turbo LJT-01-003).
    # cjpeg accepts at most 100 scans in a script; the AC scans are then repeated, which
    # libjpeg-turbo decodes (with a "bogus progression" warning) at full cost per scan.
    scans = ['0,1,2: 0-0, 0, 0;']
    for k in range(1, 34):
        for comp in range(3):
            scans.append('%d: %d-%d, 0, 0;' % (comp, k, k))
    sfile = os.path.join(tmpdir, 'scans.txt')
    with open(sfile, 'w') as f:
        f.write('\n'.join(scans) + '\n')
    ppm = os.path.join(tmpdir, 'in.ppm')
    big = np.stack([(pattern(768, 1024, s) * 256).astype(np.uint8) for s in (7, 8, 9)], -1)
    Image.fromarray(big).save(ppm)
    prog = subprocess.run(['cjpeg', '-quality', '85', '-sample', '1x1', '-scans', sfile, ppm],
                          check=True, stdout=subprocess.PIPE).stdout
    blocks = jpeg_scan_blocks(prog)
    head, scan_blocks = prog[:blocks[0][0]], [prog[a:b] for a, b in blocks]
    many = head + scan_blocks[0] + b''.join(scan_blocks[1:]) * 6 + b'\xff\xd9'
    nscans = 1 + (len(scan_blocks) - 1) * 6
    bad('many_scans.jpg', many, 'image/jpeg', 'jpeg', 'decode_ok_or_limit_exceeded',
        'progressive JPEG with %d scans (AC scans repeated): must finish within 2 s or be '
        'refused' % nscans, scans=nscans, dtype='uint8', shape=[1, 3, 768, 1024])
    # Hostile metadata: path-like UIDs and file name (docs/reliability.md X5).
    ds = pydicom.dcmread(io.BytesIO(dcm))
    ds.SOPInstanceUID = '../../../../etc/passwd'
    ds.SeriesInstanceUID = '/tmp/dmcache-evil'
    ds.StudyInstanceUID = '1.2.' + '9' * 60
    bio = io.BytesIO()
    ds.save_as(bio, write_like_original=True)
    c.resource('bad', 'files/path_injection.dcm', bio.getvalue(),
               filename='../../../tmp/dmcache-evil/..\\x.dcm', mimetype='application/dicom',
               modality='CT', channel='bad', tags=['bad', 'hostile_metadata'], format='dicom',
               valid=True, expect='decode_ok', bad='UIDs with ../ and absolute paths; file name '
               'with ../ and a backslash: nothing may be created outside the cache',
               dtype='int16', shape=[1, 1, 128, 128], compare='exact',
               pixels_sha256=pixels_sha256(hu[None, None], 'int16'))


def main():
    if sys.argv[1:] == ['--reference-digests']:
        return _reference_digests_main()
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('outdir')
    ap.add_argument('--stamp', help='file touched when the corpus is complete (for meson)')
    ap.add_argument('--jobs', type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    for tool in ('gdcmconv', 'cjpeg'):
        if not shutil.which(tool):
            sys.exit('gen_corpus: %s not found: run scripts/install-deps.sh' % tool)
    out = os.path.abspath(args.outdir)
    tmp = out + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    c = Corpus(tmp)
    with tempfile.TemporaryDirectory(prefix='dmc-corpus-') as work:
        build_sample(c, work)
        build_pydicom(c)
        build_ct(c, work, args.jobs)
        build_formats(c, work)
        build_bad(c, work)
        build_xray(c)
    c.finish()
    old = out + '.old'
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(out):
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    if args.stamp:
        with open(args.stamp, 'w') as f:
            f.write('%d files\n' % len(c.manifest))
    total = sum(e['size'] for e in c.manifest)
    print('gen_corpus: %d files, %.1f MB in %s' % (len(c.manifest), total / 1e6, out))


if __name__ == '__main__':
    main()
