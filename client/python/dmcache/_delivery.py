"""The Loader's delivery options and the generator that chains their stages.

    transform=fn         fn(item) per item (a tensor (frames, C, H, W); numpy without
                         torch), results stacked as the Loader stacks
    batch_transform=fn   fn(Batch) per batch; its result is what the Loader yields
    num_workers=N        N worker processes read and transform the batches (_workers.py)
    pin_memory=True      a background thread copies each batch into pinned host memory
                         (skipped with a warning when CUDA is not available)
    device='cuda'        each batch copied to the device on a side stream (non_blocking),
                         overlapping the next; device='cpu': batches are copies in this
                         process's memory made by a background thread one batch ahead

Order of the stages: daemon -> (workers | transforms) -> pinned / plain copy in a
background thread -> CUDA copy. The batches and their order are those of num_workers=0
without options; state_dict() counts the batches given to the caller (not those read
ahead).
"""
import warnings

from . import _pipeline, _workers
from .dataset import torch_module


def setup(loader, pin_memory, device, transform, batch_transform, num_workers,
          multiprocessing_context):
    torch = torch_module()
    if transform is not None and not callable(transform):
        raise TypeError('transform= must be callable (one item -> one item)')
    if batch_transform is not None and not callable(batch_transform):
        raise TypeError('batch_transform= must be callable (Batch -> what the Loader yields)')
    num_workers = int(num_workers)
    if num_workers < 0:
        raise ValueError('num_workers must be 0 or more, not %d' % num_workers)
    dev = None
    if device is not None:
        if torch is None:
            raise ValueError('device=%r needs torch' % (device,))
        dev = torch.device(device)
        if dev.type not in ('cpu', 'cuda'):
            raise ValueError("device must be 'cpu' or 'cuda[:N]', not %r" % (device,))
        if dev.type == 'cuda' and not torch.cuda.is_available():
            raise ValueError(
                "device=%r: CUDA is not available here (torch %s: torch.cuda.is_available() "
                "is False); pass device='cpu' or leave device= unset" %
                (device, torch.__version__))
    pin = bool(pin_memory)
    if pin and (torch is None or not torch.cuda.is_available()):
        warnings.warn(
            'pin_memory=True is skipped: %s, so there is no pinned memory to copy batches '
            'into; batches are given as without pin_memory' %
            ('torch is not installed' if torch is None else
             'CUDA is not available (torch.cuda.is_available() is False)'),
            UserWarning, stacklevel=4)
        pin = False
    loader.pin_memory = pin
    loader.device = dev
    loader.transform = transform
    loader.batch_transform = batch_transform
    loader.num_workers = num_workers
    loader.multiprocessing_context = multiprocessing_context
    loader._delivered = None
    loader._staged = bool(pin or dev is not None or transform is not None or
                          batch_transform is not None or num_workers)


def batches(loader, epoch):
    """The iteration's generator with the delivery stages; keeps loader._delivered (the
    batches of the epoch given to the caller) for state_dict()."""
    skip = loader._resume
    transforms = loader.transform is not None or loader.batch_transform is not None
    if loader.num_workers:
        loader._resume = 0
        source = _adopted(loader, _workers.run(loader, epoch, skip))
        owned = True   # the workers' results are this process's (shared) memory
    else:
        source = loader._iterate(epoch)   # it skips the first `skip` batches itself
        owned = False
        if transforms:
            source = _transformed(loader, source, skip)
    dev = loader.device
    if loader.pin_memory:
        source = _pipeline.background(source, _pipeline.pin, name='dmcache-pin-memory')
    elif dev is not None and dev.type == 'cpu' and not owned:
        source = _pipeline.background(source, _pipeline.copy_out, name='dmcache-copy')
    if dev is not None and dev.type == 'cuda':
        source = _pipeline.to_cuda(source, dev)
    loader._delivered = skip
    try:
        for batch in source:
            loader._delivered += 1
            yield batch
            del batch
    finally:
        close = getattr(source, 'close', None)
        if close is not None:
            close()


def _adopted(loader, source):
    """The workers' batches, their item metadata parsed once per Loader in this process
    too (loader.MetaCache.adopt)."""
    cache = loader._metas() if loader.metadata else None
    try:
        for batch in source:
            if cache is not None:
                cache.adopt(batch)
            yield batch
            del batch
    finally:
        source.close()


def _transformed(loader, source, skip):
    try:
        for number, batch in enumerate(source, skip):
            yield _pipeline.apply_transforms(batch, loader.transform, loader.batch_transform,
                                             loader.collate, number)
            del batch
    finally:
        source.close()
