"""Faults on the read path (docs/reliability.md C5, D4): a cache blob damaged on disk, or one
whose read fails, is never served (I1): the read finds it, the store quarantines and counts
it, the blob row is dropped and the item is fetched again with the key of the OPEN, and
the GET that met it gets the right bytes.

The real daemon, the emulator over HTTP, blobs damaged by the test in objects/ while the
daemon runs and while it is stopped. The hot set of decoded items is off (hot_max=0) so
that every GET reads the blob.
"""
import collections
import hashlib
import json
import mmap
import os
import random
import re
import sqlite3
import struct
import subprocess
import sys
import time

import pytest

import wire
from conftest import DMCACHE, Daemon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'emulator'))
import client as emulator  # noqa: E402

KEY = emulator.KEY_ALL
PROJECT = 'sample'
HEADER = 96
KINDS = ('flip_payload', 'flip_header', 'truncate', 'zero', 'other_blob', 'key_mismatch',
         'append')


def prefetch(d, emu, project):
    env = dict(d.env, DATAMINT_API_KEY=KEY)
    env.pop('DATAMINT_API_URL', None)
    r = subprocess.run([DMCACHE, '--socket', d.socket, 'prefetch', '--json', '--server',
                        emu.url, project], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr + d.log()[-3000:]


def counters(d):
    r = d.cli('status', '--json')
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)['counters']


class Session:
    """One client: OPEN of the project, GETs read from the arena, RELEASE after."""

    def __init__(self, d, emu, project=PROJECT, flags=0):
        self.sock = wire.session(d.socket, timeout=60)
        self.sock.sendall(wire.open_msg(project, flags=flags, server=emu.url, key=KEY,
                                        arena=64 << 20))
        op, fl, rid, payload, fds = wire.recv_frame_fds(self.sock)
        assert op == wire.OP_OPEN, wire.decode_error(payload)
        self.open = wire.decode_open_reply(payload)
        self.fd = fds[0]
        self.map = mmap.mmap(self.fd, 0, prot=mmap.PROT_READ)
        self.rid = 100

    def get(self, indices, resource=False):
        """{index: (status, sha256 of the tensor or the message)}; with `resource`, the
        resource id of the metadata instead of the digest"""
        self.rid += 1
        self.sock.sendall(wire.get_msg(self.open['handle'], indices, rid=self.rid))
        op, fl, rid, payload, _ = wire.recv_frame_fds(self.sock)
        assert op == wire.OP_GET and rid == self.rid, wire.decode_error(payload)
        out, offs = {}, []
        for it in wire.decode_get_reply(payload):
            if it['status'] == 0:
                size = os.fstat(self.fd).st_size
                if self.map.size() < size:
                    self.map.close()
                    self.map = mmap.mmap(self.fd, 0, prot=mmap.PROT_READ)
                b = self.map[it['offset']:it['offset'] + it['nbytes']]
                out[it['index']] = (0, hashlib.sha256(b).hexdigest())
                if resource:
                    m = self.map[it['meta_offset']:it['meta_offset'] + it['meta_len']]
                    out[it['index']] = (0, json.loads(m.rstrip(b'\0'))['resource']['id'])
                offs += [it['offset'], it['meta_offset']]
            else:
                out[it['index']] = (it['status'], it['message'])
        if offs:
            self.rid += 1
            self.sock.sendall(wire.frame(wire.OP_RELEASE, struct.pack('<I', len(offs)) +
                                         b''.join(struct.pack('<Q', o) for o in offs),
                                         rid=self.rid))
            op, fl, rid, payload, _ = wire.recv_frame_fds(self.sock)
            assert rid == self.rid and op == wire.OP_RELEASE, wire.decode_error(payload)
        return out

    def close(self):
        self.map.close()
        os.close(self.fd)
        self.sock.close()


def item_blobs(d, emu, s, project=PROJECT):
    """{index: raw blob hex} of the items a GET reads from their raw blob (not from a stored
    decoded tensor). The index is the daemon's own (exclusive lock): the digests come from
    the corpus, resources named by the metadata the GET serves."""
    corpus = emulator.corpus_dir()
    pj = json.load(open(os.path.join(corpus, 'projects', project, 'project.json')))
    sha = {r['id']: r['sha256'] for r in pj['resources']}
    out = {}
    time.sleep(1)  # decoded tensors of expensive codecs are stored after their first GET
    for k in range(s.open['items']):
        before = counters(d)['serve_items_from_tensor_cache_total']
        rid = s.get([k], resource=True)[k][1]
        if counters(d)['serve_items_from_tensor_cache_total'] == before:
            out[k] = sha[rid]
    return out


def blob_path(d, hexd):
    return os.path.join(d.cache, 'objects', hexd[:2], hexd)


def corrupt(path, kind, other, rng):
    """Damages the blob at `path` in place (same inode); `other` is another blob's path."""
    data = open(path, 'rb').read()
    if kind == 'flip_payload':
        off = rng.randrange(HEADER, len(data))
        data = data[:off] + bytes([data[off] ^ (1 << rng.randrange(8))]) + data[off + 1:]
    elif kind == 'flip_header':
        off = rng.randrange(0, HEADER)
        data = data[:off] + bytes([data[off] ^ (1 << rng.randrange(8))]) + data[off + 1:]
    elif kind == 'truncate':
        data = data[:rng.randrange(1, len(data))]
    elif kind == 'zero':
        data = b''
    elif kind == 'other_blob':
        data = open(other, 'rb').read()
    elif kind == 'key_mismatch':
        # a well-formed header (its check recomputed) naming another blob's digest
        hdr = bytearray(data[:HEADER])
        hdr[32:64] = bytes.fromhex(os.path.basename(other))
        hdr[88:96] = hashlib.sha256(bytes(hdr[:88])).digest()[:8]
        data = bytes(hdr) + data[HEADER:]
    elif kind == 'append':
        data = data + b'\0' * rng.randrange(1, 4096)
    with open(path, 'r+b') as f:
        f.truncate(0)
        f.write(data)
    return data


def baseline(s, n):
    want = s.get(list(range(n)))
    assert all(st == 0 for st, _ in want.values()), want
    return {k: v[1] for k, v in want.items()}


def run_round(d, s, want, blobs, batch, rng, tally):
    """Damages `batch` distinct blobs of distinct items, then one GET of those items."""
    idx = rng.sample(sorted(blobs), batch)
    damaged = {}
    for k in idx:
        kind = rng.choice(KINDS)
        others = [blobs[j] for j in blobs if j not in idx]  # intact ones
        damaged[k] = (kind, corrupt(blob_path(d, blobs[k]), kind,
                                    blob_path(d, rng.choice(others)), rng))
        tally['kinds'][kind] = tally['kinds'].get(kind, 0) + 1
    got = s.get(idx)
    for k in idx:
        # still in place: the damage left the raw bytes as they were (a zstd frame field
        # the decoder does not need, such as the window size); `dmcache verify` at the end
        # re-hashes it
        try:
            same = open(blob_path(d, blobs[k]), 'rb').read() == damaged[k][1]
        except FileNotFoundError:
            same = False
        if same:
            tally['benign'].append((damaged[k][0], k))
    for k in idx:
        tally['trials'] += 1
        st, h = got[k]
        if st != 0:
            tally['errors'].append((k, st, h))
        elif h != want[k]:
            tally['wrong'] += 1  # a corrupt tensor served: I1 broken
    return idx


def test_damaged_blobs_are_refetched_and_never_served(emu, tmpdir_short):
    """C5: 1000 damaged blobs (7 kinds; 800 while the daemon runs, 200 while it is
    stopped): 0 wrong tensors, every damage found and counted, the item served right by
    the GET that met it."""
    rng = random.Random(5)
    emu.clear_faults()
    d = Daemon(tmpdir_short, args=['-o', 'hot_max=0'])
    d.env.update(DATAMINT_API_KEY=KEY, DATAMINT_API_URL=emu.url)
    t0 = time.monotonic()
    tally = {'trials': 0, 'wrong': 0, 'errors': [], 'kinds': {}, 'benign': []}
    try:
        prefetch(d, emu, PROJECT)
        s = Session(d, emu)
        n = s.open['items']
        want = baseline(s, n)
        blobs = item_blobs(d, emu, s)
        # distinct content only: two items of one blob would be one damage
        seen, uniq = set(), {}
        for k, h in sorted(blobs.items()):
            if h not in seen:
                seen.add(h)
                uniq[k] = h
        assert len(uniq) >= 8, blobs
        batch = min(16, len(uniq) // 2)
        c0 = counters(d)
        running = 0
        while running < 800:
            b = min(batch, 800 - running)
            run_round(d, s, want, uniq, b, rng, tally)
            running += b
            missing = [k for k in uniq if not os.path.exists(blob_path(d, uniq[k]))]
            assert not missing, 'not stored again: %r' % missing
        c1 = counters(d)
        assert tally['wrong'] == 0
        assert tally['errors'] == [], tally['errors'][:5]
        # every damage was found on read, quarantined, counted and fetched again
        found = running - len(tally['benign'])
        assert all(kind == 'flip_payload' for kind, _ in tally['benign']), tally['benign']
        assert len(tally['benign']) <= running // 100, tally['benign']
        assert c1['serve_bad_reads_total'] - c0['serve_bad_reads_total'] == found
        assert c1['serve_refetches_total'] - c0['serve_refetches_total'] == found
        assert c1['serve_refetches_failed_total'] == c0['serve_refetches_failed_total']
        assert c1['cache_integrity_failures_total'] - c0['cache_integrity_failures_total'] \
            == found
        assert not os.listdir(os.path.join(d.cache, 'tmp'))
        s.close()

        # while stopped: damaged between two runs; reconciliation removes what has a bad
        # header or size, the read finds the rest; the OPEN's job fetches what is missing
        stopped = 0
        while stopped < 200:
            rc, _ = d.stop()
            assert rc == 0, d.log()[-3000:]
            b = min(batch, 200 - stopped)
            cur = uniq
            idx = rng.sample(sorted(cur), b)
            damaged = {}
            for k in idx:
                kind = rng.choice(KINDS)
                others = [cur[j] for j in cur if j not in idx]
                damaged[k] = corrupt(blob_path(d, cur[k]), kind,
                                     blob_path(d, rng.choice(others)), rng)
                tally['kinds'][kind] = tally['kinds'].get(kind, 0) + 1
            d.start()
            s = Session(d, emu)
            got = s.get(idx)
            for k in idx:
                # found (by the start's reconciliation or by the read) and replaced
                assert open(blob_path(d, cur[k]), 'rb').read() != damaged[k], k
            for k in idx:
                tally['trials'] += 1
                st, h = got[k]
                if st != 0:
                    tally['errors'].append((k, st, h))
                elif h != want[k]:
                    tally['wrong'] += 1
            s.close()
            stopped += b
        assert tally['wrong'] == 0
        assert tally['errors'] == [], tally['errors'][:5]
        assert tally['trials'] == 1000
        # nothing damaged is left in objects/: every blob there verifies
        r = d.cli('verify', timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        rc, _ = d.stop()
        print('C5: %d trials in %.1f s, kinds %s, wrong %d, errors %d, harmless %r'
              % (tally['trials'], time.monotonic() - t0, tally['kinds'], tally['wrong'],
                 len(tally['errors']), tally['benign']))
    assert rc == 0, d.log()[-3000:]


def strace_inject(pid, path, inject, when='1'):
    """strace attached to `pid`, failing the first pread64 of `path` as `inject` says."""
    p = subprocess.Popen(['strace', '-f', '-qq', '-p', str(pid), '-P', path, '-e',
                          'trace=pread64', '-e', 'inject=pread64:%s:when=%s' % (inject, when),
                          '-o', '/dev/null'], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    time.sleep(0.5)  # attached to every thread
    return p


def strace_stop(p):
    p.terminate()
    p.wait(10)


@pytest.mark.skipif(os.geteuid() != 0, reason='strace -p needs root')
def test_eio_on_a_blob_read_is_a_miss(emu, tmpdir_short):
    """D4: pread64 of a blob fails with EIO (strace fault injection on that path): the blob
    is quarantined like a damaged one, the item fetched again, the GET gets the right
    bytes; the daemon does not crash."""
    rng = random.Random(4)
    emu.clear_faults()
    # strace counts `when` per thread: one threadpool thread makes "the first read" the
    # first read of the damaged copy, not of its fresh copy too
    d = Daemon(tmpdir_short, args=['-o', 'hot_max=0'], env={'UV_THREADPOOL_SIZE': '1'})
    d.env.update(DATAMINT_API_KEY=KEY, DATAMINT_API_URL=emu.url)
    try:
        prefetch(d, emu, PROJECT)
        s = Session(d, emu)
        want = baseline(s, s.open['items'])
        blobs = item_blobs(d, emu, s)
        c0 = counters(d)
        trials = 20
        for t in range(trials):
            k = rng.choice(sorted(blobs))
            # the header read (when=1) or a payload read (when=2)
            p = strace_inject(d.proc.pid, blob_path(d, blobs[k]), 'error=EIO',
                              when=str(1 + t % 2))
            try:
                st, h = s.get([k])[k]
            finally:
                strace_stop(p)
            assert (st, h) == (0, want[k]), (t, k, st, h)
            assert d.proc.poll() is None
        c1 = counters(d)
        assert c1['serve_bad_reads_total'] - c0['serve_bad_reads_total'] == trials
        assert c1['serve_refetches_total'] - c0['serve_refetches_total'] == trials
        # and with no fault, every item reads back identical
        assert {k: v[1] for k, v in s.get(sorted(want)).items()} == want
        s.close()
    finally:
        rc, _ = d.stop()
    assert rc == 0, d.log()[-3000:]


def test_object_changed_between_attempts_is_never_mixed(emu, tmpdir_short):
    """N3: the first transfer of a file drops half-way and the file changes on the server
    (new ETag) before the resume: the resume's If-Range gets a 200 with the whole new body,
    and what is stored is the new content whole (or nothing, with integrity, if the
    listing's digest is the old one): never a mix of versions."""
    emu.reset()
    pj = json.load(open(os.path.join(emulator.corpus_dir(), 'projects', PROJECT,
                                     'project.json')))
    res = max(pj['resources'], key=lambda r: r['size'])
    old = res['sha256']
    emu.add_fault(path=r'^/resources/%s/file$' % res['id'], drop_after=res['size'] // 2,
                  mutate=True, times=1)
    d = Daemon(tmpdir_short, args=['-o', 'hot_max=0'])
    d.env.update(DATAMINT_API_KEY=KEY, DATAMINT_API_URL=emu.url)
    try:
        env = dict(d.env)
        env.pop('DATAMINT_API_URL', None)
        r = subprocess.run([DMCACHE, '--socket', d.socket, 'prefetch', '--json', '--server',
                            emu.url, PROJECT], env=env, capture_output=True, text=True,
                           timeout=300)
        new_body = emulator.request(emu.url, path='/resources/%s/file' % res['id'],
                                    key=KEY).body
        new = hashlib.sha256(new_body).hexdigest()
        assert new != old
        tries = [e for e in emu.log() if e['path'] == '/resources/%s/file' % res['id']]
        print('N3: prefetch rc %d; transfers %r' % (
            r.returncode, [(e['status'], e['range'], e['if_range']) for e in tries]))
        assert tries[0]['range'] is None
        resumed = [e for e in tries[1:] if e['range']]
        assert resumed, tries
        assert resumed[0]['if_range'] and resumed[0]['status'] == 200
    finally:
        rc, _ = d.stop()
        # the other tests of this module read the corpus's content
        emu.set_content(res['id'], open(os.path.join(emulator.corpus_dir(), 'projects',
                                                     PROJECT, res['file']), 'rb').read())
    assert rc == 0, d.log()[-3000:]
    db = sqlite3.connect(os.path.join(d.cache, 'index.db'))
    try:
        stored = [h.lower() for (h,) in db.execute(
            'SELECT hex(i.blob) FROM items AS i JOIN blobs AS b ON b.digest = i.blob '
            'WHERE i.resource_id = ?', (res['id'],))]
    finally:
        db.close()
    # every blob in objects/ is named by its content, and none of them is a mix
    names = set()
    for sub in os.listdir(os.path.join(d.cache, 'objects')):
        names.update(os.listdir(os.path.join(d.cache, 'objects', sub)))
    if r.returncode == 0:
        assert stored == [new], (stored, new, old)
        assert new in names
    else:
        assert stored == [] and 'integrity' in r.stdout + r.stderr, r.stdout + r.stderr


CREATES = ('mkdir', 'mkdirat', 'rename', 'renameat', 'renameat2', 'link', 'linkat', 'symlink',
           'symlinkat', 'mknod', 'mknodat', 'creat')


def created_paths(trace):
    """(syscall, path as strace -y shows it) of every call in `trace` that can create a
    name: the creating calls, and opens with O_CREAT."""
    out = []
    for line in trace.splitlines():
        m = re.match(r'^(?:\[pid\s+\d+\]\s+|\d+\s+)?(\w+)\((.*)', line)
        if not m:
            continue
        call, args = m.group(1), m.group(2)
        if call in CREATES or (call.startswith('open') and 'O_CREAT' in args):
            out.append((call, args[:300]))
    return out


def descendants(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for t in os.listdir('/proc/%d/task' % p):
            try:
                with open('/proc/%d/task/%s/children' % (p, t)) as f:
                    todo += [int(c) for c in f.read().split()]
            except OSError:
                pass
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason='strace -p needs root')
def test_bad_project_through_the_daemon(emu, tmpdir_short):
    """X2/X5 through the daemon: every input of the `bad` project fetched and served:
    size bombs refused with limit_exceeded at once, broken files with decode_failed, the
    path-injection DICOM served exact; nothing is created outside the cache (strace -f
    -e trace=%file of the daemon and its workers); another client is served meanwhile."""
    emu.reset()
    # decoded items up to 64 MiB (X2: a worker's peak stays under that): the corpus's
    # gzip bomb inflates to 256 MiB, refused from its header
    d = Daemon(tmpdir_short, args=['-o', 'hot_max=0', '-o', 'max_decode_bytes=64M'])
    d.env.update(DATAMINT_API_KEY=KEY, DATAMINT_API_URL=emu.url)
    trace_path = os.path.join(tmpdir_short, 'trace')
    pids = descendants(d.proc.pid)  # the decode workers started before the trace
    assert len(pids) >= 2, pids
    tr = subprocess.Popen(['strace', '-f', '-qq', '-y', '-s', '256', '-e', 'trace=%file',
                           '-o', trace_path] + [a for p in pids for a in ('-p', str(p))],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    results = []
    try:
        prefetch(d, emu, 'bad')
        prefetch(d, emu, PROJECT)
        other = Session(d, emu)
        want = baseline(other, 4)
        s = Session(d, emu, 'bad')
        for k in range(s.open['items']):
            t0 = time.monotonic()
            s.rid += 1
            s.sock.sendall(wire.get_msg(s.open['handle'], [k], rid=s.rid))
            op, fl, rid, payload, _ = wire.recv_frame_fds(s.sock)
            took = time.monotonic() - t0
            it = wire.decode_get_reply(payload)[0]
            meta = None
            if it['status'] == 0:
                m = s.map[it['meta_offset']:it['meta_offset'] + it['meta_len']]
                meta = json.loads(m.rstrip(b'\0'))['resource']
                b = s.map[it['offset']:it['offset'] + it['nbytes']]
                s.rid += 1
                s.sock.sendall(wire.frame(wire.OP_RELEASE, struct.pack('<I', 2) + struct.pack(
                    '<QQ', it['offset'], it['meta_offset']), rid=s.rid))
                wire.recv_frame_fds(s.sock)
                results.append((k, 0, took, meta['id'], hashlib.sha256(b).hexdigest()))
            else:
                results.append((k, it['status'], took, None, it['message']))
            # another client is served meanwhile
            assert other.get([k % 4])[k % 4] == (0, want[k % 4])
        s.close()
        other.close()
    finally:
        time.sleep(0.3)
        tr.terminate()
        tr.wait(10)
        rc, _ = d.stop()
    assert rc == 0, d.log()[-3000:]
    codes = {v: k for k, v in wire.E.items()}
    print('X2/X5:', [(k, codes.get(st, st), round(t, 2)) for k, st, t, _, _ in results])
    manifest = json.load(open(os.path.join(emulator.corpus_dir(), 'manifest.json')))
    files = {e['resource_id']: e for e in manifest['files'] if e.get('project') == 'bad'}
    expect = collections.Counter(e['expect'] for e in files.values())
    got = collections.Counter(codes.get(st, st) for _, st, _, _, _ in results)
    for k, st, took, rid, extra in results:
        if st == 0:
            e = files[rid]
            assert e['expect'] in ('decode_ok', 'decode_ok_or_limit_exceeded'), (k, e['bad'])
            if e['expect'] == 'decode_ok':  # the path-injection DICOM: served exact
                import numpy as np
                import pydicom
                a = pydicom.dcmread(os.path.join(emulator.corpus_dir(), e['path']))
                a = np.ascontiguousarray(a.pixel_array.astype(np.int16))
                assert extra == hashlib.sha256(a.tobytes()).hexdigest()
        elif st == wire.E['limit_exceeded']:
            assert took < 1.0, (k, took, extra)  # refused from the header, not decoded
    assert len(results) == len(files)
    assert got['decode_failed'] == expect['decode_failed'], got
    assert expect['limit_exceeded'] <= got['limit_exceeded'] <= \
        expect['limit_exceeded'] + expect['decode_ok_or_limit_exceeded'], got
    assert got[0] == len(files) - got['decode_failed'] - got['limit_exceeded'] >= 1
    # nothing created outside the cache; no hostile name reached a file system call
    trace = open(trace_path).read()
    assert 'dmcache-evil' not in trace and 'passwd' not in trace
    cache = os.path.realpath(d.cache)
    outside = [c for c in created_paths(trace) if cache not in c[1]]
    assert outside == [], outside[:10]
    print('X5: %d processes, %d file calls traced, %d creating ones, all inside %s'
          % (len(pids), trace.count('\n'), len(created_paths(trace)), cache))


def test_short_reads_and_writes_give_identical_output(emu, tmpdir_short):
    """D4, short I/O: with every 5th pread/pwrite of a blob or temp file moving at most
    half its bytes (an LD_PRELOAD shim), a prefetch and GETs of every item give the same
    bytes as a run without it, and nothing is found bad."""
    emu.reset()
    shim = os.path.join(tmpdir_short, 'short_io.so')
    subprocess.run(['cc', '-shared', '-fPIC', '-O2', '-o', shim,
                    os.path.join(os.path.dirname(__file__), 'shim', 'short_io.c'), '-ldl'],
                   check=True)
    runs = []
    count = os.path.join(tmpdir_short, 'short_count')
    for env in ({}, {'LD_PRELOAD': shim, 'DMC_SHORT_IO_COUNT': count}):
        sub = os.path.join(tmpdir_short, 'r%d' % len(runs))
        os.mkdir(sub)
        d = Daemon(sub, args=['-o', 'hot_max=0'], env=env)
        d.env.update(DATAMINT_API_KEY=KEY, DATAMINT_API_URL=emu.url)
        d.env.pop('LD_PRELOAD', None)  # the CLI runs without it
        try:
            prefetch(d, emu, PROJECT)
            s = Session(d, emu)
            runs.append(baseline(s, s.open['items']))
            runs.append(baseline(s, s.open['items']))  # a second read of every blob
            s.close()
            st = counters(d)
            assert st['serve_bad_reads_total'] == 0
            assert st['cache_integrity_failures_total'] == 0
        finally:
            rc, _ = d.stop()
        assert rc == 0, d.log()[-3000:]
    assert runs[0] == runs[1] == runs[2] == runs[3]
    n = int(open(count).read())
    print('D4: %d items identical with %d+ short pread/pwrite calls' % (len(runs[0]), n))
    assert n >= 16


def test_open_key_is_kept_only_while_the_handle_is_open(emu, tmpdir_short):
    """The key of an OPEN is kept (in locked memory) while the handle is open, for the
    re-fetch of a damaged item; once the client is gone and the re-fetch's job ended, not
    one copy of it is left in the daemon's memory."""
    import test_trust_fair

    def key_copies(pid, needle):
        # the arenas (memfd mappings) hold tensors for clients and are the bulk of the
        # address space: the key never goes there; every other region is read
        regions = test_trust_fair.readable_regions
        test_trust_fair.readable_regions = lambda p: (
            r for r in regions(p) if not r[2].startswith('/memfd:'))
        try:
            return test_trust_fair.key_copies(pid, needle)
        finally:
            test_trust_fair.readable_regions = regions
    emu.reset()
    d = Daemon(tmpdir_short, args=['-o', 'hot_max=0'])
    d.env.update(DATAMINT_API_KEY=KEY, DATAMINT_API_URL=emu.url)
    needle = KEY.encode()
    try:
        prefetch(d, emu, PROJECT)
        s = Session(d, emu)
        want = baseline(s, s.open['items'])
        k = 0
        blobs = {k: json.load(open(os.path.join(
            emulator.corpus_dir(), 'projects', PROJECT, 'project.json')))['resources']}
        rid = s.get([k], resource=True)[k][1]
        blobs[k] = [r['sha256'] for r in blobs[k] if r['id'] == rid][0]
        corrupt(blob_path(d, blobs[k]), 'flip_payload', None, random.Random(1))
        assert s.get([k])[k] == (0, want[k])
        t0 = time.monotonic()
        held = key_copies(d.proc.pid, needle)[0]
        assert 1 <= len(held) <= 2, held  # the handle's copy (and the OPEN's job, if running)
        s.close()
        time.sleep(0.5)
        found, scanned = key_copies(d.proc.pid, needle)
        print('key scans: %.1f s for %.0f MiB each' % ((time.monotonic() - t0) / 2,
                                                       scanned / 2**20))
        assert scanned > 1 << 20
        assert found == [], found
        assert counters(d)['serve_refetches_total'] == 1
    finally:
        rc, _ = d.stop()
    assert rc == 0, d.log()[-3000:]


def test_refetch_that_fails_ends_the_item_and_the_next_get_recovers(emu, tmpdir_short):
    """The fresh copy cannot be had (the server answers 404 for the file, or 503 for the
    project): the GET's item ends with that error at once (no hang, no damaged bytes);
    once the server answers again, the next GET of it gets the right bytes."""
    emu.reset()
    d = Daemon(tmpdir_short, args=['-o', 'hot_max=0', '-o', 'backoff_base=100ms'])
    d.env.update(DATAMINT_API_KEY=KEY, DATAMINT_API_URL=emu.url)
    pj = json.load(open(os.path.join(emulator.corpus_dir(), 'projects', PROJECT,
                                     'project.json')))
    sha = {r['id']: r['sha256'] for r in pj['resources']}
    try:
        prefetch(d, emu, PROJECT)
        s = Session(d, emu)
        want = baseline(s, s.open['items'])
        for k, fault in ((0, dict(path=r'^/resources/[^/]+/file$', status=404)),
                         (1, dict(path=r'^/projects', status=503))):
            rid = s.get([k], resource=True)[k][1]
            corrupt(blob_path(d, sha[rid]), 'flip_payload', None, random.Random(k))
            emu.add_fault(**fault)
            t0 = time.monotonic()
            st, msg = s.get([k])[k]
            took = time.monotonic() - t0
            print('refetch against %r: %s %r in %.1f s' % (fault, st, msg, took))
            assert st != 0 and ('fetching it again failed' in msg or 'download' in msg), msg
            assert took < 30
            emu.clear_faults()
            assert s.get([k])[k] == (0, want[k]), d.log()[-2000:]
        s.close()
    finally:
        rc, _ = d.stop()
    assert rc == 0, d.log()[-3000:]
