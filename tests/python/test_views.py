"""Arrays of Dataset.read() kept as private views of the daemon's region (dmcache._views):
the bytes an independent decoder (PIL) reads, the caller's own to write, and still right
while the daemon evicts around them, after the Dataset's close() and in a forked child
after the parent let them go."""
import gc
import os
import tempfile
import time

import numpy as np
import pytest

import dmcache
from dmcache import _views
from conftest import counters, start_daemon

N = 24
H, W = 256, 320  # 80 KiB of uint8: above _views.VIEW_MIN_BYTES


def pixels(i):
    return np.random.default_rng(100 + i).integers(0, 256, (H, W), dtype=np.uint8)


@pytest.fixture(scope='module')
def setup():
    from PIL import Image
    with tempfile.TemporaryDirectory(prefix='dmc-') as d:
        root = os.path.join(d, 'views')
        os.makedirs(os.path.join(root, 'images'))
        for i in range(N):
            Image.fromarray(pixels(i)).save(os.path.join(root, 'images', '%d.png' % i))
        with open(os.path.join(root, 'dataset.json'), 'w') as f:
            f.write('{"resources": [%s]}' % ', '.join(
                '{"id": "r%d", "file": "images/%d.png"}' % (i, i) for i in range(N)))
        # the regions hold about 12 such items: reading the others evicts unpinned ones
        dm = start_daemon(os.path.join(d, 'daemon'), args=['-o', 'hot_max=1M'])
        try:
            ref = [np.asarray(Image.open(os.path.join(root, 'images', '%d.png' % i)))
                   for i in range(N)]
            yield dm, root, ref
        finally:
            rc, _ = dm.stop()
            dm.notify.close()
            assert rc == 0, dm.log()


def dataset(dm, root):
    return dmcache.Dataset(root=os.path.dirname(root), dataset_name=os.path.basename(root),
                           socket=dm.socket)


def image(ds, i):
    a, _ = ds.read(i)
    assert a.shape == (1, 1, H, W)
    return a[0, 0]


def hot(ds, i):
    """Item i read twice: the second read is handed in place, so a view."""
    image(ds, i)
    before = len(ds._views.live)
    a = image(ds, i)
    assert len(ds._views.live) == before + 1, 'not a view'
    return a


def no_pins(dm):
    """The daemon's pins all went (a closed connection's are dropped as the daemon reads
    its end: waited for)."""
    for _ in range(100):
        if counters(dm.socket)['serve_region_tensors_pinned'] == 0:
            return True
        time.sleep(0.05)
    return False


def churn(dm, root, ref):
    """Every item read (and let go) twice on another connection: unpinned region entries
    are evicted (hot_max)."""
    before = counters(dm.socket)['serve_region_evictions_total']
    other = dataset(dm, root)
    for i in range(N):
        for _ in range(2):  # decoded, then hot: copied into the region
            assert np.array_equal(image(other, i), ref[i])
    other.close()
    assert counters(dm.socket)['serve_region_evictions_total'] > before


def test_a_view_is_the_callers_own_and_stays_right_while_pinned(setup):
    dm, root, ref = setup
    ds = dataset(dm, root)
    try:
        a = hot(ds, 0)
        assert np.array_equal(a, ref[0])
        assert a.flags.writeable
        a[:] = 7  # the caller's own pages
        b = hot(ds, 0)
        assert np.array_equal(b, ref[0]), 'a write reached another view of the item'
        assert counters(dm.socket)['serve_region_tensors_pinned'] >= 1  # entries pinned
        for i in range(1, N):  # views made and let go here: their RELEASEs are sent
            for _ in range(2):
                assert np.array_equal(image(ds, i), ref[i])
        churn(dm, root, ref)
        assert (a == 7).all()
        assert np.array_equal(b, ref[0]), 'a pinned view changed under eviction'
        del a, b
        gc.collect()
        assert not ds._views.live
        ds.close()  # the views' items went back with the RELEASEs close() sends
        assert no_pins(dm)
    finally:
        ds.close()


def test_a_view_outlives_close(setup):
    dm, root, ref = setup
    ds = dataset(dm, root)
    a = hot(ds, 3)
    a[0, 0] ^= 0xff
    ds.close()  # a copy now: the pins went with the connection
    assert no_pins(dm)
    churn(dm, root, ref)
    want = ref[3].copy()
    want[0, 0] ^= 0xff
    assert np.array_equal(a, want)
    assert np.array_equal(image(ds, 3), ref[3])  # reopened
    ds.close()


def test_a_view_in_a_forked_child_outlives_the_parents_release(setup):
    dm, root, ref = setup
    ds = dataset(dm, root)
    try:
        a = hot(ds, 5)
        r, w = os.pipe()
        r2, w2 = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: waits until the parent let item 5 go, then reads it
            code = 1
            try:
                os.close(w)
                os.close(r2)
                ds.close()  # its copy of the parent's connection (which held the pins)
                os.write(w2, b'.')
                os.read(r, 1)
                code = 0 if np.array_equal(a, ref[5]) else 3
            finally:
                os._exit(code)
        os.close(r)
        os.close(w2)
        os.read(r2, 1)
        views = ds._views
        del a
        gc.collect()
        ds.close()
        churn(dm, root, ref)
        os.write(w, b'.')
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, 'the child read other bytes'
        assert not [v for v in views.live if v.state == _views.PINNED]
    finally:
        ds.close()


def test_views_are_bounded_and_then_copied(setup, monkeypatch):
    dm, root, ref = setup
    monkeypatch.setattr(_views, 'VIEWS_MAX', 3)
    ds = dataset(dm, root)
    try:
        kept = [hot(ds, i) for i in range(3)]
        more = []
        for i in range(3, 8):
            image(ds, i)
            more.append(image(ds, i))  # hot, but copied: three views live already
        assert len(ds._views.live) == 3
        for i, x in enumerate(kept + more):
            assert np.array_equal(x, ref[i])
    finally:
        ds.close()
