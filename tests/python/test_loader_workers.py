"""dmcache.Loader's transform=, batch_transform= and num_workers=, against the real
daemon: N worker processes, each on its own connection, read batches k = w, w + N, ... of
the rank's epoch order and run the transforms; every item comes exactly once per epoch, in
the order of num_workers=0, equal to an independent decode; errors, a dead worker, a break
and a resume behave."""
import json
import multiprocessing
import os

import numpy as np
import pytest
import torch

import dmcache
import dmcache._workers
from conftest import ARENA, counters

KW = dict(batch_size=6, shuffle=True, seed=21, dtype='int32', arena_bytes=ARENA)


def augment(x):
    """A per-item transform: flip, crop to 256x256, scale (float32)."""
    return torch.flip(x, dims=[-1])[..., 128:384, 100:356].to(torch.float32) * 0.5 + 1


def augment_np(a):
    return np.flip(a, axis=-1)[..., 128:384, 100:356].astype(np.float32) * 0.5 + 1


def with_pid(batch):
    return batch.indices, batch.images, batch.meta, os.getpid()


def no_children():
    return not multiprocessing.active_children()


@pytest.mark.parametrize('workers', [1, 2, 3])
def test_workers_give_each_item_once_in_the_same_order(daemon, ct_reference, workers):
    for rank, world in ((0, 1), (1, 2)):
        base = dmcache.Loader('ct', transform=augment, rank=rank, world_size=world, **KW)
        par = dmcache.Loader('ct', transform=augment, batch_transform=with_pid,
                             num_workers=workers, rank=rank, world_size=world, **KW)
        for epoch in (0, 1):
            base.set_epoch(epoch)
            par.set_epoch(epoch)
            want = [(b.indices, b.images, [m['resource']['id'] for m in b.meta])
                    for b in base]
            got = list(par)
            assert len(got) == len(want) == len(par)
            assert sum((g[0] for g in got), []) == par.indices() == base.indices()
            pids = [g[3] for g in got]
            assert os.getpid() not in pids and len(set(pids)) == workers
            for k, (g, w) in enumerate(zip(got, want)):
                assert g[0] == w[0] and pids[k] == pids[k % workers]  # batch k: worker k % N
                assert g[1].dtype == torch.float32 and g[1].shape[-2:] == (256, 256)
                assert torch.equal(g[1], w[1])
                ref = np.stack([augment_np(ct_reference[i]) for i in g[0]])
                assert np.array_equal(g[1].numpy(), ref)
                assert [m['resource']['id'] for m in g[2]] == w[2]
            assert no_children()
        base.close()
        par.close()
    assert counters(daemon.socket)['serve_arena_used_bytes'] == 0


def test_workers_cover_the_epoch_across_ranks(daemon):
    seen = []
    for rank in range(3):
        loader = dmcache.Loader('ct', num_workers=2, transform=lambda x: x, rank=rank,
                                world_size=3, metadata=False, **KW)
        got = [i for b in loader for i in b.indices]
        assert got == loader.indices()
        seen += got
        loader.close()
    assert sorted(seen) == list(range(72))   # 72 = 3 ranks * 24: each item exactly once


def test_batch_transform_without_workers_and_metadata(daemon, ct_reference):
    loader = dmcache.Loader('ct', transform=augment, batch_transform=with_pid, **KW)
    for indices, images, meta, pid in loader:
        assert pid == os.getpid()
        assert np.array_equal(images.numpy(),
                              np.stack([augment_np(ct_reference[i]) for i in indices]))
        assert all(isinstance(m['resource']['id'], str) for m in meta)
    loader.close()


def fail_on_item_7(batch):
    if 7 in batch.indices:
        raise KeyError('augmentation failed on item 7')
    return batch


def exit_on_item_7(batch):
    if 7 in batch.indices:
        os._exit(3)
    return batch


def test_worker_errors_and_a_dead_worker(daemon):
    loader = dmcache.Loader('ct', batch_transform=fail_on_item_7, num_workers=2,
                            metadata=False, **KW)
    with pytest.raises(KeyError) as e:
        for _ in loader:
            pass
    assert 'augmentation failed on item 7' in str(e.value)
    cause = e.value.__cause__
    assert cause is not None and 'fail_on_item_7' in str(cause) and 'worker' in str(cause)
    assert no_children()
    loader.close()
    loader = dmcache.Loader('ct', batch_transform=exit_on_item_7, num_workers=2,
                            metadata=False, **KW)
    with pytest.raises(dmcache._workers.WorkerError) as e:
        for _ in loader:
            pass
    assert 'exited with status 3' in str(e.value)
    assert no_children()
    loader.close()
    # items made different by the transform: stack refuses, naming both and the fix
    for workers in (0, 2):
        loader = dmcache.Loader('ct', batch_size=4, dtype='int32', metadata=False,
                                num_workers=workers,
                                transform=lambda x: x[..., :int(x[0, 0, 0, 0]) % 5 + 1])
        with pytest.raises(ValueError) as e:
            for _ in loader:
                pass
        assert "collate='list'" in str(e.value) and 'transform=' in str(e.value)
        loader.close()
    assert counters(daemon.socket)['serve_arena_used_bytes'] == 0


@pytest.mark.parametrize('stop', [0, 4])
def test_workers_break_and_resume(daemon, stop):
    kw = dict(KW, metadata=False, transform=lambda x: x + 1)
    whole = dmcache.Loader('ct', **kw)
    whole.set_epoch(2)
    expect = [(b.indices, b.images.clone()) for b in whole]
    whole.close()
    first = dmcache.Loader('ct', num_workers=2, **kw)
    first.set_epoch(2)
    got, state = [], first.state_dict()
    for b in first:
        if len(got) == stop:
            break
        got.append((b.indices, b.images))
        state = first.state_dict()
    first.close()
    assert no_children() and state['position'] == stop
    second = dmcache.Loader('ct', num_workers=3, **kw)
    second.load_state_dict(json.loads(json.dumps(state)))
    got += [(b.indices, b.images) for b in second]
    assert [g[0] for g in got] == [e[0] for e in expect]
    assert all(torch.equal(g[1], e[1]) for g, e in zip(got, expect))
    assert second.state_dict()['position'] == len(expect)
    second.close()
    assert no_children()
    with pytest.raises(ValueError):
        dmcache.Loader('ct', num_workers=-1)
    with pytest.raises(TypeError):
        dmcache.Loader('ct', transform='flip')
