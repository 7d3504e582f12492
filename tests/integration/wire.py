"""An independent Python encoding of the dmcache wire protocol (proto/proto.h), for tests.

Written from the specification, not from proto.c, so that the daemon is checked against
the document. Little-endian 16-byte header: length u32, opcode u16, flags u16,
request_id u32, nfds u8, 3 reserved bytes.
"""
import socket
import struct

HEADER = struct.Struct('<IHHIB3x')
HEADER_SIZE = 16
FRAME_MAX = 1 << 20

OP_HELLO, OP_PING, OP_STATUS, OP_ERROR = 1, 2, 3, 4
FLAG_REPLY, FLAG_MORE = 1, 2

E = {
    'protocol': 1001, 'unsupported': 1002, 'not_found_or_denied': 1003,
    'upstream_transient': 1004, 'upstream_permanent': 1005, 'integrity': 1006,
    'cache_full': 1007, 'limit_exceeded': 1008, 'decode_failed': 1009, 'io': 1010,
    'overloaded': 1011, 'internal': 1012, 'invalid_argument': 1013, 'cancelled': 1014,
}


def s(b):
    if isinstance(b, str):
        b = b.encode()
    return struct.pack('<I', len(b)) + b


def frame(op, payload=b'', flags=0, rid=1, nfds=0):
    return HEADER.pack(len(payload), op, flags, rid, nfds) + payload


def hello(rid=1, vmin=1, vmax=1, client='wire.py'):
    return frame(OP_HELLO, struct.pack('<II', vmin, vmax) + s(client), rid=rid)


def status(rid=2):
    return frame(OP_STATUS, b'', rid=rid)


def ping(token, rid=3):
    return frame(OP_PING, struct.pack('<Q', token), rid=rid)


class Reader:
    def __init__(self, b):
        self.b, self.pos = b, 0

    def take(self, n):
        if self.pos + n > len(self.b):
            raise ValueError('short payload')
        v = self.b[self.pos:self.pos + n]
        self.pos += n
        return v

    def u8(self):
        return self.take(1)[0]

    def u32(self):
        return struct.unpack('<I', self.take(4))[0]

    def i32(self):
        return struct.unpack('<i', self.take(4))[0]

    def u64(self):
        return struct.unpack('<Q', self.take(8))[0]

    def i64(self):
        return struct.unpack('<q', self.take(8))[0]

    def str(self):
        return self.take(self.u32()).decode()

    def done(self):
        if self.pos != len(self.b):
            raise ValueError('trailing bytes')


def recv_exact(sock, n):
    buf = b''
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError('connection closed after %d of %d bytes' % (len(buf), n))
        buf += chunk
    return buf


def recv_frame(sock):
    length, op, flags, rid, nfds = HEADER.unpack(recv_exact(sock, HEADER_SIZE))
    return op, flags, rid, recv_exact(sock, length)


def decode_error(payload):
    r = Reader(payload)
    e = dict(code=r.u32(), http_status=r.u32(), retry_after_ms=r.u32(), sys_errno=r.i32(),
             resource=r.str(), message=r.str())
    r.done()
    return e


def decode_status(payload):
    r = Reader(payload)
    out = dict(version=r.str(), uptime_ms=r.u64(), pid=r.u32())
    out['counters'] = {r.str(): r.i64() for _ in range(r.u32())}
    r.done()
    return out


def decode_hello_reply(payload):
    r = Reader(payload)
    out = dict(version=r.u32(), daemon_uid=r.u32(), frame_max=r.u32(), daemon=r.str())
    r.done()
    return out


def connect(path, timeout=10):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def session(path, timeout=10):
    """A connection that has said HELLO."""
    sock = connect(path, timeout)
    sock.sendall(hello())
    op, flags, rid, payload = recv_frame(sock)
    assert (op, flags, rid) == (OP_HELLO, FLAG_REPLY, 1), (op, flags, rid, payload)
    return sock


def get_status(sock, rid=2):
    sock.sendall(status(rid))
    op, flags, r, payload = recv_frame(sock)
    assert (op, flags, r) == (OP_STATUS, FLAG_REPLY, rid), (op, flags, r)
    return decode_status(payload)


def is_closed(sock, timeout=5):
    """True when the peer closed the connection (EOF or reset) within `timeout`."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


OP_OPEN, OP_GET, OP_RELEASE, OP_CLOSE = 32, 33, 34, 36


def open_msg(project, source=1, flags=0, dtype=0, version='', server='', key='', arena=0, rid=5):
    return frame(OP_OPEN, struct.pack('<III', source, flags, dtype) + s(project) + s(version)
                 + s(server) + s(key) + struct.pack('<Q', arena), rid=rid)


def get_msg(handle, indices, rid=6):
    return frame(OP_GET, struct.pack('<QI', handle, len(indices))
                 + b''.join(struct.pack('<Q', i) for i in indices), rid=rid)


def recv_frame_fds(sock):
    """A frame and the descriptors that came with it."""
    import array
    fds = array.array('i')
    data, anc, flags, _ = sock.recvmsg(HEADER_SIZE, socket.CMSG_SPACE(4 * 4))
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % 4])
    data += recv_exact(sock, HEADER_SIZE - len(data))
    length, op, fl, rid, nfds = HEADER.unpack(data)
    return op, fl, rid, recv_exact(sock, length), list(fds)


OPEN_REGIONS = 64  # proto.h DMC_OPEN_REGIONS


def decode_open_reply(payload, regions=False):
    """An OPEN reply; with regions (the OPEN had DMC_OPEN_REGIONS), region_id and
    region_bytes too."""
    r = Reader(payload)
    out = dict(handle=r.u64(), snapshot_id=r.u64(), items=r.u64(), project_id=r.str(),
               project_name=r.str(), version=r.str(), arena_bytes=r.u64())
    if regions:
        out.update(region_id=r.u64(), region_bytes=r.u64())
    r.done()
    return out


def decode_get_reply(payload, regions=False):
    """A GET reply's items; with regions (a handle opened with DMC_OPEN_REGIONS), each
    item's in_region too."""
    r = Reader(payload)
    items = read_items(r, r.u32(), regions)
    r.done()
    return items


def read_items(r, n, regions):
    """n item records, then (regions) each one's in_region byte: GET's reply and STREAM's
    batch event end the same way."""
    items = []
    for _ in range(n):
        d = dict(index=r.u64(), status=r.u32(), dtype=r.u32(), ndim=r.u32())
        d['shape'] = [r.u64() for _ in range(4)]
        d.update(offset=r.u64(), nbytes=r.u64(), meta_offset=r.u64(), meta_len=r.u64(),
                 message=r.str())
        items.append(d)
    for d in items:
        d['in_region'] = r.u8() if regions else 0
    return items


OP_STREAM, OP_STOP = 35, 37


def stream_msg(handle, batch_size, seed=0, epoch=0, flags=0, rank=0, world_size=1, ahead=0,
               rid=20):
    return frame(OP_STREAM, struct.pack('<QQQIIIII', handle, seed, epoch, flags, rank,
                                        world_size, batch_size, ahead), rid=rid)


def stop_msg(stream_rid, rid=21):
    return frame(OP_STOP, struct.pack('<I', stream_rid), rid=rid)


def decode_batch_event(payload, regions=False):
    """A STREAM batch event: its head and items; with regions (a handle opened with
    DMC_OPEN_REGIONS), each item's in_region from the trailer."""
    r = Reader(payload)
    head = dict(batch=r.u64(), n=r.u32(), uniform=r.u32(), data_offset=r.u64(),
                data_len=r.u64(), meta_offset=r.u64(), meta_len=r.u64())
    items = read_items(r, head['n'], regions)
    r.done()
    head['items'] = items
    return head
