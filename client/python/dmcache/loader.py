"""dmcache.Loader: batches of decoded items straight from the daemon's shared memory.

Order. The daemon computes each epoch's order (proto.h, STREAM): with shuffle, a keyed
permutation of range(n) (a Feistel network keyed by seed + epoch: equal for equal seeds and
epochs, different across epochs; permutation() here computes the same); then, as PyTorch's
DistributedSampler does, the list is made divisible by world_size by repeating its head
(drop_last=False) or cutting its tail (drop_last=True, when n is not a multiple:
ceil((n - world) / world) items per rank), and rank r takes every world_size-th item from
r. The rank's list is cut into batches of batch_size; drop_last=True also drops a short
last batch. Without shuffle the order is exactly DistributedSampler's; with shuffle the
permutation differs from torch.randperm's (the daemon has no torch), the partition rule is
the same.

Memory. One connection, one STREAM per epoch: the daemon decodes ahead (prefetch + 1
batches beyond the one in use) and writes each batch contiguously into the connection's
arena; items already decoded in its memory (hot) are handed in place instead, from the
snapshot's read-only region, and such a batch is gathered with one copy into memory of its
own. A batch stays there until the next batch is asked for (or the iteration ends); then
it is RELEASEd. So the arena (arena_bytes, 0 for the daemon's default) must hold
prefetch + 2 batches; a batch larger than the whole arena fails with limit_exceeded
(LimitExceededError).

Tensors. By default (collate='stack') every batch is one tensor (batch, frames, channels,
H, W) of one dtype. When the items of a batch differ, the daemon makes them uniform with
a policy set once, applied by its decode workers (the trainer's CPU does none of it) and
kept with its decoded tensors (the policy is part of their key):
  window=(center, width)  CT: the modality LUT, then clip((x - (center - width / 2)) /
                          width, 0, 1) as float32;
  channels=1 or 3         3 from gray by repetition (gray+alpha: the gray; RGBA: RGB);
                          1 from RGB(A) by the luma 0.299 R + 0.587 G + 0.114 B (float32);
  size=(H, W) (or one int) resized with resize='bilinear' (default) or 'area' (Pillow's
                          BILINEAR and BOX resampling of float32 planes: equal values,
                          float32), or 'nearest' (source pixel floor((x + 0.5) * in / out),
                          dtype kept);
  crop=(H, W)             the centered (H, W) window (offset floor((in - H) / 2)); a
                          smaller image is padded around with pad_value (default 0);
  pad=(H, W)              the image at the top-left of an (H, W) canvas of pad_value, cut
                          at the bottom/right when larger (pixel coordinates are kept);
  dtype=                  every item converted to it by the daemon, float16 and bfloat16
                          included (from float32, rounded to nearest even, as numpy's and
                          torch's casts; integers rounded to nearest and saturated).
  In that order; size, crop and pad exclude each other. Without dtype= the output is
  float32 when a step computed new values (window, bilinear/area, luma), else the decoded
  dtype: mixed int16/uint16 CT slices still need dtype= (or window=). The metadata the
  daemon sends (the DICOM header, the decoded dtype and shape) describes the decoded
  source, not the policy's output.
When a batch's items still differ, iteration raises BatchMismatchError at the first such
batch, naming both items' dtypes and shapes and the parameter that fixes it;
collate='list' gives a list of tensors instead (the Datamint client's collate).

Writable views. A batch laid out in the arena (stacked, or each tensor of a list) is a
zero-copy view of the connection's arena, valid until the next batch is asked for (a batch
with items handed in place is a copy of its own instead, see Memory); .clone() what you keep, or
pass copy=True for copies. The arena is mapped copy-on-write: in-place operations
(x.add_(1), x.sub_(mean), Normalize(inplace=True)) work, copy only the pages they write
into this process's own memory, and are never seen by the daemon or another client. Those
private pages are dropped when the batch is released (the next batch is asked for): a view
kept past that shows whatever the daemon places there next. Reading costs nothing more
(pages only read stay mapped from batch to batch); the first write of each page costs a
page fault and a new page, which on some machines (virtual ones) is slower than copying
the batch into reused memory: a loop that rewrites every batch whole (x.sub_(mean)) may
run faster with copy=True. Where the page size is not
4096 bytes (the daemon's allocation unit), batches are copies. Without torch the same
holds with numpy arrays.
"""
import ctypes
import json
import math
import mmap
import os
import weakref
from collections.abc import Mapping
from typing import Any, List, NamedTuple

import numpy as np

from . import _lib, errors
from . import _delivery, _dicom, _explain, _metainfo, _select
from .dataset import TORCH_WIDEN, Dataset, image_labels, resolve_source, to_torch, torch_module

PREFETCH_MAX = _lib.STREAM_AHEAD_MAX - 1
# the daemon aligns arena allocations to 4096 bytes: with larger pages a private copy of
# one page could span two batches, so batches are copied instead of viewed
_VIEWS_SAFE = mmap.PAGESIZE <= 4096
COLLATES = ('stack', 'list')
RESIZES = tuple(_lib.RESIZE_CODES)


class BatchMismatchError(ValueError):
    """The items of a batch differ in dtype or shape and no policy makes them uniform
    (collate='stack'): the message names both items and the parameter that fixes it."""

    def __init__(self, message, epoch=None, batch=None, indices=None):
        super().__init__(message)
        self.epoch, self.batch, self.indices = epoch, batch, indices


def _dtype_name(dtype):
    """'float32' for np.float32, 'float32', torch.float32; None stays None."""
    if dtype is None:
        return None
    name = str(dtype)
    if name.startswith('torch.'):
        name = name[len('torch.'):]
    if name == 'bfloat16':  # torch's, not numpy's: made by the daemon, viewed by torch
        return name
    try:
        return str(np.dtype(name))
    except TypeError:
        raise ValueError("dtype '%s' is not a dtype name" % (dtype,)) from None


def _hw(name, value):
    """(H, W) from (H, W) or one int for both; checked."""
    hw = (value, value) if isinstance(value, int) else tuple(value)
    if len(hw) != 2 or not all(isinstance(v, (int, np.integer)) and 1 <= v <= 65535
                               for v in hw):
        raise ValueError('%s= must be (height, width), each 1 to 65535, not %r' %
                         (name, value))
    return int(hw[0]), int(hw[1])


def make_policy(size=None, resize='bilinear', crop=None, pad=None, pad_value=0,
                channels=None, window=None):
    """The daemon's uniformity policy (proto.h, struct dmc_policy) for Loader's
    parameters, or None when none is asked. ValueError names a bad parameter."""
    p = _lib.Policy()
    given = [n for n, v in (('size', size), ('crop', crop), ('pad', pad)) if v is not None]
    if len(given) > 1:
        raise ValueError('%s exclude each other: pass one of them' % ' and '.join(
            '%s=' % n for n in given))
    if resize not in _lib.RESIZE_CODES:
        raise ValueError('resize must be one of %s, not %r' % (', '.join(
            repr(r) for r in RESIZES), resize))
    if given:
        p.height, p.width = _hw(given[0], {'size': size, 'crop': crop, 'pad': pad}[given[0]])
        p.ops |= {'size': _lib.POLICY_SIZE, 'crop': _lib.POLICY_CROP,
                  'pad': _lib.POLICY_PAD}[given[0]]
    if size is not None:
        p.resize = _lib.RESIZE_CODES[resize]
    if crop is not None or pad is not None:
        p.pad_value = float(pad_value)
        if not math.isfinite(p.pad_value):
            raise ValueError('pad_value must be a finite number, not %r' % (pad_value,))
    if channels is not None:
        if channels not in (1, 3):
            raise ValueError('channels must be 1 or 3, not %r' % (channels,))
        p.ops |= _lib.POLICY_CHANNELS
        p.channels = int(channels)
    if window is not None:
        try:
            center, width = (float(v) for v in window)
        except (TypeError, ValueError):
            raise ValueError('window= must be (center, width), not %r' % (window,)) from None
        if not (math.isfinite(center) and math.isfinite(width) and width > 0):
            raise ValueError('window= must be (center, width) with a finite center and a '
                             'width > 0, not %r' % (window,))
        p.ops |= _lib.POLICY_WINDOW
        p.window_center, p.window_width = center, width
    return p if p.ops else None


class ItemMeta(Mapping):
    """One item's metadata, parsed on first use (the batch copies only its JSON bytes).
    The same shapes as Dataset.metainfo() for the item (the dataset folder's entry with
    'labels' and 'annotations'; with return_frame_by_frame that frame's and 'frame_index'),
    and 'dicom': the header the daemon sent, as a pydicom Dataset (Dataset's
    dicom_metainfo reads the file's own FileDataset), None for a non-DICOM item; also the daemon's own keys
    ('resource': the record as sent, 'frame'; with masks, 'labels' are the label map's
    names). What is parsed is kept by the Loader (MetaCache): the item's metadata in a
    later epoch is the same objects, not parsed again."""
    __slots__ = ('_raw', '_d', '_frames', '_local', '_cache', '_key')

    def __init__(self, raw, frames=False, local=False, cache=None, key=None):
        self._raw, self._d, self._frames, self._local = raw, None, frames, local
        self._cache, self._key = cache, key

    @classmethod
    def parsed(cls, d):
        """An ItemMeta over an item's already parsed metadata (MetaCache's)."""
        m = cls.__new__(cls)
        m._raw, m._d, m._frames, m._local, m._cache, m._key = None, d, False, False, None, None
        return m

    def _dict(self):
        if self._d is None:
            raw = self._raw
            m = json.loads(raw)
            record = m.get('resource') or {}
            d = _metainfo.from_record(record, self._local)  # as Dataset.metainfo()
            d['labels'] = image_labels(record)
            if self._frames:
                d = _metainfo.for_frame(d, m.get('frame'))
                d['frame_index'] = m.get('frame')
            d.update(m)
            d['dicom'] = _LazyDicom(m.get('dicom'))
            self._d, self._raw = d, None
            if self._cache is not None:
                self._cache.put(self._key, d, len(raw))
                self._cache = None
        return self._d

    def __getitem__(self, key):
        v = self._dict()[key]
        if isinstance(v, _LazyDicom):
            v = self._d[key] = v.value()  # the cached dict too: parsed once per Loader
        return v

    def __iter__(self):
        return iter(self._dict())

    def __len__(self):
        return len(self._dict())

    def __repr__(self):
        return 'ItemMeta(%r)' % ({k: self[k] for k in self},)

    # pickled (to and from worker processes) without the Loader's cache
    def __getstate__(self):
        return self._raw, self._d, self._frames, self._local

    def __setstate__(self, state):
        self._raw, self._d, self._frames, self._local = state
        self._cache = self._key = None


class _LazyDicom:
    __slots__ = ('raw',)

    def __init__(self, raw):
        self.raw = raw

    def __getstate__(self):
        return self.raw

    def __setstate__(self, raw):
        self.raw = raw

    def value(self):
        return _dicom.from_item_meta(self.raw)


class MetaCache:
    """A Loader's parsed item metadata by item index (a snapshot's metadata never changes):
    an item's ItemMeta parses its JSON once per Loader; later epochs reuse the result (its
    DICOM header too once read). Bounded by the JSON it came from (LIMIT bytes, about
    10,000 DICOM items: the parsed objects take some 20 times that); items beyond it are
    parsed when read, as without the cache. One per process: not pickled."""
    LIMIT = 16 << 20

    def __init__(self):
        self._d, self._bytes = {}, 0

    def get(self, key):
        return self._d.get(key)

    def put(self, key, d, nbytes):
        if key in self._d or self._bytes + nbytes > self.LIMIT:
            return
        self._d[key], self._bytes = d, self._bytes + nbytes

    def __len__(self):
        return len(self._d)

    def adopt(self, batch):
        """A Batch from a worker process (its metadata pickled): each ItemMeta the worker
        left unparsed becomes the one kept here, or is kept here once parsed (one the
        worker's transforms read, and perhaps changed, stays as it came)."""
        if not isinstance(batch, Batch) or not isinstance(batch.meta, list):
            return
        for k, (m, index) in enumerate(zip(batch.meta, batch.indices)):
            if not isinstance(m, ItemMeta) or m._d is not None or m._raw is None:
                continue
            d = self._d.get(int(index))
            if d is not None:
                batch.meta[k] = ItemMeta.parsed(d)
            else:
                m._cache, m._key = self, int(index)

    def item_meta(self, item, frames, local):
        """The ItemMeta of a daemon item (its index the key): the parsed one when kept, else
        one over a copy of its JSON that is kept once parsed."""
        key = int(item.index)
        d = self._d.get(key)
        if d is not None:
            return ItemMeta.parsed(d)
        return ItemMeta(_lib.item_meta(item), frames, local, self, key)


class Batch(NamedTuple):
    """One batch: images (a stacked tensor or a list, see the module's docstring), meta
    (per item an ItemMeta, parsed when first read: the shapes of Dataset's metainfo and
    dicom_metainfo; None with metadata=False)
    and indices (the dataset indices of the items)."""
    images: Any
    meta: List[Any]
    indices: List[int]


def _stack_or_list(items):
    torch = torch_module()
    if torch is not None and all(isinstance(x, torch.Tensor) for x in items):
        if all(x.shape == items[0].shape for x in items):
            return torch.stack(items)
        return list(items)
    if all(isinstance(x, np.ndarray) for x in items):
        if all(x.shape == items[0].shape for x in items):
            return np.stack(items)
        return list(items)
    return list(items)


def collate(batch):
    """The Datamint client's collate (its get_collate_fn): per tuple
    position or dict key, tensors (or numpy arrays) are stacked when all their shapes are
    equal and kept as a list otherwise; everything else becomes a list."""
    first = batch[0]
    if isinstance(first, dict):
        return {k: collate([b[k] for b in batch]) if isinstance(first[k], (tuple, dict))
                else _stack_or_list([b[k] for b in batch]) for k in first}
    if isinstance(first, tuple):
        return tuple(_stack_or_list([b[i] for b in batch]) for i in range(len(first)))
    return _stack_or_list(list(batch))


def distributed_env(rank=None, world_size=None):
    """(rank, world_size): the arguments when given, else torch.distributed's when it is
    initialised, else the RANK / WORLD_SIZE environment variables torchrun sets, else
    (0, 1)."""
    torch = torch_module() if rank is None or world_size is None else None
    dist = getattr(torch, 'distributed', None) if torch is not None else None
    initialised = dist is not None and dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else \
            int(os.environ.get('WORLD_SIZE', '1'))
    if rank is None:
        rank = dist.get_rank() if initialised else int(os.environ.get('RANK', '0'))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError('rank %d is not within world_size %d' % (rank, world_size))
    return rank, world_size


def permutation(n, seed, epoch):
    """The epoch's shuffled order of range(n), as the daemon computes it."""
    key = (int(seed) + int(epoch)) & 0xFFFFFFFFFFFFFFFF
    return [_lib.dmc_stream_perm(i, n, key) for i in range(n)]


def rank_indices(n, epoch=0, seed=0, shuffle=False, rank=0, world_size=1, drop_last=False):
    """The item indices rank `rank` reads in `epoch`, in order (DistributedSampler's rule)."""
    order = permutation(n, seed, epoch) if shuffle else list(range(n))
    if drop_last and n % world_size:
        per_rank = math.ceil((n - world_size) / world_size)
    else:
        per_rank = math.ceil(n / world_size)
    total = per_rank * world_size
    if not drop_last:
        pad = total - len(order)
        if pad > 0 and order:
            order += (order * math.ceil(pad / len(order)))[:pad]
    else:
        order = order[:total]
    return order[rank:total:world_size]


class _Conn:
    """A connection with the dataset open on it; used by one thread at a time."""

    def __init__(self, loader):
        self.client = _lib.Client(loader.socket)
        try:
            self.ds = self.client.open(loader._source, loader._project, version=loader._version,
                                       server=loader._server, api_key=loader._key,
                                       lut=loader.lut, dtype=loader._dtype,
                                       policy=loader._policy,
                                       arena_bytes=loader.arena_bytes,
                                       frames=loader.frame_by_frame, masks=loader.masks,
                                       offline=loader.offline, regions=loader._use_regions())
        except BaseException:
            self.client.close()
            raise

    def close(self):
        if not self.client.forked:
            self.ds.close()
        self.client.close()


class Loader:
    """Batches of a dataset version for one rank.

        Loader(project, batch_size=1, shuffle=False, seed=0, drop_last=False, rank=None,
               world_size=None, version='latest', root=None, api_key=None,
               server_url=None, lut=False, dtype=None, prefetch=1, arena_bytes=0,
               metadata=True, socket=None, copy=False, return_frame_by_frame=False,
               masks=False, offline=None, collate='stack', indices=None, weights=None,
               num_samples=None, size=None, resize='bilinear', crop=None, pad=None,
               pad_value=0, channels=None, window=None)

    project: a Datamint project (name or id), a local dataset folder (with dataset.json),
    a name under root as for Dataset, or a dmcache.Dataset (its source and pinned
    version). Iterating yields Batch(images, meta, indices); len() is the number of
    batches of this rank per epoch. lut applies the modality LUT (float32), dtype asks
    the daemon for another output dtype ('float32', 'float16', 'bfloat16', 'int32', ...).
    The daemon's uniformity policy (the module's docstring has the exact rules), applied
    by its decode workers to every item: window=(center, width) (CT: modality LUT, then
    clipped to [0, 1], float32), channels=1 or 3, and one of size=(H, W) with
    resize='bilinear' | 'area' | 'nearest', crop=(H, W) (centered) or pad=(H, W)
    (top-left, pad_value= elsewhere). collate='stack' (default): each batch is one tensor,
    BatchMismatchError (naming the parameter that fixes it) when its items still differ;
    'list': a list when they differ. There is no Datamint-style normalisation: items come
    in their source dtype (or `dtype`, or float32 after a window or resampling). prefetch
    (0 to 7): batches the daemon keeps ready beyond the next one. copy=True gives copies
    instead of views (views are writable too: see the module's docstring). return_frame_by_frame=True makes every frame an item of shape (1, C, H, W).
    indices= reads only those items (in the daemon's order of their positions, shuffled
    and sharded as the whole dataset is); weights= (one per item) draws num_samples
    (default: the item count) items with replacement, seeded by (seed, epoch). Both read
    with GETs of each batch (copies), not the daemon's stream.
    masks=True reads each item's segmentation label map instead of its image: uint8
    (frames, 1, H, W) on the image's grid, 0 background, k + 1 for meta[i]['labels'][k].
    split= / filter= select items as an indices= subset (_select.py); transform=,
    batch_transform=, num_workers=, pin_memory=, device= (and multiprocessing_context=
    for the workers) are the delivery stages of _delivery.py.
    """

    # hot items handed in place (DMC_OPEN_REGIONS). None: on the GET path (indices=,
    # weights=), whose batches are gathered by one copy anyway; not on the STREAM path,
    # where the daemon copies each batch into the arena on its threadpool ahead of the
    # loop and the loop views it: gathering in-place items on the loop instead cost the
    # Loader 2.98x its items/s (bench_serve.py --quick: 9,827 against 29,296 items/s).
    # True / False: always / never (the tests and the benchmark's rows).
    _regions = None

    def _use_regions(self):
        if self._regions is not None:
            return self._regions
        return self._get_path

    def __init__(self, project, batch_size=1, shuffle=False, seed=0, drop_last=False,
                 rank=None, world_size=None, version='latest', root=None, api_key=None,
                 server_url=None, lut=False, dtype=None, prefetch=1, arena_bytes=0,
                 metadata=True, socket=None, copy=False, return_frame_by_frame=False,
                 masks=False, offline=None, collate='stack', indices=None, weights=None,
                 num_samples=None, pin_memory=False, device=None, split=None, filter=None,
                 transform=None, batch_transform=None, num_workers=0,
                 multiprocessing_context=None, size=None, resize='bilinear', crop=None,
                 pad=None, pad_value=0, channels=None, window=None):
        if not 1 <= int(batch_size) <= _lib.GET_MAX:
            raise ValueError('batch_size must be 1 to %d' % _lib.GET_MAX)
        if not 0 <= int(prefetch) <= PREFETCH_MAX:
            raise ValueError('prefetch must be 0 to %d' % PREFETCH_MAX)
        dname = _dtype_name(dtype)
        if dname is not None and dname not in _lib.DTYPE_CODES:
            raise ValueError("dtype '%s' is not one the daemon produces (%s)" %
                             (dtype, ', '.join(sorted(_lib.DTYPE_CODES))))
        if collate not in COLLATES:
            raise ValueError("collate must be 'stack' or 'list', not %r" % (collate,))
        if dname == 'bfloat16' and torch_module() is None:
            raise ValueError("dtype 'bfloat16' needs torch (numpy has no bfloat16)")
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.rank, self.world_size = distributed_env(rank, world_size)
        self.lut = bool(lut)
        self.dtype = dname
        self.collate = collate
        self._dtype = _lib.DTYPE_CODES[dname] if dname is not None else 0
        # the daemon's uniformity policy (None: none), sent with every OPEN
        self._policy = make_policy(size, resize, crop, pad, pad_value, channels, window)
        if self._policy is not None and masks:
            raise ValueError('masks=True reads label maps on the image grid: size=, crop=, '
                             'pad=, channels= and window= do not apply to them')
        self.policy = {k: v for k, v in (
            ('size', size), ('resize', resize if size is not None else None),
            ('crop', crop), ('pad', pad),
            ('pad_value', pad_value if crop is not None or pad is not None else None),
            ('channels', channels), ('window', window)) if v is not None}
        self.prefetch = int(prefetch)
        self.arena_bytes = int(arena_bytes)
        self.metadata = bool(metadata)
        self.socket = socket
        self.copy = bool(copy)
        self.frame_by_frame = bool(return_frame_by_frame)
        self.masks = bool(masks)
        self.offline = _lib.offline_default(offline)
        self.epoch = 0
        self._position = 0  # batches of the epoch given out (state_dict)
        self._resume = 0    # batches the next iteration skips (load_state_dict)
        if isinstance(project, Dataset):
            self._source, self._project = project._source, project._project
            self._server, self._key = project._server, project._key
            self._version = project.version
            self.socket = socket if socket is not None else project.socket
            self.offline = project.offline if offline is None else bool(offline)
        else:
            text = os.fspath(project) if isinstance(project, (str, os.PathLike)) else ''
            if root is None and isinstance(text, str) and \
                    (os.sep in text or text.startswith(('.', '~'))) and \
                    not os.path.isfile(os.path.join(os.path.expanduser(text), 'dataset.json')):
                # a path, not a project name: never a Datamint project of that name
                raise FileNotFoundError(
                    "no local dataset at '%s' (looked for %s)" %
                    (text, os.path.join(os.path.abspath(os.path.expanduser(text)),
                                        'dataset.json')))
            if root is None and os.path.isfile(os.path.join(os.fspath(project),
                                                            'dataset.json')):
                root, project = os.path.dirname(os.path.abspath(project)), \
                    os.path.basename(os.path.abspath(project))
            try:
                self._source, self._project, self._server, self._key = resolve_source(
                    root, project, api_key, server_url, self.offline)
            except errors.DmcacheError as e:
                raise _explain.open_failure(e, project, root, api_key, server_url,
                                            None) from None
            self._version = None if version in (None, '', 'latest') else version
        self._pid = os.getpid()
        # the GET path (a subset or weights): its connections open with regions (_regions)
        self._get_path = indices is not None or weights is not None or split is not None \
            or filter is not None
        try:
            self._conns = [_Conn(self)]
        except errors.DmcacheError as e:
            if self._source == _lib.SOURCE_LOCAL or isinstance(project, Dataset):
                raise
            raise _explain.open_failure(e, self._project, root, api_key, server_url,
                                        self._server) from None
        first = self._conns[0].ds
        self._version = first.version  # pinned: every connection and epoch reads it
        self.version = first.version
        self.snapshot_id = first.snapshot_id
        self.project_name = first.project_name
        self.items = first.items
        self._running = self._running_token = None
        self._subset = self._weights = None
        self._num_samples = 0
        if indices is not None and weights is not None:
            raise ValueError('indices= and weights= exclude each other')
        if indices is not None:
            sub = [int(i) for i in indices]
            bad = [i for i in sub if not 0 <= i < self.items]
            if bad or not sub:
                self.close()
                raise ValueError('indices= must name items 0 to %d (got %s)' %
                                 (self.items - 1, bad[:5] if bad else 'none'))
            self._subset = sub
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64).reshape(-1)
            if w.shape[0] != self.items or not np.all(np.isfinite(w)) or (w < 0).any() or \
                    w.sum() <= 0:
                self.close()
                raise ValueError('weights= must be %d finite, non-negative numbers, not all '
                                 'zero (one per item)' % self.items)
            self._weights = w / w.sum()
            self._num_samples = int(num_samples) if num_samples else self.items
        self.split, self.filter = split, filter
        if split is not None or filter is not None:
            self._select(split, filter)
        self._setup_delivery(pin_memory, device, transform, batch_transform, num_workers,
                             multiprocessing_context)

    def __repr__(self):
        policy = ['dtype=%s' % self.dtype if self.dtype else 'dtype=source',
                  'collate=%s' % self.collate]
        policy += ['%s=%r' % kv for kv in self.policy.items()]
        for flag in ('lut', 'masks', 'copy'):
            if getattr(self, flag):
                policy.append('%s=True' % flag)
        if self.frame_by_frame:
            policy.append('return_frame_by_frame=True')
        source = ("local folder '%s'" % self._project if self._source == _lib.SOURCE_LOCAL
                  else "project '%s'" % (self.project_name or self._project))
        return ('<dmcache.Loader %s version %s: %d items, %d batches of %d, shuffle=%s '
                'seed=%d epoch=%d rank %d/%d, %s>' %
                (source, self.version, self.items, len(self), self.batch_size,
                 self.shuffle, self.seed, self.epoch, self.rank, self.world_size,
                 ', '.join(policy)))

    # ---- order ----
    def set_epoch(self, epoch):
        """Selects the epoch whose order the next iteration reads (as DistributedSampler)."""
        self.epoch = int(epoch)
        self._position = self._resume = 0
        self._delivered = None

    # ---- resume ----
    def state_dict(self):
        """Where this rank is: the epoch, the number of batches of it already given out
        (position), and what fixes the order (seed, shuffle, drop_last, batch_size, rank,
        world_size, items, version). load_state_dict() of it on a new Loader continues at
        the next batch, without repeating or skipping an item."""
        position = self._position if self._delivered is None else self._delivered
        return {'epoch': self.epoch, 'position': position, 'seed': self.seed,
                'shuffle': self.shuffle, 'drop_last': self.drop_last,
                'batch_size': self.batch_size, 'rank': self.rank,
                'world_size': self.world_size, 'items': self.items, 'version': self.version}

    def load_state_dict(self, state):
        """Continues from state_dict()'s position: the next iteration reads epoch
        state['epoch'] from batch state['position'] on (the daemon's stream of that epoch,
        its first batches skipped: they are read and released unused). The order must be
        the same: a different batch_size, rank, world_size, shuffle, drop_last, item count
        or version raises ValueError naming it."""
        for k in ('batch_size', 'rank', 'world_size', 'shuffle', 'drop_last', 'items',
                  'version'):
            if k in state and state[k] != getattr(self, k):
                raise ValueError('cannot resume: %s was %r, this Loader has %r' %
                                 (k, state[k], getattr(self, k)))
        position = int(state.get('position', 0))
        if not 0 <= position <= len(self.batches(int(state['epoch']))):
            raise ValueError('cannot resume: position %d is not within the epoch' % position)
        self.seed = int(state.get('seed', self.seed))
        self.epoch = int(state['epoch'])
        self._position = self._resume = position
        self._delivered = None

    def indices(self, epoch=None):
        """This rank's item indices for `epoch` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else epoch
        if self._weights is not None:
            # with replacement, seeded by (seed, epoch); then DistributedSampler's partition
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            drawn = rng.choice(self.items, size=self._num_samples, replace=True,
                               p=self._weights).tolist()
            pos = rank_indices(len(drawn), epoch, self.seed, False, self.rank,
                               self.world_size, self.drop_last)
            return [drawn[p] for p in pos]
        if self._subset is not None:
            # the subset in the daemon's order of its positions (the same permutation)
            pos = rank_indices(len(self._subset), epoch, self.seed, self.shuffle, self.rank,
                               self.world_size, self.drop_last)
            return [self._subset[p] for p in pos]
        return rank_indices(self.items, epoch, self.seed, self.shuffle, self.rank,
                            self.world_size, self.drop_last)

    def batches(self, epoch=None):
        idx = self.indices(epoch)
        out = [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        if self.drop_last and out and len(out[-1]) < self.batch_size:
            out.pop()
        return out

    def __len__(self):
        return len(self.batches())

    # ---- connections ----
    def _connections(self):
        if self._pid != os.getpid():
            # a forked child: the parent's connections are dropped, never used
            for c in self._conns:
                c.client.close()
            self._conns, self._running, self._pid = [], None, os.getpid()
        if not self._conns:
            self._conns.append(_Conn(self))
        return self._conns

    def close(self):
        """Ends a running iteration and closes the connections (reopened when iterated)."""
        self._end_running()
        for c in self._conns:
            c.close()
        self._conns = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        st = dict(self.__dict__)
        st['_conns'], st['_running'], st['_running_token'] = [], None, None
        st.pop('_meta_cache', None)  # each process parses (and keeps) its own
        return st

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---- iteration ----
    def __iter__(self):
        self._end_running()
        gen = self._deliver(self.epoch)
        # weak: a loop that breaks drops the generator, whose finally releases its batch
        self._running = weakref.ref(gen)
        return gen

    def _end_running(self):
        """One iteration at a time: a new one (or close()) ends the previous, whose views
        die with it."""
        gen = self._running() if self._running is not None else None
        self._running = None
        if gen is not None:
            gen.close()

    def _mismatch(self, items, epoch, number):
        """The BatchMismatchError of a batch whose items differ."""
        first = items[0]
        other = next(it for it in items if it.dtype != first.dtype or
                     tuple(it.shape) != tuple(first.shape))

        def desc(it):
            return 'item %d: %s %s' % (it.index, _lib.DTYPES[it.dtype], tuple(it.shape))
        a, b = tuple(first.shape), tuple(other.shape)
        fixes = []
        if other.dtype != first.dtype:
            fixes.append("pass dtype= to Loader (e.g. dtype='float32', or 'int32' for int16 "
                         "with uint16) so the daemon converts every item")
        if a[2:] != b[2:]:
            fixes.append('the images differ in (height, width): pass size=(H, W) (resized), '
                         'crop=(H, W) (center crop) or pad=(H, W) so the daemon makes '
                         'every item (H, W)')
        if a[1] != b[1]:
            fixes.append('the channels differ: pass channels=1 or channels=3')
        if a[0] != b[0]:
            fixes.append('the frame counts differ: pass return_frame_by_frame=True (one '
                         'item per frame)')
        fix = '; '.join(fixes)
        if a != b:
            fix = 'the shapes differ: ' + fix if other.dtype == first.dtype else \
                fix + ' (the shapes differ too)'
        return BatchMismatchError(
            "batch %d of epoch %d mixes %s and %s: %s, or pass collate='list' to get a list "
            "of tensors" % (number, epoch, desc(first), desc(other), fix),
            epoch=epoch, batch=number, indices=[int(it.index) for it in items])

    def _make_batch(self, b, epoch=0):
        items = [b.items[i] for i in range(b.n)]
        if b.in_region:
            # hot items handed in place (the daemon's read-only region): one gathering copy
            # into the batch's own memory, as for GET
            return self._batch_from_items(items, epoch, int(b.number))
        for it in items:
            if it.status:
                raise _lib.item_error(it)
        if not b.uniform and self.collate == 'stack':
            raise self._mismatch(items, epoch, int(b.number))
        torch = torch_module()
        first = items[0]
        dt = _np_dtype(first.dtype)
        copy = self.copy or not _VIEWS_SAFE
        if b.uniform:
            shape = (b.n,) + tuple(first.shape)
            if copy or torch is None or dt.name in TORCH_WIDEN or dt.name == 'uint64':
                images = _numpy_region(b.data, b.n * first.nbytes, dt, shape)
                if copy or torch is not None:
                    images = images.copy()
                if torch is not None:
                    images = _to_torch(torch, images, first.dtype)
            else:
                images = _torch_region(torch, b.data, b.n * first.nbytes, first.dtype, shape)
        else:
            views = [_numpy_region(it.data, it.nbytes, _np_dtype(it.dtype),
                                   tuple(it.shape)) for it in items]
            if torch is not None:
                images = [_to_torch(torch, v.copy() if copy else v, it.dtype)
                          if copy or v.dtype.name in TORCH_WIDEN or
                          v.dtype.name == 'uint64' else _torch_view(torch, it)
                          for v, it in zip(views, items)]
            else:
                images = [v.copy() for v in views] if copy else views
        meta = self._item_metas(items) if self.metadata else [None] * len(items)
        return Batch(images, meta, [int(it.index) for it in items])

    def _metas(self):
        """This process's MetaCache (made at first use: a Loader unpickled in a worker has
        none)."""
        cache = self.__dict__.get('_meta_cache')
        if cache is None:
            cache = self._meta_cache = MetaCache()
        return cache

    def _item_metas(self, items):
        cache = self._metas()
        local = self._source == _lib.SOURCE_LOCAL
        return [cache.item_meta(it, self.frame_by_frame, local) for it in items]

    def _iterate_get(self, epoch):
        """indices= / weights=: each batch GET and copied, then released."""
        token = self._running_token = object()
        conn = self._connections()[0]
        batches = self.batches(epoch)
        skip, self._resume, self._position = self._resume, 0, 0
        try:
            for number, idx in enumerate(batches):
                self._position += 1
                if number < skip:
                    continue
                items = conn.ds.get(idx)
                try:
                    batch = self._batch_from_items(items, epoch, number)
                finally:
                    conn.ds.release(items)
                yield batch
                del batch
        finally:
            if self._running_token is token:
                self._running, self._running_token = None, None

    def _batch_from_items(self, items, epoch, number):
        items = list(items)
        for it in items:
            if it.status:
                raise _lib.item_error(it)
        first = items[0]
        uniform = all(it.dtype == first.dtype and tuple(it.shape) == tuple(first.shape)
                      for it in items)
        if not uniform and self.collate == 'stack':
            raise self._mismatch(items, epoch, number)
        # one gathering copy into the batch's own (writable) memory: GET items may be in
        # the daemon's read-only region (handed in place), or in the arena until released
        if uniform:
            images = np.empty((len(items),) + tuple(first.shape), _np_dtype(first.dtype))
            for k, it in enumerate(items):
                images[k] = _numpy_region(it.data, it.nbytes, _np_dtype(it.dtype),
                                          tuple(it.shape))
        else:
            images = [_numpy_region(it.data, it.nbytes, _np_dtype(it.dtype),
                                    tuple(it.shape)).copy() for it in items]
        torch = torch_module()
        if torch is not None:
            images = _to_torch(torch, images, first.dtype) if uniform else \
                [_to_torch(torch, a, it.dtype) for a, it in zip(images, items)]
        meta = self._item_metas(items) if self.metadata else [None] * len(items)
        return Batch(images, meta, [int(it.index) for it in items])

    def _iterate(self, epoch):
        if self._subset is not None or self._weights is not None:
            yield from self._iterate_get(epoch)
            return
        token = self._running_token = object()
        conn = self._connections()[0]
        stream = conn.ds.stream(self.batch_size, seed=self.seed, epoch=epoch,
                                shuffle=self.shuffle, drop_last=self.drop_last,
                                rank=self.rank, world_size=self.world_size,
                                ahead=self.prefetch + 1)
        held = None
        skip, self._resume, self._position = self._resume, 0, 0
        try:
            while True:
                if held is not None:
                    stream.release(held)
                    held = None
                b = stream.next()
                if b is None:
                    break
                held = b
                if skip:
                    skip -= 1
                    self._position += 1
                    continue
                batch = self._make_batch(b, epoch)
                self._position += 1
                yield batch
                del batch
        finally:
            try:
                if held is not None:
                    stream.release(held)
                stream.close()
            except errors.DmcacheError:
                pass  # a broken connection took its arena with it
            if self._running_token is token:
                self._running, self._running_token = None, None

    # ---- delivery: transforms, workers, pinned memory, device ----
    def _setup_delivery(self, pin_memory, device, transform, batch_transform, num_workers,
                        multiprocessing_context):
        """Checks and keeps the delivery options (see _delivery.py)."""
        try:
            _delivery.setup(self, pin_memory, device, transform, batch_transform, num_workers,
                            multiprocessing_context)
        except BaseException:
            self.close()
            raise

    def _select(self, split, filter_):
        """split= / filter=: the items they keep become the indices= subset (_select.py)."""
        try:
            if self._weights is not None:
                raise ValueError('split= / filter= and weights= exclude each other')
            chosen = _select.select(self, split, filter_)
            if self._subset is not None:   # indices= too: its items that are kept, its order
                kept = set(chosen)
                chosen = [i for i in self._subset if i in kept]
            if not chosen:
                raise ValueError('split=%r, filter=%r keep none of the %d items of %s' %
                                 (split, filter_, self.items, self.project_name or
                                  self._project))
        except BaseException:
            self.close()
            raise
        self._subset = chosen

    def _deliver(self, epoch):
        """The iteration's generator: the daemon's batches as they are, or through the
        delivery stages when any is set."""
        if not self._staged:
            return self._iterate(epoch)
        return _delivery.batches(self, epoch)


def _np_dtype(code):
    """The numpy dtype of a daemon dtype; bfloat16 (numpy has none) as its int16 bits."""
    return np.dtype(np.int16) if code == _lib.DTYPE_BF16 else np.dtype(_lib.DTYPES[code])


def _to_torch(torch, a, code):
    """to_torch(), bfloat16 items (int16 bits in numpy) viewed as torch.bfloat16."""
    t = to_torch(torch, a)
    return t.view(torch.bfloat16) if code == _lib.DTYPE_BF16 else t


def _numpy_region(address, nbytes, dt, shape):
    """A zero-copy, writable numpy array over `nbytes` of the (copy-on-write) arena."""
    if nbytes == 0:
        return np.empty(shape, dtype=dt)
    buf = (ctypes.c_char * nbytes).from_address(address)
    return np.frombuffer(buf, dtype=dt).reshape(shape)


def _torch_region(torch, address, nbytes, dtype, shape):
    """A zero-copy torch tensor over `nbytes` of the (copy-on-write) arena at `address`."""
    dt = getattr(torch, _lib.DTYPES[dtype])
    if nbytes == 0:
        return torch.empty(shape, dtype=dt)
    buf = (ctypes.c_char * nbytes).from_address(address)
    return torch.frombuffer(buf, dtype=dt).reshape(shape)


def _torch_view(torch, item):
    """A zero-copy torch tensor over an item in the (copy-on-write) arena."""
    dt = getattr(torch, _lib.DTYPES[item.dtype])
    if item.nbytes == 0:
        return torch.empty(tuple(item.shape), dtype=dt)
    buf = (ctypes.c_char * item.nbytes).from_address(item.data)
    return torch.frombuffer(buf, dtype=dt).reshape(tuple(item.shape))
