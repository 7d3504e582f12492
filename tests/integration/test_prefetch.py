"""Prefetching into the cache: the real daemon, the real CLI, the emulator over HTTP.

Each test starts its own daemon with an empty cache; the emulator (with the corpus) is
shared by the module and its faults are cleared between tests.
"""
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from conftest import DMCACHE, Daemon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'emulator'))
import client as emulator  # noqa: E402

KEY = emulator.KEY_ALL


@pytest.fixture(scope='module')
def emu():
    e = emulator.Emulator(synthetic=['syn:400:65536'])
    e.start()
    yield e
    assert e.stop() == 0


@pytest.fixture
def clean(emu):
    emu.clear_faults()
    emu.clear_log()
    yield emu
    emu.clear_faults()


def manifest(emu):
    with open(os.path.join(emu.corpus, 'manifest.json')) as f:
        return {e['resource_id']: e for e in json.load(f)['files'] if e.get('resource_id')}


def prefetch(d, emu, project, *args, key=KEY, timeout=180):
    env = dict(d.env, DATAMINT_API_KEY=key)
    env.pop('DATAMINT_API_URL', None)
    r = subprocess.run([DMCACHE, '--socket', d.socket, 'prefetch', '--json', '--server',
                        emu.url] + list(args) + [project], env=env, capture_output=True,
                       text=True, timeout=timeout)
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{')]
    return r.returncode, events, r.stderr


def final(events):
    done = [e for e in events if 'state' in e]
    return done[-1] if done else {}


def items_of(d):
    """(snapshot id, resource id, blob hex or None, etag) of every item; daemon stopped."""
    db = sqlite3.connect(os.path.join(d.cache, 'index.db'))
    try:
        return db.execute("SELECT key >> 32, resource_id, lower(hex(blob)), etag FROM items "
                          "ORDER BY key").fetchall(), \
            db.execute('PRAGMA integrity_check').fetchone()[0], \
            {r[0] for r in db.execute('SELECT lower(hex(digest)) FROM blobs')}
    finally:
        db.close()


def file_gets(emu, status=None, listener='main'):
    out = [e for e in emu.log() if e['method'] == 'GET' and e['path'].startswith('/resources/')
           and e['path'].endswith('/file') and e['listener'] == listener]
    return [e for e in out if status is None or e['status'] == status]


def stop(d):
    rc, _ = d.stop()
    assert rc == 0, d.log()


def test_full_prefetch_stores_exact_bytes(clean, tmpdir_short):
    emu = clean
    d = Daemon(tmpdir_short)
    rc, ev, err = prefetch(d, emu, 'sample')
    assert rc == 0, err
    f = final(ev)
    assert f['state'] == 'done' and f['items_total'] == 19 and f['items_done'] == 19
    assert f['items_failed'] == 0
    # progress events came before the end, with totals
    assert all(e['job_id'] == f['job_id'] for e in ev)
    r = d.cli('verify')
    assert r.returncode == 0 and 'all good' in r.stdout, r.stdout + r.stderr
    r = d.cli('ls', '--json')
    snaps = json.loads(r.stdout)
    snaps = snaps if isinstance(snaps, list) else snaps.get('snapshots', snaps)
    assert any(s['project_name'] == 'sample' and s['complete'] for s in snaps), r.stdout
    stop(d)
    items, check, blobs = items_of(d)
    assert check == 'ok'
    man = manifest(emu)
    assert len(items) == 19
    for snap, rid, blob, etag in items:
        # the content address of every stored payload is the source file's SHA-256
        assert blob == man[rid]['sha256'], rid
        assert blob in blobs
        assert etag
    # segmentation masks are stored too, linked to their items
    db = sqlite3.connect(os.path.join(d.cache, 'index.db'))
    n_masks = db.execute('SELECT count(*) FROM item_blobs').fetchone()[0]
    metas = [json.loads(m) for (m,) in db.execute('SELECT meta FROM items')]
    db.close()
    # one row per item and distinct mask content
    want = sum(len(set(m.get('mask_blobs', {}).values())) for m in metas)
    assert n_masks == want >= 4
    for m in metas:
        for aid, hexd in m.get('mask_blobs', {}).items():
            assert hexd in blobs


def test_second_prefetch_downloads_nothing(clean, tmpdir_short):
    emu = clean
    d = Daemon(tmpdir_short)
    assert prefetch(d, emu, 'sample')[0] == 0
    emu.clear_log()
    rc, ev, err = prefetch(d, emu, 'sample')
    assert rc == 0, err
    f = final(ev)
    assert f['items_done'] == 19 and f['items_cached'] == 19 and f['bytes_done'] == 0
    assert file_gets(emu) == []
    stop(d)


def test_dropped_connection_resumes_with_range(clean, tmpdir_short):
    emu = clean
    ct = emu.project('ct')
    big = max(emulator.request(emu.url, path='/projects/%s/resources' % ct['id'], key=KEY)
              .json(), key=lambda r: r['size'])
    path = '/resources/%s/file' % big['id']
    emu.add_fault(path='^%s$' % path, drop_after=100000, times=1)
    d = Daemon(tmpdir_short)
    rc, ev, err = prefetch(d, emu, 'ct')
    assert rc == 0, err
    gets = [e for e in file_gets(emu) if e['path'] == path]
    assert [g['status'] for g in gets] == [200, 206]
    assert gets[0]['bytes'] == 100000
    assert gets[1]['range'] == 'bytes=100000-' and gets[1]['if_range']
    # nothing delivered was sent twice
    assert gets[1]['bytes'] == big['size'] - 100000
    stop(d)
    items, check, _ = items_of(d)
    assert dict((rid, blob) for _, rid, blob, _ in items)[big['id']] == \
        manifest(emu)[big['id']]['sha256']


def test_ignored_range_restarts_the_body(clean, tmpdir_short):
    emu = clean
    ct = emu.project('ct')
    big = max(emulator.request(emu.url, path='/projects/%s/resources' % ct['id'], key=KEY)
              .json(), key=lambda r: r['size'])
    path = '/resources/%s/file' % big['id']
    emu.add_fault(path='^%s$' % path, drop_after=50000, times=1)
    emu.add_fault(path='^%s$' % path, ignore_range=True, times=1)
    d = Daemon(tmpdir_short)
    rc, ev, err = prefetch(d, emu, 'ct')
    assert rc == 0, err
    gets = [e for e in file_gets(emu) if e['path'] == path]
    assert [g['status'] for g in gets] == [200, 200]
    stop(d)
    items, _, _ = items_of(d)
    assert dict((rid, blob) for _, rid, blob, _ in items)[big['id']] == \
        manifest(emu)[big['id']]['sha256']


def test_retry_after_is_honoured(clean, tmpdir_short):
    emu = clean
    emu.add_fault(path='/resources/.*/file$', status=429, retry_after=2, times=1)
    d = Daemon(tmpdir_short)
    rc, ev, err = prefetch(d, emu, 'sample')
    assert rc == 0, err
    log = file_gets(emu)
    first = next(e for e in log if e['status'] == 429)
    again = [e for e in log if e['path'] == first['path'] and e['time'] > first['time']]
    assert again and again[0]['status'] == 200
    assert again[0]['time'] - first['time'] >= 2.0 - 0.05
    stop(d)


def test_retry_after_as_http_date(clean, tmpdir_short):
    emu = clean
    emu.add_fault(path='/resources/.*/file$', status=503, retry_after_date=2, times=1)
    d = Daemon(tmpdir_short)
    rc, ev, err = prefetch(d, emu, 'sample')
    assert rc == 0, err
    log = file_gets(emu)
    first = next(e for e in log if e['status'] == 503)
    again = [e for e in log if e['path'] == first['path'] and e['time'] > first['time']]
    # an HTTP date has whole seconds: at least one second later
    assert again and again[0]['time'] - first['time'] >= 1.0
    stop(d)


def test_503_backs_off_then_fails_clearly(clean, tmpdir_short):
    emu = clean
    res = emulator.request(emu.url, path='/projects/%s/resources' % emu.project('sample')['id'],
                           key=KEY).json()
    victim = res[0]['id']
    path = '/resources/%s/file' % victim
    emu.add_fault(path='^%s$' % path, status=503)
    d = Daemon(tmpdir_short, args=['-o', 'max_attempts=3', '-o', 'backoff_base=200ms',
                                   '-o', 'backoff_max=1s'])
    rc, ev, err = prefetch(d, emu, 'sample')
    assert rc == 1
    errs = [e for e in ev if e.get('error')]
    assert errs and errs[0]['error']['name'] == 'upstream_transient'
    assert errs[0]['error']['resource'] == victim
    f = final(ev)
    assert f['items_failed'] == 1 and f['items_done'] == 18
    tries = [e for e in file_gets(emu) if e['path'] == path]
    assert len(tries) == 3  # bounded attempts
    gaps = [b['time'] - a['time'] for a, b in zip(tries, tries[1:])]
    assert all(g >= 0.09 for g in gaps), gaps  # backoff, with jitter, never a storm
    stop(d)


def test_flipped_bytes_are_never_stored(clean, tmpdir_short):
    emu = clean
    res = emulator.request(emu.url, path='/projects/%s/resources' % emu.project('sample')['id'],
                           key=KEY).json()
    once, always = res[1]['id'], res[2]['id']
    emu.add_fault(path='^/resources/%s/file$' % once, flip_count=3, times=1)
    emu.add_fault(path='^/resources/%s/file$' % always, flip_count=3)
    d = Daemon(tmpdir_short, args=['-o', 'max_attempts=3'])
    rc, ev, err = prefetch(d, emu, 'sample')
    assert rc == 1
    errs = [e['error'] for e in ev if e.get('error')]
    assert {e['resource'] for e in errs} == {always}
    assert errs[0]['name'] == 'integrity'
    stop(d)
    items, check, blobs = items_of(d)
    by = {rid: blob for _, rid, blob, _ in items}
    man = manifest(emu)
    assert by[once] == man[once]['sha256']
    assert by[always] is None or by[always] not in blobs
    # no blob in the store holds the corrupted bytes: every one is a corpus file's content
    with open(os.path.join(emu.corpus, 'manifest.json')) as f:
        genuine = {e['sha256'] for e in json.load(f)['files']}
    assert blobs and all(b in genuine for b in blobs), blobs - genuine
    assert len([e for e in file_gets(emu) if always in e['path']]) == 3


def test_wrong_content_length_is_retried(clean, tmpdir_short):
    emu = clean
    res = emulator.request(emu.url, path='/projects/%s/resources' % emu.project('sample')['id'],
                           key=KEY).json()
    victim = res[3]['id']
    emu.add_fault(path='^/resources/%s/file$' % victim, content_length_delta=100, times=1)
    d = Daemon(tmpdir_short)
    rc, ev, err = prefetch(d, emu, 'sample')
    assert rc == 0, err
    stop(d)
    items, _, _ = items_of(d)
    assert dict((rid, b) for _, rid, b, _ in items)[victim] == manifest(emu)[victim]['sha256']


def test_trickle_is_aborted_and_others_go_on(clean, tmpdir_short):
    emu = clean
    res = emulator.request(emu.url, path='/projects/%s/resources' % emu.project('sample')['id'],
                           key=KEY).json()
    victim = res[4]['id']
    emu.add_fault(path='^/resources/%s/file$' % victim, rate_bps=1, times=1)
    d = Daemon(tmpdir_short, args=['-o', 'low_speed_time=2s', '-o', 'low_speed_limit=1000'])
    t0 = time.monotonic()
    rc, ev, err = prefetch(d, emu, 'sample')
    took = time.monotonic() - t0
    assert rc == 0, err
    assert took < 15
    # the trickling request is logged once the emulator notices the closed connection
    deadline = time.monotonic() + 20
    while len([e for e in file_gets(emu) if victim in e['path']]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    tries = sorted([e for e in file_gets(emu) if victim in e['path']], key=lambda e: e['time'])
    assert len(tries) == 2 and tries[1]['status'] == 200
    # the others finished while the trickle was still going
    others = [e for e in file_gets(emu) if victim not in e['path']]
    assert max(e['time'] for e in others) < tries[1]['time']
    stop(d)


def test_bad_key_and_unknown_project_fail_without_retries(clean, tmpdir_short):
    emu = clean
    d = Daemon(tmpdir_short)
    rc, ev, err = prefetch(d, emu, 'sample', key='no-such-key')
    assert rc == 1
    assert 'not_found_or_denied' in err or 'not found' in err.lower(), err
    # one refused request: a 401 is never retried (a late entry of an earlier test's
    # connections does not count)
    assert len([e for e in emu.log() if e['listener'] == 'main' and e['status'] == 401]) == 1
    emu.clear_log()
    rc, ev, err = prefetch(d, emu, 'no-such-project')
    assert rc == 1 and 'not found' in err.lower(), err
    # a key that may not see the project gets the same answer as a missing project
    rc2, ev2, err2 = prefetch(d, emu, 'ct', key=emulator.KEY_SAMPLE)
    assert rc2 == 1 and 'not found' in err2.lower()
    stop(d)


def test_redirect_to_another_host_gets_no_key(clean, tmpdir_short):
    emu = clean
    emu.add_fault(path='/resources/.*/file$', redirect=True)
    d = Daemon(tmpdir_short)
    rc, ev, err = prefetch(d, emu, 'sample')
    assert rc == 0, err
    there = [e for e in emu.log() if e['listener'] == 'redirect']
    assert len(there) >= 19 and all(e['path'].startswith('/_r/') for e in there)
    for e in there:
        assert 'apikey' not in e['headers'] and 'authorization' not in e['headers']
        assert e['auth'] in (None, 'none', '')
    here = [e for e in emu.log() if e['listener'] == 'main']
    assert all('apikey' in e['headers'] for e in here)
    stop(d)
    items, _, _ = items_of(d)
    man = manifest(emu)
    assert all(b == man[rid]['sha256'] for _, rid, b, _ in items)


def test_corrupt_blob_is_detected_and_fetched_again(clean, tmpdir_short):
    emu = clean
    d = Daemon(tmpdir_short)
    assert prefetch(d, emu, 'sample')[0] == 0
    stop(d)
    items, _, _ = items_of(d)
    rid, blob = items[0][1], items[0][2]
    path = os.path.join(d.cache, 'objects', blob[:2], blob)
    data = bytearray(open(path, 'rb').read())
    data[-1] ^= 0xff
    open(path, 'wb').write(data)
    d.start()
    r = d.cli('verify')
    assert r.returncode != 0 or '1 bad' in r.stdout or 'bad' in r.stdout, r.stdout
    emu.clear_log()
    rc, ev, err = prefetch(d, emu, 'sample')
    assert rc == 0, err
    assert [e['path'] for e in file_gets(emu, 200) if '/resources/' in e['path']] == \
        ['/resources/%s/file' % rid]
    r = d.cli('verify')
    assert r.returncode == 0 and 'all good' in r.stdout
    stop(d)


def test_changed_project_downloads_only_the_difference(clean, tmpdir_short):
    emu = clean
    d = Daemon(tmpdir_short)
    rc, ev, _ = prefetch(d, emu, 'sample')
    assert rc == 0
    v1 = final(ev)['version']
    res = emulator.request(emu.url, path='/projects/%s/resources' % emu.project('sample')['id'],
                           key=KEY).json()
    changed = res[5]['id']
    emu.mutate(changed)
    new = emu.upload('extra.png', open(os.path.join(emu.corpus, 'projects', 'sample', 'files',
                                                    sorted(os.listdir(os.path.join(
                                                        emu.corpus, 'projects', 'sample',
                                                        'files')))[0]), 'rb').read(),
                     'image/png', bypass_inbox='true')
    new_id = new.json()['id']
    emulator.request(emu.url, method='POST', path='/projects/%s/resources'
                     % emu.project('sample')['id'], key=KEY,
                     json_body={'resource_ids_to_add': [new_id], 'all_files_selected': False})
    emu.clear_log()
    rc, ev, err = prefetch(d, emu, 'sample')
    assert rc == 0, err
    f = final(ev)
    assert f['version'] != v1
    full = sorted(e['path'] for e in file_gets(emu, 200))
    assert full == sorted(['/resources/%s/file' % changed, '/resources/%s/file' % new_id])
    assert len(file_gets(emu, 304)) == 18  # the rest revalidated, not downloaded
    r = d.cli('ls', '--json')
    assert r.stdout.count('"sample"') >= 2  # the older snapshot stays until evicted
    stop(d)
    emu.reset()


def test_kill9_during_prefetch(clean, tmpdir_short):
    """kill -9 at random moments, 20 times: the index stays sound, blobs verify, and the
    prefetch completes without downloading finished items again."""
    emu = clean
    emu.add_fault(path='/resources/.*/file$', rate_bps=4 << 20)  # slow enough to interrupt
    d = Daemon(tmpdir_short)
    rng = random.Random(7)
    env = dict(d.env, DATAMINT_API_KEY=KEY)
    for i in range(20):
        cli = subprocess.Popen([DMCACHE, '--socket', d.socket, 'prefetch', '--json',
                                '--server', emu.url, 'syn'], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 0.6))
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        cli.wait(10)
        db = sqlite3.connect(os.path.join(d.cache, 'index.db'))
        assert db.execute('PRAGMA integrity_check').fetchone()[0] == 'ok'
        db.close()
        d.start()
    emu.clear_faults()
    done_before = set()
    stop(d)
    items, check, blobs = items_of(d)
    assert check == 'ok'
    done_before = {rid for _, rid, b, _ in items if b and b in blobs}
    d.start()
    r = d.cli('verify')
    assert r.returncode == 0 and 'all good' in r.stdout, r.stdout
    emu.clear_log()
    rc, ev, err = prefetch(d, emu, 'syn')
    assert rc == 0, err
    assert final(ev)['items_done'] == 400
    again = {e['path'].split('/')[2] for e in file_gets(emu, 200)}
    assert not (again & done_before), 'finished items were downloaded again'
    stop(d)


def test_disk_full_then_space_freed(clean, tmpdir_short):
    __import__('uids').require_root()  # CI is root: there it fails rather than skips
    emu = clean
    mnt = os.path.join(tmpdir_short, 'small')
    os.mkdir(mnt)
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', mnt])
    assert r.returncode == 0, 'cannot mount a tmpfs as root'
    try:
        d = Daemon(tmpdir_short, args=['--cache-dir', os.path.join(mnt, 'cache'),
                                       '-o', 'min_free=0'])
        d.cache = os.path.join(mnt, 'cache')
        rc, ev, err = prefetch(d, emu, 'ct', '--allow-partial')  # 22 MiB into 8 MiB
        assert rc == 1
        codes = {e['error']['name'] for e in ev if e.get('error')}
        assert codes == {'cache_full'}, codes
        # no half-written blob: a writer aborted by the job's end may still be removing
        # its temp file when the last event goes out
        deadline = time.monotonic() + 10
        while os.listdir(os.path.join(d.cache, 'tmp')) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.listdir(os.path.join(d.cache, 'tmp')) == []
        r = d.cli('verify')
        assert r.returncode == 0 and 'all good' in r.stdout
        rc, ev, err = prefetch(d, emu, 'sample')  # what fits still works
        stop(d)
        subprocess.run(['mount', '-o', 'remount,size=64m', mnt], check=True)
        d.start()
        rc, ev, err = prefetch(d, emu, 'ct')
        assert rc == 0, err
        assert final(ev)['items_done'] == 72
        stop(d)
    finally:
        subprocess.run(['umount', '-l', mnt])


def test_two_jobs_share_one_download(clean, tmpdir_short):
    emu = clean
    emu.add_fault(path='/resources/.*/file$', latency_ms=300)
    d = Daemon(tmpdir_short)
    env_a = dict(d.env, DATAMINT_API_KEY=KEY)
    env_b = dict(d.env, DATAMINT_API_KEY=emulator.KEY_SAMPLE)
    cmd = [DMCACHE, '--socket', d.socket, 'prefetch', '--json', '--server', emu.url, 'sample']
    a = subprocess.Popen(cmd, env=env_a, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    b = subprocess.Popen(cmd, env=env_b, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert a.wait(120) == 0 and b.wait(120) == 0
    n = len(emulator.request(emu.url, path='/projects/%s/resources'
                             % emu.project('sample')['id'], key=KEY).json())
    paths = [e['path'] for e in file_gets(emu, 200)]
    assert len(paths) == len(set(paths)) == n  # each resource downloaded once
    # the second user's key was still checked for every item it did not download itself
    assert len(file_gets(emu)) - len(paths) == len(file_gets(emu, 304))
    stop(d)


def test_tls_verified_never_bypassed(tmpdir_short):
    """An untrusted certificate fails at once (no retry, no insecure fallback); with the
    CA configured the same server works, redirects included."""
    import trustme
    ca = trustme.CA()
    cert = ca.issue_cert('127.0.0.1', '127.0.0.2')
    pem = os.path.join(tmpdir_short, 'server.pem')
    cert.private_key_and_cert_chain_pem.write_to_path(pem)
    ca_file = os.path.join(tmpdir_short, 'ca.pem')
    ca.cert_pem.write_to_path(ca_file)
    with emulator.Emulator(extra_args=['--tls-cert', pem, '--tls-key', pem]) as emu:
        assert emu.url.startswith('https://')
        d = Daemon(tmpdir_short)
        t0 = time.monotonic()
        rc, ev, err = prefetch(d, emu, 'sample')
        assert rc == 1 and 'TLS' in err and 'upstream_permanent' in err, err
        assert time.monotonic() - t0 < 3  # not retried
        assert [e for e in emu.log() if e['listener'] == 'main'] == []
        stop(d)
        second = os.path.join(tmpdir_short, 'b')
        os.mkdir(second)
        d = Daemon(second, args=['-o', 'ca_file=' + ca_file])
        emu.add_fault(path='/resources/.*/file$', redirect=True)
        rc, ev, err = prefetch(d, emu, 'sample')
        assert rc == 0, err
        assert len([e for e in emu.log() if e['listener'] == 'redirect']) >= 19
        stop(d)


def test_key_is_never_written_anywhere(clean, tmpdir_short):
    """The key reaches no file of the cache, no log line and no STATUS (docs/reliability.md S5)."""
    emu = clean
    d = Daemon(tmpdir_short, args=['--debug', 'all'])
    emu.add_fault(path='/resources/.*/file$', drop_after=1000, times=2)
    assert prefetch(d, emu, 'sample')[0] == 0
    status = d.cli('status', '--json').stdout
    stop(d)
    needles = [KEY.encode(), KEY.encode().hex().encode(),
               __import__('base64').b64encode(KEY.encode())]
    for n in needles:
        assert n not in status.encode()
        assert n not in open(d.stderr_path, 'rb').read()
    for dirpath, _, files in os.walk(d.cache):
        for name in files:
            data = open(os.path.join(dirpath, name), 'rb').read()
            for n in needles:
                assert n not in data, os.path.join(dirpath, name)


def test_max_object_is_enforced(clean, tmpdir_short):
    emu = clean
    d = Daemon(tmpdir_short, args=['-o', 'max_object=100K'])
    rc, ev, err = prefetch(d, emu, 'ct')
    assert rc == 1
    errs = {e['error']['name'] for e in ev if e.get('error')}
    assert errs == {'limit_exceeded'}, errs
    stop(d)
    # nothing larger than the limit was stored
    db = sqlite3.connect(os.path.join(d.cache, 'index.db'))
    sizes = [r[0] for r in db.execute('SELECT raw_size FROM blobs')]
    db.close()
    assert all(s <= 100 * 1024 for s in sizes)


def test_max_size_bounds_the_cache(clean, tmpdir_short):
    emu = clean
    limit = 8 << 20
    d = Daemon(tmpdir_short, args=['-o', 'max_size=8M', '-o', 'min_free=0'])
    # 22 MiB do not fit in 8: refused with the numbers unless a partial snapshot is asked
    rc, ev, err = prefetch(d, emu, 'ct')
    assert rc == 1 and final(ev)['error']['name'] == 'cache_full', ev[-1:]
    rc, ev, err = prefetch(d, emu, 'ct', '--allow-partial')
    f = final(ev)
    st = json.loads(d.cli('status', '--json').stdout)['counters']
    assert st['cache_bytes'] <= limit
    # the job never evicts its own items: what it stored is still there, the rest failed
    assert 0 < f['items_done'] < f['items_total'] and f['items_failed'] > 0, f
    assert st['cache_evicted_total'] == 0
    total = 0
    for dirpath, _, files in os.walk(os.path.join(d.cache, 'objects')):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    assert total <= limit
    assert d.cli('verify').returncode == 0
    stop(d)


@pytest.mark.skipif(not __import__('shutil').which('strace'), reason='needs strace')
def test_fsync_eio_fails_items_cleanly(clean, tmpdir_short):
    """docs/reliability.md C4: a blob whose fsync fails is not published; its item fails with io,
    no temp file is left, the daemon goes on, and the items come once fsync works."""
    emu = clean
    d = Daemon(tmpdir_short, start=False)
    d.env['UV_THREADPOOL_SIZE'] = '1'
    # LeakSanitizer cannot run under ptrace: in a sanitizer build, leaks are checked by the
    # other tests
    d.env['ASAN_OPTIONS'] = (d.env.get('ASAN_OPTIONS', '') + ':detect_leaks=0').lstrip(':')
    # every fsync from the third on (per thread) fails: the first blob goes through, later
    # ones cannot be made durable. sync_full=no keeps the index from syncing in this short
    # run, so that only blob writes meet the failure.
    d.proc = subprocess.Popen(
        ['strace', '-f', '-qq', '-o', '/dev/null', '-e', 'trace=fsync',
         '-e', 'inject=fsync:error=EIO:when=3+', os.path.realpath(
             __import__('conftest').DMCACHED)] + d.args + ['-o', 'parallel_transfers=1',
                                                           '-o', 'sync_full=no'],
        env=d.env, stdout=open(d.stderr_path, 'ab'), stderr=subprocess.STDOUT)
    assert d.notify.wait_for('READY=1', timeout=30, proc=d.proc), d.log()
    rc, ev, err = prefetch(d, emu, 'sample')
    errs = [e['error'] for e in ev if e.get('error')]
    f = final(ev)
    assert rc == 1 and errs and f['items_failed'] >= 1, (rc, f, err)
    assert {e['name'] for e in errs} == {'io'}, errs
    n = f['items_total']  # 19, or 20 after test_changed_project added one
    assert n >= 19 and f['items_done'] + f['items_failed'] == n
    assert os.listdir(os.path.join(d.cache, 'tmp')) == []  # nothing half-written is left
    # strace does not pass SIGTERM on: stop the daemon itself (READY=1 named its pid)
    pid = next(int(l.split('=')[1]) for m in d.notify.messages for l in m.split('\n')
               if l.startswith('MAINPID='))
    os.kill(pid, signal.SIGTERM)
    assert d.proc.wait(30) == 0, d.log()  # strace exits with the daemon's status
    # the same cache, fsync working again: the failed items come, the rest is kept
    d.env.pop('UV_THREADPOOL_SIZE')
    d.start()
    emu.clear_log()
    rc, ev, err = prefetch(d, emu, 'sample')
    assert rc == 0, err
    assert final(ev)['items_done'] == n
    assert len(file_gets(emu, 200)) == f['items_failed']
    r = d.cli('verify')
    assert r.returncode == 0 and 'all good' in r.stdout, r.stdout
    stop(d)
