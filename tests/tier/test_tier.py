"""The cluster tier against a real Ceph RADOS Gateway: two dmcached nodes (separate caches
and sockets) share one bucket; the emulator plays Datamint and logs every request.
"""
import json
import os
import socket
import sqlite3

from conftest import Node, emulator

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
