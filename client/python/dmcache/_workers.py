"""The Loader's worker processes (num_workers=N): each reads its own batches from the
daemon on a connection of its own and runs the transforms, so that CPU-heavy
augmentation scales as PyTorch DataLoader's workers do.

Order. The epoch's batches of this rank are the Loader's batches(epoch) (the daemon's
order, sharded across ranks as without workers). Worker w reads batches w, w + N, w + 2N,
... (GETs of each batch's items) and puts each, transformed, on its own queue; the main
process takes batch k from worker k % N's queue. So every batch (every item) of the epoch
is read exactly once, by one worker, and they come out in the same order as with
num_workers=0.

Processes. Workers start when an iteration starts and end with it (a break, close(),
the next iteration). They are forked (the default context; multiprocessing_context= for
another: then the Loader and its transforms are pickled); a forked worker drops the
parent's connections and opens its own. Tensors travel through shared memory (torch's
multiprocessing) and errors come back with their worker's traceback.
"""
import multiprocessing
import pickle
import queue
import time
import traceback

from . import _pipeline
from .dataset import torch_module

_OK, _ERR, _END = 0, 1, 2
POLL_S = 0.1


class WorkerError(RuntimeError):
    """A worker process died, or its error could not be sent back as itself."""


class _WorkerTraceback(Exception):
    def __str__(self):
        return 'in dmcache Loader worker:\n' + (self.args[0] if self.args else '')


def _context(name):
    torch = torch_module()
    mp = torch.multiprocessing if torch is not None else multiprocessing
    return mp.get_context(name or 'fork')


def _worker(loader, epoch, skip, worker, n, out, stop):
    number = -1
    try:
        torch = torch_module()
        if torch is not None:
            torch.set_num_threads(1)  # N workers share the machine, as DataLoader's do
        # the main process's parsed metadata (forked along) stays there: the batches carry
        # their items' JSON, which the main process parses once (MetaCache.adopt)
        loader.__dict__.pop('_meta_cache', None)
        conn = loader._connections()[0]
        batches = loader.batches(epoch)
        for number in range(worker, len(batches), n):
            if stop.is_set():
                break
            if number < skip:
                continue
            items = conn.ds.get(batches[number])
            try:
                batch = loader._batch_from_items(items, epoch, number)
            finally:
                conn.ds.release(items)
            batch = _pipeline.apply_transforms(batch, loader.transform, loader.batch_transform,
                                               loader.collate, number)
            out.put((_OK, number, batch))
            del batch
        out.put((_END, number, None))
    except BaseException as e:  # noqa: B902 (sent to the main process)
        tb = traceback.format_exc()
        try:
            pickle.dumps(e)
            payload = (e, tb)
        except Exception:
            payload = (WorkerError('%s: %s' % (type(e).__name__, e)), tb)
        try:
            out.put((_ERR, number, payload))
        except Exception:
            pass
    finally:
        # the tensors sent are shared through this process (file descriptors it hands
        # over when the main process unpickles them): stay until the iteration ends
        stop.wait()
        try:
            loader.close()
        except Exception:
            pass
        out.close()
        out.join_thread()


def run(loader, epoch, skip, depth=2):
    """The transformed batches of `epoch` from batch `skip` on, read by loader.num_workers
    worker processes, in the epoch's order."""
    n = loader.num_workers
    ctx = _context(loader.multiprocessing_context)
    stop = ctx.Event()
    queues = [ctx.Queue(maxsize=max(1, depth)) for _ in range(n)]
    procs = [ctx.Process(target=_worker, args=(loader, epoch, skip, w, n, queues[w], stop),
                         name='dmcache-loader-worker-%d' % w, daemon=True)
             for w in range(n)]
    for p in procs:
        p.start()
    total = len(loader.batches(epoch))
    try:
        for number in range(skip, total):
            w = number % n
            while True:
                try:
                    kind, got, value = queues[w].get(timeout=POLL_S)
                    break
                except (OSError, EOFError) as e:
                    # a tensor's memory is handed over by its worker, which is gone
                    procs[w].join(timeout=1)
                    raise WorkerError(
                        'Loader worker %d (pid %d) exited with status %s before batch %d of '
                        'epoch %d was received' % (w, procs[w].pid, procs[w].exitcode, number,
                                                   epoch)) from e
                except queue.Empty:
                    if not procs[w].is_alive():
                        # one last look: it may have put its result just before it ended
                        try:
                            kind, got, value = queues[w].get(timeout=POLL_S)
                            break
                        except queue.Empty:
                            raise WorkerError(
                                'Loader worker %d (pid %d) exited with status %s before '
                                'batch %d of epoch %d' % (w, procs[w].pid, procs[w].exitcode,
                                                          number, epoch)) from None
            if kind == _ERR:
                exc, tb = value
                raise exc from _WorkerTraceback(tb)
            if kind != _OK or got != number:
                raise WorkerError('Loader worker %d gave batch %s where batch %d was due'
                                  % (w, got, number))
            yield value
            del value
    finally:
        stop.set()
        # unblock workers waiting on a full queue until they end; then stop the rest
        deadline = time.monotonic() + 10
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            for q in queues:
                try:
                    while True:
                        q.get_nowait()
                except (queue.Empty, OSError, ValueError, EOFError):
                    pass
            for p in procs:
                p.join(timeout=0.02)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        for q in queues:
            q.close()
            q.cancel_join_thread()
