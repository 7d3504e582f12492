"""Online OPEN from a fresh grant (docs/security.md, "Online OPEN"): an online OPEN whose
uid's own key the server accepted within `grant_recheck` for a complete snapshot is
answered at once from that grant, and the same key is checked with the server after it;
a refusal withdraws the grants that key proved, so the next OPEN of that uid is refused,
online and offline, while the other uid's grant is untouched. A grant older than
`grant_recheck`, or proved with another key, makes the OPEN wait for the server again.

Two real uids (alice 61001, bob 61002) with their own keys, a root daemon as the system
service runs it, the emulator over HTTP; a revoked key is a 401 for every request of its
user (the emulator's fault rules). Nothing is timed: the daemon's counters say which OPENs
were answered from a grant.
"""
import json
import os
import sys
import time

import pytest

import uids
from conftest import DMCACHE, Daemon
from uids import ALICE, BOB

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'emulator'))
import client as emulator  # noqa: E402
from test_trust_cache import asan_preload, user_env as plain_user_env  # noqa: E402


OPEN_CODE = '''
import json, sys
import dmcache._lib as L
c = L.Client()
try:
    ds = c.open(L.SOURCE_DATAMINT, "sample", server=%r, api_key=%r, offline=%r)
except Exception as e:
    print(json.dumps({"error": "%%s: %%s" %% (type(e).__name__, e)}))
    sys.exit(0)
items = ds.get([0])
out = {"items": ds.items, "snapshot": ds.snapshot_id, "status": items[0].status}
ds.release(items)
ds.close()
c.close()
print(json.dumps(out))
'''


@pytest.fixture
def tmp(tmpdir_short):
    uids.require_root()
    os.chmod(tmpdir_short, 0o755)
    for uid, name in ((ALICE, 'alice'), (BOB, 'bob')):
        uids.owned_dir(os.path.join(tmpdir_short, name), uid)
    yield tmpdir_short


def user_env(key=None, **extra):
    # an ASan build's library needs its runtime loaded first
    return asan_preload(plain_user_env(key, **extra))


def prefetch(d, uid, url, key):
    r = uids.run(uid, [DMCACHE, '--socket', d.socket, 'prefetch', '--json', '--server', url,
                       'sample'], env=user_env(key), timeout=180)
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{')]
    done = [e for e in events if 'state' in e]
    assert r.returncode == 0 and done and done[-1]['state'] == 'done', r.stdout + r.stderr
    return done[-1]


def open_as(d, uid, url, key, offline=False):
    r = uids.run(uid, ['/usr/bin/python3', '-c', OPEN_CODE % (url, key, offline)],
                 env=user_env(key, DMCACHE_SOCKET=d.socket), timeout=180)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def counters(d):
    r = d.cli('status', '--json')
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)['counters']


def wait_counter(d, name, at_least, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if counters(d)[name] >= at_least:
            return
        time.sleep(0.1)
    raise AssertionError('%s stayed below %d:\n%s' % (name, at_least, d.log()[-3000:]))


def wait_jobs_idle(d, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if counters(d)['prefetch_jobs'] == 0:
            return
        time.sleep(0.1)
    raise AssertionError('jobs still running:\n' + d.log()[-3000:])


def test_open_from_a_fresh_grant_and_revocation(tmp, emu):
    emu.clear_faults()
    d = Daemon(tmp, args=['-o', 'grant_recheck=1h'])
    uids.open_up(os.path.dirname(d.socket))
    try:
        a = prefetch(d, ALICE, emu.url, emulator.KEY_ALL)
        b = prefetch(d, BOB, emu.url, emulator.KEY_SAMPLE)
        assert a['items_total'] == b['items_total'] > 0
        wait_jobs_idle(d)
        base = counters(d)
        assert base['prefetch_opens_from_grant_total'] == 0  # prefetches wait for the server

        # both keys were accepted just now: each OPEN is answered from its own grant, and
        # its check runs after it
        alice = open_as(d, ALICE, emu.url, emulator.KEY_ALL)
        bob = open_as(d, BOB, emu.url, emulator.KEY_SAMPLE)
        assert alice['status'] == bob['status'] == 0 and alice['items'] == a['items_total']
        assert alice['snapshot'] != bob['snapshot']  # each uid's own snapshot
        wait_jobs_idle(d)
        st = counters(d)
        assert st['prefetch_opens_from_grant_total'] == 2
        assert st['prefetch_jobs_total'] == base['prefetch_jobs_total'] + 2  # the checks
        assert st['prefetch_grants_withdrawn_total'] == 0

        # bob's key is revoked upstream: his next OPEN may still be answered from the
        # grant, but its check is refused and withdraws the grant...
        rule = emu.add_fault(user='bob@example.org', status=401, message='key revoked')
        first = open_as(d, BOB, emu.url, emulator.KEY_SAMPLE)
        wait_counter(d, 'prefetch_grants_withdrawn_total', 1)
        wait_jobs_idle(d)
        if 'error' not in first:  # answered before the check came back
            assert counters(d)['prefetch_opens_from_grant_total'] == 3
        # ...so every later OPEN of bob's is refused, online and offline
        again = open_as(d, BOB, emu.url, emulator.KEY_SAMPLE)
        assert 'error' in again and ('401' in again['error'] or
                                     'key revoked' in again['error']), again
        off = open_as(d, BOB, emu.url, emulator.KEY_SAMPLE, offline=True)
        assert 'error' in off and 'not entitled offline' in off['error'], off
        # alice's grant is untouched: still answered at once, online and offline
        n = counters(d)['prefetch_opens_from_grant_total']
        assert open_as(d, ALICE, emu.url, emulator.KEY_ALL)['status'] == 0
        assert open_as(d, ALICE, emu.url, emulator.KEY_ALL, offline=True)['status'] == 0
        assert counters(d)['prefetch_opens_from_grant_total'] == n + 1
        wait_jobs_idle(d)

        # bob's key accepted again: one OPEN that waits for the server proves it anew
        emu.remove_fault(rule)
        assert open_as(d, BOB, emu.url, emulator.KEY_SAMPLE)['status'] == 0
        assert counters(d)['prefetch_opens_from_grant_total'] == n + 1
        wait_jobs_idle(d)
        assert open_as(d, BOB, emu.url, emulator.KEY_SAMPLE)['status'] == 0
        assert counters(d)['prefetch_opens_from_grant_total'] == n + 2
        wait_jobs_idle(d)

        # bob's key with alice's uid: not the key her grant was proved with, so the OPEN
        # waits for the server (which accepts it for this project)
        assert open_as(d, ALICE, emu.url, emulator.KEY_SAMPLE)['status'] == 0
        assert counters(d)['prefetch_opens_from_grant_total'] == n + 2
        wait_jobs_idle(d)
    finally:
        emu.clear_faults()
        assert d.stop()[0] == 0, d.log()[-3000:]


def test_a_grant_older_than_grant_recheck_waits_for_the_server(tmp, emu):
    """With grant_recheck = 1s, an OPEN two seconds after the last check asks the server
    first: a key revoked meanwhile is refused at that OPEN, without any OPEN answered."""
    emu.clear_faults()
    d = Daemon(tmp, args=['-o', 'grant_recheck=1s'])
    uids.open_up(os.path.dirname(d.socket))
    try:
        prefetch(d, BOB, emu.url, emulator.KEY_SAMPLE)
        wait_jobs_idle(d)
        time.sleep(2.1)
        rule = emu.add_fault(user='bob@example.org', status=401, message='key revoked')
        r = open_as(d, BOB, emu.url, emulator.KEY_SAMPLE)
        assert 'error' in r, r
        st = counters(d)
        assert st['prefetch_opens_from_grant_total'] == 0
        assert st['prefetch_grants_withdrawn_total'] == 1
        emu.remove_fault(rule)
        wait_jobs_idle(d)
    finally:
        emu.clear_faults()
        assert d.stop()[0] == 0, d.log()[-3000:]


def test_a_slow_server_still_renews_the_grant_it_was_answered_from(tmp, emu):
    """An online OPEN whose server does not answer within 2 s is served from the grant
    (docs/security.md, offline reads); the server's late answer with the same version
    renews that grant, so the next OPEN within grant_recheck is answered at once."""
    emu.clear_faults()
    d = Daemon(tmp, args=['-o', 'grant_recheck=10s'])
    uids.open_up(os.path.dirname(d.socket))
    try:
        prefetch(d, BOB, emu.url, emulator.KEY_SAMPLE)
        wait_jobs_idle(d)
        time.sleep(10.5)  # the grant is older than grant_recheck: OPENs ask the server
        rule = emu.add_fault(path='^/datasets/', latency_ms=3000)
        assert open_as(d, BOB, emu.url, emulator.KEY_SAMPLE)['status'] == 0
        wait_jobs_idle(d)
        assert counters(d)['prefetch_opens_from_grant_total'] == 0
        emu.remove_fault(rule)
        time.sleep(1.5)  # the late answer came after the fallback (3 s against 2 s)
        assert open_as(d, BOB, emu.url, emulator.KEY_SAMPLE)['status'] == 0
        assert counters(d)['prefetch_opens_from_grant_total'] == 1
        wait_jobs_idle(d)
    finally:
        emu.clear_faults()
        assert d.stop()[0] == 0, d.log()[-3000:]
