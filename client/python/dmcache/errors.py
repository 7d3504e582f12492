"""Errors of the dmcache package.

Every failure of libdmcache becomes a DmcacheError (or a subclass named after the daemon's
error code) carrying:

  code            the daemon's error code (enum dmc_error in proto.h, 1001..) or, for a
                  local failure, the errno value (ENOENT, ECONNREFUSED, ...)
  name            the code's stable name ('not_found_or_denied') or errno name ('ENOENT')
  message         the daemon's message, else the library's description
  resource        the resource id concerned, '' when none
  http_status     the upstream HTTP status (UPSTREAM_PERMANENT), else 0
  retry_after_ms  when to try again (UPSTREAM_TRANSIENT, OVERLOADED), else 0
  sys_errno       the daemon's errno for IO errors, else 0
  index           the item index, for a failure of one item, else None

The constructor takes the text as its only positional argument, so that PyTorch's
DataLoader can raise a worker's error again in the main process; str() of the error
names the code, the message and the resource.
"""
import errno as _errno

# enum dmc_error (proto.h): numbers and stable names, never reused.
CODES = {
    1001: 'protocol',
    1002: 'unsupported',
    1003: 'not_found_or_denied',
    1004: 'upstream_transient',
    1005: 'upstream_permanent',
    1006: 'integrity',
    1007: 'cache_full',
    1008: 'limit_exceeded',
    1009: 'decode_failed',
    1010: 'io',
    1011: 'overloaded',
    1012: 'internal',
    1013: 'invalid_argument',
    1014: 'cancelled',
}
FIRST_CODE, LAST_CODE = 1001, 1014


class DmcacheError(Exception):
    """A failure reported by the daemon or by libdmcache."""

    def __init__(self, message='', code=0, name='', resource='', http_status=0,
                 retry_after_ms=0, sys_errno=0, index=None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.name = name
        self.resource = resource
        self.http_status = http_status
        self.retry_after_ms = retry_after_ms
        self.sys_errno = sys_errno
        self.index = index

    def __str__(self):
        # A DataLoader worker's error comes back as cls(str(err)): that text is final.
        if not self.code:
            return self.message
        s = '[%s] %s' % (self.name or self.code, self.message)
        if self.index is not None:
            s += ' (item %d)' % self.index
        if self.resource:
            s += " (resource '%s')" % self.resource
        if self.http_status:
            s += ' (HTTP %d)' % self.http_status
        return s

    def __reduce__(self):
        return (_rebuild, (type(self), self.message, self.code, self.name, self.resource,
                           self.http_status, self.retry_after_ms, self.sys_errno, self.index))


def _rebuild(cls, *args):
    return cls(*args)


class ProtocolError(DmcacheError):
    """The daemon found a request malformed (a library bug)."""


class UnsupportedError(DmcacheError):
    """No common protocol version, or an operation the daemon does not know."""


class NotFoundError(DmcacheError, LookupError):
    """The dataset or item does not exist, or the caller's key is not entitled to it."""


class KeyRefusedError(NotFoundError, PermissionError):
    """The Datamint server refused the caller's own API key (http_status 401: unknown or
    revoked key; 403: the key may not do this). Still a NotFoundError (the daemon's code is
    not_found_or_denied) and also a PermissionError; a dataset the key is not entitled to
    without the server saying so is a plain NotFoundError, like an absent one."""


class UpstreamTransientError(DmcacheError):
    """Datamint failed temporarily and retries were exhausted; see retry_after_ms."""


class UpstreamPermanentError(DmcacheError):
    """Datamint refused the request; see http_status."""


class UpstreamRefusedError(UpstreamPermanentError, PermissionError):
    """Datamint refused the request with 401 or 403 (see http_status)."""


class IntegrityError(DmcacheError):
    """Downloaded bytes did not match their recorded digest."""


class CacheFullError(DmcacheError):
    """The cache reached max_size or min_free and nothing could be evicted."""


class LimitExceededError(DmcacheError):
    """A configured size or time limit, e.g. an item larger than the shared memory."""


class DecodeError(DmcacheError):
    """The decoder rejected the file or crashed on it."""


class DaemonIOError(DmcacheError):
    """The daemon failed to read or write its cache; see sys_errno."""


class OverloadedError(DmcacheError):
    """Too many connections or queued requests; see retry_after_ms."""


class InternalError(DmcacheError):
    """A bug in the daemon."""


class InvalidArgumentError(DmcacheError, ValueError):
    """A well-formed request with a bad value (e.g. an index out of range)."""


class CancelledError(DmcacheError):
    """The job was cancelled or the daemon is stopping."""


class ConnectError(DmcacheError, ConnectionError):
    """No daemon could be reached, or the socket belongs to an untrusted user."""


class DaemonConnectionError(DmcacheError, ConnectionError):
    """The connection to the daemon broke or timed out."""


_BY_CODE = {
    1001: ProtocolError, 1002: UnsupportedError, 1003: NotFoundError,
    1004: UpstreamTransientError, 1005: UpstreamPermanentError, 1006: IntegrityError,
    1007: CacheFullError, 1008: LimitExceededError, 1009: DecodeError, 1010: DaemonIOError,
    1011: OverloadedError, 1012: InternalError, 1013: InvalidArgumentError,
    1014: CancelledError,
}

_BROKEN = {_errno.ECONNRESET, _errno.EPIPE, _errno.EPROTO, _errno.ETIMEDOUT, _errno.ENOTCONN}


_REFUSED = {1003: KeyRefusedError, 1005: UpstreamRefusedError}


def error_class(code, connecting=False, http_status=0):
    """The exception class for a daemon code (1001..) or an errno value (and the HTTP
    status the daemon sent with it: 401/403 make the PermissionError subclasses)."""
    if http_status in (401, 403) and code in _REFUSED:
        return _REFUSED[code]
    if code in _BY_CODE:
        return _BY_CODE[code]
    if connecting:
        return ConnectError
    if code in _BROKEN:
        return DaemonConnectionError
    return DmcacheError


def code_name(code):
    if code in CODES:
        return CODES[code]
    return _errno.errorcode.get(code, str(code))
