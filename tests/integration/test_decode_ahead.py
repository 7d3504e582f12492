"""`dmcache prefetch --decode`: the daemon decodes the compressed items of a prefetched
snapshot into the tensor cache, so that the first GET reads a stored tensor, and leaves
every decoded tensor (uncompressed items too) in the hot set and the snapshot's region
while they have room, so that the first GET reads it from memory without a decode."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import BUILD, DMCACHE, Daemon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'emulator'))
import client as emulator  # noqa: E402
from test_trust_cache import asan_preload  # noqa: E402

KEY = emulator.KEY_ALL
UNCOMPRESSED = {'1.2.840.10008.1.2', '1.2.840.10008.1.2.1', '1.2.840.10008.1.2.2'}


def new_daemon(emu, directory, args=()):
    d = Daemon(directory, args=args)
    d.env.update(DATAMINT_API_KEY=KEY, DATAMINT_API_URL=emu.url)
    return d


def stop(d):
    rc, _ = d.stop()
    d.notify.close()
    assert rc == 0, d.log()


def prefetch(d, project, *args):
    r = subprocess.run([DMCACHE, '--socket', d.socket, 'prefetch', '--json'] + list(args) +
                       [project], env=d.env, capture_output=True, text=True, timeout=300)
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{')]
    return r, events


def counters(d):
    return json.loads(d.cli('status', '--json', check=True).stdout)['counters']


def get(d, project, index, out):
    r = subprocess.run([DMCACHE, '--socket', d.socket, 'get', project, str(index), '-o', out],
                       env=d.env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return np.load(out), json.load(open(out[:-4] + '.json'))


def syntaxes(emu, project):
    """Transfer syntax of each DICOM resource of the corpus project, read with pydicom."""
    import pydicom
    root = os.path.join(emu.corpus, 'projects', project)
    out = []
    for dirpath, _, files in os.walk(os.path.join(root, 'files')):
        for f in files:
            ds = pydicom.dcmread(os.path.join(dirpath, f), stop_before_pixels=True)
            out.append(str(ds.file_meta.TransferSyntaxUID))
    return out


def expensive(emu, project):
    """For each file of the corpus project, whether its codec is worth decoding ahead:
    DICOM by its transfer syntax (read with pydicom), PNG, JPEG and .nii.gz yes, .nii no."""
    import pydicom
    out = []
    for dirpath, _, files in os.walk(os.path.join(emu.corpus, 'projects', project, 'files')):
        for f in files:
            path = os.path.join(dirpath, f)
            if f.endswith('.dcm'):
                ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
                out.append(str(ts) not in UNCOMPRESSED)
            else:
                out.append(not f.endswith('.nii'))
    return out


def parse_notice(text):
    # "decoded ahead: N decoded, A already decoded, S skipped (uncompressed), F failed,
    # H held in memory"
    assert text.startswith('decoded ahead: '), text
    parts = [p.strip() for p in text[len('decoded ahead: '):].split(',')]
    return {' '.join(p.split()[1:]): int(p.split()[0]) for p in parts}


@pytest.mark.parametrize('project', ['ct', 'formats'])
def test_decode_ahead_serves_stored_tensors(emu, tmp_path, tmpdir_short, project):
    ts = expensive(emu, project)
    n_exp = sum(ts)
    n_cheap = len(ts) - n_exp
    assert n_exp > 0 and n_cheap > 0

    # a daemon that prefetches with --decode; its hot set off, so that every GET below
    # goes to the store (the hot set: test_decode_ahead_first_get_from_memory)
    d = new_daemon(emu, os.path.join(tmpdir_short, 'a'), args=['-o', 'hot_max=0'])
    try:
        r, events = prefetch(d, project, '--decode')
        assert r.returncode == 0, r.stderr
        fin = events[-1]
        assert fin['event'] == 'final' and fin['items_done'] == len(ts), fin
        counts = parse_notice(fin['notice'])
        assert counts == {'decoded': n_exp, 'already decoded': 0,
                          'skipped (uncompressed)': n_cheap, 'failed': 0,
                          'held in memory': 0}, fin
        assert any(e.get('notice', '').startswith('decoding: ') for e in events[:-1])
        before = counters(d)
        assert before['serve_items_decoded_total'] == 0
        got = [get(d, project, i, str(tmp_path / ('a%d.npy' % i))) for i in range(len(ts))]
        after = counters(d)
        # the compressed items come from their stored tensors; only the uncompressed
        # ones are decoded by the GETs
        assert after['serve_items_from_tensor_cache_total'] - \
            before['serve_items_from_tensor_cache_total'] == n_exp
        assert after['serve_items_decoded_total'] == n_cheap

        # a second --decode of the same snapshot finds every tensor kept
        r, events = prefetch(d, project, '--decode')
        assert r.returncode == 0, r.stderr
        assert parse_notice(events[-1]['notice']) == {
            'decoded': 0, 'already decoded': n_exp, 'skipped (uncompressed)': n_cheap,
            'failed': 0, 'held in memory': 0}
    finally:
        stop(d)

    # a fresh daemon without --decode: its GETs decode, the bytes are the same
    e = new_daemon(emu, os.path.join(tmpdir_short, 'b'))
    try:
        r, _ = prefetch(e, project)
        assert r.returncode == 0, r.stderr
        for i in range(len(ts)):
            a, ma = got[i]
            b, mb = get(e, project, i, str(tmp_path / ('b%d.npy' % i)))
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), i
            assert ma == mb, i
        assert counters(e)['serve_items_decoded_total'] == len(ts)
    finally:
        stop(e)


def test_cancel_while_decoding(emu, tmpdir_short):
    ts = expensive(emu, 'ct')
    d = new_daemon(emu, tmpdir_short)
    try:
        p = subprocess.Popen([DMCACHE, '--socket', d.socket, 'prefetch', '--json', '--decode',
                              'ct'], env=d.env, stdout=subprocess.PIPE, text=True)
        events = []
        for line in p.stdout:
            events.append(json.loads(line))
            if events[-1].get('notice', '').startswith('decoding: '):
                # the decoding started: stop the job in the middle of it
                r = d.cli('prefetch', '--cancel', 'ct', timeout=60)
                assert r.returncode == 0, r.stderr
                break
        rest = p.stdout.read()
        p.wait(timeout=120)
        events += [json.loads(x) for x in rest.splitlines() if x.startswith('{')]
        fin = events[-1]
        assert fin['event'] == 'final', events
        # cancelled, unless the last decode came back before the CANCEL did
        assert fin['state'] in ('cancelled', 'done'), fin
        # the daemon goes on: a second --decode finds what the first one kept
        r, events = prefetch(d, 'ct', '--decode')
        assert r.returncode == 0, r.stderr
        counts = parse_notice(events[-1]['notice'])
        assert counts['decoded'] + counts['already decoded'] == sum(ts), counts
        assert counts['failed'] == 0 and counts['skipped (uncompressed)'] == len(ts) - sum(ts)
    finally:
        stop(d)


def mixed_folder(emu, tmpdir_short):
    """A local dataset folder (dataset.json, images/) of the ct corpus's slice 0 in each
    transfer syntax and a PNG, a .nii, a .nii.gz and a JPEG: (its path, the source files,
    for each whether its codec is worth decoding ahead)."""
    import shutil
    import pydicom
    corpus = os.path.join(emu.corpus, 'projects')
    srcs = [os.path.join(corpus, 'ct', 'files', 'int16', syn, 'slice_000.dcm')
            for syn in sorted(os.listdir(os.path.join(corpus, 'ct', 'files', 'int16')))]
    for sub, ext in (('png', '.png'), ('nifti', '.nii'), ('nifti', '.nii.gz'),
                     ('jpeg', '.jpg')):
        d = os.path.join(corpus, 'formats', 'files', sub)
        srcs.append(os.path.join(d, sorted(f for f in os.listdir(d)
                                           if f.endswith(ext) and
                                           (ext != '.nii' or not f.endswith('.gz')))[0]))
    root = os.path.join(tmpdir_short, 'datasets', 'mixed')
    os.makedirs(os.path.join(root, 'images'))
    resources, exp = [], []
    for i, src in enumerate(srcs):
        ext = '.nii.gz' if src.endswith('.nii.gz') else os.path.splitext(src)[1]
        rel = 'images/r%d%s' % (i, ext)
        shutil.copy(src, os.path.join(root, rel))
        resources.append({'id': 'r%d' % i, 'file': rel, 'filename': os.path.basename(src),
                          'annotations': []})
        if ext == '.dcm':
            ts = str(pydicom.dcmread(src, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            exp.append(ts not in UNCOMPRESSED)
        else:
            exp.append(ext != '.nii')
    with open(os.path.join(root, 'dataset.json'), 'w') as f:
        json.dump({'name': 'mixed', 'updated_at': '2025-02-05T14:47:47.942Z',
                   'all_annotations': False, 'resources': resources}, f)
    return root, srcs, exp


def test_decode_ahead_of_a_local_folder(emu, tmp_path, tmpdir_short):
    """A local dataset folder: the same, its files read through the descriptors the client
    passes (the hot set off: the GETs read the stored tensors)."""
    root, srcs, exp = mixed_folder(emu, tmpdir_short)
    d = new_daemon(emu, os.path.join(tmpdir_short, 'd'), args=['-o', 'hot_max=0'])
    try:
        r, events = prefetch(d, root, '--decode', '--source')
        assert r.returncode == 0, r.stderr
        fin = events[-1]
        assert fin['items_done'] == len(srcs), fin
        assert parse_notice(fin['notice']) == {
            'decoded': sum(exp), 'already decoded': 0,
            'skipped (uncompressed)': len(exp) - sum(exp), 'failed': 0,
            'held in memory': 0}, fin
        before = counters(d)
        for i in range(len(srcs)):
            out = str(tmp_path / ('l%d.npy' % i))
            g = subprocess.run([DMCACHE, '--socket', d.socket, 'get', '--source', root, str(i),
                                '-o', out], env=d.env, capture_output=True, text=True,
                               timeout=120)
            assert g.returncode == 0, g.stderr
        after = counters(d)
        assert after['serve_items_from_tensor_cache_total'] - \
            before['serve_items_from_tensor_cache_total'] == sum(exp)
        assert after['serve_items_decoded_total'] - before['serve_items_decoded_total'] == \
            len(exp) - sum(exp)
    finally:
        stop(d)


# GETs every item of a local folder through libdmcache, on a handle with regions (as
# dmcache.Dataset opens), and writes each tensor as .npy; prints, for each, whether it was
# handed in place (in the snapshot's region)
REGIONS_CLIENT = r'''
import json, sys
import numpy as np
from dmcache import _lib
root, sock, out = sys.argv[1], sys.argv[2], sys.argv[3]
c = _lib.Client(sock)
ds = c.open(_lib.SOURCE_LOCAL, root, regions=True)
res = []
for i in range(ds.items):
    its = ds.get([i])
    it = its[0]
    assert it.status == 0, (i, it.status, it.message)
    a = np.frombuffer(_lib.item_bytes(it), dtype=_lib.DTYPES[it.dtype]).reshape(
        tuple(it.shape[:it.ndim]))
    np.save('%s/r%d.npy' % (out, i), a)
    res.append(int(it.region))
    ds.release(its)
print(json.dumps(res))
'''


def regions_client(d, root, out):
    env = asan_preload(dict(d.env, PYTHONPATH=os.path.join(BUILD, 'client', 'python')))
    r = subprocess.run(['/usr/bin/python3', '-c', REGIONS_CLIENT, root, d.socket, out],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def test_decode_ahead_first_get_from_memory(emu, tmp_path, tmpdir_short):
    """With the hot set on (the default), --decode leaves every decoded tensor, of the
    uncompressed items too, in memory: the first GETs decode nothing and read no stored
    tensor, and a handle with regions (dmcache.Dataset's) gets each in place without a
    copy. The bytes are those of independent readers (pydicom, nibabel) and of a daemon
    whose GETs decode."""
    import nibabel
    import pydicom
    root, srcs, exp = mixed_folder(emu, tmpdir_short)
    n = len(srcs)
    d = new_daemon(emu, os.path.join(tmpdir_short, 'd'))
    try:
        r, events = prefetch(d, root, '--decode', '--source')
        assert r.returncode == 0, r.stderr
        fin = events[-1]
        assert fin['items_done'] == n, fin
        assert parse_notice(fin['notice']) == {
            'decoded': sum(exp), 'already decoded': 0,
            'skipped (uncompressed)': n - sum(exp), 'failed': 0, 'held in memory': n}, fin
        before = counters(d)
        assert before['serve_hot_ahead_total'] == n and before['serve_hot_items'] == n
        assert before['serve_region_tensors'] == n
        got = str(tmp_path / 'got')
        os.mkdir(got)
        in_place = regions_client(d, root, got)
        after = counters(d)
        # nothing decoded, no stored tensor read: every item from memory, in place
        assert after['serve_items_decoded_total'] == before['serve_items_decoded_total'] == 0
        assert after['decode_done_total'] == before['decode_done_total']
        assert after['serve_items_from_tensor_cache_total'] == \
            before['serve_items_from_tensor_cache_total']
        assert after['serve_hot_hits_total'] - before['serve_hot_hits_total'] == n
        # in place, all but maybe the connection's first, whose metadata may find no room
        # in an arena that has not grown yet (then the item is copied into the arena)
        assert in_place[1:] == [1] * (n - 1), in_place
        assert after['serve_region_copies_total'] == before['serve_region_copies_total']
        a = [np.load(os.path.join(got, 'r%d.npy' % i)) for i in range(n)]
        # the uncompressed ones against independent readers
        checked = 0
        for i, src in enumerate(srcs):
            if exp[i]:
                continue
            if src.endswith('.dcm'):
                want = pydicom.dcmread(src).pixel_array
            else:
                want = np.asarray(nibabel.load(src).dataobj)
            assert a[i].size == want.size and a[i].dtype == want.dtype, (i, src)
            # the same values in the item's layout (frames, channels, height, width)
            flat = want.reshape(-1) if src.endswith('.dcm') else \
                np.asarray(want).transpose(*reversed(range(want.ndim))).reshape(-1)
            assert np.array_equal(a[i].reshape(-1), flat), (i, src)
            checked += 1
        assert checked == n - sum(exp) and checked >= 2
    finally:
        stop(d)

    # a daemon without --decode decodes at the GETs: the same bytes
    e = new_daemon(emu, os.path.join(tmpdir_short, 'e'))
    try:
        r, _ = prefetch(e, root, '--source')
        assert r.returncode == 0, r.stderr
        ref = str(tmp_path / 'ref')
        os.mkdir(ref)
        regions_client(e, root, ref)
        assert counters(e)['serve_items_decoded_total'] == n
        for i in range(n):
            b = np.load(os.path.join(ref, 'r%d.npy' % i))
            assert a[i].dtype == b.dtype and a[i].shape == b.shape and \
                np.array_equal(a[i], b), i
    finally:
        stop(e)


def test_daemon_stops_while_decoding(emu, tmpdir_short):
    d = new_daemon(emu, tmpdir_short)
    p = subprocess.Popen([DMCACHE, '--socket', d.socket, 'prefetch', '--json', '--decode',
                          'ct'], env=d.env, stdout=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:
            if json.loads(line).get('notice', '').startswith('decoding: '):
                break
        # SIGTERM in the middle of the decoding: a clean exit (the sanitizer builds
        # check that nothing in flight is leaked or used after it is freed)
        rc, _ = d.stop(timeout=60)
        assert rc == 0, d.log()
    finally:
        p.stdout.read()
        p.wait(timeout=60)
        d.notify.close()

def test_decode_failure_does_not_fail_the_prefetch(emu, tmpdir_short):
    ts = syntaxes(emu, 'ct')
    n_cheap = sum(1 for t in ts if t in UNCOMPRESSED)
    res = emulator.request(emu.url, path='/projects/%s/resources' % emu.project('ct')['id'],
                           key=KEY).json()
    bad = res[0]['id']
    # the resource's bytes are not an image at all: its decode fails in the worker
    emu.set_content(bad, b'this is not a DICOM file\n' * 64)
    d = new_daemon(emu, tmpdir_short)
    try:
        r, events = prefetch(d, 'ct', '--decode')
        assert r.returncode == 0, (r.stdout, r.stderr)
        fin = events[-1]
        assert fin['event'] == 'final' and fin['state'] == 'done', fin
        assert fin['items_done'] == len(ts)
        counts = parse_notice(fin['notice'])
        assert counts['failed'] == 1, counts
        assert counts['decoded'] + counts['skipped (uncompressed)'] == len(ts) - 1
        # the bad one was either kind; every good compressed one is decoded
        assert counts['skipped (uncompressed)'] in (n_cheap, n_cheap - 1)
        errs = [ev for ev in events if ev.get('error')]
        assert len(errs) == 1 and errs[0]['error']['resource'] == bad, errs
        assert errs[0]['error']['name'] == 'decode_failed', errs
    finally:
        stop(d)
        emu.reset()
