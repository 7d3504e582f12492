#!/usr/bin/python3
"""Prefetch benchmark (docs/benchmarks.md T4): cold prefetch against curl and the Datamint
client's download path, all from one emulator, in one run.

    /usr/bin/python3 tests/bench/bench_prefetch.py --build build [--reps 3]
    ninja -C build bench-prefetch

Not a test: it prints figures and ratios measured in the same run (docs/benchmarks.md). What runs:

  large  16 files of 64 MiB (CT-like 16-bit noise, zstd-1 shrinks it ~1.4x, or
         --content random), a corpus-like directory the emulator serves with sendfile(2)
         and a Repr-Digest the daemon verifies.
  small  10,000 synthetic items of 4 KiB (computed by the emulator per request).

For each, interleaved, --reps times (the order rotates every repetition):

  curl            curl --parallel --parallel-max 16 -K urls (apikey header), each body to
                  a file of its own in a temp dir on the same file system as the cache
  curl+fsync      the same, then fsync(2) of every file and of the directory, timed: the
                  durability dmcached gives each blob (large files only)
  dmcached        a fresh daemon, empty cache in that temp dir, `dmcache prefetch --json`
                  from start to the final event (listing the project included)
  client-approx   an APPROXIMATION of the Datamint Python client's download path (v1.9 /
                  HEAD: at most 20 requests at once, a new connection each, the whole body
                  read into memory, then written to a file): urllib in 20 threads
  dmcached-tmpfs  with --diag-tmpfs: the daemon with its cache on /dev/shm, where fsync
                  costs nothing; it tells the disk's share from the daemon's own
  dmcached-base   with --baseline-dmcached EXE: another dmcached binary (a build from
                  before a change) run the same way, so that a change is measured against
                  its baseline under the same load

The figures are medians over the repetitions; ratios are medians of the per-repetition
ratios (both sides of a ratio ran in the same repetition, seconds apart). Every
measurement starts after a sync(2), so one run's write-back does not land in the next.
--perf DIR records the daemon (perf record -g) during one extra large and small run.

--tier adds the cluster tier's rows, one run each on the large project, against a throwaway
Ceph RADOS Gateway (tests/tier/ceph.sh; its memstore holds 768 MiB: use --large-size 8M):
node A's cold prefetch from the emulator (which uploads to the tier, in the background)
against node B's cold prefetch of the same project from the tier; and one node's
`prefetch --to-tier` pre-warm against two nodes' `--to-tier --shard R/2` at once, each
timed until the tier holds every item (the uploads drained); and node B's cold prefetch
against `curl --parallel` reading the same blob objects from the tier (T8).
"""
import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.dirname(os.path.dirname(HERE))
KEY = 'dmc-key-all'
ADMIN_KEY = 'dmc-admin-key'
MiB = 1 << 20
CURL_PARALLEL = 16
CLIENT_PARALLEL = 20    # the Datamint client's download semaphore
LARGE_MAX = 64 << 30    # refuse to fill the disk by a typo
TIMEOUT = 1800


def parse_size(s):
    mult = {'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30}
    s = s.strip().upper()
    if s and s[-1] in mult:
        return int(s[:-1]) * mult[s[-1]]
    return int(s)


def cpu_of(pid):
    """utime + stime of a process in seconds, and per thread: {comm: seconds}."""
    tick = os.sysconf('SC_CLK_TCK')
    with open('/proc/%d/stat' % pid) as f:
        st = f.read()
    fields = st[st.rindex(')') + 2:].split()
    # the process's own line also counts the threads that have exited
    total, threads = (int(fields[11]) + int(fields[12])) / tick, {}
    for tid in os.listdir('/proc/%d/task' % pid):
        try:
            with open('/proc/%d/task/%s/stat' % (pid, tid)) as f:
                st = f.read()
        except OSError:
            continue
        comm = st[st.index('(') + 1:st.rindex(')')]
        fields = st[st.rindex(')') + 2:].split()
        sec = (int(fields[11]) + int(fields[12])) / tick
        key = 'loop' if int(tid) == pid else comm
        threads[key] = threads.get(key, 0.0) + sec
    return total, threads


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def fsync_tree(d):
    for name in os.listdir(d):
        fd = os.open(os.path.join(d, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the large-file corpus

def make_corpus(top, count, size, content):
    """A corpus directory the emulator loads (projects/<name>/project.json + files)."""
    pdir = os.path.join(top, 'projects', 'bench-large')
    os.makedirs(os.path.join(pdir, 'files'))
    with open(os.path.join(top, 'keys.json'), 'w') as f:
        json.dump({'admin_key': ADMIN_KEY,
                   'keys': [{'key': KEY, 'user': 'alice@example.org', 'projects': '*'}]}, f)
    rng = None
    if content == 'ct':
        import numpy
        rng = numpy.random.default_rng(4)
    resources = []
    for i in range(count):
        name = 'ct-%03d.raw' % i
        with open(os.path.join(pdir, 'files', name), 'wb') as f:
            left = size
            while left:
                n = min(left, 16 * MiB)
                if rng is not None:
                    # 16-bit CT-like values: soft tissue around 40 HU with noise
                    v = rng.normal(40.0, 300.0, n // 2).clip(-1024, 3071).astype('<i2')
                    data = v.tobytes() + (b'\0' if n % 2 else b'')
                else:
                    data = os.urandom(n)
                f.write(data)
                left -= n
        resources.append({'id': str(uuid.uuid5(uuid.NAMESPACE_URL, 'dmc-bench/%d' % i)),
                          'file': 'files/' + name, 'filename': name,
                          'mimetype': 'application/octet-stream', 'modality': 'CT',
                          'channel': 'bench', 'tags': ['bench'], 'status': 'published',
                          'created_at': '2025-03-01T00:%02d:%02d.000Z' % (i // 60, i % 60),
                          'size': size})
    with open(os.path.join(pdir, 'project.json'), 'w') as f:
        json.dump({'name': 'bench-large', 'created_at': '2025-03-01T00:00:00.000Z',
                   'created_by': 'alice@example.org', 'description': 'prefetch benchmark',
                   'resources': resources}, f)


# ---------------------------------------------------------------- the contenders

def run_curl(urls, out, with_fsync):
    os.makedirs(out)
    cfg = os.path.join(out + '.curlrc')
    with open(cfg, 'w') as f:
        for i, u in enumerate(urls):
            f.write('url = "%s"\noutput = "%s/%06d"\n' % (u, out, i))
    cmd = ['curl', '--parallel', '--parallel-max', str(CURL_PARALLEL), '-s', '-S', '--fail',
           '-H', 'apikey: ' + KEY, '-K', cfg]
    c0 = children_cpu()
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    t_curl = time.monotonic() - t0
    cpu = children_cpu() - c0
    if r.returncode != 0:
        raise RuntimeError('curl failed (%d): %s' % (r.returncode, r.stderr[-500:]))
    t_sync = None
    if with_fsync:
        t1 = time.monotonic()
        fsync_tree(out)
        t_sync = time.monotonic() - t1
    total = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
    return {'seconds': t_curl, 'sync_seconds': t_sync, 'bytes': total, 'cpu': cpu}


def run_client_approx(urls, out):
    """The client's download path, approximated (see the module docstring)."""
    os.makedirs(out)

    def one(i_url):
        i, url = i_url
        req = urllib.request.Request(url, headers={'apikey': KEY,
                                                   'accept': 'application/octet-stream'})
        with urllib.request.urlopen(req, timeout=600) as r:
            data = r.read()
        with open(os.path.join(out, '%06d.tmp' % i), 'wb') as f:
            f.write(data)
        os.rename(os.path.join(out, '%06d.tmp' % i), os.path.join(out, '%06d' % i))
        return len(data)

    c0 = time.process_time()
    t0 = time.monotonic()
    with ThreadPoolExecutor(CLIENT_PARALLEL) as ex:
        total = sum(ex.map(one, enumerate(urls)))
    return {'seconds': time.monotonic() - t0, 'bytes': total,
            'cpu': time.process_time() - c0}


def run_daemon(Daemon, dmcache, emu, project, n, nbytes, parent, perf=None, exe=None):
    top = tempfile.mkdtemp(prefix='d-', dir=parent)
    import conftest
    default_exe = conftest.DMCACHED
    conftest.DMCACHED = exe or default_exe  # Daemon starts conftest.DMCACHED
    try:
        d = Daemon(top)
    finally:
        conftest.DMCACHED = default_exe
    rec = None
    try:
        cpu0, _ = cpu_of(d.proc.pid)
        if perf:
            rec = subprocess.Popen(['perf', 'record', '-g', '-q', '-o', perf, '-p',
                                    str(d.proc.pid)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            time.sleep(0.5)  # perf attaches asynchronously
        env = dict(d.env, DATAMINT_API_KEY=KEY)
        env.pop('DATAMINT_API_URL', None)
        t0 = time.monotonic()
        r = subprocess.run([dmcache, '--socket', d.socket, 'prefetch', '--json', '--server',
                            emu.url, project], env=env, capture_output=True, text=True,
                           timeout=TIMEOUT)
        seconds = time.monotonic() - t0
        cpu1, threads = cpu_of(d.proc.pid)
        rss = 0
        with open('/proc/%d/status' % d.proc.pid) as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    rss = int(line.split()[1])
    finally:
        if rec is not None:
            rec.send_signal(2)
            rec.wait()
        rc, _ = d.stop()
        d.notify.close()
    events = [json.loads(x) for x in r.stdout.splitlines() if x.startswith('{')]
    final = [e for e in events if 'state' in e]
    if r.returncode != 0 or rc != 0 or not final or final[-1]['state'] != 'done' or \
            final[-1]['items_done'] != n or final[-1]['bytes_done'] != nbytes:
        raise RuntimeError('prefetch of %s failed (cli %d, daemon %s): %s\n%s\n%s'
                           % (project, r.returncode, rc, final[-1] if final else None,
                              r.stderr[-1000:], d.log()[-2000:]))
    stored = 0
    for dirpath, _, files in os.walk(os.path.join(d.cache, 'objects')):
        stored += sum(os.path.getsize(os.path.join(dirpath, x)) for x in files)
    shutil.rmtree(top, ignore_errors=True)
    return {'seconds': seconds, 'bytes': nbytes, 'cpu': cpu1 - cpu0, 'threads': threads,
            'stored': stored, 'hwm_kib': rss}


# ---------------------------------------------------------------- the cluster tier

def curl_tier(env, prefix, parent):
    """(seconds, bytes) of curl --parallel reading every blob under PREFIX/blobs/ from the
    tier, signed with curl's own SigV4 (the baseline of T8)."""
    base = '%s/%s' % (env['TIER_ENDPOINT'], env['TIER_BUCKET'])
    sign = ['--aws-sigv4', 'aws:amz:%s:s3' % env['TIER_REGION'], '--user',
            '%s:%s' % (env['TIER_ACCESS_KEY'], env['TIER_SECRET_KEY']), '-H',
            'x-amz-content-sha256: UNSIGNED-PAYLOAD']
    listing = subprocess.run(['curl', '-sS', '--fail'] + sign +
                             ['%s?list-type=2&prefix=%s' % (base, urllib.parse.quote(
                                 prefix + '/blobs/', safe=''))],
                             capture_output=True, text=True, timeout=60).stdout
    keys = re.findall(r'<Key>([^<]+)</Key>', listing)
    if not keys or '<IsTruncated>true' in listing:
        raise RuntimeError('tier listing: %d keys (one page expected)' % len(keys))
    out = tempfile.mkdtemp(prefix='curl-tier-', dir=parent)
    cfg = os.path.join(out, 'curlrc')
    with open(cfg, 'w') as f:
        for i, k in enumerate(keys):
            f.write('url = "%s/%s"\noutput = "%s/%d"\n' % (base, k, out, i))
    t0 = time.monotonic()
    r = subprocess.run(['curl', '--parallel', '--parallel-max', str(CURL_PARALLEL), '-sS',
                        '--fail'] + sign + ['-K', cfg], capture_output=True, text=True,
                       timeout=TIMEOUT)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError('curl from the tier failed: %s' % r.stderr[-500:])
    total = sum(os.path.getsize(os.path.join(out, str(i))) for i in range(len(keys)))
    shutil.rmtree(out)
    return dt, total


def run_tier(Daemon, dmcache, emu, project, n, nbytes, parent):
    """The tier rows (see the module's docstring): [(label, value, unit)]."""
    ceph_dir = os.path.join(parent, 'ceph')
    ceph_sh = os.path.join(SOURCE, 'tests', 'tier', 'ceph.sh')
    r = subprocess.run(['bash', ceph_sh, 'start', ceph_dir, 'dmc-bench'], capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError('ceph.sh start failed:\n' + r.stdout + r.stderr)
    env = dict(line.split('=', 1) for line in open(os.path.join(ceph_dir, 'env')).read().split()
               if '=' in line)
    nodes = []

    def node(prefix):
        top = tempfile.mkdtemp(prefix='t-', dir=parent)
        cred = os.path.join(top, 'cred')
        with open(cred, 'w') as f:
            f.write('aws_access_key_id = %s\naws_secret_access_key = %s\n'
                    % (env['TIER_ACCESS_KEY'], env['TIER_SECRET_KEY']))
        os.chmod(cred, 0o600)
        conf = os.path.join(top, 'dmcached.conf')
        with open(conf, 'w') as f:
            f.write('tier_url = %s/%s\ntier_region = %s\ntier_prefix = %s\n'
                    'tier_credentials_file = %s\n' % (env['TIER_ENDPOINT'], env['TIER_BUCKET'],
                                                      env['TIER_REGION'], prefix, cred))
        d = Daemon(top, args=['--config', conf])
        nodes.append(d)
        return d

    def start(d, *args):
        e = dict(d.env, DATAMINT_API_KEY=KEY)
        e.pop('DATAMINT_API_URL', None)
        return subprocess.Popen([dmcache, '--socket', d.socket, 'prefetch', '--json',
                                 '--server', emu.url] + list(args) + [project], env=e,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(p):
        out, err = p.communicate(timeout=TIMEOUT)
        final = [json.loads(x) for x in out.splitlines() if x.startswith('{') and '"state"' in x]
        if p.returncode != 0 or not final or final[-1]['state'] != 'done':
            raise RuntimeError('tier prefetch failed: %s %s' % (out[-500:], err[-500:]))
        return final[-1]

    def tier_figure(d, name):
        out = subprocess.run([dmcache, '--socket', d.socket, 'metrics'], capture_output=True,
                             text=True, timeout=30).stdout
        for line in out.splitlines():
            if line.startswith('dmcache_tier_%s ' % name):
                return float(line.split()[1])
        raise RuntimeError('no dmcache_tier_%s' % name)

    def drained(ds):
        while any(tier_figure(d, 'uploads_pending') for d in ds):
            time.sleep(0.05)

    try:
        a, b = node('bench-ab'), node('bench-ab')
        os.sync()
        t0 = time.monotonic()
        finish(start(a))
        t_a = time.monotonic() - t0
        drained([a])
        os.sync()
        t0 = time.monotonic()
        finish(start(b))
        t_b = time.monotonic() - t0
        if tier_figure(b, 'hits_total') != n:
            raise RuntimeError('node B did not read every item from the tier')
        t_curl, curl_bytes = curl_tier(env, 'bench-ab', parent)
        one = node('bench-one')
        os.sync()
        t0 = time.monotonic()
        finish(start(one, '--to-tier'))
        drained([one])
        t_one = time.monotonic() - t0
        two = [node('bench-two'), node('bench-two')]
        os.sync()
        t0 = time.monotonic()
        procs = [start(d, '--to-tier', '--shard', '%d/2' % i) for i, d in enumerate(two)]
        for p in procs:
            finish(p)
        drained(two)
        t_two = time.monotonic() - t0
    finally:
        for d in nodes:
            d.stop()
            d.notify.close()
        subprocess.run(['bash', ceph_sh, 'stop', ceph_dir], capture_output=True, timeout=300)
    mb = nbytes / 1e6
    return [
        ('node A cold prefetch from the emulator (uploads not included)', fmt(mb / t_a), 'MB/s'),
        ('node B cold prefetch from the tier', fmt(mb / t_b), 'MB/s'),
        ('**ratio node B (tier) / node A (emulator)**', '%.2f' % (t_a / t_b), ''),
        ('curl --parallel-max %d of the same blobs from the tier (%d bytes)'
         % (CURL_PARALLEL, curl_bytes), fmt(curl_bytes / 1e6 / t_curl), 'MB/s'),
        ('**ratio node B / curl from the tier** (T8: >= 0.9)',
         '%.2f' % ((mb / t_b) / (curl_bytes / 1e6 / t_curl)), ''),
        ('one node --to-tier pre-warm, until the tier holds it all', '%.2f' % t_one, 's'),
        ('two nodes --to-tier --shard R/2 at once, same', '%.2f' % t_two, 's'),
        ('**ratio one node / two nodes (pre-warm time)**', '%.2f' % (t_one / t_two), ''),
    ]


# ---------------------------------------------------------------- reporting

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, digits=0):
    if x is None:
        return '-'
    return '{:,.{}f}'.format(x, digits)


def machine_facts(work):
    model = ''
    with open('/proc/cpuinfo') as f:
        for line in f:
            if line.startswith('model name'):
                model = line.split(':', 1)[1].strip()
                break
    mem = 0
    with open('/proc/meminfo') as f:
        for line in f:
            if line.startswith('MemTotal:'):
                mem = int(line.split()[1]) // 1024
    fs = subprocess.run(['stat', '-f', '-c', '%T', work], capture_output=True,
                        text=True).stdout.strip()
    curl = subprocess.run(['curl', '--version'], capture_output=True,
                          text=True).stdout.split('\n')[0]
    return {'cpus': os.cpu_count(), 'model': model, 'mem_mib': mem,
            'kernel': platform.release(), 'work_fs': fs, 'curl': ' '.join(curl.split()[:2]),
            'python': platform.python_version()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--build', default=os.path.join(SOURCE, 'build'),
                    help='meson build dir with dmcached, dmcache and the corpus')
    ap.add_argument('--reps', type=int, default=3)
    ap.add_argument('--large-count', type=int, default=16)
    ap.add_argument('--large-size', default='64M')
    ap.add_argument('--content', choices=('ct', 'random'), default='ct')
    ap.add_argument('--small-count', type=int, default=10000)
    ap.add_argument('--small-size', default='4K')
    ap.add_argument('--work-dir', default=None,
                    help='where outputs and caches go (default: a temp dir in $TMPDIR)')
    ap.add_argument('--diag-tmpfs', action='store_true',
                    help='also run the daemon with its cache on /dev/shm')
    ap.add_argument('--perf', metavar='DIR', help='perf record one large and one small run')
    ap.add_argument('--baseline-dmcached', metavar='EXE',
                    help='also run this dmcached binary (e.g. a build before a change)')
    ap.add_argument('--json', metavar='FILE', help='write every figure as JSON')
    ap.add_argument('--tier', action='store_true',
                    help='also the cluster tier rows (starts tests/tier/ceph.sh)')
    args = ap.parse_args()

    large_size = parse_size(args.large_size)
    small_size = parse_size(args.small_size)
    if not 1 <= args.reps <= 20:
        ap.error('--reps: 1 to 20')
    if not (1 <= args.large_count <= 10000 and 1 <= large_size
            and args.large_count * large_size <= LARGE_MAX):
        ap.error('large files: at most %d GiB in all' % (LARGE_MAX >> 30))
    if not (1 <= args.small_count <= 10 ** 6 and 32 <= small_size <= MiB):
        ap.error('small items: 1 to 10^6 of 32 B to 1 MiB')

    build = os.path.abspath(args.build)
    os.environ['DMC_BUILD_ROOT'] = build
    sys.path.insert(0, os.path.join(SOURCE, 'tests', 'emulator'))
    sys.path.insert(0, os.path.join(SOURCE, 'tests', 'integration'))
    import client as emulator
    from conftest import DMCACHE, DMCACHED, Daemon
    for exe in (DMCACHED, DMCACHE):
        if not os.access(exe, os.X_OK):
            sys.exit('%s missing: ninja -C %s' % (exe, build))
    if 'libasan' in subprocess.run(['ldd', DMCACHED], capture_output=True, text=True).stdout:
        print('warning: %s is built with AddressSanitizer; figures are not meaningful'
              % DMCACHED, file=sys.stderr)

    tier_rows = None
    work = tempfile.mkdtemp(prefix='dmc-bench-', dir=args.work_dir)
    facts = machine_facts(work)
    facts['load_start'] = os.getloadavg()
    results = {}
    try:
        corpus = os.path.join(work, 'corpus')
        t0 = time.monotonic()
        make_corpus(corpus, args.large_count, large_size, args.content)
        print('corpus: %d x %s of %s content in %.1f s' % (args.large_count, args.large_size,
                                                           args.content,
                                                           time.monotonic() - t0),
              file=sys.stderr)
        emu = emulator.Emulator(corpus=corpus, synthetic=['bench-small:%d:%d' % (
            args.small_count, small_size)])
        emu.start()
        try:
            large_ids = [r['id'] for r in emu.get('/projects/%s/resources' %
                                                  emu.project('bench-large')['id']).json()]
            small_ids = [r['id'] for r in emu.get('/projects/%s/resources' %
                                                  emu.project('bench-small')['id']).json()]
            assert len(large_ids) == args.large_count and len(small_ids) == args.small_count
            large_urls = ['%s/resources/%s/file' % (emu.url, i) for i in large_ids]
            small_urls = ['%s/resources/%s/file' % (emu.url, i) for i in small_ids]
            large_bytes = args.large_count * large_size
            small_bytes = args.small_count * small_size

            # warm-up, not measured: the emulator hashes each corpus file on its first
            # request (ETag, Repr-Digest) and the files enter the page cache
            subprocess.run(['curl', '-s', '--parallel', '-H', 'apikey: ' + KEY] +
                           sum((['-o', '/dev/null', u] for u in large_urls), []), check=True,
                           capture_output=True)

            tmpfs = None
            if args.diag_tmpfs:
                tmpfs = tempfile.mkdtemp(prefix='dmc-bench-', dir='/dev/shm')

            runs = [
                ('large', 'curl', lambda out: run_curl(large_urls, out, True)),
                ('large', 'dmcached', lambda out: run_daemon(
                    Daemon, DMCACHE, emu, 'bench-large', args.large_count, large_bytes, work)),
                ('large', 'client-approx', lambda out: run_client_approx(large_urls, out)),
                ('small', 'curl', lambda out: run_curl(small_urls, out, False)),
                ('small', 'dmcached', lambda out: run_daemon(
                    Daemon, DMCACHE, emu, 'bench-small', args.small_count, small_bytes, work)),
                ('small', 'client-approx', lambda out: run_client_approx(small_urls, out)),
            ]
            base = args.baseline_dmcached and os.path.abspath(args.baseline_dmcached)
            if base:
                runs += [
                    ('large', 'dmcached-base', lambda out: run_daemon(
                        Daemon, DMCACHE, emu, 'bench-large', args.large_count, large_bytes, work,
                        exe=base)),
                    ('small', 'dmcached-base', lambda out: run_daemon(
                        Daemon, DMCACHE, emu, 'bench-small', args.small_count, small_bytes, work,
                        exe=base)),
                ]
            if tmpfs:
                runs += [
                    ('large', 'dmcached-tmpfs', lambda out: run_daemon(
                        Daemon, DMCACHE, emu, 'bench-large', args.large_count, large_bytes,
                        tmpfs)),
                    ('small', 'dmcached-tmpfs', lambda out: run_daemon(
                        Daemon, DMCACHE, emu, 'bench-small', args.small_count, small_bytes,
                        tmpfs)),
                ]
            for rep in range(args.reps):
                k = rep % len(runs)
                for kind, who, fn in runs[k:] + runs[:k]:
                    out = os.path.join(work, 'out-%s-%s-%d' % (kind, who, rep))
                    os.sync()
                    emu_cpu0, _ = cpu_of(emu.pid)
                    r = fn(out)
                    r['emulator_cpu'] = cpu_of(emu.pid)[0] - emu_cpu0
                    shutil.rmtree(out, ignore_errors=True)
                    if os.path.exists(out + '.curlrc'):
                        os.unlink(out + '.curlrc')
                    results.setdefault((kind, who), []).append(r)
                    print('rep %d %-5s %-14s %7.2f s%s  cpu %.1f s, emulator cpu %.1f s'
                          % (rep + 1, kind, who, r['seconds'],
                             ' + fsync %.2f s' % r['sync_seconds']
                             if r.get('sync_seconds') is not None else '',
                             r['cpu'], r['emulator_cpu']), file=sys.stderr)

            if args.perf:
                os.makedirs(args.perf, exist_ok=True)
                for kind, project, n, nb in (('large', 'bench-large', args.large_count,
                                              large_bytes),
                                             ('small', 'bench-small', args.small_count,
                                              small_bytes)):
                    os.sync()
                    data = os.path.join(os.path.abspath(args.perf), 'perf-%s.data' % kind)
                    run_daemon(Daemon, DMCACHE, emu, project, n, nb, work, perf=data)
                    print('perf: %s' % data, file=sys.stderr)
            if tmpfs:
                shutil.rmtree(tmpfs, ignore_errors=True)
            if args.tier:
                tier_rows = run_tier(Daemon, DMCACHE, emu, 'bench-large', args.large_count,
                                     large_bytes, work)
        finally:
            emu.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    facts['load_end'] = os.getloadavg()
    report(args, facts, results, large_size, small_size)
    if tier_rows:
        print('\n| cluster tier (one run, %d x %s) | value | unit |' % (args.large_count,
                                                                   args.large_size))
        print('|---|---:|---|')
        for label, value, unit in tier_rows:
            print('| %s | %s | %s |' % (label, value, unit))


def report(args, facts, results, large_size, small_size):
    def mbps(r):
        return r['bytes'] / r['seconds'] / 1e6

    def mbps_sync(r):
        return r['bytes'] / (r['seconds'] + r['sync_seconds']) / 1e6

    def ips(r):
        return args.small_count / r['seconds']

    def per_rep(kind, who, f):
        return [f(r) for r in results.get((kind, who), [])]

    def ratios(kind, a, b, fa, fb):
        xa, xb = per_rep(kind, a, fa), per_rep(kind, b, fb)
        return [x / y for x, y in zip(xa, xb)]

    rows = []

    def row(label, values, digits=0, unit=''):
        rows.append((label, [fmt(v, digits) for v in values], fmt(med(values), digits), unit))

    L = 'large (%d x %s)' % (args.large_count, args.large_size)
    S = 'small (%d x %s)' % (args.small_count, args.small_size)
    row('%s curl --parallel-max %d' % (L, CURL_PARALLEL), per_rep('large', 'curl', mbps),
        0, 'MB/s')
    row('%s curl, then fsync every file' % L, per_rep('large', 'curl', mbps_sync), 0, 'MB/s')
    row('%s dmcached cold prefetch' % L, per_rep('large', 'dmcached', mbps), 0, 'MB/s')
    if ('large', 'dmcached-tmpfs') in results:
        row('%s dmcached, cache on tmpfs (diagnostic)' % L,
            per_rep('large', 'dmcached-tmpfs', mbps), 0, 'MB/s')
    if ('large', 'dmcached-base') in results:
        row('%s dmcached, baseline binary' % L, per_rep('large', 'dmcached-base', mbps), 0,
            'MB/s')
    row('%s Datamint client (approximation)' % L, per_rep('large', 'client-approx', mbps),
        0, 'MB/s')
    row('**ratio dmcached / curl** (T4: >= 0.9)',
        ratios('large', 'dmcached', 'curl', mbps, mbps), 2)
    row('ratio dmcached / (curl + fsync)', ratios('large', 'dmcached', 'curl', mbps,
                                                    mbps_sync), 2)
    row('**ratio dmcached / client approximation** (T4: >= 5)',
        ratios('large', 'dmcached', 'client-approx', mbps, mbps), 2)
    if ('large', 'dmcached-base') in results:
        row('ratio dmcached / baseline binary, large',
            ratios('large', 'dmcached', 'dmcached-base', mbps, mbps), 2)
    row('%s curl --parallel-max %d' % (S, CURL_PARALLEL), per_rep('small', 'curl', ips), 0,
        'items/s')
    row('%s dmcached cold prefetch' % S, per_rep('small', 'dmcached', ips), 0, 'items/s')
    if ('small', 'dmcached-tmpfs') in results:
        row('%s dmcached, cache on tmpfs (diagnostic)' % S,
            per_rep('small', 'dmcached-tmpfs', ips), 0, 'items/s')
    if ('small', 'dmcached-base') in results:
        row('%s dmcached, baseline binary' % S, per_rep('small', 'dmcached-base', ips), 0,
            'items/s')
    row('%s Datamint client (approximation)' % S, per_rep('small', 'client-approx', ips), 0,
        'items/s')
    row('ratio dmcached / curl, small', ratios('small', 'dmcached', 'curl', ips, ips), 2)
    row('ratio dmcached / client approximation, small',
        ratios('small', 'dmcached', 'client-approx', ips, ips), 2)
    if ('small', 'dmcached-base') in results:
        row('ratio dmcached / baseline binary, small',
            ratios('small', 'dmcached', 'dmcached-base', ips, ips), 2)
    for kind in ('large', 'small'):
        for who in ('curl', 'dmcached', 'dmcached-base', 'dmcached-tmpfs', 'client-approx'):
            if (kind, who) in results:
                row('%s: CPU seconds of %s (emulator)' % (kind, who),
                    per_rep(kind, who, lambda r: r['cpu']), 1,
                    's (emulator %s s)' % fmt(med(per_rep(kind, who,
                                                          lambda r: r['emulator_cpu'])), 1))

    n = args.reps
    print('| measurement | %s | median | unit |' % ' | '.join('run %d' % (i + 1)
                                                          for i in range(n)))
    print('|---|%s---:|---|' % ('---:|' * n))
    for label, vals, m, unit in rows:
        vals = (vals + ['-'] * n)[:n]
        print('| %s | %s | %s | %s |' % (label, ' | '.join(vals), m, unit))
    d = results.get(('large', 'dmcached'), [])
    if d:
        threads = {}
        for r in d:
            for k, v in r['threads'].items():
                threads.setdefault(k, []).append(v)
        print('\ndmcached, large: CPU seconds per thread (median): %s; stored %s bytes '
              '(%.2fx smaller); peak RSS %s KiB' % (
                  ', '.join('%s %.2f' % (k, med(v)) for k, v in sorted(threads.items())),
                  fmt(med([r['stored'] for r in d])),
                  med([r['bytes'] / r['stored'] for r in d]), fmt(med([r['hwm_kib'] for r in d]))))
    print('\nmachine: %(cpus)d x %(model)s, %(mem_mib)d MiB, Linux %(kernel)s, work dir on '
          '%(work_fs)s, %(curl)s, Python %(python)s' % facts)
    print('load average at start %s, at end %s (other work on the machine adds noise)'
          % tuple(' '.join('%.1f' % x for x in facts[k]) for k in ('load_start', 'load_end')))
    print('command: /usr/bin/python3 tests/bench/bench_prefetch.py %s'
          % ' '.join(sys.argv[1:]))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'facts': facts, 'args': vars(args),
                       'results': {'%s/%s' % k: v for k, v in results.items()}}, f, indent=1)


if __name__ == '__main__':
    main()
