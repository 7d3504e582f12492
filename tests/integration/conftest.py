"""Fixtures for integration tests: the real dmcached on a temporary socket.

The daemon is started with NOTIFY_SOCKET pointing at a datagram socket of the test, and
the test waits for READY=1 there: never for a sleep.
"""
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get('DMC_BUILD_ROOT') or os.path.abspath(
    os.path.join(os.path.dirname(__file__), '..', '..', 'build'))
DMCACHED = os.path.join(BUILD, 'daemon', 'dmcached')
DMCACHE = os.path.join(BUILD, 'client', 'dmcache')


class Notify:
    """A NOTIFY_SOCKET listener, as systemd has."""

    def __init__(self, directory):
        self.path = os.path.join(directory, 'notify.sock')
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages = []

    def wait_for(self, word, timeout=10, proc=None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(word in m.split('\n') for m in self.messages):
                return True
            if proc is not None and proc.poll() is not None:
                return False
            self.sock.settimeout(min(0.2, max(0.01, deadline - time.monotonic())))
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                pass
        return False

    def close(self):
        self.sock.close()


class Daemon:
    # every daemon a test started, so that one a failing test left running is stopped
    # after it (the autouse fixture below), not left to the rest of the run
    started = []

    def __init__(self, directory, args=(), env=None, socket_path=None, start=True):
        self.dir = directory
        self.socket = socket_path or os.path.join(directory, 'run', 'dmcached.sock')
        os.makedirs(os.path.dirname(self.socket), mode=0o700, exist_ok=True)
        self.cache = os.path.join(directory, 'cache')
        self.notify = Notify(directory)
        self.stderr_path = os.path.join(directory, 'dmcached.log')
        # DMC_TEST_DAEMON_ARGS: settings for every daemon of a run (the ThreadSanitizer
        # run's longer decode timeout), before the test's own, which win
        self.args = (['--socket', self.socket, '--cache-dir', self.cache, '-v'] +
                     shlex.split(os.environ.get('DMC_TEST_DAEMON_ARGS', '')) + list(args))
        self.env = dict(os.environ, NOTIFY_SOCKET=self.notify.path)
        self.env.pop('LISTEN_FDS', None)
        self.env.pop('LISTEN_PID', None)
        if env:
            self.env.update(env)
        self.proc = None
        if start:
            self.start()

    def start(self, expect_ready=True, **popen):
        self.notify.messages = []  # a restart must say READY=1 again
        self.stderr = open(self.stderr_path, 'ab')
        self.proc = subprocess.Popen([DMCACHED] + self.args, env=self.env, stdout=self.stderr,
                                     stderr=self.stderr, **popen)
        Daemon.started.append(self)
        ready = self.notify.wait_for('READY=1', timeout=20, proc=self.proc)
        if expect_ready and not ready:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError('dmcached did not become ready:\n' + self.log())
        return ready

    def log(self):
        with open(self.stderr_path, 'rb') as f:
            return f.read().decode(errors='replace')

    def stop(self, timeout=10):
        """SIGTERM; returns (exit code, seconds taken)."""
        if self.proc is None or self.proc.poll() is not None:
            return (self.proc.returncode if self.proc else None), 0.0
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        return rc, time.monotonic() - t0

    def rss_kib(self, field='VmRSS'):
        """The daemon's resident memory in KiB: VmRSS, or RssAnon for what it allocated
        alone (VmRSS also counts library pages, faulted in at their first use)"""
        with open('/proc/%d/status' % self.proc.pid) as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
        return 0

    def cli(self, *args, check=False, timeout=30):
        return subprocess.run([DMCACHE, '--socket', self.socket] + list(args), env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture
def tmpdir_short():
    # Unix socket paths are limited to 107 bytes: keep the directory short.
    with tempfile.TemporaryDirectory(prefix='dmc-') as d:
        yield d


@pytest.fixture(autouse=True)
def stop_leftover_daemons():
    """A test that fails before its own d.stop() leaves no daemon running after it."""
    yield
    while Daemon.started:
        Daemon.started.pop().stop(timeout=5)


@pytest.fixture
def daemon(tmpdir_short):
    d = Daemon(tmpdir_short)
    yield d
    rc, _ = d.stop()
    d.notify.close()
    assert rc == 0, 'dmcached exited with %r:\n%s' % (rc, d.log())


@pytest.fixture(scope='module')
def emu():
    """The Datamint emulator on the test corpus, one per test module, stopped cleanly at
    its end. A module that needs another one (synthetic projects, faults from the start)
    defines its own `emu`, which takes precedence."""
    sys.path.insert(0, os.path.join(TESTS, 'emulator'))
    import client as emulator
    e = emulator.Emulator()
    e.start()
    yield e
    assert e.stop() == 0
