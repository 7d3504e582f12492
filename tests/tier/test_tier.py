"""The cluster tier against a real Ceph RADOS Gateway: two dmcached nodes (separate caches
and sockets) share one bucket; the emulator plays Datamint and logs every request.
"""
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse

import pytest
import sqlite3

from conftest import DMCACHE, Node, emulator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'integration'))
import uids  # noqa: E402

BIG = 72 * 1000 * 1000  # above TIER_MULTIPART_MIN (64 MiB): uploaded in parts


@pytest.fixture(scope='module')
def emu():
    """The corpus, and a synthetic project of one item larger than the multipart threshold."""
    e = emulator.Emulator(synthetic=['big:1:%d' % BIG])
    e.start()
    yield e
    assert e.stop() == 0


def manifest(emu):
    with open(os.path.join(emu.corpus, 'manifest.json')) as f:
        return {e['resource_id']: e for e in json.load(f)['files'] if e.get('resource_id')}


def final(r):
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{')]
    done = [e for e in events if 'state' in e]
    return done[-1] if done else {}


def file_gets(emu):
    return [e for e in emu.log() if e['method'] == 'GET' and e['path'].startswith('/resources/')
            and e['path'].endswith('/file')]


def items_of(node):
    """resource id -> blob hex of every item (daemon stopped)."""
    db = sqlite3.connect(os.path.join(node.d.cache, 'index.db'))
    try:
        return dict(db.execute('SELECT resource_id, lower(hex(blob)) FROM items').fetchall())
    finally:
        db.close()


def blob_file(node, hexd):
    with open(os.path.join(node.d.cache, 'objects', hexd[:2], hexd), 'rb') as f:
        return f.read()


def fill(a, emu):
    """Node A prefetches ct from Datamint and uploads it: returns its item count."""
    r = a.prefetch(emu, 'ct')
    assert r.returncode == 0, r.stdout + r.stderr
    f = final(r)
    assert f['state'] == 'done' and f['items_failed'] == 0, f
    m = a.wait_uploads()
    n = f['items_total']
    assert n > 0
    assert m['uploads_total'] == n and m['maps_written_total'] == n, m
    assert m['hits_total'] == 0 and m['misses_total'] == n, m
    assert m['uploads_failed_total'] == 0 and m['errors_total'] == 0, m
    return n


def test_second_node_reads_everything_from_the_tier(ceph, emu, tmpdir_short, prefix):
    a = Node(os.path.join(tmpdir_short, 'a'), ceph, prefix)
    b = Node(os.path.join(tmpdir_short, 'b'), ceph, prefix)
    try:
        n = fill(a, emu)
        emu.clear_log()
        r = b.prefetch(emu, 'ct')
        assert r.returncode == 0, r.stdout + r.stderr
        f = final(r)
        assert f['items_done'] == n and f['items_failed'] == 0, f
        # B listed the project with its own key, and downloaded no file from Datamint
        assert file_gets(emu) == []
        assert any(e['path'] == '/resources' or e['path'].startswith('/resources?')
                   or e['path'].startswith('/projects') for e in emu.log())
        m = b.metrics()
        assert m['hits_total'] == n and m['misses_total'] == 0 and m['errors_total'] == 0, m
        assert m['uploads_total'] == 0, m
        assert b.d.cli('verify').returncode == 0
    finally:
        a.stop()
        b.stop()
    for node in (a, b):
        # the tier's credentials are in no log line
        assert ceph.secret not in node.d.log() and ceph.access not in node.d.log()
    ia, ib = items_of(a), items_of(b)
    assert ia == ib and len(ia) == n
    man = manifest(emu)
    for rid, hexd in ib.items():
        # the content address is the source file's SHA-256, and the node copied A's
        # blob file byte for byte
        assert hexd == man[rid]['sha256'], rid
        assert blob_file(b, hexd) == blob_file(a, hexd), rid
        # the tier holds that very file
        assert ceph.s3('GET', '%s/blobs/%s/%s' % (prefix, hexd[:2], hexd))[1] == \
            blob_file(a, hexd)


def test_corrupted_tier_object_is_refetched_from_datamint(ceph, emu, tmpdir_short, prefix):
    a = Node(os.path.join(tmpdir_short, 'a'), ceph, prefix)
    b = Node(os.path.join(tmpdir_short, 'b'), ceph, prefix)
    try:
        n = fill(a, emu)
        a.stop()
        ia = items_of(a)
        rid, hexd = sorted(ia.items())[0]
        key = '%s/blobs/%s/%s' % (prefix, hexd[:2], hexd)
        body = bytearray(ceph.s3('GET', key)[1])
        body[-1] ^= 0x5a  # one flipped bit pattern in the payload's last byte
        ceph.s3('PUT', key, bytes(body))
        emu.clear_log()
        r = b.prefetch(emu, 'ct')
        assert r.returncode == 0, r.stdout + r.stderr
        assert final(r)['items_failed'] == 0
        gets = file_gets(emu)
        assert [g['path'] for g in gets] == ['/resources/%s/file' % rid], gets
        m = b.metrics()
        assert m['corrupt_total'] == 1 and m['hits_total'] == n - 1, m
        assert 'does not match its digest' in b.d.log()
        assert b.d.cli('verify').returncode == 0
    finally:
        b.stop()
    ib = items_of(b)
    assert ib == ia
    assert blob_file(b, hexd) == blob_file(a, hexd)


def test_user_without_entitlement_gets_nothing_from_the_tier(ceph, emu, tmpdir_short, prefix):
    a = Node(os.path.join(tmpdir_short, 'a'), ceph, prefix)
    b = Node(os.path.join(tmpdir_short, 'b'), ceph, prefix)
    try:
        fill(a, emu)
        emu.clear_log()
        # KEY_SAMPLE's user may see `sample`, not `ct`: the listing is refused first
        r = b.prefetch(emu, 'ct', key=emulator.KEY_SAMPLE)
        assert r.returncode == 1, r.stdout + r.stderr
        assert final(r).get('state') != 'done'
        assert file_gets(emu) == []
        m = b.metrics()
        # not even a mapping was asked for
        assert m['hits_total'] == 0 and m['misses_total'] == 0 and m['errors_total'] == 0, m
        assert b.d.cli('ls', '--json').stdout.count('"ct"') == 0
    finally:
        a.stop()
        b.stop()
    assert items_of(b) == {}


def closed_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_tier_falls_back_to_datamint(ceph, emu, tmpdir_short, prefix):
    url = 'http://127.0.0.1:%d/%s' % (closed_port(), ceph.bucket)
    b = Node(os.path.join(tmpdir_short, 'b'), ceph, prefix, url=url)
    try:
        emu.clear_log()
        r = b.prefetch(emu, 'ct')
        assert r.returncode == 0, r.stdout + r.stderr
        f = final(r)
        assert f['items_failed'] == 0
        n = f['items_total']
        assert len(file_gets(emu)) == n
        m = b.wait_uploads()
        assert m['hits_total'] == 0 and m['errors_total'] >= n, m
        assert m['uploads_failed_total'] == n, m
        assert 'cluster tier' in b.d.log() and 'Datamint instead' in b.d.log()
        assert b.d.cli('verify').returncode == 0
    finally:
        b.stop()


def test_stopped_gateway_falls_back_then_serves_again(ceph, emu, tmpdir_short, prefix):
    a = Node(os.path.join(tmpdir_short, 'a'), ceph, prefix)
    b = Node(os.path.join(tmpdir_short, 'b'), ceph, prefix)
    c = Node(os.path.join(tmpdir_short, 'c'), ceph, prefix)
    try:
        n = fill(a, emu)
        ceph.ctl('rgw-stop')
        try:
            emu.clear_log()
            r = b.prefetch(emu, 'ct')
            assert r.returncode == 0, r.stdout + r.stderr
            assert final(r)['items_failed'] == 0
            assert len(file_gets(emu)) == n
            m = b.metrics()
            assert m['hits_total'] == 0 and m['errors_total'] >= n, m
        finally:
            ceph.ctl('rgw-start')
        emu.clear_log()
        r = c.prefetch(emu, 'ct')
        assert r.returncode == 0, r.stdout + r.stderr
        assert file_gets(emu) == []
        assert c.metrics()['hits_total'] == n
    finally:
        a.stop()
        b.stop()
        c.stop()


def test_credentials_file_readable_by_others_is_refused(ceph, tmpdir_short, prefix):
    node = Node(os.path.join(tmpdir_short, 'a'), ceph, prefix, cred_mode=0o644, start=False)
    d = node.d
    assert not d.start(expect_ready=False)
    d.proc.wait(10)
    assert d.proc.returncode != 0
    log = d.log()
    assert 'tier_credentials_file' in log and 'refused' in log, log
    assert ceph.secret not in log and ceph.access not in log
    d.notify.close()


def blob_files(node):
    root = os.path.join(node.d.cache, 'objects')
    return [f for _, _, files in os.walk(root) for f in files]


def test_sharded_prewarm_to_tier_covers_the_project_once(ceph, emu, tmpdir_short, prefix):
    nodes = [Node(os.path.join(tmpdir_short, n), ceph, prefix) for n in ('a', 'b')]
    c = Node(os.path.join(tmpdir_short, 'c'), ceph, prefix)
    try:
        emu.clear_log()
        env = dict(nodes[0].d.env, DATAMINT_API_KEY=emulator.KEY_ALL)
        env.pop('DATAMINT_API_URL', None)
        # node 0 names its share; node 1 takes it from torchrun's environment
        procs = [subprocess.Popen([DMCACHE, '--socket', nd.d.socket, 'prefetch', '--json',
                                   '--server', emu.url, '--to-tier', '--shard',
                                   '0/2' if i == 0 else 'auto', 'ct'],
                                  env=dict(env, RANK=str(i), WORLD_SIZE='2') if i else env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i, nd in enumerate(nodes)]
        outs = [p.communicate(timeout=300) for p in procs]
        finals = []
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, out + err
            finals.append(final(subprocess.CompletedProcess([], 0, out, err)))
        n = finals[0]['items_total']
        assert finals[1]['items_total'] == n
        # each node fetched its share: together every item, and every file exactly once
        assert sorted(f['items_done'] for f in finals) == [n // 2, n - n // 2]
        paths = [g['path'] for g in file_gets(emu)]
        assert len(paths) == n and len(set(paths)) == n
        for nd in nodes:
            m = nd.wait_uploads()
            assert m['uploads_failed_total'] == 0 and m['errors_total'] == 0, m
        assert sum(nd.metrics()['maps_written_total'] for nd in nodes) == n
        # the tier was filled, not the nodes' caches
        for nd in nodes:
            assert blob_files(nd) == [], blob_files(nd)
        emu.clear_log()
        r = c.prefetch(emu, 'ct')
        assert r.returncode == 0, r.stdout + r.stderr
        assert final(r)['items_done'] == n
        assert file_gets(emu) == []
        assert c.metrics()['hits_total'] == n
    finally:
        for nd in nodes + [c]:
            nd.stop()
    for nd in nodes:
        # listed (the snapshot has every item), none stored
        assert len(items_of(nd)) == n and set(items_of(nd).values()) == {''}
    man = manifest(emu)
    assert all(hexd == man[rid]['sha256'] for rid, hexd in items_of(c).items())


def test_to_tier_counts_what_the_tier_has_without_fetching_it(ceph, emu, tmpdir_short, prefix):
    a = Node(os.path.join(tmpdir_short, 'a'), ceph, prefix)
    b = Node(os.path.join(tmpdir_short, 'b'), ceph, prefix)
    try:
        n = fill(a, emu)
        emu.clear_log()
        r = b.prefetch(emu, 'ct', '--to-tier')
        assert r.returncode == 0, r.stdout + r.stderr
        assert final(r)['items_done'] == n
        assert file_gets(emu) == []
        m = b.wait_uploads()
        assert m['hits_total'] == 0 and m['uploads_total'] == 0 and m['bytes_total'] == 0, m
        assert blob_files(b) == []
    finally:
        a.stop()
        b.stop()
    assert len(items_of(b)) == n and set(items_of(b).values()) == {''}


def test_large_blob_goes_up_in_parts_and_comes_back_whole(ceph, emu, tmpdir_short, prefix):
    a = Node(os.path.join(tmpdir_short, 'a'), ceph, prefix)
    b = Node(os.path.join(tmpdir_short, 'b'), ceph, prefix)
    try:
        r = a.prefetch(emu, 'big')
        assert r.returncode == 0, r.stdout + r.stderr
        m = a.wait_uploads()
        assert m['uploads_total'] == 1 and m['uploads_failed_total'] == 0, m
        emu.clear_log()
        r = b.prefetch(emu, 'big')
        assert r.returncode == 0, r.stdout + r.stderr
        assert file_gets(emu) == []
        m = b.metrics()
        assert m['hits_total'] == 1 and m['bytes_total'] > 64 << 20, m
    finally:
        a.stop()
        b.stop()
    (rid, hexd), = items_of(b).items()
    assert items_of(a) == {rid: hexd}
    data = blob_file(b, hexd)
    assert data == blob_file(a, hexd) and len(data) > 64 << 20
    # the tier's object is that file; its content is the emulator's item
    assert ceph.s3('GET', '%s/blobs/%s/%s' % (prefix, hexd[:2], hexd))[1] == data
    # a multipart object's ETag ends in its number of parts (16 MiB each)
    head = ceph.s3('HEAD', '%s/blobs/%s/%s' % (prefix, hexd[:2], hexd))[1]
    parts = -(-len(data) // (16 << 20))
    assert re.search(rb'etag: "[0-9a-f]+-%d"' % parts, head, re.I), head
    assert hashlib.sha256(emu.get('/resources/%s/file' % rid).body).hexdigest() == hexd


def test_credentials_from_the_environment(ceph, emu, tmpdir_short, prefix):
    a = Node(os.path.join(tmpdir_short, 'a'), ceph, prefix)
    b = Node(os.path.join(tmpdir_short, 'b'), ceph, prefix, env_credentials=True)
    try:
        n = fill(a, emu)
        emu.clear_log()
        r = b.prefetch(emu, 'ct')
        assert r.returncode == 0, r.stdout + r.stderr
        assert file_gets(emu) == []
        assert b.metrics()['hits_total'] == n
        # read once, then wiped from the daemon's environment (/proc/PID/environ shows
        # the block the process started with, as it is now)
        with open('/proc/%d/environ' % b.d.proc.pid, 'rb') as f:
            environ = f.read()
        assert b'AWS_SECRET_ACCESS_KEY=' in environ
        assert ceph.secret.encode() not in environ and ceph.access.encode() not in environ
    finally:
        a.stop()
        b.stop()
    assert ceph.secret not in b.d.log()


# ---- dmcache tier ls / gc (the daemon's own credentials; admins only) ----

def tier_cli(node, *args):
    r = node.d.cli('tier', *args, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout) if '--json' in args else r.stdout


def blob_key(prefix, hexd):
    return '%s/blobs/%s/%s' % (prefix, hexd[:2], hexd)


def exists(ceph, key):
    status, _ = ceph.s3('HEAD', key, check=False)
    assert status in (200, 404), status
    return status == 200


def test_tier_ls_and_verify_what_a_node_uploaded(ceph, emu, tmpdir_short, prefix):
    a = Node(os.path.join(tmpdir_short, 'a'), ceph, prefix)
    b = Node(os.path.join(tmpdir_short, 'b'), ceph, prefix)
    try:
        t0 = time.time()
        n = fill(a, emu)
        t1 = time.time()
        a.stop()
        ia = items_of(a)
        ls = tier_cli(b, 'ls', '--json')
        assert ls['mappings'] == n and ls['truncated'] is False, ls
        blobs = {e['digest']: e for e in ls['blobs']}
        assert set(blobs) == set(ia.values()) and ls['blob_count'] == len(set(ia.values()))
        for hexd, e in blobs.items():
            # each blob's size is the object's, read back independently
            assert e['size'] == len(ceph.s3('GET', blob_key(prefix, hexd))[1]), hexd
            assert e['size'] == len(blob_file(a, hexd))
            assert t0 - 5 <= e['last_modified'] <= t1 + 5, (e, t0, t1)
        assert ls['blob_bytes'] == sum(e['size'] for e in blobs.values())
        text = tier_cli(b, 'ls')
        assert text.splitlines()[-1].startswith('%d blobs (' % len(blobs))
        assert text.rstrip().endswith(', %d mappings' % n)
        for hexd in blobs:
            assert hexd in text
        # another uid is refused: it would see and delete every user's objects
        uids.require_root()
        uids.open_up(tmpdir_short, os.path.dirname(b.d.socket))
        env = {'PATH': os.environ['PATH'], 'HOME': '/nonexistent'}
        for args in (['tier', 'ls'], ['tier', 'gc'], ['tier', 'verify', '--repair']):
            r = uids.run(uids.ALICE, [DMCACHE, '--socket', b.d.socket] + args, env=env)
            assert r.returncode == 1, r.stdout + r.stderr
            assert 'root and members of the' in r.stderr, r.stderr
        # nothing was deleted by the refused gc
        assert all(exists(ceph, blob_key(prefix, h)) for h in blobs)

        # verify: every blob as A stored it is good
        v = tier_cli(b, 'verify', '--json')
        assert v['blob_count'] == len(blobs) and v['blobs_bad'] == 0, v
        assert {e['state'] for e in v['blobs']} == {'ok'}
        # one blob corrupted in the bucket (its payload's last byte), one truncated
        bad1, bad2 = sorted(blobs)[:2]
        body = bytearray(blob_file(a, bad1))
        body[-1] ^= 0x5a
        ceph.s3('PUT', blob_key(prefix, bad1), bytes(body))
        ceph.s3('PUT', blob_key(prefix, bad2), blob_file(a, bad2)[:-1])
        r = b.d.cli('tier', 'verify', '--json', timeout=120)
        assert r.returncode == 1, r.stdout + r.stderr
        v = json.loads(r.stdout)
        assert v['blobs_bad'] == 2 and v['blobs_deleted'] == 0, v
        assert {e['digest'] for e in v['blobs'] if e['state'] == 'bad'} == {bad1, bad2}
        assert exists(ceph, blob_key(prefix, bad1))
        r = b.d.cli('tier', 'verify', '--repair', timeout=120)
        assert r.returncode == 1, r.stdout + r.stderr
        assert sorted(r.stdout.splitlines()[:2]) == sorted(['bad ' + bad1, 'bad ' + bad2])
        assert 'checked %d blobs' % len(blobs) in r.stdout and '2 bad, deleted' in r.stdout
        assert not exists(ceph, blob_key(prefix, bad1))
        assert not exists(ceph, blob_key(prefix, bad2))
        assert tier_cli(b, 'verify').startswith('checked %d blobs (' % (len(blobs) - 2))
    finally:
        b.stop()
    assert 'cluster tier verify: object %s is bad: deleted' % blob_key(prefix, bad1) in \
        b.d.log()


def test_tier_gc_deletes_expired_mappings_and_unreferenced_blobs(ceph, emu, tmpdir_short,
                                                                   prefix):
    retention = 15
    a = Node(os.path.join(tmpdir_short, 'a'), ceph, prefix)
    b = Node(os.path.join(tmpdir_short, 'b'), ceph, prefix,
             extra='tier_retention = %ds\n' % retention)
    try:
        fill(a, emu)
        a.stop()
        ia = items_of(a)
        # an orphan blob (its mapping never written), old enough by the time gc runs
        orphan_old = hashlib.sha256(b'orphan old ' + prefix.encode()).hexdigest()
        ceph.s3('PUT', blob_key(prefix, orphan_old), b'x' * 1000)
        t_old = time.time()
        # an object under the prefix that is not one of the tier's own names: left alone
        foreign = '%s/blobs/zz/not-a-digest' % prefix
        ceph.s3('PUT', foreign, b'foreign')
        keep_rid, keep_hex = sorted(ia.items())[0]
        keep_map = [k for k in list_keys(ceph, prefix, 'maps')
                    if b'\ndigest %s\n' % keep_hex.encode() in ceph.s3('GET', k)[1]]
        assert len(keep_map) == 1, keep_map
        keep_map = keep_map[0]
        orphan_new = hashlib.sha256(b'orphan new ' + prefix.encode()).hexdigest()
        gone = (set(ia.values()) - {keep_hex}) | {orphan_old}
        kept = {keep_hex, orphan_new}
        sizes = {h: len(ceph.s3('GET', blob_key(prefix, h))[1]) for h in gone | {keep_hex}}
        sizes[orphan_new] = 2000
        time.sleep(max(0.0, t_old + retention + 2 - time.time()))
        # one mapping rewritten now: it and its blob stay
        ceph.s3('PUT', keep_map, ceph.s3('GET', keep_map)[1])
        # a fresh orphan: within the grace period (an upload whose mapping is not yet written)
        ceph.s3('PUT', blob_key(prefix, orphan_new), b'y' * 2000)
        maps_before = list_keys(ceph, prefix, 'maps')
        blobs_before = list_keys(ceph, prefix, 'blobs')
        assert len(maps_before) == len(ia) and len(blobs_before) == len(gone | kept) + 1

        dry = tier_cli(b, 'gc', '--dry-run', '--json')
        assert dry['dry_run'] is True
        assert dry['mappings_deleted'] == len(ia) - 1 and dry['mappings'] == 1, dry
        assert {e['digest'] for e in dry['blobs'] if e['state'] == 'deleted'} == gone, dry
        assert {e['digest'] for e in dry['blobs'] if e['state'] == 'kept'} == kept, dry
        assert dry['bytes_deleted'] == sum(sizes[h] for h in gone)
        assert dry['blob_bytes'] == sum(sizes[h] for h in kept)
        # a dry run deletes nothing
        assert list_keys(ceph, prefix, 'maps') == maps_before
        assert list_keys(ceph, prefix, 'blobs') == blobs_before

        gc = tier_cli(b, 'gc', '--json')
        assert gc['dry_run'] is False
        for k in ('mappings_deleted', 'mappings', 'bytes_deleted', 'blobs_deleted',
                  'blob_count', 'blob_bytes'):
            assert gc[k] == dry[k], (k, gc, dry)
        assert gc['blobs_deleted'] == len(gone) and gc['blob_count'] == len(kept)
        assert list_keys(ceph, prefix, 'maps') == [keep_map]
        assert list_keys(ceph, prefix, 'blobs') == sorted(
            [blob_key(prefix, h) for h in kept] + [foreign])
        ls = tier_cli(b, 'ls', '--json')
        assert {e['digest'] for e in ls['blobs']} == kept and ls['mappings'] == 1
        out = tier_cli(b, 'gc')
        assert out.startswith('deleted 0 mappings and 0 blobs'), out
    finally:
        b.stop()
    assert 'cluster tier gc: %d mapping(s) and %d blob(s)' % (len(ia) - 1, len(gone)) in \
        b.d.log()
    assert ceph.secret not in b.d.log()


def list_keys(ceph, prefix, sub):
    """The keys under prefix/sub/, listed by the test's own signed requests (pages)."""
    keys, token = [], None
    while True:
        q = '?list-type=2&prefix=' + urllib.parse.quote('%s/%s/' % (prefix, sub), safe='')
        if token:
            q = '?continuation-token=%s&list-type=2&prefix=%s' % (
                urllib.parse.quote(token, safe=''),
                urllib.parse.quote('%s/%s/' % (prefix, sub), safe=''))
        _, body = ceph.s3('GET', q)
        keys += [k.decode() for k in re.findall(rb'<Key>([^<]+)</Key>', body)]
        if b'<IsTruncated>true</IsTruncated>' not in body:
            return sorted(keys)
        token = re.search(rb'<NextContinuationToken>([^<]+)</NextContinuationToken>',
                          body).group(1).decode()


def test_full_tier_keeps_serving_and_stops_uploading(ceph, emu, tmpdir_short, prefix):
    """A bucket of its own whose quota admits no object: every upload meets 403
    QuotaExceeded. The node warns once, stops uploading, and its prefetch and reads go on."""
    bucket = 'dmcache-full-' + prefix[-8:]
    conf = ['-c', os.path.join(ceph.dir, 'ceph.conf')]
    url = '%s/%s' % (ceph.endpoint, bucket)
    status = subprocess.run(['curl', '-sS', '-o', '/dev/null', '-w', '%{http_code}', '-X', 'PUT',
                             '--aws-sigv4', 'aws:amz:%s:s3' % ceph.region,
                             '--user', '%s:%s' % (ceph.access, ceph.secret),
                             '-H', 'x-amz-content-sha256: ' + hashlib.sha256(b'').hexdigest(),
                             url], capture_output=True, text=True, timeout=60).stdout
    assert status == '200', status
    for args in (['quota', 'set', '--quota-scope=bucket', '--bucket=' + bucket,
                  '--max-objects=0'],
                 ['quota', 'enable', '--quota-scope=bucket', '--bucket=' + bucket]):
        r = subprocess.run(['radosgw-admin'] + conf + args, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
    b = Node(os.path.join(tmpdir_short, 'b'), ceph, prefix, url=url)
    try:
        r = b.prefetch(emu, 'ct')
        assert r.returncode == 0, r.stdout + r.stderr
        f = final(r)
        assert f['state'] == 'done' and f['items_failed'] == 0, f
        m = b.wait_uploads()
        assert m['full'] == 1, m
        assert m['uploads_total'] == 0 and m['maps_written_total'] == 0, m
        log = b.d.log()
        assert log.count('cluster tier is full') == 1, log[-3000:]
        # nothing reached the bucket, and everything is served from the node's cache
        listing = subprocess.run(['curl', '-sS', '--aws-sigv4', 'aws:amz:%s:s3' % ceph.region,
                                  '--user', '%s:%s' % (ceph.access, ceph.secret), '-H',
                                  'x-amz-content-sha256: ' + hashlib.sha256(b'').hexdigest(),
                                  url + '?list-type=2'], capture_output=True, text=True,
                                 timeout=60).stdout
        assert '<ListBucketResult' in listing and '<Key>' not in listing, listing[:500]
        assert b.d.cli('verify').returncode == 0
        g = b.d.cli('get', '--json', '--server', emu.url, '--api-key', emulator.KEY_ALL, 'ct', '0',
                    '-o', os.path.join(tmpdir_short, 'x.npy'))
        assert g.returncode == 0, g.stderr
    finally:
        b.stop()
