"""Local dataset folders (dataset.json as the Datamint client writes it), prefetched with
no network."""
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest

from conftest import DMCACHE, Daemon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'emulator'))
import client as emulator  # noqa: E402


def sha(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def folder(tmpdir_short):
    """A dataset folder as the Datamint client (>= v1.7) writes it, from the corpus."""
    src = os.path.join(emulator.corpus_dir(), 'projects', 'sample', 'files')
    names = ['ct_000.dcm', 'ct_001.dcm', 'derm_rgb.jpg', 'photo_rgb8.png', 'xray_gray8.png',
             'brain_int16_scaled.nii.gz']
    root = os.path.join(tmpdir_short, 'datasets', 'sample')
    os.makedirs(os.path.join(root, 'images'))
    os.makedirs(os.path.join(root, 'masks', 'a@b.com', 'r0'))
    resources = []
    for i, n in enumerate(names):
        rel = 'images/r%d.%s' % (i, n.split('.', 1)[1])
        shutil.copy(os.path.join(src, n), os.path.join(root, rel))
        resources.append({'id': 'r%d' % i, 'file': rel, 'filename': n, 'annotations': []})
    png = next(n for n in names if n.endswith('.png'))
    shutil.copy(os.path.join(src, png), os.path.join(root, 'masks', 'a@b.com', 'r0', 'ann1'))
    resources[0]['annotations'].append({'id': 'ann1', 'type': 'segmentation', 'name': 'Liver',
                                        'index': 0, 'file': 'masks/a@b.com/r0/ann1'})
    with open(os.path.join(root, 'dataset.json'), 'w') as f:
        json.dump({'name': 'sample', 'updated_at': '2025-02-05T14:47:47.942Z',
                   'all_annotations': False, 'resources': resources}, f)
    return root


def prefetch_dir(d, root, *extra):
    r = subprocess.run([DMCACHE, '--socket', d.socket, 'prefetch', '--json', '--source', root]
                       + list(extra), env=d.env, capture_output=True, text=True, timeout=120)
    events = [json.loads(l) for l in r.stdout.splitlines() if l.startswith('{')]
    done = [e for e in events if 'state' in e]
    return r.returncode, (done[-1] if done else {}), r.stderr


def stored(d):
    db = sqlite3.connect(os.path.join(d.cache, 'index.db'))
    try:
        rows = db.execute("SELECT resource_id, lower(hex(blob)), etag, meta FROM items "
                          "ORDER BY key").fetchall()
        masks = db.execute('SELECT count(*) FROM item_blobs').fetchone()[0]
        return rows, masks
    finally:
        db.close()


def test_folder_is_prefetched_exactly(folder, tmpdir_short):
    d = Daemon(tmpdir_short)
    rc, f, err = prefetch_dir(d, folder)
    assert rc == 0, err
    assert f['state'] == 'done' and f['items_done'] == 6 and f['items_total'] == 6
    assert f['version'] == '2025-02-05T14:47:47.942Z'
    r = d.cli('ls', '--json')
    assert '"source": "local"' in r.stdout or '"local"' in r.stdout, r.stdout
    # again: nothing to read
    rc, f, err = prefetch_dir(d, folder)
    assert rc == 0 and f['items_cached'] == 6 and f['bytes_done'] == 0
    assert d.stop()[0] == 0
    rows, masks = stored(d)
    spec = json.load(open(os.path.join(folder, 'dataset.json')))['resources']
    for (rid, blob, etag, meta), res in zip(rows, spec):
        assert rid == res['id'] and blob == sha(os.path.join(folder, res['file']))
        assert etag is None  # no metadata validator: content is proved by its digest
    assert masks == 1
    meta0 = json.loads(rows[0][3])
    assert meta0['mask_blobs']['ann1'] == sha(os.path.join(folder, 'masks/a@b.com/r0/ann1'))


def test_changed_file_is_read_again(folder, tmpdir_short):
    d = Daemon(tmpdir_short)
    assert prefetch_dir(d, folder)[0] == 0
    spec = json.load(open(os.path.join(folder, 'dataset.json')))['resources']
    victim = os.path.join(folder, spec[2]['file'])
    data = bytearray(open(victim, 'rb').read())
    data[len(data) // 2] ^= 0x01
    open(victim, 'wb').write(data)
    rc, f, err = prefetch_dir(d, folder)
    assert rc == 0, err
    assert f['items_cached'] == 5 and f['bytes_done'] == len(data)
    assert d.stop()[0] == 0
    rows, _ = stored(d)
    assert rows[2][1] == hashlib.sha256(bytes(data)).hexdigest()


def test_oldest_layout_images_image_file(tmpdir_short, folder):
    root = os.path.join(tmpdir_short, 'gen0')
    os.makedirs(root)
    shutil.copytree(os.path.join(folder, 'images'), os.path.join(root, 'imgs'))
    files = sorted(os.listdir(os.path.join(root, 'imgs')))
    with open(os.path.join(root, 'dataset.json'), 'w') as f:
        json.dump({'version': 3, 'images': [{'image_file': 'imgs/' + n} for n in files]}, f)
    d = Daemon(tmpdir_short)
    rc, fin, err = prefetch_dir(d, root)
    assert rc == 0, err
    assert fin['items_done'] == len(files)
    assert fin['project_name'] == 'gen0'
    assert d.stop()[0] == 0


@pytest.mark.parametrize('bad,expect', [
    ('../outside', 'outside the dataset folder'),
    ('/etc/hostname', 'outside the dataset folder'),
    ('images/../../outside', 'outside the dataset folder'),
    ('images/missing.dcm', 'images/missing.dcm: No such file'),
    ('link', 'link: a symbolic link'),
])
def test_paths_may_not_leave_the_folder(folder, tmpdir_short, bad, expect):
    with open(os.path.join(os.path.dirname(folder), 'outside'), 'w') as f:
        f.write('secret')
    os.symlink('../outside', os.path.join(folder, 'link'))
    spec = json.load(open(os.path.join(folder, 'dataset.json')))
    spec['resources'][1]['file'] = bad
    json.dump(spec, open(os.path.join(folder, 'dataset.json'), 'w'))
    d = Daemon(tmpdir_short)
    rc, f, err = prefetch_dir(d, folder)
    assert rc == 1
    # paths that leave the folder fail the dataset before any file is asked for; a file
    # the client cannot open fails its item, with the reason
    said = err + json.dumps(f.get('error', {}))
    assert expect in said, said
    assert d.stop()[0] == 0
    rows, _ = stored(d)
    outside = hashlib.sha256(b'secret').hexdigest()
    assert all(r[1] != outside for r in rows)


def test_malformed_dataset_json(folder, tmpdir_short):
    open(os.path.join(folder, 'dataset.json'), 'w').write('{"resources": [')
    d = Daemon(tmpdir_short)
    rc, f, err = prefetch_dir(d, folder)
    assert rc == 1 and 'dataset.json:1' in err, err
    rc, f, err = prefetch_dir(d, os.path.join(tmpdir_short, 'no-such-folder'))
    assert rc == 2 and 'No such file or directory' in err, err  # the CLI says so first
    assert d.stop()[0] == 0


def test_other_users_files_are_refused(folder, tmpdir_short):
    """The daemon (root) reads only what the requesting user's client could open: a folder
    of root's that the user cannot read is refused because the client cannot open it, one
    that everybody may read is read (no owner check in the daemon any more)."""
    __import__('uids').require_root()  # CI is root: there it fails rather than skips
    os.chmod(tmpdir_short, 0o755)
    d = Daemon(tmpdir_short)
    os.chmod(os.path.dirname(d.socket), 0o755)

    def as_nobody():
        return subprocess.run(['setpriv', '--reuid=65533', '--regid=65533', '--clear-groups',
                               DMCACHE, '--socket', d.socket, 'prefetch', '--json',
                               '--source', folder],
                              env=d.env, capture_output=True, text=True, timeout=60)
    # root's files, readable by nobody else: the client cannot open them
    spec = json.load(open(os.path.join(folder, 'dataset.json')))['resources']
    for res in spec:
        os.chmod(os.path.join(folder, res['file']), 0o600)
    r = as_nobody()
    assert r.returncode == 1
    assert 'Permission denied' in r.stdout + r.stderr, r.stdout + r.stderr
    events = [json.loads(l) for l in r.stdout.splitlines() if l.startswith('{')]
    assert events[-1]['items_done'] == 0 and events[-1]['items_failed'] == len(spec)
    # readable by everyone: served to nobody too
    for res in spec:
        os.chmod(os.path.join(folder, res['file']), 0o644)
    r = as_nobody()
    assert r.returncode == 0, r.stdout + r.stderr
    assert d.stop()[0] == 0
    rows, _ = stored(d)
    assert [blob for _, blob, _, _ in rows] == [sha(os.path.join(folder, res['file']))
                                               for res in spec]


def test_many_files_come_in_windows(tmpdir_short):
    """More files than one message passes (253 descriptors): the daemon asks window by
    window, whole items (an image and its masks) at a time, and the uid's own unchanged
    files are not read again."""
    src = os.path.join(emulator.corpus_dir(), 'projects', 'sample', 'files', 'xray_gray8.png')
    root = os.path.join(tmpdir_short, 'many')
    os.makedirs(os.path.join(root, 'images'))
    resources = []
    for i in range(400):
        rel = 'images/%03d.png' % i
        shutil.copy(src, os.path.join(root, rel))
        anns = []
        if i % 3 == 0:  # items of 2 paths straddle the window boundaries
            shutil.copy(src, os.path.join(root, rel + '.mask'))
            anns.append({'id': 'a%d' % i, 'file': rel + '.mask'})
        resources.append({'id': 'r%d' % i, 'file': rel, 'annotations': anns})
    with open(os.path.join(root, 'dataset.json'), 'w') as f:
        json.dump({'name': 'many', 'resources': resources}, f)
    d = Daemon(tmpdir_short)
    rc, f, err = prefetch_dir(d, root)
    assert rc == 0, err
    assert f['items_done'] == 400 and f['items_failed'] == 0
    rc, f, err = prefetch_dir(d, root)
    assert rc == 0 and f['items_cached'] == 400 and f['bytes_done'] == 0, f
    assert d.stop()[0] == 0
    rows, masks = stored(d)
    assert len(rows) == 400 and all(r[1] == sha(src) for r in rows)
    assert masks == 134  # item_blobs: one row per item with a mask
