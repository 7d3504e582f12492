"""Each fault really happens on the wire (reliability.md N1-N7)."""
import email.utils
import http.client
import json
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest

from client import KEY_ALL, KEY_SAMPLE, request

FILE_RE = r'^/resources/[^/]+/file$'


@pytest.fixture(scope='module')
def target(emu):
    """A CT slice of the sample project: (resource id, full bytes)."""
    res = json.loads(emu.get('/projects/%s/resources' % emu.project('sample')['id']).body)
    rid = next(r['id'] for r in res if r['filename'] == 'ct_000.dcm')
    body = emu.get('/resources/%s/file' % rid).body
    assert len(body) > 100000
    return rid, body


def raw_get(url, path, key=KEY_ALL, extra=b'', timeout=20):
    """GET on a raw socket: returns (header bytes, body bytes read until EOF)."""
    u = urlsplit(url)
    s = socket.create_connection((u.hostname, u.port), timeout=timeout)
    s.sendall(b'GET %s HTTP/1.1\r\nHost: x\r\napikey: %s\r\nConnection: close\r\n%s\r\n'
              % (path.encode(), key.encode(), extra))
    data = b''
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    head, _, body = data.partition(b'\r\n\r\n')
    return head, body


def header(head, name):
    for line in head.split(b'\r\n')[1:]:
        k, _, v = line.partition(b':')
        if k.strip().lower() == name.lower().encode():
            return v.strip().decode()
    return None


def test_retry_after_seconds_and_date(emu, target):
    rid, body = target
    # count only this test's requests: an earlier test's connection may still be logging
    emu.wait_idle()
    emu.clear_log()
    emu.add_fault(path=FILE_RE, status=429, retry_after=7, times=1)
    r = emu.get('/resources/%s/file' % rid)
    assert r.status == 429 and r.headers['Retry-After'] == '7'
    assert r.headers['Content-Type'] == 'application/json' and isinstance(r.json()['message'], str)
    assert emu.get('/resources/%s/file' % rid).body == body  # times=1: next one is fine
    emu.add_fault(path=FILE_RE, status=503, retry_after_date=120, times=1)
    t0 = time.time()
    r = emu.get('/resources/%s/file' % rid)
    assert r.status == 503
    when = email.utils.parsedate_to_datetime(r.headers['Retry-After']).timestamp()
    assert 118 <= when - t0 <= 122
    for st in (500, 502, 504):
        emu.add_fault(path=FILE_RE, status=st, times=1)
        r = emu.get('/resources/%s/file' % rid)
        assert r.status == st and 'Retry-After' not in r.headers and r.json()['message']
    # skip: the first matching request passes, the second fails.
    emu.add_fault(path=FILE_RE, status=503, skip=1, times=1)
    assert emu.get('/resources/%s/file' % rid).status == 200
    assert emu.get('/resources/%s/file' % rid).status == 503
    assert emu.get('/resources/%s/file' % rid).status == 200
    faults = [e['fault'] for e in emu.log() if e['path'].endswith('/file')]
    assert faults.count(None) == 3  # after the 429, the skipped one, the last one


def test_latency(emu, target):
    rid, _ = target
    emu.add_fault(path=FILE_RE, latency_ms=400, times=1)
    t0 = time.monotonic()
    assert emu.get('/resources/%s/file' % rid).status == 200
    assert time.monotonic() - t0 >= 0.4


def test_bandwidth_cap_and_trickle(emu, target):
    rid, body = target
    emu.add_fault(path=FILE_RE, rate_bps=400000, times=1)
    t0 = time.monotonic()
    r = emu.get('/resources/%s/file' % rid)
    dt = time.monotonic() - t0
    assert r.body == body and dt >= len(body) / 400000 * 0.9
    # 1 byte/s: after 2.5 s at most 3-4 bytes have arrived.
    emu.add_fault(path=FILE_RE, rate_bps=1, times=1)
    u = urlsplit(emu.url)
    s = socket.create_connection((u.hostname, u.port), timeout=5)
    s.sendall(b'GET /resources/%s/file HTTP/1.1\r\nHost: x\r\napikey: %s\r\n\r\n'
              % (rid.encode(), KEY_ALL.encode()))
    data = b''
    s.settimeout(0.5)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2.5:
        try:
            data += s.recv(65536)
        except socket.timeout:
            pass
    s.close()
    head, _, got = data.partition(b'\r\n\r\n')
    assert header(head, 'Content-Length') == str(len(body))
    assert 1 <= len(got) <= 4 and got == body[:len(got)]


def test_drop_after_n_bytes(emu, target):
    rid, body = target
    ids = [emu.add_fault(path=FILE_RE, drop_after=12345, times=1)]
    head, got = raw_get(emu.url, '/resources/%s/file' % rid)
    assert header(head, 'Content-Length') == str(len(body))
    assert got == body[:12345]  # exactly N bytes, then EOF
    # http.client sees it as an incomplete read, like libcurl's CURLE_PARTIAL_FILE.
    ids.append(emu.add_fault(path=FILE_RE, drop_after=1000, times=1))
    u = urlsplit(emu.url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    c.request('GET', '/resources/%s/file' % rid, headers={'apikey': KEY_ALL})
    with pytest.raises(http.client.IncompleteRead):
        c.getresponse().read()
    c.close()
    # this test's faults only: a trickle of an earlier test may still be logging
    entries = [e for e in emu.log() if e['fault'] in ids]
    assert [e['bytes'] for e in entries] == [12345, 1000]
    # Resume with Range + If-Range after a drop: bytes match.
    etag = emu.get('/resources/%s/file' % rid).headers['ETag']
    r = emu.get('/resources/%s/file' % rid, headers={'Range': 'bytes=12345-', 'If-Range': etag})
    assert r.status == 206 and body[:12345] + r.body == body


def test_flip_bytes_same_length(emu, target):
    rid, body = target
    emu.add_fault(path=FILE_RE, flip=[0, 5000, len(body) - 1], times=1)
    r = emu.get('/resources/%s/file' % rid)
    assert r.status == 200 and len(r.body) == len(body)
    diff = [i for i in range(len(body)) if r.body[i] != body[i]]
    assert diff == [0, 5000, len(body) - 1]
    assert all(r.body[i] == body[i] ^ 0xFF for i in diff)
    emu.add_fault(path=FILE_RE, flip_count=4, times=1)
    r = emu.get('/resources/%s/file' % rid)
    assert len(r.body) == len(body) and sum(a != b for a, b in zip(r.body, body)) == 4


def test_wrong_content_length(emu, target):
    rid, body = target
    emu.add_fault(path=FILE_RE, content_length_delta=100, times=1)
    head, got = raw_get(emu.url, '/resources/%s/file' % rid)
    assert header(head, 'Content-Length') == str(len(body) + 100) and got == body
    emu.add_fault(path=FILE_RE, content_length_delta=-100, times=1)
    head, got = raw_get(emu.url, '/resources/%s/file' % rid)
    assert header(head, 'Content-Length') == str(len(body) - 100) and got == body


def test_ignore_range(emu, target):
    rid, body = target
    emu.add_fault(path=FILE_RE, ignore_range=True, times=1)
    r = emu.get('/resources/%s/file' % rid, headers={'Range': 'bytes=10-19'})
    assert r.status == 200 and r.body == body and 'Content-Range' not in r.headers


def test_content_changes_between_requests(emu):
    res = json.loads(emu.get('/projects/%s/resources' % emu.project('sample')['id']).body)
    rid = next(r['id'] for r in res if r['filename'] == 'ct_001.dcm')
    first = emu.get('/resources/%s/file' % rid)
    # The mutate fault changes the content after serving it.
    emu.add_fault(path=FILE_RE, mutate=True, times=1)
    again = emu.get('/resources/%s/file' % rid)
    assert again.body == first.body and again.headers['ETag'] == first.headers['ETag']
    now = emu.get('/resources/%s/file' % rid)
    assert now.headers['ETag'] != first.headers['ETag'] and now.body != first.body
    assert len(now.body) == len(first.body)
    # A resume with the old validator gets the whole new body (If-Range, N3).
    r = emu.get('/resources/%s/file' % rid, headers={'Range': 'bytes=100-',
                                                     'If-Range': first.headers['ETag']})
    assert r.status == 200 and r.body == now.body
    # The admin API replaces content outright.
    etag = emu.set_content(rid, b'brand new bytes')
    r = emu.get('/resources/%s/file' % rid)
    assert r.body == b'brand new bytes' and r.headers['ETag'] == etag
    # Synthetic items change too.
    small = json.loads(emu.get('/projects/%s/resources' % emu.project('small')['id']).body)
    s0 = emu.get('/resources/%s/file' % small[0]['id'])
    emu.mutate(small[0]['id'])
    s1 = emu.get('/resources/%s/file' % small[0]['id'])
    assert s1.body != s0.body and s1.headers['ETag'] != s0.headers['ETag']


def test_redirect_to_second_listener(emu, target):
    rid, body = target
    # Only this test uses KEY_SAMPLE's user: a late request of an earlier test cannot use
    # the rule up.
    emu.wait_idle()
    emu.clear_log()
    emu.add_fault(path=FILE_RE, user='bob@example.org', redirect=True, times=1)
    r = emu.get('/resources/%s/file' % rid, key=KEY_SAMPLE)
    assert r.status == 302, (r, emu.log())
    loc = r.headers['Location']
    assert loc.startswith(emu.redirect_url + '/_r/')
    assert urlsplit(loc).hostname == '127.0.0.2'
    # A careful client strips the key: the pre-signed URL alone serves the file.
    u = urlsplit(loc)
    r2 = request(emu.redirect_url, 'GET', u.path, key=None, headers={'Range': 'bytes=0-99'})
    assert r2.status == 206 and r2.body == body[:100]
    r3 = request(emu.redirect_url, 'GET', u.path, key=None)
    assert r3.body == body
    log = emu.log()
    hop = [e for e in log if e['listener'] == 'redirect']
    assert len(hop) == 2 and all(e['auth'] is None for e in hop)
    assert all('apikey' not in e['headers'] and 'authorization' not in e['headers'] for e in hop)
    first = [e for e in log if e['listener'] == 'main' and e['path'].endswith('/file')][0]
    assert first['status'] == 302 and 'apikey' in first['headers']
    # A careless client forwards it, and the log shows that too.
    request(emu.redirect_url, 'GET', u.path, key=KEY_SAMPLE)
    assert 'apikey' in emu.log()[-1]['headers']
    # Faults on the redirect listener itself.
    emu.add_fault(listener='redirect', path='^/_r/', drop_after=10, times=1)
    head, got = raw_get(emu.redirect_url, u.path)
    assert got == body[:10]


def test_close_without_response(emu, target):
    rid, _ = target
    emu.add_fault(path=FILE_RE, close=True, times=1)
    head, got = raw_get(emu.url, '/resources/%s/file' % rid)
    assert head == b'' and got == b''


def test_peak_connections_and_log(emu, target):
    rid, _ = target
    emu.wait_idle()
    emu.reset_stats()
    fid = emu.add_fault(path=FILE_RE, latency_ms=500)
    threads = [threading.Thread(target=emu.get, args=('/resources/%s/file' % rid,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # the server counts a connection closed when its handler ends, just after the client
    assert emu.wait_idle(timeout=5)
    st = emu.stats()
    assert st['peak_connections'] == 6 and st['active_connections'] == 0
    entries = [e for e in emu.log() if e['fault'] == fid]
    assert len(entries) == 6
    e = entries[0]
    assert {'method', 'path', 'status', 'bytes', 'headers', 'auth', 'user', 'fault'} <= set(e)
    assert e['method'] == 'GET' and e['status'] == 200 and e['user'] == 'alice@example.org'


def test_admin_needs_its_key_and_validates(emu):
    r = request(emu.admin_url, 'GET', '/_admin/faults')
    assert r.status == 401 and r.json()['message']
    r = request(emu.admin_url, 'GET', '/_admin/faults', key=KEY_ALL)
    assert r.status == 401
    r = request(emu.admin_url, 'POST', '/_admin/faults', headers={'x-admin-key': emu.admin_key},
                json_body={'path': '.', 'bogus': 1})
    assert r.status == 400 and 'bogus' in r.json()['message']
    fid = emu.add_fault(path='^/projects$', status=500)
    assert emu.get('/projects').status == 500
    emu.remove_fault(fid)
    assert emu.get('/projects').status == 200
    # Admin traffic never appears in the request log.
    assert all(not e['path'].startswith('/_admin') for e in emu.log())
