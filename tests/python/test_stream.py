"""STREAM against the real daemon, through libdmcache: the daemon's order, contiguous
batches equal to the items GET returns, how far ahead it works, STOP, limits, and the hot
set that clients share."""
import ctypes
import errno
import time

import numpy as np
import pytest

import dmcache
from dmcache import _lib
from conftest import ARENA, counters


def open_ds(project='sample', arena=ARENA, timeout_ms=0):
    key, server, _ = dmcache.load_credentials()
    c = _lib.Client(timeout_ms=timeout_ms)
    return c, c.open(_lib.SOURCE_DATAMINT, project, server=server, api_key=key,
                     arena_bytes=arena)


def region(address, nbytes):
    return bytes((ctypes.c_char * nbytes).from_address(address)) if nbytes else b''


@pytest.mark.parametrize('project,n,shuffle', [('sample', 19, True), ('ct', 72, False)])
def test_batches_are_contiguous_and_equal_what_get_returns(daemon, project, n, shuffle):
    c, ds = open_ds(project)
    g, gds = open_ds(project)
    st = ds.stream(4, seed=9, epoch=1, shuffle=shuffle)
    assert st.batches == (n + 3) // 4
    seen, uniform = [], 0
    while True:
        b = st.next()
        if b is None:
            break
        items = [b.items[i] for i in range(b.n)]
        idx = [int(it.index) for it in items]
        assert idx == [st.item(b.number * 4 + k) for k in range(b.n)]
        ref = gds.get(idx)
        for it, r in zip(items, ref):
            assert it.status == 0 and r.status == 0
            assert tuple(it.shape) == tuple(r.shape) and it.dtype == r.dtype
            assert region(it.data, it.nbytes) == region(r.data, r.nbytes)
            assert _lib.item_meta(it) == _lib.item_meta(r)
            assert b.data <= it.data and it.data + it.nbytes <= b.data + b.data_len
        if b.uniform:
            # one tensor: the items back to back, nothing between them
            uniform += 1
            whole = region(b.data, b.data_len)
            assert whole == b''.join(region(r.data, r.nbytes) for r in ref)
            a = np.frombuffer(whole, dtype=_lib.DTYPES[items[0].dtype])
            assert a.size * a.itemsize == b.n * items[0].nbytes
        gds.release(ref)
        seen += idx
        st.release(b)
    st.close()
    assert sorted(seen) == list(range(n)) and (seen != list(range(n))) == shuffle
    assert uniform >= 1 or project == 'sample'  # sample mixes shapes in every batch
    assert counters(daemon.socket)['serve_arena_used_bytes'] == 0
    for x in (ds, gds):
        x.close()
    c.close()
    g.close()


def epoch_order(ds, **kw):
    st = ds.stream(**kw)
    out = []
    while True:
        b = st.next()
        if b is None:
            break
        out.append([int(b.items[i].index) for i in range(b.n)])
        st.release(b)
    st.close()
    return out


def test_orders_are_seeded_and_ranks_cover_each_item_once(daemon):
    c, ds = open_ds('sample')
    a = epoch_order(ds, batch_size=3, seed=5, epoch=0, shuffle=True)
    assert a == epoch_order(ds, batch_size=3, seed=5, epoch=0, shuffle=True)
    assert a != epoch_order(ds, batch_size=3, seed=5, epoch=1, shuffle=True)
    assert a != epoch_order(ds, batch_size=3, seed=6, epoch=0, shuffle=True)
    assert [i for b in a for i in b] == dmcache.rank_indices(19, 0, 5, True, 0, 1)
    assert epoch_order(ds, batch_size=4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11],
                                             [12, 13, 14, 15], [16, 17, 18]]
    assert epoch_order(ds, batch_size=4, drop_last=True)[-1] == [12, 13, 14, 15]
    # four ranks: 5 items each (19 -> 20 with one padding item), every item read
    ranks = [[i for b in epoch_order(ds, batch_size=2, seed=3, epoch=2, shuffle=True,
                                     rank=r, world_size=4) for i in b] for r in range(4)]
    assert [len(r) for r in ranks] == [5, 5, 5, 5]
    everything = sorted(i for r in ranks for i in r)
    first = dmcache.rank_indices(19, 2, 3, True, 0, 1)[0]
    assert everything == sorted(list(range(19)) + [first])
    for r in range(4):
        assert ranks[r] == dmcache.rank_indices(19, 2, 3, True, r, 4)
    # drop_last: disjoint shards of 4
    shards = [[i for b in epoch_order(ds, batch_size=4, seed=3, shuffle=True, rank=r,
                                      world_size=4, drop_last=True) for i in b]
              for r in range(4)]
    flat = [i for s in shards for i in s]
    assert len(flat) == 16 and len(set(flat)) == 16
    ds.close()
    c.close()


def test_the_daemon_works_ahead_only_as_far_as_asked(daemon):
    c, ds = open_ds('ct')
    sent0 = counters(daemon.socket)['serve_batches_total']
    st = ds.stream(2, ahead=1)
    assert st.batches >= 4
    b0 = st.next()
    assert [int(b0.items[i].index) for i in range(b0.n)] == [0, 1]
    b1 = st.next()  # b0's items are gone now, its regions stay until released
    # batch 0 in use, batch 1 ahead: a third is not made before one comes back
    time.sleep(0.5)
    now = counters(daemon.socket)
    assert now['serve_batches_total'] - sent0 == 2
    assert b0.data_len + b1.data_len <= now['serve_arena_used_bytes']
    assert now['serve_arena_used_bytes'] <= b0.data_len + b1.data_len + 2 * (64 << 10)
    st.release(b0)  # a batch given back lets the next one come
    b2 = st.next()
    assert [int(b2.items[i].index) for i in range(b2.n)] == [4, 5]
    st.release(b1)
    st.release(b2)
    st.close()
    ds.close()
    c.close()


def test_stop_mid_epoch_and_the_connection_goes_on(daemon):
    c, ds = open_ds('ct')
    st = ds.stream(2)
    b = st.next()
    st.release(b)
    st.close()  # STOP: the batches sent meanwhile are given back
    assert counters(daemon.socket)['serve_arena_used_bytes'] == 0
    assert epoch_order(ds, batch_size=8)[0] == list(range(8))
    # a closed dataset stops its stream too
    st = ds.stream(1)
    assert st.next() is not None
    ds.close()
    c.close()
    assert counters(daemon.socket)['serve_arena_used_bytes'] == 0


def test_a_batch_larger_than_the_arena_ends_the_stream(daemon):
    c, ds = open_ds('sample', arena=1 << 20)
    st = ds.stream(4)  # four 512 KiB CT slices
    with pytest.raises(dmcache.LimitExceededError) as e:
        st.next()
    assert e.value.code == 1008 and 'batch' in str(e.value)
    assert st.next() is None
    st.close()
    assert [len(b) for b in epoch_order(ds, batch_size=1)] == [1] * 19
    ds.close()
    c.close()


def test_bad_stream_requests_are_refused(daemon):
    c, ds = open_ds('sample')
    for kw in ({'rank': 4, 'world_size': 4}, {'world_size': 0}, {'ahead': 9},
               {'batch_size': 4097}, {'batch_size': 0}):
        kw.setdefault('batch_size', 2)
        with pytest.raises(dmcache.DmcacheError) as e:
            ds.stream(**kw)
        assert e.value.code == errno.EINVAL
    ds.close()
    c.close()


def test_clients_share_decoded_items_in_memory(daemon):
    c1, d1 = open_ds('ct')
    c2, d2 = open_ds('ct')
    epoch_order(d1, batch_size=8)
    before = counters(daemon.socket)
    order = epoch_order(d2, batch_size=8)
    after = counters(daemon.socket)
    n = sum(len(b) for b in order)
    # the second client's items come from the hot set: no decode, no store read
    assert after['serve_items_decoded_total'] == before['serve_items_decoded_total']
    assert after['serve_hot_hits_total'] - before['serve_hot_hits_total'] >= n
    assert after['serve_hot_items'] >= n
    for d, c in ((d1, c1), (d2, c2)):
        d.close()
        c.close()
