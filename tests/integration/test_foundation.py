"""The daemon skeleton end to end: the real dmcached, the real dmcache CLI, the real socket."""
import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time

import pytest

import wire
from conftest import DMCACHE, DMCACHED, BUILD, Daemon


def test_status_cli(daemon):
    r = daemon.cli('status', check=True)
    assert 'dmcached 0.1.0' in r.stdout
    assert 'connections' in r.stdout
    assert daemon.socket in r.stdout

    r = daemon.cli('status', '--json', check=True)
    st = json.loads(r.stdout)
    assert st['daemon'] == 'dmcached 0.1.0'
    assert st['version'] == '0.1.0'
    assert st['protocol'] == 1
    assert st['pid'] == daemon.proc.pid
    assert st['socket'] == daemon.socket
    assert st['uptime_ms'] >= 0
    # the CLI's own connection is the one open connection
    assert st['counters']['connections'] == 1
    assert st['counters']['connections_of_caller'] == 1
    assert st['counters']['caller_uid'] == os.geteuid()


def test_ping_and_socket_from_environment(daemon):
    env = dict(os.environ, DMCACHE_SOCKET=daemon.socket)
    r = subprocess.run([DMCACHE, 'ping'], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert 'answers on ' + daemon.socket in r.stdout


def test_cli_explains_when_daemon_is_not_running(tmpdir_short):
    path = os.path.join(tmpdir_short, 'nothing.sock')
    r = subprocess.run([DMCACHE, '--socket', path, 'status'], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 3
    assert 'is dmcached running? tried ' + path in r.stderr

    # without --socket or DMCACHE_SOCKET, the message lists the default places
    env = {k: v for k, v in os.environ.items() if k != 'DMCACHE_SOCKET'}
    env['XDG_RUNTIME_DIR'] = tmpdir_short
    if not os.path.exists('/run/dmcache/dmcached.sock'):
        r = subprocess.run([DMCACHE, 'status'], env=env, capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 3
        assert 'tried /run/dmcache/dmcached.sock, %s/dmcache/dmcached.sock' % tmpdir_short \
            in r.stderr


def test_cli_usage_errors(daemon):
    r = daemon.cli('frobnicate')
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr
    r = daemon.cli('status', '--bogus')
    assert r.returncode == 2
    r = subprocess.run([DMCACHE, '--version'], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == 'dmcache 0.1.0'
    r = subprocess.run([DMCACHED, '--version'], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == 'dmcached 0.1.0'


def test_garbage_then_normal_client(daemon):
    sock = wire.connect(daemon.socket)
    data = random.Random(1).randbytes(1 << 20)
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the daemon may close before it has read it all
    assert wire.is_closed(sock)
    sock.close()
    ok = wire.session(daemon.socket)
    st = wire.get_status(ok)
    assert st['counters']['protocol_errors_total'] >= 1
    ok.close()


def test_garbage_after_hello_closes_only_that_connection(daemon):
    other = wire.session(daemon.socket)
    bad = wire.session(daemon.socket)
    bad.sendall(b'\xff' * 64)  # a 4 GiB declared length
    assert wire.is_closed(bad)
    assert wire.get_status(other)['counters']['connections'] == 1


def test_half_frame_then_vanish(daemon):
    for _ in range(20):
        sock = wire.connect(daemon.socket)
        f = wire.hello()
        sock.sendall(f[:len(f) // 2])
        sock.close()
    s = wire.session(daemon.socket)
    # all twenty were noticed and closed
    deadline = time.monotonic() + 5
    while wire.get_status(s)['counters']['connections'] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    s.close()


def test_reserved_bytes_and_flags_close_the_connection(daemon):
    s = wire.session(daemon.socket)
    bad = bytearray(wire.status())
    bad[13] = 1
    s.sendall(bytes(bad))
    assert wire.is_closed(s)
    s = wire.session(daemon.socket)
    s.sendall(wire.frame(wire.OP_STATUS, flags=wire.FLAG_REPLY))
    assert wire.is_closed(s)


def test_hello_must_come_first(daemon):
    sock = wire.connect(daemon.socket)
    sock.sendall(wire.status())
    assert wire.is_closed(sock)


def test_no_common_version(daemon):
    sock = wire.connect(daemon.socket)
    sock.sendall(wire.hello(vmin=2, vmax=7))
    op, flags, rid, payload = wire.recv_frame(sock)
    assert op == wire.OP_ERROR and rid == 1
    err = wire.decode_error(payload)
    assert err['code'] == wire.E['unsupported']
    assert '2..7' in err['message']
    assert wire.is_closed(sock)


def test_hello_negotiates_highest_common_version(daemon):
    sock = wire.connect(daemon.socket)
    sock.sendall(wire.hello(vmin=1, vmax=9))
    op, flags, rid, payload = wire.recv_frame(sock)
    r = wire.decode_hello_reply(payload)
    assert r['version'] == 1 and r['daemon'] == 'dmcached 0.1.0'
    assert r['frame_max'] == wire.FRAME_MAX
    assert r['daemon_uid'] == os.geteuid()


def test_unknown_opcode_gets_error_and_connection_stays(daemon):
    s = wire.session(daemon.socket)
    s.sendall(wire.frame(999, b'xyz', rid=77))
    op, flags, rid, payload = wire.recv_frame(s)
    assert (op, flags, rid) == (wire.OP_ERROR, wire.FLAG_REPLY, 77)
    assert wire.decode_error(payload)['code'] == wire.E['unsupported']
    assert wire.get_status(s)['counters']['unknown_requests_total'] == 1


def test_pipelined_requests_keep_their_ids(daemon):
    s = wire.session(daemon.socket)
    s.sendall(b''.join(wire.ping(i, rid=100 + i) for i in range(50)) + wire.status(rid=7))
    for i in range(50):
        op, flags, rid, payload = wire.recv_frame(s)
        assert (op, rid) == (wire.OP_PING, 100 + i)
        assert struct.unpack('<Q', payload)[0] == i
    op, flags, rid, payload = wire.recv_frame(s)
    assert (op, rid) == (wire.OP_STATUS, 7)


def test_200_concurrent_clients(daemon):
    socks = []
    for _ in range(200):
        sock = wire.connect(daemon.socket)
        sock.sendall(wire.hello())
        socks.append(sock)
    errors = []

    def talk(sock):
        try:
            op, flags, rid, _ = wire.recv_frame(sock)
            assert op == wire.OP_HELLO
            st = wire.get_status(sock)
            assert st['counters']['connections'] == 200
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=talk, args=(s,)) for s in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[:5]
    for s in socks:
        s.close()


def test_client_that_never_reads(tmpdir_short):
    d = Daemon(tmpdir_short, args=['-o', 'write_queue_max=64K'])
    try:
        greedy = wire.session(d.socket)
        greedy.setblocking(False)
        # anonymous memory only: a loaded machine may still be faulting the daemon's
        # libraries in (tens of MiB of VmRSS) while this test runs
        rss0 = d.rss_kib('RssAnon')
        burst = b''.join(wire.ping(i, rid=i + 10) for i in range(4096))
        sent = 0
        deadline = time.monotonic() + 3
        # keep sending requests and never read a reply, until the daemon stops reading
        while time.monotonic() < deadline:
            try:
                sent += greedy.send(burst)
            except BlockingIOError:
                time.sleep(0.01)
        other = wire.session(d.socket)
        t0 = time.monotonic()
        st = wire.get_status(other)
        assert time.monotonic() - t0 < 1.0
        assert st['counters']['backpressure_pauses_total'] >= 1
        # three seconds of trying moved only socket buffers plus the write queue: the
        # daemon stopped reading this client's requests
        assert 64 * 1024 < sent < 4 << 20
        # memory stays bounded: the replies it holds are capped by write_queue_max
        assert d.rss_kib('RssAnon') - rss0 < 32 * 1024
        greedy.close()
        other.close()
    finally:
        rc, _ = d.stop()
        assert rc == 0, d.log()


def test_sigterm_with_clients_connected(tmpdir_short):
    d = Daemon(tmpdir_short)
    socks = [wire.session(d.socket) for _ in range(50)]
    half = wire.connect(d.socket)
    half.sendall(wire.hello()[:5])
    rc, took = d.stop(timeout=5)
    assert rc == 0, d.log()
    assert took < 2.0
    assert d.notify.wait_for('STOPPING=1', timeout=1)
    for s in socks:
        assert wire.is_closed(s, timeout=1)
    assert not os.path.exists(d.socket), 'the daemon removes its own socket'


def test_sigint_exits_zero(tmpdir_short):
    d = Daemon(tmpdir_short)
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(5) == 0


def test_connection_limits(tmpdir_short):
    d = Daemon(tmpdir_short, args=['-o', 'max_connections_per_uid=5'])
    try:
        socks = [wire.session(d.socket) for _ in range(5)]
        extra = wire.connect(d.socket)
        op, flags, rid, payload = wire.recv_frame(extra)
        assert op == wire.OP_ERROR
        err = wire.decode_error(payload)
        assert err['code'] == wire.E['overloaded']
        assert 'too many connections' in err['message']
        assert wire.is_closed(extra)
        socks.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the freed place is usable again
            try:
                s = wire.session(d.socket)
                break
            except (AssertionError, EOFError, ConnectionResetError):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert wire.get_status(s)['counters']['connections_refused_total'] >= 1
    finally:
        rc, _ = d.stop()
        assert rc == 0, d.log()


def test_hello_timeout(tmpdir_short):
    d = Daemon(tmpdir_short, args=['-o', 'hello_timeout=200ms', '-o', 'idle_timeout=400ms'])
    try:
        silent = wire.connect(d.socket)
        t0 = time.monotonic()
        assert wire.is_closed(silent, timeout=3)
        assert time.monotonic() - t0 < 2
        idle = wire.session(d.socket)
        assert wire.is_closed(idle, timeout=3)
    finally:
        rc, _ = d.stop()
        assert rc == 0, d.log()


# ---- configuration ----

def run_daemon(*args, env=None):
    """dmcached with `args`; a daemon that is to run gets a cache beside its socket, never
    the system's (/var/cache/dmcache: the package test needs it absent)."""
    args = list(args)
    with tempfile.TemporaryDirectory(prefix='dmc-cache-') as cache:
        if '--check-config' not in args and '--help-config' not in args and \
                '--cache-dir' not in args:
            args += ['--cache-dir', cache]
        return subprocess.run([DMCACHED] + args, capture_output=True, text=True, timeout=30,
                              env=env)


def test_check_config(tmpdir_short):
    cfg = os.path.join(tmpdir_short, 'dmcached.conf')
    with open(cfg, 'w') as f:
        f.write('# a comment\nmax_connections = 10\nidle_timeout = 5m\n'
                'write_queue_max = 1M\nlog_level = info\n')
    sock = os.path.join(tmpdir_short, 's.sock')
    r = run_daemon('--config', cfg, '--socket', sock, '--check-config')
    assert r.returncode == 0, r.stderr
    assert 'configuration OK' in r.stdout and sock in r.stdout
    assert not os.path.exists(sock)

    with open(cfg, 'w') as f:
        f.write('max_connections = 10\n\nno_such_key = 1\n')
    r = run_daemon('--config', cfg, '--socket', sock, '--check-config')
    assert r.returncode == 1
    assert "%s:3: unknown key 'no_such_key'" % cfg in r.stderr

    with open(cfg, 'w') as f:
        f.write('max_connections = lots\n')
    r = run_daemon('--config', cfg, '--socket', sock, '--check-config')
    assert r.returncode == 1
    assert "%s:1: max_connections = 'lots' is not valid" % cfg in r.stderr

    with open(cfg, 'w') as f:
        f.write('idle_timeout = 5 parsecs\n')
    r = run_daemon('--config', cfg, '--socket', sock, '--check-config')
    assert r.returncode == 1 and ':1: idle_timeout' in r.stderr

    with open(cfg, 'w') as f:
        f.write('max_connections = 0\n')
    r = run_daemon('--config', cfg, '--socket', sock, '--check-config')
    assert r.returncode == 1 and 'out of range' in r.stderr

    with open(cfg, 'w') as f:
        f.write('just words\n')
    r = run_daemon('--config', cfg, '--socket', sock, '--check-config')
    assert r.returncode == 1 and '%s:1:' % cfg in r.stderr

    r = run_daemon('--config', os.path.join(tmpdir_short, 'missing.conf'), '--check-config')
    assert r.returncode == 1 and 'cannot open config file' in r.stderr

    # flags override the file, and are validated the same way
    with open(cfg, 'w') as f:
        f.write('max_connections = 10\n')
    r = run_daemon('--config', cfg, '--socket', sock, '-o', 'max_connections_per_uid=0',
                   '--check-config')
    assert r.returncode == 1 and 'command line: max_connections_per_uid' in r.stderr
    r = run_daemon('--socket', 'relative.sock', '--check-config')
    assert r.returncode == 1 and 'absolute path' in r.stderr
    r = run_daemon('-o', 'nonsense', '--check-config')
    assert r.returncode == 1 and 'KEY=VALUE' in r.stderr


def test_help_config_lists_keys():
    r = run_daemon('--help-config')
    assert r.returncode == 0
    for key in ('socket', 'cache_dir', 'max_connections_per_uid', 'idle_timeout'):
        assert key in r.stdout


# ---- the socket path ----

def test_refuses_symlink_at_socket_path(tmpdir_short):
    run = os.path.join(tmpdir_short, 'run')
    os.mkdir(run, 0o700)
    target = os.path.join(tmpdir_short, 'elsewhere')
    with open(target, 'w') as f:
        f.write('precious')
    os.symlink(target, os.path.join(run, 'dmcached.sock'))
    r = run_daemon('--socket', os.path.join(run, 'dmcached.sock'))
    assert r.returncode == 1
    assert 'symbolic link' in r.stderr
    assert open(target).read() == 'precious'


def test_refuses_non_socket_file(tmpdir_short):
    path = os.path.join(tmpdir_short, 'dmcached.sock')
    with open(path, 'w') as f:
        f.write('data')
    r = run_daemon('--socket', path)
    assert r.returncode == 1 and 'is not a socket' in r.stderr
    assert open(path).read() == 'data'


def test_refuses_directory_writable_by_others(tmpdir_short):
    run = os.path.join(tmpdir_short, 'open')
    os.mkdir(run)
    os.chmod(run, 0o777)
    r = run_daemon('--socket', os.path.join(run, 'dmcached.sock'))
    assert r.returncode == 1 and 'writable by others' in r.stderr


def test_refuses_symlinked_directory(tmpdir_short):
    real = os.path.join(tmpdir_short, 'real')
    os.mkdir(real, 0o700)
    os.symlink(real, os.path.join(tmpdir_short, 'link'))
    r = run_daemon('--socket', os.path.join(tmpdir_short, 'link', 'dmcached.sock'))
    assert r.returncode == 1 and 'symbolic link' in r.stderr


def test_creates_socket_directory_privately(tmpdir_short):
    d = Daemon(tmpdir_short, socket_path=os.path.join(tmpdir_short, 'new', 'dmcached.sock'))
    try:
        st = os.stat(os.path.dirname(d.socket))
        mode = stat.S_IMODE(st.st_mode)
        assert mode & 0o022 == 0
        assert stat.S_ISSOCK(os.stat(d.socket).st_mode)
        assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o666
    finally:
        assert d.stop()[0] == 0


def test_stale_socket_is_replaced_live_one_is_not(tmpdir_short):
    run = os.path.join(tmpdir_short, 'run')
    os.mkdir(run, 0o700)
    path = os.path.join(run, 'dmcached.sock')
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    d = Daemon(tmpdir_short, socket_path=path)
    try:
        assert 'removing stale socket' in d.log()
        r = run_daemon('--socket', path)
        assert r.returncode == 1 and 'already listening' in r.stderr
        # the first daemon is undisturbed
        assert wire.get_status(wire.session(path))['pid'] == d.proc.pid
    finally:
        assert d.stop()[0] == 0


def test_socket_activation(tmpdir_short):
    path = os.path.join(tmpdir_short, 'activated.sock')
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    d = Daemon(tmpdir_short, start=False)
    fd = listener.fileno()

    def as_fd3():
        os.dup2(fd, 3)
        os.set_inheritable(3, True)

    # LISTEN_PID must be the daemon's own pid: the shell execs into it, keeping its pid
    d.proc = subprocess.Popen(
        ['/bin/sh', '-c', 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@"', DMCACHED,
         '--cache-dir', d.cache, '--socket', os.path.join(tmpdir_short, 'unused.sock')],
        env=d.env, stdout=open(d.stderr_path, 'ab'), stderr=subprocess.STDOUT,
        preexec_fn=as_fd3, close_fds=False)
    try:
        assert d.notify.wait_for('READY=1', proc=d.proc), d.log()
        assert not os.path.exists(os.path.join(tmpdir_short, 'unused.sock'))
        st = wire.get_status(wire.session(path))
        assert st['pid'] == d.proc.pid
    finally:
        rc, _ = d.stop()
        assert rc == 0, d.log()
    # the socket belongs to the service manager: the daemon leaves it in place
    assert os.path.exists(path)
    listener.close()


def test_activation_with_wrong_descriptor_fails(tmpdir_short):
    d = Daemon(tmpdir_short, start=False)
    r = subprocess.run(['/bin/sh', '-c', 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@" 3</dev/null',
                        DMCACHED, '--socket', d.socket], env=d.env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1
    assert 'exactly one listening Unix stream socket' in r.stderr


def start_with_watchdog(directory):
    """A daemon started as systemd starts one with WatchdogSec (200 ms), pinging."""
    d = Daemon(directory, env={'WATCHDOG_USEC': '200000'}, start=False)
    d.proc = subprocess.Popen(
        ['/bin/sh', '-c', 'WATCHDOG_PID=$$ exec "$0" "$@"', DMCACHED] + d.args, env=d.env,
        stdout=open(d.stderr_path, 'ab'), stderr=subprocess.STDOUT)
    assert d.notify.wait_for('READY=1', proc=d.proc), d.log()
    assert d.notify.wait_for('WATCHDOG=1', timeout=2), d.notify.messages
    return d


def notices_within(d, seconds):
    """The notifications that arrive in the next `seconds`, after those already sent."""
    time.sleep(0.3)  # let pings already sent arrive
    d.notify.messages = []
    d.notify.sock.settimeout(seconds)
    got = []
    try:
        while True:
            got.append(d.notify.sock.recv(4096).decode())
    except socket.timeout:
        pass
    return got


def test_watchdog_pings(tmpdir_short):
    d = start_with_watchdog(tmpdir_short)
    try:
        # a wedged loop stops the pings (docs/reliability.md O2): systemd would then act
        d.proc.send_signal(signal.SIGSTOP)
        wedged = notices_within(d, 0.8)
        assert not any('WATCHDOG=1' in m for m in wedged), wedged
        d.proc.send_signal(signal.SIGCONT)
        assert d.notify.wait_for('WATCHDOG=1', timeout=2), d.notify.messages
    finally:
        assert d.stop()[0] == 0


def thread_states(pid):
    """{tid: state letter} of every thread of pid."""
    states = {}
    for tid in os.listdir('/proc/%d/task' % pid):
        try:
            with open('/proc/%d/task/%s/stat' % (pid, tid)) as f:
                states[int(tid)] = f.read().rsplit(')', 1)[1].split()[0]
        except OSError:
            pass
    return states


@pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get('CI'),
                    reason='strace -p needs root')
def test_watchdog_stops_when_only_the_loop_is_blocked(tmpdir_short):
    """O2, a loop wedged in a call while the other threads run: strace holds the loop
    thread (the main thread, traced alone) 5 s before each epoll wait; the pings stop
    although the threadpool threads are alive, and come back once it lets go."""
    d = start_with_watchdog(tmpdir_short)
    tracer = None
    try:
        pid = d.proc.pid
        assert len(thread_states(pid)) > 1  # the threadpool is started with the loop
        tracer = subprocess.Popen(
            ['strace', '-qq', '-o', '/dev/null', '-p', str(pid), '-e',
             'trace=epoll_wait,epoll_pwait', '-e', 'inject=epoll_wait:delay_enter=5000000',
             '-e', 'inject=epoll_pwait:delay_enter=5000000'],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # attached once the main thread is in a tracing stop
        deadline = time.monotonic() + 5
        while thread_states(pid).get(pid) != 't' and time.monotonic() < deadline:
            time.sleep(0.02)
        assert thread_states(pid).get(pid) == 't', thread_states(pid)
        wedged = notices_within(d, 1.0)
        states = thread_states(pid)
        others = [s for tid, s in states.items() if tid != pid]
        assert others and all(s not in 'tTZX' for s in others), states
        assert not any('WATCHDOG=1' in m for m in wedged), wedged
        tracer.send_signal(signal.SIGINT)  # strace detaches
        tracer.wait(timeout=10)
        tracer = None
        assert d.notify.wait_for('WATCHDOG=1', timeout=4), d.notify.messages
    finally:
        if tracer is not None:
            tracer.kill()
            tracer.wait()
        assert d.stop()[0] == 0


# ---- systemd units ----

@pytest.mark.skipif(shutil.which('systemd-analyze') is None, reason='no systemd-analyze')
def test_systemd_units_verify(tmpdir_short):
    src = os.path.join(BUILD, 'systemd', 'dmcached.service')
    with open(src) as f:
        unit = f.read()
    # point ExecStart (and ExecStartPre, ExecReload) at the binary of this build
    lines = [re.sub(r'/\S*/sbin/dmcached\b', DMCACHED, l) for l in unit.splitlines()]
    with open(os.path.join(tmpdir_short, 'dmcached.service'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    shutil.copy(os.path.join(os.environ['DMC_SOURCE_ROOT'], 'systemd', 'dmcached.socket'),
                tmpdir_short)
    r = subprocess.run(['systemd-analyze', 'verify', '--man=no',
                        os.path.join(tmpdir_short, 'dmcached.socket'),
                        os.path.join(tmpdir_short, 'dmcached.service')],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not any(l.strip().startswith('PrivateUsers') for l in lines)
    # hardening: exposure at most 2.0 of 10 (docs/reliability.md O1)
    r = subprocess.run(['systemd-analyze', 'security', '--offline=true', '--threshold=20',
                        os.path.join(tmpdir_short, 'dmcached.service')],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    level = float(r.stdout.split('Overall exposure level for dmcached.service:')[1].split()[0])
    assert level <= 2.0, r.stdout
