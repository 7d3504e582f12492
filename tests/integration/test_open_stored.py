"""What an OPEN learns by reading every item of a snapshot (the frame counts of a
frame-by-frame OPEN, the label set of a mask OPEN) is probed once and kept in the index
(snapshot_probes): the next OPEN of the unchanged snapshot reads it instead of probing
again, also after a restart; the values equal an independent computation (pydicom's
NumberOfFrames, Pillow, nibabel; the label names of the corpus' segmentation annotations);
and a change to an item of the snapshot drops what was kept.

Probing is counted by the daemon (`serve_open_frame_probes_total`,
`serve_open_label_reads_total`, `serve_open_stored_hits_total` in `dmcache status`), never
timed. The real daemon, client library and CLI, the emulator over HTTP; the index is read
with sqlite3 only while the daemon is stopped.
"""
import json
import os
import sqlite3
import struct
import subprocess
import sys

from conftest import BUILD, DMCACHE, Daemon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'emulator'))
import client as emulator  # noqa: E402

from test_trust_cache import asan_preload  # noqa: E402

KEY = emulator.KEY_ALL
CORPUS = os.path.join(BUILD, 'tests', 'data', 'corpus', 'projects', 'sample')


def counters(d):
    r = subprocess.run([DMCACHE, '--socket', d.socket, 'status', '--json'], env=d.env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)['counters']


def frames_of(path):
    """The frame count of a corpus file, by an independent reader."""
    name = path.lower()
    if name.endswith('.dcm'):
        import pydicom
        return int(getattr(pydicom.dcmread(path, stop_before_pixels=True), 'NumberOfFrames', 1)
                   or 1)
    if name.endswith(('.png', '.jpg', '.jpeg')):
        return 1
    import nibabel
    shape = nibabel.load(path).shape
    n = 1
    for s in shape[2:]:
        n *= s
    return n


CLIENT = r'''
import json, sys
from dmcache import _lib
url, key, what, offline = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
c = _lib.Client(sys.argv[5])
out = {}
if what == "frames":
    ds = c.open(_lib.SOURCE_DATAMINT, "sample", server=url, api_key=key, frames=True,
                offline=offline)
    flat = []
    for i in range(ds.items):
        its = ds.get([i])
        assert its[0].status == 0, its[0].message
        m = json.loads(_lib.item_meta(its[0]))
        flat.append((m["resource"]["id"], m["frame"]))
        ds.release(its)
    ds.close()
    whole = c.open(_lib.SOURCE_DATAMINT, "sample", server=url, api_key=key, offline=offline)
    out = {"snapshot": whole.snapshot_id, "items": whole.items, "flat": flat}
    whole.close()
else:
    ds = c.open(_lib.SOURCE_DATAMINT, "sample", server=url, api_key=key, masks=True)
    its = ds.get([0])
    assert its[0].status == 0, its[0].message
    out = {"labels": json.loads(_lib.item_meta(its[0]))["labels"]}
    ds.release(its)
    ds.close()
c.close()
print(json.dumps(out))
'''


def client(d, emu, what, offline=False):
    """libdmcache in a Python process of its own (an ASan build's library needs its runtime
    loaded first)."""
    env = asan_preload(dict(d.env, PYTHONPATH=os.path.join(BUILD, 'client', 'python')))
    r = subprocess.run(['/usr/bin/python3', '-c', CLIENT, emu.url, KEY, what,
                        '1' if offline else '0', d.socket], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def open_frames(d, emu, offline=False):
    """(snapshot id, whole items, [(resource id, frame)] for every flat index)."""
    out = client(d, emu, 'frames', offline)
    return out['snapshot'], out['items'], [tuple(x) for x in out['flat']]


def open_labels(d, emu):
    return client(d, emu, 'labels')['labels']


def test_frame_counts_and_labels_are_probed_once_and_kept(emu, tmpdir_short):
    emu.clear_faults()
    d = Daemon(tmpdir_short)
    d.env.update(DATAMINT_API_KEY=KEY, DATAMINT_API_URL=emu.url)
    assert d.cli('prefetch', 'sample').returncode == 0
    with open(os.path.join(CORPUS, 'project.json')) as f:
        project = json.load(f)
    names = sorted({a['identifier'] for r in project['resources']
                    for a in r.get('annotations') or [] if a.get('type') == 'segmentation'})
    listed = emulator.request(emu.url, path='/projects/%s/resources' % emu.project('sample')['id'],
                              key=KEY).json()
    listed = listed['data'] if isinstance(listed, dict) else listed
    by_name = {os.path.basename(r['file']): r for r in project['resources']}
    expect = {r['id']: frames_of(os.path.join(CORPUS, by_name[r['filename']]['file']))
              for r in listed}

    # the first frame-by-frame OPEN probes every item; its map equals the readers' counts
    sid, n, flat = open_frames(d, emu)
    st = counters(d)
    assert st['serve_open_frame_probes_total'] == n == len(expect)
    assert st['serve_open_stored_hits_total'] == 0
    got = {}
    for rid, fr in flat:
        assert fr == got.get(rid, 0)  # frames in order, item after item
        got[rid] = fr + 1
    assert got == expect and max(expect.values()) > 1

    # the next OPEN reads what the first recorded: no probe, the same map
    sid2, _, flat2 = open_frames(d, emu)
    st = counters(d)
    assert sid2 == sid and flat2 == flat
    assert st['serve_open_frame_probes_total'] == n
    assert st['serve_open_stored_hits_total'] == 1

    # the label set: read from every record once, then kept
    assert open_labels(d, emu) == names and len(names) > 1
    st = counters(d)
    assert st['serve_open_label_reads_total'] == n
    assert open_labels(d, emu) == names
    st = counters(d)
    assert st['serve_open_label_reads_total'] == n
    assert st['serve_open_stored_hits_total'] == 2

    # kept across a restart: a new daemon process probes nothing, offline or online
    rc, _ = d.stop()
    assert rc == 0, d.log()
    db = sqlite3.connect(os.path.join(d.cache, 'index.db'))
    try:
        rows = dict(db.execute('SELECT kind, data FROM snapshot_probes WHERE snapshot_id = ?',
                               (sid,)).fetchall())
    finally:
        db.close()
    assert json.loads(rows[2]) == names
    order = [rid for rid, fr in flat if fr == 0]
    assert list(struct.unpack('<%dI' % n, rows[1])) == [expect[rid] for rid in order]
    d.start()
    assert open_frames(d, emu, offline=True)[2] == flat
    assert open_frames(d, emu)[2] == flat
    assert open_labels(d, emu) == names
    st = counters(d)
    assert st['serve_open_frame_probes_total'] == 0
    assert st['serve_open_label_reads_total'] == 0
    assert st['serve_open_stored_hits_total'] == 3

    # an item of the snapshot that changes drops what was kept: the next OPEN probes again
    rc, _ = d.stop()
    assert rc == 0, d.log()
    db = sqlite3.connect(os.path.join(d.cache, 'index.db'))
    try:
        with db:
            db.execute("UPDATE items SET meta = json_set(meta, '$.touched', 1) WHERE key = ?",
                       (sid << 32,))
        left = db.execute('SELECT count(*) FROM snapshot_probes WHERE snapshot_id = ?',
                          (sid,)).fetchone()[0]
    finally:
        db.close()
    assert left == 0
    d.start()
    assert open_frames(d, emu)[2] == flat
    assert open_labels(d, emu) == names
    st = counters(d)
    assert st['serve_open_frame_probes_total'] == n
    assert st['serve_open_label_reads_total'] == n
    assert st['serve_open_stored_hits_total'] == 0
    rc, _ = d.stop()
    assert rc == 0, d.log()
