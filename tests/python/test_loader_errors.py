"""dmcache.Loader's errors a user can act on, against the real daemon and the emulator: a
key the Datamint server refuses (401, 403) is a PermissionError; a project the key may
not see, or one another user cached, answers exactly like an absent one; every error
names what was tried (socket paths, the local folder looked for, project and server)."""
import json
import os
import pickle
import sys
import tempfile

import pytest

import dmcache
from conftest import KEY, TESTS, emulator, start_daemon

sys.path.insert(0, os.path.join(TESTS, 'integration'))
import uids  # noqa: E402
from uids import ALICE, BOB  # noqa: E402

BUILD = os.environ['DMC_BUILD_ROOT']


def refused(exc_info, status):
    e = exc_info.value
    assert type(e) is dmcache.KeyRefusedError
    assert isinstance(e, PermissionError) and isinstance(e, dmcache.NotFoundError)
    assert e.http_status == status and e.name == 'not_found_or_denied'
    return str(e)


def test_an_unknown_key_is_a_permission_error(daemon, emu):
    with pytest.raises(PermissionError) as ei:
        dmcache.Loader('sample', api_key='dmc-key-revoked', server_url=emu.url)
    text = refused(ei, 401)
    # what was tried: the project, the server, the daemon's socket, where the key came from
    for part in ("project 'sample'", emu.url, daemon.socket, 'api_key=',
                 'Unauthorized'):
        assert part in text, text
    # a project that does not exist: the same refusal (the key is refused before any lookup)
    with pytest.raises(dmcache.KeyRefusedError) as ei:
        dmcache.Loader('no-such-project', api_key='dmc-key-revoked', server_url=emu.url)
    assert refused(ei, 401) == text.replace('sample', 'no-such-project')
    # the error survives a DataLoader worker's round trip (pickle) with its class and status
    back = pickle.loads(pickle.dumps(ei.value))
    assert type(back) is dmcache.KeyRefusedError and back.http_status == 401


def test_a_refused_key_from_the_environment_says_so(daemon, emu, monkeypatch,
                                                    tmpdir_short):
    monkeypatch.setenv('DATAMINT_API_KEY', 'dmc-key-revoked')
    monkeypatch.chdir(tmpdir_short)
    with pytest.raises(dmcache.KeyRefusedError) as ei:
        dmcache.Loader('sample')   # server from DATAMINT_API_URL, not given: a bare name
    text = refused(ei, 401)
    assert 'DATAMINT_API_KEY' in text and emu.url in text, text
    # a bare name: the local folder of that name was looked for first
    assert os.path.join(tmpdir_short, 'sample', 'dataset.json') in text, text


def test_a_forbidden_key_is_a_permission_error(daemon, emu):
    """403 for one user's key (an emulator fault rule): a PermissionError naming the
    project and server; another user's key is served meanwhile."""
    rid = emu.add_fault(path='^/projects', status=403, user='carol@example.org',
                        message='key not allowed from this network')
    try:
        with pytest.raises(PermissionError) as ei:
            dmcache.Loader('ct', api_key=emulator.KEY_CT, server_url=emu.url)
        text = refused(ei, 403)
        for part in ("project 'ct'", emu.url, daemon.socket, 'not allowed from this network'):
            assert part in text, text
        with dmcache.Loader('ct', api_key=KEY, server_url=emu.url) as other:
            assert other.items > 0
    finally:
        emu.remove_fault(rid)
    with dmcache.Loader('ct', api_key=emulator.KEY_CT, server_url=emu.url) as ok:
        assert ok.items > 0


def test_not_entitled_answers_like_absent(daemon, emu):
    """A key that may not see a project: NotFoundError, no status, the same words as for a
    project that does not exist (nothing tells them apart)."""
    answers = []
    for name in ('sample', 'no-such-project'):
        with pytest.raises(dmcache.NotFoundError) as ei:
            dmcache.Loader(name, api_key=emulator.KEY_NONE, server_url=emu.url)
        e = ei.value
        assert type(e) is dmcache.NotFoundError and not isinstance(e, PermissionError)
        assert e.http_status == 0
        answers.append(str(e).replace(name, 'NAME'))
    assert answers[0] == answers[1]
    assert emu.url in answers[0] and daemon.socket in answers[0]


def test_no_daemon_names_the_sockets_tried_and_the_project(emu, monkeypatch):
    monkeypatch.setenv('DATAMINT_API_KEY', KEY)
    with pytest.raises(dmcache.ConnectError) as ei:
        dmcache.Loader('sample', server_url=emu.url, socket='/nonexistent/dmcached.sock')
    text = str(ei.value)
    for part in ('/nonexistent/dmcached.sock', "project 'sample'", emu.url):
        assert part in text, text
    assert isinstance(ei.value, ConnectionError)
    # the default paths, when neither socket= nor DMCACHE_SOCKET says another
    monkeypatch.delenv('DMCACHE_SOCKET', raising=False)
    monkeypatch.setenv('XDG_RUNTIME_DIR', '/nonexistent/run')
    with pytest.raises(dmcache.ConnectError) as ei:
        dmcache.Loader('sample', server_url=emu.url)
    text = str(ei.value)
    tried = dmcache._lib.socket_candidates(None)
    assert tried and all(p in text for p in tried), (tried, text)
    assert 'DMCACHE_SOCKET' in text and "project 'sample'" in text


def test_a_bare_name_says_which_folder_was_looked_for(daemon, emu, tmpdir_short,
                                                       monkeypatch):
    # root= given: <root>/<name>/dataset.json; the name is then tried as a project
    with pytest.raises(dmcache.NotFoundError) as ei:
        dmcache.Loader('no-such-dataset', root=tmpdir_short)
    text = str(ei.value)
    assert os.path.join(tmpdir_short, 'no-such-dataset', 'dataset.json') in text, text
    assert "project 'no-such-dataset'" in text and emu.url in text, text
    # no key anywhere: the error says so, and which folder was looked for
    monkeypatch.delenv('DATAMINT_API_KEY')
    monkeypatch.setenv('HOME', tmpdir_short)
    monkeypatch.delenv('XDG_CONFIG_HOME', raising=False)
    monkeypatch.chdir(tmpdir_short)
    with pytest.raises(dmcache.DmcacheError) as ei:
        dmcache.Loader('no-such-dataset')
    text = str(ei.value)
    assert 'no Datamint API key' in text, text
    assert os.path.join(tmpdir_short, 'no-such-dataset', 'dataset.json') in text, text
    # given with a server: a project only, no folder is looked for nor named
    with pytest.raises(dmcache.NotFoundError) as ei:
        dmcache.Loader('no-such-dataset', api_key=KEY, server_url=emu.url)
    assert 'dataset.json' not in str(ei.value)
    # a path (not a name) that has no dataset.json: FileNotFoundError naming it
    with pytest.raises(FileNotFoundError) as ei:
        dmcache.Loader(os.path.join(tmpdir_short, 'nothing-here'))
    assert os.path.join(tmpdir_short, 'nothing-here', 'dataset.json') in str(ei.value)


OPEN_AS = r'''
import json, sys, dmcache
out = []
for name in sys.argv[1:]:
    for offline in (False, True):
        try:
            with dmcache.Loader(name, offline=offline) as l:
                out.append({'ok': l.items, 'read': sum(len(b.indices) for b in l)})
        except dmcache.DmcacheError as e:
            out.append({'cls': type(e).__name__, 'status': e.http_status,
                        'text': str(e).replace(name, 'NAME'),
                        'perm': isinstance(e, PermissionError)})
print(json.dumps(out))
'''


def test_another_users_snapshot_answers_like_an_absent_one(emu):
    """alice caches `sample` with her key; bob (another uid) with a key that may not see it
    gets, online and offline, exactly the answer of a project that does not exist; with a
    key the server refuses he gets his own 401, the same for both names."""
    uids.require_root()
    with tempfile.TemporaryDirectory(prefix='dmc-') as tmp:
        os.chmod(tmp, 0o755)
        d = start_daemon(tmp)
        try:
            uids.open_up(os.path.dirname(d.socket))
            env = {'PATH': os.environ.get('PATH', '/usr/bin:/bin'), 'HOME': '/nonexistent',
                   'PYTHONPATH': os.path.join(BUILD, 'client', 'python'), 'LANG': 'C.UTF-8',
                   'DMCACHE_SOCKET': d.socket, 'DATAMINT_API_URL': emu.url}
            if os.environ.get('LD_PRELOAD'):
                env['LD_PRELOAD'] = os.environ['LD_PRELOAD']
                env['ASAN_OPTIONS'] = 'detect_leaks=0'

            def run(uid, key, *names):
                r = uids.run(uid, ['/usr/bin/python3', '-c', OPEN_AS] + list(names),
                             env=dict(env, DATAMINT_API_KEY=key), cwd='/', timeout=180)
                assert r.returncode == 0, r.stderr
                return json.loads(r.stdout.strip().splitlines()[-1])

            alice = run(ALICE, KEY, 'sample')
            assert alice[0] == alice[1] and alice[0]['ok'] > 0   # cached, offline too
            bob = run(BOB, emulator.KEY_NONE, 'sample', 'no-such-project')
            assert bob[0] == bob[2] and bob[1] == bob[3], bob     # online, offline
            for answer in bob:
                assert answer['cls'] == 'NotFoundError' and answer['status'] == 0
                assert not answer['perm'] and d.socket in answer['text']
            refused = run(BOB, 'dmc-key-revoked', 'sample', 'no-such-project')
            assert refused[0] == refused[2], refused
            assert refused[0]['cls'] == 'KeyRefusedError' and refused[0]['status'] == 401
            assert refused[0]['perm']
            # offline, the server is not asked: bob's unchecked key is not entitled
            assert refused[1] == refused[3] and refused[1]['cls'] == 'NotFoundError'
        finally:
            d.stop()
            d.notify.close()
