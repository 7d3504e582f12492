"""O4, clock jumps: the wall clock of the daemon jumps a year forward, then back to a day
before now, while it works (libfaketime preloaded, the time read from a file at every
call; CLOCK_MONOTONIC left alone, as a real jump leaves it).

What must hold (docs/reliability.md O4): timers and retry backoff run on the monotonic
clock, so a job retrying across a jump still ends when the server answers; nothing is
evicted because everything suddenly looks a year old; nothing stored is downloaded again
after the jump back. Offline grants are dated by the wall clock (their age is what
grant_ttl bounds): a grant dated in the future (recorded while the clock was ahead) is
not trusted, so a wrong clock cannot stretch offline entitlement past grant_ttl.

Plain build only: libfaketime cannot be preloaded before the sanitizers' runtime.
"""
import json
import os
import subprocess
import time

import pytest

from conftest import DMCACHE, Daemon

KEY = 'dmc-key-all'
FAKETIME = '/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1'


@pytest.fixture
def daemon(tmpdir_short):
    if not os.path.exists(FAKETIME):
        pytest.fail('libfaketime is not installed (scripts/install-deps.sh installs it)')
    clock = os.path.join(tmpdir_short, 'clock')
    with open(clock, 'w') as f:
        f.write('+0\n')
    d = Daemon(os.path.join(tmpdir_short, 'd'), start=False, env={
        'LD_PRELOAD': FAKETIME, 'FAKETIME_TIMESTAMP_FILE': clock, 'FAKETIME_NO_CACHE': '1',
        'FAKETIME_DONT_FAKE_MONOTONIC': '1', 'FAKETIME_DONT_RESET': '1'})
    d.start()
    yield d, clock
    rc, _ = d.stop()
    d.notify.close()
    assert rc == 0, d.log()[-3000:]


def set_clock(path, offset):
    with open(path + '.new', 'w') as f:
        f.write(offset + '\n')
    os.rename(path + '.new', path)


def client_env(d):
    """The daemon's environment for a client: the real clock, the test's key."""
    env = dict(d.env, DATAMINT_API_KEY=KEY)
    for k in ('LD_PRELOAD', 'FAKETIME_TIMESTAMP_FILE', 'DATAMINT_API_URL'):
        env.pop(k, None)
    return env


def cli(d, *args, timeout=120):
    return subprocess.run([DMCACHE, '--socket', d.socket] + list(args), env=client_env(d),
                          capture_output=True, text=True, timeout=timeout)


def prefetch(d, emu, project):
    r = cli(d, 'prefetch', '--json', '--server', emu.url, project)
    events = [json.loads(x) for x in r.stdout.splitlines() if x.startswith('{')]
    assert r.returncode == 0, r.stderr + d.log()[-3000:]
    return events[-1]


def counters(d):
    r = cli(d, 'status', '--json')
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)['counters']


def downloads(emu, since):
    return [e for e in emu.log(since=since) if e['path'].endswith('/file')]


def test_clock_jumps_forward_and_back(emu, daemon):
    d, clock = daemon
    first = prefetch(d, emu, 'sample')
    assert first['state'] == 'done' and first['items_done'] == first['items_total']
    assert cli(d, 'get', '--offline', '--server', emu.url, 'sample', '0', '-o',
               os.path.join(d.dir, 'a.npy')).returncode == 0

    # a year ahead: a job lists (its grant is dated then) and meets 503s with Retry-After;
    # while it waits them out the clock goes back to a day before now (366 days back):
    # its backoff runs on the monotonic clock, so it ends as soon as the server answers
    set_clock(clock, '+365d')
    time.sleep(0.2)
    emu.add_fault(path=r'^/resources/[^/]+/file$', status=503, retry_after=2, times=4)
    t0 = time.monotonic()
    job = subprocess.Popen([DMCACHE, '--socket', d.socket, 'prefetch', '--json', '--server',
                            emu.url, 'ct'], env=client_env(d), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not [e for e in emu.log() if e['status'] == 503] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [e for e in emu.log() if e['status'] == 503], 'no retry was provoked'
    set_clock(clock, '-1d')
    out, err = job.communicate(timeout=120)
    took = time.monotonic() - t0
    assert job.returncode == 0, err + d.log()[-3000:]
    ct = [json.loads(x) for x in out.splitlines() if x.startswith('{')][-1]
    assert ct['state'] == 'done' and ct['items_done'] == ct['items_total'], ct
    assert took < 60, took
    # nothing was evicted for looking a year old, or a year young
    c = counters(d)
    assert c['cache_evicted_total'] == 0, c
    r = cli(d, 'ls', '--json')
    snaps = {s['project_name']: s for s in json.loads(r.stdout)}
    assert snaps['sample']['items_stored'] == snaps['sample']['items'], snaps
    assert snaps['ct']['items_stored'] == snaps['ct']['items'], snaps

    # nothing stored is downloaded again
    mark = emu.log()[-1]['seq']
    again = prefetch(d, emu, 'sample')
    assert again['state'] == 'done' and again['items_cached'] == again['items_total'], again
    assert downloads(emu, mark + 1) == []

    # the grant of 'ct' was recorded a year ahead: with the clock back it is dated in the
    # future, and an offline read is refused rather than trusted for a year
    r = cli(d, 'get', '--offline', '--server', emu.url, 'ct', '0', '-o',
            os.path.join(d.dir, 'b.npy'))
    assert r.returncode != 0, r.stdout
    assert 'not entitled offline' in r.stderr and 'future' in r.stderr, r.stderr
    # the grant of 'sample' was renewed a moment ago (the clock then said -1d): fresh
    r = cli(d, 'get', '--offline', '--server', emu.url, 'sample', '0', '-o',
            os.path.join(d.dir, 'c.npy'))
    assert r.returncode == 0, r.stderr
