"""Two real local users for the trust-boundary tests.

The tests run as root (CI does) and start clients as other uids with setpriv, the way a
hostile local user would run them: alice (the victim, who holds a key) and bob (the
attacker). The uids are fixed and unused on Debian (no passwd entry is needed: the daemon
identifies peers by SO_PEERCRED, never by name).

Without root these tests cannot switch uids: they skip on a developer's machine, but fail
under CI (CI=true), which runs as root, so that a lost privilege never hides them.
"""
import os
import stat
import subprocess

import pytest

ALICE = 61001
BOB = 61002


def require_root():
    if os.geteuid() == 0:
        return
    if os.environ.get('CI') == 'true':
        pytest.fail('this test needs root (CI runs as root): it switches to other uids')
    pytest.skip('needs root to run clients as other uids')


def command(uid, argv, gid=None):
    """argv run as `uid` (and `gid`, default the same number) with no supplementary groups."""
    gid = uid if gid is None else gid
    return ['setpriv', '--reuid=%d' % uid, '--regid=%d' % gid, '--clear-groups', '--'] + \
        list(argv)


def run(uid, argv, env=None, timeout=60, gid=None, **kw):
    """Runs argv as `uid`; returns the CompletedProcess (text, output captured)."""
    env = dict(env if env is not None else os.environ)
    env.setdefault('HOME', '/nonexistent')
    env.pop('XDG_RUNTIME_DIR', None)
    return subprocess.run(command(uid, argv, gid), env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


def popen(uid, argv, env=None, gid=None, **kw):
    env = dict(env if env is not None else os.environ)
    env.setdefault('HOME', '/nonexistent')
    env.pop('XDG_RUNTIME_DIR', None)
    return subprocess.Popen(command(uid, argv, gid), env=env, **kw)


def open_up(*paths):
    """Makes directories traversable (and files readable) by other users: the socket's
    directory of a root daemon is 0755 in production too."""
    for p in paths:
        mode = os.stat(p).st_mode
        extra = stat.S_IXOTH | stat.S_IROTH if stat.S_ISDIR(mode) else stat.S_IROTH
        os.chmod(p, stat.S_IMODE(mode) | extra)


def owned_dir(path, uid, mode=0o700):
    """A directory that belongs to `uid` (a user's home-like folder)."""
    os.makedirs(path, exist_ok=True)
    os.chown(path, uid, uid)
    os.chmod(path, mode)
    return path


def chown_tree(path, uid):
    for root, dirs, files in os.walk(path):
        os.chown(root, uid, uid)
        for name in files:
            os.chown(os.path.join(root, name), uid, uid)
