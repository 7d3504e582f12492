"""Local dataset folders across users: content, not metadata; the user's permissions, not
the daemon's (daemon/local.h has the design).

The daemon runs as root, as the system service does. alice (61001) is the victim, bob
(61002) the attacker. Each test is the attack, and asserts that not one byte of alice's
pixels or header values reaches bob, and that bob gets an error (or his own bytes).
"""
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pydicom
import pytest

import uids
from conftest import DMCACHE, Daemon
from uids import ALICE, BOB

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'emulator'))
import client as emulator  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RID = 'r-0001'
VERSION = '2025-02-05T14:47:47.942Z'


def corpus(name):
    return os.path.join(emulator.corpus_dir(), 'projects', 'sample', 'files', name)


def sha(data):
    return hashlib.sha256(data).hexdigest()


def make_folder(root, uid, image_bytes=None, src='ct_000.dcm', image_mode=0o600,
                files=None, gid=None):
    """A dataset folder of `uid` with one DICOM (a corpus file, or `image_bytes`)."""
    gid = uid if gid is None else gid
    os.makedirs(os.path.join(root, 'images'))
    path = os.path.join(root, 'images', 'x.dcm')
    if image_bytes is None:
        shutil.copy(corpus(src), path)
    else:
        with open(path, 'wb') as f:
            f.write(image_bytes)
    res = [{'id': RID, 'file': 'images/x.dcm', 'filename': 'x.dcm', 'annotations': []}]
    for i, rel in enumerate(files or []):
        res.append({'id': 'r-%04d' % (i + 2), 'file': rel, 'annotations': []})
    with open(os.path.join(root, 'dataset.json'), 'w') as f:
        json.dump({'name': 'ct', 'updated_at': VERSION, 'resources': res}, f)
    for r, dirs, names in os.walk(root):
        os.chown(r, uid, gid)
        for n in names:
            os.chown(os.path.join(r, n), uid, gid)
    os.chmod(path, image_mode)
    return path


@pytest.fixture
def world(tmpdir_short):
    """The daemon as root, a socket everyone may reach, and the two users' homes (0700)."""
    uids.require_root()
    os.chmod(tmpdir_short, 0o755)
    # small arenas: populating the default 256 MiB one per OPEN costs the same for every
    # source, and is not what these tests measure
    d = Daemon(tmpdir_short, args=['-o', 'arena_default=%d' % (16 << 20)])
    uids.open_up(os.path.dirname(d.socket))
    homes = {u: uids.owned_dir(os.path.join(tmpdir_short, 'home%d' % u), u)
             for u in (ALICE, BOB)}
    yield d, homes
    rc, _ = d.stop()
    d.notify.close()
    assert rc == 0, d.log()


def cli(d, uid, *args, gid=None, timeout=60):
    return uids.run(uid, [DMCACHE, '--socket', d.socket] + list(args), env=d.env,
                    timeout=timeout, gid=gid)


def get(d, uid, folder, out_dir, index=0, gid=None):
    """`dmcache get --source` as `uid`: (CompletedProcess, array or None, meta text)."""
    out = os.path.join(out_dir, 'item%d.npy' % index)
    r = cli(d, uid, 'get', '--source', folder, str(index), '-o', out, gid=gid)
    arr = np.load(out) if r.returncode == 0 and os.path.exists(out) else None
    meta = open(out[:-4] + '.json').read() if os.path.exists(out[:-4] + '.json') else ''
    return r, arr, meta


def prefetch(d, uid, folder, gid=None):
    r = cli(d, uid, 'prefetch', '--json', '--source', folder, gid=gid)
    events = [json.loads(l) for l in r.stdout.splitlines() if l.startswith('{')]
    return r, (events[-1] if events else {})


def alice_secrets(path):
    """Chunks of alice's decoded pixels (independently of the daemon) and header values."""
    ds = pydicom.dcmread(path)
    px = np.ascontiguousarray(ds.pixel_array)
    raw = px.tobytes()
    chunks = []
    for off in range(0, len(raw) - 64, max(64, len(raw) // 64)):
        c = raw[off:off + 64]
        if len(set(c)) > 8:  # a chunk with texture, not a run of one value
            chunks.append(c)
    assert len(chunks) >= 8
    values = [str(ds.get(k)) for k in ('PatientName', 'PatientID', 'StudyInstanceUID',
                                       'SOPInstanceUID', 'SeriesInstanceUID')
              if ds.get(k) not in (None, '')]
    assert values
    return px, chunks, values


def assert_nothing_of(secrets, *outputs):
    _, chunks, values = secrets
    for out in outputs:
        if out is None:
            continue
        b = out.tobytes() if isinstance(out, np.ndarray) else \
            out.encode() if isinstance(out, str) else bytes(out)
        for c in chunks:
            assert c not in b, 'a chunk of alice\'s pixels reached bob'
        for v in values:
            assert v.encode() not in b, 'alice\'s header value %r reached bob' % v


def snapshot_blobs(d):
    """(owner uid, project_id, blob hex) of every local item, read after the daemon stops."""
    db = sqlite3.connect(os.path.join(d.cache, 'index.db'))
    try:
        return db.execute(
            "SELECT s.owner, s.project_id, lower(hex(i.blob)) FROM items AS i "
            "JOIN snapshots AS s ON i.key >> 32 = s.id WHERE s.source <> 1").fetchall()
    finally:
        db.close()


# (a) --------------------------------------------------------------------------------------

def test_same_size_same_mtime_gets_his_own_bytes(world):
    d, homes = world
    alice_dir = os.path.join(homes[ALICE], 'ds')
    alice_file = make_folder(alice_dir, ALICE)
    secrets = alice_secrets(alice_file)
    r, f = prefetch(d, ALICE, alice_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    r, arr, meta = get(d, ALICE, alice_dir, homes[ALICE])
    assert r.returncode == 0, r.stderr
    assert np.array_equal(arr.reshape(-1), secrets[0].reshape(-1).astype(arr.dtype))

    # bob: a file of zeros with the size and the mtime (ns) of alice's, the same resource id
    st = os.stat(alice_file)
    bob_dir = os.path.join(homes[BOB], 'ds')
    bob_file = make_folder(bob_dir, BOB, image_bytes=bytes(st.st_size))
    os.utime(bob_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(bob_file).st_size == st.st_size
    assert os.stat(bob_file).st_mtime_ns == st.st_mtime_ns
    r1, f1 = prefetch(d, BOB, bob_dir)
    r2, arr2, meta2 = get(d, BOB, bob_dir, homes[BOB])
    # his zeros are not a DICOM: a decode error; never alice's pixels
    assert r2.returncode != 0 or not np.array_equal(arr2.reshape(-1),
                                                    secrets[0].reshape(-1).astype(arr2.dtype))
    assert 'decode' in (r2.stderr + r2.stdout).lower(), r2.stderr
    assert_nothing_of(secrets, r1.stdout, r1.stderr, r2.stdout, r2.stderr, arr2, meta2)
    assert d.stop()[0] == 0
    rows = snapshot_blobs(d)
    alice_sha = sha(open(alice_file, 'rb').read())
    bob_rows = [b for owner, pid, b in rows if owner == BOB]
    assert bob_rows == [sha(bytes(st.st_size))]
    assert [b for owner, pid, b in rows if owner == ALICE] == [alice_sha]


# (b) --------------------------------------------------------------------------------------

@pytest.mark.parametrize('how', ['symlink', 'symlink-dir', 'dotdot', 'absolute'])
def test_naming_alices_file_is_refused(world, how):
    d, homes = world
    os.chmod(homes[ALICE], 0o711)  # traversable: only the file's own mode protects it
    alice_dir = os.path.join(homes[ALICE], 'ds')
    alice_file = make_folder(alice_dir, ALICE)
    os.chmod(alice_dir, 0o711)
    os.chmod(os.path.join(alice_dir, 'images'), 0o711)
    secrets = alice_secrets(alice_file)
    assert prefetch(d, ALICE, alice_dir)[0].returncode == 0  # stored in the cache

    bob_dir = os.path.join(homes[BOB], 'ds')
    make_folder(bob_dir, BOB, image_bytes=b'bob')
    spec = json.load(open(os.path.join(bob_dir, 'dataset.json')))
    if how == 'symlink':
        os.symlink(alice_file, os.path.join(bob_dir, 'images', 'alice.dcm'))
        spec['resources'][0]['file'] = 'images/alice.dcm'
    elif how == 'symlink-dir':
        os.symlink(os.path.join(alice_dir, 'images'), os.path.join(bob_dir, 'hers'))
        spec['resources'][0]['file'] = 'hers/x.dcm'
    elif how == 'dotdot':
        spec['resources'][0]['file'] = os.path.relpath(alice_file, bob_dir)
        assert spec['resources'][0]['file'].startswith('../')
    else:
        spec['resources'][0]['file'] = alice_file
    json.dump(spec, open(os.path.join(bob_dir, 'dataset.json'), 'w'))
    r1, f1 = prefetch(d, BOB, bob_dir)
    assert r1.returncode != 0
    said = r1.stdout + r1.stderr
    assert ('outside the dataset folder' in said or 'symbolic link' in said), said
    r2, arr2, meta2 = get(d, BOB, bob_dir, homes[BOB])
    assert r2.returncode != 0 and arr2 is None
    assert_nothing_of(secrets, r1.stdout, r1.stderr, r2.stdout, r2.stderr, meta2)
    assert d.stop()[0] == 0
    alice_sha = sha(open(alice_file, 'rb').read())
    assert all(b != alice_sha for owner, _, b in snapshot_blobs(d) if owner != ALICE)


# (c) --------------------------------------------------------------------------------------

RAW_CLIENT = r'''
import array, os, socket, struct, sys
sys.path.insert(0, sys.argv[1])
import wire
sock_path, folder, fifo = sys.argv[2:5]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sock_path)
sock.sendall(wire.hello())
wire.recv_frame_fds(sock)
jfd = os.open(os.path.join(folder, 'dataset.json'), os.O_RDONLY)
payload = struct.pack('<II', 2, 0) + wire.s(folder) + wire.s('') + wire.s('') + wire.s('')
sock.sendmsg([wire.frame(16, payload, rid=7, nfds=1)],
             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', [jfd]))])
while True:
    op, fl, rid, payload, fds = wire.recv_frame_fds(sock)
    if op == 21:  # LOCAL_NEED: answer every path with the FIFO itself
        first, n = struct.unpack_from('<II', payload)
        f = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        body = struct.pack('<II', first, n) + struct.pack('<i', 0) * n
        sock.sendmsg([wire.frame(22, body, rid=7, nfds=n)],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', [f] * n))])
        continue
    if op == 4 or (op == 16 and not fl & wire.FLAG_MORE):
        print('END', op, payload.decode(errors='replace'))
        break
'''


OPEN_CLIENT = r'''
import array, os, socket, struct, sys, time
sys.path.insert(0, sys.argv[1])
import wire
sock_path, folder = sys.argv[2:4]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sock_path)
sock.sendall(wire.hello())
wire.recv_frame_fds(sock)
t0 = time.monotonic()
jfd = os.open(os.path.join(folder, 'dataset.json'), os.O_RDONLY | os.O_NOFOLLOW)
payload = struct.pack('<III', 2, 0, 0) + wire.s(folder) + wire.s('') * 3 + struct.pack('<Q', 8 << 20)
sock.sendmsg([wire.frame(32, payload, rid=9, nfds=1)],
             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', [jfd]))])
while True:
    op, fl, rid, payload, fds = wire.recv_frame_fds(sock)
    if op == 21:
        r = wire.Reader(payload)
        first, n = r.u32(), r.u32()
        fs = [os.open(os.path.join(folder, r.str()), os.O_RDONLY | os.O_NOFOLLOW |
                      os.O_NONBLOCK) for _ in range(n)]
        body = struct.pack('<II', first, n) + struct.pack('<i', 0) * n
        sock.sendmsg([wire.frame(22, body, rid=9, nfds=n)],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', fs))])
        continue
    print('OPEN', op, 'took %.3f' % (time.monotonic() - t0))
    break
'''


def test_fifo_folders_block_nobody(world):
    d, homes = world
    alice_dir = os.path.join(homes[ALICE], 'ds')
    make_folder(alice_dir, ALICE)
    script = os.path.join(homes[BOB], 'raw.py')
    with open(script, 'w') as f:
        f.write(RAW_CLIENT)
    os.chmod(script, 0o644)
    shutil.copy(os.path.join(HERE, 'wire.py'), os.path.join(homes[BOB], 'wire.py'))
    os.chmod(os.path.join(homes[BOB], 'wire.py'), 0o644)
    procs = []
    for i in range(4):
        bob_dir = os.path.join(homes[BOB], 'fifo%d' % i)
        make_folder(bob_dir, BOB, image_bytes=b'')
        fifo = os.path.join(bob_dir, 'images', 'x.dcm')
        os.unlink(fifo)
        os.mkfifo(fifo)
        os.chown(fifo, BOB, BOB)
        # the library's client (it refuses the FIFO itself) and a hostile one that
        # passes the FIFO's descriptor to the daemon anyway, for every path
        for argv in ([DMCACHE, '--socket', d.socket, 'prefetch', '--json', '--source', bob_dir],
                     [DMCACHE, '--socket', d.socket, 'get', '--source', bob_dir, '0', '-o',
                      os.path.join(homes[BOB], 'o%d.npy' % i)],
                     [sys.executable, script, homes[BOB], d.socket, bob_dir, fifo]):
            procs.append(uids.popen(BOB, argv, env=d.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True))
    time.sleep(0.3)  # let bob's requests reach the daemon first: the attack's setup
    # alice's OPEN, timed from the request to its reply (her process start is not counted;
    # a small arena: populating a large one is the same cost for every source)
    script = os.path.join(homes[ALICE], 'open.py')
    with open(script, 'w') as f:
        f.write(OPEN_CLIENT)
    shutil.copy(os.path.join(HERE, 'wire.py'), os.path.join(homes[ALICE], 'wire.py'))
    for n in ('open.py', 'wire.py'):
        os.chown(os.path.join(homes[ALICE], n), ALICE, ALICE)
    r = uids.run(ALICE, [sys.executable, script, homes[ALICE], d.socket, alice_dir],
                 env=d.env, timeout=30)
    assert r.stdout.startswith('OPEN 32 '), r.stdout + r.stderr  # the reply, not an error
    took = float(r.stdout.split()[-1])
    assert took < 1.0, 'alice waited %.2f s' % took
    r, arr, meta = get(d, ALICE, alice_dir, homes[ALICE])
    assert r.returncode == 0 and arr is not None, r.stderr
    for p in procs:
        out, err = p.communicate(timeout=20)  # every one ends: none hangs
        said = out + err
        assert p.returncode != 0 or 'END 16' in said or 'END 4' in said, said
        # prefetches say why; a GET says that the item failed (the OPEN was listed first)
        assert 'not a regular file' in said or 'item 0: ' in said and 'failed' in said, said


# (d) --------------------------------------------------------------------------------------

def test_home_0700_and_group_shared_tree(world, tmpdir_short):
    d, homes = world
    alice_dir = os.path.join(homes[ALICE], 'ds')
    alice_file = make_folder(alice_dir, ALICE)
    px = pydicom.dcmread(alice_file).pixel_array
    r, arr, meta = get(d, ALICE, alice_dir, homes[ALICE])
    assert r.returncode == 0, r.stderr
    assert np.array_equal(arr.reshape(-1), px.reshape(-1).astype(arr.dtype))

    # a shared tree of root's, 0750 with alice's group: alice reads it, bob may not
    shared = os.path.join(tmpdir_short, 'shared')
    os.makedirs(shared)
    os.chmod(shared, 0o755)
    tree = os.path.join(shared, 'ds')
    f = make_folder(tree, 0, gid=ALICE, image_mode=0o640)
    for r_, dirs, names in os.walk(tree):
        os.chmod(r_, 0o750)
        for n in names:
            os.chmod(os.path.join(r_, n), 0o640)
    assert os.stat(f).st_uid == 0 and os.stat(f).st_gid == ALICE
    r, arr, meta = get(d, ALICE, tree, homes[ALICE], gid=ALICE)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(arr.reshape(-1), px.reshape(-1).astype(arr.dtype))
    r, f2 = prefetch(d, ALICE, tree, gid=ALICE)
    assert r.returncode == 0 and f2['items_done'] == 1, r.stdout + r.stderr
    # bob is not in the group: his client cannot open it, and he gets nothing of it
    r, arr, meta = get(d, BOB, tree, homes[BOB])
    assert r.returncode != 0 and arr is None
    assert 'Permission denied' in r.stderr, r.stderr


# (e) --------------------------------------------------------------------------------------

def test_changed_in_place_with_mtime_restored_is_read_again(world):
    d, homes = world
    alice_dir = os.path.join(homes[ALICE], 'ds')
    path = make_folder(alice_dir, ALICE)
    st = os.stat(path)
    # the inode shortcut is recorded only for files not changed in the last 100 ms
    time.sleep(0.2)
    r, f = prefetch(d, ALICE, alice_dir)
    assert r.returncode == 0 and f['bytes_done'] == st.st_size, r.stdout
    r, f = prefetch(d, ALICE, alice_dir)
    assert f['items_cached'] == 1 and f['bytes_done'] == 0, f  # the shortcut at work
    r, before, _ = get(d, ALICE, alice_dir, homes[ALICE])
    assert r.returncode == 0

    # the owner rewrites pixels in place: same size, mtime put back (ctime moves)
    data = bytearray(open(path, 'rb').read())
    for i in range(len(data) - 4096, len(data), 2):
        data[i] ^= 0x5a
    new_file = os.path.join(homes[ALICE], 'new.bin')
    with open(new_file, 'wb') as fh:
        fh.write(data)
    os.chown(new_file, ALICE, ALICE)
    r = uids.run(ALICE, [sys.executable, '-c',
                         'import sys; open(sys.argv[1], "r+b").write(open(sys.argv[2], "rb")'
                         '.read())', path, new_file])
    assert r.returncode == 0, r.stderr
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    st2 = os.stat(path)
    assert st2.st_size == st.st_size and st2.st_mtime_ns == st.st_mtime_ns
    assert st2.st_ctime_ns != st.st_ctime_ns
    r, f = prefetch(d, ALICE, alice_dir)
    assert r.returncode == 0 and f['items_cached'] == 0 and f['bytes_done'] == st.st_size, f
    r, after, _ = get(d, ALICE, alice_dir, homes[ALICE])
    assert r.returncode == 0, r.stderr
    new_px = pydicom.dcmread(path).pixel_array
    assert not np.array_equal(after, before)
    assert np.array_equal(after.reshape(-1), new_px.reshape(-1).astype(after.dtype))
    assert d.stop()[0] == 0
    assert [b for owner, _, b in snapshot_blobs(d) if owner == ALICE] == \
        [sha(bytes(data))]


# the descriptor channel itself ---------------------------------------------------------------

def held(pid, path):
    """How many descriptors of process `pid` are open on `path`."""
    n = 0
    for fd in os.listdir('/proc/%d/fd' % pid):
        try:
            n += os.readlink('/proc/%d/fd/%s' % (pid, fd)) == path
        except OSError:
            pass
    return n


def test_descriptor_frames_are_checked(world):
    """Frames that announce descriptors they lack close the connection; descriptors nobody
    asked for are closed, not kept; a local request without dataset.json's is refused."""
    import array
    import struct
    sys.path.insert(0, HERE)
    import wire
    d, homes = world
    folder = os.path.join(homes[BOB], 'ds')
    make_folder(folder, BOB, image_bytes=b'bob')

    def connect():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(d.socket)
        s.settimeout(10)
        s.sendall(wire.hello())
        wire.recv_frame_fds(s)
        return s

    def rights(fds):
        return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', fds))]

    # nfds announced, none passed: a protocol error, the connection closes
    s = connect()
    s.sendall(wire.frame(wire.OP_PING, struct.pack('<Q', 1), rid=2, nfds=3))
    assert s.recv(16) == b''
    s.close()
    # descriptors with a PING, and a LOCAL_FILES no job asked for: closed, answered
    s = connect()
    f = os.open(os.path.join(folder, 'dataset.json'), os.O_RDONLY)
    s.sendmsg([wire.frame(wire.OP_PING, struct.pack('<Q', 2), rid=3, nfds=1)], rights([f]))
    op, fl, rid, payload, _ = wire.recv_frame_fds(s)
    assert (op, rid) == (wire.OP_PING, 3)
    body = struct.pack('<II', 0, 253) + struct.pack('<i', 0) * 253
    s.sendmsg([wire.frame(22, body, rid=77, nfds=253)], rights([f] * 253))
    s.sendall(wire.ping(4, rid=4))
    op, fl, rid, payload, _ = wire.recv_frame_fds(s)
    assert (op, rid) == (wire.OP_PING, 4)
    # a local PREFETCH without dataset.json's descriptor: refused with the reason
    payload = struct.pack('<II', 2, 0) + wire.s(folder) + wire.s('') * 3
    s.sendall(wire.frame(16, payload, rid=5))
    op, fl, rid, payload, _ = wire.recv_frame_fds(s)
    assert op == wire.OP_ERROR and rid == 5
    assert b'descriptor' in payload
    # LOCAL_FILES answering another window than asked: the job fails, nothing is read
    payload = struct.pack('<II', 2, 0) + wire.s(folder) + wire.s('') * 3
    s.sendmsg([wire.frame(16, payload, rid=6, nfds=1)], rights([f]))
    while True:
        op, fl, rid, payload, _ = wire.recv_frame_fds(s)
        if op == 21:
            s.sendmsg([wire.frame(22, struct.pack('<IIi', 5, 1, 0), rid=6, nfds=1)],
                      rights([f]))
            continue
        if not fl & wire.FLAG_MORE:
            break
    assert op in (16, wire.OP_ERROR) and b'not asked for' in payload, payload
    os.close(f)
    s.close()
    # every descriptor passed (254 of dataset.json) is closed, none kept
    mine = os.path.join(folder, 'dataset.json')
    deadline = time.monotonic() + 5
    while held(d.proc.pid, mine) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held(d.proc.pid, mine) == 0
