"""An image of dmcache.Dataset crossing from a DataLoader worker to its main process.

PyTorch sends every tensor a worker returns through a new shared-memory segment and its
file descriptor (torch.multiprocessing's reductions): at the Datamint guide's DataLoader
(batch_size=8, items collated as a list, so one segment per image) that is most of each
item's cost, a few milliseconds against the daemon's fraction of one. The daemon already
holds the item, and the main process has the same Dataset (the DataLoader's), its own
connection and the same pinned snapshot. So an image of Dataset.__getitem__ in a worker is
an ItemTensor: a torch.Tensor like any other to the worker's code, sent to the main
process as (dataset token, index, conversion) by ForkingPickler (the pickler of
multiprocessing's queues only: torch.save and pickle keep the data) and read there again
from the daemon, converted the same way: the same bytes.

Only an image as __getitem__ made it goes so: changed in place (its version counter
moved), a view of it or anything computed from it is sent as PyTorch sends tensors.
Imported where torch is (dmcache.dataset imports it lazily).
"""
from multiprocessing.reduction import ForkingPickler

import torch


class ItemTensor(torch.Tensor):
    """An image of dmcache.Dataset in a DataLoader worker (see the module's docstring)."""


def in_worker():
    """Whether this process is a DataLoader worker."""
    import torch.utils.data
    return torch.utils.data.get_worker_info() is not None


def sendable(image, token, idx, conversion):
    """`image` as an ItemTensor that names (token, idx, conversion)."""
    t = image.as_subclass(ItemTensor)
    t._dmcache = (token, idx, conversion, t._version, t.data_ptr(), tuple(t.shape),
                  t.stride(), t.dtype)
    return t


def _reduce(t):
    ref = getattr(t, '_dmcache', None)
    if (ref is not None and t._version == ref[3] and t.data_ptr() == ref[4]
            and tuple(t.shape) == ref[5] and t.stride() == ref[6] and t.dtype == ref[7]):
        return rebuild, ref[:3] + (ref[5], ref[7])
    from torch.multiprocessing.reductions import reduce_tensor
    return reduce_tensor(t.as_subclass(torch.Tensor))


def rebuild(token, idx, conversion, shape, dtype):
    """The image read again in the receiving process, through its own Dataset."""
    from . import dataset, errors
    ds = dataset.BY_TOKEN.get(token)
    if ds is None:
        raise errors.DmcacheError(
            'an image of dmcache.Dataset reached a process that does not hold its Dataset '
            '(it was sent through a multiprocessing queue to a process other than the '
            "DataLoader's): return image.clone() from the worker to send the data itself")
    image = ds._image_again(idx, conversion)
    if tuple(image.shape) != shape or image.dtype != dtype:
        raise errors.DmcacheError(
            'item %d read again in the main process is %s %s, not the worker\'s %s %s'
            % (idx, tuple(image.shape), image.dtype, shape, dtype))
    return image


ForkingPickler.register(ItemTensor, _reduce)
