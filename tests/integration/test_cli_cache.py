"""The cache commands of the dmcache CLI, end to end: the real CLI, the real dmcached, the
Datamint emulator over HTTP.

prefetch (plain lines, --json, the summary, exit statuses, Ctrl-C detaching, --cancel),
ls, evict, verify, and where the CLI finds the Datamint key and URL (options, environment,
datamintapi.yaml and its permission checks). Each test starts its own daemon with an
empty cache; the emulator is shared by the module and its faults are cleared between
tests. Slow transfers come from the emulator's rate_bps fault, never from sleeps.
"""
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import DMCACHE, Daemon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'emulator'))
import client as emulator  # noqa: E402

KEY = emulator.KEY_ALL
SYN_ITEMS = 32  # two rounds of the daemon's 16 parallel transfers
SYN_SIZE = 32768
SYN_TOTAL = '1.0 MiB'  # SYN_ITEMS * SYN_SIZE as the CLI prints sizes (IEC, one decimal)
FILE_PATH = r'^/resources/[^/]+/file$'
DETACH_MSG = ('detached: dmcached continues the prefetch; '
              '`dmcache prefetch --cancel syn` stops it')


@pytest.fixture(scope='module')
def emu():
    e = emulator.Emulator(synthetic=['syn:%d:%d' % (SYN_ITEMS, SYN_SIZE)])
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
def daemon(tmpdir_short):
    d = Daemon(tmpdir_short)
    yield d
    rc, _ = d.stop()
    d.notify.close()
    assert rc == 0, 'dmcached exited with %r:\n%s' % (rc, d.log())


def cli_env(d, home=None, **extra):
    """The daemon's environment without any Datamint setting, HOME in the test's dir."""
    env = {k: v for k, v in d.env.items()
           if k not in ('DATAMINT_API_KEY', 'DATAMINT_API_URL', 'XDG_CONFIG_HOME')}
    env['HOME'] = home or os.path.join(d.dir, 'home')
    os.makedirs(env['HOME'], exist_ok=True)
    env.update(extra)
    return env


def run(d, *args, env=None, timeout=120):
    return subprocess.run([DMCACHE, '--socket', d.socket] + list(args),
                          env=env if env is not None else cli_env(d),
                          capture_output=True, text=True, timeout=timeout)


def prefetch(d, emu, *args, key=KEY, timeout=120):
    env = cli_env(d, DATAMINT_API_KEY=key, DATAMINT_API_URL=emu.url)
    return run(d, 'prefetch', *args, env=env, timeout=timeout)


def json_lines(text):
    out = [json.loads(line) for line in text.splitlines()]
    assert out, 'no JSON lines'
    return out


def slow(emu, rate=16384):
    """Every file body at `rate` bytes/s: a prefetch of syn takes several seconds."""
    emu.add_fault(path=FILE_PATH, rate_bps=rate)


def file_gets(emu, n, timeout=10):
    """The emulator's log entries of file downloads, once there are `n` (the log is
    written when a response is over, which may be after the daemon got the last byte)."""
    end = time.monotonic() + timeout
    while True:
        got = [e for e in emu.log() if e['method'] == 'GET' and e['path'].endswith('/file')]
        if len(got) >= n or time.monotonic() > end:
            return got
        time.sleep(0.05)


def syn_ids(emu):
    p = emu.project('syn')
    r = emulator.request(emu.url, path='/projects/%s/resources' % p['id'], key=KEY)
    assert r.status == 200
    return [x['id'] for x in r.json()]


def start_json_prefetch(d, emu, project='syn'):
    env = cli_env(d, DATAMINT_API_KEY=KEY, DATAMINT_API_URL=emu.url)
    return subprocess.Popen([DMCACHE, '--socket', d.socket, 'prefetch', '--json', project],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, bufsize=1)


def read_event(proc, timeout=20):
    """The next JSON line of a running `prefetch --json`."""
    r, _, _ = select.select([proc.stdout], [], [], timeout)
    assert r, 'no event within %s s' % timeout
    line = proc.stdout.readline()
    assert line, 'prefetch ended: %s' % proc.stderr.read()
    return json.loads(line)


def read_until(proc, pred, timeout=30):
    end = time.monotonic() + timeout
    while True:
        ev = read_event(proc, max(0.1, end - time.monotonic()))
        if pred(ev):
            return ev


# ---- prefetch: output, summary, exit statuses ----

def test_plain_output_progress_and_summary(clean, daemon):
    slow(clean)
    t0 = time.monotonic()
    r = prefetch(daemon, clean, 'syn')
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    out = r.stdout
    # not a terminal: plain lines, no carriage returns or escape sequences
    assert '\r' not in out and '\x1b' not in out
    lines = out.splitlines()
    assert lines[0] == 'syn: starting the prefetch'
    prog = [ln for ln in lines if re.match(r'^syn: downloading \d+%, ', ln)]
    assert len(prog) >= 2, out
    pcts = [int(re.match(r'^syn: downloading (\d+)%', ln).group(1)) for ln in prog]
    assert pcts == sorted(pcts) and pcts[-1] <= 100
    for ln in prog:
        m = re.match(r'^syn: downloading \d+%, (\d+)/(\d+) items, [\d.]+ (B|KiB|MiB) of '
                     + re.escape(SYN_TOTAL) + r', [\d.]+ (B|KiB|MiB)/s(, ETA (\d+)s)?$', ln)
        assert m, ln
        assert int(m.group(2)) == SYN_ITEMS and int(m.group(1)) <= SYN_ITEMS
    # at most one progress line per second (plus state changes)
    assert len(prog) <= took + 2
    assert 'syn version ' in out and ': complete' in out
    assert ('  items:  %d of %d stored (%d downloaded, 0 from the cache), 0 failed'
            % (SYN_ITEMS, SYN_ITEMS, SYN_ITEMS)) in lines
    assert re.search(r'^  bytes:  ' + re.escape(SYN_TOTAL) +
                     r' downloaded in \d+s \([\d.]+ (KiB|MiB)/s\)$', out, re.M), out
    assert re.search(r'^  snapshot \d+ \(dmcache ls\)$', out, re.M)
    assert r.stderr == ''

    # again: everything comes from the cache, nothing is downloaded
    file_gets(clean, SYN_ITEMS)
    clean.clear_log()
    r = prefetch(daemon, clean, 'syn')
    assert r.returncode == 0, r.stderr
    assert ('  items:  %d of %d stored (0 downloaded, %d from the cache), 0 failed'
            % (SYN_ITEMS, SYN_ITEMS, SYN_ITEMS)) in r.stdout.splitlines()
    assert '  bytes:  0 B downloaded in ' in r.stdout
    assert file_gets(clean, 0) == []


def test_json_events_and_two_jobs_at_once(clean, tmpdir_short):
    # room for both jobs' transfers at once
    daemon = Daemon(tmpdir_short, args=['-o', 'parallel_transfers=64', '-o',
                                        'per_host_connections=64'])
    # only syn's files are slow: 8 KiB/s each, all at once
    prefix = syn_ids(clean)[0].split('-')[0]
    clean.add_fault(path=r'^/resources/%s-[^/]+/file$' % prefix, rate_bps=8192)
    p = start_json_prefetch(daemon, clean, 'syn')
    try:
        first = read_until(p, lambda e: e['state'] == 'downloading')
        # a second job runs beside the first and ends while the first goes on
        r = prefetch(daemon, clean, '--json', 'sample')
        assert r.returncode == 0, r.stderr
        other = json_lines(r.stdout)[-1]
        assert other['state'] == 'done' and other['job_id'] != first['job_id']
        assert p.poll() is None
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
        p.wait()
        rc, _ = daemon.stop()
        daemon.notify.close()
    assert rc == 0, daemon.log()
    assert p.returncode == 0, err
    evs = [first] + json_lines(out)
    assert [e['event'] for e in evs[:-1]] == ['progress'] * (len(evs) - 1)
    assert len(evs) >= 3
    fin = evs[-1]
    assert fin['event'] == 'final' and fin['state'] == 'done'
    assert fin['items_total'] == fin['items_done'] == SYN_ITEMS
    assert fin['items_failed'] == 0 and fin['items_cached'] == 0
    assert fin['bytes_total'] == fin['bytes_done'] == SYN_ITEMS * SYN_SIZE
    assert fin['project_name'] == 'syn' and fin['project_id'] == clean.project('syn')['id']
    assert fin['version'] and fin['snapshot_id'] > 0 and 'error' not in fin
    assert len({e['job_id'] for e in evs}) == 1
    keys = {'event', 'job_id', 'snapshot_id', 'state', 'project_id', 'project_name',
            'version', 'items_total', 'items_done', 'items_cached', 'items_failed',
            'bytes_total', 'bytes_done', 'rate_bps', 'eta_ms', 'elapsed_ms'}
    for a, b in zip(evs, evs[1:]):
        assert set(a) == keys
        assert b['items_done'] >= a['items_done'] and b['bytes_done'] >= a['bytes_done']
        assert b['elapsed_ms'] >= a['elapsed_ms']
    dl = [e for e in evs if e['state'] == 'downloading']
    assert dl and any(e['rate_bps'] > 0 for e in dl)
    assert any(e['eta_ms'] > 0 for e in dl)
    # the rate is what the emulator allowed: 32 transfers at 8 KiB/s
    assert max(e['rate_bps'] for e in dl) <= SYN_ITEMS * 8192 * 1.5


def test_failed_items_exit_1_with_errors(clean, daemon):
    ids = syn_ids(clean)
    bad = ids[3:6]
    for rid in bad:
        clean.add_fault(path='^/resources/%s/file$' % rid, status=404,
                        message='Resource not found')
    r = prefetch(daemon, clean, 'syn')
    assert r.returncode == 1, r.stdout + r.stderr
    # each failed item on stderr, with its id, the error name and the HTTP status
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith('dmcache: item ')]
    assert sorted(re.match(r'dmcache: item (\S+): ', ln).group(1) for ln in errs) == sorted(bad)
    for ln in errs:
        assert ln.endswith(' (not_found_or_denied, HTTP 404)'), ln
    assert ': finished with failures' in r.stdout
    assert ('  items:  %d of %d stored (%d downloaded, 0 from the cache), 3 failed'
            % (SYN_ITEMS - 3, SYN_ITEMS, SYN_ITEMS - 3)) in r.stdout.splitlines()

    # --json: the same failures as events with an error object, and a failed final record
    r = prefetch(daemon, clean, '--json', 'syn')
    assert r.returncode == 1
    evs = json_lines(r.stdout)
    fin = evs[-1]
    assert fin['event'] == 'final' and fin['state'] == 'failed'
    assert fin['items_failed'] == 3 and fin['items_done'] == SYN_ITEMS - 3
    assert fin['items_cached'] == SYN_ITEMS - 3
    assert fin['error']['http_status'] == 404 and fin['error']['resource'] in bad
    assert fin['error']['name'] == 'not_found_or_denied' and fin['error']['code'] == 1003
    failed = [e['error']['resource'] for e in evs[:-1] if 'error' in e]
    assert sorted(failed) == sorted(bad)


def test_job_that_cannot_start(clean, daemon):
    r = prefetch(daemon, clean, 'no-such-project')
    assert r.returncode == 1
    assert '(not_found_or_denied)' in r.stderr
    # a key that may not see the project gets the very same answer
    r2 = prefetch(daemon, clean, 'sample', key=emulator.KEY_NONE)
    assert r2.returncode == 1
    assert r2.stderr.split(': ', 2)[2] == r.stderr.split(': ', 2)[2]
    r = prefetch(daemon, clean, '--json', 'no-such-project')
    assert r.returncode == 1
    ev = json_lines(r.stdout)[-1]
    assert ev['event'] == 'error' and ev['name'] == 'not_found_or_denied'
    assert ev['code'] == 1003 and ev['message']


def test_unreachable_daemon_exit_3(tmpdir_short):
    sock = os.path.join(tmpdir_short, 'none.sock')
    env = dict(os.environ, DATAMINT_API_KEY=KEY, HOME=tmpdir_short)
    for args in (['prefetch', 'syn'], ['prefetch', '--cancel', 'syn'], ['ls'],
                 ['evict', '--all'], ['verify']):
        r = subprocess.run([DMCACHE, '--socket', sock] + args, env=env, capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 3, args
        assert 'is dmcached running? tried ' + sock in r.stderr


def test_daemon_lost_mid_prefetch_exit_3(clean, tmpdir_short):
    d = Daemon(tmpdir_short)
    slow(clean, rate=4096)
    p = start_json_prefetch(d, clean)
    try:
        read_until(p, lambda e: e['state'] == 'downloading')
        d.proc.kill()
        d.proc.wait()
        assert p.wait(timeout=10) == 3
        assert 'lost the daemon' in p.stderr.read()
    finally:
        p.kill()
        p.wait()
        d.notify.close()


def test_usage_errors(daemon):
    for args in (['prefetch'], ['prefetch', 'a', 'b'], ['prefetch', '--source', '/', 'a'],
                 ['prefetch', '--source', '/', '--api-key', 'k'], ['prefetch', '--bogus', 'a'],
                 ['ls', 'x'], ['evict'], ['evict', 'a', '--all'], ['evict', 'a', 'b'],
                 ['verify', 'x']):
        r = run(daemon, *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
    for cmd in ('prefetch', 'ls', 'evict', 'verify'):
        r = run(daemon, cmd, '--help')
        assert r.returncode == 0 and r.stdout.startswith('Usage: dmcache ' + cmd), cmd
    r = run(daemon, '--help')
    assert r.returncode == 0
    for word in ('prefetch PROJECT', 'ls [--json]', 'evict PROJECT | --all', 'verify',
                 'DATAMINT_API_KEY', 'datamintapi.yaml', '130'):
        assert word in r.stdout, word


# ---- Ctrl-C and --cancel ----

def test_ctrl_c_detaches_and_the_job_goes_on(clean, daemon):
    slow(clean, rate=8192)
    p = start_json_prefetch(daemon, clean)
    try:
        ev = read_until(p, lambda e: e['state'] == 'downloading')
        job = ev['job_id']
        # right after an event the next one is a second away: the wait itself must
        # return on SIGINT, not the next event
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=10)
        waited = time.monotonic() - t0
        out, err = p.communicate()
    finally:
        p.kill()
        p.wait()
    assert rc == 130
    assert waited < 0.7, waited
    assert err.strip().splitlines()[-1] == DETACH_MSG
    assert json.loads(out.splitlines()[-1]) == {'event': 'detached'}

    # the daemon goes on with the same job: a new prefetch joins it and sees it end
    clean.clear_faults()
    r = prefetch(daemon, clean, '--json', 'syn')
    assert r.returncode == 0, r.stderr
    fin = json_lines(r.stdout)[-1]
    assert fin['job_id'] == job and fin['state'] == 'done'
    assert fin['items_done'] == SYN_ITEMS and fin['items_cached'] == 0
    ls = json.loads(run(daemon, 'ls', '--json').stdout)
    assert [(s['project_name'], s['complete']) for s in ls] == [('syn', True)]


def test_ctrl_c_on_a_terminal(clean, daemon):
    """The bar on a pseudo-terminal (script(1)), then Ctrl-C."""
    slow(clean, rate=8192)
    env = cli_env(daemon, DATAMINT_API_KEY=KEY, DATAMINT_API_URL=clean.url)
    cmd = '%s --socket %s prefetch syn' % (DMCACHE, daemon.socket)
    p = subprocess.Popen(['script', '-qfec', cmd, '/dev/null'], env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        buf = b''
        end = time.monotonic() + 30
        while b'ETA' not in buf and time.monotonic() < end:
            r, _, _ = select.select([p.stdout], [], [], 1)
            if r:
                buf += os.read(p.stdout.fileno(), 4096)
        assert b'ETA' in buf, buf
        # the interrupt key: the terminal sends SIGINT to its foreground process group
        p.stdin.write(b'\x03')
        p.stdin.flush()
        end = time.monotonic() + 10
        while p.poll() is None and time.monotonic() < end:
            r, _, _ = select.select([p.stdout], [], [], 0.2)
            if r:
                buf += os.read(p.stdout.fileno(), 4096)
        buf += p.stdout.read()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    text = buf.decode()
    # one line redrawn with a carriage return: bar, percent, items, bytes, rate, ETA
    bar = (r'\r\[[#-]{10,40}\] +\d+%  \d+/' + str(SYN_ITEMS) + r' items  [\d.]+ (B|KiB|MiB)'
           r'/' + re.escape(SYN_TOTAL) + r'  [\d.]+ (B|KiB|MiB)/s  ETA \d+(s|m \d\ds)\x1b\[K')
    assert re.search(bar, text), text
    assert DETACH_MSG in text
    assert p.returncode == 130


def test_cancel(clean, daemon):
    slow(clean, rate=4096)
    p = start_json_prefetch(daemon, clean)
    try:
        read_until(p, lambda e: e['state'] == 'downloading')
        r = run(daemon, 'prefetch', '--cancel', 'syn')
        assert r.returncode == 0, r.stderr
        assert r.stdout == "cancelled 1 prefetch job of 'syn'\n"
        fin = read_until(p, lambda e: e['event'] == 'final')
        assert p.wait(timeout=10) == 1
    finally:
        p.kill()
        p.wait()
    assert fin['state'] == 'cancelled' and fin['items_done'] < SYN_ITEMS
    r = run(daemon, 'prefetch', '--cancel', 'syn')
    assert r.returncode == 0 and r.stdout == "no prefetch of 'syn' is running\n"
    # what was stored stays, as a partial snapshot
    ls = json.loads(run(daemon, 'ls', '--json').stdout)
    assert len(ls) == 1 and not ls[0]['complete']
    assert ls[0]['items'] == SYN_ITEMS and ls[0]['items_stored'] == fin['items_done']
    r = run(daemon, 'ls')
    assert re.search(r' %d/%d .* partial$' % (fin['items_done'], SYN_ITEMS), r.stdout, re.M)


# ---- ls, evict, verify ----

def test_ls_evict_verify(clean, daemon):
    assert prefetch(daemon, clean, 'sample').returncode == 0
    assert prefetch(daemon, clean, 'syn').returncode == 0
    sizes = {}
    for name in ('sample', 'syn'):
        pid = clean.project(name)['id']
        res = emulator.request(clean.url, path='/projects/%s/resources' % pid, key=KEY).json()
        sizes[name] = (len(res), sum(int(x['size']) for x in res))

    ls = json.loads(run(daemon, 'ls', '--json').stdout)
    by = {s['project_name']: s for s in ls}
    assert set(by) == {'sample', 'syn'}
    for name, (n, nbytes) in sizes.items():
        s = by[name]
        assert (s['items'], s['items_stored'], s['bytes']) == (n, n, nbytes), s
        assert s['complete'] is True and s['source'] == 'datamint'
        assert s['server'] == clean.url and s['project_id'] == clean.project(name)['id']
        assert s['version'] and s['created_ms'] > 1.6e12

    table = run(daemon, 'ls').stdout.splitlines()
    assert re.match(r'^ID +PROJECT +VERSION +ITEMS +SIZE +STATE$', table[0]), table[0]
    assert len(table) == 3
    for ln in table[1:]:
        f = ln.split()
        s = by[f[1]]
        assert int(f[0]) == s['id'] and f[2] == s['version']
        assert f[3] == '%d/%d' % (s['items_stored'], s['items']) and f[-1] == 'complete'
    syn_row = [ln for ln in table if ' syn ' in ln][0]
    assert ' %s ' % SYN_TOTAL in syn_row

    r = run(daemon, 'verify')
    assert r.returncode == 0, r.stderr
    m = re.match(r'^checked (\d+) files \(([\d.]+ MiB)\): all good$', r.stdout.strip())
    assert m, r.stdout
    nfiles = int(m.group(1))
    # sample's items, its masks, and syn's items
    assert nfiles >= sizes['sample'][0] + sizes['syn'][0]

    # evict one project: nothing of it is left
    r = run(daemon, 'evict', 'syn')
    assert r.returncode == 0, r.stderr
    # freed: the files' sizes, headers included
    assert re.match(r'^evicted 1 snapshot, %d files, 1\.0 MiB freed$' % SYN_ITEMS,
                    r.stdout), r.stdout
    ls = json.loads(run(daemon, 'ls', '--json').stdout)
    assert [s['project_name'] for s in ls] == ['sample']
    # evicting it again finds nothing: an error that names what there is
    r = run(daemon, 'evict', 'syn')
    assert r.returncode == 1 and r.stdout == ''
    assert r.stderr == ("dmcache evict: no snapshot of 'syn' in the cache; the snapshots you "
                        "may evict: sample\n"), r.stderr

    # a flipped byte in one of sample's files: verify finds it, removes it, exits 1
    nleft = nfiles - SYN_ITEMS
    objs = []
    for root, _, files in os.walk(os.path.join(daemon.cache, 'objects')):
        objs += [os.path.join(root, f) for f in files]
    assert len(objs) == nleft
    victim = sorted(objs)[len(objs) // 2]
    with open(victim, 'r+b') as f:
        f.seek(-1, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xff]))
    r = run(daemon, 'verify')
    assert r.returncode == 1
    assert re.match(r'^checked %d files \(.*\): 1 bad, removed; they will be fetched again '
                    r'when needed$' % nleft, r.stdout.strip()), r.stdout
    assert not os.path.exists(victim)
    r = run(daemon, 'verify')
    assert r.returncode == 0 and r.stdout.startswith('checked %d files ' % (nleft - 1))

    # then the rest
    r = run(daemon, 'evict', '--all')
    assert r.returncode == 0 and r.stdout.startswith('evicted 1 snapshot, ')
    assert json.loads(run(daemon, 'ls', '--json').stdout) == []
    r = run(daemon, 'ls')
    assert r.stdout == 'no snapshots in the cache (dmcache prefetch PROJECT adds one)\n'
    r = run(daemon, 'verify')
    assert r.returncode == 0 and r.stdout == 'checked 0 files (0 B): all good\n'
    r = run(daemon, 'evict', '--all')
    assert r.stdout == 'nothing to evict: no snapshots in the cache\n'


# ---- credentials ----

def write_yaml(home, text, mode=0o600, xdg=None):
    d = os.path.join(xdg or os.path.join(home, '.config'), 'datamintapi')
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, 'datamintapi.yaml')
    with open(path, 'w') as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def test_credentials_from_environment_and_options(clean, daemon):
    home = os.path.join(daemon.dir, 'h-env')
    dead = 'http://127.0.0.1:9'  # nothing listens on the discard port
    # environment only
    env = cli_env(daemon, home, DATAMINT_API_KEY=KEY, DATAMINT_API_URL=clean.url + '/')
    r = run(daemon, 'prefetch', 'sample', env=env)
    assert r.returncode == 0, r.stderr
    assert KEY not in r.stdout + r.stderr
    # --server before DATAMINT_API_URL
    env = cli_env(daemon, home, DATAMINT_API_KEY=KEY, DATAMINT_API_URL=dead)
    r = run(daemon, 'prefetch', '--server', clean.url, 'sample', env=env)
    assert r.returncode == 0, r.stderr
    # --api-key before DATAMINT_API_KEY, with a warning about ps
    env = cli_env(daemon, home, DATAMINT_API_KEY=emulator.KEY_NONE, DATAMINT_API_URL=clean.url)
    r = run(daemon, 'prefetch', '--api-key', KEY, 'sample', env=env)
    assert r.returncode == 0, r.stderr
    assert 'warning: --api-key is visible to other users' in r.stderr
    assert KEY not in r.stdout + r.stderr
    # the key the daemon used is the one that was given: KEY_NONE sees nothing
    r = run(daemon, 'prefetch', 'sample', env=env)
    assert r.returncode == 1 and '(not_found_or_denied)' in r.stderr
    # no key anywhere
    env = cli_env(daemon, home, DATAMINT_API_URL=clean.url)
    clean.clear_log()
    r = run(daemon, 'prefetch', 'sample', env=env)
    assert r.returncode == 2
    assert 'no Datamint API key: set DATAMINT_API_KEY' in r.stderr
    assert os.path.join(home, '.config', 'datamintapi', 'datamintapi.yaml') in r.stderr
    assert clean.log() == []
    # a server URL that is not http(s)
    env = cli_env(daemon, home, DATAMINT_API_KEY=KEY, DATAMINT_API_URL='api.datamint.io')
    r = run(daemon, 'prefetch', 'sample', env=env)
    assert r.returncode == 2 and 'not an http:// or https:// URL' in r.stderr


def test_credentials_from_datamintapi_yaml(clean, daemon):
    home = os.path.join(daemon.dir, 'h-yaml')
    # what `datamint-config` writes (yaml.dump sorts the keys)
    path = write_yaml(home, 'api_key: %s\ndefault_api_url: %s\n' % (KEY, clean.url))
    env = cli_env(daemon, home)
    r = run(daemon, 'prefetch', '--json', 'sample', env=env)
    assert r.returncode == 0, r.stderr
    assert json_lines(r.stdout)[-1]['state'] == 'done'
    assert KEY not in r.stdout + r.stderr
    # the environment comes before the file, for each of the two
    env2 = cli_env(daemon, home, DATAMINT_API_KEY=emulator.KEY_NONE)
    r = run(daemon, 'prefetch', 'sample', env=env2)
    assert r.returncode == 1 and '(not_found_or_denied)' in r.stderr
    # $XDG_CONFIG_HOME/datamintapi/datamintapi.yaml comes before ~/.config
    xdg = os.path.join(home, 'xdg')
    write_yaml(home, 'api_key: %s\ndefault_api_url: %s\n' % (emulator.KEY_NONE, clean.url),
               xdg=xdg)
    r = run(daemon, 'prefetch', 'sample', env=cli_env(daemon, home, XDG_CONFIG_HOME=xdg))
    assert r.returncode == 1 and '(not_found_or_denied)' in r.stderr

    # a key file others may read is refused, with the fix, before anything is sent
    for mode in (0o644, 0o640, 0o604, 0o660):
        os.chmod(path, mode)
        clean.clear_log()
        r = run(daemon, 'prefetch', 'sample', env=env)
        assert r.returncode == 2, mode
        assert ('%s has mode %04o, so others may read or change your API key: refusing to '
                'use it; run: chmod 600 %s' % (path, mode, path)) in r.stderr
        assert KEY not in r.stdout + r.stderr
        assert clean.log() == []
    os.chmod(path, 0o400)
    assert run(daemon, 'prefetch', 'sample', env=env).returncode == 0
    # with the key from the environment, the public file still gives the URL
    os.chmod(path, 0o644)
    r = run(daemon, 'prefetch', 'sample', env=cli_env(daemon, home, DATAMINT_API_KEY=KEY))
    assert r.returncode == 0, r.stderr

    # a file of another user is refused whatever its mode
    if os.geteuid() == 0:
        os.chmod(path, 0o600)
        os.chown(path, 65534, -1)
        r = run(daemon, 'prefetch', 'sample', env=env)
        assert r.returncode == 2
        assert 'belongs to uid 65534, not to you' in r.stderr

    # malformed YAML names the file and the line
    write_yaml(home, "api_key: 'unclosed\n")
    r = run(daemon, 'prefetch', 'sample', env=env)
    assert r.returncode == 2 and path + ':' in r.stderr and 'not valid YAML' in r.stderr


def test_source_directory(clean, daemon, tmpdir_short):
    # a dataset folder as the Datamint client writes it, with two files of the corpus
    d = os.path.join(tmpdir_short, 'ds', 'sample')
    os.makedirs(os.path.join(d, 'images'))
    src = os.path.join(clean.corpus, 'projects', 'sample', 'files')
    res, nbytes = [], 0
    for i, n in enumerate(['ct_000.dcm', 'photo_rgb8.png']):
        rel = 'images/r%d.%s' % (i, n.split('.', 1)[1])
        shutil.copy(os.path.join(src, n), os.path.join(d, rel))
        nbytes += os.path.getsize(os.path.join(d, rel))
        res.append({'id': 'r%d' % i, 'file': rel, 'filename': n, 'annotations': []})
    with open(os.path.join(d, 'dataset.json'), 'w') as f:
        json.dump({'name': 'sample', 'updated_at': '2025-02-05T14:47:47.942Z',
                   'all_annotations': False, 'resources': res}, f)
    # a relative path names the absolute directory; no key is needed or read
    env = cli_env(daemon)
    r = subprocess.run([DMCACHE, '--socket', daemon.socket, 'prefetch', '--cancel',
                        '--source', 'ds/sample'], env=env, cwd=tmpdir_short,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "no prefetch of '%s' is running\n" % os.path.realpath(d)
    for bad in ('ds/missing', 'ds/sample/dataset.json'):
        r = subprocess.run([DMCACHE, '--socket', daemon.socket, 'prefetch', '--source', bad],
                           env=env, cwd=tmpdir_short, capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 2 and "--source '%s'" % bad in r.stderr

    # no key, no server, no network: the folder's files go into the cache
    clean.clear_log()
    r = subprocess.run([DMCACHE, '--socket', daemon.socket, 'prefetch', '--source',
                        'ds/sample'], env=env, cwd=tmpdir_short, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == '%s: starting the prefetch' % os.path.realpath(d)
    assert 'sample version 2025-02-05T14:47:47.942Z: complete' in lines
    assert '  items:  2 of 2 stored (2 downloaded, 0 from the cache), 0 failed' in lines
    assert clean.log() == []
    ls = json.loads(run(daemon, 'ls', '--json').stdout)
    assert len(ls) == 1
    s = ls[0]
    assert (s['source'], s['server'], s['project_id'], s['project_name']) == \
        ('local', '', os.path.realpath(d), 'sample')
    assert (s['items'], s['items_stored'], s['bytes'], s['complete']) == (2, 2, nbytes, True)
    # the table names a local folder by its path
    row = run(daemon, 'ls').stdout.splitlines()[1].split()
    assert row[1] == os.path.realpath(d) and row[3] == '2/2' and row[-1] == 'complete'
    r = run(daemon, 'evict', os.path.realpath(d))
    assert r.returncode == 0 and r.stdout.startswith('evicted 1 snapshot, 2 files, ')
