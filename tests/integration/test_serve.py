"""Decoded items through the daemon: `dmcache get`, the shared-memory arena, its seals."""
import errno
import fcntl
import json
import mmap
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import wire
from conftest import DMCACHE, Daemon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'emulator'))
import client as emulator  # noqa: E402

KEY = emulator.KEY_ALL


@pytest.fixture
def daemon_env(emu, tmpdir_short):
    emu.clear_faults()
    d = Daemon(tmpdir_short)
    d.env.update(DATAMINT_API_KEY=KEY, DATAMINT_API_URL=emu.url)
    yield d
    rc, _ = d.stop()
    assert rc == 0, d.log()


def resources(emu, project):
    return emulator.request(emu.url, path='/projects/%s/resources' % emu.project(project)['id'],
                            key=KEY).json()


def get(d, project, index, out, *args):
    r = subprocess.run([DMCACHE, '--socket', d.socket, 'get', project, str(index), '-o', out]
                       + list(args), env=d.env, capture_output=True, text=True, timeout=120)
    return r


def snapshot_order(d, project):
    """The resource ids of the snapshot in item order, as the daemon lists them."""
    r = subprocess.run([DMCACHE, '--socket', d.socket, 'prefetch', '--json', project],
                       env=d.env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def reference(path):
    """(array (F, C, H, W), lossy) from an independent decoder: pydicom, Pillow, nibabel."""
    name = path.lower()
    if name.endswith('.dcm'):
        import pydicom
        ds = pydicom.dcmread(path)
        a = ds.pixel_array
        n = int(getattr(ds, 'NumberOfFrames', 1) or 1)
        spp = int(ds.SamplesPerPixel)
        if spp == 1:
            a = a.reshape(n, 1, a.shape[-2], a.shape[-1])
        else:
            a = a.reshape(n, a.shape[-3], a.shape[-2], spp).transpose(0, 3, 1, 2)
        return a, False
    if name.endswith(('.png', '.jpg', '.jpeg')):
        from PIL import Image
        a = np.asarray(Image.open(path))
        a = a[None, None] if a.ndim == 2 else a.transpose(2, 0, 1)[None]
        return a, name.endswith(('.jpg', '.jpeg'))
    import nibabel
    img = nibabel.load(path)
    a = np.asanyarray(img.dataobj.get_unscaled())  # stored values, as without --lut
    return a.T.reshape(-1, 1, a.shape[1], a.shape[0]), False


def test_get_matches_independent_decoders(daemon_env, emu, tmp_path):
    d = daemon_env
    snapshot_order(d, 'sample')
    files = os.path.join(emu.corpus, 'projects', 'sample', 'files')
    db_order = []
    for i in range(19):
        out = str(tmp_path / ('i%d.npy' % i))
        r = get(d, 'sample', i, out)
        assert r.returncode == 0, r.stderr
        a = np.load(out)
        meta = json.load(open(out[:-4] + '.json'))
        fname = meta['resource']['filename']
        db_order.append(fname)
        ref, lossy = reference(os.path.join(files, fname))
        assert a.ndim == 4
        if fname.endswith(('.nii', '.nii.gz')):
            # raw stored values without --lut; nibabel's dataobj is the same array
            assert a.shape == ref.shape, fname
            assert np.array_equal(a.astype(np.float64), ref.astype(np.float64)), fname
            continue
        assert a.shape == ref.shape, (fname, a.shape, ref.shape)
        if lossy:
            mse = np.mean((a.astype(np.float64) - ref.astype(np.float64)) ** 2)
            psnr = 99 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
            assert psnr >= 50, (fname, psnr)
        else:
            if ref.dtype == np.int32 and a.dtype == np.uint16:
                # Pillow 9 opens 16-bit grayscale PNG as 32-bit ("I"): same values
                assert ref.min() >= 0 and ref.max() < 65536
                ref = ref.astype(np.uint16)
            assert a.dtype == ref.dtype, (fname, a.dtype, ref.dtype)
            assert np.array_equal(a, ref), fname
    assert sorted(db_order) == sorted(os.listdir(files))


def test_lut_and_dtype(daemon_env, tmp_path):
    d = daemon_env
    snapshot_order(d, 'sample')
    raw, lut = str(tmp_path / 'raw.npy'), str(tmp_path / 'lut.npy')
    assert get(d, 'sample', 0, raw).returncode == 0
    assert get(d, 'sample', 0, lut, '--lut').returncode == 0
    meta = json.load(open(raw[:-4] + '.json'))
    a, b = np.load(raw), np.load(lut)
    assert b.dtype == np.float32 and a.dtype == np.int16
    slope = float(meta['dicom'].get('00281053', {}).get('Value', [1])[0]) \
        if isinstance(meta['dicom'], dict) else 1.0
    inter = float(meta['dicom'].get('00281052', {}).get('Value', [0])[0]) \
        if isinstance(meta['dicom'], dict) else 0.0
    assert np.allclose(b, a.astype(np.float32) * slope + inter)
    f64 = str(tmp_path / 'f64.npy')
    assert get(d, 'sample', 0, f64, '--dtype', 'float64').returncode == 0
    assert np.load(f64).dtype == np.float64


def test_expensive_codecs_are_decoded_once(daemon_env, emu, tmp_path):
    d = daemon_env
    snapshot_order(d, 'ct')
    outs = []
    # the first items of the ct project, whatever their transfer syntax; some are lossless
    # JPEG, JPEG-LS or JPEG 2000 and get their decoded tensors kept
    for rnd in range(3):
        if rnd == 2:
            # a new daemon: nothing in memory, the kept tensors are on disk
            rc, _ = d.stop()
            assert rc == 0, d.log()
            d.start()
        for i in range(12):
            out = str(tmp_path / ('%d_%d.npy' % (rnd, i)))
            assert get(d, 'ct', i, out).returncode == 0
            outs.append(out)
        st = json.loads(d.cli('status', '--json').stdout)['counters']
        if rnd == 1:
            # the second round comes from the decoded items kept in memory
            assert st['serve_items_decoded_total'] == 12
            assert st['serve_hot_hits_total'] >= 12
            stored = st['serve_tensors_stored_total']
            assert stored >= 1
    # the third: the expensive ones from the store, the others decoded again
    assert st['serve_items_from_tensor_cache_total'] == stored
    assert st['serve_items_decoded_total'] == 12 - stored
    for i in range(12):
        a, b, c = np.load(outs[i]), np.load(outs[12 + i]), np.load(outs[24 + i])
        assert a.dtype == b.dtype == c.dtype and np.array_equal(a, b)
        assert np.array_equal(a, c)
        ma, mc = (json.load(open(o[:-4] + '.json')) for o in (outs[i], outs[24 + i]))
        assert ma == mc


def test_unknown_or_foreign_dataset(daemon_env, emu, tmp_path):
    d = daemon_env
    r = get(d, 'no-such-project', 0, str(tmp_path / 'x.npy'))
    assert r.returncode == 1 and 'not found' in r.stderr.lower(), r.stderr
    env = dict(d.env, DATAMINT_API_KEY=emulator.KEY_SAMPLE)
    r = subprocess.run([DMCACHE, '--socket', d.socket, 'get', 'ct', '0', '-o',
                        str(tmp_path / 'y.npy')], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and 'not found' in r.stderr.lower(), r.stderr
    snapshot_order(d, 'sample')
    r = get(d, 'sample', 19, str(tmp_path / 'z.npy'))
    assert r.returncode == 2 and 'out of range' in r.stderr


def test_item_larger_than_the_arena(daemon_env, emu):
    d = daemon_env
    snapshot_order(d, 'sample')
    sock = wire.session(d.socket)
    # float64 makes a 512x512 slice 2 MiB: larger than a 1 MiB arena
    sock.sendall(wire.open_msg('sample', server=emu.url, key=KEY, arena=1 << 20, dtype=10))
    op, fl, rid, payload, fds = wire.recv_frame_fds(sock)
    assert op == wire.OP_OPEN, wire.decode_error(payload)
    o = wire.decode_open_reply(payload)
    assert o['arena_bytes'] == 1 << 20 and len(fds) == 1
    big = None
    for i in range(o['items']):
        sock.sendall(wire.get_msg(o['handle'], [i], rid=100 + i))
        op, fl, rid, payload, _ = wire.recv_frame_fds(sock)
        item = wire.decode_get_reply(payload)[0]
        if item['status'] == wire.E['limit_exceeded']:
            big = item
            break
        assert item['status'] == 0, item
        rel = struct_release([item['offset'], item['meta_offset']])
        sock.sendall(rel)
        wire.recv_frame_fds(sock)
    assert big and 'larger than the shared memory' in big['message']
    os.close(fds[0])


def struct_release(offsets, rid=900):
    import struct
    return wire.frame(wire.OP_RELEASE, struct.pack('<I', len(offsets))
                      + b''.join(struct.pack('<Q', o) for o in offsets), rid=rid)


def test_arena_is_sealed_and_read_only(daemon_env, emu):
    """docs/reliability.md S4: the client can neither write nor resize the tensors' memory."""
    d = daemon_env
    snapshot_order(d, 'sample')
    sock = wire.session(d.socket)
    sock.sendall(wire.open_msg('sample', server=emu.url, key=KEY))
    op, fl, rid, payload, fds = wire.recv_frame_fds(sock)
    assert op == wire.OP_OPEN and len(fds) == 1
    fd = fds[0]
    o = wire.decode_open_reply(payload)
    F_GET_SEALS = 1034
    seals = fcntl.fcntl(fd, F_GET_SEALS)
    F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_FUTURE_WRITE = 1, 2, 4, 16
    assert seals & (F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE) == \
        F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE
    with pytest.raises(OSError) as e:
        os.ftruncate(fd, 4096)
    assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:
        os.pwrite(fd, b'x', 0)
    assert e.value.errno == errno.EPERM
    with pytest.raises(PermissionError):
        mmap.mmap(fd, o['arena_bytes'], mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    # reading works, and what is read is the item
    sock.sendall(wire.get_msg(o['handle'], [0]))
    op, fl, rid, payload, _ = wire.recv_frame_fds(sock)
    item = wire.decode_get_reply(payload)[0]
    assert item['status'] == 0 and item['shape'] == [1, 1, 512, 512] and item['dtype'] == 4
    m = mmap.mmap(fd, o['arena_bytes'], mmap.MAP_SHARED, mmap.PROT_READ)
    meta = json.loads(m[item['meta_offset']:item['meta_offset'] + item['meta_len']])
    assert meta['resource']['filename'].endswith('.dcm')
    # the descriptor is a memfd, not a file of the cache
    st = os.fstat(fd)
    cache_devs = {os.stat(os.path.join(dp, f)).st_ino
                  for dp, _, fs in os.walk(d.cache) for f in fs}
    assert st.st_ino not in cache_devs
    assert os.readlink('/proc/self/fd/%d' % fd).startswith('/memfd:')
    m.close()
    os.close(fd)


def test_get_waits_for_items_still_downloading(daemon_env, emu, tmp_path):
    """Training can start before the cache is warm: a GET waits for the running job."""
    d = daemon_env
    emu.add_fault(path='/resources/.*/file$', latency_ms=200)
    out = str(tmp_path / 'late.npy')
    r = get(d, 'sample', 18, out)  # no prefetch first
    assert r.returncode == 0, r.stderr
    assert np.load(out).ndim == 4
    emu.clear_faults()


OPEN_RAW = 16  # proto.h DMC_OPEN_RAW: each item's stored file, as downloaded


def test_a_get_ahead_of_the_job_is_fetched_next(daemon_env, emu, tmp_path):
    """A shuffled first epoch over a dataset still downloading: a GET of an item the job's
    walk (index order) has not reached moves it ahead, to the next free transfer. The item
    is downloaded once, the walk skips it later, and the job ends with every item."""
    import hashlib
    d = daemon_env
    n, window = 400, 32  # 2 x parallel_transfers (16)
    emu.add_synthetic('ahead', n, 512)
    emu.add_fault(path='/resources/.*/file$', latency_ms=300)  # 400 items: ~4 s
    emu.clear_log()
    wanted = [n - 1, n // 2, 7 * n // 8]
    # the wire itself, not libdmcache: the same test in every build (a Python process
    # cannot load the ThreadSanitizer build's library)
    sock = wire.session(d.socket)
    sock.sendall(wire.open_msg('ahead', flags=OPEN_RAW, server=emu.url, key=KEY,
                               arena=1 << 20))
    op, fl, rid, payload, fds = wire.recv_frame_fds(sock)
    assert op == wire.OP_OPEN, wire.decode_error(payload)
    o = wire.decode_open_reply(payload)
    m = mmap.mmap(fds[0], o['arena_bytes'], mmap.MAP_SHARED, mmap.PROT_READ)
    got = {}
    for i in wanted:
        sock.sendall(wire.get_msg(o['handle'], [i]))
        op, fl, rid, payload, _ = wire.recv_frame_fds(sock)
        assert op == wire.OP_GET, wire.decode_error(payload)
        it = wire.decode_get_reply(payload)[0]
        assert it['status'] == 0, it['message']
        got[i] = hashlib.sha256(m[it['offset']:it['offset'] + it['nbytes']]).hexdigest()
    m.close()
    os.close(fds[0])
    sock.close()
    for _ in range(600):
        st = d.cli('status', '--json')
        if json.loads(st.stdout)['counters'].get('prefetch_jobs', 0) == 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError('the job did not end: ' + st.stdout)
    emu.clear_faults()
    ids = [x['id'] for x in resources(emu, 'ahead')]
    fetched = [e['path'].split('/')[2] for e in emu.log()
               if e['method'] == 'GET' and e['path'].endswith('/file')]
    assert sorted(fetched) == sorted(ids), 'each item downloaded exactly once'
    order = {rid: k for k, rid in enumerate(fetched)}
    # each wanted item started within a few windows of its GET; in walk order they would
    # come near their index (n - 1, n / 2, 7n / 8)
    for k, i in enumerate(wanted):
        assert order[ids[i]] < (k + 2) * window + 16, (i, order[ids[i]])
        body = emu.get('/resources/%s/file' % ids[i]).body
        assert got[i] == hashlib.sha256(body).hexdigest(), i
    ls = d.cli('ls', '--json')
    snap = [x for x in json.loads(ls.stdout) if x['project_name'] == 'ahead']
    assert len(snap) == 1 and snap[0]['items_stored'] == n, snap


def test_an_item_taken_ahead_then_found_bad_is_fetched_again(daemon_env, emu, tmp_path):
    """An item a GET moved ahead of the job's walk, stored, then damaged in the store
    before the walk got there: the walk skips what was taken ahead, so the GET that finds
    it bad re-fetches it itself, and gets the server's bytes (never the damaged ones)."""
    import hashlib
    d = daemon_env
    n, last = 400, 399
    emu.add_synthetic('ahead-bad', n, 512)
    emu.add_fault(path='/resources/.*/file$', latency_ms=300)  # 400 items: ~4 s
    emu.clear_log()
    sock = wire.session(d.socket)
    sock.sendall(wire.open_msg('ahead-bad', flags=OPEN_RAW, server=emu.url, key=KEY,
                               arena=1 << 20))
    op, fl, rid, payload, fds = wire.recv_frame_fds(sock)
    assert op == wire.OP_OPEN, wire.decode_error(payload)
    o = wire.decode_open_reply(payload)
    m = mmap.mmap(fds[0], o['arena_bytes'], mmap.MAP_SHARED, mmap.PROT_READ)

    def get_last():
        sock.sendall(wire.get_msg(o['handle'], [last]))
        op, fl, rid, payload, _ = wire.recv_frame_fds(sock)
        assert op == wire.OP_GET, wire.decode_error(payload)
        it = wire.decode_get_reply(payload)[0]
        assert it['status'] == 0, it['message']
        return bytes(m[it['offset']:it['offset'] + it['nbytes']])

    first = get_last()
    digest = hashlib.sha256(first).hexdigest()
    blob = os.path.join(d.cache, 'objects', digest[:2], digest)
    with open(blob, 'r+b') as f:  # the same inode, its last byte flipped
        f.seek(-1, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([b[0] ^ 1]))
    again = get_last()
    assert again == first
    ids = [x['id'] for x in resources(emu, 'ahead-bad')]
    fetched = [e['path'].split('/')[2] for e in emu.log()
               if e['method'] == 'GET' and e['path'].endswith('/file')]
    assert fetched.count(ids[last]) == 2, 'fetched once ahead, once after the damage'
    assert fetched.index(ids[last]) < 64 and len(fetched) < n, \
        'the walk had not reached it: the re-fetch started it'
    m.close()
    os.close(fds[0])
    sock.close()
    emu.clear_faults()
    assert again == emu.get('/resources/%s/file' % ids[last]).body


def test_local_folder_get(daemon_env, tmp_path, emu):
    d = daemon_env
    root = tmp_path / 'ds'
    (root / 'images').mkdir(parents=True)
    src = os.path.join(emu.corpus, 'projects', 'sample', 'files', 'xray_gray16.png')
    (root / 'images' / 'a.png').write_bytes(open(src, 'rb').read())
    (root / 'dataset.json').write_text(json.dumps(
        {'resources': [{'id': 'a', 'file': 'images/a.png'}]}))
    out = str(tmp_path / 'a.npy')
    r = subprocess.run([DMCACHE, '--socket', d.socket, 'get', '--source', str(root), '0',
                        '-o', out], env=d.env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    ref, _ = reference(src)
    a = np.load(out)
    assert a.dtype == np.uint16 and np.array_equal(a, ref)


def test_item_whose_download_fails_fails_at_once(daemon_env, emu, tmp_path):
    d = daemon_env
    import json as _json
    q = '/resources?status=&project=%s&order_field=created_at&order_by_asc=true&offset=0&limit=100' \
        % __import__('urllib.parse').parse.quote(_json.dumps(
            {'items': ['sample'], 'filterType': 'intersection'}))
    listed = emulator.request(emu.url, path=q, key=KEY).json()['data'][0]['resources']
    victim = listed[4]['id']
    emu.add_fault(path='^/resources/%s/file$' % victim, status=404)
    # one other item is slow, so the job still runs when item 4 fails, before or after the
    # GET asks for it
    emu.add_fault(path='^/resources/%s/file$' % listed[18]['id'], latency_ms=10000)
    r = get(d, 'sample', 4, str(tmp_path / 'v.npy'))
    assert r.returncode == 1
    assert 'download of this item failed' in r.stderr and 'not_found_or_denied' in r.stderr, \
        (r.stderr, d.log()[-3000:])
    emu.clear_faults()


def _open(sock, emu, arena, dtype=10):
    sock.sendall(wire.open_msg('ct', server=emu.url, key=KEY, arena=arena, dtype=dtype))
    op, fl, rid, payload, fds = wire.recv_frame_fds(sock)
    assert op == wire.OP_OPEN, wire.decode_error(payload)
    return wire.decode_open_reply(payload), fds


def test_a_batch_larger_than_the_arena_fails_instead_of_waiting_forever(daemon_env, emu):
    d = daemon_env
    snapshot_order(d, 'ct')
    sock = wire.session(d.socket)
    o, fds = _open(sock, emu, 4 << 20)  # float64 slices: 2 MiB each, two do not fit
    sock.sendall(wire.get_msg(o['handle'], [0, 1, 2]))
    op, fl, rid, payload, _ = wire.recv_frame_fds(sock)
    items = wire.decode_get_reply(payload)
    # the items decode in parallel: whichever is placed first is served, the others cannot
    # be until the client releases something, which it cannot before this reply
    ok = [it for it in items if it['status'] == 0]
    assert len(ok) == 1 and ok[0]['nbytes'] == 512 * 512 * 8
    for it in items:
        if it['status']:
            assert it['status'] == wire.E['limit_exceeded']
            assert 'does not fit in the shared memory' in it['message']
    os.close(fds[0])


def test_a_full_arena_waits_for_release(daemon_env, emu):
    """Backpressure: items wait for the client's RELEASE, then come."""
    d = daemon_env
    snapshot_order(d, 'ct')
    sock = wire.session(d.socket)
    o, fds = _open(sock, emu, 8 << 20)
    sock.sendall(wire.get_msg(o['handle'], [0], rid=10))
    first = wire.decode_get_reply(wire.recv_frame_fds(sock)[3])[0]
    assert first['status'] == 0
    sock.sendall(wire.get_msg(o['handle'], [1, 2, 3], rid=11))
    sock.settimeout(1.0)
    with pytest.raises(OSError):  # socket.timeout: the fourth slice has no room yet
        wire.recv_frame_fds(sock)
    sock.settimeout(10)
    sock.sendall(struct_release([first['offset'], first['meta_offset']], rid=12))
    got = {}
    for _ in range(2):
        op, fl, rid, payload, _ = wire.recv_frame_fds(sock)
        got[rid] = payload
    items = wire.decode_get_reply(got[11])
    assert [i['status'] for i in items] == [0, 0, 0]
    st = json.loads(d.cli('status', '--json').stdout)['counters']
    assert st['serve_waits_for_space_total'] >= 1
    os.close(fds[0])


def test_frame_by_frame_open_waits_for_the_job_and_needs_every_item(daemon_env, emu):
    """OPEN frame by frame counts every item's frames once the dataset is stored; an item
    that could not be downloaded makes it fail with a reason, not hang or undercount."""
    d = daemon_env
    listed = resources(emu, 'sample')
    victim = listed[3]['id']
    emu.add_fault(path='^/resources/%s/file$' % victim, status=404)
    emu.add_fault(path='/resources/.*/file$', latency_ms=500)  # the job still runs
    sock = wire.session(d.socket)
    sock.sendall(wire.open_msg('sample', flags=2, server=emu.url, key=KEY))
    op, fl, rid, payload, fds = wire.recv_frame_fds(sock)
    assert op == wire.OP_ERROR
    err = wire.decode_error(payload)
    assert err['code'] == wire.E['not_found_or_denied'], err
    assert 'frame-by-frame' in err['message'] and 'prefetch' in err['message']
    emu.clear_faults()
    # all stored: the count is the sum of the frames, and flat indices map onto them
    assert d.cli('prefetch', 'sample').returncode == 0
    sock.sendall(wire.open_msg('sample', flags=2, server=emu.url, key=KEY, rid=7))
    op, fl, rid, payload, fds = wire.recv_frame_fds(sock)
    assert op == wire.OP_OPEN, wire.decode_error(payload)
    o = wire.decode_open_reply(payload)
    sock.sendall(wire.open_msg('sample', server=emu.url, key=KEY, rid=8))
    op, fl, rid, payload, _ = wire.recv_frame_fds(sock)
    whole = wire.decode_open_reply(payload)
    sock.sendall(wire.get_msg(whole['handle'], list(range(whole['items'])), rid=9))
    op, fl, rid, payload, _ = wire.recv_frame_fds(sock)
    items = wire.decode_get_reply(payload)
    assert o['items'] == sum(it['shape'][0] for it in items) > whole['items']
    sock.sendall(wire.get_msg(o['handle'], [o['items'] - 1, o['items']], rid=10))
    op, fl, rid, payload, _ = wire.recv_frame_fds(sock)
    last, beyond = wire.decode_get_reply(payload)
    assert last['status'] == 0 and last['shape'][0] == 1
    assert last['shape'][1:] == items[-1]['shape'][1:]
    assert beyond['status'] == wire.E['invalid_argument']
    os.close(fds[0])
    sock.close()


def test_two_opens_at_once_share_one_arena(daemon_env, emu):
    """The arena is made off the loop; OPENs that arrive meanwhile wait for it, and only the
    first reply carries its descriptor."""
    d = daemon_env
    assert d.cli('prefetch', 'sample').returncode == 0
    sock = wire.session(d.socket)
    sock.sendall(wire.open_msg('sample', server=emu.url, key=KEY, rid=11)
                 + wire.open_msg('sample', server=emu.url, key=KEY, rid=12))
    got = {}
    for _ in range(2):
        op, fl, rid, payload, fds = wire.recv_frame_fds(sock)
        assert op == wire.OP_OPEN, wire.decode_error(payload)
        got[rid] = (wire.decode_open_reply(payload), fds)
    (a, fa), (b, fb) = got[11], got[12]
    assert len(fa) + len(fb) == 1 and a['handle'] != b['handle']
    assert a['arena_bytes'] == b['arena_bytes'] == os.fstat((fa + fb)[0]).st_size
    os.close((fa + fb)[0])
    sock.close()
