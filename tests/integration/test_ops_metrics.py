"""`dmcache metrics`: the Prometheus text format checked by Prometheus's own promtool, and
scraped through Debian's prometheus-node-exporter from its textfile collector, the way the
installed dmcache-metrics.timer publishes it.

The daemon is real and has a real snapshot (prefetched from the emulator over HTTP), so
the per-snapshot series have something to say. A user who is not an admin gets only
their own figures: no labels naming snapshots or uids, no cache-wide totals. The latency
histograms (OPEN, GET, decode time by format and codec) are checked against the requests
the test made and the codecs of the corpus's files, read with pydicom.
"""
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import json

import pytest

import uids
from conftest import BUILD, DMCACHE, Daemon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'emulator'))
import client as emulator  # noqa: E402

NODE_EXPORTER = shutil.which('prometheus-node-exporter')
PROMTOOL = shutil.which('promtool')
SYN = 'syn:6:4096'
HISTOGRAMS = ('dmcache_serve_open_seconds', 'dmcache_serve_get_seconds',
              'dmcache_decode_seconds')


def need(tool, name):
    if tool is None:
        if os.environ.get('CI') == 'true':
            pytest.fail('%s is missing (scripts/install-deps.sh installs it)' % name)
        pytest.skip('no %s' % name)


@pytest.fixture(scope='module')
def emu():
    e = emulator.Emulator(synthetic=[SYN])
    e.start()
    yield e
    assert e.stop() == 0


@pytest.fixture
def daemon(tmpdir_short, emu):
    d = Daemon(tmpdir_short, args=['-o', 'servers=' + emu.url])
    env = dict(d.env, DATAMINT_API_KEY=emulator.KEY_ALL, DATAMINT_API_URL=emu.url,
               HOME=tmpdir_short)
    r = subprocess.run([DMCACHE, '--socket', d.socket, 'prefetch', 'syn'], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    yield d
    rc, _ = d.stop()
    d.notify.close()
    assert rc == 0, 'dmcached exited with %r:\n%s' % (rc, d.log())


def promtool_check(text):
    need(PROMTOOL, 'promtool (Debian package prometheus)')
    r = subprocess.run([PROMTOOL, 'check', 'metrics'], input=text, capture_output=True,
                       text=True, timeout=60)
    # exit 0 and no lint remark (promtool prints them and exits 3 when it has any)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), \
        r.stdout + r.stderr
    return r


def samples(text):
    """{series: value} of the exposition, and the TYPE of each family."""
    series, types, helps = {}, {}, set()
    for line in text.splitlines():
        if line.startswith('# TYPE '):
            _, _, name, kind = line.split(' ', 3)
            types[name] = kind
        elif line.startswith('# HELP '):
            helps.add(line.split(' ', 3)[2])
        elif line and not line.startswith('#'):
            key, value = line.rsplit(' ', 1)
            series[key] = float(value)
    return series, types, helps


def test_admin_metrics_pass_promtool_with_types_and_snapshot_labels(daemon):
    r = daemon.cli('metrics', check=True)
    promtool_check(r.stdout)
    series, types, helps = samples(r.stdout)
    for key in series:
        family = key.split('{')[0]
        for suffix in ('_bucket', '_sum', '_count'):
            if family.endswith(suffix) and family[:-len(suffix)] in HISTOGRAMS:
                family = family[:-len(suffix)]
        assert family in types and family in helps, family
        if types[family] == 'histogram':
            continue
        if types[family] == 'counter':
            assert family.endswith('_total'), family
        else:
            assert not family.endswith('_total'), family
    assert series['dmcache_up'] == 1
    assert series['dmcache_caller_is_admin'] == 1
    assert types['dmcache_prefetch_items_downloaded_total'] == 'counter'
    assert series['dmcache_prefetch_items_downloaded_total'] == 6
    assert types['dmcache_cache_bytes'] == 'gauge' and series['dmcache_cache_bytes'] > 0
    # as many series as STATUS has counters (all but caller_uid), plus up, info, uptime, admin
    status = daemon.cli('status', '--json', check=True).stdout
    counters = [k for k in json.loads(status)['counters'] if not k.startswith('histogram/')]
    plain = [k for k in series if '{' not in k and not k.startswith(HISTOGRAMS)]
    assert len(plain) == len(counters) - 1 + 3
    snap = [k for k in series if k.startswith('dmcache_snapshot_items_stored{')]
    assert len(snap) == 1 and 'project="syn"' in snap[0] and 'uid="0"' in snap[0]
    assert 'source="datamint"' in snap[0], snap[0]
    assert series[snap[0]] == 6
    assert series['dmcache_uid_snapshots{uid="0"}'] == 1


# DICOM transfer syntaxes and the decoder's codec names (daemon/decode.h), independently
DICOM_CODECS = {
    '1.2.840.10008.1.2': 'raw', '1.2.840.10008.1.2.1': 'raw', '1.2.840.10008.1.2.2': 'raw',
    '1.2.840.10008.1.2.1.99': 'deflate', '1.2.840.10008.1.2.5': 'rle',
    '1.2.840.10008.1.2.4.50': 'jpeg', '1.2.840.10008.1.2.4.57': 'jpeg-lossless',
    '1.2.840.10008.1.2.4.70': 'jpeg-lossless', '1.2.840.10008.1.2.4.80': 'jpeg-ls',
    '1.2.840.10008.1.2.4.81': 'jpeg-ls', '1.2.840.10008.1.2.4.90': 'jpeg-2000',
    '1.2.840.10008.1.2.4.91': 'jpeg-2000',
}


def format_codec(path):
    name = path.lower()
    if name.endswith('.dcm'):
        import pydicom
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uid = str(ds.file_meta.TransferSyntaxUID)
        if uid == '1.2.840.10008.1.2.4.51':
            return 'dicom', 'jpeg' if int(ds.BitsStored) <= 8 else 'jpeg-extended'
        return 'dicom', DICOM_CODECS[uid]
    if name.endswith(('.jpg', '.jpeg')):
        return 'jpeg', 'jpeg'
    if name.endswith('.png'):
        return 'png', 'png'
    if name.endswith('.nii.gz'):
        return 'nifti', 'nifti-gz'
    assert name.endswith('.nii'), path
    return 'nifti', 'nifti'


def labels_of(key):
    """{label: value} of a series key (no escapes in these tests' values)."""
    if '{' not in key:
        return {}
    inner = key[key.index('{') + 1:key.rindex('}')]
    return dict((kv.split('=', 1)[0], kv.split('=', 1)[1].strip('"'))
                for kv in inner.split(','))


def histograms(text, family):
    """{frozenset(labels without le): (sorted [(le, value)], sum, count)} of one family."""
    series, types, _ = samples(text)
    assert types[family] == 'histogram', family
    out = {}
    for key, value in series.items():
        name = key.split('{')[0]
        if name not in (family + '_bucket', family + '_sum', family + '_count'):
            continue
        labels = labels_of(key)
        le = labels.pop('le', None)
        k = frozenset(labels.items())
        h = out.setdefault(k, ([], None, None))
        if name == family + '_bucket':
            h[0].append((float(le), value))
        elif name == family + '_sum':
            out[k] = (h[0], value, h[2])
        elif name == family + '_count':
            out[k] = (h[0], h[1], value)
    for k, (buckets, total, count) in out.items():
        buckets.sort()
        assert buckets and total is not None and count is not None, (family, k)
    return out


def test_latency_histograms_count_the_requests_and_codecs(daemon, emu, tmp_path):
    files = os.path.join(emu.corpus, 'projects', 'sample', 'files')
    n = len(os.listdir(files))
    metas = []
    env = dict(daemon.env, DATAMINT_API_KEY=emulator.KEY_ALL, DATAMINT_API_URL=emu.url)
    for i in range(n):  # one OPEN and one GET each
        out = str(tmp_path / ('i%d.npy' % i))
        r = subprocess.run([DMCACHE, '--socket', daemon.socket, 'get', 'sample', str(i),
                            '-o', out], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        metas.append(json.load(open(out[:-4] + '.json')))
    text = daemon.cli('metrics', check=True).stdout
    promtool_check(text)
    for family, want in (('dmcache_serve_open_seconds', n), ('dmcache_serve_get_seconds', n)):
        h = histograms(text, family)
        assert list(h) == [frozenset()], (family, list(h))
        buckets, total, count = h[frozenset()]
        assert count == want, (family, count)
        assert total > 0
        values = [v for _, v in buckets]
        assert values == sorted(values) and buckets[-1] == (float('inf'), count), buckets
        assert len(buckets) >= 18 and buckets[0][0] == 0.00005, buckets
    # decode times: one label set per (format, codec) of the items decoded, as the files say
    expected = {format_codec(os.path.join(files, m['resource']['filename'])) for m in metas}
    h = histograms(text, 'dmcache_decode_seconds')
    got = {(dict(k)['format'], dict(k)['codec']) for k in h}
    assert got == expected, (got, expected)
    assert {'dicom', 'jpeg', 'png', 'nifti'} <= {f for f, _ in got}
    counters = json.loads(daemon.cli('status', '--json', check=True).stdout)['counters']
    for buckets, total, count in h.values():
        values = [v for _, v in buckets]
        assert values == sorted(values) and buckets[-1] == (float('inf'), count)
        assert count >= 1 and total > 0
    assert sum(c for _, _, c in h.values()) == counters['serve_items_decoded_total']
    assert counters['serve_items_decoded_total'] >= len(expected)
    # the same figures in STATUS, which the histograms are made of
    assert counters['histogram/serve_open_seconds/-/count'] == n
    assert counters['histogram/serve_get_seconds/-/count'] == n


def test_non_admin_sees_only_their_own_figures(daemon):
    uids.require_root()
    uids.open_up(daemon.dir, os.path.dirname(daemon.socket))
    r = uids.run(uids.ALICE, [DMCACHE, '--socket', daemon.socket, 'metrics'])
    assert r.returncode == 0, r.stderr
    promtool_check(r.stdout)
    series, _, _ = samples(r.stdout)
    assert series['dmcache_caller_is_admin'] == 0
    assert series['dmcache_user_snapshots'] == 0  # alice holds no grant for root's syn
    assert not any('project=' in k or 'uid=' in k for k in series), r.stdout
    for other in ('dmcache_cache_bytes', 'dmcache_connections', 'dmcache_serve_items_total',
                  'dmcache_prefetch_items_downloaded_total', 'dmcache_users_connected'):
        assert other not in series
    assert 'syn' not in r.stdout


def free_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


def scrape(url, timeout=20):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as f:
                return f.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def unit_command(tmpdir, textdir):
    """The installed service's ExecStart, pointed at this build and a test directory."""
    with open(os.path.join(BUILD, 'systemd', 'dmcache-metrics.service')) as f:
        unit = f.read()
    line = [l for l in unit.splitlines() if l.startswith('ExecStart=')][0]
    argv = shlex.split(line[len('ExecStart='):])
    assert argv[0].endswith('/bin/dmcache') and argv[1:3] == ['metrics', '--output']
    assert argv[3] == '/var/lib/prometheus/node-exporter/dmcache.prom'
    return [DMCACHE] + argv[1:3] + [os.path.join(textdir, 'dmcache.prom')]


def test_node_exporter_textfile_collector_serves_the_series(daemon, tmpdir_short):
    need(NODE_EXPORTER, 'prometheus-node-exporter')
    textdir = os.path.join(tmpdir_short, 'textfile')
    os.mkdir(textdir)
    argv = unit_command(tmpdir_short, textdir)
    env = dict(daemon.env, DMCACHE_SOCKET=daemon.socket)
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert os.listdir(textdir) == ['dmcache.prom']  # no temporary file left
    assert os.stat(os.path.join(textdir, 'dmcache.prom')).st_mode & 0o777 == 0o644
    port = free_port()
    log = open(os.path.join(tmpdir_short, 'node-exporter.log'), 'wb')
    ne = subprocess.Popen([NODE_EXPORTER, '--web.listen-address=127.0.0.1:%d' % port,
                           '--collector.disable-defaults', '--collector.textfile',
                           '--collector.textfile.directory=' + textdir],
                          stdout=log, stderr=log)
    try:
        url = 'http://127.0.0.1:%d/metrics' % port
        text = scrape(url)
        series, types, _ = samples(text)
        assert series.get('node_textfile_scrape_error') == 0, text
        assert series['dmcache_up'] == 1
        assert types['dmcache_prefetch_items_downloaded_total'] == 'counter'
        assert series['dmcache_prefetch_items_downloaded_total'] == 6
        assert any(k.startswith('dmcache_snapshot_bytes{') and 'project="syn"' in k
                   for k in series)
        # the daemon goes away: the next run says so, and the exporter serves that
        daemon.stop()
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 3, r.stderr
        series, _, _ = samples(scrape(url))
        assert series['dmcache_up'] == 0
        assert not any(k.startswith('dmcache_cache_bytes') for k in series)
        assert series.get('node_textfile_scrape_error') == 0
    finally:
        ne.terminate()
        ne.wait(10)
        log.close()


@pytest.mark.skipif(shutil.which('systemd-analyze') is None, reason='no systemd-analyze')
def test_metrics_units_verify(tmpdir_short):
    with open(os.path.join(BUILD, 'systemd', 'dmcache-metrics.service')) as f:
        unit = re.sub(r'/\S*/bin/dmcache\b', DMCACHE, f.read())
    with open(os.path.join(tmpdir_short, 'dmcache-metrics.service'), 'w') as f:
        f.write(unit)
    shutil.copy(os.path.join(os.environ['DMC_SOURCE_ROOT'], 'systemd',
                             'dmcache-metrics.timer'), tmpdir_short)
    r = subprocess.run(['systemd-analyze', 'verify', '--man=no',
                        os.path.join(tmpdir_short, 'dmcache-metrics.timer'),
                        os.path.join(tmpdir_short, 'dmcache-metrics.service')],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
