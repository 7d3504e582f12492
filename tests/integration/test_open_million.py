"""T6 at a million items: an online OPEN of a 1,000,000-item project is answered with the
whole project listed in the index, and GETs of its first, middle and last items are
byte-equal to the server's, without waiting for the prefetch that the OPEN started (a GET
moves its item ahead of the job's walk); the daemon's anonymous memory with the snapshot
open stays within T6's 64 MiB of what it was before the OPEN. Counted, never timed: the
times are in docs/benchmarks.md ("A million items").

The real dmcached against the emulator's synthetic project (items of 32 bytes: the OPEN
does not read them), the cache on tmpfs when it has room, a client speaking the wire
(wire.py) so that the same test runs in every build. The job goes on downloading after the
GETs; the daemon's stop ends it. Under AddressSanitizer the project has 100,000 items (the
listing alone takes minutes there; 250,000 took 123 s of a 45-minute CI run);
DMC_MILLION_ITEMS=N overrides.
"""
import hashlib
import mmap
import os
import shutil
import sqlite3
import sys
import time

from conftest import Daemon
from test_scale import sanitized, scratch_dir, status_kib
import wire

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'emulator'))
import client as emulator  # noqa: E402

KEY = emulator.KEY_ALL
OPEN_RSS_MAX_KIB = 64 * 1024  # T6
OPEN_RAW = 16                 # proto.h DMC_OPEN_RAW: each item is its stored file
PROJECT = 'million'


def items():
    n = os.environ.get('DMC_MILLION_ITEMS')
    return int(n) if n else 100000 if sanitized() else 1000000


def item_id(i):
    """The emulator's synthetic ids (tests/emulator/store.py SyntheticProject.item_id)."""
    return '%s-5e00-4000-8000-%012x' % (hashlib.sha256(PROJECT.encode()).hexdigest()[:8], i)


def test_a_million_item_project_opens_and_serves_its_ends():
    n = items()
    top = scratch_dir()
    try:
        with emulator.Emulator(synthetic=['%s:%d:32' % (PROJECT, n)]) as emu:
            d = Daemon(top, start=False)
            d.env.pop('MALLOC_PERTURB_', None)  # fills every allocation: not production
            if sanitized():
                d.env['ASAN_OPTIONS'] = ':'.join(
                    x for x in (d.env.get('ASAN_OPTIONS'), 'quarantine_size_mb=8') if x)
            d.start()
            try:
                time.sleep(0.5)
                before = status_kib(d.proc.pid, 'RssAnon')
                sock = wire.session(d.socket, timeout=1800)
                t0 = time.monotonic()
                sock.sendall(wire.open_msg(PROJECT, flags=OPEN_RAW, server=emu.url, key=KEY,
                                           arena=1 << 20))
                op, fl, rid, payload, fds = wire.recv_frame_fds(sock)
                assert op == wire.OP_OPEN, wire.decode_error(payload)
                o = wire.decode_open_reply(payload)
                opened = time.monotonic() - t0
                assert o['items'] == n
                arena = mmap.mmap(fds[0], o['arena_bytes'], mmap.MAP_SHARED, mmap.PROT_READ)
                for i in (0, n // 2, n - 1):
                    sock.sendall(wire.get_msg(o['handle'], [i]))
                    op, fl, rid, payload, _ = wire.recv_frame_fds(sock)
                    assert op == wire.OP_GET, wire.decode_error(payload)
                    it = wire.decode_get_reply(payload)[0]
                    assert it['status'] == 0, (i, it['message'])
                    got = arena[it['offset']:it['offset'] + it['nbytes']]
                    assert got == emu.get('/resources/%s/file' % item_id(i)).body, i
                served = time.monotonic() - t0
                rss = status_kib(d.proc.pid, 'RssAnon')
                print('%d items: OPEN answered after %.1f s, its three GETs after %.1f s; '
                      'RssAnon %d -> %d KiB' % (n, opened, served, before, rss))
                assert rss - before < OPEN_RSS_MAX_KIB, (before, rss)
                arena.close()
                os.close(fds[0])
                sock.close()
            finally:
                rc, _ = d.stop(timeout=600)
                d.notify.close()
            assert rc == 0, d.log()[-4000:]
            # the listing as the index holds it: every item, once, in order
            db = sqlite3.connect(os.path.join(d.cache, 'index.db'))
            try:
                (sid,), = db.execute('SELECT id FROM snapshots WHERE project_name = ?',
                                     (PROJECT,)).fetchall()
                count, lo, hi = db.execute(
                    'SELECT count(*), min(key & 4294967295), max(key & 4294967295) '
                    'FROM items WHERE key BETWEEN ?1 AND ?1 | 4294967295',
                    (sid << 32,)).fetchone()
                assert (count, lo, hi) == (n, 0, n - 1)
                rid, = db.execute('SELECT resource_id FROM items WHERE key = ?',
                                  ((sid << 32) | (n - 1),)).fetchone()
                assert rid == item_id(n - 1)
            finally:
                db.close()
    finally:
        shutil.rmtree(top, ignore_errors=True)
