"""Logs an operator can use, under systemd: when stderr is the journal's stream
(JOURNAL_STREAM set), job lines go to journald through sd_journal_send with the structured
fields DMCACHE_JOB=, DMCACHE_UID=, DMCACHE_PROJECT=, and the other lines carry journald's
"<N>" level prefix.

The daemon runs in its own mount namespace whose /run is a fresh tmpfs with this test's
datagram socket bound at /run/systemd/journal/socket: what libsystemd sends is read here,
in journald's native protocol, and nothing reaches the machine's own journal. Needs root
(mounts), which CI is: without root the test fails in CI and skips elsewhere.
"""
import json
import os
import socket
import struct
import subprocess

import pytest

import conftest
from conftest import DMCACHE, Daemon

KEY = 'dmc-key-all'


def parse_native(data):
    """journald's native protocol: KEY=VALUE lines, or KEY\\n<u64 le length>VALUE\\n."""
    fields, i = {}, 0
    while i < len(data):
        nl = data.index(b'\n', i)
        line = data[i:nl]
        if b'=' in line:
            k, v = line.split(b'=', 1)
            i = nl + 1
        else:
            k = line
            (n,) = struct.unpack('<Q', data[nl + 1:nl + 9])
            v = data[nl + 9:nl + 9 + n]
            i = nl + 9 + n + 1
        fields[k.decode()] = v.decode()
    return fields


@pytest.fixture
def journal(tmpdir_short):
    if os.geteuid() != 0:
        if os.environ.get('CI'):
            pytest.fail('this test needs root (mount namespaces), which CI is')
        pytest.skip('mount namespaces need root')
    jdir = os.path.join(tmpdir_short, 'journal')
    os.mkdir(jdir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.path.join(jdir, 'socket'))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.settimeout(0.2)
    # the daemon, exec'd in a private mount namespace where /run/systemd/journal is jdir
    wrapper = os.path.join(tmpdir_short, 'in-namespace.sh')
    with open(wrapper, 'w') as f:
        f.write('#!/bin/sh\n'
                'exec unshare --mount --propagation private sh -c \'mount -t tmpfs tmpfs /run'
                ' && mkdir -p /run/systemd/journal && mount --bind "%s" /run/systemd/journal'
                ' && exec "$0" "$@"\' "%s" "$@"\n' % (jdir, conftest.DMCACHED))
    os.chmod(wrapper, 0o755)
    yield sock, wrapper
    sock.close()


def receive(sock):
    got = []
    while True:
        try:
            got.append(parse_native(sock.recv(1 << 20)))
        except socket.timeout:
            return got


def test_job_lines_reach_journald_with_their_fields(emu, tmpdir_short, journal):
    sock, wrapper = journal
    d = Daemon(os.path.join(tmpdir_short, 'd'), start=False,
               env={'JOURNAL_STREAM': '8:12345'})
    real = conftest.DMCACHED
    conftest.DMCACHED = wrapper  # Daemon.start runs conftest.DMCACHED
    try:
        d.start()
    finally:
        conftest.DMCACHED = real
    try:
        env = dict(d.env, DATAMINT_API_KEY=KEY)
        env.pop('DATAMINT_API_URL', None)
        env.pop('JOURNAL_STREAM', None)
        r = subprocess.run([DMCACHE, '--socket', d.socket, 'prefetch', '--json', '--server',
                            emu.url, 'sample'], env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr + d.log()[-3000:]
        events = [json.loads(x) for x in r.stdout.splitlines() if x.startswith('{')]
        job = events[-1]['job_id']
        entries = receive(sock)
    finally:
        rc, _ = d.stop()
        d.notify.close()
    assert rc == 0, d.log()[-3000:]
    mine = [e for e in entries if e.get('DMCACHE_JOB') == str(job)]
    assert mine, (job, entries, d.log()[-2000:])
    for e in mine:
        assert e['SYSLOG_IDENTIFIER'] == 'dmcached', e
        assert e['DMCACHE_UID'] == '0', e
        assert e['DMCACHE_PROJECT'] == 'sample', e
        assert e['PRIORITY'] in ('4', '5'), e
    # the job's start and its end (items, bytes, duration), at notice
    texts = [e['MESSAGE'] for e in mine]
    assert any(t.startswith('notice[fetch]: ') and 'sample' in t for t in texts), texts
    n = events[-1]['items_total']
    assert any("prefetches 'sample'" in t for t in texts), texts
    assert any('done, %d of %d items stored, 0 failed' % (n, n) in t for t in texts), texts
    # the job lines went to the journal only; every other line has its level prefix
    log = d.log()
    assert 'job=%d ' % job not in log, log[-2000:]
    lines = [x for x in log.splitlines() if x.strip()]
    assert lines and all(x[0] == '<' and x[2] == '>' for x in lines), lines[:5]
