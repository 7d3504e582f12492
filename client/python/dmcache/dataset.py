"""dmcache.Dataset: the Datamint client's Dataset, served by dmcached.

A drop-in for `datamintapi.Dataset` as the Datamint user guide uses it
(its user guide's 'Dataset' section): `dataset[i]` is `(image, dicom_metainfo, metainfo)`.
Decoding happens in the daemon; this class asks for one item, converts it as the Datamint
client does, copies it out of the shared memory and gives the memory back at once, so
what it returns is ordinary, writable memory that PyTorch's DataLoader may move between
processes.

What it returns, and how that differs from the Datamint client, is listed in the README
("Python package"); the short version is in Dataset's docstring.
"""
import json
import os
import threading
import uuid
import weakref

import numpy as np

from . import _annotations, _dicom, _lib, _metainfo, _views, errors

# The 2025 client's options (datamintapi/dataset/dataset.py at tag 1.2.4) with their
# defaults: passing any of them makes items that client's dict (see _gen2_item).
GEN2 = dict({'return_annotations': True, 'return_segmentations': True,
             'return_as_semantic_segmentation': False, 'semantic_seg_merge_strategy': None,
             'image_transform': None, 'mask_transform': None, 'alb_transform': None,
             'include_unannotated': True, 'all_annotations': False},
            **{f: None for f in _annotations.FILTERS})
# Options dmcache does not implement: a value that asks for the feature raises
# NotImplementedError naming it; values that mean "off" (False, None) are accepted.
UNSUPPORTED = ('use_default_transform',)
_HARMLESS = {}

_torch = None
# region items held before one RELEASE gives them back (Dataset._release())
RELEASE_LATER = 16


def torch_module():
    """torch, or None when it is not installed (imported on first use only)."""
    global _torch
    if _torch is None:
        try:
            import torch
            _torch = torch
        except ImportError:
            _torch = False
    return _torch or None


# numpy dtypes torch (1.13) has no tensor type for: widened (a copy) on the way to torch
TORCH_WIDEN = {'uint16': 'int32', 'uint32': 'int64'}


def convert(a, normalize_, compat, frame_by_frame):
    """The image of read()'s array (a copy: `a` is the caller's to give) as
    Dataset.__getitem__ gives it without a transform: normalized as the client does, one
    frame or the seed-era layout, a torch tensor (numpy without torch)."""
    if normalize_:
        a = normalize_2024(a, False) if compat == '2024.11' else normalize(a, False)
    if frame_by_frame:
        a = a[0]  # one frame: (channels, H, W), as the Datamint client gives it
    elif compat == '2024.11':
        # to_tensor of the (H, W, frames * channels) array: frames as channels
        a = np.ascontiguousarray(to_hwc(a).transpose(2, 0, 1))
    torch = torch_module()
    return to_torch(torch, a) if torch else a


# the Datasets of this process by token: what an image a DataLoader worker sent names when
# it is read back (dmcache._transfer)
BY_TOKEN = weakref.WeakValueDictionary()


def _register(ds):
    """ds is the Dataset its token names in this process."""
    if getattr(ds, '_token', None):
        BY_TOKEN.setdefault(ds._token, ds)


def to_torch(torch, a):
    """torch.from_numpy(a), widening uint16 -> int32 and uint32 -> int64 (a copy), which
    torch lacks; uint64 has no lossless torch type and raises ValueError."""
    name = a.dtype.name
    if name == 'uint64':
        raise ValueError("torch has no uint64 tensors: open with dtype='int64' or 'float64'")
    if name in TORCH_WIDEN:
        a = a.astype(TORCH_WIDEN[name])
    return torch.from_numpy(a)


def normalize(a, copy=True):
    """The Datamint client's dtype conversions (base_dataset.py@1.2.4 _load_image), on a copy:
    uint16 -> per-image min-max to uint8, as ((a - min) / (max - min) * 255) truncated
    (all zeros when max == min); then uint8 -> float32 / 255 in [0, 1]. Every other dtype
    (int16 CT, float NIfTI, ...) is returned unchanged (copied, unless copy=False: `a`
    itself, for a caller whose array it is)."""
    if a.dtype == np.uint16:
        lo, hi = int(a.min()) if a.size else 0, int(a.max()) if a.size else 0
        if hi > lo:
            a = ((a - np.uint16(lo)) / float(hi - lo) * 255.0).astype(np.uint8)
        else:
            a = np.zeros(a.shape, np.uint8)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / np.float32(255)
    return np.array(a, copy=True) if copy else a


COMPAT = ('2024.11',)


def normalize_2024(a, copy=True):
    """The seed-era client's conversions (datamintapi/dataset.py@af98a24 _load_image, until
    2025-02-26): uint16 -> (a // 256) as uint8; then, as torchvision's to_tensor does,
    uint8 -> float32 / 255. Other dtypes unchanged (copied, unless copy=False)."""
    if a.dtype == np.uint16:
        a = (a // 256).astype(np.uint8)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / np.float32(255)
    return np.array(a, copy=True) if copy else a


def to_hwc(a):
    """(frames, channels, H, W) -> (H, W, frames * channels): the layout torchvision's
    ToTensor() and PIL-style transforms expect; frames become channels, as the Datamint
    client's 2024 Dataset gave them."""
    f, c, h, w = a.shape
    return np.ascontiguousarray(a.transpose(2, 3, 0, 1).reshape(h, w, f * c))


def image_labels(record):
    """metainfo['labels']: the record's own 'labels' list when it has one (Datamint
    resources do), else the names of its image-scoped label annotations, in either the
    short or the long field names of dataset.json."""
    labels = record.get('labels')
    if isinstance(labels, list):
        return labels
    out = []
    for a in record.get('annotations') or ():
        if not isinstance(a, dict):
            continue
        kind = a.get('type', a.get('annotation_type'))
        frame = a.get('index', a.get('frame_index'))
        name = a.get('name', a.get('identifier'))
        if kind == 'label' and frame is None and name is not None and name not in out:
            out.append(name)
    return out


def _subset_index(idx, n):
    i = int(idx)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError('index %d is out of range: the dataset has %d items' % (idx, n))
    return i


def resolve_source(root, dataset_name, api_key, server_url, offline=False):
    """(source, project, server, api_key) for OPEN: a local folder as the Datamint client
    writes it when <root>/<dataset_name>/dataset.json exists, else the Datamint project
    `dataset_name` with the credentials dmc_credentials_load finds."""
    if dataset_name is None:
        raise TypeError('dmcache.Dataset needs dataset_name (the Datamint project)')
    if root is not None:
        folder = os.path.abspath(os.path.join(os.fspath(root), os.fspath(dataset_name)))
        if os.path.isfile(os.path.join(folder, 'dataset.json')):
            return _lib.SOURCE_LOCAL, folder, None, None
    key, server, _ = _lib.load_credentials(api_key, server_url)
    if not key and not offline:
        raise errors.DmcacheError(
            "no Datamint API key for project '%s': pass api_key=, set DATAMINT_API_KEY or "
            "run datamint-config" % dataset_name)
    return _lib.SOURCE_DATAMINT, str(dataset_name), server, key


class Dataset:
    """A Datamint dataset version, decoded and served by dmcached.

        Dataset(root=None, dataset_name=None, version='latest', api_key=None,
                server_url=None, transform=None, target_transform=None,
                return_dicom=None, return_metainfo=True, normalize=True,
                socket=None, arena_bytes=0, project_name=None,
                return_frame_by_frame=False, offline=None, compat=None,
                **the 2025 client's options)

    Source: when <root>/<dataset_name>/dataset.json exists, that folder (laid out as the
    Datamint client writes it) is served with no network. Otherwise dataset_name is a
    Datamint project (name or id) read with api_key / server_url, else DATAMINT_API_KEY /
    DATAMINT_API_URL, else datamintapi.yaml; the daemon caches it and nothing is written
    to root (the Datamint client downloads into root instead).

    dataset[i] is, as for the guide's client, (image, dicom_metainfo, metainfo) (without
    dicom_metainfo when return_dicom=False, without metainfo when return_metainfo=False):
      image           the item as (frames, channels, H, W), converted as the Datamint
                      client does (normalize=True): uint16 -> per-image min-max uint8 (with
                      compat='2024.11': // 256, and frames as channels, (F*C, H, W), as the
                      seed-era client), uint8 -> float32 / 255; other dtypes unchanged. A
                      torch tensor (numpy without torch). With a transform, the transform
                      gets the converted array as numpy (H, W, frames * channels), what
                      torchvision's ToTensor() expects, and image is its result.
      dicom_metainfo  the pydicom FileDataset read from the file's own bytes (file_meta,
                      values as in the file), PixelData let go (None) as the client does
                      once the image is decoded; None for non-DICOM items
      metainfo        the item's entry of the dataset folder: the resource, 'file',
                      'annotations' in the folder's short form, 'frame_labels', 'labels'
                      (see dmcache._metainfo), through target_transform
    Passing any of the 2025 client's options (return_segmentations, return_annotations,
    return_as_semantic_segmentation, semantic_seg_merge_strategy, image_transform,
    mask_transform, include_unannotated, the include/exclude filters) makes dataset[i] that
    client's dict instead (see _gen2_item).

    version: 'latest' resolves once, in the constructor; worker processes of a DataLoader
    open the same resolved version, so a run sees one snapshot from start to end.
    """

    def __init__(self, root=None, dataset_name=None, version='latest', api_key=None,
                 server_url=None, transform=None, target_transform=None, return_dicom=None,
                 return_metainfo=True, normalize=True, socket=None, arena_bytes=0,
                 project_name=None, return_frame_by_frame=False, offline=None, compat=None,
                 **kwargs):
        gen2 = {k: kwargs.pop(k) for k in list(kwargs) if k in GEN2}
        for k, v in kwargs.items():
            if k not in UNSUPPORTED:
                raise TypeError("Dataset() got an unexpected keyword argument '%s'" % k)
            if any(v is ok for ok in _HARMLESS.get(k, (None, False))):
                continue
            raise NotImplementedError(
                "dmcache.Dataset does not implement the Datamint option '%s' (%r); see the "
                "README, 'Python package'" % (k, v))
        if compat is not None and compat not in COMPAT:
            raise ValueError("compat must be None (the current client) or one of %s, not %r"
                             % (', '.join("'%s'" % c for c in COMPAT), compat))
        self.compat = compat
        self._gen2 = dict(GEN2, **gen2) if gen2 else None
        if self._gen2:
            g = self._gen2
            _annotations.check_filters(g)
            if g['alb_transform'] is not None and not return_frame_by_frame:
                # dataset.py@1.2.4 DatamintDataset.__init__, word for word
                raise NotImplementedError(
                    "albumentations transform is not supported yet when return_frame_by_frame "
                    "is False")
            if g['return_as_semantic_segmentation'] and not g['return_segmentations']:
                raise ValueError('return_as_semantic_segmentation can only be True if '
                                 'return_segmentations is True')
            if g['semantic_seg_merge_strategy'] is not None and \
                    not g['return_as_semantic_segmentation']:
                raise ValueError('semantic_seg_merge_strategy can only be used if '
                                 'return_as_semantic_segmentation is True')
        if return_dicom is None:
            return_dicom = not self._gen2  # the guide's tuple has it; the 2025 dict not
        if project_name is not None:
            if dataset_name is not None and dataset_name != project_name:
                raise TypeError('pass dataset_name or project_name, not both')
            dataset_name = project_name
        if isinstance(version, int) and not isinstance(version, bool):
            raise NotImplementedError(
                "numeric dataset versions (the 2024 client's 'version=%d') do not exist in "
                "Datamint projects: use 'latest' or a version string (updated_at)" % version)
        if version is not None and not isinstance(version, str):
            raise TypeError('version must be a string')
        if root is not None:
            # both generations of the client: '~' expanded, a root that is not a directory
            # refused (they would download into it)
            root = os.path.expanduser(os.fspath(root))
            if not os.path.isdir(root):
                raise NotADirectoryError('Root directory not found: %s' % root)
        self.root = root
        self.dataset_name = dataset_name
        self.transform = transform
        self.target_transform = target_transform
        self.return_dicom = return_dicom
        self.return_metainfo = return_metainfo
        self.normalize = normalize
        self.socket = socket
        self.arena_bytes = int(arena_bytes)
        self.return_frame_by_frame = bool(return_frame_by_frame)
        self.offline = _lib.offline_default(offline)
        self._source, self._project, self._server, self._key = resolve_source(
            root, dataset_name, api_key, server_url, self.offline)
        self._lock = threading.Lock()
        self._client = self._ds = self._mds = self._rds = self._rmds = None
        self._held = []  # region items to RELEASE later (_release())
        self._views = None  # arrays of read() kept as views of the region (dmcache._views)
        self._token = uuid.uuid4().hex  # what an image sent by a DataLoader worker names
        _register(self)
        self._masksrc = None
        self._masks = {}
        self._scanned = None
        self._all_anns = None
        self._open(None if version in (None, '', 'latest') else version)
        # what a worker process opens: the version resolved here, the snapshot it names
        self.version = self._ds.version
        self.snapshot_id = self._ds.snapshot_id
        self.project_id = self._ds.project_id
        self.project_name = self._ds.project_name
        self._len = self._ds.items
        if self._gen2 and self._gen2['all_annotations']:
            self._all_anns = self._every_annotation()

    # ---- connection, per process ----
    def _open(self, version):
        client = _lib.Client(self.socket)
        try:
            ds = client.open(self._source, self._project, version=version,
                             server=self._server, api_key=self._key,
                             arena_bytes=self.arena_bytes,
                             frames=self.return_frame_by_frame, offline=self.offline,
                             regions=True)
        except BaseException:
            client.close()
            raise
        self._client, self._ds = client, ds
        self._views = _views.Views(ds)
        return ds

    def _after_fork(self):
        """In a forked child (a DataLoader worker): the parent's connection is dropped, and
        so is its lock, which a parent's thread may have held at fork()."""
        self._client.close()
        self._client = self._ds = self._mds = self._rds = self._rmds = None
        self._held = []  # the parent's to give back, on its own connection
        self._views = None  # the parent's (detached before the fork: dmcache._views)
        self._lock = threading.Lock()

    def _release(self, ds, items):
        """Gives `items` (copied out) back to the daemon. Items handed in place in the
        snapshot's region hold no arena space and their memory stays mapped: they go back
        in one RELEASE every RELEASE_LATER of them, saving a round trip each; others at
        once. Called under self._lock."""
        if all(it.status or it.region for it in items) and ds is self._ds:
            self._held.extend(items)
            if len(self._held) < RELEASE_LATER:
                return
            items, self._held = self._held, []
        ds.release(items)

    def _release_held(self):
        if self._held and self._ds is not None:
            held, self._held = self._held, []
            self._ds.release(held)

    def _dataset(self):
        """The open dataset of this process, opening the pinned version when there is none
        (a new process, or after close())."""
        if self._ds is not None:
            return self._ds
        ds = self._open(self.version)
        if ds.snapshot_id != self.snapshot_id or ds.items != self._len:
            raise errors.DmcacheError(
                "version '%s' of '%s' opened as another snapshot (%d items, not %d)"
                % (self.version, self._project, ds.items, self._len))
        return ds

    def close(self):
        """Closes this process's connection (reopened on the next access). Arrays read()
        gave as views of the daemon's region become copies first (their pins go with the
        connection)."""
        if self._views is not None and self._views.pid == os.getpid():
            self._views.detach_all()
        self._views = None
        if self._ds is not None and self._client is not None and not self._client.forked:
            self._release_held()
            self._ds.close()
        if self._client is not None:
            self._client.close()
        self._client = self._ds = self._mds = self._rds = self._rmds = None
        self._held = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        # what a spawned DataLoader worker gets: arguments and the pinned version, never a
        # connection (nothing large is pickled)
        st = dict(self.__dict__)
        st['_client'] = st['_ds'] = st['_mds'] = st['_rds'] = st['_rmds'] = None
        st['_lock'] = None
        st['_held'] = []
        st['_views'] = None
        return st

    def __setstate__(self, st):
        self.__dict__.update(st)
        self._lock = threading.Lock()
        _register(self)

    # ---- items ----
    def __len__(self):
        if self._gen2 and not self._gen2['include_unannotated']:
            return len(self._scan()['subset'])
        return self._len

    def _index(self, idx):
        try:
            i = int(idx)
        except TypeError:
            raise TypeError('dataset indices must be integers, not %s'
                            % type(idx).__name__) from None
        if i != idx:
            raise TypeError('dataset indices must be integers')
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError('index %d is out of range: the dataset has %d items'
                             % (idx, self._len))
        return i

    def read(self, idx):
        """(array (frames, channels, H, W) in the source dtype, metadata dict) of item idx,
        before any conversion. The array is the caller's own: a copy, or for a hot item
        handed in place a private copy-on-write view of the daemon's region (dmcache._views),
        which nothing else sees written. The metadata is {"resource": record, "dicom": ...}
        (the record without the daemon's own keys, _metainfo.DAEMON_KEYS)."""
        a, meta = self._read(idx, True)
        rec = meta.get('resource')
        if isinstance(rec, dict):
            for k in _metainfo.DAEMON_KEYS:
                rec.pop(k, None)
        return a, meta

    def _read(self, idx, want_meta):
        """read() without the record's cleaning; meta None unless want_meta."""
        i = self._index(idx)
        if self._client is not None and self._client.forked:
            self._after_fork()
        with self._lock:
            ds = self._dataset()
            items = ds.get([i])
            it = items[0]
            kept = False
            try:
                if it.status:
                    raise _lib.item_error(it)
                dtype, shape = _lib.DTYPES[it.dtype], tuple(it.shape)
                a = self._views.array(it, dtype, shape) if self._views is not None else None
                if a is None:
                    a = np.frombuffer(_lib.item_bytes(it), dtype=dtype).reshape(shape).copy()
                else:
                    kept = True  # released when its view goes (Views.take_unpinned())
                meta = json.loads(_lib.item_meta(it)) if want_meta else None
            finally:
                if not kept:
                    self._release(ds, items)
                if self._views is not None:
                    gone = self._views.take_unpinned()
                    if gone:
                        self._release(ds, gone)
        return a, meta

    def segmentation(self, idx):
        """(label map, label names) of item idx: a uint8 array (frames, 1, H, W) on the
        image's grid, 0 for background and k + 1 where the mask of names[k] is (the sorted
        segmentation names of the whole dataset). Later annotations paint over earlier
        ones; masks of another size are resampled by nearest neighbour."""
        i = self._index(idx)
        if self._client is not None and self._client.forked:
            self._after_fork()
        with self._lock:
            ds = self._dataset()
            if self._mds is None:
                self._mds = self._client.open(self._source, self._project,
                                              version=self.version, server=self._server,
                                              api_key=self._key, masks=True,
                                              offline=self.offline)
            items = self._mds.get([i])
            it = items[0]
            try:
                if it.status:
                    raise _lib.item_error(it)
                a = np.frombuffer(_lib.item_bytes(it), dtype=np.uint8).reshape(
                    tuple(it.shape)).copy()
                names = json.loads(_lib.item_meta(it)).get('labels', [])
            finally:
                self._mds.release(items)
        del ds
        return a, names

    def read_file(self, idx):
        """The original file of item idx (the whole item's with return_frame_by_frame) as
        bytes, as the daemon stored it (downloaded, or for a dataset folder read through
        this process's descriptors), checked against its SHA-256 and read with this
        process's own access to the dataset (offline too)."""
        i = self._index(idx)
        if self._client is not None and self._client.forked:
            self._after_fork()
        with self._lock:
            self._dataset()
            if self._rds is None:
                self._rds = self._client.open(self._source, self._project,
                                              version=self.version, server=self._server,
                                              api_key=self._key, raw=True,
                                              frames=self.return_frame_by_frame,
                                              offline=self.offline)
            items = self._rds.get([i])
            it = items[0]
            try:
                if it.status:
                    raise _lib.item_error(it)
                return bytes(_lib.item_bytes(it))
            finally:
                self._rds.release(items)

    def __getitem__(self, idx):
        if self._gen2:
            return self._gen2_item(idx)
        a, meta = self.read(idx)
        if self.transform is not None:
            if self.normalize:
                a = normalize_2024(a) if self.compat == '2024.11' else normalize(a)
            image = self.transform(to_hwc(a))
        else:
            conversion = (self.normalize, self.compat, self.return_frame_by_frame)
            image = convert(a, *conversion)
            torch = torch_module()
            if torch is not None and isinstance(image, torch.Tensor):
                from . import _transfer
                if _transfer.in_worker():
                    # sent to the main process as a reference (dmcache._transfer)
                    image = _transfer.sendable(image, self._token, idx, conversion)
        out = [image]
        if self.return_dicom:
            out.append(self._dicom_of(idx, meta))
        if self.return_metainfo:
            out.append(self.metainfo(meta))
        return tuple(out) if len(out) > 1 else out[0]

    def _image_again(self, idx, conversion):
        """The image of item idx as __getitem__ made it with `conversion` (normalize,
        compat, return_frame_by_frame), read again: what dmcache._transfer rebuilds."""
        a, _ = self._read(idx, False)
        return convert(a, *conversion)

    def metainfo(self, meta):
        """The item's metainfo from read()'s metadata: the dataset folder's entry (see
        dmcache._metainfo), with 'labels'; with return_frame_by_frame, the annotations of
        that frame only and 'frame_index'; through target_transform."""
        record = meta.get('resource') or {}
        entry = _metainfo.from_record(record, self._source == _lib.SOURCE_LOCAL)
        entry['labels'] = image_labels(record)
        if self.return_frame_by_frame:
            entry = _metainfo.for_frame(entry, meta.get('frame'))
            entry['frame_index'] = meta.get('frame')
        if self.target_transform is not None:
            entry = self.target_transform(entry)
        return entry

    def _dicom_of(self, idx, meta):
        """dicom_metainfo, as the Datamint client's pydicom.dcmread(<the item's file>): the
        FileDataset read from the file's own bytes (the local file of a dataset folder; else
        the file the daemon stored, read_file()), so that file_meta, every value as written
        ('80.0000', -0.0) are the file's, PixelData None as the client leaves it (see
        _dicom.as_the_client). Read on first use (_dicom.LazyFileDataset): until then it
        pickles as the file's path or the stored bytes, and an unreadable file raises at
        that first use. None for a non-DICOM item; without pydicom, the header the daemon
        sent (DicomMeta)."""
        dicom = meta.get('dicom')
        if not dicom or dicom.get('format') != 'dicom':
            return None
        if _dicom.pydicom is None:
            return _dicom.from_item_meta(dicom)
        record = meta.get('resource') or {}
        if self._source == _lib.SOURCE_LOCAL and record.get('file'):
            path = os.path.join(self._project, record['file'])
            if os.path.isfile(path):
                return _dicom.lazy_from_path(path)
        return _dicom.lazy_from_bytes(self.read_file(idx))

    # ---- the 2025 client's dict items (DatamintDataset at tag 1.2.4) ----
    def _every_annotation(self):
        """all_annotations=True: {resource id: API annotation records of every status} of a
        Datamint project, read from the server with the caller's key (GET /projects/{id},
        then its worklist's GET /annotations, as the daemon lists the published ones); a
        local folder must have been downloaded with all_annotations (its dataset.json says
        so): its entries are served as they are."""
        if self._source == _lib.SOURCE_LOCAL:
            with open(os.path.join(self._project, 'dataset.json')) as f:
                had = json.load(f).get('all_annotations')
            if had is not True:
                raise ValueError(
                    "all_annotations=True: the dataset folder %s was downloaded with "
                    "all_annotations=%r; download it again with all_annotations=True (dmcache "
                    "does not write into root), or open the project itself" % (self._project, had))
            return None
        if self.offline:
            raise errors.DmcacheError(
                'all_annotations=True reads the annotations of every status from the server: '
                'not offline (the daemon keeps the published ones)')
        import urllib.parse
        up = self._upstream()
        proj = json.loads(up.fetch('/projects/%s' % urllib.parse.quote(str(self.project_id))))
        wl = proj.get('worklist_id')
        out, offset, page = {}, 0, 1000
        while wl:
            got = json.loads(up.fetch('/annotations?annotation_worklist_id=%s&offset=%d&limit=%d'
                                      % (urllib.parse.quote(str(wl)), offset, page)))
            data = got.get('data') if isinstance(got, dict) else got
            if not isinstance(data, list):
                raise errors.DmcacheError('GET /annotations is not {"data": [...]}')
            for a in data:
                if isinstance(a, dict) and not a.get('deleted'):
                    out.setdefault(a.get('resource_id'), []).append(a)
            if len(data) < page:
                break
            offset += len(data)
        return out

    def _upstream(self):
        if self._masksrc is None:
            self._masksrc = _dicom.MaskSource(self._server, self._key)
        return self._masksrc

    def _entry(self, meta, filtered=True):
        rec = meta.get('resource') or {}
        if self._all_anns is not None:
            rec = dict(rec, annotations=self._all_anns.get(rec.get('id'), []))
        entry = _metainfo.from_record(rec, self._source == _lib.SOURCE_LOCAL)
        anns = [a if 'type' in a else _metainfo.short_annotation(a, entry.get('id'))
                for a in entry.get('annotations') or () if isinstance(a, dict)]
        entry['annotations'] = (_annotations.filter_annotations(anns, self._gen2)
                                if filtered else anns)
        return entry

    def _scan(self):
        """Every item's annotations once (label sets are over the whole dataset, as in the
        client): {'frame': (sets, codes), 'image': (sets, codes), 'subset': item indices}."""
        if self._scanned is not None:
            return self._scanned
        per_res, order, frames, whole = {}, [], [], []
        for i in range(self._len):
            _, meta = self.read(i)
            # the whole item of index i (frame by frame, a new one at each frame 0)
            whole.append(len(whole) if not self.return_frame_by_frame else
                         (whole[-1] if whole else -1) + (meta.get('frame') == 0))
            entry = self._entry(meta)
            rid = entry.get('id')
            if rid not in per_res:
                per_res[rid] = entry['annotations']
                order.append(rid)
            frames.append((rid, meta.get('frame')))
        anns = [per_res[r] for r in order]
        keep = list(range(self._len))
        if not self._gen2['include_unannotated']:
            if self.return_frame_by_frame:
                keep = [i for i, (rid, f) in enumerate(frames)
                        if any(a['type'] == 'segmentation' and a.get('index') in (None, f)
                               for a in per_res[rid])]
            else:
                keep = [i for i, (rid, _) in enumerate(frames) if per_res[rid]]
        self._scanned = {'frame': _annotations.label_sets(anns, True),
                         'image': _annotations.label_sets(anns, False), 'subset': keep,
                         'item': whole}
        return self._scanned

    @property
    def segmentation_labels_set(self):
        return self._scan()['frame'][0]['segmentation']

    @property
    def frame_labels_set(self):
        return self._scan()['frame'][0]['multilabel']

    @property
    def image_labels_set(self):
        return self._scan()['image'][0]['multilabel']

    def _stored_masks(self, item):
        """{annotation id: bytes} of the segmentation files the daemon stored for the whole
        item `item` (an OPEN with raw and masks: the caller's own access, offline too)."""
        if self._client is not None and self._client.forked:
            self._after_fork()
        with self._lock:
            self._dataset()
            if self._rmds is None:
                self._rmds = self._client.open(self._source, self._project,
                                               version=self.version, server=self._server,
                                               api_key=self._key, raw=True, masks=True,
                                               offline=self.offline)
            items = self._rmds.get([item])
            it = items[0]
            try:
                if it.status:
                    raise _lib.item_error(it)
                data = bytes(_lib.item_bytes(it))
                files = json.loads(_lib.item_meta(it)).get('files') or []
            finally:
                self._rmds.release(items)
        out, at = {}, 0
        for f in files:
            out[f['id']] = data[at:at + f['bytes']]
            at += f['bytes']
        return out

    def _mask_reader(self, item):
        """read_mask(ann) for the masks of whole item `item`: the bytes of a segmentation
        annotation's mask file (None: not an image). A local folder's file; else the file
        the daemon stored (read once for the item); a mask the daemon does not keep (an
        annotation that is not published, with all_annotations=True) from the server with
        the caller's key, kept per process."""
        stored = []

        def read_mask(ann):
            f = ann.get('file') or ''
            if not f.lower().endswith(('.png', '.jpg', '.jpeg')):
                return None
            if self._source == _lib.SOURCE_LOCAL:
                with open(os.path.join(self._project, f), 'rb') as fh:
                    return fh.read()
            parts = f.split('/')  # masks/<created_by>/<resource id>/<annotation id><ext>
            rid, aid = parts[-2], os.path.splitext(parts[-1])[0]
            if not stored:
                stored.append(self._stored_masks(item))
            if aid in stored[0]:
                return stored[0][aid]
            if f in self._masks:
                return self._masks[f]
            if self.offline:
                raise errors.NotFoundError(
                    "the mask of annotation '%s' is not in the cache (offline)" % aid)
            data = self._upstream().fetch('/annotations/%s/annotations/%s/file' % (rid, aid))
            if len(self._masks) >= 1024:
                self._masks.pop(next(iter(self._masks)))
            self._masks[f] = data
            return data
        return read_mask

    def _gen2_item(self, idx):
        """The 2025 client's item: {'image', 'metainfo', 'dicom'?, 'segmentations'?,
        'seg_labels'?, 'frame_labels', 'image_labels'} (dataset.py@1.2.4 __getitem__)."""
        torch = torch_module()
        if torch is None:
            raise ImportError('the Datamint annotation outputs need torch')
        g = self._gen2
        sc = self._scan()
        i = sc['subset'][self._index(idx) if g['include_unannotated'] else
                         _subset_index(idx, len(sc['subset']))]
        a, meta = self.read(i)
        if self.normalize:
            a = normalize_2024(a) if self.compat == '2024.11' else normalize(a)
        if self.return_frame_by_frame:
            a = a[0]
        img = to_torch(torch, np.ascontiguousarray(a))
        if g['image_transform'] is not None:
            img = g['image_transform'](img)
        if isinstance(img, np.ndarray):
            img = torch.from_numpy(img)
        if img.ndim == 3:
            (_, h, w), nframes = img.shape, 1
        else:
            nframes, _, h, w = img.shape
        entry = self._entry(meta)
        if self.return_frame_by_frame:
            f = meta.get('frame')
            entry['frame_index'] = f
            entry['annotations'] = [x for x in entry['annotations']
                                    if x.get('index') is None or x.get('index') == f]
        anns = entry['annotations']
        item = {'image': img, 'metainfo': {k: v for k, v in entry.items() if k != 'annotations'}}
        if self.return_dicom:
            item['dicom'] = self._dicom_of(i, meta)
        (fsets, fcodes), (isets, icodes) = sc['frame'], sc['image']
        if g['return_segmentations']:
            segs, labels = _annotations.load_segmentations(
                torch, anns, img.shape, self.return_frame_by_frame, fcodes['segmentation'],
                self._mask_reader(sc['item'][i]))
            if g['mask_transform'] is not None:
                for lst in segs.values():
                    for k, m in enumerate(lst):
                        lst[k] = g['mask_transform'](m)
            if g['alb_transform'] is not None:
                img, segs = _annotations.alb_with_masks(torch, g['alb_transform'], img, segs)
                item['image'] = img
                if img.ndim == 3:
                    _, h, w = img.shape
                else:
                    nframes, _, h, w = img.shape
            if g['return_as_semantic_segmentation']:
                n = len(fsets['segmentation'])
                sem = {by: _annotations.to_semantic(torch, segs[by], labels[by], n)
                       for by in segs}
                segs = _annotations.merge(torch, g['semantic_seg_merge_strategy'], sem,
                                          nframes, n, h, w)
                labels = None
            if self.return_frame_by_frame:
                if isinstance(segs, dict):
                    segs = {k: v[0] for k, v in segs.items()}
                    if labels is not None:
                        labels = {k: v[0] for k, v in labels.items()}
                else:
                    segs = segs[0]
            item['segmentations'] = segs
            item['seg_labels'] = labels
        elif g['alb_transform'] is not None:
            # dataset.py@1.2.4: without segmentations, the image alone
            out = g['alb_transform'](image=img.numpy().transpose(1, 2, 0))
            item['image'] = torch.from_numpy(out['image']).permute(2, 0, 1)
        item['frame_labels'] = _annotations.onehot(
            torch, _annotations.of_kind(anns, 'label', 'frame'), len(fsets['multilabel']),
            fcodes['multilabel'], nframes, self.return_frame_by_frame)
        item['image_labels'] = _annotations.onehot(
            torch, _annotations.of_kind(anns, 'label', 'image'), len(isets['multilabel']),
            icodes['multilabel'], None, self.return_frame_by_frame)
        return item

    def get_resources_ids(self):
        """The resource ids in item order (reads every item's metadata from the daemon)."""
        return [self.read(i)[1]['resource'].get('id') for i in range(self._len)]

    def get_dataloader(self, *args, **kwargs):
        """A torch DataLoader over this dataset with dmcache.collate (stack equal shapes,
        else lists), as the Datamint client's get_dataloader."""
        torch = torch_module()
        if torch is None:
            raise ImportError('get_dataloader needs torch')
        from .loader import collate
        kwargs.setdefault('collate_fn', collate)
        return torch.utils.data.DataLoader(self, *args, **kwargs)

    def __repr__(self):
        return ("dmcache.Dataset('%s', version='%s', %d items)"
                % (self.project_name or self._project, self.version, self._len))
