"""The Debian packages, built, checked, installed, used and purged on this machine.

dpkg-buildpackage -b builds the five packages in a copy of the tree; lintian reports no
error; `apt-get install ./*.deb` installs them (the dmcache user from sysusers, the cache
directory from tmpfiles, dmcached.socket enabled); the installed /usr/sbin/dmcached runs as
the dmcache user against the emulator, the installed `dmcache` prefetches and reads an
item, and the installed Python package reads a batch. Then `apt-get remove` keeps the
cache and `apt-get purge` deletes it, and the machine is left as it was (the system user
too, when the test created it). Runs as root (CI does); in the slow suite.
"""
import grp
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

import uids
from conftest import Notify

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'emulator'))
import client as emulator  # noqa: E402

SOURCE = os.environ.get('DMC_SOURCE_ROOT') or os.path.abspath(
    os.path.join(os.path.dirname(__file__), '..', '..'))
PACKAGES = ['dmcached', 'dmcache', 'libdmcache0', 'libdmcache-dev', 'python3-dmcache']
ENABLED = '/etc/systemd/system/sockets.target.wants/dmcached.socket'


def sh(argv, timeout=600, check=True, **kw):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check:
        assert r.returncode == 0, '%s: %d\n%s\n%s' % (argv, r.returncode, r.stdout[-4000:],
                                                     r.stderr[-4000:])
    return r


def installed(pkg):
    r = subprocess.run(['dpkg-query', '-W', '-f=${Status}', pkg], capture_output=True,
                       text=True)
    return r.returncode == 0 and 'installed' in r.stdout and 'not-installed' not in r.stdout


def exists_user(name):
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def exists_group(name):
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def copy_tree(dest):
    """The project's files (tracked and new, not ignored: no build directories)."""
    r = subprocess.run(['git', '-C', SOURCE, 'ls-files', '-z', '--cached', '--others',
                        '--exclude-standard'], capture_output=True)
    if r.returncode == 0:
        for rel in r.stdout.decode().split('\0'):
            if rel and os.path.isfile(os.path.join(SOURCE, rel)):
                os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
                shutil.copy2(os.path.join(SOURCE, rel), os.path.join(dest, rel))
    else:
        shutil.copytree(SOURCE, dest, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns('build*', '.git', 'obj-*'))


@pytest.fixture(scope='module')
def machine():
    """Root, the tools, and a machine without the packages; restores it afterwards."""
    uids.require_root()
    for tool in ('dpkg-buildpackage', 'lintian', 'apt-get', 'dh'):
        if shutil.which(tool) is None:
            if os.environ.get('CI') == 'true':
                pytest.fail('%s is missing (scripts/install-deps.sh installs it)' % tool)
            pytest.skip('no ' + tool)
    already = [p for p in PACKAGES if installed(p)]
    if already:
        pytest.skip('the packages are installed on this machine already: %s' % already)
    # the package's purge deletes these: never someone else's
    for path in ('/var/cache/dmcache', '/etc/dmcache'):
        if os.path.lexists(path):
            pytest.skip('%s exists on this machine: purging the package would delete it' % path)
    before = {
        'user': exists_user('dmcache'),
        'group': exists_group('dmcache'),
        'cache': os.path.exists('/var/cache/dmcache'),
        'etc': os.path.exists('/etc/dmcache'),
    }
    yield before
    # whatever happened, nothing of the packages stays
    left = [p for p in PACKAGES if installed(p)]
    if left:
        subprocess.run(['apt-get', 'purge', '-y', '-q'] + left, capture_output=True,
                       timeout=600, env=dict(os.environ, DEBIAN_FRONTEND='noninteractive'))
    if not before['user'] and exists_user('dmcache'):
        subprocess.run(['userdel', 'dmcache'], capture_output=True)
    if not before['group'] and exists_group('dmcache'):
        subprocess.run(['groupdel', 'dmcache'], capture_output=True)
    if not before['cache'] and os.path.exists('/var/cache/dmcache'):
        shutil.rmtree('/var/cache/dmcache')


def test_package_build_install_use_purge(machine, tmpdir_short):
    work = tempfile.mkdtemp(prefix='dmc-deb-')
    try:
        run_all(machine, work, tmpdir_short)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_all(before, work, tmp):
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    for k in ('DMC_BUILD_ROOT', 'PYTHONPATH', 'MESON_BUILD_ROOT', 'MESON_SOURCE_ROOT'):
        env.pop(k, None)
    tree = os.path.join(work, 'dmcache')
    copy_tree(tree)

    # build
    t0 = time.monotonic()
    sh(['dpkg-buildpackage', '-b', '-uc', '-us'], cwd=tree, env=env, timeout=2400)
    print('dpkg-buildpackage: %.0f s' % (time.monotonic() - t0))
    debs = {p: os.path.join(work, '%s_0.1.0_%s.deb' % (p, sh(
        ['dpkg', '--print-architecture']).stdout.strip())) for p in PACKAGES}
    for p, f in debs.items():
        assert os.path.isfile(f), p

    # lintian: no error
    changes = [f for f in os.listdir(work) if f.endswith('.changes')]
    r = sh(['lintian', '--allow-root', os.path.join(work, changes[0])], check=False,
           timeout=900)
    errors = [l for l in r.stdout.splitlines() if l.startswith('E:')]
    assert not errors, r.stdout

    # install
    sh(['apt-get', 'install', '-y', '-q', '--no-install-recommends'] +
       ['./' + os.path.basename(f) for f in debs.values()], cwd=work, env=env)
    assert exists_user('dmcache') and exists_group('dmcache')
    dm = pwd.getpwnam('dmcache')
    st = os.stat('/var/cache/dmcache')
    assert st.st_uid == dm.pw_uid and st.st_mode & 0o777 == 0o700
    assert os.path.isfile('/etc/dmcache/dmcached.conf')
    assert os.path.isdir('/etc/dmcache/dmcached.conf.d')
    assert os.path.islink(ENABLED)
    for doc in ('operations.md', 'architecture.md', 'security.md', 'cli.md'):
        assert os.path.isfile(os.path.join('/usr/share/doc/dmcached', doc)), doc
    sh(['/usr/sbin/dmcached', '--check-config', '--config', '/etc/dmcache/dmcached.conf',
        '--socket', '/run/x.sock'])

    # the installed daemon, as the dmcache user, against the emulator
    with emulator.Emulator() as emu:
        use_installed(emu, dm, tmp, env)

    # remove keeps the cache and the configuration; purge deletes them
    sh(['apt-get', 'remove', '-y', '-q', 'dmcached'], env=env)
    assert os.path.isdir('/var/cache/dmcache') and os.listdir('/var/cache/dmcache')
    assert os.path.isfile('/etc/dmcache/dmcached.conf')
    sh(['apt-get', 'purge', '-y', '-q'] + PACKAGES, env=env)
    for p in PACKAGES:
        assert not installed(p), p
    assert not os.path.exists('/var/cache/dmcache') or before['cache']
    assert not os.path.exists('/etc/dmcache') or before['etc']
    assert not os.path.lexists(ENABLED)
    assert not os.path.exists('/usr/sbin/dmcached')
    assert not os.path.exists('/usr/lib/python3/dist-packages/dmcache')


def use_installed(emu, dm, tmp, env):
    rundir = os.path.join(tmp, 'run')
    os.mkdir(rundir, 0o755)
    os.chown(rundir, dm.pw_uid, dm.pw_gid)
    sock = os.path.join(rundir, 'dmcached.sock')
    notify = Notify(tmp)
    os.chmod(tmp, 0o755)
    os.chmod(notify.path, 0o777)
    log = open(os.path.join(tmp, 'dmcached.log'), 'wb')
    daemon_env = {'PATH': '/usr/sbin:/usr/bin:/sbin:/bin', 'NOTIFY_SOCKET': notify.path}
    proc = subprocess.Popen(
        ['setpriv', '--reuid=dmcache', '--regid=dmcache', '--init-groups', '--',
         '/usr/sbin/dmcached', '--config', '/etc/dmcache/dmcached.conf', '--socket', sock,
         '--cache-dir', '/var/cache/dmcache', '-o', 'servers=' + emu.url],
        env=daemon_env, stdout=log, stderr=log)
    try:
        assert notify.wait_for('READY=1', timeout=30, proc=proc), \
            open(os.path.join(tmp, 'dmcached.log')).read()
        client_env = {'PATH': '/usr/bin:/bin', 'HOME': tmp, 'DMCACHE_SOCKET': sock,
                      'DATAMINT_API_KEY': emulator.KEY_ALL, 'DATAMINT_API_URL': emu.url}
        r = sh(['/usr/bin/dmcache', 'prefetch', 'ct'], env=client_env, timeout=300)
        out = os.path.join(tmp, 'item.npy')
        sh(['/usr/bin/dmcache', 'get', 'ct', '0', '-o', out], env=client_env)
        assert open(out, 'rb').read(6) == b'\x93NUMPY'
        code = ('import dmcache, sys\n'
                'assert dmcache.LIBRARY_PATH.startswith("/usr/lib/"), dmcache.LIBRARY_PATH\n'
                'assert dmcache.__file__.startswith("/usr/lib/python3/dist-packages/")\n'
                'loader = dmcache.Loader("ct", batch_size=2)\n'
                'images, meta, indices = next(iter(loader))\n'
                'print(dmcache.__file__, len(indices), tuple(images[0].shape))\n')
        r = sh(['/usr/bin/python3', '-I', '-c', code], env=client_env, cwd='/', timeout=120)
        assert ' 2 (' in r.stdout, r.stdout
        counters = sh(['/usr/bin/dmcache', 'metrics'], env=client_env).stdout
        assert 'dmcache_up 1' in counters
    finally:
        proc.terminate()
        try:
            assert proc.wait(20) == 0, open(os.path.join(tmp, 'dmcached.log')).read()
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
            notify.close()
