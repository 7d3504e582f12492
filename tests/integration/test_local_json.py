"""dataset.json of a local folder, read a block at a time (daemon/local.c): the top-level
object scanned, each record decoded on its own. Malformed files give a clear error with
their line; every layout the client writes still lists what a whole-document parse would;
a dataset.json changed between two OPENs is read again (a new item served, a removed one
gone); a file the caller cannot read is refused to that caller over OPEN and GET.

The real daemon and CLI; items are compared with the files decoded here by Pillow, records
with the dataset.json records decoded here by the json module.
"""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import uids
from conftest import DMCACHE, DMCACHED, Daemon
from test_local import prefetch_dir
from uids import ALICE

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'emulator'))
import client as emulator  # noqa: E402

PNGS = ['photo_rgb8.png', 'xray_gray8.png']


def corpus(name):
    return os.path.join(emulator.corpus_dir(), 'projects', 'sample', 'files', name)


def png_folder(root, n=3):
    """A folder of `n` PNG images (the corpus' two, in turn) and its resource records."""
    os.makedirs(os.path.join(root, 'images'))
    resources = []
    for i in range(n):
        rel = 'images/p%d.png' % i
        shutil.copy(corpus(PNGS[i % 2]), os.path.join(root, rel))
        resources.append({'id': 'p%d' % i, 'file': rel, 'mimetype': 'image/png',
                          'annotations': []})
    return resources


def linked_png_folder(root, n, name):
    """n items whose files (`name` % i) are the corpus' two PNGs, in turn, as hard links
    (cheap at thousands); their resource records, without annotations."""
    os.makedirs(os.path.join(root, os.path.dirname(name % 0)))
    res = []
    for i in range(n):
        rel = name % i
        if i < 2:
            shutil.copy(corpus(PNGS[i]), os.path.join(root, rel))
        else:
            os.link(os.path.join(root, name % (i % 2)), os.path.join(root, rel))
        res.append({'id': 'p%d' % i, 'file': rel})
    return res


def write_json(root, text):
    with open(os.path.join(root, 'dataset.json'), 'w', encoding='utf-8') as f:
        f.write(text)


def listed(d):
    """(resource_id, filename, mimetype, meta) of every item of the newest snapshot, read
    after the daemon stops."""
    db = sqlite3.connect(os.path.join(d.cache, 'index.db'))
    try:
        return db.execute('SELECT resource_id, filename, mimetype, meta FROM items '
                          'WHERE key >> 32 = (SELECT max(id) FROM snapshots) '
                          'ORDER BY key').fetchall()
    finally:
        db.close()


def get_item(d, root, index, out_dir, uid=None):
    """`dmcache get --source` (an OPEN and a GET): (returncode, array or None, meta, said)."""
    out = os.path.join(out_dir, 'it%d.npy' % index)
    if os.path.exists(out):
        os.unlink(out)
    argv = [DMCACHE, '--socket', d.socket, 'get', '--source', root, str(index), '-o', out]
    if uid is None:
        r = subprocess.run(argv, env=d.env, capture_output=True, text=True, timeout=120)
    else:
        r = uids.run(uid, argv, env=d.env, timeout=120)
    ok = r.returncode == 0 and os.path.exists(out)
    arr = np.load(out) if ok else None
    meta = json.load(open(out[:-4] + '.json')) if ok else None
    return r.returncode, arr, meta, r.stdout + r.stderr


def pil_chw(path):
    """The PNG decoded by Pillow, as the daemon's (frames, channels, height, width)."""
    a = np.asarray(Image.open(path))
    if a.ndim == 2:
        a = a[:, :, None]
    return a.transpose(2, 0, 1)[None]


GOOD = '{"name": "x", "resources": [{"id": "a", "file": "images/p0.png"}]}'


@pytest.mark.parametrize('text,expect', [
    ('', 'dataset.json:1: unexpected end of file'),
    ('   \n\n', 'dataset.json:3: unexpected end of file'),
    ('[{"file": "images/p0.png"}]', 'dataset.json:1: not an object'),
    ('{"resources": [{"file": "images/p0.png"}', 'dataset.json:1: unexpected end of file'),
    ('{"resources": [{"file": "images/p0.png"},]}', 'dataset.json:1:'),
    ('{"resources": [{"file": "images/p0.png"} {"file": "x"}]}', "',' or ']' expected"),
    ('{"resources": [1]}', 'item 0 is not an object'),
    ('{"resources": [{"file": "images/p0.png"}, "x"]}', 'item 1 is not an object'),
    (GOOD + ' x', 'end of file expected'),
    (GOOD + GOOD, 'end of file expected'),
    ('{"name": "a" "resources": []}', "',' or '}' expected"),
    ('{"name" "a", "resources": []}', "':' expected"),
    ('{name: "a", "resources": []}', "string or '}' expected"),
    ('{"resources": [], "resources": []}', '"resources" given twice'),
    ('{"images": [], "images": []}', '"images" given twice'),
    ('{"resources": [{"file": "images/p0.png",\n "x": tru}]}', 'dataset.json:2:'),
    ('{\n"resources": [\n{"file": "images/p0.png"},\n{"file": "images/p1.png", "x": [}]\n]}',
     'dataset.json:4:'),
    ('{"name": {"a": [1, 2}, "resources": []}', 'dataset.json:1:'),
    ('{"total": 12x3, "resources": []}', 'dataset.json:1:'),
    ('{"resources": [{"file": "images/p0.png", "id": "\\ud800"}]}', 'dataset.json:1:'),
    ('{"other": []}', 'has neither "resources" nor "images"'),
    ('{"resources": [{"id": "a"}]}', 'item 0 has no "file"'),
    ('{"resources": [{"file": "images/p0.png"}, {"file": "../p1.png"}]}',
     "item 1: '../p1.png': outside the dataset folder"),
])
def test_malformed_dataset_json_is_refused_clearly(tmpdir_short, text, expect):
    root = os.path.join(tmpdir_short, 'ds')
    png_folder(root, 2)
    write_json(root, text)
    d = Daemon(tmpdir_short)
    rc, f, err = prefetch_dir(d, root)
    assert rc == 1 and expect in err, err
    # nothing listed, and the daemon serves the same folder once it is well formed
    write_json(root, GOOD)
    rc, f, err = prefetch_dir(d, root)
    assert rc == 0 and f['items_done'] == 1, err
    assert d.stop()[0] == 0


def test_invalid_utf8_is_refused(tmpdir_short):
    root = os.path.join(tmpdir_short, 'ds')
    png_folder(root, 1)
    with open(os.path.join(root, 'dataset.json'), 'wb') as f:
        f.write(b'{"resources": [{"file": "images/p0.png", "id": "\xff\xfe"}]}')
    d = Daemon(tmpdir_short)
    rc, f, err = prefetch_dir(d, root)
    assert rc == 1 and 'dataset.json:1:' in err, err
    assert d.stop()[0] == 0


@pytest.mark.parametrize('layout', ['keys-after-list', 'images-then-resources',
                                    'resources-then-images', 'images-only', 'escaped',
                                    'many-blocks'])
def test_layouts_list_what_the_document_says(tmpdir_short, layout):
    """Each record listed as the json module reads the document: ids, file names, mime
    types and the record itself (compact, keys sorted)."""
    root = os.path.join(tmpdir_short, 'ds')
    n = 700 if layout == 'many-blocks' else 3
    res = png_folder(root, n)
    if layout == 'many-blocks':
        # records past the reader's 256 KiB blocks, a string across a block's end
        for r in res:
            r['note'] = 'x\\"y' * 200 + '\u00e9\u4e2d'
    if layout == 'escaped':
        res[1]['id'] = 'p\u00e9\u4e2d\U0001f600 "1"'
        res[2]['filename'] = 'tab\there.png'
    if layout == 'keys-after-list':
        text = '{"resources": %s, "all_annotations": false, "name": "late", ' \
               '"updated_at": "2026-01-02T00:00:00Z"}' % json.dumps(res)
    elif layout == 'images-then-resources':
        text = '{"images": [{"image_file": "images/p1.png"}], "resources": %s, ' \
               '"name": "late"}' % json.dumps(res)
    elif layout == 'resources-then-images':
        text = '{"name": "late", "resources": %s, ' \
               '"images": [{"image_file": "images/p1.png"}, 3]}' % json.dumps(res)
    elif layout == 'images-only':
        res = [{'image_file': r['file']} for r in res]
        text = '{"name": "late", "images": %s}' % json.dumps(res, indent=2)
    elif layout == 'escaped':
        # an escaped slash in a path, an escaped letter in a key, \u escapes everywhere
        text = json.dumps({'name': 'late', 'resources': res}, ensure_ascii=True)
        text = text.replace('"images/p0.png"', '"images\\/p0.png"').replace(
            '"name"', '"n\\u0061me"')
        assert '\\/' in text and '\\u0061' in text
    else:
        text = json.dumps({'name': 'late', 'resources': res}, indent=1, ensure_ascii=False)
    write_json(root, text)
    doc = json.loads(text)
    d = Daemon(tmpdir_short)
    rc, f, err = prefetch_dir(d, root)
    assert rc == 0 and f['items_done'] == n, err
    assert d.stop()[0] == 0
    db = sqlite3.connect(os.path.join(d.cache, 'index.db'))
    try:
        assert db.execute('SELECT project_name FROM snapshots').fetchall() == [('late',)]
    finally:
        db.close()
    rows = listed(d)
    want = doc['resources'] if 'resources' in doc else doc['images']
    assert len(rows) == len(want)
    for (rid, filename, mimetype, meta), rec in zip(rows, want):
        path = rec.get('file', rec.get('image_file'))
        assert rid == rec.get('id', path)
        assert filename == rec.get('filename', path.rsplit('/', 1)[-1])
        assert mimetype == rec.get('mimetype', 'image/png')
        assert json.loads(meta) == rec
        assert meta == json.dumps(rec, sort_keys=True, separators=(',', ':'),
                                  ensure_ascii=False)


@pytest.mark.parametrize('version', ['updated_at', 'mtime'])
def test_changed_between_opens_is_read_again(tmpdir_short, version):
    """With the same "updated_at" the snapshot is listed again; without one the new
    dataset.json's mtime makes a new version."""
    root = os.path.join(tmpdir_short, 'ds')
    res = png_folder(root, 3)
    head = {'name': 'ch'}
    if version == 'updated_at':
        head['updated_at'] = '2026-01-01T00:00:00Z'
    write_json(root, json.dumps(dict(head, resources=res)))
    d = Daemon(tmpdir_short)
    rc, arr, meta, said = get_item(d, root, 2, tmpdir_short)
    assert rc == 0, said
    assert meta['resource']['id'] == 'p2'
    assert np.array_equal(arr, pil_chw(os.path.join(root, 'images/p2.png')))
    # p1 removed, a new item (a file the folder did not list) added at the end
    shutil.copy(corpus(PNGS[1]), os.path.join(root, 'images', 'new.png'))
    res = [res[0], res[2], {'id': 'new', 'file': 'images/new.png', 'annotations': []}]
    write_json(root, json.dumps(dict(head, resources=res)))
    rc, arr, meta, said = get_item(d, root, 2, tmpdir_short)
    assert rc == 0, said
    assert meta['resource']['id'] == 'new'
    assert np.array_equal(arr, pil_chw(os.path.join(root, 'images/new.png')))
    rc, arr, meta, said = get_item(d, root, 1, tmpdir_short)
    assert rc == 0 and meta['resource']['id'] == 'p2', said
    assert np.array_equal(arr, pil_chw(os.path.join(root, 'images/p2.png')))
    rc, arr, meta, said = get_item(d, root, 3, tmpdir_short)
    assert rc != 0 and arr is None, said  # three items now: no fourth
    assert d.stop()[0] == 0
    assert [r[0] for r in listed(d)] == ['p0', 'p2', 'new']
    db = sqlite3.connect(os.path.join(d.cache, 'index.db'))
    try:
        snaps = db.execute('SELECT count(*) FROM snapshots').fetchone()[0]
    finally:
        db.close()
    assert snaps == (1 if version == 'updated_at' else 2)


def test_file_the_caller_cannot_read_is_refused_over_open(tmpdir_short):
    """alice opens a folder (hers to list) whose second image she cannot read: that item
    fails with a clear error, the others are served; root, who can read it, gets it."""
    uids.require_root()
    os.chmod(tmpdir_short, 0o755)
    d = Daemon(tmpdir_short)
    uids.open_up(os.path.dirname(d.socket))
    root = os.path.join(tmpdir_short, 'shared')
    res = png_folder(root, 3)
    write_json(root, json.dumps({'name': 'sh', 'resources': res}))
    uids.open_up(root, os.path.join(root, 'images'), os.path.join(root, 'dataset.json'),
                 *[os.path.join(root, r['file']) for r in res])
    os.chmod(os.path.join(root, 'images/p1.png'), 0o600)  # root's alone
    out = uids.owned_dir(os.path.join(tmpdir_short, 'alice-out'), ALICE)
    rc, arr, meta, said = get_item(d, root, 0, out, uid=ALICE)
    assert rc == 0, said
    assert np.array_equal(arr, pil_chw(os.path.join(root, 'images/p0.png')))
    rc, arr, meta, said = get_item(d, root, 1, out, uid=ALICE)
    assert rc != 0 and arr is None
    assert 'images/p1.png' in said and 'Permission denied' in said, said
    rc, arr, meta, said = get_item(d, root, 1, tmpdir_short)
    assert rc == 0, said
    assert np.array_equal(arr, pil_chw(os.path.join(root, 'images/p1.png')))
    # root's read does not serve alice: her next OPEN is refused the same way
    rc, arr, meta, said = get_item(d, root, 1, out, uid=ALICE)
    assert rc != 0 and arr is None and 'Permission denied' in said, said
    assert d.stop()[0] == 0


def counters(d):
    r = d.cli('status', '--json')
    assert r.returncode == 0, r.stderr
    c = json.loads(r.stdout)['counters']
    return c['prefetch_local_parses_skipped_total'], c['prefetch_local_listings_kept_total']


def test_unchanged_dataset_json_is_listed_before_it_is_read(tmpdir_short):
    """The uid's own earlier parse of the same dataset.json (same inode, size, mtime and
    ctime through its own descriptor) lists and answers an OPEN before the file is read
    again; the files are still proved by the new descriptors, and a change of any kind
    (even one that keeps size and mtime) is read."""
    root = os.path.join(tmpdir_short, 'ds')
    res = png_folder(root, 3)
    write_json(root, json.dumps({'name': 'seen', 'updated_at': 'v1', 'resources': res}))
    old = os.stat(os.path.join(root, 'dataset.json'))
    os.utime(os.path.join(root, 'dataset.json'), ns=(old.st_atime_ns,
                                                     old.st_mtime_ns - 10**9))
    time.sleep(0.2)  # older than the racy window: the parse may be recorded
    d = Daemon(tmpdir_short)
    rc, f, err = prefetch_dir(d, root)
    assert rc == 0 and f['items_done'] == 3, err
    assert counters(d) == (0, 0)
    rc, f, err = prefetch_dir(d, root)
    assert rc == 0 and f['items_total'] == 3 and f['items_cached'] == 3, err
    assert counters(d) == (1, 1)
    for i in (2, 0):  # OPEN + GET: answered early, the item served once proved
        rc, arr, meta, said = get_item(d, root, i, tmpdir_short)
        assert rc == 0, said
        assert meta['resource']['id'] == 'p%d' % i
        assert np.array_equal(arr, pil_chw(os.path.join(root, 'images/p%d.png' % i)))
    assert counters(d)[0] == 3
    # the same size and mtime, other bytes (p1 and p2 swap ids): ctime moved, read again
    path = os.path.join(root, 'dataset.json')
    st = os.stat(path)
    text = open(path).read().replace('"p1"', '"pX"').replace('"p2"', '"p1"').replace(
        '"pX"', '"p2"')
    assert len(text) == st.st_size
    with open(path, 'r+') as fh:
        fh.write(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns
    rc, arr, meta, said = get_item(d, root, 1, tmpdir_short)
    assert rc == 0 and meta['resource']['id'] == 'p2', said
    assert np.array_equal(arr, pil_chw(os.path.join(root, 'images/p1.png')))
    assert counters(d)[0] == 3
    assert d.stop()[0] == 0
    assert [r[0] for r in listed(d)] == ['p0', 'p2', 'p1']


def loaded(d):
    r = d.cli('status', '--json')
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)['counters']['prefetch_local_parses_loaded_total']


def test_a_restarted_daemon_lists_an_unchanged_dataset_json_before_reading_it(tmpdir_short):
    """The uid's own last stable parse is kept with the snapshot: after a restart, an OPEN
    of the unchanged folder is answered before dataset.json is read, and its items are
    still proved by the new descriptors; another uid never takes it (the next test's rule),
    and a dataset.json changed while the daemon was stopped is read again."""
    root = os.path.join(tmpdir_short, 'ds')
    res = png_folder(root, 3)
    write_json(root, json.dumps({'name': 'kept', 'updated_at': 'v1', 'resources': res}))
    path = os.path.join(root, 'dataset.json')
    old = os.stat(path)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns - 10**9))
    time.sleep(0.2)  # older than the racy window: the parse may be recorded
    d = Daemon(tmpdir_short)
    rc, f, err = prefetch_dir(d, root)
    assert rc == 0 and f['items_done'] == 3, err
    assert d.stop()[0] == 0
    d.start()
    assert counters(d)[0] == 0 and loaded(d) == 0
    for i in (2, 0):
        rc, arr, meta, said = get_item(d, root, i, tmpdir_short)
        assert rc == 0, said
        assert meta['resource']['id'] == 'p%d' % i
        assert np.array_equal(arr, pil_chw(os.path.join(root, 'images/p%d.png' % i)))
    assert counters(d)[0] == 2 and loaded(d) == 1  # read back once, then kept in memory
    # changed while stopped (same size and mtime, p1 and p2 swap ids): read again
    assert d.stop()[0] == 0
    st = os.stat(path)
    text = open(path).read().replace('"p1"', '"pX"').replace('"p2"', '"p1"').replace(
        '"pX"', '"p2"')
    with open(path, 'r+') as fh:
        fh.write(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    d.start()
    rc, arr, meta, said = get_item(d, root, 1, tmpdir_short)
    assert rc == 0 and meta['resource']['id'] == 'p2', said
    assert np.array_equal(arr, pil_chw(os.path.join(root, 'images/p1.png')))
    # read back, found not to hold (ctime moved), parsed
    assert counters(d)[0] == 0 and loaded(d) == 1
    assert d.stop()[0] == 0


def test_a_get_ahead_of_the_walk_is_proved_first(tmpdir_short):
    """An OPEN of a large unchanged folder proves every file again, in order; a GET of its
    last item does not wait for that walk: the job asks the client for that item's file
    first (LOCAL_NEED with DMC_LOCAL_AHEAD), serves it once proved, and still proves every
    other item, each once. (5,000 files under the sanitizers: 20 windows of files, still
    far more than the GET's one round trip.)"""
    asan = 'libasan' in subprocess.run(['ldd', DMCACHED], capture_output=True,
                                       text=True).stdout
    n = 5000 if asan else 20000
    root = os.path.join(tmpdir_short, 'ds')
    res = linked_png_folder(root, n, 'images/p%d.png')
    write_json(root, json.dumps({'name': 'ahead', 'updated_at': 'v1', 'resources': res}))
    path = os.path.join(root, 'dataset.json')
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))
    time.sleep(0.2)  # older than the racy window: the parse may be recorded
    d = Daemon(tmpdir_short)
    rc, f, err = prefetch_dir(d, root)
    assert rc == 0 and f['items_done'] == n, err

    def ahead():
        r = d.cli('status', '--json')
        return json.loads(r.stdout)['counters']['prefetch_local_items_ahead_total']

    assert ahead() == 0
    rc, arr, meta, said = get_item(d, root, n - 1, tmpdir_short)
    assert rc == 0, said
    assert meta['resource']['id'] == 'p%d' % (n - 1)
    assert np.array_equal(arr, pil_chw(os.path.join(root, 'images/p%d.png' % (n - 1))))
    assert ahead() == 1
    # and the folder is whole: proved again, every item once
    rc, f, err = prefetch_dir(d, root)
    assert rc == 0 and f['items_total'] == n and f['items_cached'] == n, (f, err)
    assert d.stop()[0] == 0


def test_recent_dataset_json_is_read_every_time(tmpdir_short):
    """A dataset.json changed within the racy window (here: an mtime in the future) is never
    taken from an earlier parse: a write in the same clock tick would not show."""
    root = os.path.join(tmpdir_short, 'ds')
    res = png_folder(root, 2)
    path = os.path.join(root, 'dataset.json')
    write_json(root, json.dumps({'name': 'r', 'updated_at': 'v1', 'resources': res}))
    future = time.time_ns() + 3600 * 10**9
    os.utime(path, ns=(future, future))
    d = Daemon(tmpdir_short)
    for _ in range(3):
        rc, f, err = prefetch_dir(d, root)
        assert rc == 0 and f['items_total'] == 2, err
    assert counters(d)[0] == 0
    assert d.stop()[0] == 0


def test_another_uid_never_takes_roots_parse(tmpdir_short):
    """root's recorded parse of a folder is not alice's: her OPEN reads dataset.json through
    her own descriptor (and is refused when she cannot)."""
    uids.require_root()
    os.chmod(tmpdir_short, 0o755)
    d = Daemon(tmpdir_short)
    uids.open_up(os.path.dirname(d.socket))
    root = os.path.join(tmpdir_short, 'shared')
    res = png_folder(root, 2)
    write_json(root, json.dumps({'name': 'sh', 'updated_at': 'v1', 'resources': res}))
    path = os.path.join(root, 'dataset.json')
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))
    uids.open_up(root, os.path.join(root, 'images'),
                 *[os.path.join(root, r['file']) for r in res])
    os.chmod(path, 0o600)  # root's alone
    time.sleep(0.2)
    for _ in range(2):
        rc, f, err = prefetch_dir(d, root)
        assert rc == 0 and f['items_total'] == 2, err
    assert counters(d)[0] == 1
    assert d.stop()[0] == 0
    d.start()  # root's parse, kept in the index, is root's still
    out = uids.owned_dir(os.path.join(tmpdir_short, 'alice-out'), ALICE)
    rc, arr, meta, said = get_item(d, root, 0, out, uid=ALICE)
    assert rc != 0 and arr is None and 'Permission denied' in said, said
    os.chmod(path, 0o644)  # a chmod moves ctime: root's record no longer holds either
    rc, arr, meta, said = get_item(d, root, 0, out, uid=ALICE)
    assert rc == 0, said
    assert np.array_equal(arr, pil_chw(os.path.join(root, 'images/p0.png')))
    assert counters(d)[0] == 0 and loaded(d) == 0
    # root's item table (named by root's uid) is never mapped for alice
    assert '0-' in ' '.join(table_files(d)) and tables(d)[1] == 0
    assert d.stop()[0] == 0


def test_cut_and_flipped_bytes_are_refused_or_listed_never_crash(tmpdir_short):
    """A valid dataset.json cut at many places and with bytes changed (a fixed seed): what
    the json module refuses, the daemon refuses with a message; nothing stops the daemon."""
    import random
    root = os.path.join(tmpdir_short, 'ds')
    res = png_folder(root, 2)
    res[0]['annotations'] = [{'id': 'a\u00e9', 'file': 'images/p1.png', 'n': [1, 2.5e3]}]
    good = json.dumps({'name': 'f', 'updated_at': 'v', 'resources': res,
                       'x': {'y': [None, True, False, '\\"']}}, ensure_ascii=False).encode()
    rng = random.Random(14)
    cases = [good[:k] for k in range(0, len(good), 5)]
    for _ in range(60):
        b = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.choice(b'{}[]",:\\ \n0a\x00\xff')
        cases.append(bytes(b))
    d = Daemon(tmpdir_short)
    refused = 0
    for text in cases:
        with open(os.path.join(root, 'dataset.json'), 'wb') as f:
            f.write(text)
        try:
            json.loads(text)
            valid = True
        except ValueError:
            valid = False
        # jansson's messages quote the bytes near the error, valid UTF-8 or not
        r = subprocess.run([DMCACHE, '--socket', d.socket, 'prefetch', '--source', root],
                           env=d.env, capture_output=True, timeout=120)
        rc, err = r.returncode, r.stderr.decode('utf-8', 'replace')
        assert rc in (0, 1), (text, err)
        if not valid:
            assert rc == 1 and 'dataset.json' in err, (text, err)
            refused += 1
    assert refused > len(cases) // 2
    with open(os.path.join(root, 'dataset.json'), 'wb') as f:
        f.write(good)
    rc, f, err = prefetch_dir(d, root)
    assert rc == 0 and f['items_done'] == 2, err
    assert d.stop()[0] == 0


def tables(d):
    c = json.loads(d.cli('status', '--json').stdout)['counters']
    return (c['prefetch_local_tables_written_total'], c['prefetch_local_tables_mapped_total'],
            c['prefetch_local_tables_refused_total'])


def table_files(d):
    t = os.path.join(d.cache, 'tables')
    return sorted(os.listdir(t)) if os.path.isdir(t) else []


def eventually(fn, want, timeout=20):
    """fn() once it returns `want` (a table is written beside the walk), else its last."""
    end = time.monotonic() + timeout
    while True:
        got = fn()
        if got == want or time.monotonic() > end:
            return got
        time.sleep(0.05)


def test_a_kept_item_table_is_mapped_instead_of_parsing(tmpdir_short):
    """A stable parse leaves the folder's item table in the cache directory (tables/,
    named by the uid and dataset.json's digest, 0600); an OPEN listed from that parse maps
    it instead of reading dataset.json again, also after a restart. A table that fails its
    checks, or holds a path that leaves the folder, is removed and never followed: the
    next OPEN parses and writes it again, byte for byte; a changed dataset.json's table
    replaces the old one."""
    import hashlib
    n = 400
    root = os.path.join(tmpdir_short, 'ds')
    res = linked_png_folder(root, n, 'images/p%03d.png')
    for r in res:
        r['annotations'] = []
    res[5]['annotations'] = [{'id': 'm5', 'file': 'images/p001.png'}]
    path = os.path.join(root, 'dataset.json')

    def settle():
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))
        time.sleep(0.2)  # older than the racy window: the parse may be recorded

    write_json(root, json.dumps({'name': 'tab', 'updated_at': 'v1', 'resources': res}))
    settle()
    digest = hashlib.sha256(open(path, 'rb').read()).hexdigest()
    name = '%d-%s' % (os.getuid(), digest)
    d = Daemon(tmpdir_short)
    rc, f, err = prefetch_dir(d, root)
    assert rc == 0 and f['items_done'] == n, err
    assert eventually(lambda: tables(d), (1, 0, 0)) == (1, 0, 0)
    assert table_files(d) == [name]
    tpath = os.path.join(d.cache, 'tables', name)
    assert os.stat(tpath).st_mode & 0o777 == 0o600
    original = open(tpath, 'rb').read()

    def check(i):
        rc, arr, meta, said = get_item(d, root, i, tmpdir_short)
        assert rc == 0, said
        assert meta['resource']['id'] == 'p%d' % i
        assert np.array_equal(arr, pil_chw(os.path.join(root, res[i]['file'])))

    rc, f, err = prefetch_dir(d, root)  # listed early, the table mapped
    assert rc == 0 and f['items_total'] == n and f['items_cached'] == n, (f, err)
    assert tables(d) == (1, 1, 0)
    check(n - 1)  # asked ahead of the walk, from the mapping
    assert tables(d) == (1, 2, 0)
    assert d.stop()[0] == 0
    d.start()  # the table outlives the daemon
    check(7)
    assert tables(d) == (0, 1, 0) and loaded(d) == 1
    # a damaged table (an item's first path moved): removed, dataset.json parsed, the
    # same table written again
    assert d.stop()[0] == 0
    body = bytearray(original)
    body[96 + 3 * 20 + 16] ^= 1  # items[3].first_path
    open(tpath, 'wb').write(bytes(body))
    d.start()
    check(3)
    assert eventually(lambda: tables(d), (1, 0, 1)) == (1, 0, 1)
    assert 'failed its checks' in d.log()
    assert open(tpath, 'rb').read() == original
    # a path in the pool that leaves the folder (same length): never asked for
    assert d.stop()[0] == 0
    at = original.index(b'images/p007.png\0')
    body = bytearray(original)
    body[at:at + 15] = b'../ges/p007.png'
    open(tpath, 'wb').write(bytes(body))
    d.start()
    # a GET of item 7 (asked ahead of the walk: its path is the job's first) fails with
    # the job's own words, not "not in the cache": told while the job lives (the item asked
    # ahead) or, when the GET comes after the job's end, from the failed job's record
    rc, _, _, said = get_item(d, root, 7, tmpdir_short)
    assert rc != 0 and 'damaged' in said and 'failed or evicted' not in said, said
    assert ('the job filling it failed' in said or
            'the download of this item failed' in said), said
    assert 'holds a path that leaves the folder' in d.log()
    assert tables(d) == (0, 1, 1)
    assert table_files(d) == []
    check(7)  # the next OPEN parses
    assert eventually(lambda: tables(d), (1, 1, 1)) == (1, 1, 1) and open(tpath, 'rb').read() == original
    # dataset.json changes: its table replaces the old one
    res[0]['id'] = 'q0'
    write_json(root, json.dumps({'name': 'tab', 'updated_at': 'v2', 'resources': res}))
    settle()
    digest2 = hashlib.sha256(open(path, 'rb').read()).hexdigest()
    rc, f, err = prefetch_dir(d, root)
    assert rc == 0 and f['items_total'] == n, err
    want = ['%d-%s' % (os.getuid(), digest2)]
    assert eventually(lambda: table_files(d), want) == want
    # the folder evicted: its table goes with it
    r = d.cli('evict', root)
    assert r.returncode == 0, r.stderr
    assert table_files(d) == []
    assert d.stop()[0] == 0
