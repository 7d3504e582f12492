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
    first = dmcache.Loader('ct', batch_size=len(idx), indices=idx, metadata=False)
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
        other = dmcache.Loader('ct', batch_size=len(idx), indices=idx, metadata=False)
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
