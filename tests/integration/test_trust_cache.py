"""The shared cache's trust boundary, written as the attacks: two real local users.

The daemon runs as root, as the system service does. alice (uid 61001) holds a key for
the corpus project `ct`; bob (uid 61002) is the attacker. Each test asserts that bob gets
an error and not one byte of alice's data, names or validators; and that what a user is
entitled to still works, from the cache, with the server gone (offline reads).
"""
import hashlib
import http.server
import json
import os
import socketserver
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

import uids
from conftest import BUILD, DMCACHE, Daemon
from uids import ALICE, BOB

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'emulator'))
import client as emulator  # noqa: E402

PYTHONPATH = os.path.join(BUILD, 'client', 'python')


@pytest.fixture
def tmp(tmpdir_short):
    uids.require_root()
    os.chmod(tmpdir_short, 0o755)
    for uid, name in ((ALICE, 'alice'), (BOB, 'bob')):
        uids.owned_dir(os.path.join(tmpdir_short, name), uid)
    yield tmpdir_short


def system_daemon(tmp, *args):
    """dmcached as the system service runs it: root, a socket everyone may reach."""
    d = Daemon(tmp, args=list(args))
    uids.open_up(os.path.dirname(d.socket))
    return d


def user_env(key=None, **extra):
    env = {'PATH': os.environ.get('PATH', '/usr/bin:/bin'), 'HOME': '/nonexistent',
           'PYTHONPATH': PYTHONPATH, 'LANG': 'C.UTF-8'}
    if key:
        env['DATAMINT_API_KEY'] = key
    env.update(extra)
    return env


def cli(d, uid, *args, key=None, timeout=120, **extra):
    return uids.run(uid, [DMCACHE, '--socket', d.socket] + list(args),
                    env=user_env(key, **extra), timeout=timeout)


def prefetch(d, uid, server, project, *args, key=None, timeout=180):
    r = cli(d, uid, 'prefetch', '--json', '--server', server, *args, project, key=key,
            timeout=timeout)
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{')]
    return r, events


def final(events):
    done = [e for e in events if 'state' in e]
    return done[-1] if done else {}


def ls(d, uid):
    r = cli(d, uid, 'ls', '--json')
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def index_rows(d, sql):
    """Rows of the index; the daemon must be stopped (it holds an exclusive lock)."""
    db = sqlite3.connect(os.path.join(d.cache, 'index.db'))
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def blobs_of(d, owner):
    return {r[0] for r in index_rows(
        d, 'SELECT lower(hex(i.blob)) FROM items AS i JOIN snapshots AS s ON s.id = '
           '(i.key >> 32) WHERE s.owner = %d AND i.blob IS NOT NULL' % owner)}


def corpus_files(emu, project):
    with open(os.path.join(emu.corpus, 'manifest.json')) as f:
        files = json.load(f)['files']
    return [e for e in files if e.get('project') == project and e.get('resource_id')]


# ---- a server of bob's choosing ---------------------------------------------------------

class HostileServer:
    """Bob's own HTTP server. It lists alice's project as the real server does (bob learned
    the resource ids and sizes), answers 304 to every conditional request, hoping the
    daemon links what alice stored, and zeros otherwise. It records every request's
    headers: alice's ETags must never reach it."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.requests.append((self.path, dict(self.headers.items())))
                path = self.path.split('?')[0]
                if path.startswith('/resources/') and path.endswith('/file'):
                    inm = self.headers.get('If-None-Match')
                    if inm:
                        self.send_response(304)
                        self.send_header('ETag', inm)
                        self.send_header('Content-Length', '0')
                        self.end_headers()
                        return
                    size = outer.size_of(path)
                    self.send_response(200)
                    self.send_header('Content-Length', str(size))
                    self.send_header('ETag', '"bob-%s"' % path.split('/')[2])
                    self.end_headers()
                    self.wfile.write(b'\0' * size)
                    return
                req = urllib.request.Request(outer.upstream + self.path,
                                             headers={'apikey': emulator.KEY_ALL})
                try:
                    with urllib.request.urlopen(req, timeout=10) as r:
                        body, status = r.read(), r.status
                        ctype = r.headers.get('Content-Type', 'application/json')
                except urllib.error.HTTPError as e:
                    body, status, ctype = e.read(), e.code, 'application/json'
                self.send_response(status)
                self.send_header('Content-Type', ctype)
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.httpd = Server(('127.0.0.1', 0), Handler)
        self.url = 'http://127.0.0.1:%d' % self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def size_of(self, path):
        req = urllib.request.Request(self.upstream + path, headers={'apikey': emulator.KEY_ALL})
        with urllib.request.urlopen(req, timeout=10) as r:
            return len(r.read())

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_hostile_server_gets_no_etag_and_links_nothing(emu, tmp):
    d = system_daemon(tmp)
    r, ev = prefetch(d, ALICE, emu.url, 'ct', key=emulator.KEY_CT)
    assert r.returncode == 0 and final(ev)['state'] == 'done', r.stdout + r.stderr
    alice_etags = set()
    for e in corpus_files(emu, 'ct'):
        got = emu.get('/resources/%s/file' % e['resource_id'], key=emulator.KEY_ALL)
        alice_etags.add(got.headers.get('ETag'))
    with HostileServer(emu.url) as bob_server:
        r, ev = prefetch(d, BOB, bob_server.url, 'ct', key='bobs-own-key')
        files = [h for p, h in bob_server.requests if p.split('?')[0].endswith('/file')]
        assert files, 'bob\'s server saw no file request:\n' + r.stdout + r.stderr
        sent = {h.get('If-None-Match') for p, h in bob_server.requests} - {None}
        assert not sent, 'validators sent to a server of bob\'s choosing: %r' % sent
        assert not (sent & alice_etags)
        # bob's items are his server's zeros: decoding them fails, never alice's pixels
        out = os.path.join(tmp, 'bob', 'x.npy')
        g = cli(d, BOB, 'get', '--server', bob_server.url, 'ct', '0', '-o', out,
                key='bobs-own-key')
        if g.returncode == 0:
            alice_out = os.path.join(tmp, 'alice', 'x.npy')
            a = cli(d, ALICE, 'get', '--server', emu.url, 'ct', '0', '-o', alice_out,
                    key=emulator.KEY_CT)
            assert a.returncode == 0, a.stderr
            assert open(out, 'rb').read() != open(alice_out, 'rb').read()
    mine = ls(d, BOB)
    assert all(s['owner_uid'] == BOB for s in mine)
    assert all(s['server'] != emu.url for s in mine), 'bob lists alice\'s snapshot'
    assert d.stop()[0] == 0
    shared = blobs_of(d, BOB) & blobs_of(d, ALICE)
    assert not shared, 'bob\'s snapshot links %d of alice\'s blobs' % len(shared)


def test_a_configured_server_shares_only_on_the_users_own_proof(emu, tmp):
    d = system_daemon(tmp, '-o', 'servers=' + emu.url)
    r, ev = prefetch(d, ALICE, emu.url, 'ct', key=emulator.KEY_ALL)
    assert r.returncode == 0 and final(ev)['state'] == 'done', r.stdout + r.stderr
    n = final(ev)['items_total']
    # bob's key does not open ct: nothing, not even a revalidation, is done for him
    emu.clear_log()
    r, ev = prefetch(d, BOB, emu.url, 'ct', key=emulator.KEY_NONE)
    assert r.returncode != 0
    assert 'ct' not in json.dumps(ls(d, BOB))
    assert not [e for e in emu.log() if e['path'].endswith('/file')]
    # with a key that opens ct (carol's), bob's items are alice's bytes only because the
    # server answered 304 to his own key: one conditional request per file, no body
    emu.clear_log()
    r, ev = prefetch(d, BOB, emu.url, 'ct', key=emulator.KEY_CT)
    assert r.returncode == 0 and final(ev)['items_done'] == n, r.stdout + r.stderr
    gets = [e for e in emu.log() if e['path'].endswith('/file')]
    assert len(gets) == n and all(e['status'] == 304 and e['user'] == 'carol@example.org'
                                  and 'if-none-match' in e['headers'] for e in gets), gets
    assert d.stop()[0] == 0


def test_snapshot_ids_are_never_reused_and_eviction_is_per_owner(emu, tmp):
    d = system_daemon(tmp)
    r, ev = prefetch(d, BOB, emu.url, 'sample', key=emulator.KEY_SAMPLE)
    assert r.returncode == 0, r.stderr
    bob_id = final(ev)['snapshot_id']
    r = cli(d, BOB, 'evict', 'sample')
    assert r.returncode == 0, r.stderr
    r, ev = prefetch(d, ALICE, emu.url, 'ct', key=emulator.KEY_CT)
    assert r.returncode == 0, r.stderr
    alice_id = final(ev)['snapshot_id']
    assert alice_id != bob_id and alice_id > bob_id
    assert ls(d, BOB) == []
    # bob evicts everything he may: alice's snapshot stays whole
    r = cli(d, BOB, 'evict', '--all')
    r = cli(d, BOB, 'evict', 'ct')
    mine = ls(d, ALICE)
    assert [s['id'] for s in mine] == [alice_id] and mine[0]['complete'], mine
    out = os.path.join(tmp, 'alice', 'x.npy')
    r = cli(d, ALICE, 'get', '--server', emu.url, 'ct', '0', '-o', out, key=emulator.KEY_CT)
    assert r.returncode == 0, r.stderr
    # root sees every snapshot with its owner
    r = d.cli('ls', '--json')
    assert [(s['id'], s['owner_uid']) for s in json.loads(r.stdout)] == [(alice_id, ALICE)]
    assert d.stop()[0] == 0
    assert index_rows(d, 'SELECT uid, snapshot_id FROM grants') == [(ALICE, alice_id)]


def test_status_and_verify_are_per_user(emu, tmp):
    d = system_daemon(tmp)
    r, ev = prefetch(d, ALICE, emu.url, 'ct', key=emulator.KEY_CT)
    assert r.returncode == 0, r.stderr
    r = cli(d, BOB, 'status', '--json')
    assert r.returncode == 0, r.stderr
    counters = json.loads(r.stdout)['counters']
    for global_figure in ('cache_bytes', 'cache_objects', 'download_bytes_total',
                          'prefetch_jobs_total', 'connections', 'users_connected'):
        assert global_figure not in counters, counters
    assert counters['user_snapshots'] == 0 and counters['user_bytes_stored'] == 0
    a = json.loads(cli(d, ALICE, 'status', '--json').stdout)['counters']
    assert a['user_snapshots'] == 1 and a['user_items_stored'] == final(ev)['items_total']
    r = cli(d, BOB, 'verify')
    assert r.returncode != 0 and 'for root and members of' in r.stderr, r.stderr
    r = d.cli('verify')
    assert r.returncode == 0, r.stderr
    root = json.loads(d.cli('status', '--json').stdout)['counters']
    assert root['cache_objects'] > 0
    assert d.stop()[0] == 0


# ---- offline reads -----------------------------------------------------------------------

def asan_runtime():
    """The ASan runtime libdmcache links to in a sanitised build: the interpreter must load
    it first (as tests/python's meson.build arranges for its own tests)."""
    lib = os.path.join(BUILD, 'client', 'libdmcache.so')
    r = subprocess.run(['ldd', lib], capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if 'libasan.so' in line and '=>' in line:
            return line.split('=>')[1].split()[0]
    return None


def asan_preload(env):
    """`env` for a Python process that loads libdmcache: in a sanitised build, with the
    ASan runtime preloaded (leak checks off: the interpreter's own allocations)."""
    rt = asan_runtime()
    if rt:
        env['LD_PRELOAD'] = rt
        env['ASAN_OPTIONS'] = 'detect_leaks=0'
    return env


def python_epoch(d, uid, code, key=None, **extra):
    env = asan_preload(user_env(key, DMCACHE_SOCKET=d.socket, **extra))
    return uids.run(uid, ['/usr/bin/python3', '-c', code], env=env, timeout=180)


def test_offline_reads_with_the_server_gone(tmp):
    e = emulator.Emulator()
    e.start()
    url = e.url
    d = system_daemon(tmp)
    try:
        r, ev = prefetch(d, ALICE, url, 'ct', key=emulator.KEY_CT)
        assert r.returncode == 0 and final(ev)['state'] == 'done', r.stderr
        n = final(ev)['items_total']
        version = final(ev)['version']
    finally:
        assert e.stop() == 0
    out = os.path.join(tmp, 'alice', 'x.npy')
    # offline: no network wait at all (the best of three whole `dmcache get` processes,
    # so that a loaded CI machine's noise is not taken for a wait)
    took = []
    for _ in range(3):
        t0 = time.monotonic()
        r = cli(d, ALICE, 'get', '--offline', '--server', url, 'ct', '0', '-o', out,
                key=emulator.KEY_CT)
        took.append(time.monotonic() - t0)
        assert r.returncode == 0, r.stderr
    # a whole process (spawn, connect, OPEN, decode, write) stays below the 2 s after which
    # an online request would fall back: no network wait
    assert min(took) < 1.5, 'offline get took %r s' % took
    # the OPEN itself, in process: within 0.5 s
    code = ('import time, dmcache._lib as L\n'
            'best = 9\n'
            'for _ in range(3):\n'
            '    c = L.Client(); t0 = time.monotonic()\n'
            '    ds = c.open(L.SOURCE_DATAMINT, "ct", server=%r, api_key=%r, offline=True)\n'
            '    best = min(best, time.monotonic() - t0); ds.close(); c.close()\n'
            'print(best)\n' % (url, emulator.KEY_CT))
    r = python_epoch(d, ALICE, code, key=emulator.KEY_CT)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.split()[-1]) < 0.5, r.stdout
    ref = open(out, 'rb').read()
    # DMCACHE_OFFLINE=1, and with the version pinned
    r = cli(d, ALICE, 'get', '--version', version, '--server', url, 'ct', '1', '-o', out,
            key=emulator.KEY_CT, DMCACHE_OFFLINE='1')
    assert r.returncode == 0, r.stderr
    # online, server unreachable: the grant answers after one failed attempt, and says so
    t0 = time.monotonic()
    r, ev = prefetch(d, ALICE, url, 'ct', key=emulator.KEY_CT)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'served from cache: server unreachable' in final(ev).get('notice', ''), final(ev)
    assert took < 3, 'fallback took %.2f s' % took
    t0 = time.monotonic()
    r = cli(d, ALICE, 'get', '--server', url, 'ct', '0', '-o', out, key=emulator.KEY_CT)
    assert r.returncode == 0 and time.monotonic() - t0 < 3, r.stderr
    assert open(out, 'rb').read() == ref
    # bob holds no grant: offline or not, he gets nothing
    bob_out = os.path.join(tmp, 'bob', 'x.npy')
    r = cli(d, BOB, 'get', '--offline', '--server', url, 'ct', '0', '-o', bob_out,
            key=emulator.KEY_CT)
    assert r.returncode != 0 and 'not entitled offline' in r.stderr, r.stderr
    assert not os.path.exists(bob_out)
    # a whole epoch through Dataset and Loader, offline
    code = ('import dmcache\n'
            'ds = dmcache.Dataset(dataset_name="ct", server_url=%r, offline=True)\n'
            'assert len(ds) == %d\n'
            'for i in range(len(ds)): ds[i]\n'
            'ld = dmcache.Loader("ct", batch_size=8, server_url=%r, offline=True, collate="list")\n'
            'print(sum(len(b[0]) if isinstance(b, tuple) else len(b) for b in ld))\n'
            % (url, n, url))
    r = python_epoch(d, ALICE, code, key=emulator.KEY_CT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == str(n), r.stdout
    # grants survive a restart: alice still lists and reads her snapshot offline
    assert d.stop()[0] == 0
    d.start()
    mine = ls(d, ALICE)
    assert len(mine) == 1 and mine[0]['complete'] and mine[0]['owner_uid'] == ALICE, mine
    r = cli(d, ALICE, 'get', '--offline', '--server', url, 'ct', '0', '-o', out,
            key=emulator.KEY_CT)
    assert r.returncode == 0, r.stderr
    assert open(out, 'rb').read() == ref
    assert d.stop()[0] == 0
    # an expired grant is refused, with how old it is and the limit
    d.args += ['-o', 'grant_ttl=1s']
    d.start()
    time.sleep(2.2)
    r = cli(d, ALICE, 'get', '--offline', '--server', url, 'ct', '0', '-o', out,
            key=emulator.KEY_CT)
    assert r.returncode != 0
    assert 'not entitled offline: last checked' in r.stderr and 'grant_ttl is' in r.stderr, \
        r.stderr
    assert d.stop()[0] == 0


def test_queued_jobs_are_capped_per_user(emu, tmp):
    d = system_daemon(tmp, '-o', 'max_jobs_per_uid=2')
    emu.add_fault(path='^/resources/[^/]+/file$', latency_ms=1500, user='alice@example.org')
    try:
        procs = [uids.popen(BOB, [DMCACHE, '--socket', d.socket, 'prefetch', '--server', emu.url,
                                  p], env=user_env(emulator.KEY_ALL),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for p in ('sample', 'ct')]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            c = json.loads(d.cli('status', '--json').stdout)['counters']
            if c['prefetch_jobs'] >= 2:
                break
            time.sleep(0.05)
        r = cli(d, BOB, 'prefetch', '--server', emu.url, 'pydicom', key=emulator.KEY_ALL)
        assert r.returncode != 0 and 'max_jobs_per_uid is 2' in r.stderr, r.stderr
        # another user is not held by bob's cap
        r = cli(d, ALICE, 'prefetch', '--server', emu.url, 'pydicom', key=emulator.KEY_CT)
        assert r.returncode == 0, r.stderr
        for p in procs:
            p.kill()
            p.wait()
    finally:
        emu.clear_faults()
    assert d.stop()[0] == 0


# ---- the stored original files (OPEN with DMC_OPEN_RAW) -----------------------------------

RAW_CODE = '''
import hashlib, json, sys
import dmcache._lib as L
c = L.Client()
try:
    ds = c.open(L.SOURCE_DATAMINT, "ct", server=%r, api_key=%r, raw=True, offline=%r,
                masks=%r)
except Exception as e:
    print(json.dumps({"error": "%%s: %%s" %% (type(e).__name__, e)}))
    sys.exit(0)
out = {}
for i in range(ds.items):
    items = ds.get([i])
    it = items[0]
    assert it.status == 0, L.item_error(it)
    rec = json.loads(L.item_meta(it))["resource"]
    out[rec["source_filepath"]] = hashlib.sha256(bytes(L.item_bytes(it))).hexdigest()
    ds.release(items)
print(json.dumps({"files": out}))
'''


def raw_files(d, uid, url, key, offline=False, masks=False):
    r = python_epoch(d, uid, RAW_CODE % (url, key, offline, masks), key=key)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def test_stored_files_only_for_an_entitled_user(emu, tmp):
    """The original files as the daemon stored them (what dmcache.Dataset reads a project
    item's dicom_metainfo from): the same rules as any read. alice and bob each get them
    only with their own key the server accepts for the project, or offline with their own
    grant; what they get is the server's file, byte for byte."""
    d = system_daemon(tmp)
    files = os.path.join(emu.corpus, 'projects', 'ct')
    want = {}
    for root, _, names in os.walk(files):
        for n in names:
            p = os.path.join(root, n)
            with open(p, 'rb') as f:
                want[os.path.relpath(p, files)] = hashlib.sha256(f.read()).hexdigest()
    try:
        r, ev = prefetch(d, ALICE, emu.url, 'ct', key=emulator.KEY_CT)
        assert r.returncode == 0 and final(ev)['state'] == 'done', r.stderr
        got = raw_files(d, ALICE, emu.url, emulator.KEY_CT)
        assert got['files'] and all(want[p] == h for p, h in got['files'].items()), got
        assert len(got['files']) == final(ev)['items_total']
        assert raw_files(d, ALICE, emu.url, emulator.KEY_CT, offline=True) == got
        # bob: a key the server refuses, a key for another project, no grant offline
        for key, offline in ((emulator.KEY_NONE, False), (emulator.KEY_SAMPLE, False),
                             (emulator.KEY_CT, True)):
            for masks in (False, True):  # the files, and the stored masks
                bob = raw_files(d, BOB, emu.url, key, offline=offline, masks=masks)
                assert 'files' not in bob and bob['error'].startswith('NotFoundError'), \
                    (key, bob)
        # bob with his own key the server accepts: the same files
        assert raw_files(d, BOB, emu.url, emulator.KEY_CT) == got
    finally:
        assert d.stop()[0] == 0


def test_an_item_failed_with_alices_key_is_fetched_with_bobs(emu, tmp):
    """alice's job fails every file of `sample` with her key (the server refuses her,
    slowly: the job runs on). bob, entitled with his own key, asks for item 0 meanwhile:
    he is not told alice's failure (her key's, her words) and gets the server's bytes
    with his own key. (Two rules keep it so: bob's listing makes or grants him his own
    snapshot, and the failures serve keeps for waiting GETs are told to the failing job's
    uid only; this test passes with either alone.)"""
    d = system_daemon(tmp)
    fids = [emu.add_fault(path=r'^/resources/[^/]+/file$', user='alice@example.org',
                          status=403, message='alice-only refusal', latency_ms=1500)]
    alice = None
    try:
        alice = uids.popen(ALICE, [DMCACHE, '--socket', d.socket, 'prefetch', '--json',
                                   '--server', emu.url, 'sample'],
                           env=user_env(emulator.KEY_ALL), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
        # her first failures: the job goes on with the rest
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(e.get('fault') in fids and e['status'] == 403 for e in emu.log()):
                break
            time.sleep(0.1)
        else:
            raise AssertionError('no refusal of alice in the emulator log')
        time.sleep(0.3)
        out = os.path.join(tmp, 'bob', 'it0.npy')
        r = cli(d, BOB, 'get', '--server', emu.url, 'sample', '0', '-o', out,
                key=emulator.KEY_SAMPLE)
        said = r.stdout + r.stderr
        assert 'alice-only' not in said and '403' not in said, said
        assert r.returncode == 0, said
        alice_out, _ = alice.communicate(timeout=120)
        assert alice.returncode != 0 and 'alice-only' in alice_out, alice_out
    finally:
        if alice is not None and alice.poll() is None:
            alice.kill()
        for f in fids:
            emu.remove_fault(f)
        assert d.stop()[0] == 0
