"""Helpers of the crash tests (docs/reliability.md C1-C3, C6): what a stopped cache must look
like (I3), what was acknowledged to a client (I2) and what the served bytes must be (I1).

Everything here reads the cache directory of a daemon that is not running.
"""
import hashlib
import json
import os
import sqlite3
import struct
import subprocess
import threading

from conftest import DMCACHE

HEADER = 96
MAGIC = b'DMCBLOB\n'


def blob_files(cache):
    """{digest hex: path} of every file under objects/."""
    out = {}
    root = os.path.join(cache, 'objects')
    for sub in sorted(os.listdir(root)) if os.path.isdir(root) else ():
        d = os.path.join(root, sub)
        for name in os.listdir(d):
            out[name] = os.path.join(d, name)
    return out


def read_header(path):
    with open(path, 'rb') as f:
        h = f.read(HEADER)
    if len(h) != HEADER or h[:8] != MAGIC:
        return None
    kind, comp = h[12], h[13]
    raw, stored = struct.unpack_from('<QQ', h, 16)
    check = hashlib.sha256(h[:88]).digest()[:8]
    if check != h[88:96]:
        return None
    return {'kind': kind, 'comp': comp, 'raw': raw, 'stored': stored, 'digest': h[32:64].hex()}


def check_consistent(cache, max_size=None):
    """I3 on a stopped cache that was reconciled (a start reached READY=1, then SIGTERM
    before any client): integrity_check ok; every blobs row <-> exactly one file whose
    header names the same digest, with matching sizes; tmp/ empty; blob bytes <= max_size.
    Returns (blob rows {hex: (kind, raw, stored)}, items [(snapshot, idx, rid, blob hex)])."""
    db = sqlite3.connect(os.path.join(cache, 'index.db'))
    try:
        check = db.execute('PRAGMA integrity_check').fetchall()
        assert check == [('ok',)], check
        rows = {d: (k, r, s) for d, k, r, s in db.execute(
            'SELECT lower(hex(digest)), kind, raw_size, stored_size FROM blobs')}
        items = db.execute('SELECT key >> 32, key & 4294967295, resource_id, lower(hex(blob)) '
                           'FROM items ORDER BY key').fetchall()
    finally:
        db.close()
    files = blob_files(cache)
    assert set(rows) == set(files), ('rows without files', sorted(set(rows) - set(files))[:5],
                                     'files without rows', sorted(set(files) - set(rows))[:5])
    total = 0
    for hexd, path in files.items():
        h = read_header(path)
        assert h is not None, 'bad blob header ' + path
        assert h['digest'] == hexd, path
        size = os.path.getsize(path)
        assert size == HEADER + h['stored'], (path, size, h)
        kind, raw, stored = rows[hexd]
        assert (kind, raw, stored) == (h['kind'], h['raw'], h['stored']), (path, rows[hexd], h)
        total += size
    tmp = os.listdir(os.path.join(cache, 'tmp'))
    assert tmp == [], 'temp files left: %r' % tmp
    if max_size is not None:
        assert total <= max_size, (total, max_size)
    return rows, items


def stored_items(items, rows, snapshot):
    """{idx: blob hex} of the items of `snapshot` whose blob is stored."""
    return {idx: b for s, idx, _, b in items if s == snapshot and b and b in rows}


def blob_payload(cache, hexd):
    """The raw payload of an uncompressed blob, or None if it is stored with zstd."""
    path = os.path.join(cache, 'objects', hexd[:2], hexd)
    with open(path, 'rb') as f:
        h = f.read(HEADER)
        if h[13] != 0:
            return None
        return f.read()


class Prefetch:
    """`dmcache prefetch --json` in the background; remembers what it was told: the
    highest items_done per snapshot (items the daemon acknowledged as stored: progress is
    sent only after the index batch holding them was committed)."""

    def __init__(self, d, server, project, key, *args):
        env = dict(d.env, DATAMINT_API_KEY=key)
        env.pop('DATAMINT_API_URL', None)
        self.proc = subprocess.Popen([DMCACHE, '--socket', d.socket, 'prefetch', '--json',
                                      '--server', server] + list(args) + [project], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        self.acked = {}  # snapshot id -> items_done
        self.events = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            if not line.startswith('{'):
                continue
            try:
                e = json.loads(line)
            except ValueError:
                continue
            self.events.append(e)
            sid = e.get('snapshot_id') or 0
            if sid > 0:
                self.acked[sid] = max(self.acked.get(sid, 0), e.get('items_done', 0))

    def wait(self, timeout=60):
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.thread.join(10)
        return rc
