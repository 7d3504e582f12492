"""dmcache.Dataset as an exact drop-in for the Datamint client's Dataset (its seed-guide
era, late 2024: datamintapi/dataset.py), item by item against the emulator.

The expected values are computed here, independently of dmcache, the way the client's code
computes them: the client downloads the dataset folder (GET /datasets, the token stream of
GET /datasets/{id}/download/dicom, the ZIP of GET /datasets/download/{token}), and its
__getitem__ returns `images_metainfo[index]` (the folder's dataset.json entry) as metainfo
and `pydicom.dcmread(<folder>/<entry['file']>)` as dicom_metainfo; with
return_frame_by_frame it keeps `[ann for ann in annotations if ann['index'] == frame]`.
"""
import io
import json
import os
import tempfile
import zipfile

import numpy as np
import pydicom
import pytest
import torch

import dmcache
from conftest import KEY, emulator, start_daemon

# The guide's examples, run verbatim from test_dataset.py
from test_dataset import GUIDE_FULL, GUIDE_SUBCLASS, run_guide


def download_folder(emu, name, dest):
    """The dataset folder as the seed-era client makes it (datamintapi/dataset.py@af98a24 download)."""
    r = emulator.request(emu.url, path='/datasets', key=KEY)
    info = next(d for d in r.json()['data'] if d['name'] == name)
    r = emulator.request(emu.url, path='/datasets/%s/download/dicom' % info['id'], key=KEY)
    token = None
    for line in r.body.decode().splitlines():
        line = line.strip()
        if line.startswith('data:'):
            data = json.loads(line[5:])
            if 'zip' in data:
                token = data['zip']
    z = emulator.request(emu.url, path='/datasets/download/%s' % token, key=KEY)
    assert z.status == 200
    folder = os.path.join(dest, name)
    zipfile.ZipFile(io.BytesIO(z.body)).extractall(folder)
    with open(os.path.join(folder, 'dataset.json')) as f:
        return folder, json.load(f)['resources']


@pytest.fixture(scope='module')
def sample(daemon, emu, tmp_path_factory):
    """(dataset folder, {id: its dataset.json entry}, dmcache items of 'sample')."""
    folder, entries = download_folder(emu, 'sample', str(tmp_path_factory.mktemp('client')))
    ds = dmcache.Dataset(dataset_name='sample')
    items = [ds[i] for i in range(len(ds))]
    ds.close()
    return folder, {e['id']: e for e in entries}, items


# ---- Dataset difference 1: annotations in the folder's short form ----
def test_metainfo_annotations_are_the_folders_short_form(sample):
    folder, entries, items = sample
    assert len(items) == len(entries) == 19
    kinds = set()
    for _, _, meta in items:
        want = entries[meta['id']]['annotations']
        assert meta['annotations'] == want, meta['filename']
        for a in meta['annotations']:
            assert {'type', 'name', 'index', 'added_by'} <= set(a)
            assert 'annotation_type' not in a and 'identifier' not in a
            kinds.add(a['type'])
            if a['type'] == 'segmentation':
                assert os.path.isfile(os.path.join(folder, a['file']))
    assert kinds == {'label', 'segmentation', 'category'}


# ---- Dataset difference 2: `file` and `frame_labels` ----
def test_metainfo_has_file_and_frame_labels(sample, emu):
    folder, entries, items = sample
    files = os.path.join(emu.corpus, 'projects', 'sample')
    with_frame_labels = 0
    for _, _, meta in items:
        entry = entries[meta['id']]
        assert meta['file'] == entry['file']
        # the file the entry names is this item's image, byte for byte
        with open(os.path.join(folder, meta['file']), 'rb') as f, \
                open(os.path.join(files, meta['source_filepath']), 'rb') as g:
            assert f.read() == g.read()
        assert meta['frame_labels'] == entry['frame_labels']
        with_frame_labels += entry['frame_labels'] is not None
        # the client's metainfo, key for key
        assert meta == entry, meta['filename']
    assert with_frame_labels == 1
    mf = next(m for _, _, m in items if m['filename'] == 'multiframe_4x128.dcm')
    assert mf['frame_labels'] == [
        {'label': 'contrast', 'frame': 1, 'created_by': 'annotator1@example.org'},
        {'label': 'contrast', 'frame': 2, 'created_by': 'annotator1@example.org'},
        {'label': 'artifact', 'frame': 3, 'created_by': 'annotator1@example.org'}]


# ---- Dataset difference 3: dicom_metainfo is the file's FileDataset ----
def same_elements(got, ref):
    """Every element of ref (pixel data aside) in got with the same VR and value as pydicom
    reads it from the file (str() keeps '80.0000' and '-0.0')."""
    n = 0
    for elem in ref.iterall():
        if elem.tag == 0x7FE00010:
            continue
        other = got[elem.tag] if elem.tag in got else None
        if other is None:  # inside a sequence: compared with its parent
            continue
        assert other.VR == elem.VR, elem
        assert str(other.value) == str(elem.value), elem
        n += 1
    return n


def test_dicom_metainfo_is_the_files_filedataset(sample, emu):
    _, _, items = sample
    files = os.path.join(emu.corpus, 'projects', 'sample')
    seen = 0
    for image, dcm, meta in items:
        path = os.path.join(files, meta['source_filepath'])
        if not path.endswith('.dcm'):
            assert dcm is None
            continue
        ref = pydicom.dcmread(path)
        assert isinstance(dcm, pydicom.dataset.FileDataset), meta['filename']
        assert dcm.file_meta.TransferSyntaxUID == ref.file_meta.TransferSyntaxUID
        assert same_elements(dcm.file_meta, ref.file_meta) >= 3
        assert same_elements(dcm, ref) == same_elements(ref, ref)
        assert dcm.preamble == ref.preamble
        # as both clients return it: the pixel data let go once the image is decoded
        # (dataset.py@af98a24 _load_image, io_utils.py@1.2.4 read_array_normalized)
        assert 'PixelData' in dcm and dcm.PixelData is None, meta['filename']
        if meta['filename'].startswith('ct_'):
            assert str(dcm.PatientWeight) == '80.0000' and dcm.PatientSex == 'F'
        if meta['filename'].startswith('multiframe'):
            assert str(dcm.SliceLocation) == '-0.0'
        seen += 1
    assert seen == 10


def test_dicom_metainfo_from_a_local_folder_is_the_file(daemon, sample, tmp_path):
    """A local dataset folder (the one the client downloaded) serves the file itself."""
    folder, entries, _ = sample
    ds = dmcache.Dataset(root=os.path.dirname(folder), dataset_name='sample')
    assert len(ds) == 19
    for i in range(len(ds)):
        _, dcm, meta = ds[i]
        if not meta['file'].endswith('.dcm'):
            continue
        ref = pydicom.dcmread(os.path.join(folder, meta['file']))
        assert isinstance(dcm, pydicom.dataset.FileDataset)
        assert dcm.file_meta.TransferSyntaxUID == ref.file_meta.TransferSyntaxUID
        assert same_elements(dcm, ref) == same_elements(ref, ref)
        with open(os.path.join(folder, meta['file']), 'rb') as f:
            assert ds.read_file(i) == f.read()
        assert 'PixelData' in dcm and dcm.PixelData is None
        assert meta['annotations'] == entries[meta['id']]['annotations']
    ds.close()


# ---- Dataset difference 5: frame by frame, only that frame's annotations ----
def test_frame_by_frame_keeps_only_the_frames_annotations(daemon, sample):
    _, entries, _ = sample
    ds = dmcache.Dataset(dataset_name='sample', return_frame_by_frame=True)
    # the client: len = sum of NumberOfFrames; its frame loop as written in its __getitem__
    nframes = {}
    checked = 0
    for i in range(len(ds)):
        image, dcm, meta = ds[i]
        entry = entries[meta['id']]
        frame = nframes.get(meta['id'], 0)
        nframes[meta['id']] = frame + 1
        want = [a for a in entry['annotations'] if a['index'] == frame]
        assert meta['annotations'] == want, (meta['filename'], frame)
        assert meta['frame_labels'] == entry['frame_labels']
        checked += bool(entry['annotations'])
    mf = [m for m in (ds[i][2] for i in range(len(ds)))
          if m['filename'] == 'multiframe_4x128.dcm']
    assert [[a['name'] for a in m['annotations']] for m in mf] == \
        [[], ['contrast'], ['contrast'], ['artifact']]
    # image-scoped labels (index None) disappear from every frame, as in the client
    ct = [m for m in (ds[i][2] for i in range(len(ds))) if m['filename'] == 'ct_003.dcm'][0]
    assert [a['name'] for a in ct['annotations']] == ['Liver', 'Spine']
    assert checked == len(ds)
    ds.close()


# ---- Dataset difference 7: the bundled data runs both guide examples unchanged ----
def test_guide_examples_on_the_bundled_xray_project(daemon, emu, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder, entries = download_folder(emu, 'xray', str(tmp_path))
    by_id = {e['id']: e for e in entries}
    refs = {}
    for e in entries:
        ref = pydicom.dcmread(os.path.join(folder, e['file']))
        from torchvision.transforms import ToTensor
        a = ref.pixel_array
        # the current client's conversion (uint16 min-max, uint8 / 255), then ToTensor
        a = ((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)
        refs[e['id']] = (ToTensor()(a[:, :, None].astype(np.float32) / 255), ref.PatientSex,
                         'fracture' in e['labels'])
    os.mkdir(os.path.join(str(tmp_path), 'data'))  # the guide's root='data', without 'xray'
    seen, dataset = run_guide(GUIDE_SUBCLASS, 'xray', KEY, '(images, patients_sex, labels)')
    assert len(dataset) == 8 and [len(b[1]) for b in seen] == [4, 4]
    got = []
    for images, sexes, labels in seen:
        assert images.dtype == torch.float32 and images.shape[1:] == (1, 64, 48)
        for img, sex, lab in zip(images, sexes, labels):
            match = [k for k, r in refs.items() if torch.equal(r[0], img)]
            assert len(match) == 1
            got.append(match[0])
            assert sex == refs[match[0]][1] and bool(lab) == refs[match[0]][2]
    assert sorted(got) == sorted(refs)
    seen, dataset = run_guide(GUIDE_FULL, 'xray', KEY, '(images, dicom_metainfo, metainfo)')
    n = 0
    for images, dicoms, metas in seen:
        for img, dcm, meta in zip(images, dicoms, metas):
            assert torch.equal(img, refs[meta['id']][0])
            assert dcm.PatientSex == refs[meta['id']][1]
            assert meta['file'] == by_id[meta['id']]['file']
            n += 1
    assert n == 8


def test_sample_dicoms_answer_the_guides_patient_sex(sample, emu):
    """The guide's subclass reads dicom_metainfo.PatientSex: every DICOM of the sample has
    it, equal to the file's."""
    _, _, items = sample
    files = os.path.join(emu.corpus, 'projects', 'sample')
    sexes = []
    for _, dcm, meta in items:
        if dcm is not None:
            ref = pydicom.dcmread(os.path.join(files, meta['source_filepath']),
                                  stop_before_pixels=True)
            assert dcm.PatientSex == ref.PatientSex
            sexes.append(dcm.PatientSex)
    assert len(sexes) == 10 and set(sexes) == {'F', 'M'}


# ---- Emulator difference 2, through the Dataset: NIfTI items say application/nifti ----
def test_nifti_items_have_the_clients_mimetype(sample):
    _, entries, items = sample
    nii = [m for _, _, m in items if m['filename'].endswith(('.nii', '.nii.gz'))]
    assert len(nii) == 2
    for m in nii:
        # api_handler.py@af98a24 convert_format: `elif mimetype == 'application/nifti'`
        assert m['mimetype'] == entries[m['id']]['mimetype'] == 'application/nifti'
        assert m['file'].endswith(('.nii', '.nii.gz'))


# ---- Dataset difference 4: compat='2024.11' divides uint16 by 256 ----
def seed_era_image(path):
    """datamintapi/dataset.py@af98a24 _load_image, line by line."""
    from torchvision.transforms.functional import to_tensor
    img = pydicom.dcmread(path).pixel_array
    if img.dtype == np.uint16:
        img = (img // 256).astype(np.uint8)
    if len(img.shape) == 3:
        img = img.transpose(1, 2, 0)
    if len(img.shape) == 2:
        img = img[..., np.newaxis]
    return to_tensor(img)


def test_compat_2024_11_reproduces_the_seed_era(daemon, emu):
    files = os.path.join(emu.corpus, 'projects', 'sample')
    old = dmcache.Dataset(dataset_name='sample', compat='2024.11')
    new = dmcache.Dataset(dataset_name='sample')
    n16 = 0
    for i in range(len(old)):
        image, _, meta = old[i]
        if not meta['filename'].endswith('.dcm'):
            continue  # the seed-era client read DICOM only
        want = seed_era_image(os.path.join(files, meta['source_filepath']))
        assert image.dtype == want.dtype and torch.equal(image, want), meta['filename']
        if meta['filename'].startswith('multiframe'):
            n16 += 1
            # the default stays the current client's min-max
            a = pydicom.dcmread(os.path.join(files, meta['source_filepath'])).pixel_array
            mm = ((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)
            cur = new[i][0]
            assert cur.shape == (4, 1, 128, 128)
            assert torch.equal(cur[:, 0], torch.from_numpy(mm).float().div(255))
            assert not torch.equal(cur[:, 0], image)
    assert n16 == 1
    with pytest.raises(ValueError):
        dmcache.Dataset(dataset_name='sample', compat='2023')
    old.close()
    new.close()


# ---- Dataset difference 6: the 2025 client's annotation outputs ----
# Expected values: datamintapi/dataset/dataset.py and base_dataset.py at tag 1.2.4, written
# out again here over the dataset folder the client downloads.
def client_label_sets(entries, scope):
    ml, seg = set(), set()
    for e in entries:
        for a in e['annotations']:
            if ('image' if a.get('index') is None else 'frame') != scope:
                continue
            if a['type'] == 'label':
                ml.add(a['name'])
            if a['type'] == 'segmentation':
                seg.add(a['name'])
    ml, seg = sorted(ml), sorted(seg)
    return ml, {n: i for i, n in enumerate(ml)}, {n: i + 1 for i, n in enumerate(seg)}


def client_segmentations(folder, anns, nframes, h, w, codes):
    from PIL import Image
    segs, labels = {}, {}
    for a in anns:
        if a['type'] != 'segmentation' or not a['file'].endswith('.png'):
            continue  # the client opens masks with PIL: its PNG masks
        m = Image.open(os.path.join(folder, a['file'])).convert('L').resize((w, h), Image.NEAREST)
        m = torch.from_numpy(np.array(m)) == 255
        segs.setdefault(a['added_by'], [[] for _ in range(nframes)])[a['index']].append(m)
        labels.setdefault(a['added_by'], [[] for _ in range(nframes)])[a['index']].append(
            codes[a['name']])
    out_s, out_l = {}, {}
    for by in segs:
        out_s[by] = [torch.stack(x) if x else torch.zeros((0, h, w), dtype=torch.bool)
                     for x in segs[by]]
        out_l[by] = [torch.tensor(x, dtype=torch.int32) if x else torch.zeros(0, dtype=torch.int32)
                     for x in labels[by]]
    return out_s, out_l


def client_onehot(anns, names, codes, nframes):
    out = {}
    for a in anns:
        size = (len(names),) if nframes is None else (nframes, len(names))
        t = out.setdefault(a['added_by'], torch.zeros(size, dtype=torch.int32))
        if a.get('index') is None:
            t[codes[a['name']]] = 1
        else:
            t[a['index'], codes[a['name']]] = 1
    return out


def test_segmentations_and_labels_as_the_client(daemon, sample):
    folder, entries, _ = sample
    ents = list(entries.values())
    fnames, fcodes, scodes = client_label_sets(ents, 'frame')
    inames, icodes, _ = client_label_sets(ents, 'image')
    assert fnames == ['artifact', 'contrast'] and list(scodes) == ['Liver', 'Spine']
    ds = dmcache.Dataset(dataset_name='sample', return_segmentations=True)
    assert ds.segmentation_labels_set == list(scodes) and ds.image_labels_set == inames
    nseg = 0
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {'image', 'metainfo', 'segmentations', 'seg_labels',
                             'frame_labels', 'image_labels'}
        e = entries[item['metainfo']['id']]
        assert item['metainfo'] == {k: v for k, v in e.items() if k != 'annotations'} | \
            {'labels': item['metainfo']['labels']}
        nframes, _, h, w = item['image'].shape
        want_s, want_l = client_segmentations(folder, e['annotations'], nframes, h, w, scodes)
        assert set(item['segmentations']) == set(want_s)
        for by in want_s:
            assert len(item['segmentations'][by]) == nframes
            for got, want in zip(item['segmentations'][by], want_s[by]):
                assert got.dtype == torch.bool and torch.equal(got, want)
            for got, want in zip(item['seg_labels'][by], want_l[by]):
                assert got.dtype == torch.int32 and torch.equal(got, want)
            nseg += sum(len(x) for x in want_s[by])
        frame = [a for a in e['annotations'] if a['type'] == 'label' and a['index'] is not None]
        image = [a for a in e['annotations'] if a['type'] == 'label' and a['index'] is None]
        want = client_onehot(frame, fnames, fcodes, nframes)
        assert {k: v.tolist() for k, v in item['frame_labels'].items()} == \
            {k: v.tolist() for k, v in want.items()}
        want = client_onehot(image, inames, icodes, None)
        assert {k: v.tolist() for k, v in item['image_labels'].items()} == \
            {k: v.tolist() for k, v in want.items()}
        assert all(v.dtype == torch.int32 for v in item['image_labels'].values())
    assert nseg == 4  # Liver x3, Spine x1 (the NIfTI volume mask is not a PIL image)
    mf = next(ds[i] for i in range(len(ds)) if ds[i]['metainfo']['filename'].startswith('multi'))
    assert mf['frame_labels']['annotator1@example.org'].tolist() == [[0, 0], [0, 1], [0, 1],
                                                                     [1, 0]]
    ds.close()


def test_semantic_segmentation_and_merge(daemon, sample):
    folder, entries, _ = sample
    ds = dmcache.Dataset(dataset_name='sample', return_as_semantic_segmentation=True,
                         semantic_seg_merge_strategy='union')
    item = next(ds[i] for i in range(len(ds)) if ds[i]['metainfo']['filename'] == 'ct_003.dcm')
    e = entries[item['metainfo']['id']]
    from PIL import Image
    masks = {a['name']: np.array(Image.open(os.path.join(folder, a['file'])).convert('L')) == 255
             for a in e['annotations'] if a['type'] == 'segmentation'}
    seg = item['segmentations']
    assert seg.shape == (1, 3, 512, 512) and seg.dtype == torch.float32
    assert item['seg_labels'] is None
    assert torch.equal(seg[0, 1], torch.from_numpy(masks['Liver']).float())
    assert torch.equal(seg[0, 2], torch.from_numpy(masks['Spine']).float())
    # 'union' ORs each annotator's semantic map, background channel included: annotator1
    # (Liver) and annotator2 (Spine) each call the other's mask background
    assert torch.equal(seg[0, 0], torch.from_numpy(~masks['Liver'] | ~masks['Spine']).float())
    # without a merge strategy: per annotator
    ds2 = dmcache.Dataset(dataset_name='sample', return_as_semantic_segmentation=True)
    per = ds2[3]['segmentations']
    assert set(per) == {'annotator1@example.org', 'annotator2@example.org'}
    assert torch.equal(per['annotator2@example.org'][0, 2], seg[0, 2])
    assert per['annotator2@example.org'][0, 1].sum() == 0
    ds.close()
    ds2.close()


def test_include_exclude_filters(daemon, sample):
    ds = dmcache.Dataset(dataset_name='sample', include_annotators=['annotator2@example.org'],
                         include_unannotated=False)
    assert len(ds) == 1  # only ct_003 has an annotation by annotator2 (Spine)
    item = ds[0]
    assert item['metainfo']['filename'] == 'ct_003.dcm'
    assert list(item['segmentations']) == ['annotator2@example.org']
    # label sets are over the filtered annotations: Spine is the only name, code 1
    assert ds.segmentation_labels_set == ['Spine']
    assert item['seg_labels']['annotator2@example.org'][0].tolist() == [1]
    ds = dmcache.Dataset(dataset_name='sample', exclude_segmentation_names=['Spine'],
                         exclude_image_label_names=['no_liver'])
    assert ds.segmentation_labels_set == ['Liver'] and 'no_liver' not in ds.image_labels_set
    assert list(ds[3]['segmentations']) == ['annotator1@example.org']
    assert ds[0]['image_labels'] == {}  # ct_000's only label was no_liver
    with pytest.raises(ValueError):
        dmcache.Dataset(dataset_name='sample', include_annotators=['a'], exclude_annotators=['b'])
    fb = dmcache.Dataset(dataset_name='sample', return_frame_by_frame=True,
                         include_frame_label_names=['contrast'])
    frames = [fb[i] for i in range(len(fb)) if fb[i]['metainfo']['filename'].startswith('multi')]
    # frame by frame: (n_frame_labels,) per frame; 'artifact' filtered out
    assert fb.frame_labels_set == ['contrast']
    assert [f['frame_labels'] for f in frames][0] == {} and \
        [f['frame_labels']['annotator1@example.org'].tolist() for f in frames[1:3]] == [[1], [1]]
    assert frames[3]['frame_labels'] == {}
    assert frames[1]['image'].shape == (1, 128, 128) and frames[1]['metainfo']['frame_index'] == 1


# ---- the original files, through the daemon: dicom_metainfo of a project item ----
def test_read_file_is_the_servers_file_byte_for_byte(daemon, emu, sample):
    """Dataset.read_file(i): the file the daemon stored, equal to the emulator's file; a
    project item's dicom_metainfo is pydicom.dcmread of exactly those bytes, as the client
    reads the file it downloaded."""
    folder, entries, _ = sample
    files = os.path.join(emu.corpus, 'projects', 'sample')
    ds = dmcache.Dataset(dataset_name='sample')
    kinds = set()
    for i in range(len(ds)):
        data = ds.read_file(i)
        image, dcm, meta = ds[i]
        with open(os.path.join(files, meta['source_filepath']), 'rb') as f:
            want = f.read()
        assert data == want, meta['filename']
        with open(os.path.join(folder, entries[meta['id']]['file']), 'rb') as f:
            assert data == f.read()  # the file of the client's dataset folder
        kinds.add(os.path.splitext(meta['filename'])[1])
        if dcm is None:
            continue
        ref = pydicom.dcmread(io.BytesIO(want))
        assert isinstance(dcm, pydicom.dataset.FileDataset)
        assert dcm.preamble == ref.preamble and dcm.file_meta == ref.file_meta
        assert dcm.PixelData is None
        assert same_elements(dcm, ref) == same_elements(ref, ref)
        # a fresh object per read: the user may change it
        dcm.PatientSex = 'O'
        assert ds[i][1].PatientSex == ref.PatientSex
    assert {'.dcm', '.png', '.jpg', '.gz', '.nii'} <= kinds
    # frame by frame: each frame's dicom_metainfo is its item's file
    fb = dmcache.Dataset(dataset_name='sample', return_frame_by_frame=True)
    n = 0
    for i in range(len(fb)):
        _, dcm, meta = fb[i]
        if meta['filename'] != 'multiframe_4x128.dcm':
            continue
        with open(os.path.join(files, meta['source_filepath']), 'rb') as f:
            assert fb.read_file(i) == f.read()
        assert dcm.NumberOfFrames == 4 and str(dcm.SliceLocation) == '-0.0'
        n += 1
    assert n == 4
    with pytest.raises(IndexError):
        ds.read_file(len(ds))
    ds.close()
    fb.close()


def test_stored_files_refuse_decoding_options(daemon):
    c = dmcache._lib.Client()
    try:
        for kw in ({'lut': True}, {'dtype': 9}, {'masks': True, 'frames': True}):
            with pytest.raises(dmcache.errors.InvalidArgumentError) as e:
                c.open(dmcache._lib.SOURCE_DATAMINT, 'sample', raw=True, api_key=KEY,
                       server=os.environ['DATAMINT_API_URL'], **kw)
            assert 'as they are' in str(e.value) or 'frame by frame' in str(e.value)
    finally:
        c.close()


# ---- daemon-internal keys never reach metainfo ----
def test_metainfo_has_no_daemon_keys(daemon, sample):
    """mask_blobs (the daemon's links from annotations to stored masks) is in the records
    the daemon keeps, never in what the user sees: project and local items, frame by frame,
    and the 2025 client's dict."""
    folder, entries, items = sample
    # the daemon's records have it (read straight from the socket) ...
    c = dmcache._lib.Client()
    h = c.open(dmcache._lib.SOURCE_DATAMINT, 'sample', api_key=KEY,
               server=os.environ['DATAMINT_API_URL'])
    with_blobs = 0
    for i in range(h.items):
        its = h.get([i])
        with_blobs += 'mask_blobs' in json.loads(dmcache._lib.item_meta(its[0]))['resource']
        h.release(its)
    h.close()
    c.close()
    assert with_blobs >= 3
    # ... what the user reads never
    raw = dmcache.Dataset(dataset_name='sample')
    assert not any('mask_blobs' in raw.read(i)[1]['resource'] for i in range(len(raw)))
    seen = 0
    for kw in ({}, {'return_frame_by_frame': True}, {'root': os.path.dirname(folder)},
               {'return_segmentations': True}):
        ds = dmcache.Dataset(dataset_name='sample', **kw)
        for i in range(len(ds)):
            item = ds[i]
            meta = item['metainfo'] if isinstance(item, dict) else item[-1]
            assert 'mask_blobs' not in meta and not any(
                'mask_blobs' in a for a in meta.get('annotations', ())), kw
            if 'root' in kw:  # the local entry, key for key, as the client's
                assert {k: v for k, v in meta.items() if k != 'labels'} == \
                    {k: v for k, v in entries[meta['id']].items() if k != 'labels'}
            seen += 1
        ds.close()
    raw.close()
    assert seen > 4 * 19


# ---- NIfTI of a local folder: application/nifti, as the server names it ----
def test_local_nifti_is_application_nifti(daemon, emu, sample, tmp_path):
    """A local folder whose dataset.json gives no mimetype: the daemon names NIfTI files
    application/nifti (what the client dispatches on, and what the server sends)."""
    import shutil
    import sqlite3
    folder, entries, _ = sample
    local = os.path.join(str(tmp_path), 'sample')
    shutil.copytree(folder, local)
    with open(os.path.join(local, 'dataset.json')) as f:
        doc = json.load(f)
    for e in doc['resources']:
        e.pop('mimetype', None)
    with open(os.path.join(local, 'dataset.json'), 'w') as f:
        json.dump(doc, f)
    # a daemon of its own, whose index is read once it stopped
    with tempfile.TemporaryDirectory(prefix='dmc-') as d:
        dm = start_daemon(d)
        try:
            ds = dmcache.Dataset(root=str(tmp_path), dataset_name='sample', socket=dm.socket)
            assert len(ds) == 19
            ds.close()
        finally:
            assert dm.stop()[0] == 0
            dm.notify.close()
        db = sqlite3.connect(os.path.join(dm.cache, 'index.db'))
        try:
            rows = db.execute('SELECT filename, mimetype FROM items').fetchall()
        finally:
            db.close()
    nii = [(f, m) for f, m in rows if f.endswith(('.nii', '.nii.gz'))]
    assert len(rows) == 19 and len(nii) == 2 and {m for _, m in nii} == {'application/nifti'}
    want = {e['mimetype'] for e in entries.values() if e['file'].endswith(('.nii', '.nii.gz'))}
    assert want == {'application/nifti'}


# ---- alb_transform (dataset.py@1.2.4): image and every instance mask, frame by frame ----
class FlipCrop:
    """An albumentations-like transform (numpy only): flips left-right and keeps rows
    top..bottom of the image and of every mask; called as the client calls one."""

    def __init__(self, top, bottom):
        self.top, self.bottom, self.calls = top, bottom, []

    def __call__(self, image, masks=None):
        self.calls.append((image.shape, None if masks is None else masks.shape))
        out = {'image': np.ascontiguousarray(image[self.top:self.bottom, ::-1])}
        if masks is not None:
            out['masks'] = np.ascontiguousarray(masks[:, self.top:self.bottom, ::-1])
        return out


def test_alb_transform_as_the_client(daemon, emu, sample):
    folder, entries, _ = sample
    from PIL import Image
    t = FlipCrop(100, 400)
    ds = dmcache.Dataset(dataset_name='sample', return_frame_by_frame=True,
                         return_segmentations=True, alb_transform=t)
    k = next(i for i in range(len(ds)) if ds.read(i)[1]['resource']['filename'] == 'ct_003.dcm')
    t.calls.clear()
    item = ds[k]
    e = entries[item['metainfo']['id']]
    # the client: the frame (C, H, W) as (H, W, C) with every mask, uint8 (N, H, W)
    px = pydicom.dcmread(os.path.join(folder, e['file'])).pixel_array
    assert t.calls == [((512, 512, 1), (2, 512, 512))]
    want = torch.from_numpy(np.ascontiguousarray(px[100:400, ::-1])[None])
    assert item['image'].dtype == want.dtype and torch.equal(item['image'], want)
    for a in e['annotations']:
        if a['type'] != 'segmentation':
            continue
        m = np.array(Image.open(os.path.join(folder, a['file'])).convert('L')) == 255
        got = item['segmentations'][a['added_by']]
        # as the client returns them after albumentations: numpy uint8 (n, H', W')
        assert isinstance(got, np.ndarray) and got.dtype == np.uint8 and got.shape == (1, 300, 512)
        assert np.array_equal(got[0], m.astype(np.uint8)[100:400, ::-1])
    assert set(item['segmentations']) == {'annotator1@example.org', 'annotator2@example.org'}
    # without segmentations: the image alone
    t2 = FlipCrop(0, 10)
    ds2 = dmcache.Dataset(dataset_name='sample', return_frame_by_frame=True,
                          return_segmentations=False, alb_transform=t2)
    item = ds2[k]
    assert t2.calls == [((512, 512, 1), None)] and 'segmentations' not in item
    assert torch.equal(item['image'], torch.from_numpy(np.ascontiguousarray(px[0:10, ::-1])[None]))
    # the client's refusal, word for word
    with pytest.raises(NotImplementedError, match='return_frame_by_frame is False'):
        dmcache.Dataset(dataset_name='sample', alb_transform=t)
    ds.close()
    ds2.close()


# ---- all_annotations (dataset.py@1.2.4): annotations of every status ----
def test_all_annotations_as_the_client(daemon, emu, tmp_path):
    """The client downloads GET /projects/{id}/annotated_dataset?all_annotations=true; its
    dataset.json has the annotations of every status ('lesion' on ct_006 is 'new')."""
    r = emulator.request(emu.url, path='/projects', key=KEY)
    pid = next(p['id'] for p in r.json()['data'] if p['name'] == 'sample')
    z = emulator.request(emu.url, key=KEY, path='/projects/%s/annotated_dataset?'
                         'all_annotations=true&include_unannotated=true' % pid)
    assert z.status == 200
    folder = os.path.join(str(tmp_path), 'sample')
    zipfile.ZipFile(io.BytesIO(z.body)).extractall(folder)
    with open(os.path.join(folder, 'dataset.json')) as f:
        doc = json.load(f)
    entries = {e['id']: e for e in doc['resources']}
    assert doc['all_annotations'] is True
    inames, icodes = client_label_sets(entries.values(), 'image')[:2]
    assert 'lesion' in inames
    ds = dmcache.Dataset(dataset_name='sample', all_annotations=True,
                         return_segmentations=False)
    assert ds.image_labels_set == inames
    assert 'lesion' not in dmcache.Dataset(dataset_name='sample',
                                           return_segmentations=False).image_labels_set
    lesions = 0
    for i in range(len(ds)):
        item = ds[i]
        e = entries[item['metainfo']['id']]
        image = [a for a in e['annotations'] if a['type'] == 'label' and a['index'] is None]
        want = client_onehot(image, inames, icodes, None)
        assert {k: v.tolist() for k, v in item['image_labels'].items()} == \
            {k: v.tolist() for k, v in want.items()}
        lesions += any(a['name'] == 'lesion' for a in image)
    assert lesions == 1
    ds.close()
    # a local folder: served as it is when it was downloaded with all_annotations ...
    loc = dmcache.Dataset(root=str(tmp_path), dataset_name='sample', all_annotations=True,
                          return_segmentations=False)
    assert loc.image_labels_set == inames
    loc.close()
    # ... and refused when it was not (the client would download it again)
    doc['all_annotations'] = False
    with open(os.path.join(folder, 'dataset.json'), 'w') as f:
        json.dump(doc, f)
    with pytest.raises(ValueError, match='all_annotations'):
        dmcache.Dataset(root=str(tmp_path), dataset_name='sample', all_annotations=True)
    with pytest.raises(dmcache.errors.DmcacheError, match='not offline'):
        dmcache.Dataset(dataset_name='sample', all_annotations=True, offline=True)


# ---- root: as both generations of the client ----
def test_root_as_the_client(daemon, tmp_path, monkeypatch):
    """A root that is not a directory is refused (the client would download into it) with
    the client's error; '~' is expanded; an existing root without the dataset folder serves
    the project and writes nothing into root."""
    with pytest.raises(NotADirectoryError, match='Root directory not found'):
        dmcache.Dataset(root=str(tmp_path / 'missing'), dataset_name='sample')
    (tmp_path / 'file').write_bytes(b'')
    with pytest.raises(NotADirectoryError):
        dmcache.Dataset(root=str(tmp_path / 'file'), dataset_name='sample')
    monkeypatch.setenv('HOME', str(tmp_path))
    ds = dmcache.Dataset(root='~', dataset_name='sample')
    assert ds.root == str(tmp_path) and len(ds) == 19 and ds.project_name == 'sample'
    ds.close()
    assert sorted(os.listdir(str(tmp_path))) == ['file']


def test_dicom_metainfo_in_dataloader_workers(daemon, emu):
    """Forked and spawned DataLoader workers read the stored files over their own
    connections: every item's dicom_metainfo is its file's."""
    files = os.path.join(emu.corpus, 'projects', 'sample')
    ds = dmcache.Dataset(dataset_name='sample')
    for ctx in ('fork', 'spawn'):
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2,
                                             multiprocessing_context=ctx)
        n = 0
        for image, dcm, meta in loader:
            if dcm is None:
                continue
            ref = pydicom.dcmread(os.path.join(files, meta['source_filepath']),
                                  stop_before_pixels=True)
            assert dcm.SOPInstanceUID == ref.SOPInstanceUID
            assert dcm.file_meta.TransferSyntaxUID == ref.file_meta.TransferSyntaxUID
            n += 1
        assert n == 10, ctx
    ds.close()


def test_project_masks_come_from_the_daemon(daemon, emu, sample):
    """A project's segmentation files are the ones the daemon stored (an OPEN with raw and
    masks): no request for a mask file reaches the server, and offline they are there."""
    folder, entries, _ = sample
    ents = list(entries.values())
    fnames, fcodes, scodes = client_label_sets(ents, 'frame')
    since = max([x['seq'] for x in emu.log()] or [0])
    for offline in (False, True):
        ds = dmcache.Dataset(dataset_name='sample', return_segmentations=True, offline=offline)
        n = 0
        for i in range(len(ds)):
            item = ds[i]
            e = entries[item['metainfo']['id']]
            nframes, _, h, w = item['image'].shape
            want_s, _ = client_segmentations(folder, e['annotations'], nframes, h, w, scodes)
            assert set(item['segmentations']) == set(want_s)
            for by in want_s:
                for got, want in zip(item['segmentations'][by], want_s[by]):
                    assert torch.equal(got, want)
                    n += len(want)
        assert n == 4
        ds.close()
    asked = [x['path'] for x in emu.log(since)]
    assert asked and not [p for p in asked if '/annotations/' in p and p.endswith('/file')]
    # the files, one by one, equal the folder's
    c = dmcache._lib.Client()
    h = c.open(dmcache._lib.SOURCE_DATAMINT, 'sample', api_key=KEY, raw=True, masks=True,
               server=os.environ['DATAMINT_API_URL'])
    seen = 0
    for i in range(h.items):
        its = h.get([i])
        data = bytes(dmcache._lib.item_bytes(its[0]))
        meta = json.loads(dmcache._lib.item_meta(its[0]))
        h.release(its)
        e = entries[meta['resource']['id']]
        files = {os.path.splitext(os.path.basename(a['file']))[0].split('.')[0]: a['file']
                 for a in e['annotations'] if a['type'] == 'segmentation'}
        assert len(data) == sum(f['bytes'] for f in meta['files'])
        at = 0
        for f in meta['files']:
            with open(os.path.join(folder, files[f['id']]), 'rb') as fh:
                assert data[at:at + f['bytes']] == fh.read()
            at += f['bytes']
            seen += 1
    h.close()
    c.close()
    assert seen == sum(a['type'] == 'segmentation' for e in ents for a in e['annotations'])
    assert seen == 6  # Liver x3, Spine, and two NIfTI volume masks
    # frame by frame, each index reads the masks of its whole item (after the 4 frames of
    # the multi-frame item, index and item part)
    fb = dmcache.Dataset(dataset_name='sample', return_frame_by_frame=True,
                         return_segmentations=True)
    ids = dmcache.Dataset(dataset_name='sample').get_resources_ids()
    whole = fb._scan()['item']
    assert len(whole) == len(fb) > len(ids) and whole[-1] == len(ids) - 1
    assert [ids[k] for k in whole] == [fb.read(i)[1]['resource']['id'] for i in range(len(fb))]
    fb.close()


def as_list(batch):
    return batch


def bump_first(batch):
    """A collate in the worker that changes the first image in place."""
    batch[0][0].add_(1)
    return batch


def first_rows(batch):
    """A collate in the worker that sends a view (the first row) of every image."""
    return [(image[..., :1, :], dcm, meta) for image, dcm, meta in batch]


def saved(batch):
    """A collate in the worker that torch.save()s each image (a self-contained file)."""
    out = []
    for image, dcm, meta in batch:
        buf = io.BytesIO()
        torch.save(image, buf)
        out.append(buf.getvalue())
    return out


def test_images_cross_from_workers_as_references(daemon, tmp_path, monkeypatch):
    """An image of Dataset in a DataLoader worker reaches the main process as (dataset,
    index) and is read there again (dmcache._transfer): the same bytes as ds[i] in the
    main process, for forked and spawned workers, uint16 (min-max scaled to float32) and
    int16 items; an image changed in place or a view of it is sent as data, with the change;
    torch.save in the worker keeps the data."""
    from conftest import make_dicom_folder
    make_dicom_folder(str(tmp_path), 'u16', 24, dtype=np.uint16)
    make_dicom_folder(str(tmp_path), 'i16', 24, seed=2, dtype=np.int16)
    rebuilt = []  # what the main process read again (never called in a worker)
    real = dmcache.Dataset._image_again

    def counted(self, idx, conversion):
        rebuilt.append(idx)
        return real(self, idx, conversion)

    monkeypatch.setattr(dmcache.Dataset, '_image_again', counted)
    for name in ('u16', 'i16'):
        ds = dmcache.Dataset(root=str(tmp_path), dataset_name=name)
        ref = [ds[i][0] for i in range(len(ds))]
        assert isinstance(ref[0], torch.Tensor) and type(ref[0]) is torch.Tensor
        for ctx in ('fork', 'spawn'):
            del rebuilt[:]
            got = {}
            loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2,
                                                 shuffle=True, collate_fn=as_list,
                                                 multiprocessing_context=ctx)
            for batch in loader:
                for image, dcm, meta in batch:
                    got[int(meta['id'].split('-')[1])] = image
            assert sorted(got) == list(range(24)) and sorted(rebuilt) == list(range(24))
            for i, image in got.items():
                assert type(image) is torch.Tensor and image.dtype == ref[i].dtype
                assert torch.equal(image, ref[i]), (name, ctx, i)
        # changed in place, a view: sent as data, as PyTorch sends tensors
        del rebuilt[:]
        loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2,
                                             collate_fn=bump_first)
        for k, batch in enumerate(loader):
            assert torch.equal(batch[0][0], ref[8 * k] + 1)
            for j in range(1, 8):
                assert torch.equal(batch[j][0], ref[8 * k + j])
        assert len(rebuilt) == 21  # 24 items, 3 of them changed
        del rebuilt[:]
        loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2,
                                             collate_fn=first_rows)
        for k, batch in enumerate(loader):
            for j in range(8):
                assert torch.equal(batch[j][0], ref[8 * k + j][..., :1, :])
        assert rebuilt == []
        loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2,
                                             collate_fn=saved)
        for k, batch in enumerate(loader):
            for j in range(8):
                image = torch.load(io.BytesIO(batch[j]))
                assert torch.equal(image, ref[8 * k + j])
        assert rebuilt == []
        ds.close()
