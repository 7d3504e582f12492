"""dmcache.Dataset against the real daemon: the Datamint user guide's examples, items equal
to independent decoders, DataLoader workers, errors, unsupported options, the arena seal."""
import errno
import json
import os
import pickle
import textwrap

import numpy as np
import pytest
import torch

import dmcache
from conftest import (KEY, counters, datamint_normalize, emulator, make_dicom_folder,
                      project_files, psnr, reference, run_python)

# The guide's examples (seeds/datamint-client-api.rst, "Dataset"), verbatim but for the
# import line, the placeholders the guide asks to fill in, and its "do something with the
# batch" comment, which becomes a line recording the batch.
GUIDE_SUBCLASS = '''
import datamintapi
import torch
from torchvision.transforms import ToTensor
from torch.utils.data import DataLoader


class XrayFractureDataset(datamintapi.Dataset):
    def __getitem__(self, idx):
        image, dicom_metainfo, metainfo = super().__getitem__(idx)

        # Get all relevant information from the dicom_metainfo object
        patient_sex = dicom_metainfo.PatientSex

        # Get all relevant information from the metainfo object
        has_fracture = 'fracture' in metainfo['labels']
        has_fracture = torch.tensor(has_fracture, dtype=torch.int32)

        return image, patient_sex, has_fracture


# Create an instance of your custom dataset
dataset = XrayFractureDataset(root='data',
                              dataset_name='YOUR_DATASET_NAME',
                              version='latest',
                              api_key='my_api_key',
                              transform=ToTensor())

# Create a DataLoader to handle batching and shuffling of the dataset
dataloader = DataLoader(dataset,
                        batch_size=4,
                        shuffle=True)

for images, patients_sex, labels in dataloader:
    images = images.to(device)
    # labels will already be a tensor of shape (batch_size,) containing 0s and 1s

    # (...) do something with the batch
'''

GUIDE_FULL = '''
import datamintapi
import torch
from torchvision.transforms import ToTensor
from torch.utils.data import DataLoader


# Set the device
device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')


# Create an instance of the datamintapi.Dataset
dataset = datamintapi.Dataset(root='data',
                            dataset_name='TestCTdataset',
                            version='latest',
                            api_key='my_api_key',
                            transform=ToTensor()
                            )

# This function tells the dataloader how to group the items in a batch
def collate_fn(batch):
    images = [item[0] for item in batch]
    dicom_metainfo = [item[1] for item in batch]
    metainfo = [item[2] for item in batch]

    return torch.stack(images), dicom_metainfo, metainfo


# Create a DataLoader to handle batching and shuffling of the dataset
dataloader = DataLoader(dataset,
                        batch_size=4,
                        collate_fn=collate_fn,
                        shuffle=True)

for images, dicom_metainfo, metainfo in dataloader:
    images = images.to(device)
    metainfo = metainfo

    # (... do something with the batch)
'''


def run_guide(code, dataset_name, api_key, record):
    code = code.replace('import datamintapi\n', 'import dmcache as datamintapi\n')
    code = code.replace("'YOUR_DATASET_NAME'", repr(dataset_name))
    code = code.replace("'TestCTdataset'", repr(dataset_name))
    code = code.replace("'my_api_key'", repr(api_key))
    code = code.replace('# (...) do something with the batch', 'seen.append(%s)' % record)
    code = code.replace('# (... do something with the batch)', 'seen.append(%s)' % record)
    assert 'seen.append' in code and 'dmcache' in code
    ns = {'device': torch.device('cpu'), 'seen': []}
    exec(compile(code, '<guide>', 'exec'), ns)
    return ns['seen'], ns['dataset']


def to_tensor_reference(path):
    """What the Datamint client's Dataset with transform=ToTensor() gives for a file:
    pydicom's pixels, its dtype conversion, torchvision's ToTensor."""
    from torchvision.transforms import ToTensor
    a, _ = reference(path)
    a = datamint_normalize(a)
    f, c, h, w = a.shape
    return ToTensor()(a.transpose(2, 3, 0, 1).reshape(h, w, f * c))


def test_guide_subclass_example_on_a_local_folder(daemon, tmp_path, monkeypatch):
    facts = make_dicom_folder(str(tmp_path / 'data'), 'xrays', 10)
    monkeypatch.chdir(tmp_path)  # the guide's root='data' is relative
    seen, dataset = run_guide(GUIDE_SUBCLASS, 'xrays', 'my_api_key',
                              '(images, patients_sex, labels)')
    assert len(dataset) == 10 and dataset.project_name == 'xrays'
    refs = {p: to_tensor_reference(p) for p in facts}
    found = []
    for images, sexes, labels in seen:
        assert images.dtype == torch.float32 and images.shape[1:] == (1, 48, 40)
        assert labels.dtype == torch.int32 and labels.shape == (len(sexes),)
        for img, sex, lab in zip(images, sexes, labels):
            match = [p for p, r in refs.items() if torch.equal(r, img)]
            assert len(match) == 1
            found.append(match[0])
            assert sex == facts[match[0]]['sex']
            assert bool(lab) == facts[match[0]]['fracture']
    assert sorted(found) == sorted(facts)  # every item once
    assert [len(b[1]) for b in seen] == [4, 4, 2]


def test_guide_full_example_on_a_datamint_project(daemon, emu, tmp_path, monkeypatch):
    (tmp_path / 'data').mkdir()  # the guide's root='data': a directory, as the client needs
    monkeypatch.chdir(tmp_path)
    seen, dataset = run_guide(GUIDE_FULL, 'ct', KEY,
                              '(images, dicom_metainfo, metainfo)')
    project = os.path.join(emu.corpus, 'projects', 'ct')
    assert len(dataset) == 72
    names = []
    for images, dicoms, metas in seen:
        assert images.shape[1:] == (1, 512, 512) and len(dicoms) == len(metas)
        for img, dcm, meta in zip(images, dicoms, metas):
            path = os.path.join(project, meta['source_filepath'])
            ref = to_tensor_reference(path)
            # int16 slices stay int16; torch.stack promotes a batch that mixes them with
            # converted uint16 slices to float32, exactly
            assert torch.equal(img, ref.to(img.dtype)), meta['filename']
            if ref.dtype == torch.int16 and img.dtype == torch.float32:
                assert torch.equal(img.to(torch.int16), ref)
            import pydicom
            ref_ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert isinstance(dcm, pydicom.Dataset)
            assert dcm.SOPInstanceUID == ref_ds.SOPInstanceUID
            assert dcm.Rows == ref_ds.Rows and dcm.PatientName == ref_ds.PatientName
            assert dcm.PixelData is None  # as the client returns it (let go once decoded)
            names.append(meta['source_filepath'])
    assert len(set(names)) == 72


def test_items_equal_independent_decoders(daemon, emu):
    ds = dmcache.Dataset(dataset_name='sample')
    files = project_files(emu, 'sample')
    records = {r['filename']: r for r in emulator.request(
        emu.url, path='/projects/%s/resources' % emu.project('sample')['id'], key=KEY).json()}
    assert len(ds) == 19
    kinds = set()
    for i in range(len(ds)):
        image, dcm, meta = ds[i]
        name = meta['filename']
        ref, lossy = reference(os.path.join(files, name))
        raw, raw_meta = ds.read(i)
        assert raw_meta['resource']['id'] == meta['id']
        assert raw.dtype == ref.dtype and raw.shape == ref.shape, name
        if lossy:
            assert psnr(raw, ref, 255.0) >= 50, name
        else:
            assert np.array_equal(raw, ref), name
            expect = datamint_normalize(ref)
            assert isinstance(image, torch.Tensor)
            assert image.numpy().dtype == expect.dtype and np.array_equal(image.numpy(), expect)
        kinds.add(image.dtype)
        assert meta['labels'] == records[name]['labels']
        if name.endswith('.dcm'):
            import pydicom
            r = pydicom.dcmread(os.path.join(files, name), stop_before_pixels=True)
            assert dcm.SOPInstanceUID == r.SOPInstanceUID and dcm.Modality == r.Modality
            assert dcm.get('PatientSex') == r.get('PatientSex')
        else:
            assert dcm is None
    # int16 CT and NIfTI pass through; 8- and 16-bit images become float32 in [0, 1]
    assert kinds == {torch.int16, torch.float32}
    image = ds[10][0]  # xray_gray8.png
    assert image.dtype == torch.float32 and 0 <= float(image.min()) <= float(image.max()) <= 1
    assert ds[-1][2]['filename'] == ds[18][2]['filename']
    with pytest.raises(IndexError):
        ds[19]
    ds.close()


def test_uint16_min_max_edge_cases():
    flat = np.full((1, 1, 3, 3), 700, np.uint16)
    assert dmcache.normalize(flat).dtype == np.float32 and not dmcache.normalize(flat).any()
    a = np.array([[[[0, 65535], [1, 2]]]], np.uint16)
    assert np.array_equal(dmcache.normalize(a), datamint_normalize(a))
    i16 = np.array([[[[-1000, 3000]]]], np.int16)
    out = dmcache.normalize(i16)
    assert out.dtype == np.int16 and np.array_equal(out, i16) and out is not i16


def test_without_pydicom_and_torch(daemon, emu):
    code = textwrap.dedent('''
        import sys, json
        sys.modules['pydicom'] = None
        sys.modules['torch'] = None
        import numpy as np
        import dmcache
        ds = dmcache.Dataset(dataset_name='sample')
        image, dcm, meta = ds[9]          # MR_small.dcm
        assert isinstance(image, np.ndarray) and image.dtype == np.int16
        out = {'shape': image.shape, 'type': type(dcm).__name__,
               'sex': dcm.PatientSex, 'name': dcm.PatientName, 'rows': dcm.Rows,
               'spacing': dcm.PixelSpacing, 'tag': dcm[0x0010, 0x0040],
               'has_sex': 0x00100040 in dcm, 'file': meta['filename']}
        try:
            dcm.NoSuchKeyword
        except AttributeError:
            out['missing'] = True
        png = ds[10]
        out['png'] = [png[0].dtype.name, png[1] is None]
        print(json.dumps(out))
    ''')
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    import pydicom
    ref = pydicom.dcmread(os.path.join(project_files(emu, 'sample'), out['file']))
    assert out['type'] == 'DicomMeta' and out['missing']
    assert out['sex'] == ref.PatientSex == out['tag'] and out['has_sex']
    assert out['name'] == str(ref.PatientName) and out['rows'] == ref.Rows
    assert [float(x) for x in out['spacing']] == [float(x) for x in ref.PixelSpacing]
    assert out['png'] == ['float32', True]


def test_fallback_keywords_match_the_dicom_dictionary():
    from pydicom.datadict import tag_for_keyword
    from dmcache import _dicom
    assert len(_dicom.KEYWORDS) > 100
    for kw, tag in _dicom.KEYWORDS.items():
        assert tag_for_keyword(kw) == tag, kw


def test_dataloader_with_two_workers(daemon):
    ds = dmcache.Dataset(dataset_name='sample')
    single = {i: ds.read(i)[0] for i in range(len(ds))}
    before = counters(daemon.socket)['connections_accepted_total']
    # nothing large travels to the workers
    assert len(pickle.dumps(ds)) < 4096

    class Indexed(dmcache.Dataset):
        def __getitem__(self, idx):
            return idx, self.read(idx)[0], os.getpid()

    ix = Indexed(dataset_name='sample', version=ds.version)
    loader = torch.utils.data.DataLoader(ix, batch_size=3, shuffle=True, num_workers=2,
                                         collate_fn=dmcache.collate)
    seen, pids = [], set()
    for idx, images, p in loader:
        for i, img in zip(idx, images if isinstance(images, list) else list(images)):
            assert np.array_equal(img, single[int(i)])
            seen.append(int(i))
        pids.update(p)
    assert sorted(seen) == list(range(19))
    assert len(pids) == 2 and os.getpid() not in pids
    # one connection per worker process (the parent's was made before)
    assert counters(daemon.socket)['connections_accepted_total'] - before >= 3


def test_spawned_workers_and_pinned_version(daemon, tmp_path):
    make_dicom_folder(str(tmp_path), 'spawned', 4)
    ds = dmcache.Dataset(root=str(tmp_path), dataset_name='spawned')
    assert ds.version.startswith('mtime:')
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2,
                                         multiprocessing_context='spawn',
                                         collate_fn=dmcache.collate)
    batches = list(loader)
    assert len(batches) == 2
    images = torch.cat([b[0] for b in batches])
    assert images.shape == (4, 1, 1, 48, 40) and images.dtype == torch.float32
    assert [m['id'] for b in batches for m in b[2]] == ['res-%02d' % i for i in range(4)]


def test_errors_carry_code_message_and_resource(daemon, tmp_path, emu):
    with pytest.raises(dmcache.NotFoundError) as e:
        dmcache.Dataset(dataset_name='no-such-project')
    assert e.value.code == 1003 and e.value.name == 'not_found_or_denied'
    assert 'no-such-project' in str(e.value) and 'not_found_or_denied' in str(e.value)
    with pytest.raises(dmcache.NotFoundError):
        dmcache.Dataset(dataset_name='ct', api_key=emulator.KEY_SAMPLE)
    with pytest.raises(dmcache.ConnectError) as e:
        dmcache.Dataset(dataset_name='sample', socket=str(tmp_path / 'none.sock'))
    assert e.value.code == errno.ENOENT and e.value.name == 'ENOENT'
    assert isinstance(e.value, ConnectionError)
    # an item the decoder refuses: its own error, with the item index; others still work
    make_dicom_folder(str(tmp_path), 'broken', 3)
    with open(str(tmp_path / 'broken' / 'images' / 'xr01.dcm'), 'r+b') as f:
        f.truncate(200)
    ds = dmcache.Dataset(root=str(tmp_path), dataset_name='broken')
    with pytest.raises(dmcache.DecodeError) as e:
        ds[1]
    assert e.value.code == 1009 and e.value.index == 1 and 'decode_failed' in str(e.value)
    assert ds[2][0].shape == (1, 1, 48, 40)
    # errors survive pickling (DataLoader workers) with their fields
    err = pickle.loads(pickle.dumps(e.value))
    assert type(err) is dmcache.DecodeError and err.code == 1009 and err.index == 1
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1)
    with pytest.raises(dmcache.DecodeError) as e:
        list(loader)
    assert 'decode_failed' in str(e.value)


def test_unsupported_options_are_refused_by_name(daemon):
    with pytest.raises(NotImplementedError) as e:
        dmcache.Dataset(dataset_name='sample', use_default_transform=True)
    assert 'use_default_transform' in str(e.value)
    # the client's own refusal (alb_transform needs return_frame_by_frame)
    with pytest.raises(NotImplementedError) as e:
        dmcache.Dataset(dataset_name='sample', alb_transform=object())
    assert 'albumentations' in str(e.value)
    # values that mean "off" are accepted
    ds = dmcache.Dataset(dataset_name='sample', return_frame_by_frame=False,
                         return_segmentations=False, include_unannotated=True)
    assert len(ds) == 19
    with pytest.raises(TypeError):
        dmcache.Dataset(dataset_name='sample', no_such_option=1)
    with pytest.raises(NotImplementedError) as e:
        dmcache.Dataset(dataset_name='sample', version=3)
    assert 'version' in str(e.value)


def test_return_flags_and_target_transform(daemon):
    ds = dmcache.Dataset(dataset_name='sample', return_dicom=False,
                         target_transform=lambda m: m['labels'])
    image, labels = ds[0]
    assert image.shape == (1, 1, 512, 512) and isinstance(labels, list)
    only = dmcache.Dataset(dataset_name='sample', return_dicom=False, return_metainfo=False,
                           normalize=False)[11]
    assert only.dtype == torch.int32 and only.shape == (1, 1, 256, 256)  # uint16 widened


def test_arena_cannot_be_shrunk_from_python(daemon):
    ds = dmcache.Dataset(dataset_name='sample')
    ds[0]
    fds = []
    for fd in os.listdir('/proc/self/fd'):
        try:
            if os.readlink('/proc/self/fd/' + fd).startswith('/memfd:dmcache-arena'):
                fds.append(int(fd))
        except FileNotFoundError:
            pass  # the descriptor listdir itself used
    assert fds
    for fd in fds:
        with pytest.raises(OSError) as e:
            os.ftruncate(fd, 4096)
        assert e.value.errno == errno.EPERM
    addr, size = ds._client.arena()
    assert addr and size == ds._ds.arena_bytes
    assert ds[0][0].shape == (1, 1, 512, 512)  # and serving goes on
    ds.close()


def test_frame_by_frame_items(daemon):
    whole = dmcache.Dataset(dataset_name='sample', normalize=False, return_dicom=False)
    frames = dmcache.Dataset(dataset_name='sample', normalize=False, return_dicom=False,
                             return_frame_by_frame=True)
    expect = []
    for i in range(len(whole)):
        a, meta = whole.read(i)
        for f in range(a.shape[0]):
            expect.append((a[f], meta['resource']['id'], f))
    # the Datamint client's length: the sum of every item's frames
    assert len(frames) == len(expect) > len(whole)
    for k, (a, rid, f) in enumerate(expect):
        image, info = frames[k]
        got = image.numpy() if hasattr(image, 'numpy') else image
        assert got.shape == a.shape and np.array_equal(got, a), k
        assert info['id'] == rid and info['frame_index'] == f
    # the Loader too, in batches of single frames
    loader = dmcache.Loader('sample', batch_size=4, return_frame_by_frame=True,
                            arena_bytes=32 << 20, copy=True, collate='list')
    assert loader.items == len(expect)
    k = 0
    for b in loader:
        imgs = b.images if isinstance(b.images, list) else list(b.images)
        for img, m in zip(imgs, b.meta):
            a, rid, f = expect[k]
            assert np.array_equal(np.asarray(img)[0], a)
            assert m['resource']['id'] == rid and m['frame'] == f
            k += 1
    assert k == len(expect)
    loader.close()
    for d in (whole, frames):
        d.close()


def test_segmentation_label_maps_equal_independent_decoders(daemon):
    """Every item's label map against Pillow (PNG masks) and nibabel (a NIfTI label map),
    painted here from the corpus' own files and annotations."""
    import nibabel
    from PIL import Image
    corpus = os.path.join(os.environ['DMC_BUILD_ROOT'], 'tests', 'data', 'corpus')
    with open(os.path.join(corpus, 'projects', 'sample', 'project.json')) as f:
        project = json.load(f)
    by_id = {r['id']: r for r in project['resources']}
    segs = [a for r in project['resources'] for a in r.get('annotations') or []
            if a.get('type') == 'segmentation']
    names = sorted({a['identifier'] for a in segs})
    ds = dmcache.Dataset(dataset_name='sample', normalize=False)
    painted = 0
    for i in range(len(ds)):
        image, meta = ds.read(i)
        labels, got_names = ds.segmentation(i)
        assert got_names == names
        f, _, h, w = image.shape
        assert labels.shape == (f, 1, h, w) and labels.dtype == np.uint8
        expect = np.zeros((f, 1, h, w), np.uint8)
        for a in by_id[meta['resource']['id']].get('annotations') or []:
            if a.get('type') != 'segmentation':
                continue
            path = os.path.join(corpus, 'projects', 'sample', a['file'])
            if path.endswith('.png'):
                m = np.asarray(Image.open(path))
                m = (m if m.ndim == 2 else m[..., 0])[None]
            else:
                m = np.asanyarray(nibabel.load(path).dataobj).T  # (z, y, x)
            hit = m == a['values'] if isinstance(a.get('values'), int) else m != 0
            code = names.index(a['identifier']) + 1
            if a.get('frame_index') is not None:
                expect[a['frame_index'], 0][hit[0]] = code
            else:
                for z in range(f):
                    expect[z, 0][hit[z if hit.shape[0] == f else 0]] = code
            painted += 1
        assert np.array_equal(labels, expect), i
    assert painted == 6 and len(names) == 4
    # the Loader reads label maps in batches too
    loader = dmcache.Loader('sample', batch_size=5, masks=True, arena_bytes=32 << 20,
                            copy=True, collate='list')
    for b in loader:
        for img, m, idx in zip(b.images if isinstance(b.images, list) else list(b.images),
                               b.meta, b.indices):
            assert np.array_equal(np.asarray(img), ds.segmentation(idx)[0])
            assert m['labels'] == names
    loader.close()
    ds.close()
