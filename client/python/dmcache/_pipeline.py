"""The Loader's stages after the daemon: per-item and per-batch transforms, a background
thread that copies each batch out of the connection's arena (into pinned host memory with
pin_memory=True, plain memory with device='cpu'), and the copy to a CUDA device on a side
stream that overlaps the next batch.

Threads: background() runs its source generator (the daemon's batches, or the workers'
results) in one thread of its own; the generator it returns, and to_cuda(), run in the
consumer's thread. Nothing here talks to the daemon itself.
"""
import queue
import threading

import numpy as np

from .dataset import torch_module

_OK, _ERR, _END = 0, 1, 2


class TransformMismatchError(ValueError):
    """transform= returned items of different shapes or dtypes with collate='stack'."""


def map_tensors(obj, fn):
    """`obj` with fn applied to every torch tensor and numpy array in it: a Batch's images
    (its meta and indices stay), tuples (named ones too), lists and dicts, recursively."""
    torch = torch_module()
    if torch is not None and isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, np.ndarray):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, '_fields'):
        if type(obj).__name__ == 'Batch' and hasattr(obj, 'images'):
            return obj._replace(images=map_tensors(obj.images, fn))
        return type(obj)(*(map_tensors(x, fn) for x in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(x, fn) for x in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _stack(items, collate, number, indices):
    torch = torch_module()
    first = items[0]

    def same(x):
        return type(x) is type(first) and getattr(x, 'shape', None) == first.shape and \
            getattr(x, 'dtype', None) == first.dtype
    tensors = (torch is not None and isinstance(first, torch.Tensor)) or \
        isinstance(first, np.ndarray)
    if tensors and all(same(x) for x in items):
        return torch.stack(items) if torch is not None and isinstance(first, torch.Tensor) \
            else np.stack(items)
    if collate == 'stack' and tensors:
        k = next(k for k, x in enumerate(items) if not same(x))
        other = items[k]
        raise TransformMismatchError(
            'transform= made items of batch %d differ: item %d is %s %s, item %d is %s %s; '
            "make the transform's outputs equal in shape and dtype, or pass collate='list'"
            % (number, indices[0], getattr(first, 'dtype', type(first).__name__),
               tuple(getattr(first, 'shape', ())), indices[k],
               getattr(other, 'dtype', type(other).__name__),
               tuple(getattr(other, 'shape', ()))))
    return list(items)


def apply_transforms(batch, transform, batch_transform, collate, number):
    """transform(item) for each item of the batch (each a tensor (frames, C, H, W)), the
    results stacked as the Loader stacks (a list with collate='list' when they differ);
    then batch_transform(Batch), whose result is what the Loader yields."""
    if transform is not None:
        out = [transform(x) for x in batch.images]
        batch = batch._replace(images=_stack(out, collate, number, batch.indices))
    if batch_transform is not None:
        batch = batch_transform(batch)
    return batch


def copy_out(obj):
    """Copies of every tensor/array of `obj` (out of the arena, into this process's
    memory)."""
    return map_tensors(obj, lambda t: t.copy() if isinstance(t, np.ndarray) else t.clone())


def pin(obj):
    """Copies of every tensor of `obj` in page-locked (pinned) host memory."""
    torch = torch_module()
    return map_tensors(obj, lambda t: (torch.from_numpy(t) if isinstance(t, np.ndarray)
                                       else t).pin_memory())


def background(source, fn, depth=2, name='dmcache-loader'):
    """Yields fn(x) for each x of the generator `source`, which runs in a thread of its own
    reading up to `depth` results ahead. fn must not keep x's arena views: the thread asks
    `source` for the next x (which releases the previous batch) right after fn returns.
    Closing the returned generator stops the thread and closes `source` (in that thread)."""
    q = queue.Queue(maxsize=max(1, int(depth)))
    stop = threading.Event()

    def put(kind, value):
        while not stop.is_set():
            try:
                q.put((kind, value), timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for x in source:
                y = fn(x)
                del x
                if not put(_OK, y):
                    break
                del y
        except BaseException as e:  # noqa: B902 (given to the consumer)
            put(_ERR, e)
        finally:
            try:
                source.close()
            except Exception:
                pass
            put(_END, None)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == _END:
                return
            if kind == _ERR:
                raise value
            yield value
            del value
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


def to_cuda(source, device):
    """The batches of `source` on CUDA `device`: each copied (non_blocking, from pinned
    memory when pin_memory=True) on a side stream while the previous one is in use; the
    consumer's stream waits for the copy before the batch is given out."""
    torch = torch_module()
    stream = torch.cuda.Stream(device=device)

    def start(b):
        with torch.cuda.stream(stream):
            return map_tensors(b, lambda t: (torch.from_numpy(t) if isinstance(t, np.ndarray)
                                             else t).to(device, non_blocking=True))

    def ready(b):
        current = torch.cuda.current_stream(device)
        current.wait_stream(stream)
        map_tensors(b, lambda t: t.record_stream(current))
        return b

    it = iter(source)
    end = object()
    try:
        nxt = next(it, end)
        nxt = start(nxt) if nxt is not end else end
        while nxt is not end:
            cur = ready(nxt)
            b = next(it, end)
            nxt = start(b) if b is not end else end
            yield cur
            del cur
    finally:
        close = getattr(it, 'close', None)
        if close is not None:
            close()
