"""The Loader's split= and filter=: which items of the pinned version it reads, made into
an indices= subset (then read, shuffled and sharded as indices= is: the daemon's
permutation of the subset's positions, DistributedSampler's partition, seedable).

split='train': the project's split of that name, as the Datamint server lists it
(GET /projects/{id}/splits?split_name=train, the caller's key, as_of_timestamp the pinned
version): the items whose resource id is in it (with return_frame_by_frame, every frame
of such a resource). The daemon does not carry splits: the list is asked for here, once,
in the constructor.

filter=: a callable(meta) -> bool on each item's metadata (ItemMeta: the resource record,
'labels', ...), or label names (a str or a set/list of them): the items with at least one
of those labels.

Both read every item's metadata once, in the constructor (a GET of each item: one pass
over the dataset, which also brings it into the cache).
"""
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request

from . import _lib, errors

SCAN_BATCH = 8
TIMEOUT_S = 60


def split_resource_ids(loader, split):
    """The resource ids of split `split` of the loader's project at its pinned version."""
    if loader._source == _lib.SOURCE_LOCAL:
        raise ValueError("split=%r: a local dataset folder has no splits (split= is for "
                         "Datamint projects)" % (split,))
    if loader.offline:
        raise ValueError("split=%r needs the server (offline=True): the daemon does not "
                         "keep a project's splits" % (split,))
    first = loader._connections()[0].ds
    project = first.project_id or loader._project
    server = (loader._server or '').rstrip('/')
    query = urllib.parse.urlencode({'split_name': split, 'as_of_timestamp': loader.version})
    url = '%s/projects/%s/splits?%s' % (server, urllib.parse.quote(project, safe=''), query)
    req = urllib.request.Request(url, headers={'apikey': loader._key or '',
                                               'Accept': 'application/json'})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S,
                                    context=ssl.create_default_context()) as r:
            body = json.loads(r.read().decode('utf-8'))
    except urllib.error.HTTPError as e:
        cls = errors.KeyRefusedError if e.code in (401, 403) else errors.NotFoundError \
            if e.code == 404 else errors.UpstreamPermanentError
        raise cls("split=%r: GET /projects/%s/splits on %s answered HTTP %d" %
                  (split, project, server, e.code), code=1003 if e.code in (401, 403, 404)
                  else 1005, name='not_found_or_denied' if e.code in (401, 403, 404)
                  else 'upstream_permanent', http_status=e.code) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise errors.UpstreamTransientError(
            "split=%r: cannot read the splits of project '%s' from %s: %s" %
            (split, project, server, e), code=1004, name='upstream_transient') from None
    rows = body.get('data', body) if isinstance(body, dict) else body
    if not isinstance(rows, list):
        raise errors.UpstreamPermanentError(
            'split=%r: %s/projects/%s/splits is not a list' % (split, server, project),
            code=1005, name='upstream_permanent')
    return {r['resource_id'] for r in rows
            if isinstance(r, dict) and r.get('split_name') == split and
            not r.get('deleted_at') and isinstance(r.get('resource_id'), str)}


def label_filter(spec):
    """filter= as a callable(meta) -> bool."""
    if callable(spec):
        return spec
    names = {spec} if isinstance(spec, str) else set(spec)
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError('filter= must be a callable(meta) -> bool or label names')
    return lambda meta: bool(names.intersection(meta.get('labels') or ()))


def scan(loader):
    """(index, ItemMeta) of every item, read with GETs of SCAN_BATCH items."""
    ds = loader._connections()[0].ds
    for start in range(0, loader.items, SCAN_BATCH):
        idx = list(range(start, min(start + SCAN_BATCH, loader.items)))
        items = ds.get(idx)
        try:
            metas = []
            for k in range(len(idx)):
                it = items[k]
                if it.status:
                    raise _lib.item_error(it)
                # the Loader's cache: the metadata read here is not parsed again
                metas.append((int(it.index), loader._item_metas([it])[0]))
        finally:
            ds.release(items)
        yield from metas


def select(loader, split, filter_):
    """The sorted item indices that split= and filter= keep (all items when both are None
    would be returned; the caller only asks with one of them set)."""
    ids = split_resource_ids(loader, split) if split is not None else None
    keep = label_filter(filter_) if filter_ is not None else None
    out = []
    for index, meta in scan(loader):
        if ids is not None and (meta.get('resource') or {}).get('id') not in ids:
            continue
        if keep is not None and not keep(meta):
            continue
        out.append(index)
    return out
