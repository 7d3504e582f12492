#!/usr/bin/python3
"""A Datamint REST API server emulator for dmcache's tests, benchmarks and demo.

    /usr/bin/python3 tests/emulator/emulator.py --corpus DIR [--keys FILE] [--port 0]
        [--synthetic NAME:N[:SIZE]]... [--admin-key K] [--redirect-host 127.0.0.2]
        [--fault JSON]... [--token-style sse|json] [--tls-cert F --tls-key F]
        [--state-dir DIR] [--ready-file F] [--verbose]

Once every listener is bound it prints ONE line of JSON on stdout and flushes it:
    {"url": "http://127.0.0.1:P", "redirect_url": "http://127.0.0.2:Q",
     "admin_url": "http://127.0.0.1:R", "pid": N}
SIGTERM or SIGINT stops it cleanly (exit status 0).

Behaviour follows the Datamint REST API as the public Datamint Python client calls it
(sections cited as §N: auth and errors §2,
endpoints (§3), the recommendations for an emulator (§7). Faults and the request log are
driven through the admin listener (tests/emulator/README.md, faults.py).
"""
import argparse
import collections
import base64
import hashlib
import json
import os
import signal
import socket
import ssl
import sys
import threading
import time
import traceback
import uuid
import zipfile
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, quote, urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from faults import FaultError, Faults  # noqa: E402
import store  # noqa: E402
from store import (NIFTI_MIME, BadRequest, Conflict, Content, LazyList, NotFound, Store,  # noqa: E402
                   has_lazy, iter_json, parse_bool)

MAX_BODY = 1 << 30
ZIP_MAX_ITEMS = 20000
CHUNK = 256 * 1024
REASONS = {400: 'Bad Request', 401: 'Unauthorized', 403: 'Forbidden', 404: 'Not Found',
           405: 'Method Not Allowed', 409: 'Conflict', 413: 'Payload Too Large',
           416: 'Range Not Satisfiable', 429: 'Too Many Requests',
           500: 'Internal Server Error', 501: 'Not Implemented', 502: 'Bad Gateway', 503: 'Service Unavailable',
           504: 'Gateway Timeout'}


class HTTPError(Exception):
    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


class Resp:
    """What a route answers. Exactly one of body (bytes), content (file), stream (str
    pieces, sent chunked) carries the payload."""

    def __init__(self, status=200, body=b'', ctype='application/json', headers=(),
                 content=None, start=0, end=None, stream=None):
        self.status = status
        self.body = body
        self.ctype = ctype
        self.headers = list(headers)
        self.content = content
        self.start = start
        self.end = end
        self.stream = stream


def json_resp(obj, status=200):
    """Every JSON response carries Content-Type: application/json (§2.3, §7.2)."""
    if has_lazy(obj):
        return Resp(status, stream=iter_json(obj))
    return Resp(status, json.dumps(obj).encode())


def error_body(status, message):
    # NestJS-like shape; clients read only the string `message` (§2.3, §7.2).
    return json.dumps({'statusCode': status, 'message': message,
                       'error': REASONS.get(status, 'Error')}).encode()


def parse_range(value, size):
    """One `bytes=` range -> (start, end) | 'unsatisfiable' | None (ignore the header)."""
    if not value.startswith('bytes=') or ',' in value:
        return None
    a, sep, b = value[6:].strip().partition('-')
    if not sep:
        return None
    try:
        if a == '':
            n = int(b)
            if n <= 0:
                return 'unsatisfiable'
            return max(0, size - n), size
        start = int(a)
        end = size if b == '' else min(size, int(b) + 1)
    except ValueError:
        return None
    if start < 0 or (b != '' and int(b) < start):
        return None
    if start >= size:
        return 'unsatisfiable'
    return start, end


def parse_multipart(body, ctype):
    """multipart/form-data -> (fields {name: str}, files {name: (filename, ctype, bytes)})."""
    boundary = None
    for part in ctype.split(';')[1:]:
        k, _, v = part.strip().partition('=')
        if k.lower() == 'boundary':
            boundary = v.strip('"')
    if not boundary:
        raise BadRequest('multipart body without boundary')
    delim = b'--' + boundary.encode()
    fields, files = {}, {}
    parts = body.split(delim)
    if len(parts) < 3:
        raise BadRequest('malformed multipart body')
    for raw in parts[1:]:
        if raw.startswith(b'--'):
            break
        if raw.startswith(b'\r\n'):
            raw = raw[2:]
        head, sep, data = raw.partition(b'\r\n\r\n')
        if not sep:
            raise BadRequest('malformed multipart part')
        if data.endswith(b'\r\n'):
            data = data[:-2]
        hdrs = {}
        for line in head.decode('utf-8', 'replace').split('\r\n'):
            k, _, v = line.partition(':')
            hdrs[k.strip().lower()] = v.strip()
        disp = hdrs.get('content-disposition', '')
        params = {}
        for item in disp.split(';')[1:]:
            k, _, v = item.strip().partition('=')
            params[k.lower()] = v.strip().strip('"')
        name = params.get('name')
        if name is None:
            continue
        if 'filename' in params:
            files[name] = (params['filename'], hdrs.get('content-type'), data)
        else:
            fields[name] = data.decode('utf-8', 'replace')
    return fields, files


def page_args(q):
    try:
        offset = int(q.get('offset') or 0)
        limit = q.get('limit')
        limit = None if limit in (None, '') else int(limit)
    except (TypeError, ValueError):
        raise BadRequest('offset and limit must be integers')
    if offset < 0 or (limit is not None and limit < 0):
        raise BadRequest('offset and limit must be >= 0')
    return offset, limit


def zip_ext(filename):
    low = filename.lower()
    if low.endswith('.nii.gz'):
        return '.nii.gz'
    return os.path.splitext(low)[1]


class App:
    """Shared state of all listeners."""

    def __init__(self, args):
        self.args = args
        self.store = Store(args.state_dir)
        self.faults = Faults()
        self.log_lock = threading.Lock()
        self.log_cv = threading.Condition(self.log_lock)
        self.unlogged = 0  # responses sent whose log entry is not appended yet
        self.log = collections.deque(maxlen=200000)
        self.log_seq = 0
        self.conn_lock = threading.Lock()
        self.active = collections.Counter()
        self.peak = collections.Counter()
        self.total_conns = collections.Counter()
        self.redirects = {}  # token -> (method, path, query, user key)
        self.urls = {}
        self.verbose = args.verbose

    def conn_change(self, role, delta):
        with self.conn_lock:
            self.active[role] += delta
            if delta > 0:
                self.total_conns[role] += 1
                if self.active[role] > self.peak[role]:
                    self.peak[role] = self.active[role]

    def stats(self):
        with self.conn_lock, self.log_lock:
            return {'active_connections': self.active['main'],
                    'peak_connections': self.peak['main'],
                    'total_connections': self.total_conns['main'],
                    'redirect': {'active_connections': self.active['redirect'],
                                 'peak_connections': self.peak['redirect'],
                                 'total_connections': self.total_conns['redirect']},
                    'requests': self.log_seq}

    def reset_stats(self):
        with self.conn_lock:
            for role in ('main', 'redirect'):
                self.peak[role] = self.active[role]
                self.total_conns[role] = 0

    def add_log(self, entry):
        with self.log_lock:
            self.log_seq += 1
            entry['seq'] = self.log_seq
            self.log.append(entry)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, addr, app, role, tls=None):
        self.app = app
        self.role = role
        self.tls = tls
        super().__init__(addr, Handler)

    def process_request_thread(self, request, client_address):
        self.app.conn_change(self.role, +1)
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.app.conn_change(self.role, -1)

    def get_request(self):
        sock, addr = self.socket.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request, client_address):
        if self.app.verbose:
            traceback.print_exc()


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    server_version = 'dmc-emulator/1'
    sys_version = ''
    timeout = 300

    def setup(self):
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            try:
                self.connection.do_handshake()
            except (ssl.SSLError, OSError):
                self.close_connection = True
                raise

    def log_message(self, fmt, *args):
        if self.server.app.verbose:
            sys.stderr.write('emulator: %s %s\n' % (self.address_string(), fmt % args))

    def do_GET(self):
        self.dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

    # ------------------------------------------------------------------ plumbing
    def read_body(self):
        te = (self.headers.get('Transfer-Encoding') or '').lower()
        if 'chunked' in te:
            out = bytearray()
            while True:
                line = self.rfile.readline(65537)
                n = int(line.split(b';')[0].strip() or b'0', 16)
                if n == 0:
                    while self.rfile.readline(65537) not in (b'\r\n', b'\n', b''):
                        pass
                    return bytes(out)
                if len(out) + n > MAX_BODY:
                    raise HTTPError(413, 'request body too large')
                out += self.rfile.read(n)
                self.rfile.readline(3)
        n = self.headers.get('Content-Length')
        if not n:
            return b''
        try:
            n = int(n)
        except ValueError:
            raise HTTPError(400, 'invalid Content-Length')
        if n < 0 or n > MAX_BODY:
            raise HTTPError(413, 'request body too large')
        data = self.rfile.read(n)
        if len(data) != n:
            self.close_connection = True
            raise HTTPError(400, 'request body shorter than Content-Length')
        return data

    def api_key(self):
        """`apikey` header, `Authorization: Bearer` as an alias (§2.1, §7.1)."""
        k = self.headers.get('apikey')
        if k:
            return k.strip(), 'apikey'
        auth = self.headers.get('Authorization') or ''
        if auth[:7].lower() == 'bearer ':
            return auth[7:].strip(), 'bearer'
        return None, None

    def dispatch(self):
        app = self.server.app
        role = self.server.role
        t0 = time.monotonic()
        self.unlogged = False
        self.sent = 0
        self.status = None
        self.rule = None
        self.served = None
        url = urlsplit(self.path)
        path, query = url.path, dict(parse_qsl(url.query, keep_blank_values=True))
        self.query_list = parse_qsl(url.query, keep_blank_values=True)
        keystr, how = self.api_key()
        key = app.store.auth(keystr)
        head = self.command == 'HEAD'
        try:
            body = self.read_body()
            if role == 'admin':
                return self.send(self.admin(path, query, body), head)
            rule = self.rule = app.faults.match(role, self.command, path, key.user if key else None)
            if rule is not None:
                if rule.get('latency_ms'):
                    time.sleep(rule.get('latency_ms') / 1000.0)
                if rule.get('close'):
                    self.close_connection = True
                    self.status = 0
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if rule.get('status'):
                    raise HTTPError(rule.get('status'), rule.get('message', 'injected fault'),
                                    self.retry_after_headers(rule))
                if rule.get('redirect') and role == 'main':
                    if key is None:
                        raise HTTPError(401, 'Unauthorized: missing or invalid API key')
                    token = uuid.uuid4().hex
                    app.redirects[token] = (self.command, path, query, self.query_list, key)
                    loc = '%s/_r/%s/%s' % (app.urls['redirect_url'], token,
                                           quote(path.rsplit('/', 2)[-2]))
                    return self.send(Resp(302, error_body(302, 'Found'),
                                          headers=[('Location', loc)]), head)
            if role == 'redirect':
                parts = path.split('/')
                if len(parts) < 3 or parts[1] != '_r' or parts[2] not in app.redirects:
                    raise NotFound('Cannot %s %s' % (self.command, path))
                # A pre-signed URL: the token stands for the identity, no key is needed.
                _, path, query, self.query_list, key = app.redirects[parts[2]]
            elif key is None:
                raise HTTPError(401, 'Unauthorized: missing or invalid API key')
            self.send(self.route(path, query, body, key), head)
        except HTTPError as e:
            self.send(Resp(e.status, error_body(e.status, e.message), headers=e.headers), head)
        except NotFound as e:
            self.send(Resp(404, error_body(404, str(e))), head)
        except BadRequest as e:
            self.send(Resp(400, error_body(400, str(e))), head)
        except Conflict as e:
            self.send(Resp(409, error_body(409, str(e))), head)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True
        except Exception as e:
            traceback.print_exc()
            try:
                self.send(Resp(500, error_body(500, 'internal error: %s' % type(e).__name__)), head)
            except OSError:
                self.close_connection = True
        finally:
            if role != 'admin':
                hdrs = sorted({h.lower() for h in self.headers.keys()})
                app.add_log({
                    'time': time.time(), 'listener': role, 'method': self.command,
                    'path': url.path, 'query': url.query, 'status': self.status,
                    'bytes': self.sent, 'headers': hdrs, 'auth': how,
                    'user': key.user if key else None,
                    'range': self.headers.get('Range'),
                    'if_range': self.headers.get('If-Range'),
                    'fault': self.rule.id if self.rule else None,
                    'duration_ms': round((time.monotonic() - t0) * 1000, 3)})
                if self.unlogged:
                    with app.log_cv:
                        app.unlogged -= 1
                        app.log_cv.notify_all()
            if self.rule is not None and self.rule.get('mutate') and self.served:
                try:
                    app.store.mutate(self.served)
                except NotFound:
                    pass

    def retry_after_headers(self, rule):
        if rule.get('retry_after_date') is not None:
            return [('Retry-After', formatdate(time.time() + rule.get('retry_after_date'),
                                               usegmt=True))]
        if rule.get('retry_after') is not None:
            return [('Retry-After', str(rule.get('retry_after')))]
        return []

    def send(self, resp, head=False):
        if self.server.role != 'admin' and not self.unlogged:
            # the client may act on this response before its log entry is appended (in
            # dispatch's finally): GET /log waits for such entries. Counted before the
            # first byte goes, or a client quick enough reads the log before the count.
            app = self.server.app
            with app.log_cv:
                app.unlogged += 1
            self.unlogged = True
        self._send(resp, head)

    def _send(self, resp, head=False):
        rule = self.rule
        delta = rule.get('content_length_delta', 0) if rule else 0
        self.send_response(resp.status)
        self.status = resp.status
        if resp.status != 304:
            self.send_header('Content-Type', resp.ctype)
        for k, v in resp.headers:
            self.send_header(k, v)
        breaks = rule is not None and (rule.get('drop_after') is not None or delta)
        total = 0
        if resp.stream is not None:
            self.send_header('Transfer-Encoding', 'chunked')
        elif resp.status != 304:
            n = total = (resp.end - resp.start) if resp.content else len(resp.body)
            self.send_header('Content-Length', str(max(0, n + delta)))
        if breaks or self.close_connection:
            self.send_header('Connection', 'close')
            self.close_connection = True
        self.end_headers()
        if head or resp.status == 304:
            return
        w = BodyWriter(self, rule, total)
        if resp.stream is not None:
            buf = []
            size = 0
            for piece in resp.stream:
                buf.append(piece)
                size += len(piece)
                if size >= 65536:
                    data = ''.join(buf).encode()
                    if not w.write(b'%x\r\n' % len(data) + data + b'\r\n'):
                        break
                    buf, size = [], 0
            else:
                data = ''.join(buf).encode()
                if data:
                    w.write(b'%x\r\n' % len(data) + data + b'\r\n')
                w.write(b'0\r\n\r\n')
        elif resp.content is not None:
            c = resp.content
            if c.path and w.plain:
                with open(c.path, 'rb') as f:
                    n = resp.end - resp.start
                    if n:
                        self.connection.sendfile(f, resp.start, n)
                    self.sent += n
            else:
                pos = resp.start
                while pos < resp.end:
                    data = c.read(pos, min(resp.end, pos + CHUNK))
                    if not data:
                        break
                    pos += len(data)
                    if not w.write(data):
                        break
        else:
            w.write(resp.body)
        if breaks:
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def file_resp(self, content, ctype, extra=()):
        """Content-Length, strong ETag, Range/206, If-Range, If-None-Match (§7.8)."""
        size, etag = content.size, content.etag
        headers = [('ETag', etag), ('Accept-Ranges', 'bytes')] + list(extra)
        if content.sha256 is None and content.synthetic and size <= (1 << 20):
            content.sha256 = hashlib.sha256(content.read(0, size)).digest()
        if content.sha256 is not None:
            # the whole object's digest, whatever part is sent: integrity for the client
            headers.append(('Repr-Digest',
                            'sha-256=:%s:' % base64.b64encode(content.sha256).decode()))
        inm = self.headers.get('If-None-Match')
        if inm and etag in [t.strip() for t in inm.split(',')] and self.command in ('GET', 'HEAD'):
            return Resp(304, b'', headers=headers)
        rng = self.headers.get('Range')
        if rng and not (self.rule and self.rule.get('ignore_range')):
            if_range = self.headers.get('If-Range')
            if if_range is None or if_range.strip() == etag:
                r = parse_range(rng.strip(), size)
                if r == 'unsatisfiable':
                    return Resp(416, error_body(416, 'Range Not Satisfiable'),
                                headers=[('Content-Range', 'bytes */%d' % size)])
                if r is not None:
                    start, end = r
                    return Resp(206, ctype=ctype, content=content, start=start, end=end,
                                headers=headers + [('Content-Range', 'bytes %d-%d/%d'
                                                    % (start, end - 1, size))])
        return Resp(200, ctype=ctype, content=content, start=0, end=size, headers=headers)

    # ------------------------------------------------------------------ routes
    def route(self, path, q, body, key):
        st = self.server.app.store
        m = self.command if self.command != 'HEAD' else 'GET'
        p = [x for x in path.split('/') if x]
        n = len(p)

        def js():
            if not body:
                return {}
            try:
                return json.loads(body)
            except ValueError:
                raise BadRequest('body is not valid JSON')

        # §3.1 projects
        if p[:1] == ['projects']:
            if n == 1 and m == 'GET':
                projs = sorted(st.visible_projects(key), key=lambda x: (x['created_at'], x['name']))
                off, lim = page_args(q)
                projs = projs[off:None if lim is None else off + lim]
                return json_resp({'data': [st.project_public(x) for x in projs]})
            if n == 1 and m == 'POST':
                proj = st.create_project(key, js())
                return json_resp(st.project_public(proj), 201)
            if n >= 2:
                proj = st.get_project(key, p[1])
                if n == 2 and m == 'GET':
                    return json_resp(st.project_public(proj))
                if n == 2 and m == 'DELETE':
                    st.delete_project(key, p[1])
                    return json_resp({'id': p[1], 'deleted': True})
                if n == 3 and p[2] == 'resources' and m == 'GET':
                    off, lim = page_args(q)
                    return json_resp(st.project_resources(key, proj, off, lim,
                                                          parse_bool(q.get('deleted'), False)))
                if n == 3 and p[2] == 'resources' and m == 'POST':
                    b = js()
                    st.add_to_project(key, proj, b.get('resource_ids_to_add') or [],
                                      b.get('resource_ids_to_delete') or [])
                    return json_resp({'id': proj['id'], 'success': True}, 201)
                if n == 3 and m == 'GET' and p[2] in ('worklists', 'splits', 'members',
                                                      'annotation-statuses', 'models'):
                    return json_resp(self.project_v2(st, key, proj, p[2], q))
                if n == 3 and p[2] == 'annotated_dataset' and m == 'GET':
                    return self.zip_download(proj, key, gen='B',
                                             all_annotations=parse_bool(q.get('all_annotations'), False),
                                             include_unannotated=parse_bool(q.get('include_unannotated'), False))
        # §3.2 datasets
        if p[:1] == ['datasets']:
            if n == 1 and m == 'GET':
                projs = sorted(st.visible_projects(key), key=lambda x: (x['created_at'], x['name']))
                off, lim = page_args(q)
                projs = projs[off:None if lim is None else off + lim]
                return json_resp({'data': [st.dataset_public(x) for x in projs]})
            if n == 3 and p[1] == 'download' and m == 'GET':
                tok = st.tokens.get(p[2])
                if tok is None:
                    raise NotFound('Download not found')
                return self.file_resp(Content(path=tok['path'], size=os.path.getsize(tok['path']),
                                              etag='"zip-%s"' % p[2][:16]), 'application/zip',
                                      [('Content-Disposition', 'attachment; filename="%s.zip"'
                                        % tok['name'])])
            if n >= 2:
                proj = st.project_by_dataset(key, p[1])
                if n == 2 and m == 'GET':
                    return json_resp(st.dataset_public(proj))
                if n == 3 and p[2] == 'resources' and m == 'GET':
                    return json_resp(st.project_resources(key, proj))
                if n == 3 and p[2] == 'resources' and m == 'POST':
                    b = js()
                    st.add_to_project(key, proj, b.get('resource_ids_to_add') or [],
                                      b.get('resource_ids_to_delete') or [])
                    return json_resp({'id': proj['dataset_id'], 'success': True}, 201)
                if n == 4 and p[2] == 'download' and m == 'GET':
                    return self.gen_a_token(proj, key, p[3])
        # §3.4 resources
        if p[:1] == ['resources']:
            if n == 1 and m == 'GET':
                return self.list_resources(key, q)
            if n == 1 and m == 'POST':
                return self.upload(key, body)
            if n == 2 and p[1] == 'channels' and m == 'GET':
                chans = st.channels(key)
                off, lim = page_args(q)
                total = len(chans)
                chans = chans[off:None if lim is None else off + lim]
                return json_resp({'data': chans, 'totalCount': str(total)})
            if n == 2 and p[1] == 'not-annotated' and m == 'GET':
                items = st.not_annotated(key, q)
                off, lim = page_args(q)
                page = items[off:None if lim is None else off + lim]
                return json_resp({'data': [{'resources': page}], 'totalCount': len(items)})
            if n == 2 and p[1] == 'tags' and m == 'PUT':
                b = js()
                ids = b.get('resource_ids')
                if not isinstance(ids, list):
                    raise BadRequest('resource_ids must be a list')
                for i in ids:
                    st.set_tags(key, i, b.get('tags'))
                return json_resp({'success': True})
            if n == 2 and p[1] == 'bulk-publish' and m == 'POST':
                ids = js().get('resource_ids')
                if not isinstance(ids, list):
                    raise BadRequest('resource_ids must be a list')
                for i in ids:
                    st.publish(key, i)
                return json_resp({'success': True})
            if n >= 2:
                if n == 2 and m == 'GET':
                    return json_resp(st.resource_json(key, p[1],
                                                      parse_bool(q.get('deleted'), False)))
                if n == 2 and m == 'DELETE':
                    st.delete_resource(key, p[1])
                    return json_resp({'id': p[1], 'deleted': True})
                if n == 3 and p[2] == 'file' and m == 'GET':
                    content = st.content(key, p[1])
                    r = st.resources.get(p[1])
                    self.served = p[1]
                    ctype = r['mimetype'] if r else 'application/octet-stream'
                    return self.file_resp(content, ctype or 'application/octet-stream')
                if n == 4 and p[2] == 'frames' and m == 'GET':
                    return self.frame(st, key, p[1], p[3])
                if n == 3 and p[2] == 'publish' and m == 'POST':
                    r = st.publish(key, p[1])
                    return json_resp(st.resource_public(r), 201)
                if n == 3 and p[2] == 'tags' and m == 'PUT':
                    b = js()
                    r = st.set_tags(key, p[1], b.get('tags'))
                    return json_resp(st.resource_public(r))
                if n == 3 and p[2] == 'labels' and m == 'PUT':
                    b = js()
                    r = st.set_labels(key, p[1], b.get('labels'), b.get('frame_labels'))
                    return json_resp(st.resource_public(r))
        # §3.6 annotations
        if p[:1] == ['annotations']:
            if n == 1 and m == 'GET':
                items = st.list_annotations(key, q)
                off, lim = page_args(q)
                return json_resp({'data': items[off:None if lim is None else off + lim]})
            if n == 2 and p[1] == 'search' and m == 'POST':
                b = js()
                if not isinstance(b, dict):
                    raise BadRequest('body must be a JSON object')
                items = st.list_annotations(key, b)
                off, lim = page_args({'offset': b.get('offset'), 'limit': b.get('limit')})
                return json_resp(items[off:None if lim is None else off + lim])
            if n == 2 and m == 'GET':
                return json_resp(st.annotation_public(st.get_annotation(key, p[1])))
            if n == 2 and m == 'DELETE':
                st.delete_annotation(key, p[1])
                return json_resp({'id': p[1], 'deleted': True})
            if n == 3 and p[2] == 'annotations' and m == 'POST':
                return json_resp(st.create_annotations(key, p[1], js()), 201)
            if n == 3 and p[2] == 'annotations' and m == 'GET':
                st.get_resource(key, p[1])
                return json_resp({'data': st.list_annotations(key, {'resource_id': p[1]})})
            if n == 4 and p[2] == 'segmentations' and p[3] == 'file' and m == 'POST':
                fields, files = self.multipart(body)
                name, ctype, data = self.need_file(files, 'file')
                return json_resp(st.volume_segmentation(key, p[1], fields, name, data), 201)
            if n == 5 and p[2] == 'annotations' and p[4] == 'file':
                if m == 'POST':
                    fields, files = self.multipart(body)
                    name, ctype, data = self.need_file(files, 'file')
                    a = st.annotation_file(key, p[1], p[3], name, data)
                    return json_resp(st.annotation_public(a), 201)
                if m == 'GET':
                    a = st.get_annotation(key, p[3], p[1])
                    if not a['_path']:
                        raise NotFound('Annotation file not found')
                    name = (a['associated_file'] or '').lower()
                    ctype = (NIFTI_MIME if '.nii' in name else
                             'image/png' if name.endswith('.png') else 'application/octet-stream')
                    return self.file_resp(st.file_content(a), ctype)
        # 2.x annotation worklists ("annotationsets")
        if p[:1] == ['annotationsets'] and n in (2, 3) and m == 'GET':
            proj = st.worklist_of(key, p[1])
            if n == 2:
                return json_resp(st.worklist_public(proj))
            if p[2] == 'segmentation-group':
                return json_resp(st.segmentation_group(proj))
            if p[2] == 'annotation-statuses':
                return json_resp(st.annotation_statuses(proj))
        if p == ['users', 'me'] and m == 'GET':
            return json_resp(st.user_public(key.user))
        if p == ['models'] and m == 'GET':
            return json_resp({'data': [], 'totalCount': 0})
        # §3.8 upload batches (the 2024 clients' create_batch / get_batches / get_batch_info)
        if p[:1] == ['upload-batches']:
            if n == 1 and m == 'GET':
                items = st.list_batches(key)
                off, lim = page_args(q)
                return json_resp({'data': items[off:None if lim is None else off + lim]})
            if n == 1 and m == 'POST':
                return json_resp({'id': st.create_batch(key, js())['id']}, 201)
            if n == 2 and m == 'GET':
                return json_resp(st.get_batch(key, p[1]))
        if p == ['users'] and m == 'GET':
            return json_resp([{'email': u, 'firstname': u.split('@')[0].capitalize(),
                               'lastname': 'Example', 'roles': ['admin'],
                               'customer_id': None, 'created_at': '2025-01-01T00:00:00.000Z'}
                              for u in st.users()])
        raise NotFound('Cannot %s %s' % (self.command, path))

    def project_v2(self, st, key, proj, what, q):
        if what == 'worklists':
            # get_by_project remaps worklist_id/worklist_name (annotationsets_api.py l.197-207)
            w = st.worklist_public(proj, full=False)
            w['worklist_id'], w['worklist_name'] = w.pop('id'), w.pop('name')
            return [w]
        if what == 'splits':
            return st.splits(proj, q.get('split_name') or None)
        if what == 'members':
            return st.members(key, proj)
        if what == 'annotation-statuses':
            return st.annotation_statuses(proj)
        return []  # models: the project's models (none here)

    def frame(self, st, key, rid, idx):
        """GET /resources/{id}/frames/{i} (resources_api.py@v2.29.0 l.1226-1238): one frame
        as an image. An image resource is its own frame 0; other formats are not rendered
        here (501, which the client raises as a server error)."""
        r = st.get_resource(key, rid, allow_deleted=False)
        try:
            i = int(idx)
        except ValueError:
            raise BadRequest('frame index must be an integer')
        mt = r['mimetype'] or ''
        if mt.startswith('image/'):
            if i != 0:
                raise BadRequest('Resource is not a multi-frame resource')
            return self.file_resp(st.content(key, rid), mt)
        raise HTTPError(501, 'frame rendering of %s is not emulated' % mt)

    def multipart(self, body):
        ctype = self.headers.get('Content-Type') or ''
        if not ctype.lower().startswith('multipart/form-data'):
            raise BadRequest('expected multipart/form-data')
        return parse_multipart(body, ctype)

    @staticmethod
    def need_file(files, name):
        if name not in files:
            raise BadRequest('multipart field %r (a file) is required' % name)
        return files[name]

    def list_resources(self, key, q):
        """GET /resources: {"data":[{"resources":[...]}],"totalCount":N}, exact paging,
        `data` never empty (§3.4, §7.3)."""
        st = self.server.app.store
        for k, v in self.query_list:
            if k.startswith('labels['):
                q[k] = v
        total, segs, rev = st.list_resources(key, q)
        off, lim = page_args(q)
        items = st.page(segs, rev, off, lim)
        if parse_bool(q.get('ids'), False):
            # ids=true (1.x get_resources(return_ids_only=True)): the same envelope, each
            # resource reduced to its id
            items = ['{"id":%s}' % json.dumps(json.loads(t)['id']) for t in items]
        text = '{"data":[{"resources":[' + ','.join(items) + ']}],"totalCount":%d}' % total
        return Resp(200, text.encode())

    def upload(self, key, body):
        """POST /resources multipart: field `resource` plus §3.4 fields -> 201 {"id"}."""
        fields, files = self.multipart(body)
        name, ctype, data = self.need_file(files, 'resource')
        r = self.server.app.store.upload(key, fields, os.path.basename(name) or 'upload', ctype, data)
        return json_resp({'id': r['id']}, 201)

    def gen_a_token(self, proj, key, fmt):
        """Generation A (§3.3.1): SSE progress then {"zip": token}; a JSON string token for
        clients that ask for application/json (the HEAD client), or with --token-style json."""
        if fmt not in ('dicom', 'png', 'jpg', 'tiff', 'npy', 'nifti'):
            raise BadRequest('unknown download format %r' % fmt)
        app = self.server.app
        # a dataset version: every resource, published annotations (what the client's
        # Dataset sees by default in every generation, all_annotations=False)
        path, count = self.build_zip(proj, key, all_annotations=False, include_unannotated=True)
        token = uuid.uuid4().hex
        app.store.tokens[token] = {'path': path, 'name': proj['name']}
        accept = self.headers.get('Accept') or ''
        if app.args.token_style == 'json' or ('application/json' in accept
                                               and 'text/event-stream' not in accept):
            return json_resp(token)
        lines = []
        for done in sorted({0, count // 2, count}):
            lines.append('data: %s\n\n' % json.dumps({'processedImages': done, 'totalImages': count}))
        lines.append('data: %s\n\n' % json.dumps({'zip': token}))
        return Resp(200, ''.join(lines).encode(), ctype='text/event-stream',
                    headers=[('Cache-Control', 'no-cache')])

    def zip_download(self, proj, key, gen, all_annotations, include_unannotated):
        """Generation B (§3.3.2): GET /projects/{id}/annotated_dataset -> ZIP stream."""
        path, _ = self.build_zip(proj, key, all_annotations, include_unannotated)
        c = Content(path=path, size=os.path.getsize(path), etag='"zip-%s"' % uuid.uuid4().hex[:16])
        resp = self.file_resp(c, 'application/zip',
                              [('Content-Disposition', 'attachment; filename="%s.zip"' % proj['name'])])
        return resp

    def build_zip(self, proj, key, all_annotations, include_unannotated):
        """ZIP with dataset.json at the root, images/<id><ext> and
        masks/<created_by>/<resource id>/<annotation id><ext> (§4.2, §4.4 Gen 1/2)."""
        st = self.server.app.store
        sp = proj['_synthetic']
        if sp and sp.n > ZIP_MAX_ITEMS:
            raise BadRequest('dataset too large for a ZIP download (%d items > %d); use the '
                             'per-resource download of Generation C' % (sp.n, ZIP_MAX_ITEMS))
        with st.lock:
            info = st.dataset_public(proj)
            if sp:
                items = [(sp.item(i), None) for i in range(sp.n)]
            else:
                items = [(st.resource_public(st.resources[r]), st.resources[r])
                         for r in proj['_resources'] if not st.resources[r]['deleted']]
            anns = {}
            for pub, r in items:
                if r is None:
                    continue
                lst = [st.annotations[a] for a in r['_annotations']]
                anns[r['id']] = [a for a in lst if not a['deleted']
                                 and (all_annotations or a['status'] == 'published')]
        path = os.path.join(st.state_dir, 'zip-%s.zip' % uuid.uuid4().hex)
        entries = []
        with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as z:
            for pub, r in items:
                rid = pub['id']
                alist = anns.get(rid, [])
                if not include_unannotated and not alist:
                    continue
                name = 'images/%s%s' % (rid, zip_ext(pub['filename']))
                if r is None:
                    z.writestr(name, sp.content(sp.index_of(rid)))
                else:
                    z.write(r['_path'], name)
                short = []
                frame_labels = []
                for a in alist:
                    e = {'type': a['annotation_type'], 'name': a['identifier'],
                         'index': a['frame_index'], 'added_by': a['created_by']}
                    if a['annotation_type'] == 'category':
                        e['value'] = a['text_value']
                    if a['_path']:
                        mname = 'masks/%s/%s/%s%s' % (a['created_by'], rid, a['id'],
                                                      zip_ext(a['associated_file'] or ''))
                        z.write(a['_path'], mname)
                        e['file'] = mname
                    short.append(e)
                    if a['annotation_type'] == 'label' and a['frame_index'] is not None:
                        frame_labels.append({'label': a['identifier'], 'frame': a['frame_index'],
                                             'created_by': a['created_by']})
                ent = dict(pub)
                ent.update(file=name, annotations=short, frame_labels=frame_labels or None)
                entries.append(ent)
            meta = dict(info)
            if isinstance(meta['resource_ids'], LazyList):
                meta['resource_ids'] = [e['id'] for e in entries]
            meta.update(all_annotations=all_annotations, resources=entries)
            z.writestr('dataset.json', json.dumps(meta, indent=1))
        return path, len(entries)

    # ------------------------------------------------------------------ admin
    def admin(self, path, q, body):
        app = self.server.app
        st = app.store
        k = self.headers.get('x-admin-key')
        if not k:
            auth = self.headers.get('Authorization') or ''
            k = auth[7:].strip() if auth[:7].lower() == 'bearer ' else None
        if not st.admin_key or k != st.admin_key:
            raise HTTPError(401, 'admin key required (header x-admin-key)')
        m = self.command
        p = [x for x in path.split('/') if x]
        if p[:1] != ['_admin']:
            raise NotFound('Cannot %s %s' % (m, path))
        p = p[1:]

        def js():
            try:
                return json.loads(body or b'{}')
            except ValueError:
                raise BadRequest('body is not valid JSON')
        if p == ['info'] and m == 'GET':
            with st.lock:
                projects = [{'id': x['id'], 'name': x['name'], 'dataset_id': x['dataset_id'],
                             'worklist_id': x['worklist_id'],
                             'resource_count': int(st.project_public(x)['resource_count']),
                             'synthetic': bool(x['_synthetic']), 'updated_at': x['_updated_at']}
                            for x in st.projects.values()]
            return json_resp(dict(app.urls, pid=os.getpid(), projects=projects,
                                  users=st.users()))
        if p == ['faults']:
            if m == 'GET':
                return json_resp(app.faults.list())
            if m == 'POST':
                b = js()
                try:
                    rules = [app.faults.add(x) for x in (b if isinstance(b, list) else [b])]
                except FaultError as e:
                    raise BadRequest(str(e))
                return json_resp({'ids': [r.id for r in rules], 'id': rules[0].id}, 201)
            if m == 'DELETE':
                app.faults.clear()
                return json_resp({'cleared': True})
        if len(p) == 2 and p[0] == 'faults' and m == 'DELETE':
            if not app.faults.remove(int(p[1]) if p[1].isdigit() else -1):
                raise NotFound('fault not found')
            return json_resp({'deleted': True})
        if p == ['log']:
            if m == 'GET':
                since = int(q.get('since') or 0)
                with app.log_lock:
                    # every response sent so far is in the log (bounded: a handler thread
                    # descheduled for longer is not waited for)
                    app.log_cv.wait_for(lambda: app.unlogged == 0, timeout=2.0)
                    entries = [e for e in app.log if e['seq'] > since]
                    last = app.log_seq
                return json_resp({'entries': entries, 'last': last})
            if m == 'DELETE':
                with app.log_lock:
                    app.log.clear()
                return json_resp({'cleared': True})
        if p == ['stats'] and m == 'GET':
            return json_resp(app.stats())
        if p == ['stats', 'reset'] and m == 'POST':
            app.reset_stats()
            return json_resp(app.stats())
        if p == ['reset'] and m == 'POST':
            app.faults.clear()
            with app.log_lock:
                app.log.clear()
            app.reset_stats()
            return json_resp({'reset': True})
        if len(p) == 3 and p[0] == 'resources' and p[2] == 'mutate' and m == 'POST':
            return json_resp({'etag': st.mutate(p[1])})
        if len(p) == 3 and p[0] == 'resources' and p[2] == 'content' and m == 'PUT':
            return json_resp({'etag': st.mutate(p[1], body)})
        if len(p) == 3 and p[0] == 'projects' and p[2] == 'touch' and m == 'POST':
            if p[1] not in st.projects:
                raise NotFound('Project not found')
            st.touch([p[1]])
            return json_resp({'updated_at': st.projects[p[1]]['_updated_at']})
        if p == ['synthetic'] and m == 'POST':
            b = js()
            try:
                proj = st.add_synthetic(str(b['name']), int(b['n']), int(b.get('size', 4096)))
            except (KeyError, ValueError, TypeError):
                raise BadRequest('body must be {"name": str, "n": int, "size": int}')
            return json_resp({'id': proj['id'], 'dataset_id': proj['dataset_id']}, 201)
        raise NotFound('Cannot %s %s' % (m, path))


class BodyWriter:
    """Writes a response body through the body faults of one rule."""

    def __init__(self, handler, rule, total):
        self.h = handler
        self.rate = rule.get('rate_bps') if rule else None
        self.drop = rule.get('drop_after') if rule else None
        self.flips = set(rule.get('flip', [])) if rule else set()
        self.flip_count = rule.get('flip_count', 0) if rule else 0
        self.plain = not (self.rate or self.drop is not None or self.flips or self.flip_count)
        if self.flip_count:
            n = self.flip_count
            self.flips |= {(k + 1) * total // (n + 1) for k in range(n)}
        self.pos = 0
        self.t0 = time.monotonic()

    def write(self, data):
        """Returns False once the connection has been cut."""
        if self.drop is not None:
            left = self.drop - self.pos
            if left <= 0:
                return False
            data = data[:left]
        if self.flips:
            hit = [o - self.pos for o in self.flips if self.pos <= o < self.pos + len(data)]
            if hit:
                b = bytearray(data)
                for o in hit:
                    b[o] ^= 0xFF
                data = bytes(b)
        mv = memoryview(data)
        if self.rate:
            step = max(1, int(self.rate // 20))
            for i in range(0, len(mv), step):
                piece = mv[i:i + step]
                self.h.connection.sendall(piece)
                self.pos += len(piece)
                self.h.sent += len(piece)
                due = self.t0 + self.pos / self.rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        else:
            self.h.connection.sendall(mv)
            self.pos += len(mv)
            self.h.sent += len(mv)
        return self.drop is None or self.pos < self.drop


def main(argv=None):
    ap = argparse.ArgumentParser(description='Datamint REST API emulator (tests/emulator/README.md)')
    ap.add_argument('--corpus', help='corpus directory written by tests/data/gen_corpus.py')
    ap.add_argument('--keys', help='keys file (default: CORPUS/keys.json)')
    ap.add_argument('--host', default='127.0.0.1')
    ap.add_argument('--port', type=int, default=0, help='0 picks a free port')
    ap.add_argument('--redirect-host', default='127.0.0.2',
                    help='address of the second listener that 302 redirects point to')
    ap.add_argument('--redirect-port', type=int, default=0)
    ap.add_argument('--admin-port', type=int, default=0)
    ap.add_argument('--admin-key', help='admin key (default: admin_key of the keys file)')
    ap.add_argument('--synthetic', action='append', default=[], metavar='NAME:N[:SIZE]',
                    help='add a synthetic project of N items of SIZE bytes (default 4096)')
    ap.add_argument('--fault', action='append', default=[], metavar='JSON',
                    help='install a fault rule at start (see faults.py)')
    ap.add_argument('--token-style', choices=('sse', 'json'), default='sse',
                    help='Generation A token answer when Accept does not decide (§3.3.1)')
    ap.add_argument('--not-found-style', choices=('nest', 'text'), default='nest',
                    help="404 text of a missing entity: 'Not Found' (nest, the seed-era and "
                    "2.x clients) or '<Entity> not found' (text, the 1.x clients)")
    ap.add_argument('--tls-cert')
    ap.add_argument('--tls-key')
    ap.add_argument('--state-dir', help='where uploads and ZIPs go (default: a temp dir)')
    ap.add_argument('--ready-file', help='also write the JSON line to this file')
    ap.add_argument('--verbose', action='store_true')
    args = ap.parse_args(argv)

    for h in (args.host, args.redirect_host):
        if not h.startswith('127.'):
            ap.error('loopback addresses only (127.0.0.0/8), not %r' % h)
    keys = args.keys or (os.path.join(args.corpus, 'keys.json') if args.corpus else None)
    if not keys or not os.path.isfile(keys):
        ap.error('a keys file is needed: --keys FILE or --corpus DIR with keys.json')
    store.ENTITY_STYLE[0] = args.not_found_style
    app = App(args)
    st = app.store
    try:
        if args.admin_key:
            st.admin_key = args.admin_key
        st.load_keys(keys)
        if args.corpus:
            st.load_corpus(args.corpus)
        for spec in args.synthetic:
            parts = spec.split(':')
            if len(parts) not in (2, 3):
                ap.error('--synthetic NAME:N[:SIZE]')
            st.add_synthetic(parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else 4096)
        for f in args.fault:
            app.faults.add(json.loads(f))
    except (ValueError, OSError, FaultError, Conflict, BadRequest) as e:
        sys.stderr.write('emulator: %s\n' % e)
        st.close()
        return 2
    tls = None
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    scheme = 'https' if tls else 'http'
    try:
        main_srv = Server((args.host, args.port), app, 'main', tls)
        redir_srv = Server((args.redirect_host, args.redirect_port), app, 'redirect', tls)
        admin_srv = Server((args.host, args.admin_port), app, 'admin')
    except OSError as e:
        sys.stderr.write('emulator: cannot listen: %s\n' % e)
        st.close()
        return 2
    app.urls = {'url': '%s://%s:%d' % (scheme, args.host, main_srv.server_address[1]),
                'redirect_url': '%s://%s:%d' % (scheme, args.redirect_host,
                                                redir_srv.server_address[1]),
                'admin_url': 'http://%s:%d' % (args.host, admin_srv.server_address[1])}
    threads = [threading.Thread(target=s.serve_forever, kwargs={'poll_interval': 0.2},
                                daemon=True) for s in (main_srv, redir_srv, admin_srv)]
    for t in threads:
        t.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    line = json.dumps(dict(app.urls, pid=os.getpid()))
    if args.ready_file:
        tmp = args.ready_file + '.tmp'
        with open(tmp, 'w') as f:
            f.write(line + '\n')
        os.rename(tmp, args.ready_file)
    sys.stdout.write(line + '\n')
    sys.stdout.flush()
    while not stop.wait(1.0):
        pass
    for s in (main_srv, redir_srv, admin_srv):
        s.shutdown()
        s.server_close()
    st.close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
