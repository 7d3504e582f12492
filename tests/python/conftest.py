"""Fixtures of the dmcache package's tests: the Datamint emulator on the corpus and the
real dmcached (tests/integration/conftest.py's Daemon, waited for via NOTIFY_SOCKET)."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(TESTS, 'emulator'))
sys.path.append(os.path.join(TESTS, 'integration'))  # modload; last: never shadows ours
import client as emulator  # noqa: E402
import modload  # noqa: E402

integration = modload.integration_conftest()

KEY = emulator.KEY_ALL
PYTHON = sys.executable
ARENA = 32 << 20  # the arena the Loader tests ask for (arena_bytes=)


def daemon_env_fixup(env):
    """The daemon is a sanitised binary of its own: it gets the caller's ASAN_OPTIONS back
    (without what meson appended for the interpreter) and no preloaded runtime."""
    appended = os.environ.get('DMC_PY_ASAN_APPENDED')
    if appended:
        env.pop('LD_PRELOAD', None)
        opts = env.get('ASAN_OPTIONS', '')
        if opts.endswith(appended):
            opts = opts[:-len(appended)].rstrip(':')
        if opts:
            env['ASAN_OPTIONS'] = opts
        else:
            env.pop('ASAN_OPTIONS', None)


def start_daemon(directory, args=(), emu=None, asan_options=None):
    d = integration.Daemon(directory, args=args, start=False)
    daemon_env_fixup(d.env)
    if asan_options:
        d.env['ASAN_OPTIONS'] = ':'.join(x for x in (d.env.get('ASAN_OPTIONS'),
                                                     asan_options) if x)
    if emu is not None:
        d.env.update(DATAMINT_API_KEY=KEY, DATAMINT_API_URL=emu.url)
    d.start()
    return d


@pytest.fixture(scope='session')
def emu():
    e = emulator.Emulator()
    e.start()
    yield e
    assert e.stop() == 0


@pytest.fixture(scope='module')
def daemon(emu):
    """One daemon per test module, the package's environment pointed at it."""
    with tempfile.TemporaryDirectory(prefix='dmc-') as d:
        dm = start_daemon(d, emu=emu)
        old = {k: os.environ.get(k) for k in ('DMCACHE_SOCKET', 'DATAMINT_API_KEY',
                                                'DATAMINT_API_URL')}
        os.environ.update(DMCACHE_SOCKET=dm.socket, DATAMINT_API_KEY=KEY,
                          DATAMINT_API_URL=emu.url)
        try:
            yield dm
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            rc, _ = dm.stop()
            dm.notify.close()
            assert rc == 0, 'dmcached exited with %r:\n%s' % (rc, dm.log())


@pytest.fixture
def tmpdir_short():
    with tempfile.TemporaryDirectory(prefix='dmc-') as d:
        yield d


def counters(socket_path):
    import dmcache
    c = dmcache.Client(socket_path)
    try:
        return c.status()['counters']
    finally:
        c.close()


def project_files(emu, project):
    return os.path.join(emu.corpus, 'projects', project, 'files')


def reference(path):
    """(array (F, C, H, W), lossy) from an independent decoder: pydicom, Pillow, nibabel."""
    name = path.lower()
    if name.endswith('.dcm'):
        import pydicom
        ds = pydicom.dcmread(path)
        a = ds.pixel_array
        n = int(getattr(ds, 'NumberOfFrames', 1) or 1)
        spp = int(ds.SamplesPerPixel)
        if spp == 1:
            a = a.reshape(n, 1, a.shape[-2], a.shape[-1])
        else:
            a = a.reshape(n, a.shape[-3], a.shape[-2], spp).transpose(0, 3, 1, 2)
        return a, False
    if name.endswith(('.png', '.jpg', '.jpeg')):
        from PIL import Image
        a = np.asarray(Image.open(path))
        if a.dtype == np.int32:
            # Pillow 9 opens 16-bit grayscale PNG as 32-bit ("I"): same values
            assert a.min() >= 0 and a.max() < 65536
            a = a.astype(np.uint16)
        a = a[None, None] if a.ndim == 2 else a.transpose(2, 0, 1)[None]
        return a, name.endswith(('.jpg', '.jpeg'))
    import nibabel
    img = nibabel.load(path)
    a = np.asanyarray(img.dataobj.get_unscaled())  # stored values, as without lut
    return a.T.reshape(-1, 1, a.shape[1], a.shape[0]), False


@pytest.fixture(scope='module')
def ct_reference(daemon, emu):
    """{index: int32 array (F, C, H, W)} of every item of the corpus project 'ct' (72 CT
    slices), decoded by pydicom from the emulator's files (lossless)."""
    import dmcache
    root = os.path.join(emu.corpus, 'projects', 'ct')
    with open(os.path.join(root, 'project.json')) as f:
        by_id = {r['id']: r for r in json.load(f)['resources']}
    loader = dmcache.Loader('ct', batch_size=8, arena_bytes=ARENA, collate='list')
    out = {}
    for b in loader:
        for m, i in zip(b.meta, b.indices):
            a, lossy = reference(os.path.join(root, by_id[m['resource']['id']]['file']))
            assert not lossy
            out[i] = a.astype(np.int32)
    loader.close()
    assert len(out) == 72
    return out


def expect_batch(ref, indices):
    """The stacked tensor of ct_reference's items `indices`: what a batch must equal."""
    import torch
    return torch.from_numpy(np.stack([ref[i] for i in indices]))


def datamint_normalize(a):
    """The Datamint client's dtype conversions, written out again: uint16 -> per-image
    min-max uint8, then uint8 -> float32 / 255; other dtypes unchanged."""
    if a.dtype == np.uint16:
        if a.max() > a.min():
            a = ((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)
        else:
            a = np.zeros_like(a, dtype=np.uint8)
    if a.dtype == np.uint8:
        import torch
        return torch.from_numpy(a.copy()).to(torch.float32).div(255).numpy()
    return a


def psnr(a, b, peak):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 99.0 if mse == 0 else 10 * np.log10(peak ** 2 / mse)


def make_dicom_folder(root, name, n, rows=48, cols=40, seed=1, dtype=np.uint16):
    """A local dataset folder as the Datamint client writes it: <root>/<name>/dataset.json
    and images/*.dcm, with PatientSex and 'fracture' labels. Returns the per-file facts."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    folder = os.path.join(root, name)
    os.makedirs(os.path.join(folder, 'images'))
    rng = np.random.default_rng(seed)
    facts, resources = {}, []
    for i in range(n):
        px = rng.integers(100, 4000, size=(rows, cols)).astype(dtype)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = '1.2.840.10008.5.1.4.1.1.1.1'  # digital X-ray
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = os.path.join(folder, 'images', 'xr%02d.dcm' % i)
        ds = FileDataset(path, {}, file_meta=meta, preamble=b'\0' * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = 'DX'
        ds.PatientName = 'Test^%d' % i
        ds.PatientID = 'P%02d' % i
        ds.PatientSex = 'F' if i % 3 else 'M'
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = 'MONOCHROME2'
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if dtype == np.int16 else 0
        ds.PixelData = px.tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)
        labels = ['fracture'] if i % 2 == 0 else ['normal']
        rid = 'res-%02d' % i
        resources.append({'id': rid, 'file': 'images/xr%02d.dcm' % i, 'labels': labels})
        facts[path] = {'id': rid, 'sex': ds.PatientSex, 'fracture': i % 2 == 0}
    with open(os.path.join(folder, 'dataset.json'), 'w') as f:
        json.dump({'resources': resources}, f)
    return facts


def run_python(code, env=None, timeout=120):
    """A fresh interpreter (the test's environment) running `code`."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([PYTHON, '-c', code], env=e, capture_output=True, text=True,
                          timeout=timeout)
