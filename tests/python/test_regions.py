"""Hot items handed in place through libdmcache and the package (DMC_OPEN_REGIONS): the same
bytes as the arena path and as an independent decoder, read-only where they lie, and the
batches the package hands out stay the caller's own, writable memory: writing into one
never changes what the same item reads next, in this client or another."""
import os
import socket
import struct
import sys
import threading

import numpy as np
import torch

import dmcache
from dmcache import _lib
from conftest import KEY, counters


def open_ct(client, regions):
    return client.open(_lib.SOURCE_DATAMINT, 'ct', server=os.environ['DATAMINT_API_URL'],
                       api_key=KEY, regions=regions)


def item_array(it):
    return np.frombuffer(_lib.item_bytes(it), dtype=_lib.DTYPES[it.dtype]).reshape(
        tuple(it.shape))



class RegionLoader(dmcache.Loader):
    """Hot items in place on every path (the default hands them in place on GET only)."""
    _regions = True

def test_in_place_items_equal_the_arena_path_and_pydicom(daemon, emu, ct_reference):
    a, b = _lib.Client(daemon.socket), _lib.Client(daemon.socket)
    try:
        ra, pb = open_ct(a, True), open_ct(b, False)
        idx = list(range(12))
        ra.release(ra.get(idx))  # decoded once: hot from here on
        inplace, copies = ra.get(idx), pb.get(idx)
        assert all(it.status == 0 for it in list(inplace) + list(copies))
        assert all(it.region == 1 for it in inplace)
        assert all(it.region == 0 for it in copies)
        for x, y in zip(inplace, copies):
            assert bytes(_lib.item_bytes(x)) == bytes(_lib.item_bytes(y))
            assert _lib.item_meta(x) == _lib.item_meta(y)
            # pydicom's pixels of the file (conftest.ct_reference)
            assert np.array_equal(item_array(x).astype(np.int32), ct_reference[x.index])
        assert counters(daemon.socket)['serve_region_tensors_pinned'] >= len(idx)
        ra.release(inplace)
        pb.release(copies)
        assert counters(daemon.socket)['serve_region_tensors_pinned'] == 0
        ra.close()
        pb.close()
    finally:
        a.close()
        b.close()


def test_batches_of_in_place_items_are_writable_and_private(daemon, emu):
    idx = [3, 1, 4, 1, 5]
    first = RegionLoader('ct', batch_size=len(idx), indices=idx, metadata=False)
    try:
        before = counters(daemon.socket)['serve_region_items_total']
        (x,) = [b.images for b in first]  # decoded; a second epoch reads them hot
        (y,) = [b.images for b in first]
        assert counters(daemon.socket)['serve_region_items_total'] > before
        assert torch.equal(x, y)
        ref = y.clone()
        y.add_(7)          # in place, on a batch whose items were handed in place
        y[0].zero_()
        (z,) = [b.images for b in first]  # the same items again, same client
        assert torch.equal(z, ref)
        other = RegionLoader('ct', batch_size=len(idx), indices=idx, metadata=False)
        try:
            (w,) = [b.images for b in other]  # another client
            assert torch.equal(w, ref)
        finally:
            other.close()
        # the Dataset's reads are copies too
        ds = dmcache.Dataset(project_name='ct')
        try:
            arr, _ = ds.read(3)
            arr += 1
            again, _ = ds.read(3)
            assert np.array_equal(again, ref[0].numpy())
        finally:
            ds.close()
    finally:
        first.close()


def test_a_daemon_older_than_regions_is_opened_without_them(tmpdir_short):
    """A daemon that refuses the flag (undefined OPEN bits are a protocol error there) gets
    the OPEN again without it: the client works, every item in the arena."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'integration'))
    import wire
    path = os.path.join(tmpdir_short, 'old.sock')
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    seen = []

    def old_daemon():
        s, _ = srv.accept()
        with s:
            op, fl, rid, payload = wire.recv_frame(s)
            assert op == wire.OP_HELLO
            s.sendall(wire.frame(wire.OP_HELLO, struct.pack('<III', 1, os.getuid(), 1 << 20)
                                 + wire.s('dmcached 0.0.9'), flags=1, rid=rid))
            while len(seen) < 2:
                op, fl, rid, payload = wire.recv_frame(s)
                assert op == wire.OP_OPEN
                flags = struct.unpack_from('<III', payload)[1]
                seen.append(flags)
                if flags & ~63:
                    s.sendall(wire.frame(wire.OP_ERROR, struct.pack('<IIIi', 1001, 0, 0, 0)
                                         + wire.s('') + wire.s('malformed OPEN'), flags=1,
                                         rid=rid))
                    continue
                arena = os.memfd_create('arena')
                os.ftruncate(arena, 1 << 20)
                reply = wire.frame(wire.OP_OPEN, struct.pack('<QQQ', 1, 2, 3) + wire.s('p')
                                   + wire.s('n') + wire.s('v') + struct.pack('<Q', 1 << 20),
                                   flags=1, rid=rid, nfds=1)
                socket.send_fds(s, [reply], [arena])
                os.close(arena)
            s.recv(1 << 16)  # until the client goes

    t = threading.Thread(target=old_daemon, daemon=True)
    t.start()
    c = _lib.Client(path)
    try:
        ds = c.open(_lib.SOURCE_DATAMINT, 'p', server='http://x', api_key='k', regions=True)
        assert seen == [_lib.OPEN_REGIONS, 0]
        assert ds.items == 3 and ds.arena_bytes == 1 << 20
    finally:
        c.close()
        t.join(10)
        srv.close()


def stream_epoch(ds, epoch, hold=False):
    """[(indices, [bytes], [region flags], batch data is None, in_region)] of one STREAM
    epoch of batches of 8, shuffled; every batch released as read (or all held until the
    end, with `hold`: then also the daemon's pinned count while they are held)."""
    st = ds.stream(8, seed=3, epoch=epoch, shuffle=True, ahead=8 if hold else 0)
    out, held, pinned = [], [], None
    try:
        while True:
            b = st.next()
            if b is None:
                break
            items = [b.items[i] for i in range(b.n)]
            assert all(it.status == 0 for it in items)
            out.append(([int(it.index) for it in items],
                        [item_array(it).copy() for it in items],
                        [int(it.region) for it in items], b.data is None, int(b.in_region)))
            if hold:
                held.append(b)
            else:
                st.release(b)
        if hold:
            pinned = counters(ds.client.socket_path)['serve_region_tensors_pinned']
            for b in held:
                st.release(b)
    finally:
        st.close()
    return out, pinned


def test_stream_batches_of_hot_items_come_in_place(daemon, emu, ct_reference):
    """STREAM on a handle with regions: every hot item handed in place (item.region 1, the
    batch's data NULL), the bytes those of a connection without regions and pydicom's,
    pinned while the batches are held and not after."""
    a, b = _lib.Client(daemon.socket), _lib.Client(daemon.socket)
    try:
        ra, pb = open_ct(a, True), open_ct(b, False)
        c0 = counters(daemon.socket)
        inplace, pinned = stream_epoch(ra, 1, hold=True)
        copies, _ = stream_epoch(pb, 1)
        c1 = counters(daemon.socket)
        assert c1['serve_stream_region_items_total'] - c0['serve_stream_region_items_total'] \
            == 72
        assert pinned >= 8  # the batches held (the daemon sent ahead=8 beyond the first)
        assert c1['serve_region_tensors_pinned'] == 0
        assert [x[0] for x in inplace] == [x[0] for x in copies]
        for (idx, data, flags, no_data, n_region), (_, plain, pflags, pno, pn) in \
                zip(inplace, copies):
            assert flags == [1] * len(idx) and no_data and n_region == len(idx)
            assert pflags == [0] * len(idx) and not pno and pn == 0
            for i, x, y in zip(idx, data, plain):
                assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), i
                assert np.array_equal(x.astype(np.int32), ct_reference[i]), i  # pydicom's
        ra.close()
        pb.close()
    finally:
        a.close()
        b.close()


def test_loader_batches_handed_in_place_are_writable(daemon, emu, ct_reference):
    """The Loader's STREAM path: batches whose items came in place are gathered into memory
    of their own (one copy): equal to pydicom's values, and writing into one changes
    nothing the next epoch reads."""
    loader = RegionLoader('ct', batch_size=8, shuffle=True, seed=1, dtype='int32',
                            metadata=False)
    try:
        list(loader)  # decoded and hot
        for epoch in range(2):
            before = counters(daemon.socket)['serve_stream_region_items_total']
            n = 0
            for b in loader:
                assert isinstance(b.images, torch.Tensor) and b.images.dtype == torch.int32
                assert torch.equal(b.images, torch.from_numpy(
                    np.stack([ct_reference[i] for i in b.indices])))
                b.images.add_(7)  # in place, as a transform would
                b.images[0].zero_()
                n += len(b.indices)
            assert n == 72
            assert counters(daemon.socket)['serve_stream_region_items_total'] - before == 72
        assert counters(daemon.socket)['serve_region_tensors_pinned'] == 0
    finally:
        loader.close()
