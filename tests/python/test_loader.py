"""dmcache.Loader against the real daemon: DistributedSampler's order and sharding,
zero-copy batches, prefetching, releases, a client killed mid-batch, a client that stops
reading, writable (copy-on-write) views."""
import json
import os
import subprocess
import textwrap
import time

import numpy as np
import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

import dmcache
from conftest import ARENA, PYTHON, counters, make_dicom_folder, run_python, start_daemon


class ArenaLoader(dmcache.Loader):
    """Every batch laid out in the connection's arena (no items handed in place)."""
    _regions = False


@pytest.mark.parametrize('n', [1, 7, 19, 72, 100])
@pytest.mark.parametrize('world', [1, 3, 4])
@pytest.mark.parametrize('drop_last', [False, True])
def test_order_is_distributed_samplers(n, world, drop_last):
    """Without shuffle the order is DistributedSampler's; with shuffle its partition rule
    over the daemon's permutation (checked against an independent implementation)."""
    for epoch in (0, 1, 5):
        for rank in range(world):
            s = DistributedSampler(range(n), num_replicas=world, rank=rank,
                                   shuffle=False, seed=7, drop_last=drop_last)
            s.set_epoch(epoch)
            assert dmcache.rank_indices(n, epoch, 7, False, rank, world,
                                        drop_last) == list(s)
        perm = feistel_perm(n, 7 + epoch)
        assert sorted(perm) == list(range(n))
        assert dmcache.loader.permutation(n, 7, epoch) == perm
        for rank in range(world):
            s = DistributedSampler(range(n), num_replicas=world, rank=rank,
                                   shuffle=False, seed=7, drop_last=drop_last)
            assert dmcache.rank_indices(n, epoch, 7, True, rank, world,
                                        drop_last) == [perm[i] for i in s]
    if n >= 19:
        assert feistel_perm(n, 7) != feistel_perm(n, 8) != list(range(n))


M64 = (1 << 64) - 1


def splitmix64(x):
    x = (x + 0x9e3779b97f4a7c15) & M64
    x = ((x ^ (x >> 30)) * 0xbf58476d1ce4e5b9) & M64
    x = ((x ^ (x >> 27)) * 0x94d049bb133111eb) & M64
    return x ^ (x >> 31)


def feistel_perm(n, key):
    """proto.h's STREAM permutation, written again from its description."""
    if n <= 1:
        return list(range(n))
    bits = max(2, (n - 1).bit_length())
    bits += bits & 1
    half = bits // 2
    mask = (1 << half) - 1
    keys = [splitmix64((key + r) & M64) for r in range(4)]
    out = []
    for i in range(n):
        x = i
        while True:
            left, right = x >> half, x & mask
            for k in keys:
                left, right = right, left ^ (splitmix64(k ^ right) & mask)
            x = (left << half) | right
            if x < n:
                break
        out.append(x)
    return out


def test_four_ranks_cover_the_dataset_once(daemon, monkeypatch):
    per_rank = {}
    for rank in range(4):
        monkeypatch.setenv('RANK', str(rank))
        monkeypatch.setenv('WORLD_SIZE', '4')
        loader = dmcache.Loader('sample', batch_size=2, shuffle=True, seed=3,
                                arena_bytes=ARENA, collate='list')
        assert (loader.rank, loader.world_size) == (rank, 4)
        loader.set_epoch(2)
        per_rank[rank] = [i for b in loader for i in b.indices]
        assert len(per_rank[rank]) == 5  # ceil(19 / 4): one rank reads a padding item
        loader.close()
    everything = sorted(i for r in per_rank.values() for i in r)
    # 20 reads: each of the 19 items once, plus the padding rule's repeat of the
    # epoch order's first item
    first = dmcache.rank_indices(19, 2, 3, True, 0, 1)[0]
    assert everything == sorted(list(range(19)) + [first])
    # drop_last: disjoint shards, 19 -> 4 per rank, 3 items unread this epoch
    seen = []
    for rank in range(4):
        loader = dmcache.Loader('sample', batch_size=4, shuffle=True, seed=3, rank=rank,
                                world_size=4, drop_last=True, arena_bytes=ARENA, collate='list')
        seen += [i for b in loader for i in b.indices]
        loader.close()
    assert len(seen) == 16 and len(set(seen)) == 16


def test_batches_equal_the_items_and_shuffles_are_seeded(daemon):
    ds = dmcache.Dataset(dataset_name='sample', normalize=False)
    loader = dmcache.Loader(ds, batch_size=4, shuffle=True, seed=11, arena_bytes=ARENA, collate='list')
    assert len(loader) == 5 and loader.version == ds.version
    epoch0 = []
    for batch in loader:
        images, meta, indices = batch
        epoch0.append(indices)
        items = [ds.read(i) for i in indices]
        assert [m['resource']['id'] for m in meta] == [r[1]['resource']['id'] for r in items]
        if isinstance(images, torch.Tensor):
            # one shape: a stacked copy (batch, frames, channels, H, W)
            assert images.shape == (len(indices),) + items[0][0].shape
            for img, (a, _) in zip(images, items):
                assert np.array_equal(img.numpy(), a)
        else:
            assert len(images) == len(indices)
            for img, (a, _) in zip(images, items):
                expect = a.astype(np.int32) if a.dtype == np.uint16 else a
                assert img.shape == a.shape and np.array_equal(img.numpy(), expect)
    assert sorted(i for b in epoch0 for i in b) == list(range(19))
    again = dmcache.Loader('sample', batch_size=4, shuffle=True, seed=11, arena_bytes=ARENA, collate='list')
    assert [b.indices for b in again] == epoch0
    again.set_epoch(1)
    epoch1 = [b.indices for b in again]
    assert epoch1 != epoch0 and sorted(sum(epoch1, [])) == list(range(19))
    other = dmcache.Loader('sample', batch_size=4, shuffle=True, seed=12, arena_bytes=ARENA, collate='list')
    assert [b.indices for b in other] != epoch0
    plain = dmcache.Loader('sample', batch_size=4, arena_bytes=ARENA, collate='list')
    assert [b.indices for b in plain] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11],
                                          [12, 13, 14, 15], [16, 17, 18]]
    short = dmcache.Loader('sample', batch_size=4, drop_last=True, arena_bytes=ARENA, collate='list')
    assert len(short) == 4 and sum(len(b.indices) for b in short) == 16
    for x in (loader, again, other, plain, short):
        x.close()


def test_views_are_zero_copy_and_released_at_the_next_batch(daemon):
    # the arena path (batches of hot items handed in place are copies: test_regions.py)
    loader = ArenaLoader('sample', batch_size=3, arena_bytes=ARENA, prefetch=0, collate='list')
    it = iter(loader)
    b = next(it)  # ct 0-2: one shape, stacked
    assert isinstance(b.images, torch.Tensor) and b.images.shape == (3, 1, 1, 512, 512)
    b = next(it)
    b = next(it)  # 6, 7 (CT 512x512) and 8 (4 frames of 128x128): a list of views
    assert isinstance(b.images, list) and [tuple(x.shape) for x in b.images] == \
        [(1, 1, 512, 512), (1, 1, 512, 512), (4, 1, 128, 128)]
    addr, size = loader._conns[0].client.arena()
    for x in b.images[:2]:
        assert addr <= x.data_ptr() < addr + size  # inside the shared memory
    used = counters(daemon.socket)['serve_arena_used_bytes']
    assert used >= 2 * 512 * 512 * 2 + 4 * 128 * 128 * 2
    rest = list(it)
    assert [r.indices for r in rest] == [[9, 10, 11], [12, 13, 14], [15, 16, 17], [18]]
    del rest
    # the iteration ended: everything released
    assert counters(daemon.socket)['serve_arena_used_bytes'] == 0
    # breaking out of a loop releases too
    for b in loader:
        break
    del b
    assert counters(daemon.socket)['serve_arena_used_bytes'] == 0
    loader.close()


@pytest.mark.parametrize('prefetch', [0, 1, 2])
def test_prefetching_gives_the_same_batches(daemon, prefetch):
    ref = dmcache.Loader('ct', batch_size=8, shuffle=True, seed=5, prefetch=0,
                         arena_bytes=ARENA, metadata=False, collate='list')
    # ct mixes int16 and uint16 slices: batches are stacked or lists of views
    expect = [(b.indices, [x.clone() for x in b.images]) for b in ref]
    ref.close()
    loader = dmcache.Loader('ct', batch_size=8, shuffle=True, seed=5, prefetch=prefetch,
                            arena_bytes=ARENA, metadata=False, collate='list')
    before = counters(daemon.socket)['serve_streams_total']
    got = [(b.indices, [x.clone() for x in b.images]) for b in loader]
    # one connection; the daemon decodes ahead on its STREAM
    assert len(loader._conns) == 1
    assert counters(daemon.socket)['serve_streams_total'] == before + 1
    assert [g[0] for g in got] == [e[0] for e in expect]
    for (_, a), (_, b) in zip(got, expect):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert counters(daemon.socket)['serve_arena_used_bytes'] == 0
    loader.close()


def test_item_errors_and_reuse(daemon, tmp_path):
    make_dicom_folder(str(tmp_path), 'bad', 5)
    with open(str(tmp_path / 'bad' / 'images' / 'xr03.dcm'), 'r+b') as f:
        f.truncate(300)
    loader = dmcache.Loader(str(tmp_path / 'bad'), batch_size=2, arena_bytes=ARENA, collate='list')
    it = iter(loader)
    assert next(it).indices == [0, 1]
    with pytest.raises(dmcache.DecodeError) as e:
        next(it)
    assert e.value.index == 3 and e.value.code == 1009
    # the failed batch's other item was released
    assert counters(daemon.socket)['serve_arena_used_bytes'] == 0
    # the loader's connections stay usable: a new iteration reads again
    assert next(iter(loader)).indices == [0, 1]
    ok = dmcache.Loader(str(tmp_path / 'bad'), batch_size=3, arena_bytes=ARENA, collate='list')
    assert next(iter(ok)).indices == [0, 1, 2]
    ok.close()
    loader.close()
    with pytest.raises(ValueError):
        dmcache.Loader('sample', batch_size=0, collate='list')
    with pytest.raises(ValueError):
        dmcache.Loader('sample', rank=4, world_size=4, collate='list')
    with pytest.raises(dmcache.NotFoundError):
        dmcache.Loader('no-such-project', collate='list')


def test_a_batch_larger_than_the_arena_fails_instead_of_hanging(daemon):
    # four CT slices of 512 KiB each in a 1 MiB arena
    # the arena path: hot items handed in place would need no arena space
    loader = ArenaLoader('sample', batch_size=4, arena_bytes=1 << 20, prefetch=0, collate='list')
    with pytest.raises(dmcache.LimitExceededError) as e:
        next(iter(loader))
    assert e.value.code == 1008 and e.value.name == 'limit_exceeded'
    assert 'batch' in str(e.value)
    assert counters(daemon.socket)['serve_arena_used_bytes'] == 0
    # batches that fit go on
    small = dmcache.Loader('sample', batch_size=1, arena_bytes=1 << 20, prefetch=0, collate='list')
    assert [b.indices for b in small] == [[i] for i in range(19)]
    small.close()
    loader.close()


def test_numpy_without_torch_and_writable_views(daemon):
    code = textwrap.dedent('''
        import sys, json
        sys.modules['torch'] = None
        import numpy as np
        import dmcache
        loader = dmcache.Loader('sample', batch_size=3, arena_bytes=32 << 20,
                                collate='list')
        out = {}
        for b in loader:
            if isinstance(b.images, np.ndarray):
                out.setdefault('stacked', list(b.images.shape))
                out['stacked_writable'] = bool(b.images.flags.writeable)
                b.images[0, 0, 0, 0, 0] = 1
                out['stacked_written'] = int(b.images[0, 0, 0, 0, 0]) == 1
            else:
                out['list'] = [list(x.shape) for x in b.images]
                b.images[0][0, 0, 0, 0] = 1
                out['written'] = int(b.images[0][0, 0, 0, 0]) == 1
        copied = dmcache.Loader('sample', batch_size=3, arena_bytes=32 << 20, copy=True,
                                collate='list')
        out['copy_writable'] = all(x.flags.writeable for b in copied for x in
                                   ([b.images] if isinstance(b.images, np.ndarray)
                                    else b.images))
        print(json.dumps(out))
    ''')
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    # zero-copy views of the copy-on-write arena: writable, the writes are this process's
    assert out['stacked'] == [3, 1, 1, 512, 512] and out['stacked_writable']
    assert out['stacked_written'] and out['written'] and out['list']
    assert out['copy_writable']
    # a torch view over the arena: written in place, no fault
    code = textwrap.dedent('''
        import dmcache
        loader = dmcache.Loader('sample', batch_size=3, arena_bytes=32 << 20,
                                collate='list')
        for b in loader:
            if isinstance(b.images, list):
                print('writing', flush=True)
                b.images[0][0, 0, 0, 0] = 1
                print('written', flush=True)
    ''')
    r = run_python(code)
    assert r.returncode == 0 and 'written' in r.stdout, (r.returncode, r.stderr[-2000:])


HOLDER = textwrap.dedent('''
    import sys, time
    import dmcache
    class Loader(dmcache.Loader):
        _regions = sys.argv[4] == '1'
    loader = Loader(sys.argv[1], batch_size=int(sys.argv[2]), arena_bytes=int(sys.argv[3]),
                    prefetch=1, collate='list')
    it = iter(loader)
    b = next(it)
    print('holding', flush=True)
    time.sleep(600)
''')

STALLER = textwrap.dedent('''
    import sys
    import dmcache
    key, server, _ = dmcache.load_credentials()
    c = dmcache.Client()
    ds = c.open(1, 'ct', server=server, api_key=key, arena_bytes=4 << 20)
    k = 0
    print('stalling', flush=True)
    while True:  # GETs, never releases: the daemon soon makes it wait for space
        ds.get([k % ds.items, (k + 1) % ds.items])
        k += 2
''')


def _spawn(code, *args):
    return subprocess.Popen([PYTHON, '-c', code] + [str(a) for a in args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rss(pid):
    with open('/proc/%d/status' % pid) as f:
        return {k: int(v.split()[0]) for k, v in (line.split(':', 1) for line in f)
                if k in ('VmRSS', 'RssShmem')}


def test_client_killed_mid_batch(emu, tmpdir_short):
    # a sanitised daemon keeps freed memory in ASan's quarantine: keep that small, as
    # tests/integration/test_scale.py does, so that RSS says what the daemon holds
    d = start_daemon(tmpdir_short, emu=emu, asan_options='quarantine_size_mb=8')
    saved = os.environ.get('DMCACHE_SOCKET')
    try:
        os.environ['DMCACHE_SOCKET'] = d.socket
        warm = dmcache.Loader('ct', batch_size=8, arena_bytes=ARENA, collate='list')
        list(warm)  # everything cached and decoded once
        warm.close()
        time.sleep(0.2)
        base = counters(d.socket)
        for rnd in range(4):
            if rnd == 1:  # after one round: the daemon's heap has its working size
                rss0 = _rss(d.proc.pid)
            p = _spawn(HOLDER, 'ct', 16, 64 << 20, 0)  # the arena path (regions: test_regions)
            assert p.stdout.readline().strip() == 'holding', p.stderr.read()
            # one connection of 64 MiB: one batch in use, the next two made ahead
            deadline = time.monotonic() + 20
            while True:
                mid = counters(d.socket)
                if mid['serve_arena_used_bytes'] >= 3 * 16 * 512 * 512 * 2:
                    break
                assert time.monotonic() < deadline, mid
                time.sleep(0.02)
            assert mid['serve_arena_bytes'] - base['serve_arena_bytes'] == 64 << 20
            p.kill()
            p.wait()
            p.stdout.close()
            p.stderr.close()
            deadline = time.monotonic() + 10
            # the arena is unmapped on the daemon's threadpool: counted until it is
            while time.monotonic() < deadline:
                now = counters(d.socket)
                if now['connections'] == base['connections'] and \
                        now['serve_arena_bytes'] == base['serve_arena_bytes']:
                    break
                time.sleep(0.05)
            assert now['serve_arena_bytes'] == base['serve_arena_bytes']
            assert now['serve_arena_used_bytes'] == base['serve_arena_used_bytes'] == 0
        rss1 = _rss(d.proc.pid)
        # the arenas' shared memory went back; the heap stays within 16 MiB of before
        assert rss1['RssShmem'] <= rss0['RssShmem'] + 1024, (rss0, rss1)
        assert rss1['VmRSS'] <= rss0['VmRSS'] + 16 * 1024, (rss0, rss1)
        # and the daemon serves on
        assert next(iter(dmcache.Loader('ct', batch_size=2, arena_bytes=ARENA, collate='list'))).indices \
            == [0, 1]
    finally:
        if saved is None:
            os.environ.pop('DMCACHE_SOCKET', None)
        else:
            os.environ['DMCACHE_SOCKET'] = saved
        rc, _ = d.stop()
        d.notify.close()
        assert rc == 0, d.log()


def test_a_client_that_stops_reading_does_not_slow_the_others(daemon):
    def rate():
        loader = dmcache.Loader('ct', batch_size=8, arena_bytes=ARENA, metadata=False, collate='list')
        t0 = time.monotonic()
        n = sum(len(b.indices) for b in loader)
        loader.close()
        return n / (time.monotonic() - t0)

    rate()  # warm: every item cached
    alone = max(rate() for _ in range(2))
    before = counters(daemon.socket)['serve_waits_for_space_total']
    p = _spawn(STALLER)
    try:
        assert p.stdout.readline().strip() == 'stalling', p.stderr.read()
        deadline = time.monotonic() + 20
        while counters(daemon.socket)['serve_waits_for_space_total'] == before:
            assert time.monotonic() < deadline, 'the stalled client never filled its arena'
            assert p.poll() is None, p.stderr.read()
            time.sleep(0.05)
        # best of three: the machine is shared, a blocked daemon would fail all three
        stalled = max(rate() for _ in range(3))
        assert p.poll() is None  # still stuck in its GET
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
        p.stderr.close()
    # 2 shared cores and a busy machine: a generous bound that a blocked daemon would miss
    assert stalled >= alone / 3, (alone, stalled)
