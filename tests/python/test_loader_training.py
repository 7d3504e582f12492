"""dmcache.Loader as a training loop uses it: in-place operations on batches (the arena
mapped copy-on-write: private to the writer, discarded at release, never seen by the daemon
or another client), one tensor per batch of one dtype (dtype= converts in the daemon,
float16/bfloat16 here; BatchMismatchError names the items and the fix; collate='list'),
against pydicom and fresh clients; the package installed by meson (DESTDIR) and by pip
into a venv."""
import json
import os
import shutil
import subprocess
import textwrap

import numpy as np
import pytest
import torch

import dmcache
from conftest import ARENA, counters, expect_batch, run_python


class ArenaLoader(dmcache.Loader):
    """Every batch laid out in the connection's arena (no items handed in place)."""
    _regions = False


@pytest.mark.parametrize('prefetch', [0, 2])
def test_in_place_ops_are_private_and_gone_at_release(daemon, ct_reference, prefetch):
    """A writes into every batch it reads (stacked views of its arena); B, another
    client, reads the same order at the same time and sees the daemon's values; A's next
    epoch, in the same arena ranges, is again equal to pydicom and to a fresh client. (A
    reads the arena path: batches of hot items handed in place are copies, test_regions.)"""
    a = ArenaLoader('ct', batch_size=8, shuffle=True, seed=3, dtype='int32',
                       prefetch=prefetch, arena_bytes=ARENA)
    b = dmcache.Loader('ct', batch_size=8, shuffle=True, seed=3, dtype='int32',
                       prefetch=prefetch, arena_bytes=ARENA)
    addr, size = None, None
    seen = 0
    for x, y in zip(a, b):
        if addr is None:
            addr, size = a._conns[0].client.arena()
        assert x.indices == y.indices
        assert isinstance(x.images, torch.Tensor) and x.images.dtype == torch.int32
        assert addr <= x.images.data_ptr() < addr + size  # a view, not a copy
        want = expect_batch(ct_reference, x.indices)
        assert torch.equal(x.images, want)
        x.images.add_(1000)
        x.images[:, 0].mul_(2)
        x.images.sub_(x.images.mean(dtype=torch.float64).to(torch.int32))
        assert not torch.equal(x.images, want)
        # B's arena is its own: the daemon's values
        assert torch.equal(y.images, want)
        seen += len(x.indices)
    assert seen == 72
    # the same connection and arena ranges, read again: the written pages were discarded
    for epoch in (0, 1):
        a.set_epoch(epoch)
        fresh = dmcache.Loader('ct', batch_size=8, shuffle=True, seed=3, dtype='int32',
                               arena_bytes=ARENA, copy=True)
        fresh.set_epoch(epoch)
        for x, f in zip(a, fresh):
            assert x.indices == f.indices
            want = expect_batch(ct_reference, x.indices)
            assert torch.equal(x.images, want) and torch.equal(f.images, want)
            x.images.add_(7)  # and written again, in place
        fresh.close()
    a.close()
    b.close()
    assert counters(daemon.socket)['serve_arena_used_bytes'] == 0


def test_in_place_ops_on_lists_and_mixed_sizes(daemon, ct_reference):
    """Lists of views (collate='list', mixed int16/uint16): each item written in place;
    batches of varied sizes reuse arena ranges at shifting offsets; a re-read equals
    pydicom."""
    for rnd in range(2):
        for bs in (5, 3, 8):
            loader = dmcache.Loader('ct', batch_size=bs, shuffle=True, seed=bs + rnd,
                                    collate='list', prefetch=1, arena_bytes=ARENA)
            for batch in loader:
                imgs = batch.images if isinstance(batch.images, list) else list(batch.images)
                for img, i in zip(imgs, batch.indices):
                    assert np.array_equal(img.numpy().astype(np.int32), ct_reference[i]), i
                    img.add_(1)
                    img.neg_()
            loader.close()


def test_a_writer_in_another_process_never_faults(daemon, ct_reference):
    """Every path of the package (stacked torch, list torch, numpy without torch, copies)
    takes writes in a child process, which exits normally."""
    code = textwrap.dedent('''
        import sys
        if NUMPY_ONLY:
            sys.modules['torch'] = None
        import numpy as np
        import dmcache
        n = 0
        for kw in (dict(dtype='float32'), dict(collate='list'), dict(copy=True, dtype='int32'),
                   dict(dtype='float16')):
            loader = dmcache.Loader('ct', batch_size=8, shuffle=True, arena_bytes=32 << 20,
                                    **kw)
            for b in loader:
                for x in (b.images if isinstance(b.images, list) else [b.images]):
                    x += 1
                    x *= 2
                    n += 1
            loader.close()
        print('ok', n, flush=True)
    ''')
    for mode in ('torch', 'numpy'):
        r = run_python(code.replace('NUMPY_ONLY', repr(mode == 'numpy')))
        assert r.returncode == 0 and r.stdout.startswith('ok'), (mode, r.returncode,
                                                                  r.stderr[-2000:])


def test_one_tensor_per_batch_or_a_clear_error(daemon, ct_reference):
    # mixed int16/uint16 slices without dtype=: the first mixed batch raises, naming both
    loader = dmcache.Loader('ct', batch_size=8, shuffle=True, seed=0, arena_bytes=ARENA)
    with pytest.raises(dmcache.BatchMismatchError) as e:
        for b in loader:
            assert isinstance(b.images, torch.Tensor)
    text = str(e.value)
    assert 'int16' in text and 'uint16' in text and 'dtype=' in text, text
    assert "collate='list'" in text and '(1, 1, 512, 512)' in text, text
    assert e.value.epoch == 0 and len(e.value.indices) == 8
    assert isinstance(e.value, ValueError)
    loader.close()
    assert counters(daemon.socket)['serve_arena_used_bytes'] == 0
    # shapes that differ ('sample': CT slices and a 4-frame image)
    loader = dmcache.Loader('sample', batch_size=19, dtype='float32', arena_bytes=ARENA)
    with pytest.raises(dmcache.BatchMismatchError) as e:
        next(iter(loader))
    assert 'shapes differ' in str(e.value) and "collate='list'" in str(e.value)
    loader.close()
    # a policy: every batch of a shuffled epoch is one tensor of that dtype
    for name, tdt in (('float32', torch.float32), ('int32', torch.int32),
                      ('float16', torch.float16), ('bfloat16', torch.bfloat16),
                      (torch.float64, torch.float64)):
        loader = dmcache.Loader('ct', batch_size=8, shuffle=True, seed=1, dtype=name,
                                arena_bytes=ARENA, metadata=False)
        n = 0
        for b in loader:
            assert isinstance(b.images, torch.Tensor) and b.images.dtype == tdt
            assert b.images.shape == (len(b.indices), 1, 1, 512, 512)
            want = expect_batch(ct_reference, b.indices)
            if tdt in (torch.float16, torch.bfloat16):
                want = want.to(torch.float32).to(tdt)
            assert torch.equal(b.images, want.to(tdt)), name
            n += len(b.indices)
        assert n == 72
        loader.close()
    # collate='list' keeps lists where items differ
    loader = dmcache.Loader('ct', batch_size=8, shuffle=True, seed=0, collate='list',
                            arena_bytes=ARENA)
    kinds = {type(b.images) for b in loader}
    assert list in kinds
    loader.close()
    with pytest.raises(ValueError):
        dmcache.Loader('ct', collate='tuple')
    with pytest.raises(ValueError) as e:
        dmcache.Loader('ct', dtype='complex64')
    assert 'float16' in str(e.value)


def _env_without_package():
    e = {k: v for k, v in os.environ.items()
         if k not in ('PYTHONPATH', 'DMCACHE_LIBRARY')}
    return e


def test_destdir_install_lands_on_debian_pythons_path(daemon, tmp_path):
    build = os.environ['DMC_BUILD_ROOT']
    dest = str(tmp_path / 'dest')
    r = subprocess.run(['meson', 'install', '-C', build, '--no-rebuild', '--quiet',
                        '--destdir', dest, '--tags', 'runtime,python-runtime'],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    inits = [os.path.join(d, f) for d, _, fs in os.walk(dest) for f in fs
             if f == '__init__.py' and d.endswith('/dmcache')]
    libs = [os.path.join(d, f) for d, _, fs in os.walk(dest) for f in fs
            if f == 'libdmcache.so.0']
    assert len(inits) == 1 and len(libs) == 1, (inits, libs)
    purelib = os.path.dirname(os.path.dirname(inits[0]))[len(dest):]
    env = _env_without_package()
    r = subprocess.run(['/usr/bin/python3', '-c', 'import sys, json; print(json.dumps(sys.path))'],
                       env=env, capture_output=True, text=True, timeout=60)
    assert purelib in json.loads(r.stdout), (purelib, r.stdout)
    # the installed package, imported by Debian's Python, with the installed library
    env.update(PYTHONPATH=dest + purelib, LD_LIBRARY_PATH=os.path.dirname(libs[0]),
               DMCACHE_SOCKET=daemon.socket)
    code = ('import dmcache; print(dmcache.__file__); print(dmcache.LIBRARY_PATH); '
            'dmcache.Client().ping(); print("pong")')
    r = subprocess.run(['/usr/bin/python3', '-c', code], env=env, capture_output=True,
                       text=True, timeout=60, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    out = r.stdout.split('\n')
    assert out[0].startswith(dest + purelib) and out[2] == 'pong', out
    # recorded at install: prefix/libdir (not there, only in DESTDIR): then the linker's
    with open(os.path.join(os.path.dirname(inits[0]), '_install_paths.py')) as f:
        assert os.path.dirname(libs[0])[len(dest):] in f.read()
    assert out[1] == 'libdmcache.so.0', out


def test_pip_install_into_a_venv(daemon, tmp_path):
    src = str(tmp_path / 'src')
    shutil.copytree(os.path.join(os.environ['DMC_SOURCE_ROOT'], 'client', 'python'), src)
    venv = str(tmp_path / 'venv')
    env = _env_without_package()
    r = subprocess.run(['/usr/bin/python3', '-m', 'venv', '--system-site-packages', venv],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lib = os.path.join(os.environ['DMC_BUILD_ROOT'], 'client', 'libdmcache.so.0')
    r = subprocess.run([os.path.join(venv, 'bin', 'pip'), 'install', '--no-index',
                        '--no-build-isolation', '--quiet', src],
                       env=dict(env, DMCACHE_LIBRARY=lib), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    env['DMCACHE_SOCKET'] = daemon.socket
    code = textwrap.dedent('''
        import dmcache
        print(dmcache.__file__)
        print(dmcache.LIBRARY_PATH)
        loader = dmcache.Loader('ct', batch_size=8, dtype='float32')
        b = next(iter(loader))
        print(tuple(b.images.shape))
    ''')
    r = subprocess.run([os.path.join(venv, 'bin', 'python'), '-c', code], env=env,
                       capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    out = r.stdout.split('\n')
    assert out[0].startswith(venv + '/lib/') and out[1] == os.path.abspath(lib), out
    assert out[2] == '(8, 1, 1, 512, 512)', out


def test_errors_name_what_was_tried_and_repr(daemon, tmp_path):
    loader = dmcache.Loader('ct', batch_size=8, shuffle=True, seed=4, dtype='float16',
                            arena_bytes=ARENA)
    text = repr(loader)
    for part in ("project 'ct'", 'version ' + loader.version, '72 items', '9 batches of 8',
                 'seed=4', 'dtype=float16', 'collate=stack'):
        assert part in text, text
    loader.close()
    # a socket that is not there: the path tried is named
    sock = str(tmp_path / 'nothing.sock')
    with pytest.raises(dmcache.ConnectError) as e:
        dmcache.Loader('ct', socket=sock)
    assert sock in str(e.value)
    # a path that is not a dataset folder: never a Datamint project of that name
    missing = str(tmp_path / 'no-such-folder')
    with pytest.raises(FileNotFoundError) as e:
        dmcache.Loader(missing)
    assert os.path.join(missing, 'dataset.json') in str(e.value)
    # a project the key does not see: the project, the server and the socket are named
    with pytest.raises(dmcache.NotFoundError) as e:
        dmcache.Loader('no-such-project')
    assert "'no-such-project'" in str(e.value) and os.environ['DATAMINT_API_URL'] in \
        str(e.value) and daemon.socket in str(e.value)


def test_metadata_has_datasets_shapes_and_is_parsed_lazily(daemon):
    ds = dmcache.Dataset(dataset_name='sample')
    loader = dmcache.Loader('sample', batch_size=5, collate='list', arena_bytes=ARENA)
    n = 0
    for b in loader:
        assert all(m._d is None for m in b.meta)  # nothing parsed until read
        for m, i in zip(b.meta, b.indices):
            _, dicom, info = ds[i]
            for k in info:
                assert m[k] == info[k], (i, k)
            assert m['resource']['id'] == info['id']
            if dicom is None:
                assert m['dicom'] is None
            else:
                for tag in ('Modality', 'Rows', 'Columns', 'SOPInstanceUID'):
                    assert m['dicom'].get(tag) == dicom.get(tag), (i, tag)
            n += 1
    assert n == 19
    loader.close()
    ds.close()


@pytest.mark.parametrize('stop', [0, 3, 5])  # 5: the whole epoch (36 items a rank)
def test_resume_after_n_batches_equals_the_uninterrupted_order(daemon, stop):
    kw = dict(batch_size=8, shuffle=True, seed=9, dtype='float32', arena_bytes=ARENA,
              metadata=False, world_size=2, rank=1)
    whole = dmcache.Loader('ct', **kw)
    whole.set_epoch(2)
    expect = [(b.indices, b.images.clone()) for b in whole]
    whole.close()
    first = dmcache.Loader('ct', **kw)
    first.set_epoch(2)
    got = []
    state = first.state_dict()  # before the first batch
    for b in first:
        if len(got) == stop:
            break
        got.append((b.indices, b.images.clone()))  # the training step on b
        state = first.state_dict()  # a checkpoint after it
    first.close()
    assert state['position'] == stop and state['epoch'] == 2
    state = json.loads(json.dumps(state))  # as saved in a checkpoint
    second = dmcache.Loader('ct', **kw)
    second.load_state_dict(state)
    got += [(b.indices, b.images.clone()) for b in second]
    assert [g[0] for g in got] == [e[0] for e in expect]
    assert all(torch.equal(g[1], e[1]) for g, e in zip(got, expect))
    assert second.state_dict()['position'] == len(expect)
    # iterated again (no set_epoch): the whole epoch again, from its first batch
    assert [b.indices for b in second] == [e[0] for e in expect]
    second.set_epoch(3)
    assert second.state_dict()['position'] == 0
    with pytest.raises(ValueError) as e:
        dmcache.Loader('ct', **dict(kw, batch_size=4)).load_state_dict(state)
    assert 'batch_size' in str(e.value)
    second.close()


def test_indices_and_weights(daemon, ct_reference):
    subset = [70, 3, 5, 64, 10, 11, 12, 40, 41, 42, 43]
    seen = []
    for rank in range(2):
        loader = dmcache.Loader('ct', batch_size=4, shuffle=True, seed=2, dtype='int32',
                                indices=subset, rank=rank, world_size=2, metadata=False)
        assert len(loader) == 2
        for b in loader:
            assert isinstance(b.images, torch.Tensor)
            assert torch.equal(b.images, expect_batch(ct_reference, b.indices))
            seen += b.indices
        again = [b.indices for b in loader]
        assert sum(again, []) == loader.indices()
        loader.close()
    # every item of the subset once, one repeated to fill the second rank (12 = 2 * 6)
    assert len(seen) == 12 and set(seen) == set(subset)
    w = np.zeros(72)
    w[[1, 2, 30]] = [1, 1, 2]
    loader = dmcache.Loader('ct', batch_size=8, seed=6, dtype='float32', weights=w,
                            num_samples=40, metadata=False)
    drawn = [i for b in loader for i in b.indices]
    assert len(drawn) == 40 and set(drawn) <= {1, 2, 30} and drawn.count(30) > 10
    assert drawn == [i for b in loader for i in b.indices]  # seeded
    loader.set_epoch(1)
    assert [i for b in loader for i in b.indices] != drawn
    loader.close()
    with pytest.raises(ValueError):
        dmcache.Loader('ct', indices=[72])
    with pytest.raises(ValueError):
        dmcache.Loader('ct', weights=[1.0] * 3)
