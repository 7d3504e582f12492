"""Upstream transfers that are fair between local users, fail fast where waiting cannot
help, and leave no trace of API keys: the real root dmcached, clients run as alice (61001)
and bob (61002), the emulator over HTTP.

- fairness: bob's prefetch from his own trickling server (a second emulator on loopback
  with no corpus, 40 synthetic files sent at 4 KiB/s) holds every place; alice's prefetch
  from the real emulator must still resolve and list at once and complete, while bob keeps
  downloading and never sees a byte of hers.
- the speed floor (min_speed over min_speed_time) ends a trickle and retries it, with a
  notice in the job's events.
- a host that does not resolve, and a closed loopback port, end the prefetch at once with a
  message naming them.
- a 503 then 200 shows "retrying in ... (attempt 2 of N)" in the CLI's output, once.
- after alice's job, not one copy of her key is left in the daemon's memory.
"""
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time

import pytest

import uids
from conftest import DMCACHE, Daemon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'emulator'))
import client as emulator  # noqa: E402

# long random keys that cannot occur by chance in any memory or log
ALICE_KEY = 'dmc-alice-' + secrets.token_hex(24)
BOB_KEY = 'dmc-bob-' + secrets.token_hex(24)
ALICE_USER = 'alice-trust@example.org'
BOB_USER = 'bob-trust@example.org'
SLOW_BPS = 4096


def write_json(path, obj):
    with open(path, 'w') as f:
        json.dump(obj, f)
    os.chmod(path, 0o644)
    return path


@pytest.fixture(scope='module')
def keysdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp('keys'))


@pytest.fixture(scope='module')
def emu(keysdir):
    """The real emulator with the corpus; alice's key sees `ct` and the synthetic `floor`."""
    with open(os.path.join(emulator.corpus_dir(), 'keys.json')) as f:
        keys = json.load(f)
    keys['keys'].append({'key': ALICE_KEY, 'user': ALICE_USER, 'projects': ['ct', 'floor']})
    path = write_json(os.path.join(keysdir, 'alice-keys.json'), keys)
    e = emulator.Emulator(keys=path, synthetic=['floor:4:262144'])
    e.start()
    yield e
    assert e.stop() == 0


@pytest.fixture
def clean(emu):
    emu.clear_faults()
    emu.clear_log()
    yield emu
    emu.clear_faults()


@pytest.fixture
def slow_emu(keysdir):
    """Bob's own server: no corpus, 40 files of 64 KiB, every file body at 4 KiB/s."""
    path = write_json(os.path.join(keysdir, 'bob-keys.json'), {
        'admin_key': emulator.ADMIN_KEY,
        'keys': [{'key': BOB_KEY, 'user': BOB_USER, 'projects': '*'}]})
    e = emulator.Emulator(keys=path, use_corpus=False, synthetic=['bobdata:40:65536'],
                          faults=[{'path': r'^/resources/[^/]+/file$', 'rate_bps': SLOW_BPS}])
    e.start()
    yield e
    e.stop()


def start_daemon(tmpdir, *opts):
    uids.require_root()
    args = []
    for o in opts:
        args += ['-o', o]
    d = Daemon(tmpdir, args=args)
    # the socket's directory is 0755 in production: alice and bob may reach it
    uids.open_up(tmpdir, os.path.dirname(d.socket))
    return d


def stop(d):
    rc, _ = d.stop()
    assert rc == 0, d.log()


def user_env(d, key):
    env = dict(d.env, DATAMINT_API_KEY=key)
    env.pop('DATAMINT_API_URL', None)
    return env


def cli_prefetch_argv(d, server, project, json_out=True):
    return [DMCACHE, '--socket', d.socket, 'prefetch'] + (['--json'] if json_out else []) + \
        ['--server', server, project]


def events_of(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith('{')]


def final(events):
    done = [e for e in events if 'state' in e]
    return done[-1] if done else {}


# ---- (a) fair places ----

def test_trickling_user_does_not_starve_another(clean, slow_emu, tmpdir_short):
    """parallel_transfers=4: bob's trickle takes all four places; alice gets her share."""
    emu = clean
    d = start_daemon(tmpdir_short, 'parallel_transfers=4', 'min_speed=1K')
    bob = uids.popen(uids.BOB, cli_prefetch_argv(d, slow_emu.url, 'bobdata'),
                     env=user_env(d, BOB_KEY), stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    try:
        # bob holds every place: four file bodies trickling from his server
        deadline = time.monotonic() + 20
        while slow_emu.stats()['active_connections'] < 4:
            assert time.monotonic() < deadline, slow_emu.stats()
            assert bob.poll() is None
            time.sleep(0.1)
        time.sleep(1.0)
        assert slow_emu.stats()['active_connections'] >= 4
        bob_files_before = len([e for e in slow_emu.log() if e['path'].endswith('/file')])

        t0 = time.time()
        alice = uids.popen(uids.ALICE, cli_prefetch_argv(d, emu.url, 'ct'),
                           env=user_env(d, ALICE_KEY), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
        bob_active = []
        while alice.poll() is None:
            bob_active.append(slow_emu.stats()['active_connections'])
            assert time.time() - t0 < 120, 'alice did not finish'
            time.sleep(0.2)
        out, err = alice.communicate()
        took = time.time() - t0
        ev = events_of(out)
        assert alice.returncode == 0, err + out
        f = final(ev)
        assert f['state'] == 'done' and f['items_done'] == f['items_total'] == 72, f

        # she resolved and listed at once: her API requests ended within 2 s of her start
        api = [e for e in emu.log() if e['listener'] == 'main' and
               not e['path'].endswith('/file')]
        assert api and all(e['user'] == ALICE_USER for e in api)
        listed_at = max(e['time'] + e['duration_ms'] / 1000 for e in api) - t0
        assert listed_at < 2.0, listed_at
        # and the CLI saw her job past listing within 2 s (progress events come each second)
        past = [e for e in ev if e['state'] not in ('resolving', 'listing')]
        assert past and past[0]['elapsed_ms'] < 2000 + 1000, past[:1]
        print('alice: listed %.3f s after her start (server log), first event past listing '
              'at %d ms, done in %.1f s' % (listed_at, past[0]['elapsed_ms'], took))

        # bob was not starved: his downloads went on all along
        assert bob.poll() is None
        assert bob_active and min(bob_active) >= 1, bob_active
        print('bob: live downloads from his server while alice ran: %s' % bob_active)
        # and while bob holds more than his share he gives way: alice had places
        mine = [e for e in emu.log() if e['path'].endswith('/file')]
        assert len(mine) >= 72

        # not one request of alice's reached bob's server, nor of bob's hers
        assert all(e['user'] == BOB_USER for e in slow_emu.log()), \
            {e['user'] for e in slow_emu.log()}
        assert all(e['user'] in (ALICE_USER,) for e in emu.log() if e['listener'] == 'main')
        assert len([e for e in slow_emu.log() if e['path'].endswith('/file')]) >= \
            bob_files_before
    finally:
        r = uids.run(uids.BOB, [DMCACHE, '--socket', d.socket, 'prefetch', '--cancel',
                                'bobdata', '--server', slow_emu.url], env=user_env(d, BOB_KEY))
        try:
            bout, berr = bob.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            bob.kill()
            bout, berr = bob.communicate()
    assert r.returncode == 0, r.stdout + r.stderr
    # bob never received a byte of alice's: no name, id, version or key of hers
    ct = emu.project('ct')
    for needle in ('"ct"', ct['id'], ALICE_KEY, ALICE_USER):
        assert needle not in bout and needle not in berr, needle
    bev = events_of(bout)
    assert bev and all(e['project_name'] == 'bobdata' for e in bev)
    assert final(bev)['state'] == 'cancelled'
    assert all(e['bytes_done'] <= 40 * 65536 for e in bev)
    # bob's listing shows his snapshot only
    r = uids.run(uids.BOB, [DMCACHE, '--socket', d.socket, 'ls', '--json'], env=d.env)
    assert r.returncode == 0, r.stderr
    assert ct['id'] not in r.stdout and '"ct"' not in r.stdout
    stop(d)


# ---- (b) the speed floor ----

def test_speed_floor_ends_a_trickle_and_retries(clean, tmpdir_short):
    emu = clean
    p = emu.project('floor')
    res = emulator.request(emu.url, path='/projects/%s/resources' % p['id'],
                           key=ALICE_KEY).json()
    victim = res[1]['id']
    path = '/resources/%s/file' % victim
    # 256 KiB at 8 KiB/s would take 32 s: below 32 KiB/s over 2 s, it ends and is retried
    emu.add_fault(path='^%s$' % path, rate_bps=8192, times=1)
    d = start_daemon(tmpdir_short, 'min_speed=32K', 'min_speed_time=2s', 'backoff_base=200ms')
    t0 = time.monotonic()
    r = uids.run(uids.ALICE, cli_prefetch_argv(d, emu.url, 'floor'),
                 env=user_env(d, ALICE_KEY), timeout=60)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    ev = events_of(r.stdout)
    f = final(ev)
    assert f['state'] == 'done' and f['items_done'] == 4 and f['items_failed'] == 0
    notices = [(e.get('notice_resource'), e['notice']) for e in ev if e.get('notice')]
    assert any(res == victim and
               re.match(r'retrying in \d+\.\d s \(attempt 2 of \d+\): slower than min_speed',
                        msg) for res, msg in notices), notices
    assert took < 15, took
    # the emulator logs the trickle once it notices the closed connection
    deadline = time.monotonic() + 20
    while len([e for e in emu.log() if e['path'] == path]) < 2:
        assert time.monotonic() < deadline, emu.log()
        time.sleep(0.1)
    tries = sorted([e for e in emu.log() if e['path'] == path], key=lambda e: e['time'])
    assert len(tries) == 2 and tries[1]['status'] in (200, 206)
    # the trickle was ended after about min_speed_time, and the retry resumed where it was
    assert 1.5 < tries[0]['duration_ms'] / 1000 < 6.0, tries
    resumed = re.match(r'bytes=(\d+)-$', tries[1]['range'] or '')
    assert tries[1]['status'] == 200 or (resumed and 0 < int(resumed.group(1)) <=
                                         tries[0]['bytes']), tries
    print('speed floor: ended after %.1f s; notice: %s' %
          (tries[0]['duration_ms'] / 1000,
           next(msg for res, msg in notices if res == victim)))
    stop(d)


# ---- (c) fail fast ----

def test_unresolvable_host_and_refused_port_fail_at_once(tmpdir_short):
    d = start_daemon(tmpdir_short)
    t0 = time.monotonic()
    r = uids.run(uids.ALICE, cli_prefetch_argv(d, 'http://no-such-host.invalid', 'ct',
                                               json_out=False),
                 env=user_env(d, ALICE_KEY), timeout=30)
    dns_s = time.monotonic() - t0
    assert r.returncode != 0
    assert "cannot resolve host 'no-such-host.invalid'" in r.stderr, r.stderr
    assert 'upstream_permanent' in r.stderr, r.stderr
    assert dns_s < 2.0, dns_s

    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    t0 = time.monotonic()
    r = uids.run(uids.ALICE, cli_prefetch_argv(d, 'http://127.0.0.1:%d' % port, 'ct',
                                               json_out=False),
                 env=user_env(d, ALICE_KEY), timeout=30)
    refused_s = time.monotonic() - t0
    assert r.returncode != 0
    assert 'connection refused by 127.0.0.1:%d' % port in r.stderr, r.stderr
    assert refused_s < 2.0, refused_s
    print('DNS failure ended in %.3f s, refused port in %.3f s' % (dns_s, refused_s))
    stop(d)


# ---- (d) a retry shows in the CLI ----

def test_retry_is_shown_once_by_the_cli(clean, tmpdir_short):
    emu = clean
    res = emulator.request(emu.url, path='/projects/%s/resources' % emu.project('ct')['id'],
                           key=ALICE_KEY).json()
    victim = res[0]['id']
    emu.add_fault(path='^/resources/%s/file$' % victim, status=503, times=1)
    # and the job's own first request (resolving the project): a retry there shows too
    emu.add_fault(path='^/projects$', status=503, times=1)
    d = start_daemon(tmpdir_short, 'backoff_base=500ms', 'max_attempts=4')
    r = uids.run(uids.ALICE, cli_prefetch_argv(d, emu.url, 'ct', json_out=False),
                 env=user_env(d, ALICE_KEY), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if 'retrying in' in ln]
    assert len(lines) == 2, r.stderr  # one line per retry
    assert re.match(r'dmcache: retrying in \d+\.\d s \(attempt 2 of 4\): HTTP 503',
                    lines[0]), lines
    assert re.search(r'item %s: retrying in \d+\.\d s \(attempt 2 of 4\): HTTP 503' % victim,
                     lines[1]), lines
    print('CLI:', ' | '.join(lines))
    stop(d)


# ---- (e) no trace of the key ----

def readable_regions(pid):
    with open('/proc/%d/maps' % pid) as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split('-'))
            name = parts[5] if len(parts) > 5 else ''
            if parts[1][0] == 'r' and name not in ('[vvar]', '[vsyscall]', '[vvar_vclock]'):
                yield lo, hi, name


SHADOW_MIN = 1 << 40  # a sanitizer's shadow memory (terabytes, reserved): no user data


def key_copies(pid, needle):
    """Occurrences of `needle` in every readable region of the process, read in chunks
    that overlap by len(needle) - 1 so that no copy straddles unseen."""
    found, scanned = [], 0
    chunk = 64 << 20
    with open('/proc/%d/mem' % pid, 'rb', buffering=0) as mem:
        for lo, hi, name in readable_regions(pid):
            if hi - lo >= SHADOW_MIN:
                continue
            pos = lo
            while pos < hi:
                n = min(chunk + len(needle) - 1, hi - pos)
                try:
                    mem.seek(pos)
                    data = mem.read(n)
                except OSError:
                    break
                scanned += min(len(data), chunk)
                i = data.find(needle)
                while i >= 0:
                    found.append((hex(pos + i), name))
                    i = data.find(needle, i + 1)
                if len(data) < n:
                    break
                pos += chunk
    return sorted(set(found)), scanned


def children(pid):
    out = []
    for task in os.listdir('/proc/%d/task' % pid):
        try:
            with open('/proc/%d/task/%s/children' % (pid, task)) as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def key_residue_check(emu, tmpdir, *opts):
    """alice prefetches `ct` from `emu` with her key; then no copy of it is in memory."""
    # a dropped connection and a retry on the way: more paths that held the key
    emu.add_fault(path='/resources/.*/file$', drop_after=1000, times=2)
    emu.add_fault(path='/resources/.*/file$', status=503, times=1)
    d = start_daemon(tmpdir, 'backoff_base=200ms', *opts)
    pid = d.proc.pid
    r = uids.run(uids.ALICE, cli_prefetch_argv(d, emu.url, 'ct'), env=user_env(d, ALICE_KEY),
                 timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert final(events_of(r.stdout))['state'] == 'done'
    # the key went out with every API request
    assert all(e['user'] == ALICE_USER for e in emu.log() if e['listener'] == 'main')
    # the job has ended: its key must be gone from every byte of the daemon
    time.sleep(0.5)
    needle = ALICE_KEY.encode()
    found, scanned = key_copies(pid, needle)
    assert scanned > 1 << 20
    assert found == [], found
    for child in children(pid):
        cfound, _ = key_copies(child, needle)
        assert cfound == [], (child, cfound)
    print('scanned %.1f MiB of dmcached (pid %d) and %d worker(s): %d copies of the key' %
          (scanned / 2**20, pid, len(children(pid)), len(found)))
    stop(d)


def test_key_leaves_no_trace_in_daemon_memory(clean, tmpdir_short):
    key_residue_check(clean, tmpdir_short)


def test_key_leaves_no_trace_over_tls(keysdir, tmpdir_short):
    """The same over HTTPS: OpenSSL's buffers saw the key too."""
    import trustme
    ca = trustme.CA()
    pem = os.path.join(keysdir, 'server.pem')
    ca.issue_cert('127.0.0.1', '127.0.0.2').private_key_and_cert_chain_pem.write_to_path(pem)
    ca_file = os.path.join(keysdir, 'ca.pem')
    ca.cert_pem.write_to_path(ca_file)
    os.chmod(ca_file, 0o644)
    with open(os.path.join(emulator.corpus_dir(), 'keys.json')) as f:
        keys = json.load(f)
    keys['keys'].append({'key': ALICE_KEY, 'user': ALICE_USER, 'projects': ['ct']})
    path = write_json(os.path.join(keysdir, 'alice-keys-tls.json'), keys)
    with emulator.Emulator(keys=path, extra_args=['--tls-cert', pem, '--tls-key', pem]) as emu:
        assert emu.url.startswith('https://')
        key_residue_check(emu, tmpdir_short, 'ca_file=' + ca_file)
