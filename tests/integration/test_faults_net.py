"""Upstream faults seen from the daemon (docs/reliability.md N7): the per-host connection cap and
fairness between two local users who share one server. The real root dmcached, clients run
as alice (61001) and bob (61002), the emulator counting its concurrent connections.
"""
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

import uids
from conftest import DMCACHE, Daemon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'emulator'))
import client as emulator  # noqa: E402

A_KEY = 'dmc-a-' + secrets.token_hex(16)
B_KEY = 'dmc-b-' + secrets.token_hex(16)
A_USER = 'a-n7@example.org'
B_USER = 'b-n7@example.org'
A_FILES, B_FILES = 400, 20
PER_HOST = 4


@pytest.fixture(scope='module')
def emu(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('keys'))
    path = os.path.join(d, 'keys.json')
    with open(path, 'w') as f:
        json.dump({'admin_key': emulator.ADMIN_KEY, 'keys': [
            {'key': A_KEY, 'user': A_USER, 'projects': ['n7a']},
            {'key': B_KEY, 'user': B_USER, 'projects': ['n7b']}]}, f)
    os.chmod(path, 0o644)
    # A's files trickle (8 KiB at 4 KiB/s: 2 s each): A's transfers hold the host's places
    e = emulator.Emulator(keys=path, use_corpus=False,
                          synthetic=['n7a:%d:8192' % A_FILES, 'n7b:%d:8192' % B_FILES])
    e.start()
    yield e
    e.stop()


def daemon_connections(pid, port):
    """Established TCP connections of process `pid` to local port `port` (the daemon's own
    view: a connection it closed is gone, even if the server has not noticed yet)."""
    inodes = set()
    fd_dir = '/proc/%d/fd' % pid
    for fd in os.listdir(fd_dir):
        try:
            link = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if link.startswith('socket:['):
            inodes.add(link[8:-1])
    n = 0
    with open('/proc/%d/net/tcp' % pid) as f:
        for line in f.readlines()[1:]:
            p = line.split()
            if p[3] == '01' and int(p[2].split(':')[1], 16) == port and p[9] in inodes:
                n += 1
    return n


class Sampler(threading.Thread):
    def __init__(self, pid, port):
        super().__init__(daemon=True)
        self.pid, self.port, self.peak, self.stop = pid, port, 0, False

    def run(self):
        while not self.stop:
            try:
                self.peak = max(self.peak, daemon_connections(self.pid, self.port))
            except OSError:
                pass
            time.sleep(0.01)


def prefetch_argv(d, server, project):
    return [DMCACHE, '--socket', d.socket, 'prefetch', '--json', '--server', server, project]


@pytest.mark.parametrize('parallel', [
    PER_HOST,
    16,
])
def test_per_host_cap_and_second_user_starts_at_once(emu, tmpdir_short, parallel):
    """N7: A queues 400 objects first; B's first object starts within 2 s; the server
    never sees more than per_host_connections connections from the daemon."""
    uids.require_root()
    emu.reset()  # faults, log and the connection peak
    emu.add_fault(path=r'^/resources/[^/]+/file$', user=A_USER, rate_bps=4096)
    d = Daemon(tmpdir_short, args=['-o', 'per_host_connections=%d' % PER_HOST, '-o',
                                   'parallel_transfers=%d' % parallel])
    uids.open_up(tmpdir_short, os.path.dirname(d.socket))
    a = None
    sampler = Sampler(d.proc.pid, urllib.parse.urlsplit(emu.url).port)
    sampler.start()
    try:
        env_a = dict(d.env, DATAMINT_API_KEY=A_KEY)
        env_b = dict(d.env, DATAMINT_API_KEY=B_KEY)
        for env in (env_a, env_b):
            env.pop('DATAMINT_API_URL', None)
        a = uids.popen(uids.ALICE, prefetch_argv(d, emu.url, 'n7a'), env=env_a,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # A's job has listed and fills every place before B asks
        end = time.monotonic() + 20
        while time.monotonic() < end:
            if sum(1 for e in emu.log() if e['user'] == A_USER and
                   e['path'].endswith('/file')) >= 1 or \
                    emu.stats().get('active_connections', 0) >= PER_HOST:
                break
            time.sleep(0.1)
        time.sleep(1)
        t_b = time.time()
        rb = uids.run(uids.BOB, prefetch_argv(d, emu.url, 'n7b'), env=env_b, timeout=120)
        assert rb.returncode == 0, rb.stdout[-2000:] + rb.stderr
        files_b = sorted((e['time'] - e['duration_ms'] / 1000.0) for e in emu.log()
                         if e['user'] == B_USER and e['path'].endswith('/file'))
        assert len(files_b) >= B_FILES
        first = files_b[0] - t_b
        st = emu.stats()
        sampler.stop = True
        sampler.join()
        print('N7 (parallel_transfers %d): ' % parallel)
        print('N7: B first object starts %.2f s after its prefetch; peak connections: %d '
              'daemon side, %r server side (cap %d); B took %.1f s for %d objects'
              % (first, sampler.peak, st.get('peak_connections'), PER_HOST,
                 time.time() - t_b, B_FILES))
        assert a.poll() is None, 'A finished first: the test did not load the host'
        assert first <= 2.0
        # the daemon's own sockets: the server's count also holds connections the daemon
        # closed (a preempted trickle) until its handler notices, up to a second later
        assert 0 < sampler.peak <= PER_HOST
    finally:
        sampler.stop = True
        if a is not None and a.poll() is None:
            a.kill()
            a.wait()
        rc, _ = d.stop()
    assert rc == 0, d.log()[-3000:]
