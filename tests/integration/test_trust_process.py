"""The process side of the trust boundary (docs/security.md; docs/reliability.md S2, S5, S13).

The daemon runs as root, as the system service may; local users are hostile. Each test is
the attack: another uid reads the daemon's memory, a decoder worker holds privileges, bob
plants the cache directory, a peer hides behind a user namespace. Plus the systemd unit's
hardening score.
"""
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

import uids
from conftest import BUILD, DMCACHE, DMCACHED, Daemon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'emulator'))
import client as emulator  # noqa: E402

KEY = emulator.KEY_ALL
PYTHON = '/usr/bin/python3'
CAP_NONE = '0000000000000000'


def proc_status(pid):
    out = {}
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            k, _, v = line.partition(':')
            out[k] = v.strip()
    return out


def core_limit(pid):
    with open('/proc/%d/limits' % pid) as f:
        for line in f:
            if line.startswith('Max core file size'):
                return line.split()[4:6]
    return None


def children(pid):
    """Every live descendant of `pid` (from the PPid field of /proc/*/status)."""
    parent = {}
    for name in os.listdir('/proc'):
        if name.isdigit():
            try:
                parent[int(name)] = int(proc_status(int(name))['PPid'])
            except (OSError, KeyError, ValueError):
                pass
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        todo += kids
    return found


def named(pids, comm):
    out = []
    for p in pids:
        try:
            with open('/proc/%d/comm' % p) as f:
                if f.read().strip() == comm:
                    out.append(p)
        except OSError:
            pass
    return out


def wait_for_workers(d, n_min=1, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        w = named(children(d.proc.pid), 'dmcache-decode')
        if len(w) >= n_min:
            return w
        time.sleep(0.05)
    raise AssertionError('no decoder worker appeared:\n' + d.log())


def run_daemon(*args, timeout=30, **kw):
    return subprocess.run([DMCACHED] + list(args), capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.fixture
def root_daemon(tmpdir_short):
    uids.require_root()
    d = Daemon(tmpdir_short, args=['-o', 'decode_workers=2'])
    yield d
    rc, _ = d.stop()
    d.notify.close()
    assert rc == 0, d.log()


# ---- 1. the daemon is not dumpable and dumps no core ----

# Opens /proc/PID/{environ,maps} and reads a little, opens /proc/PID/mem (reading it needs
# an address; opening it is the ptrace access check).
READ_PROC = r'''
import sys
pid = int(sys.argv[1])
for name in ('environ', 'maps', 'mem'):
    try:
        with open('/proc/%d/%s' % (pid, name), 'rb') as f:
            if name != 'mem':
                f.read(16)
        print(name, 'READ')
    except PermissionError:
        print(name, 'DENIED')
'''
DENIED_ALL = ['environ', 'DENIED', 'maps', 'DENIED', 'mem', 'DENIED']


def build_option(name):
    with open(os.path.join(BUILD, 'meson-info', 'intro-buildoptions.json')) as f:
        for o in json.load(f):
            if o['name'] == name:
                return o['value']
    return None


def seccomp_expected():
    """The workers run under the filter unless the build has no libseccomp or runs under a
    sanitizer (whose runtime the filter would break: decode_pool.h)."""
    with open(os.path.join(BUILD, 'config.h')) as f:
        have = re.search(r'#define HAVE_SECCOMP 1', f.read()) is not None
    return have and build_option('b_sanitize') in (None, 'none')


def test_daemon_memory_is_closed_to_its_own_uid(tmpdir_short):
    """alice runs her own dmcached; another process of hers (the way any code she runs
    could) tries its environment, memory and maps. Non-dumpable: denied, although she
    reads those of any other process of hers."""
    uids.require_root()
    uids.open_up(tmpdir_short)
    home = uids.owned_dir(os.path.join(tmpdir_short, 'alice'), uids.ALICE)
    d = Daemon(home, start=False)
    # the notify socket and the directories are made by root here: hand them to alice
    os.chown(home, uids.ALICE, uids.ALICE)
    os.chmod(d.notify.path, 0o777)
    uids.chown_tree(os.path.dirname(d.socket), uids.ALICE)
    d.env.update(HOME=home)
    d.env.pop('XDG_RUNTIME_DIR', None)
    d.start(user=uids.ALICE, group=uids.ALICE, extra_groups=[])
    other = uids.popen(uids.ALICE, ['sleep', '60'])
    try:
        st = proc_status(d.proc.pid)
        assert st['Uid'].split()[0] == str(uids.ALICE)
        # what she can do to her own ordinary process
        # (mem is left out there: Yama's ptrace_scope may forbid it for non-children)
        r = uids.run(uids.ALICE, [PYTHON, '-c', READ_PROC, str(other.pid)])
        assert r.stdout.split()[:4] == ['environ', 'READ', 'maps', 'READ'], \
            r.stdout + r.stderr
        # and cannot to her daemon
        r = uids.run(uids.ALICE, [PYTHON, '-c', READ_PROC, str(d.proc.pid)])
        assert r.stdout.split() == DENIED_ALL, r.stdout + r.stderr
        # /proc/PID of a non-dumpable process belongs to root
        assert os.stat('/proc/%d/environ' % d.proc.pid).st_uid == 0
        assert os.stat('/proc/%d/environ' % other.pid).st_uid == uids.ALICE
        assert core_limit(d.proc.pid) == ['0', '0']
        # her daemon's workers are hers but closed too, and hold no capability
        for w in wait_for_workers(d):
            ws = proc_status(w)
            assert ws['Uid'].split() == [str(uids.ALICE)] * 4
            assert ws['CapEff'] == ws['CapPrm'] == CAP_NONE
            r = uids.run(uids.ALICE, [PYTHON, '-c', READ_PROC, str(w)])
            assert r.stdout.split() == DENIED_ALL, r.stdout + r.stderr
    finally:
        other.kill()
        other.wait()
        rc, _ = d.stop()
        d.notify.close()
    assert rc == 0, d.log()


def test_root_daemon_has_no_core_and_is_not_dumpable(root_daemon):
    d = root_daemon
    assert core_limit(d.proc.pid) == ['0', '0']
    assert os.stat('/proc/%d/environ' % d.proc.pid).st_uid == 0
    for p in children(d.proc.pid):
        assert core_limit(p) == ['0', '0']


# ---- 2. decoder workers own nothing ----

def dicom_reference(path):
    import pydicom
    ds = pydicom.dcmread(path)
    a = ds.pixel_array
    n = int(getattr(ds, 'NumberOfFrames', 1) or 1)
    return a.reshape(n, 1, a.shape[-2], a.shape[-1])


def test_root_daemon_workers_own_nothing_and_still_decode(root_daemon, emu, tmp_path):
    d = root_daemon
    nobody = pwd.getpwnam('nobody')
    workers = wait_for_workers(d, 2)
    # the name is set after the switch of uid; the filter comes after the worker's set-up,
    # before it reads its first request
    want = '2' if seccomp_expected() else '0'
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and \
            any(proc_status(w)['Seccomp'] != want for w in workers):
        time.sleep(0.05)
    for w in workers:
        st = proc_status(w)
        assert st['Uid'].split() == [str(nobody.pw_uid)] * 4, st['Uid']
        assert st['Gid'].split() == [str(nobody.pw_gid)] * 4, st['Gid']
        assert st['Groups'] == ''
        for cap in ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb'):
            assert st[cap] == CAP_NONE, (cap, st[cap])
        assert st['NoNewPrivs'] == '1'
        assert st['Seccomp'] == want
        assert os.stat('/proc/%d/environ' % w).st_uid == 0  # not dumpable
    # the zygote keeps only what the switch needs: CAP_SETUID, CAP_SETGID, CAP_SETPCAP
    zygote = named(children(d.proc.pid), 'dmcache-zygote')
    assert len(zygote) == 1
    st = proc_status(zygote[0])
    keep = (1 << 6) | (1 << 7) | (1 << 8)
    assert int(st['CapEff'], 16) == int(st['CapPrm'], 16) == keep, st
    assert int(st['CapBnd'], 16) == keep and st['NoNewPrivs'] == '1', st

    # A process of the worker user (anyone who runs as nobody) cannot read them either.
    r = uids.run(nobody.pw_uid, [PYTHON, '-c', READ_PROC, str(workers[0])],
                 gid=nobody.pw_gid)
    assert r.stdout.split() == DENIED_ALL, r.stdout + r.stderr

    # Decoding through the daemon still gives pydicom's pixels.
    d.env.update(DATAMINT_API_KEY=KEY, DATAMINT_API_URL=emu.url)
    r = subprocess.run([DMCACHE, '--socket', d.socket, 'prefetch', '--json', 'sample'],
                       env=d.env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    files = os.path.join(emu.corpus, 'projects', 'sample', 'files')
    compared = 0
    for i in range(19):
        out = str(tmp_path / ('i%d.npy' % i))
        r = subprocess.run([DMCACHE, '--socket', d.socket, 'get', 'sample', str(i), '-o', out],
                           env=d.env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr + d.log()
        fname = json.load(open(out[:-4] + '.json'))['resource']['filename']
        if not fname.endswith('.dcm'):
            continue
        a, ref = np.load(out), dicom_reference(os.path.join(files, fname))
        assert a.shape == ref.shape and a.dtype == ref.dtype, (fname, a.shape, ref.shape)
        assert np.array_equal(a, ref), fname
        compared += 1
    assert compared >= 8
    # the workers that decoded are still the unprivileged ones
    for w in named(children(d.proc.pid), 'dmcache-decode'):
        assert proc_status(w)['Uid'].split()[0] == str(nobody.pw_uid)


def test_worker_user_must_exist_and_not_be_root(tmpdir_short):
    uids.require_root()
    sock = os.path.join(tmpdir_short, 's.sock')
    cache = os.path.join(tmpdir_short, 'cache')
    r = run_daemon('--socket', sock, '--cache-dir', cache, '-o', 'worker_user=dmc-no-such-user')
    assert r.returncode != 0
    assert "worker_user = 'dmc-no-such-user'" in r.stderr and 'no such user' in r.stderr
    r = run_daemon('--socket', sock, '--cache-dir', cache, '-o', 'worker_user=root')
    assert r.returncode != 0
    assert "worker_user = 'root'" in r.stderr and 'unprivileged' in r.stderr
    r = run_daemon('--socket', sock, '--cache-dir', cache, '-o', 'worker_user=root',
                   '--check-config')
    assert r.returncode != 0
    assert not os.path.exists(sock) and not os.path.exists(cache)


# ---- 3. the cache directory is the daemon's own ----

def refused(tmpdir, cache, *must_name):
    sock = os.path.join(tmpdir, 'r.sock')
    r = run_daemon('--socket', sock, '--cache-dir', cache)
    assert r.returncode != 0, r.stderr
    assert 'READY=1' not in r.stdout
    for name in must_name:
        assert "'%s'" % name in r.stderr, (name, r.stderr)
    assert not os.path.exists(sock)
    return r.stderr


def test_cache_directory_planted_by_another_user_is_refused(tmpdir_short):
    uids.require_root()
    t = tmpdir_short
    uids.open_up(t)
    bob = uids.owned_dir(os.path.join(t, 'bob'), uids.BOB, 0o755)

    # under bob's directory: nothing created in it
    err = refused(t, os.path.join(bob, 'cache'), bob)
    assert 'belongs to uid %d' % uids.BOB in err
    assert os.listdir(bob) == []

    # bob's own (empty) directory as the cache
    err = refused(t, bob, bob)
    assert os.listdir(bob) == []

    # root's symlink to it: the target is bob's
    link = os.path.join(t, 'link')
    os.symlink(os.path.join(bob, 'cache'), link)
    refused(t, link, bob)
    refused(t, os.path.join(link, 'sub'), bob)
    assert os.listdir(bob) == []

    # bob's symlink in a world-writable sticky directory (as in /tmp) pointing at a good
    # directory: he could point it anywhere, so it is refused as his
    pub = os.path.join(t, 'pub')
    os.mkdir(pub)
    os.chmod(pub, 0o1777)
    good = os.path.join(t, 'good')
    os.mkdir(good, 0o700)
    r = uids.run(uids.BOB, ['ln', '-s', good, os.path.join(pub, 'cache')])
    assert r.returncode == 0, r.stderr
    err = refused(t, os.path.join(pub, 'cache'), os.path.join(pub, 'cache'))
    assert 'belongs to uid %d' % uids.BOB in err
    assert os.listdir(good) == []

    # bob's directory a level up, with a root-owned directory inside it
    deep = os.path.join(bob, 'deep')
    os.mkdir(deep, 0o700)
    refused(t, os.path.join(deep, 'cache'), bob)
    assert os.listdir(deep) == []


def test_cache_directory_writable_by_others_is_refused(tmpdir_short):
    uids.require_root()
    t = tmpdir_short
    for mode, word in ((0o770, 'its group'), (0o707, 'others'), (0o1777, 'others')):
        c = os.path.join(t, 'c%o' % mode)
        os.mkdir(c)
        os.chmod(c, mode)
        err = refused(t, c, c)
        assert 'writable by %s' % word in err, err
    # a world-writable parent without the sticky bit: anyone could rename the cache away
    open_parent = os.path.join(t, 'open')
    os.mkdir(open_parent)
    os.chmod(open_parent, 0o777)
    err = refused(t, os.path.join(open_parent, 'cache'), open_parent)
    assert 'without the sticky bit' in err


def test_good_cache_directories_work(tmpdir_short):
    """The daemon's own directory, created on the way, and reached through root's symlink
    and through a sticky world-writable directory (/tmp)."""
    uids.require_root()
    t = tmpdir_short
    real = os.path.join(t, 'real')
    os.mkdir(real, 0o755)
    os.symlink(real, os.path.join(t, 'via'))
    pub = os.path.join(t, 'pub')
    os.mkdir(pub)
    os.chmod(pub, 0o1777)
    for i, cache in enumerate((os.path.join(t, 'new', 'cache'), os.path.join(t, 'via', 'cache'),
                               os.path.join(pub, 'cache'))):
        run = os.path.join(t, 'd%d' % i)
        os.mkdir(run, 0o700)
        d = Daemon(run, args=['--cache-dir', cache])
        try:
            assert d.cli('status').returncode == 0
        finally:
            rc, _ = d.stop()
            d.notify.close()
        assert rc == 0, d.log()
        assert os.path.exists(os.path.join(cache, 'index.db'))
        assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700


# ---- 4. user namespaces ----

def test_refuses_to_start_inside_a_user_namespace(tmpdir_short):
    uids.require_root()
    if shutil.which('unshare') is None:
        pytest.skip('no unshare(1)')
    sock = os.path.join(tmpdir_short, 's.sock')
    r = subprocess.run(['unshare', '--user', '--map-root-user', DMCACHED, '--socket', sock,
                        '--cache-dir', os.path.join(tmpdir_short, 'cache')],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0 and 'unshare failed' in r.stderr:
        pytest.skip('user namespaces are not available here: ' + r.stderr.strip())
    assert r.returncode != 0
    assert 'inside a user namespace' in r.stderr and 'Refusing to start' in r.stderr
    assert not os.path.exists(sock)


# A launcher: the child enters a new user namespace in which only root and nobody are
# mapped (to themselves), so that the daemon's workers can still switch to nobody; every
# other real uid appears inside as the overflow uid 65534. Then it runs dmcached.
USERNS_LAUNCHER = r'''
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
go_r, go_w = os.pipe()
ready_r, ready_w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(go_w); os.close(ready_r)
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        os._exit(90)
    os.write(ready_w, b'u')
    if os.read(go_r, 1) != b'g':
        os._exit(91)
    os.execv(sys.argv[1], sys.argv[1:])
os.close(go_r); os.close(ready_w)
if os.read(ready_r, 1) != b'u':
    sys.exit(90)
for m in ('uid_map', 'gid_map'):
    with open('/proc/%d/%s' % (pid, m), 'w') as f:
        f.write('0 0 1\n65534 65534 1\n')
os.write(go_w, b'g')
signal_fwd = __import__('signal')
signal_fwd.signal(signal_fwd.SIGTERM, lambda s, f: os.kill(pid, s))
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
'''


def test_peer_outside_the_namespace_appears_as_overflow_uid_and_is_refused(tmpdir_short):
    uids.require_root()
    t = tmpdir_short
    uids.open_up(t)
    d = Daemon(t, args=['-o', 'allow_user_namespace=yes', '-o', 'decode_workers=1'],
               start=False)
    uids.open_up(os.path.dirname(d.socket))
    d.notify.messages = []
    d.stderr = open(d.stderr_path, 'ab')
    d.proc = subprocess.Popen([PYTHON, '-c', USERNS_LAUNCHER, DMCACHED] + d.args, env=d.env,
                              stdout=d.stderr, stderr=d.stderr)
    try:
        if not d.notify.wait_for('READY=1', timeout=20, proc=d.proc):
            if d.proc.poll() == 90:
                pytest.skip('user namespaces are not available here')
            raise AssertionError('dmcached did not start in the namespace:\n' + d.log())
        daemon_pid = children(d.proc.pid)[0]
        with open('/proc/%d/uid_map' % daemon_pid) as f:
            assert f.read().split() == ['0', '0', '1', '65534', '65534', '1']
        # root is mapped: served
        r = d.cli('status')
        assert r.returncode == 0, r.stderr
        # bob (61002) is not: he would be uid 65534 inside, like every other unmapped user
        r = uids.run(uids.BOB, [DMCACHE, '--socket', d.socket, 'status'])
        assert r.returncode != 0
        assert 'connections' not in r.stdout, r.stdout
        # (the CLI writes HELLO first and may only see the closed connection: EPIPE)
        # on the wire as well: the first frame is a refusal, then the connection closes
        probe = r'''
import socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
data = b''
while True:
    b = s.recv(4096)
    if not b:
        break
    data += b
sys.stdout.write(data.hex())
'''
        r = uids.run(uids.BOB, [PYTHON, '-c', probe, d.socket])
        assert r.returncode == 0, r.stderr
        assert b'another user namespace' in bytes.fromhex(r.stdout)
    finally:
        rc, _ = d.stop()
        d.notify.close()
    assert rc == 0, d.log()


# ---- 5. systemd hardening ----

def _need_tool(name):
    if shutil.which(name) is not None:
        return
    if os.environ.get('CI') == 'true':
        pytest.fail('%s is not installed (CI must have it)' % name)
    pytest.skip('%s is not installed' % name)


def test_systemd_unit_exposure_at_most_1_6(tmpdir_short):
    _need_tool('systemd-analyze')
    unit = os.path.join(BUILD, 'systemd', 'dmcached.service')
    r = subprocess.run(['systemd-analyze', 'security', '--offline=true', '--threshold=16',
                        unit], capture_output=True, text=True, timeout=120)
    m = re.search(r'Overall exposure level for dmcached\.service: ([0-9.]+)', r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 1.6, r.stdout
    assert r.returncode == 0, r.stdout + r.stderr
    with open(unit) as f:
        lines = [l.strip() for l in f]
    assert 'SystemCallFilter=~@resources' in lines
    assert 'CapabilityBoundingSet=' in lines and 'User=dmcache' in lines
    assert not any(l.startswith('PrivateUsers') for l in lines)


RESOURCES = ['setrlimit', 'setpriority', 'sched_setaffinity', 'sched_setattr',
             'sched_setparam', 'sched_setscheduler', 'mbind', 'set_mempolicy', 'migrate_pages',
             'move_pages', 'ioprio_set']


def test_daemon_and_workers_make_no_resources_syscalls(tmpdir_short, emu, tmp_path):
    """The unit's SystemCallFilter=~@resources (EPERM) must not break the daemon or its
    workers: under strace, a start, decodes and a stop make none of those calls
    (setrlimit() is the prlimit64 system call)."""
    uids.require_root()
    _need_tool('strace')
    trace = os.path.join(tmpdir_short, 'strace.out')
    d = Daemon(tmpdir_short, args=['-o', 'decode_workers=1'], start=False)
    d.env.update(DATAMINT_API_KEY=KEY, DATAMINT_API_URL=emu.url)
    # a sanitizer build: LeakSanitizer cannot run under ptrace
    d.env['ASAN_OPTIONS'] = ':'.join(filter(None, [d.env.get('ASAN_OPTIONS'),
                                                   'detect_leaks=0']))
    d.notify.messages = []
    d.stderr = open(d.stderr_path, 'ab')
    d.proc = subprocess.Popen(['strace', '-f', '-qq', '-o', trace, '-e',
                               'trace=' + ','.join(RESOURCES + ['prlimit64']), DMCACHED]
                              + d.args, env=d.env, stdout=d.stderr, stderr=d.stderr)
    try:
        assert d.notify.wait_for('READY=1', timeout=60, proc=d.proc), d.log()
        for i in (0, 2):
            out = str(tmp_path / ('i%d.npy' % i))
            r = subprocess.run([DMCACHE, '--socket', d.socket, 'get', 'sample', str(i), '-o',
                                out], env=d.env, capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr + d.log()
    finally:
        # SIGTERM to the daemon itself: strace would detach and leave it running
        daemon = named(children(d.proc.pid), 'dmcached')
        for pid in daemon:
            os.kill(pid, signal.SIGTERM)
        try:
            rc = d.proc.wait(30)
        except subprocess.TimeoutExpired:
            for pid in daemon:
                os.kill(pid, signal.SIGKILL)
            d.proc.kill()
            rc = d.proc.wait()
        d.notify.close()
    assert rc == 0 and len(daemon) == 1, d.log()
    calls = open(trace).read()
    assert 'prlimit64(' in calls  # the rlimits are set, through prlimit64
    for name in RESOURCES:
        assert not re.search(r'\b%s\(' % name, calls), (name, calls)
