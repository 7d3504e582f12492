"""The index lost or damaged while the daemon is stopped, or opened by another process
while it runs (docs/reliability.md C6).

For each damage: the daemon starts (no crash loop), reconciles (I3, checked on the
stopped cache), a damaged index is moved aside and rebuilt from the blob headers with no
snapshot and no grant carried over, and the same requests are authorised again with the
user's key and served identically (decoded tensors equal to those before the damage).
"""
import json
import os
import shutil
import signal
import re
import subprocess
import sqlite3
import sys
import time

import numpy as np
import pytest

import crashlib
from conftest import DMCACHE, Daemon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'emulator'))
import client as emulator  # noqa: E402

KEY = emulator.KEY_ALL
ITEMS = (0, 3, 8, 14)  # DICOM, PNG, JPEG and NIfTI items of `sample`


@pytest.fixture(scope='module')
def pristine(emu, tmp_path_factory):
    """A stopped cache with `sample` prefetched and some items decoded, and the decodes."""
    import tempfile
    base = tempfile.mkdtemp(prefix='dmc-')
    d = Daemon(base)
    d.env.update(DATAMINT_API_KEY=KEY, DATAMINT_API_URL=emu.url)
    p = crashlib.Prefetch(d, emu.url, 'sample', KEY)
    assert p.wait(120) == 0
    ref = {}
    for i in ITEMS:
        out = os.path.join(base, 'ref%d.npy' % i)
        r = get(d, i, out)
        assert r.returncode == 0, r.stderr
        ref[i] = np.load(out)
    rc, _ = d.stop()
    assert rc == 0
    rows, items = crashlib.check_consistent(d.cache)
    db = sqlite3.connect(os.path.join(d.cache, 'index.db'))
    grants = db.execute('SELECT count(*) FROM grants').fetchone()[0]
    db.close()
    assert grants >= 1 and items
    yield d.cache, ref, rows
    shutil.rmtree(base, ignore_errors=True)


def get(d, i, out):
    return subprocess.run([DMCACHE, '--socket', d.socket, 'get', 'sample', str(i), '-o', out],
                          env=d.env, capture_output=True, text=True, timeout=120)


def delete_db(cache):
    for ext in ('', '-wal', '-shm'):
        if os.path.exists(os.path.join(cache, 'index.db' + ext)):
            os.unlink(os.path.join(cache, 'index.db' + ext))


def truncate_zero(cache):
    os.truncate(os.path.join(cache, 'index.db'), 0)


def truncate_half(cache):
    p = os.path.join(cache, 'index.db')
    os.truncate(p, os.path.getsize(p) // 2)


def flip_pages(cache):
    """Bytes of every b-tree page header flipped (page 1 keeps its file header)."""
    p = os.path.join(cache, 'index.db')
    with open(p, 'r+b') as f:
        data = bytearray(f.read())
        page = int.from_bytes(data[16:18], 'big') or 65536
        for off in range(page, len(data), page):
            for j in range(8):
                data[off + j] ^= 0x5a
        f.seek(0)
        f.write(data)


def garbage_header(cache):
    p = os.path.join(cache, 'index.db')
    with open(p, 'r+b') as f:
        f.write(b'this is not an SQLite database!!')


def delete_wal(cache):
    """Run by the test after a kill -9 left committed batches in the WAL."""
    p = os.path.join(cache, 'index.db-wal')
    assert os.path.getsize(p) > 0
    os.unlink(p)


DAMAGES = {'deleted': delete_db, 'truncated-to-zero': truncate_zero,
           'truncated-to-half': truncate_half, 'pages-flipped': flip_pages,
           'header-garbage': garbage_header, 'wal-deleted': delete_wal}


@pytest.mark.parametrize('damage', sorted(DAMAGES))
def test_damaged_index_is_rebuilt_and_nothing_wrong_is_served(emu, pristine, tmpdir_short,
                                                             damage):
    cache0, ref, rows0 = pristine
    d = Daemon(tmpdir_short, start=False)
    shutil.copytree(cache0, d.cache)
    d.env.update(DATAMINT_API_KEY=KEY, DATAMINT_API_URL=emu.url)
    if damage == 'wal-deleted':
        # committed batches that only the WAL holds: a prefetch, then kill -9
        d.start()
        assert crashlib.Prefetch(d, emu.url, 'pydicom', KEY).wait(120) == 0
        d.proc.kill()
        d.proc.wait()
    DAMAGES[damage](d.cache)
    d.start()  # READY=1 (no crash loop)
    rc, _ = d.stop()
    assert rc == 0, d.log()
    log = d.log()
    rows, items = crashlib.check_consistent(d.cache)
    # every blob was kept (adopted by the rebuilt index or still recorded)
    assert set(rows) >= set(rows0)
    db = sqlite3.connect(os.path.join(d.cache, 'index.db'))
    grants = db.execute('SELECT count(*) FROM grants').fetchone()[0]
    snaps = db.execute('SELECT count(*) FROM snapshots').fetchone()[0]
    db.close()
    if damage in ('truncated-to-half', 'pages-flipped', 'header-garbage'):
        assert 'damaged' in log and 'rebuilt' in log, log[-2000:]
        assert [f for f in os.listdir(d.cache) if f.startswith('index.db.corrupt-')]
    if damage != 'wal-deleted':
        # no snapshot and no entitlement survives a rebuild
        assert grants == 0 and snaps == 0 and items == []
    # served again, authorised again with the user's own key, identical
    emu.clear_log()
    d.start()
    for i in ITEMS:
        out = os.path.join(tmpdir_short, 'after%d.npy' % i)
        r = get(d, i, out)
        assert r.returncode == 0, r.stderr
        a = np.load(out)
        assert a.dtype == ref[i].dtype and np.array_equal(a, ref[i]), (damage, i)
    asked = [e for e in emu.log() if e['listener'] == 'main' and e['user']]
    assert asked, 'the requests were not authorised with the key again'
    r = d.cli('verify')
    assert r.returncode == 0 and 'all good' in r.stdout, r.stdout
    rc, _ = d.stop()
    assert rc == 0
    crashlib.check_consistent(d.cache)


def test_another_process_cannot_write_the_index(emu, tmpdir_short):
    """`sqlite3 index.db` while the daemon runs a prefetch: refused (the daemon holds an
    exclusive lock), nothing it tried is in the database, the daemon goes on."""
    d = Daemon(tmpdir_short)
    emu.add_fault(path='/resources/.*/file$', latency_ms=200)
    try:
        p = crashlib.Prefetch(d, emu.url, 'sample', KEY)
        db = os.path.join(d.cache, 'index.db')
        tries = []
        for sql in ("INSERT INTO meta VALUES ('intruder', x'00');",
                    "DELETE FROM blobs;", "PRAGMA wal_checkpoint(TRUNCATE);",
                    "SELECT count(*) FROM blobs;"):
            r = subprocess.run(['sqlite3', '-bail', db, sql], capture_output=True, text=True,
                               timeout=30)
            tries.append((sql, r.returncode, r.stderr.strip()))
        assert p.wait(120) == 0
    finally:
        emu.clear_faults()
    for sql, rc, err in tries:
        assert rc != 0 and 'locked' in err, (sql, rc, err)
    r = d.cli('verify')
    assert r.returncode == 0 and 'all good' in r.stdout
    rc, _ = d.stop()
    assert rc == 0
    rows, items = crashlib.check_consistent(d.cache)
    assert len(crashlib.stored_items(items, rows, items[0][0])) == 19
    c = sqlite3.connect(db)
    assert c.execute("SELECT count(*) FROM meta WHERE key = 'intruder'").fetchone()[0] == 0
    c.close()


# ---- the clean-shutdown record (docs/reliability.md I3, C6; daemon/cache_clean.h) ----
#
# A clean stop leaves <cache>/clean-shutdown; the next start takes it (removes it before
# writing anything), skips the index check when index.db is untouched and walks only the
# objects/<b>/ directories changed since the stop. Each test below starts from a cache
# stopped cleanly, changes it while stopped, and checks which path the start took (its log
# line and `dmcache status` counters) and that the result is today's full reconciliation's.

RECORD = 'clean-shutdown'
SAMPLE_ITEMS = range(19)


def start_path(d):
    """(clean, directories walked, index checked) of the last start: its log line and
    its counters, which must agree."""
    lines = [ln for ln in d.log().splitlines()
             if 'clean start:' in ln or 'full reconciliation because' in ln]
    assert lines, d.log()[-2000:]
    c = status_counters(d)
    line = lines[-1]
    if 'clean start:' in line:
        walked = int(line.split('clean start: ')[1].split(' of 256')[0])
        assert 'index check skipped' in line, line
        assert c['store_start_index_checked'] == 0, c
        assert c['store_start_dirs_walked'] == walked, (line, c)
        return True, walked, False, line
    checked = c['store_start_index_checked'] == 1
    assert ('index checked' in line) == checked, (line, c)
    assert c['store_start_dirs_walked'] == 256, (line, c)
    return False, 256, checked, line


def status_counters(d):
    r = d.cli('status', '--json', check=True)
    return json.loads(r.stdout)['counters']


def serve_all(d, ref, tag):
    """Every item of `sample` decoded again and equal to `ref` ({idx: array})."""
    for i in SAMPLE_ITEMS:
        out = os.path.join(d.dir, '%s%d.npy' % (tag, i))
        r = get(d, i, out)
        if i not in ref:
            assert r.returncode != 0, (i, 'decoded now but not before')
            continue
        assert r.returncode == 0, (i, r.stderr)
        a = np.load(out)
        assert a.dtype == ref[i].dtype and np.array_equal(a, ref[i]), (tag, i)


@pytest.fixture
def clean(emu, tmpdir_short):
    """A daemon with `sample` prefetched and decoded, stopped cleanly: (daemon, reference
    arrays, blob rows)."""
    d = Daemon(tmpdir_short)
    d.env.update(DATAMINT_API_KEY=KEY, DATAMINT_API_URL=emu.url)
    assert crashlib.Prefetch(d, emu.url, 'sample', KEY).wait(120) == 0
    ref = {}
    for i in SAMPLE_ITEMS:
        out = os.path.join(tmpdir_short, 'ref%d.npy' % i)
        if get(d, i, out).returncode == 0:
            ref[i] = np.load(out)
    assert len(ref) >= len(ITEMS)
    rc, _ = d.stop()
    assert rc == 0, d.log()[-2000:]
    assert 'clean-shutdown record written' in d.log(), d.log()[-2000:]
    rows, _ = crashlib.check_consistent(d.cache)
    st = os.stat(os.path.join(d.cache, RECORD))
    assert (st.st_mode & 0o777) == 0o600 and st.st_uid == os.geteuid()
    assert os.stat(os.path.join(d.cache, 'objects')).st_uid == st.st_uid
    assert not os.path.exists(os.path.join(d.cache, 'index.db-wal'))
    yield d, ref, rows
    d.stop()


def test_clean_stop_then_start_walks_nothing_and_serves_the_same(clean):
    d, ref, rows0 = clean
    d.start()
    # taken at the start: a crash from now on leaves no record
    assert not os.path.exists(os.path.join(d.cache, RECORD))
    ok, walked, checked, line = start_path(d)
    assert ok and walked == 0 and not checked, line
    c = status_counters(d)
    assert c['cache_objects'] == len(rows0), (c['cache_objects'], len(rows0))
    assert c['cache_bytes'] == sum(crashlib.HEADER + s for _, _, s in rows0.values())
    serve_all(d, ref, 'clean')
    r = d.cli('verify')
    assert r.returncode == 0 and 'all good' in r.stdout, r.stdout
    rc, _ = d.stop()
    assert rc == 0
    rows, _ = crashlib.check_consistent(d.cache)
    assert set(rows) >= set(rows0)


def test_blob_deleted_and_file_planted_while_stopped_walk_those_directories(clean):
    d, ref, rows0 = clean
    files = crashlib.blob_files(d.cache)
    _, items = crashlib.check_consistent(d.cache)
    used = sorted({b for _, _, _, b in items if b})
    gone = used[0]
    planted_dir = next(h[:2] for h in sorted(files) if h[:2] != gone[:2])
    os.unlink(files[gone])
    planted = os.path.join(d.cache, 'objects', planted_dir, 'not-a-blob')
    with open(planted, 'wb') as f:
        f.write(b'foreign')
    d.start()
    ok, walked, checked, line = start_path(d)
    assert ok and walked == 2 and not checked, line
    assert not os.path.exists(planted)
    c = status_counters(d)
    assert c['cache_objects'] == len(rows0) - 1
    rc, _ = d.stop()
    assert rc == 0
    # as the full reconciliation: the row of the deleted blob dropped, all else kept
    rows, _ = crashlib.check_consistent(d.cache)
    assert gone not in rows and set(rows) == set(rows0) - {gone}
    # and the item is served again, fetched anew, identical
    d.start()
    ok, walked, _, line = start_path(d)
    assert ok and walked == 0, line
    serve_all(d, ref, 'again')
    rc, _ = d.stop()
    assert rc == 0
    rows, _ = crashlib.check_consistent(d.cache)
    assert gone in rows


def test_blobs_flipped_in_place_while_stopped_are_caught_at_read(clean):
    """A blob rewritten in place (same size) changes no directory: the start trusts the
    record, and every read checks header and content, so nothing wrong is served."""
    d, ref, rows0 = clean
    for path in crashlib.blob_files(d.cache).values():
        size = os.path.getsize(path)
        with open(path, 'r+b') as f:
            off = crashlib.HEADER + (size - crashlib.HEADER) // 2 if size > crashlib.HEADER \
                else size // 2
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0xff]))
    d.start()
    ok, walked, checked, line = start_path(d)
    assert ok and walked == 0 and not checked, line
    serve_all(d, ref, 'flipped')
    c = status_counters(d)
    assert c['cache_integrity_failures_total'] >= 1, c
    rc, _ = d.stop()
    assert rc == 0
    crashlib.check_consistent(d.cache)


@pytest.mark.parametrize('damage', ['deleted', 'truncated-to-half', 'pages-flipped',
                                    'header-garbage'])
def test_index_damaged_after_a_clean_stop_is_checked(clean, damage):
    d, ref, rows0 = clean
    DAMAGES[damage](d.cache)
    d.start()
    ok, walked, checked, line = start_path(d)
    assert not ok and walked == 256 and checked, line
    assert 'index.db' in line, line
    log = d.log()
    if damage != 'deleted':
        assert 'damaged' in log and 'rebuilt' in log, log[-2000:]
        assert [f for f in os.listdir(d.cache) if f.startswith('index.db.corrupt-')]
    rc, _ = d.stop()
    assert rc == 0
    # C6 as without the record: every blob adopted by the rebuilt index, nothing else kept
    rows, items = crashlib.check_consistent(d.cache)
    assert set(rows) == set(rows0) and items == []
    d.start()
    serve_all(d, ref, 'rebuilt')
    rc, _ = d.stop()
    assert rc == 0
    crashlib.check_consistent(d.cache)


def test_kill9_leaves_no_record_and_the_start_reconciles_fully(emu, clean):
    d, ref, rows0 = clean
    d.start()
    ok, walked, _, line = start_path(d)
    assert ok and walked == 0, line
    p = crashlib.Prefetch(d, emu.url, 'pydicom', KEY)
    d.proc.kill()
    d.proc.wait()
    p.wait(60)
    assert not os.path.exists(os.path.join(d.cache, RECORD))
    d.start()
    ok, walked, checked, line = start_path(d)
    # killed in this boot, on the same index.db, without a fatal signal: every directory
    # walked, the index check skipped (SQLite loses nothing committed when a process dies)
    assert not ok and walked == 256 and not checked, line
    assert 'no clean-shutdown record' in line and 'killed in this boot' in line, line
    serve_all(d, ref, 'killed')
    # a fatal signal leaves its marker: the next start checks the index
    d.proc.send_signal(signal.SIGABRT)
    d.proc.wait()
    assert os.path.exists(os.path.join(d.cache, 'fault'))
    d.start()
    ok, walked, checked, line = start_path(d)
    assert not ok and walked == 256 and checked, line
    assert 'the index was checked: the last daemon died of a fatal signal' in d.log()
    assert not os.path.exists(os.path.join(d.cache, 'fault'))
    rc, _ = d.stop()
    assert rc == 0
    rows, _ = crashlib.check_consistent(d.cache)
    assert set(rows) >= set(rows0)


def test_a_start_after_a_crash_serves_while_its_check_runs_in_the_background(clean):
    """A start without the record walks start_walk's worth of directories (here 1 ms) and
    serves while the rest is checked: the same repairs as the full reconciliation at the
    end, the totals exact then, and a stop in the middle finishes the check first (the
    next start walks nothing)."""
    d, ref, rows0 = clean
    files = crashlib.blob_files(d.cache)
    _, items = crashlib.check_consistent(d.cache)
    # the last directory: walked in the background (the start walks in digest order)
    gone = sorted({b for _, _, _, b in items if b})[-1]
    os.unlink(os.path.join(d.cache, RECORD))  # as kill -9 leaves it
    os.unlink(files[gone])
    d.args += ['-o', 'start_walk=1ms']
    d.start()
    log = d.log()
    m = re.search(r'serving while (\d+) of 256 directories are checked in the background',
                  log)
    assert m and int(m.group(1)) > 0, log[-3000:]
    # served meanwhile, through the index's rows
    served = 0
    for i in SAMPLE_ITEMS:
        out = os.path.join(d.dir, 'bg%d.npy' % i)
        r = get(d, i, out)
        if r.returncode == 0 and i in ref:
            a = np.load(out)
            assert a.dtype == ref[i].dtype and np.array_equal(a, ref[i]), i
            served += 1
    assert served >= len(ref) - 1
    deadline = time.monotonic() + 60
    while status_counters(d)['cache_unchecked_dirs'] and time.monotonic() < deadline:
        time.sleep(0.05)
    c = status_counters(d)
    assert c['cache_unchecked_dirs'] == 0, c
    log = d.log()
    m = re.search(r'background check of the cache done in [0-9.]+ s: \d+ director\(ies\) '
                  r'walked .*?(\d+) row\(s\) dropped', log)
    assert m and int(m.group(1)) == 1, [ln for ln in log.splitlines() if "background" in ln]
    disk = crashlib.blob_files(d.cache)  # nothing writes now
    assert c['cache_objects'] == len(disk), (c, len(disk))
    assert c['cache_bytes'] == sum(os.path.getsize(p) for p in disk.values())
    rc, _ = d.stop()
    assert rc == 0
    rows, _ = crashlib.check_consistent(d.cache)
    assert set(rows) >= set(rows0) - {gone}  # (a GET above may have fetched it again)

    # a stop while the check runs: it is finished before the record is written
    os.unlink(os.path.join(d.cache, RECORD))
    d.start()
    rc, _ = d.stop()
    assert rc == 0
    log = d.log()
    assert 'clean-shutdown record written' in log.rsplit('serving while', 1)[-1], log[-3000:]
    crashlib.check_consistent(d.cache)
    d.start()
    ok, walked, checked, line = start_path(d)
    assert ok and walked == 0 and not checked, line
    c = status_counters(d)
    disk = crashlib.blob_files(d.cache)
    assert c['cache_objects'] == len(disk), (c, len(disk))
    assert c['cache_bytes'] == sum(os.path.getsize(p) for p in disk.values())
