"""dmcache.Loader's pin_memory= and device=, against the real daemon: on this CPU-only
build pin_memory=True is skipped with a warning naming why, device='cuda' is refused with
a clear error, and device='cpu' gives the same batches as copies made one batch ahead by a
background thread (valid after the next batch, a break ends the thread and releases the
arena, state_dict() counts what the caller got, errors come through the thread)."""
import json
import threading

import pytest
import torch

import dmcache
from conftest import ARENA, counters, expect_batch

KW = dict(batch_size=8, shuffle=True, seed=5, dtype='int32', arena_bytes=ARENA)


def threads():
    return {t.name for t in threading.enumerate()}


def test_pin_memory_without_cuda_is_skipped_with_a_warning(daemon, ct_reference):
    assert not torch.cuda.is_available()   # this machine: the CPU-only path
    with pytest.warns(UserWarning, match=r'pin_memory=True is skipped: CUDA is not '
                                         r'available \(torch.cuda.is_available\(\) is False\)'):
        loader = dmcache.Loader('ct', pin_memory=True, **KW)
    assert loader.pin_memory is False
    n = 0
    for b in loader:
        assert not b.images.is_pinned()
        assert torch.equal(b.images, expect_batch(ct_reference, b.indices))
        n += len(b.indices)
    assert n == 72
    loader.close()


def test_device_cuda_without_cuda_is_a_clear_error(daemon):
    for dev in ('cuda', 'cuda:0', torch.device('cuda')):
        with pytest.raises(ValueError) as e:
            dmcache.Loader('ct', device=dev, **KW)
        assert 'CUDA is not available' in str(e.value) and "device='cpu'" in str(e.value)
    with pytest.raises(ValueError) as e:
        dmcache.Loader('ct', device='meta', **KW)
    assert "'cpu' or 'cuda" in str(e.value)
    assert counters(daemon.socket)['serve_arena_used_bytes'] == 0


def test_device_cpu_gives_copies_read_one_batch_ahead(daemon, ct_reference):
    plain = dmcache.Loader('ct', **KW)
    plain.set_epoch(1)
    want = [b.indices for b in plain]
    plain.close()
    loader = dmcache.Loader('ct', device='cpu', **KW)
    loader.set_epoch(1)
    kept = []
    addr, size = None, None
    for b in loader:
        if addr is None:
            addr, size = loader._conns[0].client.arena()
            assert 'dmcache-copy' in threads()
        assert b.images.device.type == 'cpu' and b.images.dtype == torch.int32
        assert not addr <= b.images.data_ptr() < addr + size   # a copy, not an arena view
        kept.append(b)
    assert 'dmcache-copy' not in threads()
    # every batch kept stays valid after the next ones: owned copies
    assert [b.indices for b in kept] == want
    for b in kept:
        assert torch.equal(b.images, expect_batch(ct_reference, b.indices))
    assert loader.state_dict()['position'] == len(want)
    loader.close()
    assert counters(daemon.socket)['serve_arena_used_bytes'] == 0


def test_device_cpu_break_resume_and_errors(daemon, ct_reference):
    loader = dmcache.Loader('ct', device='cpu', **KW)
    got = []
    for b in loader:
        got.append(b.indices)
        state = loader.state_dict()
        if len(got) == 3:
            break   # the thread has read ahead; the caller got 3
    assert state['position'] == 3
    loader.close()
    assert 'dmcache-copy' not in threads()
    assert counters(daemon.socket)['serve_arena_used_bytes'] == 0
    again = dmcache.Loader('ct', device='cpu', **KW)
    again.load_state_dict(json.loads(json.dumps(state)))
    got += [b.indices for b in again]
    whole = dmcache.Loader('ct', **KW)
    assert got == [b.indices for b in whole]
    whole.close()
    again.close()
    # an error of the daemon's batches comes through the thread (mixed int16/uint16)
    mixed = dmcache.Loader('ct', batch_size=8, shuffle=True, seed=0, arena_bytes=ARENA,
                           device='cpu')
    with pytest.raises(dmcache.BatchMismatchError) as e:
        for _ in mixed:
            pass
    assert 'int16' in str(e.value) and 'uint16' in str(e.value)
    mixed.close()
    assert 'dmcache-copy' not in threads()
    assert counters(daemon.socket)['serve_arena_used_bytes'] == 0
