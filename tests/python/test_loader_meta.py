"""dmcache.Loader's per-item metadata: the shapes dmcache.Dataset gives for the same item
(metainfo's keys and values, 'labels', 'annotations', the DICOM header), parsed once per
Loader (later epochs, split=/filter= scans and worker processes see the same values).

The expected values are Dataset's for the item: its metainfo, and its dicom_metainfo (the
file's own header, read by pydicom)."""
import pickle

import pydicom
import pytest

import dmcache


def dataset_items(**kw):
    ds = dmcache.Dataset(dataset_name='sample', **kw)
    try:
        return [ds[i] for i in range(len(ds))]
    finally:
        ds.close()


def loader_metas(loader):
    """{index: ItemMeta} of one epoch."""
    out = {}
    for b in loader:
        out.update(zip(b.indices, b.meta))
    return out


def assert_same_as_dataset(meta, item):
    info = item[2]  # Dataset's (image, dicom_metainfo, metainfo)
    for k, v in info.items():
        assert meta[k] == v, (k, meta[k], v)
    assert isinstance(meta['labels'], list)
    assert meta['annotations'] == info['annotations']


def numbers(v):
    """A DS/IS/FD/FL value as a list of floats ([] when empty)."""
    if v is None or v == '':
        return []
    if isinstance(v, (list, pydicom.multival.MultiValue)):
        return [float(x) for x in v]
    return [float(v)]


def assert_header_is_the_files(meta, f):
    """The Loader's header (from the daemon's DICOM JSON) against Dataset's dicom_metainfo
    (the file's own FileDataset, read by pydicom): every element's value, DS and IS as
    numbers (the JSON model carries numbers, not the file's strings)."""
    ds = meta['dicom']
    if f is None:
        assert ds is None
        return
    assert isinstance(ds, pydicom.Dataset)
    assert len(ds) > 5
    for elem in ds:
        if elem.VR in ('SQ', 'OB', 'OW', 'UN'):
            continue
        want, got = f[elem.tag].value, elem.value
        if elem.VR in ('DS', 'IS', 'FD', 'FL'):
            want, got = numbers(want), numbers(got)
        else:
            want, got = str(want), str(got)
        assert got == want, (elem.keyword, got, want)


@pytest.mark.parametrize('frames', [False, True])
def test_loader_metadata_is_datasets_and_parsed_once(daemon, frames):
    items = dataset_items(return_frame_by_frame=frames)
    loader = dmcache.Loader('sample', batch_size=3, collate='list', shuffle=True, seed=4,
                            return_frame_by_frame=frames)
    assert loader.items == len(items)
    first = loader_metas(loader)
    assert sorted(first) == list(range(len(items)))
    for i, m in first.items():
        assert_same_as_dataset(m, items[i])
        if frames:
            assert m['frame_index'] == items[i][2]['frame_index']
        assert_header_is_the_files(m, items[i][1])
    # the second epoch (another order): the same values, from the Loader's cache (the very
    # objects of the first epoch, the DICOM header included)
    loader.set_epoch(1)
    second = loader_metas(loader)
    assert sorted(second) == sorted(first)
    for i, m in second.items():
        assert dict(m) == dict(first[i])
        assert m['annotations'] is first[i]['annotations']
        assert m['dicom'] is first[i]['dicom']
    # a new Loader parses again: equal values
    fresh = dmcache.Loader('sample', batch_size=len(items) if len(items) <= 64 else 8,
                           collate='list', return_frame_by_frame=frames)
    third = loader_metas(fresh)
    for i, m in third.items():
        assert dict(m) == dict(first[i])
        assert m['annotations'] is not first[i]['annotations']
    # pickled (as to and from worker processes): the same mapping, no cache along
    for i in (0, len(items) - 1):
        back = pickle.loads(pickle.dumps(second[i]))
        assert dict(back) == dict(first[i])
        unread = pickle.loads(pickle.dumps(next(iter(fresh)).meta[0]))
        assert dict(unread) == dict(third[0])
    assert '_meta_cache' not in pickle.loads(pickle.dumps(loader)).__dict__
    fresh.close()
    loader.close()


def test_metadata_scanned_by_filter_is_not_parsed_again(daemon):
    """filter= reads every item's metadata in the constructor: the epoch's metadata is
    that parse (the same objects), with the same values as a Loader without filter."""
    seen = {}

    def keep(m):
        seen[m['resource']['id']] = m['annotations']
        return True
    loader = dmcache.Loader('sample', batch_size=4, collate='list', filter=keep)
    plain = dmcache.Loader('sample', batch_size=4, collate='list')
    got, want = loader_metas(loader), loader_metas(plain)
    assert sorted(got) == sorted(want) and len(seen) == len(want)
    for i, m in got.items():
        assert dict(m) == dict(want[i])
        assert m['annotations'] is seen[m['resource']['id']]
    loader.close()
    plain.close()


def test_metadata_false_gives_none(daemon):
    loader = dmcache.Loader('sample', batch_size=4, collate='list', metadata=False)
    for b in loader:
        assert b.meta == [None] * len(b.indices)
    loader.close()


def test_metadata_from_worker_processes_is_kept_by_the_loader(daemon):
    """num_workers=2: each batch's metadata comes pickled from a worker (unparsed); the
    main process parses it once, later epochs give the same objects, the values are the
    single-process Loader's."""
    plain = dmcache.Loader('sample', batch_size=4, collate='list')
    want = loader_metas(plain)
    plain.close()
    loader = dmcache.Loader('sample', batch_size=4, collate='list', num_workers=2)
    first = loader_metas(loader)
    assert sorted(first) == sorted(want)
    for i, m in first.items():
        assert dict(m) == dict(want[i])
    loader.set_epoch(1)
    second = loader_metas(loader)
    for i, m in second.items():
        assert m['annotations'] is first[i]['annotations']
        assert m['dicom'] is first[i]['dicom']
    loader.close()


def test_dicom_header_conversion_equals_pydicoms_from_json():
    """The header becomes the pydicom.Dataset that pydicom's own from_json gives with a
    bulk-data handler returning b'' (the handler is passed only where a BulkDataURI is,
    nested in a sequence too)."""
    from dmcache import _dicom

    def no_bulk(uri):
        return b''
    plain = {'00100010': {'vr': 'PN', 'Value': [{'Alphabetic': 'Doe^Jane'}]},
             '00280030': {'vr': 'DS', 'Value': [0.5, 0.25]},
             '00080008': {'vr': 'CS', 'Value': ['ORIGINAL', 'PRIMARY']},
             '00281050': {'vr': 'DS'}}
    bulk = dict(plain)
    bulk['00091010'] = {'vr': 'OB', 'BulkDataURI': 'http://127.0.0.1:9/bulk'}
    nested = dict(plain)
    nested['00081140'] = {'vr': 'SQ', 'Value': [
        {'00081150': {'vr': 'UI', 'Value': ['1.2.3']},
         '00091011': {'vr': 'OB', 'BulkDataURI': 'http://127.0.0.1:9/b2'}}]}
    for header in (plain, bulk, nested):
        got = _dicom.from_item_meta({'format': 'dicom', 'header': header})
        want = pydicom.Dataset.from_json(header, bulk_data_uri_handler=no_bulk)
        assert got == want
        assert got.to_json_dict() == want.to_json_dict()
    got = _dicom.from_item_meta({'format': 'dicom', 'header': nested})
    assert got[0x00081140][0][0x00091011].value == b''
    assert _dicom.from_item_meta({'format': 'png'}) is None
