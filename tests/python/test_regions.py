"""Hot items handed in place through libdmcache and the package (DMC_OPEN_REGIONS): the same
bytes as the arena path and as an independent decoder, read-only where they lie, and the
batches the package hands out stay the caller's own, writable memory: writing into one
never changes what the same item reads next, in this client or another."""
import os
import socket
import struct
import sys
import threading

import json
import subprocess
import tempfile

import numpy as np
import torch

import dmcache
from dmcache import _lib
from conftest import KEY, TESTS, counters, start_daemon

sys.path.insert(0, os.path.join(TESTS, 'integration'))
import uids  # noqa: E402
from uids import ALICE, BOB  # noqa: E402


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


def write_png(path, value):
    from PIL import Image
    px = value if isinstance(value, np.ndarray) else np.full((16, 24), value, dtype=np.uint8)
    Image.fromarray(px).save(path)


def png_folder(root, pixels):
    """A local dataset folder of one PNG per array of `pixels` (images/<i>.png)."""
    os.makedirs(os.path.join(root, 'images'))
    for i, px in enumerate(pixels):
        write_png(os.path.join(root, 'images', '%d.png' % i), px)
    with open(os.path.join(root, 'dataset.json'), 'w') as f:
        f.write('{"resources": [%s]}' % ', '.join(
            '{"id": "r%d", "file": "images/%d.png"}' % (i, i) for i in range(len(pixels))))


def test_a_local_file_changed_between_opens_is_not_served_from_the_region(daemon, tmpdir_short):
    """A local folder's items are proved again at every OPEN (its files read through the
    caller's new descriptors): a region lingering from the OPEN before must not hand the
    tensor of a file that changed since, nor of one the caller can no longer open."""
    root = os.path.join(tmpdir_short, 'pngs')
    png_folder(root, [np.full((16, 24), 10 + i, dtype=np.uint8) for i in range(3)])
    c = _lib.Client(daemon.socket)
    try:
        for expect in (10, 10):  # the second GET of item 0 is hot: in place
            h = c.open(_lib.SOURCE_LOCAL, root, regions=True)
            items = h.get([0, 1])
            assert all(it.status == 0 for it in items)
            assert set(np.unique(item_array(items[0]))) == {expect}
            h.release(items)
            h.close()
        assert c.open(_lib.SOURCE_LOCAL, root, regions=True).get([0])[0].region == 1
        write_png(os.path.join(root, 'images', '0.png'), 99)
        h = c.open(_lib.SOURCE_LOCAL, root, regions=True)  # within the region's linger
        items = h.get([0, 1])
        assert all(it.status == 0 for it in items)
        assert set(np.unique(item_array(items[0]))) == {99}
        assert set(np.unique(item_array(items[1]))) == {11}
        h.release(items)
        h.close()
    finally:
        c.close()


BOB_OPENS_AGAIN = r'''
import json, sys
from dmcache import _lib
root = sys.argv[1]
c = _lib.Client()

def opened():
    h = c.open(_lib.SOURCE_LOCAL, root, regions=True)
    items = h.get([0, 1])
    out = [{'status': it.status, 'region': it.region,
            'data': bytes(_lib.item_bytes(it)).hex() if it.status == 0 else ''}
           for it in items]
    h.release(items)
    h.close()
    return out

print(json.dumps([opened(), opened()]), flush=True)
sys.stdin.readline()  # alice takes her file back
print(json.dumps(opened()), flush=True)
'''


def test_a_file_alice_takes_back_never_reaches_bob_from_his_region():
    """The attack: bob reads alice's world-readable folder with hot items in place, alice
    makes one file hers alone (0600), and bob opens the folder again while his region
    lingers with that file's tensor in it. His OPEN proves every file again through his
    own descriptors: the file he can no longer open fails, and not one byte of its pixels
    reaches him, in place or copied."""
    uids.require_root()
    rng = np.random.default_rng(7)
    secret = rng.integers(0, 256, size=(32, 40), dtype=np.uint8)
    public = rng.integers(0, 256, size=(32, 40), dtype=np.uint8)
    with tempfile.TemporaryDirectory(prefix='dmc-') as tmp:
        os.chmod(tmp, 0o755)
        d = start_daemon(tmp)
        try:
            uids.open_up(os.path.dirname(d.socket))
            home = uids.owned_dir(os.path.join(tmp, 'alice'), ALICE)
            os.chmod(home, 0o755)
            root = os.path.join(home, 'ds')
            png_folder(root, [secret, public])
            for r, dirs, names in os.walk(root):
                os.chown(r, ALICE, ALICE)
                os.chmod(r, 0o755)
                for n in names:
                    os.chown(os.path.join(r, n), ALICE, ALICE)
                    os.chmod(os.path.join(r, n), 0o644)
            env = {'PATH': os.environ.get('PATH', '/usr/bin:/bin'), 'HOME': '/nonexistent',
                   'PYTHONPATH': os.path.join(os.environ['DMC_BUILD_ROOT'], 'client',
                                              'python'),
                   'LANG': 'C.UTF-8', 'DMCACHE_SOCKET': d.socket}
            if os.environ.get('LD_PRELOAD'):
                env['LD_PRELOAD'] = os.environ['LD_PRELOAD']
                env['ASAN_OPTIONS'] = 'detect_leaks=0'
            bob = uids.popen(BOB, ['/usr/bin/python3', '-c', BOB_OPENS_AGAIN, root], env=env,
                             cwd='/', stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            try:
                before = json.loads(bob.stdout.readline() or 'null')
                assert before, bob.stderr.read()
                # while the folder was readable, bob read it, the second time in place
                assert [it['status'] for it in before[0] + before[1]] == [0] * 4
                assert bytes.fromhex(before[1][0]['data']) == secret.tobytes()
                assert before[1][0]['region'] == 1
                os.chmod(os.path.join(root, 'images', '0.png'), 0o600)
                out, err = bob.communicate('go\n', timeout=120)
            finally:
                if bob.poll() is None:
                    bob.kill()
            assert bob.returncode == 0, err
            after = json.loads(out.strip().splitlines()[-1])
            assert after[0]['status'] != 0 and after[0]['data'] == ''
            assert after[1]['status'] == 0
            assert bytes.fromhex(after[1]['data']) == public.tobytes()
            for chunk in (secret.tobytes()[k:k + 64] for k in range(0, secret.size, 64)):
                assert chunk not in out.encode() and chunk.hex() not in out
        finally:
            d.stop()
            d.notify.close()
