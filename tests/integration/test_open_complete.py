"""OPEN of a complete sealed snapshot trusts the index's `complete` flag instead of counting
its items; the flag must be exactly as honest as the count: a blob row that goes (damaged,
missing at start) makes the snapshot incomplete again, a new prefetch makes it complete,
a restart keeps it, and the first start over an index written before the flag was kept
recomputes it.

The real daemon and CLI, the emulator over HTTP; the index is read with sqlite3 only while
the daemon is stopped.
"""
import json
import os
import sqlite3
import subprocess
import sys

from conftest import DMCACHE, Daemon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'emulator'))
import client as emulator  # noqa: E402

KEY = emulator.KEY_ALL


def env_of(d):
    env = dict(d.env, DATAMINT_API_KEY=KEY)
    env.pop('DATAMINT_API_URL', None)
    return env


def prefetch(d, emu):
    r = subprocess.run([DMCACHE, '--socket', d.socket, 'prefetch', '--json', '--server',
                        emu.url, 'sample'], env=env_of(d), capture_output=True, text=True,
                       timeout=300)
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{')]
    done = [e for e in events if 'state' in e]
    assert r.returncode == 0 and done and done[-1]['state'] == 'done', r.stdout + r.stderr
    return done[-1]


def get_offline(d, emu, idx):
    out = os.path.join(d.dir, 'x.npy')
    return subprocess.run([DMCACHE, '--socket', d.socket, 'get', '--offline', '--server',
                           emu.url, 'sample', str(idx), '-o', out], env=env_of(d),
                          capture_output=True, text=True, timeout=120)


def db(d):
    return sqlite3.connect(os.path.join(d.cache, 'index.db'))


def counted(d, sid):
    """(items, items whose blob row exists, the flag) by an independent count."""
    c = db(d)
    try:
        n, stored = c.execute('SELECT count(*), count(b.digest) FROM items AS i LEFT JOIN '
                              'blobs AS b ON b.digest = i.blob WHERE (i.key >> 32) = ?',
                              (sid,)).fetchone()
        flag = c.execute('SELECT complete FROM snapshots WHERE id = ?', (sid,)).fetchone()[0]
        return n, stored, flag
    finally:
        c.close()


def blob_of(d, sid, pos):
    c = db(d)
    try:
        return c.execute('SELECT hex(blob) FROM items WHERE key = ?',
                         ((sid << 32) | pos,)).fetchone()[0].lower()
    finally:
        c.close()


def blob_path(d, hexd):
    return os.path.join(d.cache, 'objects', hexd[:2], hexd)


def assert_refused(r, stored, total):
    assert r.returncode != 0, r.stdout
    want = 'not complete (%d of %d items stored)' % (stored, total)
    assert want in r.stderr, r.stderr


def test_complete_flag_follows_the_blobs(emu, tmpdir_short):
    d = Daemon(tmpdir_short)
    fin = prefetch(d, emu)
    sid, n = fin['snapshot_id'], fin['items_total']
    assert n >= 3
    r = get_offline(d, emu, 1)
    assert r.returncode == 0, r.stderr
    assert d.stop()[0] == 0
    assert counted(d, sid) == (n, n, 1)

    # a blob file gone while stopped: the start's reconciliation drops its row, and with it
    # the flag; OPEN offline counts and refuses
    os.unlink(blob_path(d, blob_of(d, sid, 0)))
    d.start()
    assert_refused(get_offline(d, emu, 1), n - 1, n)
    assert d.stop()[0] == 0
    assert counted(d, sid) == (n, n - 1, 0)
    # the restart keeps it
    d.start()
    assert_refused(get_offline(d, emu, 1), n - 1, n)

    # a new prefetch stores it again and the snapshot is complete again, across a restart
    fin = prefetch(d, emu)
    assert fin['snapshot_id'] == sid and fin['items_done'] == n
    assert get_offline(d, emu, 1).returncode == 0
    assert d.stop()[0] == 0
    assert counted(d, sid) == (n, n, 1)
    path = blob_path(d, blob_of(d, sid, 2))
    d.start()
    r = get_offline(d, emu, 1)
    assert r.returncode == 0, r.stderr

    # damaged while the daemon runs: the read that finds it deletes the blob row, and the
    # next OPEN offline is refused with the count
    data = bytearray(open(path, 'rb').read())
    data[-1] ^= 0xff
    with open(path, 'r+b') as f:
        f.write(bytes(data))
    get_offline(d, emu, 2)  # finds the damage (its own outcome is the faults tests')
    assert_refused(get_offline(d, emu, 1), n - 1, n)
    assert d.stop()[0] == 0
    assert counted(d, sid) == (n, n - 1, 0)


def test_first_start_recomputes_a_wrong_flag(emu, tmpdir_short):
    d = Daemon(tmpdir_short)
    fin = prefetch(d, emu)
    sid, n = fin['snapshot_id'], fin['items_total']
    assert d.stop()[0] == 0
    # an index as a daemon before the flag was kept left it: no triggers, no meta row, a
    # blob (file and row) gone and the flag still set
    gone = blob_of(d, sid, 0)
    os.unlink(blob_path(d, gone))
    c = db(d)
    for (name,) in c.execute("SELECT name FROM sqlite_schema WHERE type = 'trigger'").fetchall():
        c.execute('DROP TRIGGER %s' % name)
    c.execute("DELETE FROM meta WHERE key LIKE 'complete_tracked%'")
    c.execute('DELETE FROM blobs WHERE digest = (SELECT blob FROM items WHERE key = ?)',
              ((sid << 32) | 0,))
    c.execute('UPDATE snapshots SET complete = 1 WHERE id = ?', (sid,))
    c.commit()
    c.close()
    assert counted(d, sid) == (n, n - 1, 1)
    d.start()
    assert_refused(get_offline(d, emu, 1), n - 1, n)
    assert d.stop()[0] == 0
    assert counted(d, sid) == (n, n - 1, 0)

    # the other way: a complete snapshot whose flag says not complete is found complete
    d.start()
    prefetch(d, emu)
    assert d.stop()[0] == 0
    c = db(d)
    for (name,) in c.execute("SELECT name FROM sqlite_schema WHERE type = 'trigger'").fetchall():
        c.execute('DROP TRIGGER %s' % name)
    c.execute("DELETE FROM meta WHERE key LIKE 'complete_tracked%'")
    c.execute('UPDATE snapshots SET complete = 0 WHERE id = ?', (sid,))
    c.commit()
    c.close()
    d.start()
    assert d.stop()[0] == 0
    assert counted(d, sid) == (n, n, 1)
