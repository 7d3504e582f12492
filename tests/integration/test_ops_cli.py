"""The CLI is consistent across its commands: every command that prints data takes --json
and its JSON equals what is on disk and in the cache; an unknown option or command gets a
"did you mean" suggestion, with one wording for every command; a missing API key, an
unexpected argument and a failed local write read the same everywhere; the exit statuses
are the documented ones (4 for local errors); `evict` of a name that matches nothing
fails and names the snapshots the caller may evict, and only theirs (or, for a snapshot a
prefetch is filling, says how to stop the job).

Against the real daemon over its socket, with a snapshot prefetched from the emulator.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import uids
from conftest import DMCACHE, Daemon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'emulator'))
import client as emulator  # noqa: E402

SYN = 'syn:3:2048'
COMMANDS = ['status', 'ping', 'prefetch', 'ls', 'evict', 'verify', 'get', 'metrics']


@pytest.fixture(scope='module')
def emu():
    e = emulator.Emulator(synthetic=[SYN])
    e.start()
    yield e
    assert e.stop() == 0


@pytest.fixture
def daemon(tmpdir_short, emu):
    d = Daemon(tmpdir_short, args=['-o', 'servers=' + emu.url])
    d.user_env = dict(d.env, DATAMINT_API_KEY=emulator.KEY_ALL, DATAMINT_API_URL=emu.url,
                      HOME=tmpdir_short)
    r = run(d, 'prefetch', 'syn')
    assert r.returncode == 0, r.stdout + r.stderr
    yield d
    rc, _ = d.stop()
    d.notify.close()
    assert rc == 0, 'dmcached exited with %r:\n%s' % (rc, d.log())


def run(d, *args, env=None, stdout=subprocess.PIPE):
    return subprocess.run([DMCACHE, '--socket', d.socket] + list(args),
                          env=env or d.user_env, stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=120)


def offline(*args, env=None):
    """The CLI with no daemon at all: usage errors are found before connecting."""
    env = dict(env or os.environ, DMCACHE_SOCKET='/nonexistent/dmcached.sock')
    return subprocess.run([DMCACHE] + list(args), env=env, capture_output=True, text=True,
                          timeout=30)


def objects(cache):
    """{path: size} of every blob file of the cache, walked independently of the daemon."""
    out = {}
    for root, _, files in os.walk(os.path.join(cache, 'objects')):
        for f in files:
            p = os.path.join(root, f)
            out[p] = os.path.getsize(p)
    return out


# ---- --json ----

def test_every_command_that_prints_data_takes_json(daemon, tmpdir_short):
    d = daemon
    r = run(d, 'ping', '--json')
    assert r.returncode == 0, r.stderr
    ping = json.loads(r.stdout)
    assert ping['socket'] == d.socket and ping['protocol'] == 1
    assert ping['daemon'].startswith('dmcached ')

    r = run(d, 'status', '--json')
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status['daemon'] == ping['daemon'] and status['pid'] == d.proc.pid

    ls = json.loads(run(d, 'ls', '--json').stdout)
    assert [s['project_name'] for s in ls] == ['syn'] and ls[0]['items'] == 3

    # get (of the corpus' X-rays: syn's items are not images): the JSON describes the
    # files it wrote, as numpy reads them
    out = os.path.join(tmpdir_short, 'item.npy')
    r = run(d, 'get', 'xray', '1', '-o', out, '--json')
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    arr = np.load(out)
    assert got['output'] == out and got['index'] == 1 and got['project'] == 'xray'
    assert tuple(got['shape']) == arr.shape and got['nbytes'] == arr.nbytes
    assert np.dtype(got['dtype']) == arr.dtype
    assert got['metadata'] == os.path.join(tmpdir_short, 'item.json')
    with open(got['metadata']) as f:
        assert 'resource' in json.load(f)

    # the get's OPEN started a job that fills the xray snapshot; EVICT leaves a snapshot a
    # job fills alone, so the job ends first (on a loaded machine it outlives the get)
    for _ in range(300):
        r = run(d, 'status', '--json')
        assert r.returncode == 0, r.stderr
        if json.loads(r.stdout)['counters'].get('prefetch_jobs', 0) == 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError('the xray job did not end in 30 s: ' + r.stdout)

    # verify: counts equal the files in the cache directory (a tensor the get decoded is
    # stored after its reply: compare once the directory holds still across a verify)
    for _ in range(50):
        files = objects(d.cache)
        r = run(d, 'verify', '--json')
        assert r.returncode == 0, r.stderr
        if objects(d.cache) == files:
            break
        time.sleep(0.1)
    assert json.loads(r.stdout) == {'files_checked': len(files), 'files_bad': 0,
                                    'bytes_checked': json.loads(r.stdout)['bytes_checked']}
    assert 0 < json.loads(r.stdout)['bytes_checked'] <= sum(files.values())

    r = run(d, 'prefetch', '--cancel', 'syn', '--json')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {'project': 'syn', 'cancelled': 0}

    # evict: what it says it freed is what left the disk
    r = run(d, 'evict', 'syn', '--json')
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    gone = {p: s for p, s in files.items() if p not in objects(d.cache)}
    assert ev == {'snapshots': 1, 'files': len(gone), 'bytes': sum(gone.values())}
    assert len(gone) >= 3
    r = run(d, 'evict', '--all', '--json')
    assert r.returncode == 0 and json.loads(r.stdout)['snapshots'] == 1  # xray
    assert objects(d.cache) == {}
    r = run(d, 'evict', '--all', '--json')
    assert r.returncode == 0 and json.loads(r.stdout) == {'snapshots': 0, 'files': 0,
                                                          'bytes': 0}


def test_help_lists_json_for_every_data_command():
    r = offline('--help')
    assert r.returncode == 0
    for cmd in ('status', 'ping', 'prefetch', 'ls', 'evict', 'verify', 'get'):
        h = offline(cmd, '--help')
        assert h.returncode == 0 and h.stdout.startswith('Usage: dmcache ' + cmd), cmd
        assert '--json' in h.stdout, cmd
        line = [l for l in r.stdout.splitlines() if l.startswith('  ' + cmd)]
        assert any('--json' in l for l in line), (cmd, line)


# ---- unknown options and commands ----

@pytest.mark.parametrize('args,message', [
    (['prefetch', '--verison', '3', 'ct'],
     "dmcache prefetch: unknown option '--verison'; did you mean '--version'? "
     "(dmcache prefetch --help lists the options)"),
    (['get', 'ct', '0', '-o', 'x.npy', '--lutt'],
     "dmcache get: unknown option '--lutt'; did you mean '--lut'? "
     "(dmcache get --help lists the options)"),
    (['status', '--josn'],
     "dmcache status: unknown option '--josn'; did you mean '--json'? "
     "(dmcache status --help lists the options)"),
    (['evict', '--alll'],
     "dmcache evict: unknown option '--alll'; did you mean '--all'? "
     "(dmcache evict --help lists the options)"),
    (['ls', '--ofline'],
     "dmcache ls: unknown option '--ofline'; did you mean '--offline'? "
     "(dmcache ls --help lists the options)"),
    (['metrics', '--ouptut=x'],
     "dmcache metrics: unknown option '--ouptut'; did you mean '--output'? "
     "(dmcache metrics --help lists the options)"),
    (['--sockt', '/x', 'status'],
     "dmcache: unknown option '--sockt'; did you mean '--socket'? "
     "(dmcache --help lists the options)"),
    (['status', '--socket', '/x'],
     "dmcache status: unknown option '--socket'; --socket goes before the command: "
     "dmcache --socket PATH status (dmcache status --help lists the options)"),
    (['stauts'], "dmcache: unknown command 'stauts'; did you mean 'status'? "
                 "(dmcache --help lists them)"),
    (['prefech', 'ct'], "dmcache: unknown command 'prefech'; did you mean 'prefetch'? "
                        "(dmcache --help lists them)"),
    (['frobnicate'], "dmcache: unknown command 'frobnicate' (dmcache --help lists them)"),
    (['get', 'ct', '0', '-o', 'x.npy', '--dtype'], "dmcache get: option '--dtype' needs a value"),
    (['metrics', '-o'], "dmcache metrics: option '-o' needs a value"),
    (['ls', '-x'], "dmcache ls: unknown option '-x' (dmcache ls --help lists the options)"),
])
def test_unknown_options_and_commands(args, message):
    r = offline(*args)
    assert r.returncode == 2, r.stderr
    assert r.stderr == message + '\n'
    assert r.stdout == ''


def test_one_wording_across_commands(tmpdir_short):
    for cmd in COMMANDS:
        r = offline(cmd, '--no-such-option')
        assert r.returncode == 2, cmd
        assert r.stderr == ("dmcache %s: unknown option '--no-such-option' (dmcache %s --help "
                            "lists the options)\n" % (cmd, cmd)), r.stderr
    for cmd in ('status', 'ping', 'ls', 'verify', 'metrics'):
        r = offline(cmd, 'extra')
        assert r.returncode == 2, cmd
        assert r.stderr == "dmcache %s: unexpected argument 'extra' (dmcache %s --help)\n" % (
            cmd, cmd), r.stderr
    r = offline('get', 'ct', '0', 'extra', '-o', 'x.npy')
    assert r.returncode == 2 and r.stderr == (
        "dmcache get: unexpected argument 'extra' (dmcache get --help)\n"), r.stderr

    # the missing-key hint: the same for prefetch and get, naming the file looked at
    env = {'PATH': os.environ['PATH'], 'HOME': tmpdir_short}
    yaml = os.path.join(tmpdir_short, '.config', 'datamintapi', 'datamintapi.yaml')
    hint = ("no Datamint API key: set DATAMINT_API_KEY, or save it with datamint-config "
            "(%s), or pass --api-key\n" % yaml)
    for args in (['prefetch', 'ct'], ['get', 'ct', '0', '-o', 'x.npy']):
        r = offline(*args, env=env)
        assert r.returncode == 2
        assert r.stderr == 'dmcache %s: %s' % (args[0], hint), r.stderr


# ---- exit statuses ----

def test_exit_status_4_for_local_errors(daemon, tmpdir_short):
    d = daemon
    missing = os.path.join(tmpdir_short, 'no-such-dir', 'x.npy')
    r = run(d, 'get', 'xray', '0', '-o', missing)
    assert r.returncode == 4, r.stderr
    assert r.stderr == "dmcache get: cannot write '%s': No such file or directory\n" % missing
    prom = os.path.join(tmpdir_short, 'no-such-dir', 'dmcache.prom')
    r = run(d, 'metrics', '-o', prom)
    assert r.returncode == 4, r.stderr
    assert r.stderr == "dmcache metrics: cannot write '%s': No such file or directory\n" % prom
    # stdout that cannot take the output: a full device
    with open('/dev/full', 'w') as full:
        for args in (['ls', '--json'], ['status'], ['ping']):
            r = run(d, *args, stdout=full)
            assert r.returncode == 4, (args, r.stderr)
            assert r.stderr == 'dmcache %s: cannot write the output: No space left on ' \
                               'device\n' % args[0], r.stderr
    # and the daemon's errors stay 1, an unreachable daemon 3
    r = run(d, 'get', 'syn', '7', '-o', os.path.join(tmpdir_short, 'y.npy'))
    assert r.returncode == 2 and 'out of range' in r.stderr
    r = run(d, 'prefetch', 'no-such-project')
    assert r.returncode == 1 and 'not_found_or_denied' in r.stderr
    assert offline('ls').returncode == 3


# ---- evict of nothing ----

def test_evict_of_nothing_fails_and_names_what_there_is(daemon, tmpdir_short):
    d = daemon
    r = run(d, 'evict', 'sny')
    assert r.returncode == 1 and r.stdout == ''
    assert r.stderr == ("dmcache evict: no snapshot of 'sny' in the cache; did you mean "
                        "'syn'? The snapshots you may evict: syn\n"), r.stderr
    r = run(d, 'evict', 'other', '--json')
    assert r.returncode == 1
    assert json.loads(r.stdout) == {'snapshots': 0, 'files': 0, 'bytes': 0, 'known': ['syn']}
    assert r.stderr == ("dmcache evict: no snapshot of 'other' in the cache; the snapshots "
                        "you may evict: syn\n")
    # nothing was evicted by the failed attempts
    assert [s['project_name'] for s in json.loads(run(d, 'ls', '--json').stdout)] == ['syn']

    # another user sees none of root's names
    uids.require_root()
    uids.open_up(tmpdir_short, os.path.dirname(d.socket))
    env = {'PATH': os.environ['PATH'], 'HOME': '/nonexistent'}
    r = uids.run(uids.ALICE, [DMCACHE, '--socket', d.socket, 'evict', 'syn'], env=env)
    assert r.returncode == 1
    assert r.stderr == ("dmcache evict: no snapshot of 'syn' in the cache; you have no "
                        "snapshots in it\n"), r.stderr
    assert [s['project_name'] for s in json.loads(run(d, 'ls', '--json').stdout)] == ['syn']

    r = run(d, 'evict', 'syn')
    assert r.returncode == 0 and r.stdout.startswith('evicted 1 snapshot, ')
    r = run(d, 'evict', '--all')
    assert r.returncode == 0 and r.stdout == 'nothing to evict: no snapshots in the cache\n'


def test_evict_of_a_snapshot_a_job_is_filling(daemon, emu):
    d = daemon
    emu.add_fault(path=r'^/resources/[^/]+/file$', rate_bps=1024)
    p = subprocess.Popen([DMCACHE, '--socket', d.socket, 'prefetch', '--json', 'xray'],
                         env=d.user_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        for line in p.stdout:
            if json.loads(line).get('state') == 'downloading':
                break
        ls = json.loads(run(d, 'ls', '--json').stdout)
        states = {s['project_name']: s['state'] for s in ls}
        assert states == {'syn': 'complete', 'xray': 'downloading'}, states
        r = run(d, 'evict', 'xray')
        assert r.returncode == 1 and r.stdout == ''
        assert r.stderr == ("dmcache evict: a prefetch is filling 'xray' now; stop it first "
                            "with dmcache prefetch --cancel xray\n"), r.stderr
        r = run(d, 'prefetch', '--cancel', 'xray', '--json')
        assert r.returncode == 0 and json.loads(r.stdout) == {'project': 'xray', 'cancelled': 1}
        assert p.wait(timeout=30) == 1  # its job was cancelled
    finally:
        p.kill()
        p.wait()
        emu.clear_faults()
    r = run(d, 'evict', 'xray')
    assert r.returncode == 0 and r.stdout.startswith('evicted 1 snapshot'), r.stdout + r.stderr
