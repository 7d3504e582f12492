"""Hot tensors handed over in place (proto.h "Regions", DMC_OPEN_REGIONS), over the wire.

A region holds the tensors of one snapshot only and is passed (read-only) only to the
connections that OPENed that snapshot: alice's region of 'sample' never reaches bob, who
may read 'ct' only, and no byte of alice's tensors is in any descriptor bob received.
Items held by a client are pinned: a hot set churning under a small hot_max never moves or
overwrites them, and the pages of what was released and evicted go back to the kernel;
a lowered hot_max (SIGHUP) shrinks the regions at once around what is held. Handles of
stored files get no region.
"""
import errno
import fcntl
import mmap
import os
import sys
import time

import numpy as np
import pytest

import uids
import wire
from conftest import Daemon
from test_ops_config import reload
from test_trust_shm import connect_as, counters, json_filename, pread_all, release, start_daemon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'emulator'))
import client as emulator  # noqa: E402

MiB = 1 << 20
F_GET_SEALS = 1034
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW = 1, 2, 4
NP_DTYPES = {1: np.uint8, 2: np.int8, 3: np.uint16, 4: np.int16, 5: np.uint32, 6: np.int32,
             9: np.float32, 10: np.float64}


def open_r(sock, project, key, url, regions=True, rid=5):
    """(OPEN reply or error, descriptors that came with it)."""
    sock.sendall(wire.open_msg(project, server=url, key=key,
                               flags=wire.OPEN_REGIONS if regions else 0, rid=rid))
    op, fl, r, payload, fds = wire.recv_frame_fds(sock)
    assert r == rid
    if op == wire.OP_ERROR:
        return wire.decode_error(payload), fds
    assert op == wire.OP_OPEN, op
    return wire.decode_open_reply(payload, regions), fds


def get_r(sock, handle, idx, regions=True, rid=6):
    sock.sendall(wire.get_msg(handle, idx, rid=rid))
    op, fl, r, payload, fds = wire.recv_frame_fds(sock)
    assert r == rid and not fds and op == wire.OP_GET, (op, payload)
    items = wire.decode_get_reply(payload, regions)
    assert all(it['status'] == 0 for it in items), [it for it in items if it['status']]
    return items


def tensor(it, arena_fd, region_fd):
    return pread_all(region_fd if it['in_region'] else arena_fd, it['offset'], it['nbytes'])


def data_of(fd):
    """Every byte of the file that is not a hole (SEEK_DATA / SEEK_HOLE)."""
    size, off, out = os.fstat(fd).st_size, 0, []
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append(pread_all(fd, start, end - start))
        off = end
    return b''.join(out)


def distinctive(b, n=256):
    """Up to three n-byte chunks of b with many distinct byte values (not background)."""
    out = []
    for k in range(1, 8):
        c = b[len(b) * k // 8:len(b) * k // 8 + n]
        if len(c) == n and len(set(c)) >= 48:
            out.append(c)
    return out[:3]


def refused(fn, *codes):
    with pytest.raises(OSError) as e:
        fn()
    assert e.value.errno in codes, e.value
    return True


def test_a_region_holds_only_the_snapshot_opened_and_is_read_only(emu, tmpdir_short):
    uids.require_root()
    d = start_daemon(tmpdir_short, emu, 'hot_max=64M')
    try:
        alice = connect_as(uids.ALICE, d.socket)
        oa, afds = open_r(alice, 'sample', emulator.KEY_SAMPLE, emu.url)
        assert 'handle' in oa, oa
        assert len(afds) == 2 and oa['region_id'] and oa['region_bytes'] == 64 * MiB, oa
        a_arena, a_region = afds
        n = oa['items']
        get_r(alice, oa['handle'], list(range(n)))
        again = get_r(alice, oa['handle'], list(range(n)), rid=7)
        assert all(it['in_region'] for it in again), again  # every item is hot
        mine = [tensor(it, a_arena, a_region) for it in again]

        # the same values as the arena path (a connection without regions)
        alice2 = connect_as(uids.ALICE, d.socket)
        o2, fds2 = open_r(alice2, 'sample', emulator.KEY_SAMPLE, emu.url, regions=False)
        assert len(fds2) == 1 and 'region_id' not in o2
        copies = get_r(alice2, o2['handle'], list(range(n)), regions=False)
        assert [pread_all(fds2[0], it['offset'], it['nbytes']) for it in copies] == mine
        # a second OPEN of the snapshot on the connection: the same region, not passed again
        o3, fds3 = open_r(alice, 'sample', emulator.KEY_SAMPLE, emu.url, rid=8)
        assert o3['region_id'] == oa['region_id'] and fds3 == []

        # bob: refused 'sample' (nothing passed), served 'ct' in a region of its own
        bob = connect_as(uids.BOB, d.socket)
        denied, bfds0 = open_r(bob, 'sample', emulator.KEY_CT, emu.url, rid=9)
        assert denied.get('code') == 1003 and bfds0 == [], denied
        ob, bfds = open_r(bob, 'ct', emulator.KEY_CT, emu.url, rid=10)
        assert len(bfds) == 2 and ob['region_id'] not in (0, oa['region_id']), ob
        bitems = get_r(bob, ob['handle'], list(range(min(ob['items'], 24))), rid=11)
        get_r(bob, ob['handle'], list(range(min(ob['items'], 24))), rid=12)
        assert any(it['in_region'] for it in get_r(bob, ob['handle'], [0], rid=13))
        # bob's tensors are the ct items he asked for: the arena path's bytes
        bob2 = connect_as(uids.BOB, d.socket)
        ob2, bfds2 = open_r(bob2, 'ct', emulator.KEY_CT, emu.url, regions=False, rid=14)
        plain = get_r(bob2, ob2['handle'], [it['index'] for it in bitems], regions=False,
                      rid=15)
        theirs = [tensor(it, *bfds) for it in bitems]
        assert theirs == [pread_all(bfds2[0], it['offset'], it['nbytes']) for it in plain]
        theirs = b'\0'.join(theirs)  # content of his own snapshot is his to see
        inodes = {os.fstat(fd).st_ino for fd in bfds}
        assert os.fstat(a_region).st_ino not in inodes
        assert os.fstat(a_arena).st_ino not in inodes
        seen = b''.join(data_of(fd) for fd in bfds)
        assert len(seen) > 0
        checked = 0
        for t in mine:
            for c in distinctive(t):
                if c in theirs:
                    continue  # the CT phantoms of 'sample' and 'ct' share slices
                assert c not in seen
                checked += 1
        assert checked >= 10, checked

        # the region's descriptor is read-only, its size sealed
        size = os.fstat(a_region).st_size
        assert fcntl.fcntl(a_region, F_GET_SEALS) & 7 == F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW
        assert refused(lambda: os.write(a_region, b'x'), errno.EBADF)
        assert refused(lambda: os.pwrite(a_region, b'x', again[0]['offset']), errno.EBADF)
        assert refused(lambda: mmap.mmap(a_region, size, mmap.MAP_SHARED,
                                         mmap.PROT_READ | mmap.PROT_WRITE), errno.EACCES)
        assert refused(lambda: os.ftruncate(a_region, 0), errno.EINVAL, errno.EBADF,
                       errno.EPERM)
        assert refused(lambda: os.ftruncate(a_region, size * 2), errno.EINVAL, errno.EBADF,
                       errno.EPERM)
        # and alice cannot reopen it for writing through /proc (the file is the daemon's,
        # mode 0400); reading it again is all she gets
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setgroups([])
                os.setresgid(uids.ALICE, uids.ALICE, uids.ALICE)
                os.setresuid(uids.ALICE, uids.ALICE, uids.ALICE)
                try:
                    os.open('/proc/self/fd/%d' % a_region, os.O_RDWR)
                except PermissionError:
                    code = 0
            finally:
                os._exit(code)
        _, st = os.waitpid(pid, 0)
        assert st == 0, 'alice reopened her region for writing'
        # nothing changed: the bytes read again are the decoded ones
        assert [tensor(it, a_arena, a_region) for it in again] == mine
        for fd in afds + fds2 + bfds + bfds2:
            os.close(fd)
        for s in (alice, alice2, bob, bob2):
            s.close()
    finally:
        rc, _ = d.stop()
        assert rc == 0, d.log()


def test_held_items_are_pinned_and_released_pages_go_back(emu, tmpdir_short):
    hot_max = 5 * MiB  # 'sample' (19 items, eight of them 512x512 int16 slices) churns it
    d = start_daemon(tmpdir_short, emu, 'hot_max=%d' % hot_max, 'region_linger=2s')
    try:
        sock = wire.session(d.socket, timeout=120)
        o, fds = open_r(sock, 'sample', emulator.KEY_ALL, emu.url)
        assert len(fds) == 2 and o['region_id'], o
        arena_fd, rfd = fds
        n = o['items']
        rid = [100]

        def get(idx):
            rid[0] += 1
            return get_r(sock, o['handle'], idx, rid=rid[0])

        def give_back(items):
            rid[0] += 1
            release(sock, [x for it in items for x in
                           ((it['meta_offset'],) if it['in_region']
                            else (it['offset'], it['meta_offset']))], rid=rid[0])

        give_back(get(list(range(n))))  # decoded once
        # the largest item handed in place: held from here on
        every = get(list(range(n)))
        held = max((it for it in every if it['in_region']), key=lambda it: it['nbytes'])
        give_back([it for it in every if it is not held])
        ref = pread_all(rfd, held['offset'], held['nbytes'])
        assert len(set(ref)) > 16
        before = counters(d)
        others = [i for i in range(n) if i != held['index']]
        for _ in range(4):
            for k in range(0, len(others), 4):
                items = get(others[k:k + 4])
                give_back(items)
        c = counters(d)
        assert c['serve_region_evictions_total'] > before['serve_region_evictions_total'], c
        assert c['serve_region_tensors_pinned'] == 1, c
        # the held tensor was neither moved nor overwritten
        assert pread_all(rfd, held['offset'], held['nbytes']) == ref
        # what the regions' files hold is bounded by hot_max, and is exactly the tensors
        # kept: the pages of evicted ones were given back
        blocks = os.fstat(rfd).st_blocks * 512
        assert blocks <= hot_max, blocks
        assert blocks == c['serve_region_bytes'] == c['serve_region_committed_bytes'], c

        # released: no longer pinned, evicted like the others, its pages punched out
        give_back([held])
        for _ in range(2):
            for k in range(0, len(others), 4):
                give_back(get(others[k:k + 4]))
        c2 = counters(d)
        assert c2['serve_region_tensors_pinned'] == 0, c2
        assert c2['serve_region_reclaimed_bytes_total'] > c['serve_region_reclaimed_bytes_total']
        assert os.fstat(rfd).st_blocks * 512 == c2['serve_region_bytes']

        # the handle closed: the region lingers (region_linger) with its tensors, and the
        # snapshot's next OPEN, on another connection, gets it back and copies nothing
        rid[0] += 1
        sock.sendall(wire.frame(wire.OP_CLOSE, o['handle'].to_bytes(8, 'little'), rid=rid[0]))
        op, fl, r, payload, _ = wire.recv_frame_fds(sock)
        assert op == wire.OP_CLOSE, payload
        c3 = counters(d)
        assert c3['serve_regions'] == 1 and c3['serve_region_bytes'] == c2['serve_region_bytes']
        assert os.fstat(rfd).st_blocks * 512 == c2['serve_region_bytes']
        s2 = wire.session(d.socket, timeout=120)
        o2, fds2 = open_r(s2, 'sample', emulator.KEY_ALL, emu.url)
        assert o2['region_id'] == o['region_id'] and len(fds2) == 2, o2
        hot = get_r(s2, o2['handle'], list(range(n)), rid=7)
        kept = [it for it in hot if it['in_region']]
        assert kept
        for it in kept:  # the same bytes as through the first connection's descriptor
            assert tensor(it, fds2[0], fds2[1]) == pread_all(rfd, it['offset'], it['nbytes'])
        c4 = counters(d)
        assert c4['serve_region_copies_total'] - c3['serve_region_copies_total'] < len(kept), c4
        release(s2, [x for it in hot for x in ((it['meta_offset'],) if it['in_region']
                                               else (it['offset'], it['meta_offset']))],
                rid=8)
        for fd in fds2:
            os.close(fd)
        s2.close()
        # past region_linger (checked every 5 s): the region goes, and the descriptors still
        # held keep no page
        deadline = time.monotonic() + 30
        while counters(d)['serve_regions'] and time.monotonic() < deadline:
            time.sleep(0.2)
        c5 = counters(d)
        assert c5['serve_regions'] == 0 and c5['serve_region_bytes'] == 0, c5
        assert os.fstat(rfd).st_blocks == 0
        os.close(arena_fd)
        os.close(rfd)
        sock.close()
    finally:
        rc, _ = d.stop()
        assert rc == 0, d.log()


def test_values_equal_an_independent_decode(emu, tmpdir_short):
    d = start_daemon(tmpdir_short, emu)
    try:
        sock = wire.session(d.socket, timeout=120)
        o, (arena_fd, rfd) = open_r(sock, 'sample', emulator.KEY_ALL, emu.url)
        get_r(sock, o['handle'], list(range(o['items'])))
        items = get_r(sock, o['handle'], list(range(o['items'])), rid=7)
        files = os.path.join(emu.corpus, 'projects', 'sample', 'files')
        import pydicom
        checked = 0
        for it in items:
            assert it['in_region']
            meta = pread_all(arena_fd, it['meta_offset'], it['meta_len'])
            name = json_filename(meta)
            if not name.endswith('.dcm'):
                continue
            px = pydicom.dcmread(os.path.join(files, name)).pixel_array
            a = np.frombuffer(pread_all(rfd, it['offset'], it['nbytes']),
                              dtype=NP_DTYPES[it['dtype']])
            assert a.size == px.size, name
            assert np.array_equal(a, px.reshape(-1)), name
            checked += 1
        assert checked >= 8
        os.close(arena_fd)
        os.close(rfd)
        sock.close()
    finally:
        rc, _ = d.stop()
        assert rc == 0, d.log()


def test_a_lowered_hot_max_evicts_what_is_not_held(emu, tmpdir_short):
    """SIGHUP with a lower hot_max: the regions shrink to it at once, except what clients
    hold, whose bytes stay as they were."""
    conf = os.path.join(tmpdir_short, 'dmcached.conf')
    with open(conf, 'w') as f:
        f.write('hot_max = 64M\n')
    d = Daemon(tmpdir_short, args=['--config', conf], env=dict(DATAMINT_API_URL=emu.url))
    try:
        sock = wire.session(d.socket, timeout=120)
        o, (arena_fd, rfd) = open_r(sock, 'sample', emulator.KEY_ALL, emu.url)
        n = o['items']
        first = get_r(sock, o['handle'], list(range(n)))
        release(sock, [x for it in first for x in
                       ((it['meta_offset'],) if it['in_region'] else (it['offset'],
                                                                      it['meta_offset']))])
        items = get_r(sock, o['handle'], list(range(n)), rid=7)
        assert all(it['in_region'] for it in items)
        held = sorted(items, key=lambda it: it['nbytes'])[:2]  # two small ones stay held
        ref = [pread_all(rfd, it['offset'], it['nbytes']) for it in held]
        release(sock, [it['meta_offset'] for it in items if it not in held])
        before = counters(d)
        assert before['serve_region_tensors'] == n, before
        _, start = reload(d, 'hot_max = 1M\n', conf)
        after = counters(d)
        kept = sum(-(-it['nbytes'] // 4096) * 4096 for it in held)
        assert after['serve_region_tensors_pinned'] == 2
        assert after['serve_region_bytes'] <= max(MiB, kept), after
        assert after['serve_region_evictions_total'] > before['serve_region_evictions_total']
        assert os.fstat(rfd).st_blocks * 512 == after['serve_region_bytes']
        assert [pread_all(rfd, it['offset'], it['nbytes']) for it in held] == ref
        release(sock, [it['meta_offset'] for it in held], rid=901)
        assert counters(d)['serve_region_tensors_pinned'] == 0
        os.close(arena_fd)
        os.close(rfd)
        sock.close()
    finally:
        rc, _ = d.stop()
        assert rc == 0, d.log()


def test_raw_files_never_come_from_a_region(emu, tmpdir_short):
    """A handle of stored files (DMC_OPEN_RAW) gets no region, and its GET replies still
    say so per item; a plain handle on the same connection then gets one."""
    d = start_daemon(tmpdir_short, emu)
    try:
        sock = wire.session(d.socket, timeout=120)
        sock.sendall(wire.open_msg('sample', server=emu.url, key=emulator.KEY_ALL,
                                   flags=wire.OPEN_REGIONS | 16, rid=5))
        op, fl, r, payload, fds = wire.recv_frame_fds(sock)
        assert op == wire.OP_OPEN, payload
        o = wire.decode_open_reply(payload, True)
        assert o['region_id'] == 0 and o['region_bytes'] == 0 and len(fds) == 1
        for _ in range(2):
            items = get_r(sock, o['handle'], [0, 1])
            assert [it['in_region'] for it in items] == [0, 0]
        o2, fds2 = open_r(sock, 'sample', emulator.KEY_ALL, emu.url, rid=7)
        assert o2['region_id'] and len(fds2) == 1  # the region alone: the arena was passed
        for fd in fds + fds2:
            os.close(fd)
        sock.close()
    finally:
        rc, _ = d.stop()
        assert rc == 0, d.log()
