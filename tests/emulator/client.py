"""Start, drive and stop the Datamint emulator from Python tests (stdlib only).

    import sys; sys.path.insert(0, os.path.join(SOURCE_ROOT, 'tests', 'emulator'))
    from client import Emulator, corpus_dir

    with Emulator(synthetic=['big:1000000']) as emu:
        r = emu.get('/projects', key='dmc-key-all')      # -> Response (status, headers, body)
        emu.add_fault(path='^/resources/[^/]+/file$', status=503, retry_after=2, times=1)
        emu.log()                                         # request log entries
        emu.stats()['peak_connections']

See tests/emulator/README.md for the command line, the admin API and the fault fields.
"""
import http.client
import json
import os
import select
import signal
import subprocess
import sys
import time
from urllib.parse import urlencode, urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
EMULATOR = os.path.join(HERE, 'emulator.py')
PYTHON = '/usr/bin/python3'
ADMIN_KEY = 'dmc-admin-key'
KEY_ALL = 'dmc-key-all'
KEY_SAMPLE = 'dmc-key-sample'
KEY_CT = 'dmc-key-ct'
KEY_NONE = 'dmc-key-none'


def corpus_dir():
    """The generated corpus: $DMC_CORPUS_DIR, else $DMC_BUILD_ROOT/tests/data/corpus."""
    d = os.environ.get('DMC_CORPUS_DIR')
    if not d:
        build = os.environ.get('DMC_BUILD_ROOT')
        if not build:
            raise RuntimeError('set DMC_CORPUS_DIR or DMC_BUILD_ROOT (meson test sets it)')
        d = os.path.join(build, 'tests', 'data', 'corpus')
    if not os.path.isfile(os.path.join(d, 'manifest.json')):
        raise RuntimeError('%s has no manifest.json: build the corpus target first' % d)
    return d


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers  # http.client.HTTPMessage, case-insensitive
        self.body = body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return '<Response %d %d bytes>' % (self.status, len(self.body))


def request(url, method='GET', path='/', key=None, headers=None, body=None, json_body=None,
            query=None, timeout=60, bearer=False, ssl_context=None):
    """One HTTP request on a fresh connection; returns a Response (never raises on 4xx/5xx).
    https URLs use ssl_context (default: the system trust store)."""
    u = urlsplit(url)
    if u.scheme == 'https':
        conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=timeout, context=ssl_context)
    else:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    h = dict(headers or {})
    if key is not None:
        if bearer:
            h['Authorization'] = 'Bearer ' + key
        else:
            h['apikey'] = key
    if json_body is not None:
        body = json.dumps(json_body).encode()
        h.setdefault('Content-Type', 'application/json')
    if query:
        path = path + ('&' if '?' in path else '?') + urlencode(query)
    try:
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        return Response(r.status, r.headers, data)
    finally:
        conn.close()


def multipart(fields, files):
    """fields {name: str}, files {name: (filename, content_type, bytes)} -> (body, ctype)."""
    boundary = 'dmcboundary%016x' % int(time.time() * 1e6)
    out = []
    for k, v in fields.items():
        out.append(('--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
                    % (boundary, k, v)).encode())
    for k, (fn, ct, data) in files.items():
        out.append(('--%s\r\nContent-Disposition: form-data; name="%s"; filename="%s"\r\n'
                    'Content-Type: %s\r\n\r\n' % (boundary, k, fn, ct)).encode() + data + b'\r\n')
    out.append(('--%s--\r\n' % boundary).encode())
    return b''.join(out), 'multipart/form-data; boundary=' + boundary


class Emulator:
    """The emulator as a subprocess on loopback, port 0. Attributes once started:
    url, redirect_url, admin_url, pid, admin_key, corpus."""

    def __init__(self, corpus=None, keys=None, synthetic=(), admin_key=None, faults=(),
                 redirect_host='127.0.0.2', extra_args=(), use_corpus=True, stderr=None):
        self.corpus = corpus if corpus or not use_corpus else corpus_dir()
        self.keys = keys
        self.synthetic = list(synthetic)
        self.admin_key = admin_key or ADMIN_KEY
        self.faults = list(faults)
        self.redirect_host = redirect_host
        self.extra_args = list(extra_args)
        self.stderr = stderr
        self.proc = None

    def command(self):
        cmd = [PYTHON, EMULATOR, '--port', '0', '--redirect-host', self.redirect_host,
               '--admin-key', self.admin_key]
        if self.corpus:
            cmd += ['--corpus', self.corpus]
        if self.keys:
            cmd += ['--keys', self.keys]
        for s in self.synthetic:
            cmd += ['--synthetic', s]
        for f in self.faults:
            cmd += ['--fault', json.dumps(f)]
        return cmd + self.extra_args

    def start(self, timeout=30):
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=self.stderr,
                                     stdin=subprocess.DEVNULL)
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b''
        if not line:
            self.stop()
            raise RuntimeError('emulator did not start (exit %s)' % self.proc.returncode)
        info = json.loads(line)
        self.url, self.redirect_url = info['url'], info['redirect_url']
        self.admin_url, self.pid = info['admin_url'], info['pid']
        return self

    def stop(self, timeout=10):
        """SIGTERM, wait; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- the API ----
    def request(self, method, path, key=KEY_ALL, **kw):
        return request(self.url, method, path, key=key, **kw)

    def get(self, path, key=KEY_ALL, **kw):
        return self.request('GET', path, key=key, **kw)

    def upload(self, filename, data, mimetype, key=KEY_ALL, **fields):
        """POST /resources as the client does (README: What the API does)."""
        f = {'source': 'api', 'source_filepath': filename, 'mimetype': mimetype}
        f.update({k: v for k, v in fields.items() if v is not None})
        body, ctype = multipart(f, {'resource': (filename, mimetype, data)})
        return self.request('POST', '/resources', key=key, body=body,
                            headers={'Content-Type': ctype})

    # ---- the admin API ----
    def admin(self, method, path, body=None, json_body=None):
        r = request(self.admin_url, method, '/_admin' + path, headers={'x-admin-key': self.admin_key},
                    body=body, json_body=json_body)
        if r.status >= 300:
            raise RuntimeError('admin %s %s: %d %s' % (method, path, r.status, r.body[:200]))
        return r.json()

    def info(self):
        return self.admin('GET', '/info')

    def project(self, name):
        """{'id', 'name', 'dataset_id', 'worklist_id', 'resource_count', ...} by name."""
        for p in self.info()['projects']:
            if p['name'] == name:
                return p
        raise KeyError(name)

    def add_fault(self, **rule):
        """Install a fault rule (faults.py); returns its id."""
        return self.admin('POST', '/faults', json_body=rule)['id']

    def remove_fault(self, rid):
        self.admin('DELETE', '/faults/%d' % rid)

    def clear_faults(self):
        self.admin('DELETE', '/faults')

    def list_faults(self):
        return self.admin('GET', '/faults')

    def log(self, since=0):
        return self.admin('GET', '/log?since=%d' % since)['entries']

    def clear_log(self):
        self.admin('DELETE', '/log')

    def stats(self):
        return self.admin('GET', '/stats')

    def wait_idle(self, timeout=5.0):
        """Wait until the server has seen every earlier connection close."""
        end = time.monotonic() + timeout
        while self.stats()['active_connections'] and time.monotonic() < end:
            time.sleep(0.02)
        return self.stats()['active_connections'] == 0

    def reset_stats(self):
        return self.admin('POST', '/stats/reset')

    def reset(self):
        """Clear faults, the request log and the connection peak."""
        self.admin('POST', '/reset')

    def mutate(self, resource_id):
        """Change a resource's bytes in place (new ETag); returns the new ETag."""
        return self.admin('POST', '/resources/%s/mutate' % resource_id)['etag']

    def set_content(self, resource_id, data):
        return self.admin('PUT', '/resources/%s/content' % resource_id, body=data)['etag']

    def add_synthetic(self, name, n, size=4096):
        return self.admin('POST', '/synthetic', json_body={'name': name, 'n': n, 'size': size})

    def touch(self, project_id):
        return self.admin('POST', '/projects/%s/touch' % project_id)['updated_at']


if __name__ == '__main__':
    # Handy for a shell: python3 client.py  -> runs an emulator on the corpus until Ctrl-C.
    with Emulator(synthetic=sys.argv[1:]) as emu:
        print(json.dumps({'url': emu.url, 'redirect_url': emu.redirect_url,
                          'admin_url': emu.admin_url}), flush=True)
        try:
            emu.proc.wait()
        except KeyboardInterrupt:
            pass
