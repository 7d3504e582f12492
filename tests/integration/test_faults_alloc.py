"""Allocation failure in the whole daemon (docs/reliability.md O3 b and c).

(b) The daemon runs with tests/tools/failmalloc.so preloaded; once it is ready and has
served a baseline, SIGUSR1 makes 1 % of its malloc/calloc/realloc calls fail (SIGUSR2 ends
it) while clients prefetch, read and ask for status. Pass: the daemon never dies of a
signal; every item it serves meanwhile is byte-identical to the baseline (an error is
allowed, wrong bytes are not); with the failures off again it serves everything correctly
without a restart; and after a restart without the preload the cache verifies (I1-I3),
serves the same bytes and the interrupted prefetch completes.

(c) The same workload in the sanitizer build, whose allocator returns NULL instead of
aborting (`allocator_may_return_null=1`) for every allocation over 1 MiB
(`max_allocation_size_mb=1`): large buffers (downloads, decoded tensors) cannot be had.
Same pass criteria.

A preloaded shim cannot run under the sanitizers' runtime: (b) runs in the plain build,
(c) in the sanitizer build (tests/integration/meson.build selects).
"""
import os
import random
import signal
import struct
import subprocess

from conftest import Daemon
from test_faults_read import KEY, Session, baseline, prefetch

OPEN_OFFLINE = 8  # proto.h DMC_OPEN_OFFLINE
ROUNDS = int(os.environ.get('DMC_ALLOC_ROUNDS', '40'))
# what a client sees of a daemon that could not allocate: an ERROR frame where a reply
# was expected, a closed connection, a short frame
FAILURES = (AssertionError, OSError, EOFError, ValueError, struct.error)


def shim():
    return os.path.join(os.environ['DMC_BUILD_ROOT'], 'tests', 'tools', 'failmalloc.so')


def stacks(pid):
    """Every thread's stack of a daemon that hangs (gdb, when it is installed)."""
    try:
        r = subprocess.run(['gdb', '-p', str(pid), '-batch', '-ex', 'thread apply all bt'],
                           capture_output=True, text=True, timeout=60)
        return r.stdout[-6000:]
    except (OSError, subprocess.TimeoutExpired) as e:
        return 'no stacks: %s' % e


def sanitized():
    return os.environ.get('DMC_SANITIZED', '0') == '1'


def try_round(d, emu, want, rng, tally):
    """One client's work under failures: OPEN (online, or offline from the grant: no
    listing to parse), a GET of a random batch. Counts what happened; asserts only that no
    served item differs from the baseline."""
    try:
        s = Session(d, emu, flags=rng.choice((0, OPEN_OFFLINE)))
    except FAILURES as e:
        tally['open_failed'] += 1
        tally.setdefault('first_open_error', str(e)[:300])
        return
    try:
        batch = rng.sample(sorted(want), min(len(want), rng.randint(1, 8)))
        got = s.get(batch)
        for k, (st, v) in got.items():
            if st == 0:
                assert v == want[k], 'item %d served with other bytes under ENOMEM' % k
                tally['served'] += 1
            else:
                tally['item_errors'] += 1
                tally.setdefault('first_item_error', '%s: %s' % (st, str(v)[:300]))
    except FAILURES as e:
        if 'other bytes' in str(e):
            raise
        tally['get_failed'] += 1
    finally:
        try:
            s.close()
        except OSError:
            pass


def mixed_work(d, emu, rng, tally, want):
    """Reads, status and a prefetch of another project, ROUNDS rounds."""
    env = dict(d.env)
    env.pop('DATAMINT_API_URL', None)
    env.pop('LD_PRELOAD', None)
    pf = subprocess.Popen([os.path.join(os.environ['DMC_BUILD_ROOT'], 'client', 'dmcache'),
                           '--socket', d.socket, 'prefetch', '--json', '--server', emu.url,
                           'formats'], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    for _ in range(ROUNDS):
        if d.proc.poll() is not None:
            break
        try_round(d, emu, want, rng, tally)
        try:
            if d.cli('status', '--json').returncode != 0:
                tally['status_failed'] += 1
        except subprocess.TimeoutExpired:
            raise AssertionError('the daemon stopped answering:\n' + stacks(d.proc.pid))
    pf.communicate(timeout=300)
    if pf.returncode != 0:
        tally['prefetch_failed'] += 1
    return pf.returncode


def after_restart(d, emu, want):
    """A restart with a normal allocator: I1-I3, the same bytes, the interrupted work
    completes."""
    d.env.pop('LD_PRELOAD', None)
    d.env.pop('ASAN_OPTIONS', None)
    d.env.update(ASAN_OPTIONS=os.environ.get('ASAN_OPTIONS', ''))
    d.start()
    try:
        r = d.cli('verify')
        assert r.returncode == 0, r.stdout + r.stderr + d.log()[-3000:]
        s = Session(d, emu)
        assert baseline(s, s.open['items']) == want
        s.close()
        prefetch(d, emu, 'formats')
    finally:
        assert d.stop()[0] == 0, d.log()[-3000:]


def test_daemon_under_allocation_failure(emu, tmpdir_short):
    """O3 (b) in the plain build: 1 % of the daemon's allocations fail for ROUNDS rounds
    of mixed work; (c) in the sanitizer build: every allocation over 1 MiB fails."""
    d = Daemon(tmpdir_short, args=['-o', 'min_free=0', '-o', 'hot_max=0'], start=False)
    d.env.update(DATAMINT_API_KEY=KEY, DATAMINT_API_URL=emu.url)
    rng = random.Random(int(os.environ.get('DMC_ALLOC_SEED', '3')))
    tally = dict(open_failed=0, get_failed=0, item_errors=0, served=0, prefetch_failed=0,
                 status_failed=0)
    base = dict(d.env)
    if sanitized():
        mode = 'c: allocations over 1 MiB fail'
        d.env['ASAN_OPTIONS'] = (os.environ.get('ASAN_OPTIONS', '') +
                                 ':allocator_may_return_null=1:max_allocation_size_mb=1')
    else:
        mode = 'b: 1 % of allocations fail'
        assert os.path.exists(shim()), 'build tests/tools/failmalloc.so first'
        d.env.update(LD_PRELOAD=shim(), FAILMALLOC_PPM='10000',
                     FAILMALLOC_SEED=os.environ.get('DMC_ALLOC_SEED', '3'))
    # the baseline, from a daemon with a normal allocator
    d.env, limited = base, d.env
    d.start()
    try:
        prefetch(d, emu, 'sample')
        s = Session(d, emu)
        want = baseline(s, s.open['items'])
        s.close()
    finally:
        assert d.stop()[0] == 0, d.log()[-3000:]
    d.env = limited
    d.start()
    try:
        if not sanitized():
            d.proc.send_signal(signal.SIGUSR1)
        rc_pf = mixed_work(d, emu, rng, tally, want)
        alive = d.proc.poll() is None
        if alive and not sanitized():
            d.proc.send_signal(signal.SIGUSR2)
        print('O3(%s): %d rounds: %r; prefetch exit %d; daemon %s'
              % (mode, ROUNDS, tally, rc_pf,
                 'alive' if alive else 'exited %d' % d.proc.returncode))
        # never a death by signal (a crash, an abort); an orderly exit is allowed
        assert d.proc.returncode is None or d.proc.returncode >= 0, d.log()[-4000:]
        assert tally['served'] > 0, 'nothing was served: the test did not exercise reads'
        if alive and not sanitized():
            # the failures off: everything served again, without a restart
            s = Session(d, emu)
            assert baseline(s, s.open['items']) == want
            s.close()
        if alive:
            rc, _ = d.stop(timeout=20)
            assert rc == 0, d.log()[-4000:]
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
    after_restart(d, emu, want)
