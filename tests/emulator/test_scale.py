"""A 1,000,000-item synthetic project pages through without being materialised; the
process starts, reports its URLs and stops cleanly."""
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import time
from urllib.parse import quote, urlsplit

import pytest

from client import EMULATOR, PYTHON, Emulator, request

N = 1000000
PAGE = 5000
ID_RE = re.compile(rb'\{"id":"([0-9a-f-]{36})","resource_uri"')


def rss_hwm_kb(pid):
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1])
    raise RuntimeError('no VmHWM')


def test_million_items_page_through(emu):
    big = emu.project('big')
    assert big['resource_count'] == N
    hwm0 = rss_hwm_kb(emu.pid)
    u = urlsplit(emu.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)  # one keep-alive connection
    project = quote(json.dumps({'items': ['big'], 'filterType': 'union'}))
    seen = 0
    expect = N - 1  # newest first: created_at descends with the index
    prefix = None
    t0 = time.monotonic()
    for offset in range(0, N + PAGE, PAGE):
        conn.request('GET', '/resources?status=&project=%s&offset=%d&limit=%d'
                     % (project, offset, PAGE), headers={'apikey': 'dmc-key-all'})
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200 and r.getheader('Content-Type') == 'application/json'
        assert body.endswith(b']}],"totalCount":%d}' % N)
        ids = ID_RE.findall(body)
        assert len(ids) == min(PAGE, max(0, N - offset))
        if ids:
            if prefix is None:
                prefix = ids[0][:24]
            assert ids[0] == prefix + b'%012x' % expect
            assert ids[-1] == prefix + b'%012x' % (expect - len(ids) + 1)
        if offset in (0, 500000, N - PAGE):
            page = json.loads(body)['data'][0]['resources']
            assert [int(x['id'][24:], 16) for x in page] == list(range(expect, expect - PAGE, -1))
            assert page[0]['filename'] == 'item-%07d.bin' % expect
            assert page[0]['created_at'] > page[-1]['created_at']
        seen += len(ids)
        expect -= len(ids)
        if len(ids) < PAGE:
            break
    conn.close()
    assert seen == N and expect == -1
    elapsed = time.monotonic() - t0
    grown_mb = (rss_hwm_kb(emu.pid) - hwm0) / 1024
    # A materialised list of 10^6 resource dicts would take well over 1 GB in Python.
    assert grown_mb < 150, 'emulator memory grew by %.0f MB while paging' % grown_mb
    print('paged %d items in %.1f s, emulator peak RSS +%.0f MB' % (N, elapsed, grown_mb))


def test_million_items_other_views(emu):
    big = emu.project('big')
    tail = json.loads(emu.get('/projects/%s/resources' % big['id'],
                              query={'offset': N - 3, 'limit': 10}).body)
    assert [t['filename'] for t in tail] == ['item-%07d.bin' % i for i in range(N - 3, N)]
    one = json.loads(emu.get('/resources/' + tail[-1]['id']).body)
    assert one == tail[-1] and one['size'] == 4096 and one['status'] == 'published'
    assert emu.get('/resources/%s/file' % one['id']).body[:8] == b'DMCSYN1\0'
    # Filters evaluated as index ranges: one file name, ascending order, dates.
    body = json.loads(emu.get('/resources', query={'filename': 'item-0123456.bin'}).body)
    assert body['totalCount'] == 1 and body['data'][0]['resources'][0]['filename'] == 'item-0123456.bin'
    body = json.loads(emu.get('/resources', query={'project': 'big', 'order_by_asc': 'true',
                                                   'limit': 2, 'offset': 10}).body)
    assert [r['filename'] for r in body['data'][0]['resources']] == ['item-0000010.bin', 'item-0000011.bin']
    body = json.loads(emu.get('/resources', query={'project': 'big', 'from': '2020-01-02',
                                                   'to': '2020-01-03', 'limit': 0}).body)
    assert body['totalCount'] == 86400
    body = json.loads(emu.get('/resources', query={'project': 'big', 'status': 'inbox'}).body)
    assert body == {'data': [{'resources': []}], 'totalCount': 0}
    # The dataset entry streams its 10^6 resource ids.
    d = json.loads(emu.get('/datasets/' + big['dataset_id']).body)
    assert d['total_resource'] == N and len(d['resource_ids']) == N
    assert d['resource_ids'][0] == tail[0]['id'][:24] + '%012x' % 0


def test_start_prints_urls_and_sigterm_stops(tmp_path):
    ready = tmp_path / 'ready.json'
    emu = Emulator(extra_args=['--ready-file', str(ready)]).start()
    assert emu.url.startswith('http://127.0.0.1:') and emu.redirect_url.startswith('http://127.0.0.2:')
    assert json.loads(ready.read_text())['url'] == emu.url
    # An idle keep-alive client must not hold the shutdown up.
    u = urlsplit(emu.url)
    s = socket.create_connection((u.hostname, u.port))
    s.sendall(b'GET /projects HTTP/1.1\r\nHost: x\r\napikey: dmc-key-all\r\n\r\n')
    assert s.recv(100).startswith(b'HTTP/1.1 200')
    t0 = time.monotonic()
    assert emu.stop() == 0
    assert time.monotonic() - t0 < 5
    s.close()


def test_bad_arguments_fail_clearly(tmp_path):
    r = subprocess.run([PYTHON, EMULATOR, '--keys', str(tmp_path / 'none.json')],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and 'keys file' in r.stderr
    r = subprocess.run([PYTHON, EMULATOR, '--keys', os.devnull, '--host', '0.0.0.0'],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and 'loopback' in r.stderr
    keys = tmp_path / 'k.json'
    keys.write_text(json.dumps({'admin_key': 'a', 'keys': [{'key': 'k', 'user': 'u@x', 'projects': '*'}]}))
    p = subprocess.Popen([PYTHON, EMULATOR, '--keys', str(keys), '--synthetic', 'only:3'],
                         stdout=subprocess.PIPE, text=True)
    info = json.loads(p.stdout.readline())
    r = request(info['url'], 'GET', '/projects', key='k')
    assert [x['name'] for x in r.json()['data']] == ['only']
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 0
    p.stdout.close()


def test_tls_listener(tmp_path):
    """--tls-cert/--tls-key serve HTTPS (certificates from python3-trustme)."""
    import ssl
    import trustme
    ca = trustme.CA()
    cert = ca.issue_cert('127.0.0.1', '127.0.0.2')
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / 'server.pem'))
    with Emulator(extra_args=['--tls-cert', str(tmp_path / 'server.pem'),
                              '--tls-key', str(tmp_path / 'server.pem')]) as emu:
        assert emu.url.startswith('https://127.0.0.1:')
        u = urlsplit(emu.url)
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        r = request(emu.url, 'GET', '/projects', key='dmc-key-sample', ssl_context=ctx)
        assert r.status == 200 and [p['name'] for p in r.json()['data']] == ['sample']
        assert emu.info()['url'] == emu.url  # the admin listener stays plain HTTP
        # An untrusting client fails the handshake.
        bad = http.client.HTTPSConnection(u.hostname, u.port, context=ssl.create_default_context(),
                                          timeout=10)
        with pytest.raises(ssl.SSLCertVerificationError):
            bad.request('GET', '/projects')
        bad.close()
