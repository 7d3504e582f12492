"""Fault rules the tests switch on and off while the emulator runs (reliability.md N1-N7).

A rule matches requests by method, path regex, listener and user, skips the first `skip`
matches, then applies to at most `times` requests (null = every one). The first rule that
matches and still has uses left applies; the others are not consulted for that request.

Actions (any combination in one rule):
  latency_ms            sleep before the response headers
  status                answer this status instead (JSON body with "message")
  retry_after           with status: Retry-After in seconds (int) or verbatim (str)
  retry_after_date      with status: Retry-After as an HTTP date, this many seconds ahead
  message               with status: the "message" text
  redirect              302 to the redirect listener (pre-signed-URL pattern)
  rate_bps              cap the body at this many bytes per second (>= 1)
  drop_after            send this many body bytes, then close the connection
  flip                  list of body offsets whose bytes are XORed with 0xFF (same length)
  flip_count            flip this many bytes spread evenly over the body
  content_length_delta  announce Content-Length = real length + delta, then close
  ignore_range          answer 200 with the whole body even when Range is sent
  mutate                after the response, change the served file's content (new ETag)
  close                 close the connection without any response
"""
import re
import threading

ACTIONS = {'latency_ms', 'status', 'retry_after', 'retry_after_date', 'message', 'redirect',
           'rate_bps', 'drop_after', 'flip', 'flip_count', 'content_length_delta',
           'ignore_range', 'mutate', 'close'}
MATCH = {'method', 'path', 'listener', 'user', 'skip', 'times'}


class FaultError(ValueError):
    pass


class Rule:
    def __init__(self, rid, spec):
        unknown = set(spec) - ACTIONS - MATCH - {'id'}
        if unknown:
            raise FaultError('unknown fault fields: %s' % ', '.join(sorted(unknown)))
        self.id = rid
        self.spec = dict(spec)
        self.method = spec.get('method')
        try:
            self.path = re.compile(spec.get('path') or '')
        except re.error as e:
            raise FaultError('bad path regex: %s' % e)
        self.listener = spec.get('listener', 'main')
        if self.listener not in ('main', 'redirect', 'any'):
            raise FaultError('listener must be main, redirect or any')
        self.user = spec.get('user')
        self.skip = _int(spec, 'skip', 0) if spec.get('skip') is not None else 0
        self.times = spec.get('times')
        if self.times is not None:
            self.times = _int(spec, 'times', 0)
        st = spec.get('status')
        if st is not None and (not isinstance(st, int) or not 100 <= st <= 599):
            raise FaultError('status must be an HTTP status code')
        rate = spec.get('rate_bps')
        if rate is not None and (not isinstance(rate, (int, float)) or rate < 1):
            raise FaultError('rate_bps must be >= 1')
        for k in ('drop_after', 'flip_count', 'latency_ms'):
            if spec.get(k) is not None:
                _int(spec, k, 0)
        if spec.get('flip') is not None and not (
                isinstance(spec['flip'], list) and all(isinstance(x, int) and x >= 0 for x in spec['flip'])):
            raise FaultError('flip must be a list of non-negative offsets')
        self.matched = 0
        self.applied = 0

    def get(self, k, default=None):
        v = self.spec.get(k)
        return default if v is None else v

    def public(self):
        out = dict(self.spec)
        out.update(id=self.id, matched=self.matched, applied=self.applied)
        return out


def _int(spec, k, minimum):
    v = spec.get(k)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise FaultError('%s must be an integer >= %d' % (k, minimum))
    return v


class Faults:
    def __init__(self):
        self.lock = threading.Lock()
        self.rules = []
        self.seq = 0

    def add(self, spec):
        if not isinstance(spec, dict):
            raise FaultError('a fault is a JSON object')
        with self.lock:
            self.seq += 1
            rule = Rule(self.seq, spec)
            self.rules.append(rule)
            return rule

    def remove(self, rid):
        with self.lock:
            n = len(self.rules)
            self.rules = [r for r in self.rules if r.id != rid]
            return len(self.rules) != n

    def clear(self):
        with self.lock:
            self.rules = []

    def list(self):
        with self.lock:
            return [r.public() for r in self.rules]

    def match(self, listener, method, path, user):
        with self.lock:
            for r in self.rules:
                if r.listener != 'any' and r.listener != listener:
                    continue
                if r.method and r.method.upper() != method:
                    continue
                if not r.path.search(path):
                    continue
                if r.user and r.user != user:
                    continue
                r.matched += 1
                if r.matched <= r.skip:
                    continue
                if r.times is not None and r.applied >= r.times:
                    continue
                r.applied += 1
                return r
        return None
