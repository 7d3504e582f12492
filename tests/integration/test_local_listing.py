"""A local folder whose dataset.json bytes did not change is not listed again item by item:
the snapshot keeps the items put from those bytes (their SHA-256 and count are recorded
with it), while every item's content is still forgotten and proved again by the job's own
descriptors (docs/security.md, local folders): a file changed in place is read again, a
changed dataset.json is listed again.

The real daemon and CLI; `prefetch_local_listings_kept_total` in `dmcache status` says when
a listing was kept; the index is read with sqlite3 only while the daemon is stopped.
"""
import hashlib
import json
import os
import sqlite3
import struct

from conftest import Daemon
from test_local import folder, prefetch_dir, sha, stored  # noqa: F401 (folder: a fixture)


def kept(d):
    r = d.cli('status', '--json')
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)['counters']['prefetch_local_listings_kept_total']


def listing_row(d):
    db = sqlite3.connect(os.path.join(d.cache, 'index.db'))
    try:
        return db.execute('SELECT snapshot_id, data FROM snapshot_probes WHERE kind = 3'
                          ).fetchall()
    finally:
        db.close()


def test_unchanged_listing_is_kept_and_contents_are_proved_again(folder, tmpdir_short):
    d = Daemon(tmpdir_short)
    rc, f, err = prefetch_dir(d, folder)
    assert rc == 0 and f['items_done'] == 6, err
    assert kept(d) == 0
    # the same bytes: the listing is kept, every file is proved again (by its unchanged
    # inode: nothing read)
    rc, f, err = prefetch_dir(d, folder)
    assert rc == 0 and f['items_cached'] == 6 and f['bytes_done'] == 0, err
    assert kept(d) == 1
    # a file changed in place (same size): the listing is kept, the file is read again
    spec = json.load(open(os.path.join(folder, 'dataset.json')))['resources']
    victim = os.path.join(folder, spec[2]['file'])
    data = bytearray(open(victim, 'rb').read())
    data[len(data) // 2] ^= 0x01
    open(victim, 'wb').write(data)
    rc, f, err = prefetch_dir(d, folder)
    assert rc == 0 and f['items_cached'] == 5 and f['bytes_done'] == len(data), err
    assert kept(d) == 2
    assert d.stop()[0] == 0
    rows, masks = stored(d)
    assert [r[0] for r in rows] == [r['id'] for r in spec]
    assert rows[2][1] == hashlib.sha256(bytes(data)).hexdigest()
    for (rid, blob, etag, meta), res in zip(rows, spec):
        assert blob == sha(os.path.join(folder, res['file']))
    assert masks == 1
    assert json.loads(rows[0][3])['mask_blobs']['ann1'] == \
        sha(os.path.join(folder, 'masks/a@b.com/r0/ann1'))
    (sid, row), = listing_row(d)
    assert row == bytes.fromhex(sha(os.path.join(folder, 'dataset.json'))) + \
        struct.pack('<I', 6)

    # dataset.json changed (one item less, another one's record changed): listed again
    spec = spec[:5]
    spec[1]['labels'] = ['fracture']
    doc = json.load(open(os.path.join(folder, 'dataset.json')))
    doc['resources'] = spec
    with open(os.path.join(folder, 'dataset.json'), 'w') as fh:
        json.dump(doc, fh)
    d.start()
    rc, f, err = prefetch_dir(d, folder)
    assert rc == 0 and f['items_total'] == f['items_done'] == 5, err
    assert kept(d) == 0  # a new daemon process: nothing kept in this one
    assert d.stop()[0] == 0
    rows, masks = stored(d)
    assert [r[0] for r in rows] == [r['id'] for r in spec]
    for (rid, blob, etag, meta), res in zip(rows, spec):
        assert blob == sha(os.path.join(folder, res['file']))
    assert json.loads(rows[1][3])['labels'] == ['fracture']
    assert 'labels' not in json.loads(rows[2][3])
    (sid2, row), = listing_row(d)
    assert sid2 == sid and row == bytes.fromhex(sha(os.path.join(folder, 'dataset.json'))) + \
        struct.pack('<I', 5)


def counter(d, name):
    r = d.cli('status', '--json')
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)['counters'][name]


def test_what_a_kept_listing_does_not_prove_again_is_forgotten(folder, tmpdir_short):
    """A kept listing leaves each row as it was while its job proves the items again: what
    is proved is not written again, and what the job could not prove (a file gone) is
    served to nobody meanwhile and forgotten when the job ends, so that no later GET gets
    the bytes an earlier proof found."""
    d = Daemon(tmpdir_short)
    rc, f, err = prefetch_dir(d, folder)
    assert rc == 0 and f['items_done'] == 6, err
    spec = json.load(open(os.path.join(folder, 'dataset.json')))['resources']
    os.unlink(os.path.join(folder, spec[3]['file']))
    rc, f, err = prefetch_dir(d, folder)
    assert rc != 0 and f['items_cached'] == 5 and f['items_failed'] == 1, (f, err)
    assert counter(d, 'prefetch_local_listings_kept_total') == 1
    assert counter(d, 'prefetch_local_items_forgotten_total') == 1
    # a GET of it (a new OPEN: listed again, proved again) fails; its neighbour is served
    out = os.path.join(tmpdir_short, 'x.npy')
    r = d.cli('get', '--source', folder, '3', '-o', out)
    assert r.returncode != 0 and 'item 3' in r.stderr, r.stderr
    assert not os.path.exists(out)
    r = d.cli('get', '--source', folder, '4', '-o', out)
    assert r.returncode == 0 and os.path.exists(out), r.stderr
    assert counter(d, 'prefetch_local_items_forgotten_total') == 3  # each OPEN's job
    assert d.stop()[0] == 0
    rows, masks = stored(d)
    assert rows[3][1] == ''  # hex(NULL): forgotten
    for i, ((rid, blob, etag, meta), res) in enumerate(zip(rows, spec)):
        if i != 3:
            assert blob == sha(os.path.join(folder, res['file']))
    assert masks == 1  # item 0's mask, put again, once
