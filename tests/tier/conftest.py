"""Fixtures of the tier suite: a throwaway Ceph cluster with one RADOS Gateway (ceph.sh),
started once per session, the Datamint emulator, and dmcached nodes that share the
gateway's bucket as their cluster tier.

The cluster is never optional: when it cannot start, every test of the suite fails with
ceph.sh's reason.
"""
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(TESTS, 'emulator'))
sys.path.append(os.path.join(TESTS, 'integration'))  # modload; last: never shadows ours
import client as emulator  # noqa: E402
import modload  # noqa: E402

# the integration suite's Daemon (its conftest, loaded under another name than ours)
integration = modload.integration_conftest()
DMCACHE, Daemon = integration.DMCACHE, integration.Daemon

CEPH_SH = os.path.join(HERE, 'ceph.sh')


class Tier:
    """The gateway as ceph.sh describes it in DIR/env, and a signed S3 client (curl's own
    SigV4, independent of the daemon's requests)."""

    def __init__(self, directory, env):
        self.dir = directory
        self.endpoint = env['TIER_ENDPOINT']
        self.bucket = env['TIER_BUCKET']
        self.region = env.get('TIER_REGION', 'default')
        self.access = env['TIER_ACCESS_KEY']
        self.secret = env['TIER_SECRET_KEY']

    @property
    def url(self):
        return '%s/%s' % (self.endpoint, self.bucket)

    def s3(self, method, key, data=None, check=True):
        """(HTTP status, body) of a signed request on KEY in the bucket."""
        with tempfile.NamedTemporaryFile() as out:
            args = ['curl', '-sS', '-o', out.name, '-w', '%{http_code}', '-X', method,
                    '--aws-sigv4', 'aws:amz:%s:s3' % self.region,
                    '--user', '%s:%s' % (self.access, self.secret)]
            if method == 'HEAD':
                args[args.index('-X'):args.index('-X') + 2] = ['-I']
            # the gateway wants the payload's hash signed; curl 7.88 does not add it itself
            args += ['-H', 'x-amz-content-sha256: ' +
                     hashlib.sha256(data if data is not None else b'').hexdigest()]
            if data is not None:
                args += ['--data-binary', '@-']
            r = subprocess.run(args + ['%s/%s' % (self.url, key)], input=data,
                               capture_output=True, timeout=60)
            assert r.returncode == 0, r.stderr
            status = int(r.stdout)
            with open(out.name, 'rb') as f:
                body = f.read()
        if check:
            assert 200 <= status < 300, (method, key, status, body[:300])
        return status, body

    def ctl(self, what):
        r = subprocess.run(['bash', CEPH_SH, what, self.dir], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope='session')
def ceph():
    directory = tempfile.mkdtemp(prefix='dmc-ceph-')
    os.rmdir(directory)  # ceph.sh creates it
    r = subprocess.run(['bash', CEPH_SH, 'start', directory, 'dmcache-tier'],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        subprocess.run(['bash', CEPH_SH, 'stop', directory], capture_output=True, timeout=300)
        pytest.fail('the Ceph test cluster did not start (tests/tier/ceph.sh):\n' +
                    r.stdout[-3000:] + r.stderr[-3000:])
    env = {}
    with open(os.path.join(directory, 'env')) as f:
        for line in f:
            if '=' in line:
                k, v = line.strip().split('=', 1)
                env[k] = v.strip('"\'')
    yield Tier(directory, env)
    r = subprocess.run(['bash', CEPH_SH, 'stop', directory], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope='module')
def emu():
    e = emulator.Emulator()
    e.start()
    yield e
    assert e.stop() == 0


@pytest.fixture
def tmpdir_short():
    with tempfile.TemporaryDirectory(prefix='dmc-') as d:
        yield d


@pytest.fixture
def prefix():
    """A key prefix of the test's own: tests share the bucket, never their objects."""
    return 'test-' + uuid.uuid4().hex[:12]


class Node:
    """One node: a dmcached with its own cache and socket, the tier in its configuration."""

    def __init__(self, directory, tier, prefix, url=None, cred_mode=0o600, start=True,
                 env_credentials=False, extra=''):
        os.makedirs(directory, exist_ok=True)
        self.cred = os.path.join(directory, 'tier.credentials')
        with open(self.cred, 'w') as f:
            f.write('[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n'
                    % (tier.access, tier.secret))
        os.chmod(self.cred, cred_mode)
        self.conf = os.path.join(directory, 'dmcached.conf')
        with open(self.conf, 'w') as f:
            f.write('tier_url = %s\ntier_region = %s\ntier_prefix = %s\n'
                    % (url or tier.url, tier.region, prefix))
            if not env_credentials:
                f.write('tier_credentials_file = %s\n' % self.cred)
            f.write(extra)
        env = None
        if env_credentials:
            # the service's environment instead of the file
            env = {'AWS_ACCESS_KEY_ID': tier.access, 'AWS_SECRET_ACCESS_KEY': tier.secret}
        self.d = Daemon(directory, args=['--config', self.conf], env=env, start=start)

    def prefetch(self, emu, project, *args, key=emulator.KEY_ALL, timeout=300):
        env = dict(self.d.env, DATAMINT_API_KEY=key)
        env.pop('DATAMINT_API_URL', None)
        return subprocess.run([DMCACHE, '--socket', self.d.socket, 'prefetch', '--json',
                               '--server', emu.url] + list(args) + [project], env=env,
                              capture_output=True, text=True, timeout=timeout)

    def metrics(self):
        r = self.d.cli('metrics')
        assert r.returncode == 0, r.stderr
        out = {}
        for line in r.stdout.splitlines():
            if line.startswith('dmcache_tier_'):
                name, value = line.split()[:2]
                out[name[len('dmcache_tier_'):]] = float(value)
        return out

    def wait_uploads(self, timeout=120):
        """Until no upload is queued or running; returns the metrics then."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m['uploads_pending'] == 0:
                return m
            assert time.monotonic() < deadline, m
            time.sleep(0.1)

    def stop(self):
        rc, _ = self.d.stop()
        self.d.notify.close()
        assert rc == 0, self.d.log()
