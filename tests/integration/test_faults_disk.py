"""The cache file system turns read-only at run time (docs/reliability.md D5): the daemon serves
what it has, a store fails with a clear io error, it does not spin, and it recovers once
the file system is writable again. Root: a real tmpfs remounted `ro`.
"""
import os
import random
import subprocess
import time

import pytest

import wire

from conftest import DMCACHE, Daemon
from test_faults_read import (KEY, Session, baseline, blob_path, corrupt, item_blobs,
                              prefetch)


@pytest.fixture
def fs(tmpdir_short):
    """ext4 on a loop file, mounted with errors=remount-ro: a file system error (triggered
    through sysfs) turns it read-only at once, whatever files are open for writing, as a
    failing disk does. (`mount -o remount,ro` is refused with EBUSY while the daemon holds
    index.db open for writing, on tmpfs as on ext4.)"""
    if os.geteuid() != 0:
        pytest.skip('mounting needs root')
    img = os.path.join(tmpdir_short, 'fs.img')
    mnt = os.path.join(tmpdir_short, 'fs')
    os.mkdir(mnt, 0o700)
    with open(img, 'wb') as f:
        f.truncate(64 << 20)
    subprocess.run(['mkfs.ext4', '-q', '-F', img], check=True)
    subprocess.run(['mount', '-o', 'loop,errors=remount-ro', img, mnt], check=True)
    yield mnt, img
    subprocess.run(['umount', '-l', mnt], check=False)


def loop_device(mnt):
    return os.path.basename(subprocess.run(['findmnt', '-no', 'SOURCE', mnt], check=True,
                                           capture_output=True, text=True).stdout.strip())


def cpu_seconds(pid):
    with open('/proc/%d/stat' % pid) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def try_prefetch(d, emu, project):
    env = dict(d.env, DATAMINT_API_KEY=KEY)
    env.pop('DATAMINT_API_URL', None)
    return subprocess.run([DMCACHE, '--socket', d.socket, 'prefetch', '--json', '--server',
                           emu.url, project], env=env, capture_output=True, text=True,
                          timeout=120)


def test_read_only_cache_serves_fails_stores_and_recovers(emu, tmpdir_short, fs):
    """D5: the file system turns read-only under the running daemon: reads go on, a
    prefetch fails with io (EROFS), the daemon idles (CPU < 5 %), and once the file system
    is repaired and mounted again the daemon starts on it and stores again."""
    mnt, img = fs
    emu.clear_faults()
    cache = os.path.join(mnt, 'cache')
    d = Daemon(tmpdir_short, args=['--cache-dir', cache, '-o', 'hot_max=0', '-o',
                                   'min_free=0'])
    d.cache = cache
    d.env.update(DATAMINT_API_KEY=KEY, DATAMINT_API_URL=emu.url)
    try:
        prefetch(d, emu, 'sample')
        s = Session(d, emu)
        want = baseline(s, s.open['items'])

        # one blob damaged before: its fresh copy will have nowhere to go
        blobs = item_blobs(d, emu, s)
        victim = sorted(blobs)[0]
        corrupt(blob_path(d, blobs[victim]), 'flip_payload', None, random.Random(2))
        del want[victim]
        with open('/sys/fs/ext4/%s/trigger_fs_error' % loop_device(mnt), 'w') as f:
            f.write('1')
        time.sleep(0.5)
        with pytest.raises(OSError):
            open(os.path.join(mnt, 'probe'), 'w')
        # what is stored is served, byte for byte
        got = s.get(sorted(want))
        assert got == {k: (0, h) for k, h in want.items()}, d.log()[-3000:]
        # the damaged one is not served; its fresh copy cannot be stored: a clear error
        st, msg = s.get([victim])[victim]
        print('D5: damaged item on the read-only cache:', st, msg)
        # either the fresh fetch fails to store (io), or the quarantine's own index write
        # failed first, the snapshot still lists the damaged copy, and its second read
        # fails (integrity): never bytes
        assert (st == wire.E['io'] and 'fetching it again failed' in msg) or \
            (st == wire.E['integrity'] and 'damaged again' in msg), (st, msg)
        # a store fails with a clear io error naming the cause
        r = try_prefetch(d, emu, 'formats')
        out = r.stdout + r.stderr
        print('D5: prefetch on the read-only cache:', r.returncode, out[-600:])
        assert r.returncode != 0
        # the io code, and a message an operator can act on (not only SQLite's "disk I/O
        # error": the index write fails first)
        assert '"name":"io"' in out, out[-2000:]
        assert 'read-only' in out, out[-2000:]
        # said once in the log and in the unit's status (the health check runs every 5 s)
        assert d.notify.wait_for('STATUS=degraded: the cache file system is read-only', timeout=8), d.notify.messages
        assert 'is read-only: stored items are served' in d.log(), d.log()[-3000:]
        # idle while failing: no busy loop
        c0, t0 = cpu_seconds(d.proc.pid), time.monotonic()
        time.sleep(4)
        cpu = (cpu_seconds(d.proc.pid) - c0) / (time.monotonic() - t0)
        print('D5: CPU while read-only and idle: %.1f %%' % (100 * cpu))
        assert cpu < 0.05
        assert d.proc.poll() is None
        k = sorted(want)[0]
        assert s.get([k])[k] == (0, want[k])
        s.close()
    finally:
        rc, _ = d.stop()
    print('D5: daemon exit on the read-only cache:', rc)
    # repaired (the kernel wants it unmounted for that) and mounted again
    subprocess.run(['umount', mnt], check=True)
    subprocess.run(['e2fsck', '-fy', img], capture_output=True)
    subprocess.run(['mount', '-o', 'loop,errors=remount-ro', img, mnt], check=True)
    d.start()
    try:
        r = try_prefetch(d, emu, 'formats')
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr + d.log()[-3000:]
        s = Session(d, emu)
        k = sorted(want)[1]
        assert s.get([k])[k] == (0, want[k])
        s.close()
    finally:
        rc2, _ = d.stop()
    assert rc2 == 0, d.log()[-3000:]
