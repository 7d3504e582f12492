"""An honest cache under pressure: admission with numbers, no self-eviction, counts that
agree (the job's summary, `dmcache ls`, the index), and eviction that is logged.

The real daemon and CLI, the emulator over HTTP; the small file system is a real tmpfs
(root, as CI runs).
"""
import json
import os
import re
import sqlite3
import subprocess
import sys

import pytest

import uids
from conftest import DMCACHE, Daemon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'emulator'))
import client as emulator  # noqa: E402

KEY = emulator.KEY_ALL
MiB = 1 << 20


def prefetch(d, emu, project, *args):
    env = dict(d.env, DATAMINT_API_KEY=KEY)
    env.pop('DATAMINT_API_URL', None)
    r = subprocess.run([DMCACHE, '--socket', d.socket, 'prefetch', '--json', '--server',
                        emu.url] + list(args) + [project], env=env, capture_output=True,
                       text=True, timeout=300)
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{')]
    return r, events


def final(events):
    done = [e for e in events if 'state' in e]
    return done[-1] if done else {}


def ls(d):
    r = d.cli('ls', '--json')
    assert r.returncode == 0, r.stderr
    return {s['project_name']: s for s in json.loads(r.stdout)}


def stored_rows(d, snapshot_id):
    """Items of a snapshot whose blob row exists; the daemon must be stopped."""
    db = sqlite3.connect(os.path.join(d.cache, 'index.db'))
    try:
        return db.execute('SELECT count(*) FROM items AS i JOIN blobs AS b ON b.digest = '
                          'i.blob WHERE (i.key >> 32) = ?', (snapshot_id,)).fetchone()[0]
    finally:
        db.close()


def file_gets(emu):
    return [e for e in emu.log() if e['path'].endswith('/file') and e['status'] == 200]


def test_admission_refuses_with_numbers_and_partial_is_honest(emu, tmpdir_short):
    d = Daemon(tmpdir_short, args=['-o', 'max_size=10M', '-o', 'min_free=0'])
    r, ev = prefetch(d, emu, 'sample')
    assert r.returncode == 0 and final(ev)['state'] == 'done', r.stdout + r.stderr
    sample = final(ev)
    r, ev = prefetch(d, emu, 'ct')
    assert r.returncode != 0
    err = final(ev).get('error', {})
    assert err.get('name') == 'cache_full', ev[-1:]
    msg = err.get('message', '')
    assert "'ct' needs" in msg and 'max_size is 10.0 MiB' in msg and \
        'held by other snapshots' in msg, msg
    assert 'HTTP' not in r.stderr
    # nothing was downloaded, nothing evicted: sample is whole
    snaps = ls(d)
    assert snaps['sample']['complete'] and snaps['sample']['items_stored'] == sample['items_total']
    # --allow-partial: what fits is stored; the job never evicts its own items, the other
    # snapshot goes first (logged), and every count agrees
    r, ev = prefetch(d, emu, 'ct', '--allow-partial')
    fin = final(ev)
    assert fin['state'] in ('done', 'failed'), ev[-1:]
    assert fin['items_done'] > 0 and fin['items_done'] + fin['items_failed'] == fin['items_total']
    assert fin['bytes_done'] <= fin['bytes_total']
    if fin['items_failed']:
        assert 'max_size' in fin['error']['message'], fin['error']
    snaps = ls(d)
    assert snaps['ct']['items_stored'] == fin['items_done'], (snaps['ct'], fin)
    log = d.log()
    # what an operator reads at the default level: each job's start and end with its
    # figures, the refusal, the eviction (what and why), the cache full warning
    assert "prefetches 'ct' version 'latest'" in log and "job=" in log, log[-3000:]
    assert "items stored" in log and "bytes downloaded in" in log, log[-3000:]
    assert 'refused: ' in log and "'ct' needs" in log, log[-3000:]
    assert 'evicted' in log and 'the least recently used' in log, log[-3000:]
    if fin['items_failed']:
        assert 'warning[store]: job' in log and 'cache full' in log, log[-3000:]
    assert d.stop()[0] == 0
    assert stored_rows(d, fin['snapshot_id']) == fin['items_done']


@pytest.fixture
def small_fs(tmpdir_short):
    uids.require_root()
    mnt = os.path.join(tmpdir_short, 'fs')
    os.makedirs(mnt)
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=15m,mode=0700', 'tmpfs', mnt],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(['umount', '-l', mnt], check=False)


def test_a_full_file_system_counts_what_is_stored(emu, tmpdir_short, small_fs):
    d = Daemon(tmpdir_short, args=['--cache-dir', os.path.join(small_fs, 'cache'),
                                   '-o', 'min_free=0'])
    d.cache = os.path.join(small_fs, 'cache')
    r, ev = prefetch(d, emu, 'ct', '--allow-partial')
    fin = final(ev)
    assert fin['items_done'] < fin['items_total'], fin  # 22 MiB do not fit in 15
    assert fin['items_done'] > 0
    snaps = ls(d)
    assert snaps['ct']['items_stored'] == fin['items_done'], (snaps['ct'], fin)
    assert 'cache full' in fin['error']['message'] and 'HTTP' not in r.stderr, fin
    sid = fin['snapshot_id']
    assert d.stop()[0] == 0
    assert stored_rows(d, sid) == fin['items_done']
    # more room: the next prefetch downloads only what is missing
    subprocess.run(['mount', '-o', 'remount,size=64m', small_fs], check=True)
    emu.clear_log()
    d.start()
    r, ev = prefetch(d, emu, 'ct')
    fin2 = final(ev)
    assert r.returncode == 0 and fin2['items_done'] == fin2['items_total'], r.stderr
    assert len(file_gets(emu)) == fin2['items_total'] - fin['items_done']
    assert d.stop()[0] == 0


def test_the_default_min_free_is_named_when_it_is_the_cause(emu, tmpdir_short, small_fs):
    d = Daemon(tmpdir_short, args=['--cache-dir', os.path.join(small_fs, 'cache')])
    r, ev = prefetch(d, emu, 'sample')
    assert r.returncode != 0
    msg = final(ev).get('error', {}).get('message', '') + r.stderr
    assert 'min_free is 1.0 GiB' in msg, msg
    assert d.stop()[0] == 0


def test_a_start_over_max_size_names_each_snapshot_it_evicts_from(emu, tmpdir_short):
    """max_size lowered while the daemon was stopped: the start evicts (I3) before serving,
    and says which snapshots lost files, as a running daemon does; `ls` agrees."""
    d = Daemon(tmpdir_short, args=['-o', 'min_free=0'])
    r, ev = prefetch(d, emu, 'sample')
    assert r.returncode == 0 and final(ev)['state'] == 'done', r.stdout + r.stderr
    r, ev = prefetch(d, emu, 'xray')
    assert r.returncode == 0 and final(ev)['state'] == 'done', r.stdout + r.stderr
    assert d.stop()[0] == 0
    # room for about two thirds of what is stored: some snapshot must lose files
    held = sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(os.path.join(d.cache, 'objects')) for f in files)
    d.args += ['-o', 'max_size=%d' % (held * 2 // 3)]
    before = len(d.log())
    d.start()
    log = d.log()[before:]
    named = {}
    for line in log.splitlines():
        if 'at start to get back within max_size' in line:
            m = re.search(r"evicting (\d+) files \(.*\) of snapshot (\d+) \('(\w+)'", line)
            assert m, line
            named[m.group(3)] = (int(m.group(2)), int(m.group(1)))
    assert named, log[-3000:]
    snaps = ls(d)
    for name, (sid, files) in named.items():
        assert snaps[name]['id'] == sid
        assert snaps[name]['items_stored'] < snaps[name]['items']
    # no snapshot lost items without being named
    for name, s in snaps.items():
        if name not in named:
            assert s['items_stored'] == s['items'], (name, s, log[-3000:])
    assert d.stop()[0] == 0
