"""The configuration as an operator meets it: the installed dmcached.conf, drop-ins,
--check-config, and SIGHUP reloads of a running daemon.

The daemon is the real dmcached, started with --config as the systemd unit starts it.
A reload is observed through the daemon itself: `dmcache status --json` of root (an
admin) for limits, the daemon's own log for the log level and the reload's report.
"""
import json
import os
import re
import signal
import socket
import subprocess
import time

from conftest import BUILD, DMCACHED, Daemon

CONF = os.path.join(BUILD, 'etc', 'dmcached.conf')


def run_daemon(*args):
    return subprocess.run([DMCACHED] + list(args), capture_output=True, text=True, timeout=30)


def help_keys():
    """The keys --help-config lists: {name: text of its entry}."""
    r = run_daemon('--help-config')
    assert r.returncode == 0, r.stderr
    keys, cur = {}, None
    for line in r.stdout.splitlines():
        m = re.match(r'^  ([a-z_0-9]+) +(\S+)$', line)
        if m:
            cur = m.group(1)
            keys[cur] = ''
        elif cur and line.startswith('      '):
            keys[cur] += ' ' + line.strip()
    return keys


def test_help_config_gives_default_and_unit_of_every_key():
    keys = help_keys()
    assert len(keys) >= 30
    for name, text in keys.items():
        assert 'Default: ' in text, name
        assert re.search(r'On change: (reload|restart)\.', text), name
    assert 'Default: 0.' in keys['max_size'] and 'K/M/G/T' in keys['max_size']
    assert 'Default: 168h.' in keys['grant_ttl'] and 'ms, s, m, h or d' in keys['grant_ttl']
    assert 'On change: reload.' in keys['log_level']
    assert 'On change: reload.' in keys['max_jobs_per_uid']
    assert "Default: a quarter of the machine's memory." in keys['shm_max_per_uid']
    assert 'On change: reload.' in keys['shm_max_per_uid']
    for name in ('max_size', 'min_free', 'hot_max'):
        assert 'On change: reload.' in keys[name], name
    assert 'On change: restart.' in keys['parallel_transfers']
    assert '.md' not in run_daemon('--help-config').stdout  # no document outside it


def test_installed_conf_lists_every_key_with_its_default(tmpdir_short):
    """The generated file has every key of --help-config, commented, with its default;
    uncommented as a whole it is a valid configuration (the defaults are valid values)."""
    with open(CONF) as f:
        text = f.read()
    lines = {}
    for line in text.splitlines():
        m = re.match(r'^#([a-z_0-9]+) =(?: (.*))?$', line)
        if m:
            lines[m.group(1)] = m.group(2)
    keys = help_keys()
    assert set(keys) == set(lines), set(keys) ^ set(lines)
    for name, value in lines.items():
        if value is not None:
            assert 'Default: %s.' % value in keys[name], (name, value)
    # as installed (all commented): valid
    sock = os.path.join(tmpdir_short, 's.sock')
    r = run_daemon('--config', CONF, '--socket', sock, '--check-config')
    assert r.returncode == 0, r.stderr
    # every line with a value uncommented: still valid
    full = os.path.join(tmpdir_short, 'full.conf')
    with open(full, 'w') as f:
        for name, value in lines.items():
            if value is not None:
                f.write('%s = %s\n' % (name, value))
    r = run_daemon('--config', full, '--socket', sock, '--check-config')
    assert r.returncode == 0, r.stderr


def test_dropins_are_read_after_the_file_in_order(tmpdir_short):
    conf = os.path.join(tmpdir_short, 'dmcached.conf')
    dropdir = conf + '.d'
    os.mkdir(dropdir)
    with open(conf, 'w') as f:
        f.write('max_connections = 10\n')
    with open(os.path.join(dropdir, '20-late.conf'), 'w') as f:
        f.write('max_connections = 30\n')
    with open(os.path.join(dropdir, '10-early.conf'), 'w') as f:
        f.write('max_connections = 20\nmax_jobs_per_uid = 3\n')
    with open(os.path.join(dropdir, 'ignored.txt'), 'w') as f:
        f.write('this is not a configuration\n')
    d = Daemon(tmpdir_short, args=['--config', conf])
    try:
        counters = json.loads(d.cli('status', '--json', check=True).stdout)['counters']
        assert counters['connections_max'] == 30
    finally:
        assert d.stop()[0] == 0
    r = run_daemon('--config', conf, '--socket', d.socket, '--check-config')
    assert r.returncode == 0 and '10-early.conf, ' in r.stdout and '20-late.conf' in r.stdout
    # a bad drop-in is an error naming its file and line
    with open(os.path.join(dropdir, '30-bad.conf'), 'w') as f:
        f.write('max_connections = 30\nmax_jobs_per_uid = many\n')
    r = run_daemon('--config', conf, '--socket', d.socket, '--check-config')
    assert r.returncode == 1
    assert '30-bad.conf:2: max_jobs_per_uid' in r.stderr, r.stderr


def wait_log(d, pattern, start=0, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, d.log()[start:])
        if m:
            return m
        time.sleep(0.05)
    raise AssertionError('no %r in the log:\n%s' % (pattern, d.log()[start:]))


def reload(d, conf_text, conf):
    with open(conf, 'w') as f:
        f.write(conf_text)
    start = len(d.log())
    d.notify.messages = []
    d.proc.send_signal(signal.SIGHUP)
    m = wait_log(d, r'(configuration reloaded: .*|reload refused.*)\n', start)
    assert d.notify.wait_for('READY=1', timeout=10)
    assert any('RELOADING=1' in x for x in d.notify.messages)
    return m.group(1), start


def test_sighup_applies_what_may_change_and_names_what_needs_a_restart(tmpdir_short):
    conf = os.path.join(tmpdir_short, 'dmcached.conf')
    with open(conf, 'w') as f:
        f.write('log_level = notice\nmax_connections_per_uid = 100\nmax_size = 0\n')
    d = Daemon(tmpdir_short, args=['--config', conf], start=False)
    d.args.remove('-v')  # the file alone sets the log level
    d.start()
    try:
        d.cli('ping', check=True)
        assert 'connection from uid' not in d.log()  # a debug message
        counters = json.loads(d.cli('status', '--json', check=True).stdout)['counters']
        assert counters['connections_per_uid_max'] == 100
        assert counters['cache_max_bytes'] == 0

        said, start = reload(d, 'log_level = debug\nmax_connections_per_uid = 7\n'
                                'max_size = 1G\nhot_max = 64M\nparallel_transfers = 9\n', conf)
        assert "log_level = 'debug' (was 'notice')" in said, said
        assert "max_connections_per_uid = '7' (was '100')" in said, said
        assert "max_size = '1G' (was '0')" in said, said
        assert "hot_max = '64M' (was '1G')" in said, said
        assert said.split('needs a restart to apply: ')[1] == 'parallel_transfers', said

        counters = json.loads(d.cli('status', '--json', check=True).stdout)['counters']
        assert counters['connections_per_uid_max'] == 7
        assert counters['cache_max_bytes'] == 1 << 30
        assert 'connection from uid' in d.log()[start:]  # debug output is on now

        # the new per-uid limit holds: 7 connections of root, the 8th is refused
        held = []
        try:
            for _ in range(7):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(d.socket)
                held.append(s)
            wait_log(d, r'\((7) open\)', start)
            r = d.cli('ping')
            assert r.returncode != 0, r.stdout
            wait_log(d, r'refused connection of uid 0 .*too many connections for this user',
                     start)
        finally:
            for s in held:
                s.close()

        # unchanged file: nothing changes; the key that waits for a restart still does
        said, _ = reload(d, 'log_level = debug\nmax_connections_per_uid = 7\n'
                            'max_size = 1G\nhot_max = 64M\nparallel_transfers = 9\n', conf)
        assert 'no key that applies while running changed' in said
        assert said.split('needs a restart to apply: ')[1] == 'parallel_transfers', said
    finally:
        assert d.stop()[0] == 0


def status(d):
    return json.loads(d.cli('status', '--json', check=True).stdout)['counters']


def test_sighup_lowering_max_size_and_hot_max_evicts_at_once(tmpdir_short, tmp_path):
    """max_size and hot_max lowered by a reload: the cache and the decoded items in memory
    shrink to them at once, through the eviction that logs what it removes."""
    import numpy as np
    from PIL import Image
    conf = os.path.join(tmpdir_short, 'dmcached.conf')
    with open(conf, 'w') as f:
        f.write('max_size = 0\n')
    root = tmp_path / 'ds'
    (root / 'images').mkdir(parents=True)
    rng = np.random.default_rng(7)
    n = 6
    for i in range(n):  # noise: PNG cannot make it smaller, every item is as large
        Image.fromarray(rng.integers(0, 256, (128, 128), dtype=np.uint8)).save(
            str(root / 'images' / ('%d.png' % i)))
    (root / 'dataset.json').write_text(json.dumps(
        {'resources': [{'id': 'r%d' % i, 'file': 'images/%d.png' % i} for i in range(n)]}))
    d = Daemon(tmpdir_short, args=['--config', conf])
    try:
        for i in range(n):
            r = d.cli('get', '--source', str(root), str(i), '-o', str(tmp_path / 'o.npy'),
                      timeout=60)
            assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 10
        while status(d)['connections'] > 1:  # the gets' connections are gone
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # and the decoded tensors they kept are stored (on the threadpool, after the item
        # was handed over): cache_bytes counts them
        while status(d)['serve_tensors_stored_total'] < n:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        before = status(d)
        assert before['serve_hot_items'] == n and before['cache_objects'] >= n
        entry = before['serve_hot_bytes'] // n
        assert entry * n == before['serve_hot_bytes']  # n entries of one size
        max_size = before['cache_bytes'] // 2
        hot_max = entry * n // 2 + entry // 2  # room for 3.5 entries: 3 stay
        said, start = reload(d, 'max_size = %d\nhot_max = %d\n' % (max_size, hot_max), conf)
        assert "max_size = '%d' (was '0')" % max_size in said, said
        assert "hot_max = '%d' (was '1G')" % hot_max in said, said
        assert 'needs a restart' not in said
        log = d.log()[start:]
        # the snapshot goes, named, once the blobs no snapshot uses are not enough
        assert re.search(r'evicting \d+ files \(.*\) of snapshot \d+ \(.*\), the least recently '
                         r'used, to make room within max_size %d' % max_size, log), log
        freed = re.search(r'max_size %d and min_free \d+ bytes applied: evicted (\d+) bytes\n'
                          % max_size, log)
        assert freed, log
        dropped = re.search(r'hot_max %d bytes applied: dropped (\d+) decoded tensors '
                            r'\((\d+) bytes\)' % hot_max, log)
        assert dropped, log
        after = status(d)
        assert after['cache_max_bytes'] == max_size
        assert after['cache_bytes'] <= max_size
        assert before['cache_bytes'] - after['cache_bytes'] == int(freed.group(1))
        assert after['cache_evicted_total'] - before['cache_evicted_total'] == \
            before['cache_objects'] - after['cache_objects']
        assert after['serve_hot_items'] == 3 and int(dropped.group(1)) == n - 3
        assert after['serve_hot_bytes'] == 3 * entry <= hot_max
        assert int(dropped.group(2)) == (n - 3) * entry
        assert after['serve_hot_evictions_total'] - before['serve_hot_evictions_total'] == n - 3
        # evicted, the items are not served any more; brought back, they are
        r = d.cli('get', '--source', str(root), '0', '-o', str(tmp_path / 'o.npy'), timeout=60)
        assert r.returncode == 0, r.stderr
    finally:
        assert d.stop()[0] == 0


def test_bad_edit_is_refused_and_the_running_configuration_stays(tmpdir_short):
    conf = os.path.join(tmpdir_short, 'dmcached.conf')
    with open(conf, 'w') as f:
        f.write('max_connections_per_uid = 50\nmax_jobs_per_uid = 5\n')
    d = Daemon(tmpdir_short, args=['--config', conf])
    try:
        bad = 'max_connections_per_uid = 9\nmax_jobs_per_uid = 0\n'  # 0 is out of range
        with open(os.path.join(tmpdir_short, 'bad.conf'), 'w') as f:
            f.write(bad)
        r = run_daemon('--config', os.path.join(tmpdir_short, 'bad.conf'), '--socket',
                       d.socket, '--check-config')
        assert r.returncode == 1 and 'bad.conf:2: max_jobs_per_uid' in r.stderr, r.stderr

        said, start = reload(d, bad, conf)
        assert said.startswith('reload refused'), said
        assert 'dmcached.conf:2: max_jobs_per_uid' in d.log()[start:]
        assert d.proc.poll() is None
        counters = json.loads(d.cli('status', '--json', check=True).stdout)['counters']
        assert counters['connections_per_uid_max'] == 50  # not 9: nothing of it applied

        # a syntax error, and a drop-in with an unknown key: refused the same way
        said, _ = reload(d, 'max_connections_per_uid 9\n', conf)
        assert said.startswith('reload refused'), said
        with open(conf, 'w') as f:
            f.write('max_connections_per_uid = 9\n')
        os.mkdir(conf + '.d')
        with open(os.path.join(conf + '.d', 'x.conf'), 'w') as f:
            f.write('no_such_key = 1\n')
        said, start = reload(d, 'max_connections_per_uid = 9\n', conf)
        assert said.startswith('reload refused'), said
        assert "unknown key 'no_such_key'" in d.log()[start:]
        counters = json.loads(d.cli('status', '--json', check=True).stdout)['counters']
        assert counters['connections_per_uid_max'] == 50

        # fixed: applied
        os.unlink(os.path.join(conf + '.d', 'x.conf'))
        said, _ = reload(d, 'max_connections_per_uid = 9\n', conf)
        assert "max_connections_per_uid = '9' (was '50')" in said
        assert "max_jobs_per_uid = '64' (was '5')" in said  # back to its default
        counters = json.loads(d.cli('status', '--json', check=True).stdout)['counters']
        assert counters['connections_per_uid_max'] == 9
    finally:
        assert d.stop()[0] == 0
