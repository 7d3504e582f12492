"""ctypes bindings of libdmcache (client/dmcache.h): the package's only protocol code.

The library is found, in order: $DMCACHE_LIBRARY (a path), the build tree that configured
this package (_build_paths.py, present only there), the installed library
(_install_paths.py, written by `meson install`), then the dynamic linker's search.

A Client is one connection, used by one thread at a time (its lock serialises calls). It
remembers the process that made it: after fork() the child's copy is dropped without a
word to the daemon (the parent still owns that connection) and the child connects again.
ctypes releases the GIL during every library call, so a thread blocked in a GET does not
stop the others.
"""
import ctypes
import ctypes.util
import errno
import os
import threading

from . import errors

_LIBNAME = 'libdmcache.so.0'


def _candidates():
    env = os.environ.get('DMCACHE_LIBRARY')
    if env:
        yield env
        return
    try:
        from . import _build_paths
        yield _build_paths.LIBRARY
    except ImportError:
        pass
    try:
        from . import _install_paths
        yield _install_paths.LIBRARY
    except ImportError:
        pass
    yield _LIBNAME
    found = ctypes.util.find_library('dmcache')
    if found:
        yield found


def _load():
    tried = []
    for path in _candidates():
        try:
            return ctypes.CDLL(path), path
        except OSError as e:
            tried.append('%s (%s)' % (path, e))
    raise ImportError('dmcache: cannot load libdmcache; tried: ' + '; '.join(tried))


lib, LIBRARY_PATH = _load()

c_char_p, c_void_p = ctypes.c_char_p, ctypes.c_void_p
u32, u64, i32, i64 = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int32, ctypes.c_int64

# enum dmc_source, flags, enum dmc_dtype (proto.h)
SOURCE_DATAMINT, SOURCE_LOCAL = 1, 2
OPEN_LUT = 1
OPEN_FRAMES = 2
OPEN_MASKS = 4
OPEN_OFFLINE = 8
OPEN_RAW = 16
OPEN_POLICY = 32
OPEN_REGIONS = 64  # hot items of get() handed in place, read-only (proto.h "Regions")
# struct dmc_policy (proto.h: DMC_OPEN_POLICY)
POLICY_SIZE, POLICY_CROP, POLICY_PAD, POLICY_CHANNELS, POLICY_WINDOW = 1, 2, 4, 8, 16
RESIZE_CODES = {'bilinear': 1, 'nearest': 2, 'area': 3}


def offline_default(offline=None):
    """offline=None follows DMCACHE_OFFLINE (1, yes or true), as the CLI does."""
    if offline is not None:
        return bool(offline)
    return os.environ.get('DMCACHE_OFFLINE', '').lower() in ('1', 'yes', 'true')
GET_MAX = 4096
STREAM_AHEAD_MAX = 8
DTYPES = {1: 'uint8', 2: 'int8', 3: 'uint16', 4: 'int16', 5: 'uint32', 6: 'int32',
          7: 'uint64', 8: 'int64', 9: 'float32', 10: 'float64', 11: 'float16',
          12: 'bfloat16'}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 8, 8: 8, 9: 4, 10: 8, 11: 2,
               12: 2}
DTYPE_BF16 = 12  # no numpy dtype: read as uint16 bits, viewed as torch.bfloat16


class OpenArgs(ctypes.Structure):
    _fields_ = [('source', u32), ('project', c_char_p), ('version', c_char_p),
                ('server', c_char_p), ('api_key', c_char_p), ('flags', u32), ('dtype', u32),
                ('arena_bytes', u64)]


class Policy(ctypes.Structure):
    _fields_ = [('ops', u32), ('resize', u32), ('height', u32), ('width', u32),
                ('channels', u32), ('pad_value', ctypes.c_double),
                ('window_center', ctypes.c_double), ('window_width', ctypes.c_double)]


class DatasetInfo(ctypes.Structure):
    _fields_ = [('snapshot_id', u64), ('items', u64), ('project_id', c_char_p),
                ('project_name', c_char_p), ('version', c_char_p), ('arena_bytes', u64)]


class Item(ctypes.Structure):
    _fields_ = [('index', u64), ('status', ctypes.c_int), ('message', c_char_p),
                ('dtype', u32), ('ndim', u32), ('shape', u64 * 4), ('data', c_void_p),
                ('nbytes', u64), ('meta', c_void_p), ('meta_len', u64), ('offset', u64),
                ('meta_offset', u64), ('region', u32)]


class StreamArgs(ctypes.Structure):
    _fields_ = [('seed', u64), ('epoch', u64), ('shuffle', ctypes.c_bool),
                ('drop_last', ctypes.c_bool), ('rank', u32), ('world_size', u32),
                ('batch_size', u32), ('ahead', u32)]


class BatchInfo(ctypes.Structure):
    _fields_ = [('number', u64), ('n', u32), ('uniform', ctypes.c_bool), ('data', c_void_p),
                ('data_len', u64), ('data_offset', u64), ('meta_offset', u64),
                ('items', ctypes.POINTER(Item)), ('in_region', u32)]


class ErrorInfo(ctypes.Structure):
    _fields_ = [('code', u32), ('http_status', u32), ('retry_after_ms', u32),
                ('sys_errno', i32), ('resource', c_char_p), ('message', c_char_p)]


class Credentials(ctypes.Structure):
    _fields_ = [('api_key', c_void_p), ('server', c_char_p), ('key_from', c_char_p),
                ('server_from', c_char_p), ('file', c_char_p)]


class StatusCounter(ctypes.Structure):
    _fields_ = [('name', c_char_p), ('value', i64)]


class StatusInfo(ctypes.Structure):
    _fields_ = [('version', c_char_p), ('uptime_ms', u64), ('pid', u32), ('n_counters', u32),
                ('counters', ctypes.POINTER(StatusCounter))]


def _fn(name, restype, *argtypes):
    f = getattr(lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


_P = ctypes.POINTER
dmc_connect = _fn('dmc_connect', ctypes.c_int, c_char_p, _P(c_void_p))
dmc_close = _fn('dmc_close', None, c_void_p)
dmc_set_timeout = _fn('dmc_set_timeout', None, c_void_p, u32)
dmc_socket_path = _fn('dmc_socket_path', c_char_p, c_void_p)
dmc_daemon_version = _fn('dmc_daemon_version', c_char_p, c_void_p)
dmc_ping = _fn('dmc_ping', ctypes.c_int, c_void_p)
dmc_status = _fn('dmc_status', ctypes.c_int, c_void_p, _P(_P(StatusInfo)))
dmc_status_free = _fn('dmc_status_free', None, _P(StatusInfo))
dmc_last_error = _fn('dmc_last_error', _P(ErrorInfo), c_void_p)
dmc_strerror = _fn('dmc_strerror', c_char_p, ctypes.c_int)
dmc_open = _fn('dmc_open', ctypes.c_int, c_void_p, _P(OpenArgs), _P(c_void_p))
dmc_open_policy = _fn('dmc_open_policy', ctypes.c_int, c_void_p, _P(OpenArgs), _P(Policy),
                      _P(c_void_p))
dmc_dataset_info = _fn('dmc_dataset_info', _P(DatasetInfo), c_void_p)
dmc_dataset_close = _fn('dmc_dataset_close', ctypes.c_int, c_void_p)
dmc_get = _fn('dmc_get', ctypes.c_int, c_void_p, _P(u64), u32, _P(Item))
dmc_release = _fn('dmc_release', ctypes.c_int, c_void_p, _P(Item), u32)
dmc_arena = _fn('dmc_arena', c_void_p, c_void_p, _P(u64))
dmc_stream_start = _fn('dmc_stream_start', ctypes.c_int, c_void_p, _P(StreamArgs),
                       _P(c_void_p))
dmc_stream_batches = _fn('dmc_stream_batches', u64, c_void_p)
dmc_stream_item = _fn('dmc_stream_item', u64, c_void_p, u64)
dmc_stream_next = _fn('dmc_stream_next', ctypes.c_int, c_void_p, _P(BatchInfo))
dmc_batch_release = _fn('dmc_batch_release', ctypes.c_int, c_void_p, _P(BatchInfo))
dmc_stream_close = _fn('dmc_stream_close', ctypes.c_int, c_void_p)
dmc_stream_perm = _fn('dmc_stream_perm', u64, u64, u64, u64)
dmc_credentials_load = _fn('dmc_credentials_load', ctypes.c_int, c_char_p, c_char_p,
                           _P(Credentials), ctypes.c_char_p, ctypes.c_size_t)
dmc_credentials_done = _fn('dmc_credentials_done', None, _P(Credentials))
dmc_version = _fn('dmc_version', c_char_p)
SOCKET_PATH_MAX, SOCKET_CANDIDATES_MAX = 108, 2  # dmcache.h
dmc_socket_candidates = _fn('dmc_socket_candidates', ctypes.c_int,
                            _P((ctypes.c_char * SOCKET_PATH_MAX) * SOCKET_CANDIDATES_MAX))


def socket_candidates(socket_path=None):
    """The socket paths dmc_connect tries: socket_path, else $DMCACHE_SOCKET, else the
    system socket and $XDG_RUNTIME_DIR's."""
    if socket_path:
        return [os.fsdecode(socket_path)]
    buf = ((ctypes.c_char * SOCKET_PATH_MAX) * SOCKET_CANDIDATES_MAX)()
    n = dmc_socket_candidates(ctypes.byref(buf))
    return [_s(buf[i].value) for i in range(max(0, min(n, SOCKET_CANDIDATES_MAX)))]


def _s(b):
    return b.decode('utf-8', 'replace') if b else ''


def _enc(s):
    if s is None:
        return None
    if isinstance(s, bytes):
        return s
    return os.fsencode(s) if isinstance(s, os.PathLike) else str(s).encode()


def make_error(rc, client=None, connecting=False, what=None):
    """The exception for a negative return code, with the daemon's details if it sent any."""
    code = -rc
    message, resource, http, retry, sys_errno = _s(dmc_strerror(rc)), '', 0, 0, 0
    if client is not None and errors.FIRST_CODE <= code <= errors.LAST_CODE:
        info = dmc_last_error(client).contents
        if info.code == code:
            message = _s(info.message) or message
            resource, http = _s(info.resource), info.http_status
            retry, sys_errno = info.retry_after_ms, info.sys_errno
    if what:
        message = '%s: %s' % (what, message)
    cls = errors.error_class(code, connecting, http)
    return cls(message, code=code, name=errors.code_name(code), resource=resource,
               http_status=http, retry_after_ms=retry, sys_errno=sys_errno)


def item_error(item):
    code = -item.status
    return errors.error_class(code)(_s(item.message) or _s(dmc_strerror(item.status)),
                                    code=code, name=errors.code_name(code),
                                    index=item.index)


def load_credentials(api_key=None, server_url=None):
    """(api_key or None, server URL, where the key came from) as dmc_credentials_load finds
    them: the arguments, DATAMINT_API_KEY / DATAMINT_API_URL, datamintapi.yaml."""
    cr = Credentials()
    err = ctypes.create_string_buffer(512)
    rc = dmc_credentials_load(_enc(api_key) if api_key else None,
                              _enc(server_url) if server_url else None, ctypes.byref(cr),
                              err, len(err))
    if rc < 0:
        code = -rc
        raise errors.DmcacheError(_s(err.value) or _s(dmc_strerror(rc)), code=code,
                                  name=errors.code_name(code))
    try:
        key = ctypes.string_at(cr.api_key).decode() if cr.api_key else None
        return key, _s(cr.server), _s(cr.key_from)
    finally:
        dmc_credentials_done(ctypes.byref(cr))


class Client:
    """One connection to dmcached. socket_path None: $DMCACHE_SOCKET, then the default paths.
    Not shared between threads without its lock; dropped (not closed) after fork()."""

    def __init__(self, socket_path=None, timeout_ms=0):
        self.lock = threading.RLock()
        self.pid = os.getpid()
        h = c_void_p()
        rc = dmc_connect(_enc(socket_path), ctypes.byref(h))
        if rc < 0:
            tried = socket_candidates(socket_path)
            raise make_error(rc, connecting=True, what='cannot connect to dmcached (tried %s%s)'
                             % (', '.join(tried) or 'no socket path',
                                '' if socket_path or os.environ.get('DMCACHE_SOCKET') else
                                '; set DMCACHE_SOCKET or pass socket= for another'))
        self.h = h.value
        if timeout_ms:
            dmc_set_timeout(self.h, timeout_ms)

    @property
    def forked(self):
        return self.pid != os.getpid()

    def handle(self):
        if self.h is None:
            raise errors.DaemonConnectionError('the connection is closed', code=errno.ENOTCONN,
                                               name='ENOTCONN')
        if self.forked:
            raise errors.DmcacheError('a connection cannot be used after fork(): connect again')
        return self.h

    def close(self):
        if self.forked:
            # A forked child frees its copy (dmcache.h: close it, connect again): that
            # closes the child's descriptors and mapping only, and sends nothing. The lock
            # is not taken: a parent's thread may have held it at fork().
            h, self.h = self.h, None
            if h is not None:
                dmc_close(h)
            return
        with self.lock:
            if self.h is not None:
                dmc_close(self.h)
            self.h = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def check(self, rc, what=None):
        if rc < 0:
            raise make_error(rc, self.h, what=what)
        return rc

    @property
    def socket_path(self):
        return _s(dmc_socket_path(self.handle()))

    @property
    def daemon_version(self):
        return _s(dmc_daemon_version(self.handle()))

    def ping(self):
        with self.lock:
            self.check(dmc_ping(self.handle()), 'ping')

    def status(self):
        """{'version', 'uptime_ms', 'pid', 'counters': {name: value}}."""
        with self.lock:
            p = _P(StatusInfo)()
            self.check(dmc_status(self.handle(), ctypes.byref(p)), 'status')
            try:
                s = p.contents
                return {'version': _s(s.version), 'uptime_ms': s.uptime_ms, 'pid': s.pid,
                        'counters': {_s(s.counters[i].name): s.counters[i].value
                                     for i in range(s.n_counters)}}
            finally:
                dmc_status_free(p)

    def open(self, source, project, version=None, server=None, api_key=None, lut=False,
             dtype=0, arena_bytes=0, frames=False, masks=False, offline=False, raw=False,
             policy=None, regions=False):
        """Opens a dataset version; returns an OpenDataset. offline=True: from the
        caller's grants only, without contacting the server. raw=True: each item is its
        stored original file, uint8 (1, 1, 1, bytes); with masks=True, its stored segmentation
        files back to back, the metadata's "files" saying where each is. policy: a Policy
        (the daemon's uniformity policy) or None. regions=True: hot items of get() may be
        handed in place, in memory shared read-only with the daemon (Item.region == 1):
        copy them before writing (item_bytes() is read-only)."""
        args = OpenArgs(source=source, project=_enc(project), version=_enc(version),
                        server=_enc(server), api_key=_enc(api_key),
                        flags=(OPEN_LUT if lut else 0) | (OPEN_FRAMES if frames else 0) |
                        (OPEN_MASKS if masks else 0) | (OPEN_OFFLINE if offline else 0) |
                        (OPEN_RAW if raw else 0) | (OPEN_REGIONS if regions else 0),
                        dtype=dtype,
                        arena_bytes=int(arena_bytes))
        h = c_void_p()
        with self.lock:
            rc = dmc_open_policy(self.handle(), ctypes.byref(args),
                                 ctypes.byref(policy) if policy is not None else None,
                                 ctypes.byref(h))
            args.api_key = None
            if rc < 0:
                where = ("local folder '%s'" % os.fsdecode(_enc(project))
                         if source == SOURCE_LOCAL else "project '%s' on %s%s" %
                         (project, server or 'the default server',
                          ' (offline)' if offline else ''))
                raise make_error(rc, self.h, what='cannot open %s through %s' %
                                 (where, self.socket_path))
            return OpenDataset(self, h.value)

    def arena(self):
        """(address, size) of the mapped arena, (None, 0) before the first open."""
        size = u64()
        with self.lock:
            p = dmc_arena(self.handle(), ctypes.byref(size))
        return p, size.value


class OpenDataset:
    """A dataset version opened on a Client: GET and RELEASE of items."""

    def __init__(self, client, h):
        self.client = client
        self.h = h
        info = dmc_dataset_info(h).contents
        self.snapshot_id = info.snapshot_id
        self.items = info.items
        self.project_id = _s(info.project_id)
        self.project_name = _s(info.project_name)
        self.version = _s(info.version)
        self.arena_bytes = info.arena_bytes

    def get(self, indices):
        """GETs `indices` (a sequence of ints, 1..GET_MAX of them); returns a ctypes array of
        Item whose data stays valid until release(). A failed item has status != 0."""
        n = len(indices)
        if not 1 <= n <= GET_MAX:
            raise ValueError('a GET takes 1 to %d items, not %d' % (GET_MAX, n))
        idx = (u64 * n)(*indices)
        items = (Item * n)()
        c = self.client
        with c.lock:
            c.check(dmc_get(self._handle(), idx, n, items), 'get')
        return items

    def release(self, items):
        """Gives the arena space of `items` (an array from get(), or a list of its Items)
        back to the daemon; views of them must not be used afterwards."""
        if not isinstance(items, ctypes.Array):
            items = (Item * len(items))(*items)
        if len(items) == 0:
            return
        c = self.client
        with c.lock:
            if c.h is None or c.forked:
                return  # the arena went with the connection
            c.check(dmc_release(c.h, items, len(items)), 'release')

    def stream(self, batch_size, seed=0, epoch=0, shuffle=False, drop_last=False, rank=0,
               world_size=1, ahead=0):
        """Starts a STREAM of one epoch on this connection; returns a Stream."""
        args = StreamArgs(seed=int(seed), epoch=int(epoch), shuffle=bool(shuffle),
                          drop_last=bool(drop_last), rank=int(rank),
                          world_size=int(world_size), batch_size=int(batch_size),
                          ahead=int(ahead))
        h = c_void_p()
        c = self.client
        with c.lock:
            c.check(dmc_stream_start(self._handle(), ctypes.byref(args), ctypes.byref(h)),
                    'stream')
        return Stream(self, h.value)

    def _handle(self):
        self.client.handle()
        if self.h is None:
            raise errors.DmcacheError('the dataset is closed')
        return self.h

    def close(self):
        c = self.client
        with c.lock:
            if self.h is not None and c.h is not None and not c.forked:
                dmc_dataset_close(self.h)
            self.h = None


class Stream:
    """One epoch of batches computed and laid out by the daemon (dmcache.h, streams). While
    it runs, its connection serves nothing else."""

    def __init__(self, ds, h):
        self.ds = ds
        self.h = h
        self.batches = dmc_stream_batches(h)

    def item(self, q):
        """The dataset index at this rank's position q."""
        return dmc_stream_item(self.h, q)

    def next(self):
        """The next BatchInfo (its items valid until the next call), or None at the end."""
        b = BatchInfo()
        c = self.ds.client
        with c.lock:
            if self.h is None:
                return None
            rc = dmc_stream_next(self.h, ctypes.byref(b))
            c.check(rc, 'stream')
        return b if rc > 0 else None

    def release(self, b):
        c = self.ds.client
        with c.lock:
            if self.h is None or c.h is None or c.forked:
                return
            c.check(dmc_batch_release(self.h, ctypes.byref(b)), 'release')

    def close(self):
        c = self.ds.client
        with c.lock:
            h, self.h = self.h, None
            if h is None:
                return
            if c.h is None or c.forked:
                return  # nothing to say to the daemon: the connection is gone
            dmc_stream_close(h)


def item_bytes(item):
    """A read-only memoryview of an item's tensor bytes in the arena (no copy)."""
    if item.nbytes == 0:
        return memoryview(b'')
    buf = (ctypes.c_char * item.nbytes).from_address(item.data)
    return memoryview(buf).cast('B').toreadonly()


def item_meta(item):
    """The item's metadata JSON as bytes (a copy)."""
    return ctypes.string_at(item.meta, item.meta_len) if item.meta_len else b'{}'


def version():
    return _s(dmc_version())
