"""dicom_metainfo read on first use (dmcache._dicom.LazyFileDataset) is the FileDataset the
Datamint client returns: pydicom.dcmread of the item's file with the pixel data let go
(PixelData None), element by element, through pickling and DataLoader workers too.

The reference is computed here with pydicom alone from the file's bytes (the emulator's
file for a project item, the folder's file for a local dataset folder)."""
import copy
import io
import os
import pickle
import shutil

import pydicom
import pytest
import torch

import dmcache
from dmcache import _dicom

from test_dropin import download_folder


def reference(data):
    """What the client returns: dcmread of the file, the pixel data let go."""
    ref = pydicom.dcmread(io.BytesIO(data))
    ref.PixelData = None
    return ref


def assert_same(got, ref):
    """got equals ref on every element (nested ones too), file_meta, preamble, encoding and
    the JSON model."""
    assert got == ref
    assert type(got) is pydicom.dataset.FileDataset  # read by the comparison
    assert got.preamble == ref.preamble
    assert got.file_meta == ref.file_meta
    assert (got.is_little_endian, got.is_implicit_VR) == (ref.is_little_endian,
                                                           ref.is_implicit_VR)
    pairs = list(zip(got.iterall(), ref.iterall()))
    assert len(pairs) == len(list(ref.iterall())) == len(list(got.iterall()))
    for a, b in pairs:
        assert (a.tag, a.VR, a.VM, a.is_undefined_length) == \
            (b.tag, b.VR, b.VM, b.is_undefined_length), b
        assert repr(a.value) == repr(b.value), b
    for a, b in zip(got.file_meta, ref.file_meta):
        assert (a.tag, a.VR, a.value) == (b.tag, b.VR, b.value)
    assert got.to_json_dict() == ref.to_json_dict()
    assert 'PixelData' in got and got.PixelData is None


def unread(dcm):
    """dcm has not been read yet (its type is the lazy class, its pickle the source only)."""
    return type(dcm) is _dicom.LazyFileDataset


@pytest.fixture(scope='module')
def project_items(daemon, emu):
    """[(i, the emulator file's bytes)] of the DICOM items of the project 'sample'."""
    files = os.path.join(emu.corpus, 'projects', 'sample')
    ds = dmcache.Dataset(dataset_name='sample')
    out = []
    for i in range(len(ds)):
        meta = ds.read(i)[1]['resource']
        if meta['filename'].endswith('.dcm'):
            with open(os.path.join(files, meta['source_filepath']), 'rb') as f:
                out.append((i, f.read()))
    ds.close()
    assert len(out) == 10
    return out


@pytest.fixture(scope='module')
def folder(daemon, emu, tmp_path_factory):
    """A local dataset folder as the client downloads it: (its root, its name)."""
    path, _ = download_folder(emu, 'sample', str(tmp_path_factory.mktemp('lazy')))
    return os.path.dirname(path), 'sample'


def test_project_items_equal_dcmread_of_the_file(project_items):
    ds = dmcache.Dataset(dataset_name='sample')
    for i, data in project_items:
        _, dcm, _ = ds[i]
        assert unread(dcm)
        assert isinstance(dcm, pydicom.dataset.FileDataset)
        assert isinstance(dcm, pydicom.Dataset)
        # unread, its pickle is the stored file's bytes and little more
        blob = pickle.dumps(dcm)
        assert len(data) <= len(blob) < len(data) + 512
        back = pickle.loads(blob)
        assert unread(back) and unread(dcm)
        ref = reference(data)
        assert_same(back, ref)
        assert_same(dcm, ref)
        # read, it pickles as pydicom's FileDataset does
        assert_same(pickle.loads(pickle.dumps(dcm)), ref)
    ds.close()


def test_local_folder_items_equal_dcmread_of_the_file(folder):
    root, name = folder
    ds = dmcache.Dataset(root=root, dataset_name=name)
    seen = 0
    for i in range(len(ds)):
        _, dcm, meta = ds[i]
        if not meta['file'].endswith('.dcm'):
            assert dcm is None
            continue
        path = os.path.join(root, name, meta['file'])
        assert unread(dcm)
        blob = pickle.dumps(dcm)
        assert len(blob) < 1024  # the path, its size and mtime
        with open(path, 'rb') as f:
            ref = reference(f.read())
        assert_same(pickle.loads(blob), ref)
        assert_same(dcm, ref)
        assert dcm.filename == path
        seen += 1
    assert seen == 10
    ds.close()


def test_every_use_reads_it_as_pydicom_would(project_items):
    """Each of a Dataset's uses, as the first one, gives what the read FileDataset gives."""
    ds = dmcache.Dataset(dataset_name='sample')
    i, data = project_items[0]
    ref = reference(data)
    missing = next(k for k in ('ContrastBolusAgent', 'EchoTime', 'FlipAngle') if k not in ref)

    def fresh():
        dcm = ds[i][1]
        assert unread(dcm)
        return dcm

    assert fresh().PatientID == ref.PatientID
    assert fresh()[0x00100020].value == ref[0x00100020].value
    assert fresh()['PatientID'].value == ref['PatientID'].value
    assert ('PatientID' in fresh()) and (0x00100020 in fresh()) and (missing not in fresh())
    assert [e.tag for e in fresh()] == [e.tag for e in ref]
    assert len(fresh()) == len(ref)
    assert list(fresh().keys()) == list(ref.keys())
    assert fresh().get(missing, 'none') == 'none'
    assert fresh().file_meta == ref.file_meta
    assert fresh().to_json() == ref.to_json()
    assert str(fresh()) == str(ref) and repr(fresh()) == repr(ref)
    assert dir(fresh()) == dir(ref)
    assert fresh() == ref and ref == fresh() and not (fresh() != ref)
    assert bool(fresh()) is bool(ref)
    for c in (copy.copy(fresh()), copy.deepcopy(fresh())):
        assert_same(c, ref)
    # a missing keyword, a missing attribute: pydicom's own AttributeError
    for attr in (missing, 'NotAKeywordAtAll', 'pin_memory'):
        with pytest.raises(AttributeError) as want:
            getattr(ref, attr)
        with pytest.raises(AttributeError) as got:
            getattr(fresh(), attr)
        assert str(got.value) == str(want.value)
        assert hasattr(fresh(), attr) is False
    # torch's pin_memory=True asks every element hasattr(x, 'pin_memory'): not a read
    d = fresh()
    assert not hasattr(d, 'pin_memory') and unread(d)
    # pixel_array of the let-go pixel data: what pydicom raises for the client's object
    with pytest.raises(Exception) as want:
        ref.pixel_array
    with pytest.raises(type(want.value)) as got:
        fresh().pixel_array
    assert str(got.value) == str(want.value)
    # changing it, as one changes the client's
    d = fresh()
    d.PatientSex = 'O'
    assert d.PatientSex == 'O' and ds[i][1].PatientSex == ref.PatientSex
    d = fresh()
    del d.PatientID
    assert 'PatientID' not in d and len(d) == len(ref) - 1
    d = fresh()
    d[0x00100010] = pydicom.DataElement(0x00100010, 'PN', 'Someone')
    assert str(d.PatientName) == 'Someone'
    ds.close()


def test_dataloader_workers_send_it_unread(project_items):
    """In a DataLoader (num_workers=2), items arrive in the main process unread and read
    there as the file's FileDataset."""
    want = dict(project_items)
    ds = dmcache.Dataset(dataset_name='sample')
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, shuffle=True,
                                         collate_fn=lambda b: b)
    n = 0
    for batch in loader:
        for image, dcm, meta in batch:
            if dcm is None:
                continue
            assert unread(dcm)
            i = next(k for k, v in want.items() if ds.read(k)[1]['resource']['id'] == meta['id'])
            assert_same(dcm, reference(want[i]))
            n += 1
    assert n == 10
    ds.close()


def test_unreadable_files_raise_on_first_use(folder, tmp_path):
    """dataset[i] does not read the header: a file that is not DICOM raises pydicom's
    InvalidDicomError at the first use, a local file changed since dataset[i] raises
    DmcacheError there (not another file's header); the object stays unread."""
    bad = _dicom.lazy_from_bytes(b'this is not a DICOM file')
    with pytest.raises(pydicom.errors.InvalidDicomError):
        bad.PatientID
    assert unread(bad)
    with pytest.raises(pydicom.errors.InvalidDicomError):
        len(bad)
    root, name = folder
    copy_root = str(tmp_path / 'root')
    shutil.copytree(os.path.join(root, name), os.path.join(copy_root, name))
    ds = dmcache.Dataset(root=copy_root, dataset_name=name)
    i = next(k for k in range(len(ds)) if ds[k][2]['file'].endswith('.dcm'))
    _, dcm, meta = ds[i]
    _, gone, _ = ds[i]
    path = os.path.join(copy_root, name, meta['file'])
    with open(path, 'r+b') as f:
        f.truncate(300)
    with pytest.raises(dmcache.errors.DmcacheError) as e:
        dcm.PatientID
    assert 'changed since its item was read' in str(e.value) and path in str(e.value)
    assert unread(dcm)
    os.unlink(path)
    with pytest.raises(dmcache.errors.DmcacheError) as e:
        str(gone)
    assert 'is gone' in str(e.value)
    ds.close()
