"""STREAM batches with hot items handed in place (proto.h STREAM and "Regions"), over the wire.

A handle opened with DMC_OPEN_REGIONS gets its hot items as offsets in the snapshot's
region, n in_region flags ending each batch event; a handle without the flag gets the
batch laid out in the arena and no trailer, as before. The bytes are the same either way
and pydicom's. Items handed in place are pinned until the batch's RELEASE: after STOP
mid-epoch only the batches sent stay pinned, and a client killed while holding a batch
leaves nothing pinned, so eviction takes everything back. bob's streams never show him
alice's region or its bytes. A batch mixing hot items and items too large to be kept hot
has both kinds, each right. The C example reads every byte of such batches.
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np

import uids
import wire
from conftest import Daemon
from test_ops_config import reload
from test_regions import NP_DTYPES, data_of, distinctive, open_r
from test_trust_shm import connect_as, counters, json_filename, pread_all, start_daemon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'emulator'))
import client as emulator  # noqa: E402

MiB = 1 << 20


def tensor(it, arena_fd, region_fd):
    return pread_all(region_fd if it['in_region'] else arena_fd, it['offset'], it['nbytes'])


def stream(sock, handle, fds, batch_size, regions, rid=20, seed=7, epoch=0, ahead=0,
           stop_after=None):
    """One STREAM of an epoch (shuffled): [(batch event, [tensor bytes])], each batch read
    and released before the next is taken (or, with stop_after=k, STOP after k batches and
    every batch that came held, not released: then also the events' list is returned as
    they are). Checks every item against the batch's blocks."""
    arena_fd = fds[0]
    region_fd = fds[1] if len(fds) > 1 else None
    sock.sendall(wire.stream_msg(handle, batch_size, seed=seed, epoch=epoch, flags=1,
                                 ahead=ahead, rid=rid))
    out, rel, stop_rid, final, stopped = [], rid + 1000, rid + 500, None, None
    pending = 0  # RELEASE replies still to come
    while final is None or pending or (stop_after is not None and stopped is None):
        op, fl, r, payload, got = wire.recv_frame_fds(sock)
        assert not got  # nothing new passed by a STREAM
        if op == wire.OP_RELEASE:
            pending -= 1
            continue
        if r == stop_rid:
            assert op == wire.OP_STOP, payload
            stopped = payload
            continue
        assert r == rid, (op, r)
        assert op == wire.OP_STREAM, wire.decode_error(payload)
        if not fl & wire.FLAG_MORE:
            final = payload
            continue
        ev = wire.decode_batch_event(payload, regions)
        for it in ev['items']:
            assert it['status'] == 0, it
            assert ev['meta_offset'] <= it['meta_offset'] and \
                it['meta_offset'] + it['meta_len'] <= ev['meta_offset'] + ev['meta_len']
            if not it['in_region']:
                assert ev['data_offset'] <= it['offset'] and \
                    it['offset'] + it['nbytes'] <= ev['data_offset'] + ev['data_len']
        assert ev['data_len'] == sum(it['nbytes'] for it in ev['items']
                                     if not it['in_region']) or not ev['uniform']
        ev['metas'] = [pread_all(arena_fd, it['meta_offset'], it['meta_len'])
                       for it in ev['items']]
        out.append((ev, [tensor(it, arena_fd, region_fd) for it in ev['items']]))
        if stop_after is not None:
            if len(out) == stop_after:
                sock.sendall(wire.stop_msg(rid, rid=stop_rid))
            continue
        rel += 1
        sock.sendall(wire.frame(wire.OP_RELEASE, (2).to_bytes(4, 'little') +
                                ev['data_offset'].to_bytes(8, 'little') +
                                ev['meta_offset'].to_bytes(8, 'little'), rid=rel))
        pending += 1
    return out


def give_back(sock, events, rid=950):
    offs = [o for ev, _ in events for o in (ev['data_offset'], ev['meta_offset'])]
    sock.sendall(wire.frame(wire.OP_RELEASE, len(offs).to_bytes(4, 'little') +
                            b''.join(o.to_bytes(8, 'little') for o in offs), rid=rid))
    op, fl, r, payload, _ = wire.recv_frame_fds(sock)
    assert op == wire.OP_RELEASE and r == rid, payload


def items_of(events):
    return [(it['index'], t) for ev, ts in events for it, t in zip(ev['items'], ts)]


def test_stream_hands_hot_items_in_place_with_the_arena_paths_bytes(emu, tmpdir_short):
    d = start_daemon(tmpdir_short, emu, 'hot_max=64M')
    try:
        sock = wire.session(d.socket, timeout=120)
        o, fds = open_r(sock, 'sample', emulator.KEY_ALL, emu.url)
        assert len(fds) == 2 and o['region_id'], o
        n = o['items']
        stream(sock, o['handle'], fds, 4, True, rid=20)  # decoded: hot from here on
        c0 = counters(d)
        hot = stream(sock, o['handle'], fds, 4, True, rid=40, epoch=1)
        c1 = counters(d)
        assert c1['serve_stream_region_items_total'] - c0['serve_stream_region_items_total'] == n
        assert c1['serve_region_tensors_pinned'] == 0  # every batch released
        for ev, _ in hot:
            assert all(it['in_region'] for it in ev['items']), ev
            assert ev['data_len'] == 0
        # a connection without regions: the same epoch laid out in the arena, no trailer
        # (decode_batch_event checks that nothing follows the records)
        plain_sock = wire.session(d.socket, timeout=120)
        p, pfds = open_r(plain_sock, 'sample', emulator.KEY_ALL, emu.url, regions=False)
        assert len(pfds) == 1
        plain = stream(plain_sock, p['handle'], pfds, 4, False, rid=60, epoch=1)
        assert counters(d)['serve_stream_region_items_total'] == \
            c1['serve_stream_region_items_total']
        assert items_of(hot) == items_of(plain)
        assert [m for ev, _ in hot for m in ev['metas']] == \
            [m for ev, _ in plain for m in ev['metas']]
        assert sorted(i for i, _ in items_of(hot)) == list(range(n))
        # and pydicom's pixels
        files = os.path.join(emu.corpus, 'projects', 'sample', 'files')
        import pydicom
        checked = 0
        for ev, ts in hot:
            for it, t, meta in zip(ev['items'], ts, ev['metas']):
                name = json_filename(meta)
                if not name.endswith('.dcm'):
                    continue
                px = pydicom.dcmread(os.path.join(files, name)).pixel_array
                assert np.array_equal(np.frombuffer(t, dtype=NP_DTYPES[it['dtype']]),
                                      px.reshape(-1)), name
                checked += 1
        assert checked >= 8
        for fd in fds + pfds:
            os.close(fd)
        sock.close()
        plain_sock.close()
    finally:
        rc, _ = d.stop()
        assert rc == 0, d.log()


def test_bob_never_streams_alices_region(emu, tmpdir_short):
    uids.require_root()
    d = start_daemon(tmpdir_short, emu, 'hot_max=64M')
    try:
        alice = connect_as(uids.ALICE, d.socket)
        oa, afds = open_r(alice, 'sample', emulator.KEY_SAMPLE, emu.url)
        assert len(afds) == 2
        stream(alice, oa['handle'], afds, 4, True, rid=20)
        mine = [t for _, t in items_of(stream(alice, oa['handle'], afds, 4, True, rid=40))]
        bob = connect_as(uids.BOB, d.socket)
        # alice's handle number means nothing on bob's connection
        bob.sendall(wire.stream_msg(oa['handle'], 4, rid=30))
        op, fl, r, payload, bfds0 = wire.recv_frame_fds(bob)
        assert op == wire.OP_ERROR and bfds0 == [], (op, payload)
        ob, bfds = open_r(bob, 'ct', emulator.KEY_CT, emu.url, rid=31)
        assert len(bfds) == 2 and ob['region_id'] not in (0, oa['region_id']), ob
        stream(bob, ob['handle'], bfds, 8, True, rid=50)
        theirs = stream(bob, ob['handle'], bfds, 8, True, rid=70)
        assert any(it['in_region'] for ev, _ in theirs for it in ev['items'])
        # bob's items are his ct items: the bytes of his own connection without regions
        bob2 = connect_as(uids.BOB, d.socket)
        ob2, bfds2 = open_r(bob2, 'ct', emulator.KEY_CT, emu.url, regions=False, rid=32)
        assert items_of(stream(bob2, ob2['handle'], bfds2, 8, False, rid=90)) == \
            items_of(theirs)
        assert os.fstat(afds[1]).st_ino not in {os.fstat(fd).st_ino for fd in bfds + bfds2}
        # no byte of alice's tensors (not also in ct) is in anything bob was passed
        theirs = b'\0'.join(t for _, t in items_of(theirs))
        seen = b''.join(data_of(fd) for fd in bfds + bfds2)
        assert seen
        checked = 0
        for t in mine:
            for c in distinctive(t):
                if c in theirs:
                    continue  # the CT phantoms of 'sample' and 'ct' share slices
                assert c not in seen
                checked += 1
        assert checked >= 10, checked
        for fd in afds + bfds + bfds2:
            os.close(fd)
        for s in (alice, bob, bob2):
            s.close()
    finally:
        rc, _ = d.stop()
        assert rc == 0, d.log()


HOLDER = '''
import os, sys, time
sys.path.insert(0, sys.argv[2])
import wire
from test_regions import open_r
sock = wire.session(sys.argv[1], timeout=60)
o, fds = open_r(sock, 'sample', sys.argv[3], sys.argv[4])
sock.sendall(wire.stream_msg(o['handle'], 4, rid=20))
op, fl, r, payload, _ = wire.recv_frame_fds(sock)
ev = wire.decode_batch_event(payload, True)
print(sum(it['in_region'] for it in ev['items']), flush=True)
time.sleep(600)
'''


def test_pins_end_with_release_stop_and_a_killed_client(emu, tmpdir_short):
    conf = os.path.join(tmpdir_short, 'dmcached.conf')
    with open(conf, 'w') as f:
        f.write('hot_max = 64M\n')
    d = Daemon(tmpdir_short, args=['--config', conf], env=dict(DATAMINT_API_URL=emu.url))
    try:
        sock = wire.session(d.socket, timeout=120)
        o, fds = open_r(sock, 'sample', emulator.KEY_ALL, emu.url)
        stream(sock, o['handle'], fds, 4, True, rid=20)  # hot from here on
        assert counters(d)['serve_region_tensors_pinned'] == 0

        # STOP after the first batch: what came stays pinned until released, what was not
        # sent pinned nothing
        held = stream(sock, o['handle'], fds, 4, True, rid=40, ahead=2, stop_after=1)
        assert 1 <= len(held) <= 3
        ref = [t for _, t in items_of(held)]
        c = counters(d)
        assert c['serve_region_tensors_pinned'] > 0, c
        assert c['serve_region_tensors_pinned'] <= sum(len(ev['items']) for ev, _ in held)
        assert [tensor(it, *fds) for ev, _ in held for it in ev['items']] == ref
        give_back(sock, held)
        assert counters(d)['serve_region_tensors_pinned'] == 0

        # a client killed (SIGKILL) while it holds a batch handed in place
        p = subprocess.Popen([sys.executable, '-c', HOLDER, d.socket,
                              os.path.dirname(os.path.abspath(__file__)), emulator.KEY_ALL,
                              emu.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        try:
            line = p.stdout.readline().strip()
            assert line and int(line) > 0, p.stderr.read()
            pinned = counters(d)['serve_region_tensors_pinned']
            assert pinned > 0
            p.send_signal(signal.SIGKILL)
            p.wait()
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdout.close()
            p.stderr.close()
        deadline = time.monotonic() + 10
        while counters(d)['serve_region_tensors_pinned'] and time.monotonic() < deadline:
            time.sleep(0.05)
        before = counters(d)
        assert before['serve_region_tensors_pinned'] == 0, before
        assert before['serve_region_tensors'] > 0 and before['serve_regions'] == 1
        # nothing is held: a lowered hot_max takes every tensor of the region back
        reload(d, 'hot_max = 1M\n', conf)
        after = counters(d)
        assert after['serve_region_bytes'] <= MiB, after
        assert after['serve_region_evictions_total'] > before['serve_region_evictions_total']
        assert os.fstat(fds[1]).st_blocks * 512 == after['serve_region_bytes']
        for fd in fds:
            os.close(fd)
        sock.close()
    finally:
        rc, _ = d.stop()
        assert rc == 0, d.log()


def test_a_batch_of_hot_and_cold_items(emu, tmpdir_short):
    """hot_max 2 MiB: the 512x512 slices (512 KiB) are never kept hot (more than an eighth
    of it), smaller items are: batches mix items in the region and in the arena."""
    d = start_daemon(tmpdir_short, emu, 'hot_max=2M')
    try:
        sock = wire.session(d.socket, timeout=120)
        o, fds = open_r(sock, 'sample', emulator.KEY_ALL, emu.url)
        plain_sock = wire.session(d.socket, timeout=120)
        p, pfds = open_r(plain_sock, 'sample', emulator.KEY_ALL, emu.url, regions=False)
        stream(sock, o['handle'], fds, 6, True, rid=20)
        mixed = stream(sock, o['handle'], fds, 6, True, rid=40, epoch=1)
        flags = [[it['in_region'] for it in ev['items']] for ev, _ in mixed]
        assert any(0 in f and 1 in f for f in flags), flags
        for ev, _ in mixed:
            for it in ev['items']:
                assert not it['in_region'] or it['nbytes'] <= 256 << 10, it
        plain = stream(plain_sock, p['handle'], pfds, 6, False, rid=60, epoch=1)
        assert items_of(mixed) == items_of(plain)
        assert counters(d)['serve_region_tensors_pinned'] == 0
        for fd in fds + pfds:
            os.close(fd)
        sock.close()
        plain_sock.close()
    finally:
        rc, _ = d.stop()
        assert rc == 0, d.log()


def test_the_c_example_reads_every_byte_in_place(emu, tmpdir_short):
    """client/examples/dmcache-read: its checksum of every byte read is the same by GET, by
    STREAM in the arena and by STREAM with regions, whose items came in place."""
    import re
    d = start_daemon(tmpdir_short, emu, 'hot_max=64M')
    exe = os.path.join(os.environ['DMC_BUILD_ROOT'], 'client', 'dmcache-read')

    def run(*extra):
        r = subprocess.run([exe, '--socket', d.socket, '--server', emu.url, '--api-key',
                            emulator.KEY_ALL, '--epochs', '2', '--batch', '4'] + list(extra) +
                           ['sample'], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        m = re.search(r'total: (\d+) items.*checksum ([0-9a-f]{16})', r.stdout)
        assert m, r.stdout
        return int(m.group(1)), m.group(2)

    try:
        n, ref = run()  # GET: decoded, hot from here on
        assert n == 2 * 19
        assert run('--stream') == (n, ref)
        before = counters(d)['serve_stream_region_items_total']
        assert run('--stream', '--regions') == (n, ref)
        assert run('--stream', '--shuffle', '--regions') == (n, ref)
        assert counters(d)['serve_stream_region_items_total'] - before == 2 * n
    finally:
        rc, _ = d.stop()
        assert rc == 0, d.log()
