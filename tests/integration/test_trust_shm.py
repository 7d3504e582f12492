"""Shared memory is shared fairly between local users (docs/security.md, fair shares).

The attack: bob (uid 61002) opens three connections with 2 GiB arenas and fills them, to
pin memory and slow everybody down. The daemon counts the bytes committed in each uid's
arenas (shm_max_per_uid, shm_max): bob's requests past his share fail with limit_exceeded
naming the key, he pins no more than it, and alice (uid 61001) is served at once. Arenas
grow on demand: an OPEN commits almost nothing, and items placed across growths are the
right bytes. A closed connection's arena is pooled for its own uid's next connection only:
bob never gets alice's, and alice's pooled arena gives way when bob needs the memory.
"""
import os
import socket
import struct
import sys
import time

import numpy as np

import uids
import wire
from conftest import Daemon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'emulator'))
import client as emulator  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
CAP = 512 * MiB
DTYPE_F64 = 10  # 512x512 slices become 2 MiB items


def start_daemon(directory, emu, *opts):
    args = []
    for o in opts:
        args += ['-o', o]
    d = Daemon(directory, args=args, env=dict(DATAMINT_API_URL=emu.url))
    d.env.pop('DATAMINT_API_KEY', None)
    uids.open_up(directory, os.path.dirname(d.socket))
    return d


def connect_as(uid, path):
    """A connection to the daemon made by a process of `uid` (the daemon takes the uid from
    SO_PEERCRED at connect), handed to this test to speak the protocol, with HELLO said."""
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            a.close()
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            socket.send_fds(b, [b'c'], [s.fileno()])
            code = 0
        finally:
            os._exit(code)
    b.close()
    _, fds, _, _ = socket.recv_fds(a, 1, 1)
    a.close()
    _, st = os.waitpid(pid, 0)
    assert st == 0 and len(fds) == 1
    sock = socket.socket(fileno=fds[0])
    sock.settimeout(120)
    sock.sendall(wire.hello())
    op, fl, rid, payload = wire.recv_frame(sock)
    assert op == wire.OP_HELLO, payload
    return sock


def do_open(sock, project, key, url, arena=0, dtype=0, rid=5):
    """(open reply, arena fd) or (error, None)."""
    sock.sendall(wire.open_msg(project, server=url, key=key, arena=arena, dtype=dtype, rid=rid))
    op, fl, r, payload, fds = wire.recv_frame_fds(sock)
    assert r == rid
    if op == wire.OP_ERROR:
        return wire.decode_error(payload), None
    assert op == wire.OP_OPEN and len(fds) <= 1
    return wire.decode_open_reply(payload), (fds[0] if fds else None)


def do_get(sock, handle, indices, rid=6):
    sock.sendall(wire.get_msg(handle, indices, rid=rid))
    op, fl, r, payload, fds = wire.recv_frame_fds(sock)
    assert r == rid and not fds
    if op == wire.OP_ERROR:
        return wire.decode_error(payload)
    assert op == wire.OP_GET, op
    return wire.decode_get_reply(payload)


def release(sock, offsets, rid=900):
    sock.sendall(wire.frame(wire.OP_RELEASE, struct.pack('<I', len(offsets)) +
                            b''.join(struct.pack('<Q', o) for o in offsets), rid=rid))
    op, fl, r, payload, _ = wire.recv_frame_fds(sock)
    assert op == wire.OP_RELEASE and r == rid


def pread_all(fd, off, n):
    """Reads the memfd with pread: reading holes this way allocates nothing (a read fault
    through a mapping would)."""
    out = bytearray()
    while len(out) < n:
        chunk = os.pread(fd, min(n - len(out), 16 * MiB), off + len(out))
        assert chunk
        out += chunk
    return bytes(out)


def counters(d):
    sock = wire.session(d.socket)
    try:
        return wire.get_status(sock)['counters']
    finally:
        sock.close()


def unpooled(c):
    """Committed bytes beyond those of pooled arenas (closed connections' arenas kept for
    their uid's next connection)."""
    return c['serve_shm_committed_bytes'] - c['serve_arena_pool_bytes']


def wait_uncommitted(d):
    """Until closed connections' arenas are unmapped (on the threadpool) or pooled."""
    deadline = time.monotonic() + 10
    while unpooled(counters(d)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert unpooled(counters(d)) == 0


def rss_shmem_kib(pid):
    """The daemon's resident shared memory: its arenas' pages it has faulted in."""
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('RssShmem:'):
                return int(line.split()[1])
    raise AssertionError('no RssShmem')


def warm(d, emu, project, key, n, dtype=0):
    """The project's first n items in the cache (downloaded and decoded once), as root."""
    sock = wire.session(d.socket, timeout=120)
    o, fd = do_open(sock, project, key, emu.url, dtype=dtype)
    assert fd is not None, o
    items = do_get(sock, o['handle'], list(range(min(n, o['items']))))
    assert all(it['status'] == 0 for it in items), items
    os.close(fd)
    sock.close()
    return o


def test_bob_cannot_pin_more_than_his_share_and_alice_is_served_at_once(emu, tmpdir_short):
    uids.require_root()
    d = start_daemon(tmpdir_short, emu, 'shm_max_per_uid=512M', 'shm_max=1G')
    try:
        # both projects in the cache and decoded first (bob's as float64, as he will ask):
        # what is measured is memory, not downloads or decoders busy
        warm(d, emu, 'sample', emulator.KEY_ALL, 19, dtype=DTYPE_F64)
        warm(d, emu, 'ct', emulator.KEY_ALL, 4)
        base_kib = rss_shmem_kib(d.proc.pid)

        # alice's item, for the look for it in bob's memory later
        alice = connect_as(uids.ALICE, d.socket)
        o, afd = do_open(alice, 'ct', emulator.KEY_CT, emu.url)
        assert afd is not None, o
        it = do_get(alice, o['handle'], [0])[0]
        assert it['status'] == 0, it
        alice_tensor = pread_all(afd, it['offset'], it['nbytes'])
        alice_meta = pread_all(afd, it['meta_offset'], it['meta_len'])
        alice_name = json_filename(alice_meta)
        os.close(afd)
        alice.close()

        # bob: three connections, each asking for a 2 GiB arena (clamped to his share)
        bob, fds, handles = [], [], []
        for k in range(3):
            s = connect_as(uids.BOB, d.socket)
            o, fd = do_open(s, 'sample', emulator.KEY_SAMPLE, emu.url, arena=2 * GiB,
                            dtype=DTYPE_F64)
            assert fd is not None, o
            assert o['arena_bytes'] == CAP, o
            bob.append(s)
            fds.append(fd)
            handles.append(o['handle'])
        # he fills them: 2 MiB items, 300 per connection (600 MiB each), never released;
        # alice comes while the daemon is at it. She shares the loop and the cores with
        # his fill (half a gigabyte faulted in and copied), so the bound here is loose: she
        # is not served after his fill (19 s before arenas grew on demand) but beside it
        alice = connect_as(uids.ALICE, d.socket)
        for k, (s, h) in enumerate(zip(bob, handles)):
            s.sendall(wire.get_msg(h, [i % 19 for i in range(300)], rid=60 + k))
        alice_once(d, emu, alice_tensor, alice, bound=5.0)
        placed, refused = 0, []
        for k, s in enumerate(bob):
            op, fl, r, payload, _ = wire.recv_frame_fds(s)
            assert (op, r) == (wire.OP_GET, 60 + k), payload
            for it in wire.decode_get_reply(payload):
                if it['status'] == 0:
                    placed += it['nbytes']
                else:
                    assert it['status'] == wire.E['limit_exceeded'], it
                    refused.append(it['message'])
        assert refused, 'bob was never refused'
        assert any('shm_max_per_uid (512.0 MiB) reached for uid 61002' in m
                   for m in refused), refused[:3]
        assert placed <= CAP
        # what the daemon has committed for bob: at most his share
        c = counters(d)
        assert c['serve_shm_committed_bytes'] <= CAP, c
        assert c['serve_shm_refusals_total'] >= 1
        grown_kib = rss_shmem_kib(d.proc.pid) - base_kib
        assert grown_kib <= CAP // 1024 + 4096, grown_kib
        print('bob placed %.0f MiB, daemon committed %.0f MiB, RssShmem +%.0f MiB'
              % (placed / MiB, c['serve_shm_committed_bytes'] / MiB, grown_kib / 1024))

        # a fourth connection of bob's: its OPEN is refused, naming the key
        s4 = connect_as(uids.BOB, d.socket)
        e, fd4 = do_open(s4, 'sample', emulator.KEY_SAMPLE, emu.url, arena=2 * GiB)
        assert fd4 is None and e['code'] == wire.E['limit_exceeded'], e
        assert 'shm_max_per_uid' in e['message'] and '61002' in e['message'], e

        # bob asks for alice's project with his key: nothing
        e, fd5 = do_open(s4, 'ct', emulator.KEY_SAMPLE, emu.url)
        assert fd5 is None and e['code'] == wire.E['not_found_or_denied'], e
        assert alice_name not in e['message']
        s4.close()

        # alice, with bob at his share (holding it): served at once
        alice_once(d, emu, alice_tensor, bound=1.0)

        # not one byte of alice's item in bob's memory
        needle = distinctive(alice_tensor)
        for fd in fds:
            grown = os.fstat(fd).st_blocks * 512
            assert grown <= CAP + 64 * MiB
            hay = pread_all(fd, 0, CAP)
            assert needle not in hay
            assert alice_name.encode() not in hay
            os.close(fd)
        for s in bob:
            s.close()
    finally:
        rc, _ = d.stop()
        assert rc == 0, d.log()


def alice_once(d, emu, tensor, alice=None, bound=1.0):
    """Alice's OPEN and first item within `bound` seconds (from the OPEN sent to the item
    received); her bytes."""
    alice = alice or connect_as(uids.ALICE, d.socket)
    t0 = time.monotonic()
    o, afd = do_open(alice, 'ct', emulator.KEY_CT, emu.url)
    assert afd is not None, o
    t1 = time.monotonic()
    it = do_get(alice, o['handle'], [0])[0]
    elapsed = time.monotonic() - t0
    print('alice: OPEN and first item in %.0f ms (OPEN %.0f ms)'
          % (elapsed * 1000, (t1 - t0) * 1000))
    assert it['status'] == 0, it
    assert elapsed < bound, elapsed
    assert pread_all(afd, it['offset'], it['nbytes']) == tensor
    os.close(afd)
    alice.close()


def json_filename(meta):
    import json
    return json.loads(meta)['resource']['filename']


def distinctive(tensor):
    """64 bytes of the tensor that are not all one value."""
    for off in range(len(tensor) // 2, len(tensor) - 64, 64):
        part = tensor[off:off + 64]
        if len(set(part)) > 8:
            return part
    raise AssertionError('a flat tensor')


def test_open_commits_little_and_items_across_growths_are_right(emu, tmpdir_short):
    d = start_daemon(tmpdir_short, emu)
    try:
        warm(d, emu, 'sample', emulator.KEY_ALL, 19)
        wait_uncommitted(d)
        before = rss_shmem_kib(d.proc.pid)
        sock = wire.session(d.socket, timeout=120)
        t0 = time.monotonic()
        o, fd = do_open(sock, 'sample', emulator.KEY_ALL, emu.url, arena=2 * GiB)
        opened = time.monotonic() - t0
        assert fd is not None, o
        assert o['arena_bytes'] == 2 * GiB
        time.sleep(0.5)  # the first chunk faulted in meanwhile, if it is to be
        after_open = rss_shmem_kib(d.proc.pid)
        committed = counters(d)['serve_shm_committed_bytes']
        print('OPEN of a 2 GiB arena: %.1f ms; RssShmem +%d KiB; committed %d MiB'
              % (opened * 1000, after_open - before, committed // MiB))
        assert after_open - before < 64 * 1024
        assert committed < 64 * MiB
        assert os.fstat(fd).st_blocks * 512 < 64 * MiB

        # the first copies of the 19 items, then 12 more rounds in one GET: 120 MiB
        # through several growths of the arena
        first = do_get(sock, o['handle'], list(range(19)))
        assert all(it['status'] == 0 for it in first), first
        ref = [pread_all(fd, it['offset'], it['nbytes']) for it in first]
        rounds = do_get(sock, o['handle'], [i % 19 for i in range(19 * 12)], rid=7)
        assert all(it['status'] == 0 for it in rounds), [it for it in rounds if it['status']]
        top = max(it['offset'] + it['nbytes'] for it in rounds)
        assert top > 64 * MiB, top  # past the first growths
        for k, it in enumerate(rounds):
            assert pread_all(fd, it['offset'], it['nbytes']) == ref[k % 19], k
        # the DICOM items are pydicom's pixels
        checked = 0
        files = os.path.join(emu.corpus, 'projects', 'sample', 'files')
        for k, it in enumerate(rounds[-19:]):
            name = json_filename(pread_all(fd, it['meta_offset'], it['meta_len']))
            if not name.endswith('.dcm'):
                continue
            import pydicom
            px = pydicom.dcmread(os.path.join(files, name)).pixel_array
            a = np.frombuffer(pread_all(fd, it['offset'], it['nbytes']), dtype=px.dtype)
            if a.size == px.size:
                assert np.array_equal(a, px.reshape(-1)), name
                checked += 1
        assert checked >= 1
        c = counters(d)
        grown = os.fstat(fd).st_blocks * 512
        print('after %d items: arena committed %d MiB of 2048, RssShmem +%d MiB'
              % (19 * 13, c['serve_shm_committed_bytes'] // MiB,
                 (rss_shmem_kib(d.proc.pid) - before) // 1024))
        assert grown <= c['serve_shm_committed_bytes'] + MiB
        assert c['serve_shm_committed_bytes'] < 512 * MiB

        # released space is reused: the same items again commit nothing more
        release(sock, [x for it in first + rounds for x in (it['offset'], it['meta_offset'])])
        again = do_get(sock, o['handle'], [i % 19 for i in range(19 * 12)], rid=8)
        assert all(it['status'] == 0 for it in again)
        assert counters(d)['serve_shm_committed_bytes'] == c['serve_shm_committed_bytes']

        # the connection goes: its arena's memory with it
        os.close(fd)
        sock.close()
        wait_uncommitted(d)
        assert rss_shmem_kib(d.proc.pid) - before < 16 * 1024
    finally:
        rc, _ = d.stop()
        assert rc == 0, d.log()


def test_one_uids_connections_share_its_decode_places(emu, tmpdir_short):
    """decode_max_per_uid bounds the items of one uid in flight over all its connections;
    they all get served, none stalls waiting for a place another connection freed."""
    uids.require_root()
    d = start_daemon(tmpdir_short, emu, 'decode_max_per_uid=2', 'hot_max=0')
    try:
        warm(d, emu, 'sample', emulator.KEY_ALL, 19)
        conns = []
        for k in range(4):
            s = connect_as(uids.BOB, d.socket)
            o, fd = do_open(s, 'sample', emulator.KEY_SAMPLE, emu.url, dtype=DTYPE_F64)
            assert fd is not None, o
            conns.append((s, o['handle'], fd))
        for k, (s, h, fd) in enumerate(conns):
            s.sendall(wire.get_msg(h, list(range(19)), rid=70 + k))
        for k, (s, h, fd) in enumerate(conns):
            op, fl, r, payload, _ = wire.recv_frame_fds(s)
            assert (op, r) == (wire.OP_GET, 70 + k), payload
            items = wire.decode_get_reply(payload)
            assert [it['status'] for it in items] == [0] * 19, items
            os.close(fd)
            s.close()
    finally:
        rc, _ = d.stop()
        assert rc == 0, d.log()


def test_a_closed_connections_arena_goes_to_its_own_uid_only(emu, tmpdir_short):
    # shm_max 40 MiB: alice's pooled arena (about 9 MiB) must give way to bob's items
    d = start_daemon(tmpdir_short, emu, 'shm_max=40M', 'shm_max_per_uid=64M')
    try:
        warm(d, emu, 'sample', emulator.KEY_SAMPLE, 19, dtype=DTYPE_F64)
        wait_uncommitted(d)
        base = counters(d)

        # alice reads items: her arena holds them; she goes, her arena is pooled
        a = connect_as(uids.ALICE, d.socket)
        o, afd = do_open(a, 'sample', emulator.KEY_SAMPLE, emu.url, dtype=DTYPE_F64)
        assert afd is not None, o
        items = do_get(a, o['handle'], [0, 1, 2])
        assert all(it['status'] == 0 for it in items), items
        secret = [pread_all(afd, it['offset'], it['nbytes']) for it in items]
        assert all(len(set(x)) > 16 for x in secret)  # real pixels, not zeros
        alice_ino = os.fstat(afd).st_ino
        os.close(afd)
        a.close()
        deadline = time.monotonic() + 10
        while counters(d)['serve_arena_pool'] == base['serve_arena_pool'] and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        c = counters(d)
        assert c['serve_arena_pool'] == base['serve_arena_pool'] + 1, c
        pooled = c['serve_arena_pool_bytes'] - base['serve_arena_pool_bytes']
        assert pooled > 0

        # bob: a fresh arena, never alice's; not one of her bytes in it
        b = connect_as(uids.BOB, d.socket)
        o, bfd = do_open(b, 'sample', emulator.KEY_SAMPLE, emu.url, dtype=DTYPE_F64)
        assert bfd is not None, o
        assert os.fstat(bfd).st_ino != alice_ino
        assert counters(d)['serve_arena_pool_hits_total'] == c['serve_arena_pool_hits_total']
        time.sleep(0.3)  # its first chunk faulted in
        seen = pread_all(bfd, 0, min(os.fstat(bfd).st_size, 64 * MiB))
        # items sit at page offsets: compare page by page (zero pages say nothing)
        pages = {seen[off:off + 4096] for off in range(0, len(seen), 4096)}
        mine = {x[off:off + 4096] for x in secret for off in range(0, len(x), 4096)}
        mine.discard(bytes(4096))
        assert mine and not (mine & pages), "alice's bytes in bob's arena"

        # bob's items need more than shm_max leaves beside alice's pooled arena: it goes
        got = do_get(b, o['handle'], list(range(16)))
        assert all(it['status'] == 0 for it in got), [it for it in got if it['status']]
        c2 = counters(d)
        assert c2['serve_arena_pool'] == 0, c2
        assert c2['serve_shm_committed_bytes'] <= 40 * MiB, c2
        assert os.fstat(bfd).st_ino != alice_ino
        os.close(bfd)
        b.close()

        # alice again: her next connection takes her pooled arena when there is one
        a = connect_as(uids.ALICE, d.socket)
        o, afd = do_open(a, 'sample', emulator.KEY_SAMPLE, emu.url, dtype=DTYPE_F64)
        items2 = do_get(a, o['handle'], [0, 1, 2])
        assert [pread_all(afd, it['offset'], it['nbytes']) for it in items2] == secret
        os.close(afd)
        a.close()
        wait_uncommitted(d)
        a = connect_as(uids.ALICE, d.socket)
        hits = counters(d)['serve_arena_pool_hits_total']
        o, afd = do_open(a, 'sample', emulator.KEY_SAMPLE, emu.url, dtype=DTYPE_F64)
        assert afd is not None, o
        ino = os.fstat(afd).st_ino
        assert counters(d)['serve_arena_pool_hits_total'] == hits + 1
        items3 = do_get(a, o['handle'], [0, 1, 2])
        assert [pread_all(afd, it['offset'], it['nbytes']) for it in items3] == secret
        os.close(afd)
        a.close()
        # and bob, after her, still gets a fresh one
        wait_uncommitted(d)
        b = connect_as(uids.BOB, d.socket)
        o, bfd = do_open(b, 'sample', emulator.KEY_SAMPLE, emu.url, dtype=DTYPE_F64)
        assert os.fstat(bfd).st_ino != ino
        os.close(bfd)
        b.close()
    finally:
        rc, _ = d.stop()
        assert rc == 0, d.log()
