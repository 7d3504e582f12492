"""Images of dmcache.Dataset kept as private views of the daemon's region, not copied out.

A hot item the daemon hands in place lies in the snapshot's region, a file this process
already maps read-only (the connection's OPEN passed it). Dataset.read() maps such an
item's pages on their own, private and copy-on-write (dmc_item_map()): the array is the
caller's as a copy would be (writable; a write makes this process's own page, which no
other view and no other process sees), without the copy and its page faults. The item
stays pinned in the daemon while its view lives, so that its pages keep their bytes: it is
released (in the Dataset's batches of RELEASE_LATER) only after the view is unmapped, when
the last array over it goes.

A view must never outlive its pin. Two things end pins early, and both turn every live
view into anonymous memory at the same address first (dmc_view_detach(), a copy of what
is still alive then):
  - the Dataset's close() (the connection's pins go with it);
  - fork(): the child inherits the mapping but not the pin, and the parent may release
    the item while the child still reads it. The parent detaches its views before every
    os.fork() (os.register_at_fork), holding their locks across the fork, so parent and
    child share anonymous pages and no other thread makes a view meanwhile.

Bounded: at most VIEWS_MAX live views per connection (each pins a region entry and holds
its metadata in the arena); beyond that, and for items under VIEW_MIN_BYTES (a copy is
cheaper than a mapping), read() copies as before.

Which thread: any. A view's end runs in whichever thread drops the last array (or the
garbage collector's); Views.lock (reentrant: the collector may run inside a locked section)
orders it against detach_all().
"""
import ctypes
import collections
import os
import threading
import weakref

import numpy as np

from . import _lib

VIEWS_MAX = 256
VIEW_MIN_BYTES = 64 << 10

_lib.dmc_item_map = _lib._fn('dmc_item_map', ctypes.c_int, ctypes.c_void_p,
                             ctypes.POINTER(_lib.Item), ctypes.POINTER(ctypes.c_void_p))
_lib.dmc_view_detach = _lib._fn('dmc_view_detach', ctypes.c_int, ctypes.c_void_p,
                                _lib.u64)
_lib.dmc_view_unmap = _lib._fn('dmc_view_unmap', ctypes.c_int, ctypes.c_void_p, _lib.u64)

PINNED, DETACHED, GONE = 0, 1, 2

# every Views of this process: detached before fork()
_ALL = weakref.WeakSet()


class _View:
    __slots__ = ('addr', 'nbytes', 'item', 'state', 'ref', '__weakref__')


class Views:
    """The live views of one connection's dataset (a _lib.Dataset)."""

    def __init__(self, ds):
        self.ds = ds  # kept alive, with its connection, while a view lives (the pins)
        self.lock = threading.RLock()
        self.live = set()
        # items whose view went: to RELEASE (Dataset._release()), oldest first
        self.unpinned = collections.deque()
        self.pid = os.getpid()
        _ALL.add(self)

    def array(self, it, dtype, shape):
        """A numpy array of `it` (an Item handed in place) over its own private view, or
        None when it must be copied instead (not in the region, small, too many views, or
        the mapping failed). On success the item is this object's to release: the caller
        must not release it."""
        if (not it.region or it.nbytes < VIEW_MIN_BYTES or len(self.live) >= VIEWS_MAX
                or self.pid != os.getpid()):
            return None
        p = ctypes.c_void_p()
        if _lib.dmc_item_map(self.ds.h, ctypes.byref(it), ctypes.byref(p)) < 0:
            return None
        buf = (ctypes.c_char * it.nbytes).from_address(p.value)
        v = _View()
        v.addr, v.nbytes, v.item, v.state = p.value, it.nbytes, _lib.Item.from_buffer_copy(
            it), PINNED
        v.ref = weakref.ref(buf)
        with self.lock:
            self.live.add(v)
        # not at exit: arrays may still be read by later exit handlers, and the process's
        # end unmaps and unpins everything anyway
        weakref.finalize(buf, self._gone, v).atexit = False
        return np.frombuffer(buf, dtype=dtype).reshape(shape)

    def _gone(self, v):
        """The last array over v went: unmapped, and its item queued for RELEASE."""
        with self.lock:
            if v.state == GONE:
                return
            _lib.dmc_view_unmap(v.addr, v.nbytes)
            if v.state == PINNED and self.pid == os.getpid():
                self.unpinned.append(v.item)
            v.state = GONE
            self.live.discard(v)

    def take_unpinned(self):
        """The items whose views went since the last call."""
        out = []
        while True:
            try:
                out.append(self.unpinned.popleft())
            except IndexError:
                return out

    def detach_all(self):
        """Every live view made anonymous memory in place (a copy); their items are then
        queued for RELEASE. Returns how many were detached."""
        n = 0
        with self.lock:
            for v in list(self.live):
                buf = v.ref()  # held: its view cannot end while it is detached
                if buf is None or v.state != PINNED:
                    continue
                if _lib.dmc_view_detach(v.addr, v.nbytes) < 0:
                    # no memory for the copy: the view stays pinned (never released), so
                    # its bytes stay right while this connection lives; after close() or
                    # in a forked child they may not (a process out of memory)
                    continue
                v.state = DETACHED
                self.unpinned.append(v.item)
                n += 1
                del buf
        return n


# the Views whose locks the forking thread holds across fork(): no other thread makes a
# view, or ends one, between their detach and the fork
_HELD = []


def _before_fork():
    for views in list(_ALL):
        if views.pid != os.getpid():
            continue
        views.lock.acquire()
        _HELD.append(views)
        try:
            views.detach_all()
        except Exception:
            pass


def _after_fork_parent():
    while _HELD:
        _HELD.pop().lock.release()


def _after_fork_child():
    # the child's only thread: the copied locks (held by the parent's thread) are dropped
    for views in _HELD:
        views.lock = threading.RLock()
    _HELD.clear()


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_parent,
                        after_in_child=_after_fork_child)
