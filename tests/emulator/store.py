"""The emulator's data: projects, datasets, resources, annotations, API keys.

Shapes follow the Datamint REST API; section numbers are cited where a field or a rule
comes from. One RLock guards everything; HTTP threads call in and get plain data back.
Synthetic projects (up to millions of items) are never materialised: item i is computed
from its index, its id encodes the index, and listings are walked lazily.
"""
import hashlib
import json
import os
import shutil
import struct
import tempfile
import threading
import time
import uuid

NS = uuid.UUID('5b0f6f0e-2d7c-4c55-9d8e-0d3c0a7e1a11')  # same namespace as the corpus
SYNTH_MIME = 'application/octet-stream'


class NotFound(Exception):
    """Missing or not entitled: both look the same to a client (docs/security.md).

    An entity that does not exist answers 404 {"statusCode":404,"message":"Not Found",...}
    (NestJS's NotFoundException without a text): the seed-era client raises
    ResourceNotFoundError only when message == 'Not Found' (datamintapi/api_handler.py
    @af98a24 _check_errors_response), the 2.x client on 'Not Found' in the text
    (datamint/api/base_api.py@v2.29.0 line 451). The 1.x clients (2024-11-12 to 1.9.3) want
    ' not found' in the message instead: with --not-found-style text (ENTITY_STYLE) the
    descriptive text ('Resource not found') is sent."""

    def __init__(self, message='Not Found', entity=False):
        if entity and ENTITY_STYLE[0] == 'nest':
            message = 'Not Found'
        super().__init__(message)


ENTITY_STYLE = ['nest']  # 'nest' | 'text' (emulator --not-found-style)


def entity_not_found(what):
    return NotFound('%s not found' % what, entity=True)


class BadRequest(Exception):
    pass


class Conflict(Exception):
    pass


def _rid(*parts):
    return str(uuid.uuid5(NS, '/'.join(map(str, parts))))


class Clock:
    """ISO-8601 UTC with milliseconds and Z; strictly increasing, because clients compare
    dataset `updated_at` values as strings (the server's dataset listing)."""

    def __init__(self):
        self.last = 0
        self.lock = threading.Lock()

    def now(self):
        with self.lock:
            ms = max(int(time.time() * 1000), self.last + 1)
            self.last = ms
        return iso_ms(ms)


def iso_ms(ms):
    return time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(ms // 1000)) + '.%03dZ' % (ms % 1000)


class LazyList:
    """A JSON array produced item by item (each item already JSON text, as str)."""

    def __init__(self, gen):
        self.gen = gen

    def __iter__(self):
        return iter(self.gen())


def iter_json(obj):
    """Encode obj to JSON as a stream of str pieces; LazyList values are streamed."""
    if isinstance(obj, LazyList):
        yield '['
        first = True
        for text in obj:
            yield text if first else ',' + text
            first = False
        yield ']'
    elif isinstance(obj, dict) and any(isinstance(v, (LazyList, dict, list)) for v in obj.values()):
        yield '{'
        for n, (k, v) in enumerate(obj.items()):
            yield ('' if n == 0 else ',') + json.dumps(k) + ':'
            yield from iter_json(v)
        yield '}'
    elif isinstance(obj, list) and any(isinstance(v, (LazyList, dict, list)) for v in obj):
        yield '['
        for n, v in enumerate(obj):
            if n:
                yield ','
            yield from iter_json(v)
        yield ']'
    else:
        yield json.dumps(obj)


def has_lazy(obj):
    if isinstance(obj, LazyList):
        return True
    if isinstance(obj, dict):
        return any(has_lazy(v) for v in obj.values())
    if isinstance(obj, list):
        return any(has_lazy(v) for v in obj)
    return False


NIFTI_MIME = 'application/nifti'  # what the clients dispatch on (api_handler.py@af98a24
# line 1034 convert_format; medimgkit DEFAULT_NIFTI_MIME at v2.29.0)
NIFTI_MIMES = ('application/nifti', 'application/x-nifti', 'image/x.nifti')


def norm_mime(m):
    """Upload mimetypes as stored: every NIfTI name becomes application/nifti."""
    return NIFTI_MIME if (m or '').lower() in NIFTI_MIMES else m


def _label_pos(k):
    """labels[10] after labels[9]."""
    try:
        return (0, int(k[7:-1])) if k.startswith('labels[') else (1, 0)
    except ValueError:
        return (1, 0)


def storage_for(mimetype):
    """`storage` values seen at HEAD (README: What the API does)."""
    m = mimetype or ''
    if m == 'application/dicom':
        return 'DicomResource'
    if 'nifti' in m:
        return 'NiftiResource'
    if m.startswith('video/'):
        return 'VideoResource'
    if m.startswith('image/'):
        return 'ImageResource'
    return 'ImageResource'


def parse_bool(v, default=None):
    """Booleans arrive as True/False (requests) or true/false (httpx): §3.0."""
    if v is None:
        return default
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ('true', '1', 'yes'):
        return True
    if s in ('false', '0', 'no', ''):
        return False
    raise BadRequest('invalid boolean %r' % v)


def parse_filter(v):
    """`project` / `tags` filters: JSON {"items":[...],"filterType":"union"|"intersection"}
    (README: What the API does). A bare string is one item."""
    if v is None or v == '':
        return None
    try:
        obj = json.loads(v)
    except ValueError:
        return [v], 'union'
    if isinstance(obj, dict):
        items = obj.get('items') or []
        ftype = obj.get('filterType') or 'union'
        if ftype not in ('union', 'intersection'):
            raise BadRequest('filterType must be union or intersection')
        return [str(i) for i in items], ftype
    if isinstance(obj, list):
        return [str(i) for i in obj], 'union'
    return [str(obj)], 'union'


def _match_set(have, flt):
    if flt is None:
        return True
    items, ftype = flt
    if not items:
        return True
    if ftype == 'intersection':
        return all(i in have for i in items)
    return any(i in have for i in items)


class Content:
    """The bytes behind a file response: a file on disk (served with sendfile) or a
    synthetic item (computed)."""

    def __init__(self, path=None, synthetic=None, size=0, etag=None, sha256=None):
        self.path = path
        self.synthetic = synthetic
        self.size = size
        self.etag = etag
        self.sha256 = sha256  # raw digest bytes, sent as Repr-Digest (RFC 9530)

    def read(self, start, end):
        if self.synthetic:
            sp, i = self.synthetic
            return sp.content(i, start, end)
        with open(self.path, 'rb') as f:
            f.seek(start)
            return f.read(end - start)


class Key:
    def __init__(self, key, user, projects):
        self.key = key
        self.user = user
        self.all = projects == '*'
        self.projects = set() if self.all else set(projects or ())

    def sees_project(self, name):
        return self.all or name in self.projects


class SyntheticProject:
    """A project of n items whose records and bytes are functions of the index.

    Item i: id  <h8>-5e00-4000-8000-<i:012x>, filename item-<i:07d>.bin,
    created_at = base + i seconds (bases are in January 2020, before every corpus item),
    bytes = 32-byte header (magic, project hash, index, version) + a slice of a fixed
    pseudo-random block, `size` bytes in all.
    """
    BLOCK = None

    def __init__(self, name, n, size, k, store):
        self.name = name
        self.n = n
        self.size = max(32, size)
        self.hash8 = hashlib.sha256(name.encode()).hexdigest()[:8]
        self.base_ms = (1577836800 + k * 30 * 86400) * 1000  # 2020-01-01 + 30 days per project
        self.versions = {}  # index -> content version (mutation faults)
        self.deleted = False
        if SyntheticProject.BLOCK is None:
            h = b''.join(hashlib.sha256(b'dmc-synthetic-%d' % i).digest() for i in range(32768))
            SyntheticProject.BLOCK = h + h[:1 << 20]  # 2 MiB so a slice never wraps twice
        self.channel = 'synthetic-' + name
        self.owner = 'alice@example.org'
        self.customer = _rid('customer', self.owner)
        tmpl = {
            'id': '@ID@', 'resource_uri': '/resources/@ID@/file', 'storage': 'ImageResource',
            'location': 'resources/%s/@ID@' % self.customer, 'upload_channel': self.channel,
            'filename': '@FN@', 'modality': 'OT', 'mimetype': SYNTH_MIME, 'size': self.size,
            'upload_mechanism': 'api', 'customer_id': self.customer, 'status': 'published',
            'created_at': '@TS@', 'created_by': self.owner, 'published': True,
            'published_on': '@TS@', 'published_by': self.owner, 'publish_transforms': None,
            'deleted': False, 'deleted_at': None, 'deleted_by': None,
            'metadata': {}, 'source_filepath': '@FN@', 'tags': ['synthetic'],
            'user_info': {'firstname': 'Alice', 'lastname': 'Example'},
            'projects': [{'id': '@PID@', 'name': name}], 'labels': [],
            'segmentations': None, 'measurements': None, 'categories': None}
        text = json.dumps(tmpl, separators=(',', ':')).replace('%', '%%')
        self.template = (text.replace('@ID@', '%(id)s').replace('@FN@', '%(fn)s')
                         .replace('@TS@', '%(ts)s').replace('@PID@', '%(pid)s'))
        self.project = None  # set by Store

    def item_id(self, i):
        return '%s-5e00-4000-8000-%012x' % (self.hash8, i)

    def index_of(self, rid):
        if len(rid) == 36 and rid.startswith(self.hash8) and rid[8:24] == '-5e00-4000-8000-':
            try:
                i = int(rid[24:], 16)
            except ValueError:
                return None
            if 0 <= i < self.n:
                return i
        return None

    def created_ms(self, i):
        return self.base_ms + i * 1000

    def item_json(self, i):
        return self.template % {'id': self.item_id(i), 'fn': 'item-%07d.bin' % i,
                                'ts': iso_ms(self.created_ms(i)), 'pid': self.project['id']}

    def item(self, i):
        return json.loads(self.item_json(i))

    def content(self, i, start=0, end=None):
        """Bytes [start, end) of item i's current content."""
        end = self.size if end is None else end
        v = self.versions.get(i, 0)
        head = struct.pack('<8s8sQQ', b'DMCSYN1\0', bytes.fromhex(self.hash8), i, v)
        out = bytearray()
        if start < 32:
            out += head[start:min(end, 32)]
        if end > 32:
            s = max(start, 32)
            off = (i * 1031 + v * 7919 + s - 32) % (1 << 20)
            out += SyntheticProject.BLOCK[off:off + end - s]
        return bytes(out)

    def etag(self, i):
        return '"syn-%s-%d-%d"' % (self.hash8, i, self.versions.get(i, 0))

    # ---- filters of GET /resources evaluated as an index range [lo, hi) ----
    def filter_range(self, q):
        lo, hi = 0, self.n
        status = q.get('status')
        if status not in (None, '', 'published'):
            return 0, 0
        for field, value in (('mimetype', SYNTH_MIME), ('modality', 'OT'),
                             ('channel_name', self.channel)):
            if q.get(field) not in (None, '') and q.get(field) != value:
                return 0, 0
        if not _match_set({self.name}, q.get('_project')):
            return 0, 0
        if q.get('projectId') not in (None, '') and q.get('projectId') != self.project['id']:
            return 0, 0
        if not _match_set({'synthetic'}, q.get('_tags')):
            return 0, 0
        fn = q.get('filename')
        if fn not in (None, ''):
            if not (fn.startswith('item-') and fn.endswith('.bin') and fn[5:-4].isdigit()):
                return 0, 0
            i = int(fn[5:-4])
            if fn != 'item-%07d.bin' % i:
                return 0, 0
            lo, hi = max(lo, i), min(hi, i + 1)
        for field, is_from in (('from', True), ('to', False)):
            d = q.get(field)
            if d in (None, ''):
                continue
            try:
                ms = int(time.mktime(time.strptime(d[:10], '%Y-%m-%d')) - time.timezone) * 1000
            except ValueError:
                raise BadRequest('invalid date %r' % d)
            # first index with created_ms >= ms
            idx = max(0, -(-(ms - self.base_ms) // 1000))
            if is_from:
                lo = max(lo, idx)
            else:
                hi = min(hi, idx)
        return lo, max(lo, hi)


class Store:
    def __init__(self, state_dir=None):
        self.lock = threading.RLock()
        self.clock = Clock()
        self.own_state = state_dir is None
        self.state_dir = state_dir or tempfile.mkdtemp(prefix='dmc-emulator-')
        os.makedirs(os.path.join(self.state_dir, 'blobs'), exist_ok=True)
        self.keys = {}
        self.admin_key = None
        self.projects = {}          # id -> project dict (public fields + '_' internals)
        self.resources = {}         # id -> resource dict (materialised)
        self.annotations = {}       # id -> annotation dict
        self.synthetic = []         # SyntheticProject
        self.tokens = {}            # Gen A download token -> zip info
        self.batches = {}           # upload batch id -> batch (README: What the API does)
        self.blob_seq = 0

    def close(self):
        if self.own_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    # ------------------------------------------------------------------ keys
    def load_keys(self, path):
        with open(path) as f:
            cfg = json.load(f)
        for k in cfg.get('keys', []):
            if not k.get('key') or not k.get('user'):
                raise ValueError('%s: every key needs "key" and "user"' % path)
            self.keys[k['key']] = Key(k['key'], k['user'], k.get('projects', []))
        if cfg.get('admin_key') and not self.admin_key:
            self.admin_key = cfg['admin_key']

    def auth(self, key):
        return self.keys.get(key) if key else None

    def users(self):
        seen = {}
        for k in self.keys.values():
            seen.setdefault(k.user, k)
        return sorted(seen)

    # ------------------------------------------------------------------ blobs
    def new_blob(self, data):
        with self.lock:
            self.blob_seq += 1
            path = os.path.join(self.state_dir, 'blobs', '%08d' % self.blob_seq)
        with open(path, 'wb') as f:
            f.write(data)
        return path

    # ------------------------------------------------------------------ projects
    def _new_project(self, name, description, created_by, created_at, synthetic=None):
        if any(p['name'] == name for p in self.projects.values()):
            raise Conflict('Project with name %s already exists' % name)
        pid = _rid('project', name)
        if pid in self.projects:
            pid = str(uuid.uuid4())
        p = {'id': pid, 'name': name, 'description': description, 'created_at': created_at,
             'created_by': created_by, 'dataset_id': _rid('dataset', pid),
             'worklist_id': _rid('worklist', pid), 'ai_model_id': None,
             'viewable_ai_segs': None, 'editable_ai_segs': None, 'most_recent_experiment': None,
             'archived': False,
             '_resources': [], '_synthetic': synthetic, '_updated_at': created_at,
             '_version': 1, '_customer': _rid('customer', created_by)}
        self.projects[pid] = p
        return p

    def load_corpus(self, corpus_dir):
        pdir = os.path.join(corpus_dir, 'projects')
        if not os.path.isdir(pdir):
            raise ValueError('%s: no projects/ directory (run tests/data/gen_corpus.py)' % corpus_dir)
        for name in sorted(os.listdir(pdir)):
            pj = os.path.join(pdir, name, 'project.json')
            if not os.path.isfile(pj):
                continue
            with open(pj) as f:
                spec = json.load(f)
            p = self._new_project(spec['name'], spec.get('description', ''),
                                  spec.get('created_by', 'alice@example.org'), spec['created_at'])
            latest = spec['created_at']
            for r in spec['resources']:
                path = os.path.join(pdir, name, r['file'])
                res = self._make_resource(
                    rid=r['id'], path=path, filename=r['filename'], mimetype=r['mimetype'],
                    modality=r.get('modality'), channel=r.get('channel'), tags=r.get('tags', []),
                    status=r.get('status', 'published'), created_at=r['created_at'],
                    owner=spec.get('created_by', 'alice@example.org'), size=r.get('size'),
                    metadata=r.get('metadata') or {}, source_filepath=r['file'])
                res['_projects'].append(p['id'])
                p['_resources'].append(res['id'])
                latest = max(latest, r['created_at'])
                for a in r.get('annotations', []):
                    apath = os.path.join(pdir, name, a['file']) if a.get('file') else None
                    self._make_annotation(res, a, p['worklist_id'], apath, a['created_at'])
                    latest = max(latest, a['created_at'])
            p['_updated_at'] = latest

    def add_synthetic(self, name, n, size=4096):
        with self.lock:
            if n < 0 or n > 10 ** 8:
                raise BadRequest('synthetic project size out of range')
            sp = SyntheticProject(name, n, size, len(self.synthetic), self)
            p = self._new_project(name, 'Synthetic project of %d items' % n, sp.owner,
                                  iso_ms(sp.base_ms), synthetic=sp)
            p['_updated_at'] = iso_ms(sp.created_ms(max(0, n - 1)) + 1000)
            sp.project = p
            self.synthetic.append(sp)
            return p

    def project_public(self, p):
        sp = p['_synthetic']
        if sp:
            count, annotated = sp.n, 0
        else:
            rs = [self.resources[r] for r in p['_resources'] if not self.resources[r]['deleted']]
            count = len(rs)
            annotated = sum(1 for r in rs if r['_annotations'])
        out = {k: v for k, v in p.items() if not k.startswith('_')}
        # Counts are strings except resources_to_annotate_count (§3.1 fixture).
        out.update({'resource_count': str(count), 'annotated_resource_count': str(annotated),
                    'closed_resources_count': '0', 'resources_to_annotate_count': count - annotated})
        return out

    def visible_projects(self, key):
        return [p for p in self.projects.values() if key.sees_project(p['name'])]

    def get_project(self, key, pid):
        p = self.projects.get(pid)
        if p is None or not key.sees_project(p['name']):
            raise entity_not_found('Project')
        return p

    def project_by_dataset(self, key, did):
        for p in self.projects.values():
            if p['dataset_id'] == did and key.sees_project(p['name']):
                return p
        raise entity_not_found('Dataset')

    def create_project(self, key, body):
        name = body.get('name')
        if not isinstance(name, str) or not name.strip():
            raise BadRequest('name must be a non-empty string')
        with self.lock:
            p = self._new_project(name, body.get('description') or '', key.user, self.clock.now())
            if not key.all:
                key.projects.add(name)
            ids = list(body.get('resource_ids') or [])
            aset = body.get('annotation_set') or {}
            ids += [i for i in aset.get('resource_ids') or [] if i not in ids]
            self.add_to_project(key, p, ids)
            return p

    def delete_project(self, key, pid):
        with self.lock:
            p = self.get_project(key, pid)
            for r in p['_resources']:
                self.resources[r]['_projects'].remove(pid)
            if p['_synthetic']:
                self.synthetic.remove(p['_synthetic'])
            del self.projects[pid]

    def touch(self, project_ids):
        """A project's content changed: bump its dataset's updated_at (§7.7)."""
        with self.lock:
            now = self.clock.now()
            for pid in set(project_ids):
                p = self.projects.get(pid)
                if p:
                    p['_updated_at'] = now
                    p['_version'] += 1

    def add_to_project(self, key, p, ids, remove=()):
        with self.lock:
            if p['_synthetic'] and (ids or remove):
                raise BadRequest('synthetic projects are read-only')
            for i in ids:
                r = self.get_resource(key, i)
                if p['id'] not in r['_projects']:
                    r['_projects'].append(p['id'])
                    p['_resources'].append(r['id'])
                    for aid in r['_annotations']:
                        a = self.annotations[aid]
                        if a['annotation_worklist_id'] is None:
                            a['annotation_worklist_id'] = p['worklist_id']
            for i in remove:
                r = self.get_resource(key, i)
                if p['id'] in r['_projects']:
                    r['_projects'].remove(p['id'])
                    p['_resources'].remove(r['id'])
            self.touch([p['id']])

    def dataset_public(self, p):
        """`GET /datasets` entry (README: What the API does)."""
        sp = p['_synthetic']
        if sp:
            ids = LazyList(lambda: ('"%s"' % sp.item_id(i) for i in range(sp.n)))
            total = sp.n
        else:
            ids = [r for r in p['_resources'] if not self.resources[r]['deleted']]
            total = len(ids)
        return {'id': p['dataset_id'], 'name': p['name'], 'created_at': p['created_at'],
                'created_by': p['created_by'], 'description': p['description'],
                'customer_id': p['_customer'], 'updated_at': p['_updated_at'],
                'last_version': p['_version'], 'total_resource': total, 'resource_ids': ids}

    # ------------------------------------------------------------------ resources
    def _make_resource(self, *, rid, path, filename, mimetype, modality, channel, tags, status,
                       created_at, owner, size=None, metadata=None, source_filepath=None):
        customer = _rid('customer', owner)
        published = status == 'published'
        first, _, last = owner.partition('@')[0].partition('.')
        res = {'id': rid, 'resource_uri': '/resources/%s/file' % rid,
               'storage': storage_for(mimetype), 'location': 'resources/%s/%s' % (customer, rid),
               'upload_channel': channel if channel else 'Unknown', 'filename': filename,
               'modality': modality, 'mimetype': norm_mime(mimetype),
               'size': size if size is not None else os.path.getsize(path),
               'upload_mechanism': 'api', 'customer_id': customer, 'status': status,
               'created_at': created_at, 'created_by': owner, 'published': published,
               'published_on': created_at if published else None,
               'published_by': owner if published else None, 'publish_transforms': None,
               'deleted': False, 'deleted_at': None, 'deleted_by': None,
               'metadata': metadata or {}, 'source_filepath': source_filepath or filename,
               'tags': list(tags), 'user_info': {'firstname': first.capitalize(),
                                                  'lastname': last.capitalize() or 'Example'},
               'segmentations': None, 'measurements': None, 'categories': None,
               '_path': path, '_version': 0, '_etag': None, '_projects': [], '_owner': owner,
               '_annotations': [], '_channel': channel}
        self.resources[rid] = res
        return res

    def image_labels(self, r):
        """The resource's labels: names of its image-scoped label annotations."""
        return sorted({self.annotations[a]['identifier'] for a in r['_annotations']
                       if self.annotations[a]['annotation_type'] == 'label'
                       and self.annotations[a]['frame_index'] is None
                       and not self.annotations[a]['deleted']})

    def resource_public(self, r):
        out = {k: v for k, v in r.items() if not k.startswith('_')}
        out['projects'] = [{'id': pid, 'name': self.projects[pid]['name']}
                           for pid in r['_projects'] if pid in self.projects]
        out['labels'] = self.image_labels(r)
        return out

    def sees_resource(self, key, r):
        if key.all or r['_owner'] == key.user:
            return True
        return any(key.sees_project(self.projects[p]['name']) for p in r['_projects']
                   if p in self.projects)

    def find_synthetic(self, rid):
        for sp in self.synthetic:
            i = sp.index_of(rid)
            if i is not None:
                return sp, i
        return None, None

    def get_resource(self, key, rid, allow_deleted=True):
        r = self.resources.get(rid)
        if r is None or not self.sees_resource(key, r) or (r['deleted'] and not allow_deleted):
            raise entity_not_found('Resource')
        return r

    def resource_json(self, key, rid, deleted=False):
        """GET /resources/{id}: a deleted resource is not found unless deleted=true."""
        r = self.resources.get(rid)
        if r is None:
            sp, i = self.find_synthetic(rid)
            if sp is None or not key.sees_project(sp.name):
                raise entity_not_found('Resource')
            return sp.item(i)
        return self.resource_public(self.get_resource(key, rid, allow_deleted=deleted))

    def content(self, key, rid):
        """(kind, handle, size, etag) for GET /resources/{id}/file."""
        r = self.resources.get(rid)
        if r is None:
            sp, i = self.find_synthetic(rid)
            if sp is None or not key.sees_project(sp.name):
                raise entity_not_found('Resource')
            return Content(synthetic=(sp, i), size=sp.size, etag=sp.etag(i))
        r = self.get_resource(key, rid)
        if r['deleted']:
            raise entity_not_found('Resource')
        return self.file_content(r)

    def file_content(self, obj):
        with self.lock:
            if obj['_etag'] is None:
                h = hashlib.sha256()
                with open(obj['_path'], 'rb') as f:
                    for chunk in iter(lambda: f.read(1 << 20), b''):
                        h.update(chunk)
                obj['_etag'] = '"%s"' % h.hexdigest()[:40]
                obj['_sha256'] = h.digest()
            return Content(path=obj['_path'], size=os.path.getsize(obj['_path']),
                           etag=obj['_etag'], sha256=obj.get('_sha256'))

    def mutate(self, rid, data=None):
        """Change a file's content under the same id: new ETag (reliability.md N3)."""
        with self.lock:
            r = self.resources.get(rid)
            if r is None:
                sp, i = self.find_synthetic(rid)
                if sp is None:
                    raise entity_not_found('Resource')
                if data is not None:
                    raise BadRequest('synthetic content can only be mutated, not replaced')
                sp.versions[i] = sp.versions.get(i, 0) + 1
                self.touch([sp.project['id']])
                return sp.etag(i)
            if data is None:
                with open(r['_path'], 'rb') as f:
                    buf = bytearray(f.read())
                if buf:
                    mid = len(buf) // 2
                    buf[mid] = (buf[mid] + 1 + r['_version']) % 256
                data = bytes(buf)
            r['_path'] = self.new_blob(data)
            r['_version'] += 1
            r['_etag'] = None
            r['size'] = len(data)
            self.touch(r['_projects'])
            return self.file_content(r).etag

    def upload(self, key, fields, file_name, file_ctype, data):
        """POST /resources (the upload form's fields; README: What the API does)."""
        mimetype = norm_mime(fields.get('mimetype') or file_ctype or 'application/octet-stream')
        tags = [t for t in (x.strip() for x in (fields.get('tags') or '').split(',')) if t]
        # labels (the 2024 clients' `labels[i]` fields, or `labels` comma-separated) are
        # image labels: label annotations by the uploader, as metainfo['labels'] shows them
        labels = [t for t in (x.strip() for x in (fields.get('labels') or '').split(',')) if t]
        labels += [v.strip() for k, v in sorted(fields.items(), key=lambda kv: _label_pos(kv[0]))
                   if k.startswith('labels[') and v.strip()]
        metadata = {}
        if fields.get('metadata'):
            try:
                metadata = json.loads(fields['metadata'])
            except ValueError:
                raise BadRequest('metadata is not valid JSON')
        publish = parse_bool(fields.get('bypass_inbox'), False)
        with self.lock:
            r = self._make_resource(
                rid=str(uuid.uuid4()), path=self.new_blob(data), filename=file_name,
                mimetype=mimetype, modality=fields.get('modality') or metadata.get('modality'),
                channel=fields.get('channel') or None, tags=tags,
                status='published' if publish else 'inbox', created_at=self.clock.now(),
                owner=key.user, metadata=metadata if isinstance(metadata, dict) else {},
                source_filepath=fields.get('source_filepath') or fields.get('filepath'))
            for name in dict.fromkeys(labels):
                self._make_annotation(r, {'type': 'label', 'identifier': name,
                                          'created_by': key.user}, None, None, self.clock.now())
            return r

    def set_labels(self, key, rid, labels, frame_labels=None):
        """PUT /resources/{id}/labels (2024 set_resource_labels): the image labels (and
        frame labels, [{label, frame}]) become the resource's label annotations."""
        if not isinstance(labels, list) or not all(isinstance(t, str) for t in labels):
            raise BadRequest('labels must be a list of strings')
        fl = []
        for f in frame_labels or ():
            names = f.get('label') if isinstance(f, dict) else None
            names = names.split(',') if isinstance(names, str) else names
            if not isinstance(names, list) or not isinstance(f.get('frame'), int):
                raise BadRequest('frame_labels must be [{"label", "frame"}]')
            fl += [(n, f['frame']) for n in names if isinstance(n, str) and n]
        with self.lock:
            r = self.get_resource(key, rid, allow_deleted=False)
            now = self.clock.now()
            for a in r['_annotations']:
                ann = self.annotations[a]
                if ann['annotation_type'] == 'label' and not ann['deleted'] and (
                        ann['frame_index'] is None or frame_labels is not None):
                    ann.update(deleted=True, deleted_at=now, deleted_by=key.user)
            for name in dict.fromkeys(labels):
                self._make_annotation(r, {'type': 'label', 'identifier': name,
                                          'created_by': key.user}, self._default_worklist(r),
                                      None, now)
            for name, frame in dict.fromkeys(fl):
                self._make_annotation(r, {'type': 'label', 'identifier': name,
                                          'frame_index': frame, 'created_by': key.user},
                                      self._default_worklist(r), None, now)
            self.touch(r['_projects'])
            return r

    # ---- routes of the 2.x client's Dataset (tests/emulator/README.md, "2.x routes") ----
    def _project_annotations(self, p):
        return [self.annotations[a] for r in p['_resources'] if not self.resources[r]['deleted']
                for a in self.resources[r]['_annotations'] if not self.annotations[a]['deleted']]

    def worklist_of(self, key, wid):
        for p in self.visible_projects(key):
            if p['worklist_id'] == wid:
                return p
        raise entity_not_found('Annotation worklist')

    def worklist_public(self, p, full=True):
        """AnnotationWorklist (datamint/entities/annotation_worklist.py@v2.29.0 l.57-64)."""
        with self.lock:
            anns = [] if p['_synthetic'] else self._project_annotations(p)
            specs = {}
            for a in anns:
                if a['annotation_type'] == 'segmentation':
                    continue
                k = (a['scope'], a['identifier'], a['annotation_type'])
                sp = specs.setdefault(k, {'type': a['annotation_type'], 'scope': a['scope'],
                                          'required': False, 'identifier': a['identifier']})
                if a['annotation_type'] == 'category':
                    sp.setdefault('values', [])
                    if a['text_value'] not in sp['values']:
                        sp['values'] = sorted(sp['values'] + [a['text_value']])
            annotators = sorted({a['created_by'] for a in anns})
            out = {'id': p['worklist_id'], 'name': p['name'], 'status': 'active',
                   'annotators': [{'email': e, 'status': 'active', 'expertise_level': None}
                                  for e in annotators],
                   'description': p['description'], 'created_by': p['created_by'],
                   'created_at': p['created_at'], 'project_id': p['id']}
            if full:
                out['annotations'] = [specs[k] for k in sorted(specs)]
                out['resource_ids'] = ([] if p['_synthetic'] else
                                       [r for r in p['_resources']
                                        if not self.resources[r]['deleted']])
            return out

    def segmentation_group(self, p):
        """{"groups": {name: {"index": k}}}, k from 1 (base.py@v2.29.0 l.599-600, 968-972)."""
        with self.lock:
            names = sorted({a['identifier'] for a in ([] if p['_synthetic'] else
                                                      self._project_annotations(p))
                            if a['annotation_type'] == 'segmentation'})
        return {'groups': {n: {'index': i + 1} for i, n in enumerate(names)},
                'segmentationValueType': 'single_label'}

    def splits(self, p, split_name=None):
        """ProjectResourceSplit list (project_resource_split.py@v2.29.0 l.7-14): a resource
        tagged 'split:<name>' is in split <name>."""
        out = []
        with self.lock:
            for rid in ([] if p['_synthetic'] else p['_resources']):
                r = self.resources[rid]
                if r['deleted']:
                    continue
                for t in r['tags']:
                    if t.startswith('split:') and split_name in (None, t[6:]):
                        out.append({'id': _rid('split', p['id'], rid, t), 'split_name': t[6:],
                                    'project_id': p['id'], 'resource_id': rid,
                                    'created_at': r['created_at'], 'created_by': p['created_by'],
                                    'deleted_at': None, 'deleted_by': None})
        return out

    def user_public(self, email):
        """User (datamint/entities/user.py@v2.29.0 l.15-20)."""
        return {'email': email, 'firstname': email.split('@')[0].capitalize(),
                'lastname': 'Example', 'roles': ['admin'],
                'customer_id': _rid('customer', email), 'created_at': '2025-01-01T00:00:00.000Z'}

    def members(self, key, p):
        users = [k.user for k in self.keys.values()
                 if k.all or k.sees_project(p['name'])]
        return [self.user_public(u) for u in sorted(set(users))]

    def annotation_statuses(self, p):
        """One status per (resource, annotator) with published annotations (inferred)."""
        with self.lock:
            seen = {}
            for a in ([] if p['_synthetic'] else self._project_annotations(p)):
                if a['status'] == 'published':
                    seen.setdefault((a['resource_id'], a['created_by']), a['created_at'])
            return [{'resource_id': r, 'user_email': u, 'status': 'closed', 'updated_at': t,
                     'annotation_worklist_id': p['worklist_id']}
                    for (r, u), t in sorted(seen.items())]

    def not_annotated(self, key, q):
        """GET /resources/not-annotated: resources without any annotation."""
        with self.lock:
            rs = [r for r in self.resources.values() if not r['deleted']
                  and self.sees_resource(key, r)
                  and not any(not self.annotations[a]['deleted'] for a in r['_annotations'])]
            rs.sort(key=lambda r: (r['created_at'], r['id']), reverse=True)
            return [self.resource_public(r) for r in rs]

    # ---- upload batches (the seed-era client's get_batches/get_batch_info) ----
    def create_batch(self, key, body):
        if not isinstance(body, dict):
            raise BadRequest('body must be a JSON object')
        with self.lock:
            b = {'id': str(uuid.uuid4()), 'description': body.get('description'),
                 'size': body.get('size'), 'modality': body.get('modality'),
                 'created_at': self.clock.now(), 'created_by': key.user, 'images': [],
                 '_owner': key.user}
            self.batches[b['id']] = b
            return b

    def list_batches(self, key):
        with self.lock:
            return [{k: v for k, v in b.items() if not k.startswith('_')}
                    for b in sorted(self.batches.values(), key=lambda b: b['created_at'])
                    if b['_owner'] == key.user or key.all]

    def get_batch(self, key, bid):
        b = self.batches.get(bid)
        if b is None or not (b['_owner'] == key.user or key.all):
            raise entity_not_found('Batch')
        return {k: v for k, v in b.items() if not k.startswith('_')}

    def publish(self, key, rid):
        with self.lock:
            r = self.get_resource(key, rid, allow_deleted=False)
            if r['status'] != 'inbox':
                # Text the client tolerates (README: What a client cannot tell from the server).
                raise BadRequest('Resource must be in inbox status to be approved')
            r['status'] = 'published'
            r['published'] = True
            r['published_on'] = self.clock.now()
            r['published_by'] = key.user
            self.touch(r['_projects'])
            return r

    def set_tags(self, key, rid, tags):
        with self.lock:
            r = self.get_resource(key, rid, allow_deleted=False)
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise BadRequest('tags must be a list of strings')
            r['tags'] = list(tags)
            self.touch(r['_projects'])
            return r

    def delete_resource(self, key, rid):
        with self.lock:
            r = self.get_resource(key, rid, allow_deleted=False)
            r['deleted'] = True
            r['deleted_at'] = self.clock.now()
            r['deleted_by'] = key.user
            self.touch(r['_projects'])

    def list_resources(self, key, q):
        """Filtered, ordered view of GET /resources: (total, page iterator of JSON text)."""
        q = dict(q)
        q['_project'] = parse_filter(q.get('project'))
        q['_tags'] = parse_filter(q.get('tags'))
        # labels[i] (2024 clients): resources carrying every one of these image labels
        labels = [v for k, v in sorted(q.items(), key=lambda kv: _label_pos(kv[0]))
                  if k.startswith('labels[')]
        q['_labels'] = labels or None
        if q.get('mimetype') not in (None, ''):
            q['mimetype'] = norm_mime(q['mimetype'])
        deleted = parse_bool(q.get('deleted'), False)
        order = q.get('order_field') or 'created_at'
        if order not in ('modality', 'created_by', 'published_by', 'published_on', 'filename',
                         'created_at'):
            raise BadRequest('invalid order_field %r' % order)
        asc = parse_bool(q.get('order_by_asc'), False)
        with self.lock:
            mats = [r for r in self.resources.values()
                    if (deleted or not r['deleted']) and self.sees_resource(key, r)
                    and self._match(r, q)]
            mats.sort(key=lambda r: (r[order] or '', r['created_at'], r['id']), reverse=not asc)
            mats = [self.resource_public(r) for r in mats]
            syn = []
            for sp in self.synthetic:
                if key.sees_project(sp.name) and not q['_labels']:
                    lo, hi = sp.filter_range(q)
                    if hi > lo:
                        syn.append((sp, lo, hi))
        # Synthetic items are older than every other item, so for created_at order they
        # come first ascending and last descending; for other orders they follow.
        if asc and order == 'created_at':
            segs = [('s', s) for s in syn] + [('m', mats)]
        else:
            segs = [('m', mats)] + [('s', s) for s in (reversed(syn) if not asc else syn)]
        total = len(mats) + sum(hi - lo for _, lo, hi in syn)
        return total, segs, not asc

    def _match(self, r, q):
        st = q.get('status')
        if st not in (None, '') and r['status'] != st:
            return False
        for field, attr in (('mimetype', 'mimetype'), ('modality', 'modality'),
                            ('channel_name', 'upload_channel'), ('filename', 'filename')):
            if q.get(field) not in (None, '') and r[attr] != q[field]:
                return False
        if q.get('from') not in (None, '') and r['created_at'][:10] < q['from'][:10]:
            return False
        if q.get('to') not in (None, '') and r['created_at'][:10] >= q['to'][:10]:
            return False
        if q.get('projectId') not in (None, '') and q['projectId'] not in r['_projects']:
            return False
        if q['_project'] is not None:
            names = {self.projects[p]['name'] for p in r['_projects'] if p in self.projects}
            if not _match_set(names, q['_project']):
                return False
        if q.get('_labels') and not set(q['_labels']) <= set(self.image_labels(r)):
            return False
        return _match_set(set(r['tags']), q['_tags'])

    @staticmethod
    def page(segs, reverse, offset, limit):
        """JSON texts of items [offset, offset+limit) of the concatenated segments."""
        out = []
        for kind, seg in segs:
            if limit is not None and len(out) >= limit:
                break
            if kind == 'm':
                n = len(seg)
                if offset >= n:
                    offset -= n
                    continue
                stop = n if limit is None else min(n, offset + limit - len(out))
                out.extend(json.dumps(r) for r in seg[offset:stop])
                offset = 0
            else:
                sp, lo, hi = seg
                n = hi - lo
                if offset >= n:
                    offset -= n
                    continue
                cnt = n - offset if limit is None else min(n - offset, limit - len(out))
                if reverse:
                    idx = range(hi - 1 - offset, hi - 1 - offset - cnt, -1)
                else:
                    idx = range(lo + offset, lo + offset + cnt)
                out.extend(sp.item_json(i) for i in idx)
                offset = 0
        return out

    def project_resources(self, key, p, offset=0, limit=None, deleted=False):
        """GET /projects/{id}/resources: a bare list (§3.1, §7.4); lazy for synthetic."""
        sp = p['_synthetic']
        if sp:
            stop = sp.n if limit is None else min(sp.n, offset + limit)
            return LazyList(lambda: (sp.item_json(i) for i in range(offset, stop)))
        with self.lock:
            rs = [self.resources[r] for r in p['_resources']
                  if deleted or not self.resources[r]['deleted']]
            rs = rs[offset:None if limit is None else offset + limit]
            return [self.resource_public(r) for r in rs]

    def channels(self, key):
        """GET /resources/channels (README: What the API does)."""
        with self.lock:
            groups = {}
            for r in self.resources.values():
                if r['deleted'] or not self.sees_resource(key, r):
                    continue
                groups.setdefault(r['_channel'], []).append(r)
            out = []
            for name in sorted(groups, key=lambda n: (n is None, n or '')):
                rs = sorted(groups[name], key=lambda r: (r['created_at'], r['id']))
                out.append({'channel_name': name, 'resource_data': [
                    {'created_by': r['created_by'], 'customer_id': r['customer_id'],
                     'resource_id': r['id'], 'resource_file_name': r['filename'],
                     'resource_mimetype': r['mimetype']} for r in rs],
                    'deleted': False, 'created_at': rs[0]['created_at'],
                    'updated_at': rs[-1]['created_at'], 'resource_count': str(len(rs))})
            for sp in self.synthetic:
                if not key.sees_project(sp.name) or sp.n == 0:
                    continue

                def gen(sp=sp):
                    fmt = json.dumps({'created_by': sp.owner, 'customer_id': sp.customer,
                                      'resource_id': '@ID@', 'resource_file_name': '@FN@',
                                      'resource_mimetype': SYNTH_MIME}, separators=(',', ':'))
                    fmt = fmt.replace('@ID@', '%s').replace('@FN@', '%s')
                    return (fmt % (sp.item_id(i), 'item-%07d.bin' % i) for i in range(sp.n))
                out.append({'channel_name': sp.channel, 'resource_data': LazyList(gen),
                            'deleted': False, 'created_at': iso_ms(sp.created_ms(0)),
                            'updated_at': iso_ms(sp.created_ms(sp.n - 1)),
                            'resource_count': str(sp.n)})
            return out

    # ------------------------------------------------------------------ annotations
    def _make_annotation(self, res, a, worklist_id, path, created_at):
        """Annotation with the API's long field names (README: What the API does)."""
        atype = a.get('type') or a.get('annotation_type')
        if atype not in ('segmentation', 'area', 'distance', 'angle', 'point', 'line', 'region',
                         'square', 'circle', 'category', 'label', 'integer', 'float'):
            raise BadRequest('invalid annotation type %r' % atype)
        ident = a.get('identifier') or a.get('name')
        if not isinstance(ident, str) or not ident:
            raise BadRequest('identifier must be a non-empty string')
        frame = a.get('frame_index', a.get('index'))
        if frame is not None and (not isinstance(frame, int) or frame < 0):
            raise BadRequest('frame_index must be a non-negative integer')
        scope = a.get('scope') or ('image' if frame is None else 'frame')
        value = a.get('value', a.get('text_value'))
        aid = a.get('id') or str(uuid.uuid4())
        ann = {'id': aid, 'identifier': ident, 'scope': scope, 'annotation_type': atype,
               'resource_id': res['id'], 'created_by': a.get('created_by') or res['_owner'],
               'annotation_worklist_id': a.get('annotation_worklist_id') or worklist_id,
               'status': a.get('status', 'published'), 'frame_index': frame,
               'text_value': None if value is None else str(value),
               'numeric_value': a.get('numeric_value'), 'units': a.get('units'),
               'geometry': a.get('geometry'), 'created_at': created_at, 'approved_at': None,
               'approved_by': None, 'associated_file': None, 'file': None, 'deleted': False,
               'deleted_at': None, 'deleted_by': None, 'created_by_model': None,
               'old_geometry': None, 'set_name': None, 'resource_filename': res['filename'],
               'resource_modality': res['modality'], 'annotation_worklist_name': None,
               'user_info': None, 'values': a.get('values'),
               'imported_from': a.get('imported_from'), 'import_author': a.get('import_author'),
               'is_model': bool(a.get('is_model', False)), 'model_id': a.get('model_id'),
               'source': a.get('source'), 'confiability': a.get('confiability'),
               '_path': None, '_etag': None}
        self.annotations[aid] = ann
        res['_annotations'].append(aid)
        if path:
            self._attach_file(ann, path, os.path.basename(path))
        return ann

    def _attach_file(self, ann, path, name):
        ann['_path'] = path
        ann['_etag'] = None
        ann['associated_file'] = name
        ann['file'] = '/annotations/%s/annotations/%s/file' % (ann['resource_id'], ann['id'])

    def annotation_public(self, a):
        out = {k: v for k, v in a.items() if not k.startswith('_')}
        if a['annotation_worklist_id']:
            for p in self.projects.values():
                if p['worklist_id'] == a['annotation_worklist_id']:
                    out['annotation_worklist_name'] = p['name']
        return out

    def _default_worklist(self, r):
        for pid in r['_projects']:
            if pid in self.projects:
                return self.projects[pid]['worklist_id']
        return None

    def create_annotations(self, key, rid, items):
        """POST /annotations/{rid}/annotations: JSON array in, array of ids out (§3.6)."""
        if not isinstance(items, list) or not items:
            raise BadRequest('body must be a non-empty JSON array of annotations')
        with self.lock:
            r = self.get_resource(key, rid, allow_deleted=False)
            ids = []
            for a in items:
                if not isinstance(a, dict):
                    raise BadRequest('each annotation must be an object')
                a = dict(a)
                a.pop('id', None)
                a.setdefault('created_by', key.user)
                ann = self._make_annotation(r, a, self._default_worklist(r), None, self.clock.now())
                ids.append(ann['id'])
            self.touch(r['_projects'])
            return ids

    def get_annotation(self, key, aid, rid=None):
        a = self.annotations.get(aid)
        if a is None or a['deleted'] or (rid is not None and a['resource_id'] != rid):
            raise entity_not_found('Annotation')
        r = self.resources.get(a['resource_id'])
        if r is None or not self.sees_resource(key, r):
            raise entity_not_found('Annotation')
        return a

    def annotation_file(self, key, rid, aid, name, data):
        with self.lock:
            a = self.get_annotation(key, aid, rid)
            self._attach_file(a, self.new_blob(data), name)
            self.touch(self.resources[rid]['_projects'])
            return a

    def volume_segmentation(self, key, rid, fields, name, data):
        """POST /annotations/{rid}/segmentations/file (§3.6 volume segmentation upload)."""
        try:
            segmap = json.loads(fields.get('segmentation_map') or '')
        except ValueError:
            raise BadRequest('segmentation_map must be a JSON object {"<value>": "<name>"}')
        if not isinstance(segmap, dict) or not segmap:
            raise BadRequest('segmentation_map must be a non-empty JSON object')
        with self.lock:
            r = self.get_resource(key, rid, allow_deleted=False)
            path = self.new_blob(data)
            ids = []
            for value, label in sorted(segmap.items(), key=lambda kv: str(kv[0])):
                ann = self._make_annotation(r, {
                    'type': 'segmentation', 'identifier': str(label), 'scope': 'image',
                    'values': int(value) if str(value).isdigit() else value,
                    'created_by': key.user, 'model_id': fields.get('model_id'),
                    'source': fields.get('source'), 'imported_from': fields.get('imported_from'),
                    'annotation_worklist_id': fields.get('annotation_worklist_id')},
                    self._default_worklist(r), None, self.clock.now())
                self._attach_file(ann, path, name)
                ids.append(ann['id'])
            self.touch(r['_projects'])
            return ids

    def delete_annotation(self, key, aid):
        with self.lock:
            a = self.get_annotation(key, aid)
            a['deleted'] = True
            a['deleted_at'] = self.clock.now()
            a['deleted_by'] = key.user
            self.touch(self.resources[a['resource_id']]['_projects'])

    def list_annotations(self, key, q):
        """GET /annotations and POST /annotations/search filters (§3.6)."""
        rids = q.get('resource_ids')
        if rids is not None and not isinstance(rids, list):
            raise BadRequest('resource_ids must be a list')
        want_ids = set(rids or ())
        if q.get('resource_id'):
            want_ids.add(q['resource_id'])
        ds_res = None
        if q.get('dataset_id'):
            p = self.project_by_dataset(key, q['dataset_id'])
            ds_res = set(p['_resources'])
        load_ai = parse_bool(q.get('load_ai_segmentations'), True)
        with self.lock:
            out = []
            for a in self.annotations.values():
                if a['deleted']:
                    continue
                r = self.resources.get(a['resource_id'])
                if r is None or r['deleted'] or not self.sees_resource(key, r):
                    continue
                if want_ids and a['resource_id'] not in want_ids:
                    continue
                if ds_res is not None and a['resource_id'] not in ds_res:
                    continue
                if q.get('annotation_type') and a['annotation_type'] != q['annotation_type']:
                    continue
                if q.get('annotatorEmail') and a['created_by'] != q['annotatorEmail']:
                    continue
                if q.get('status') and a['status'] != q['status']:
                    continue
                wl = q.get('annotation_worklist_id')
                if wl and a['annotation_worklist_id'] != wl:
                    continue
                if q.get('from') and a['created_at'][:10] < q['from'][:10]:
                    continue
                if q.get('to') and a['created_at'][:10] >= q['to'][:10]:
                    continue
                if not load_ai and a['is_model']:
                    continue
                out.append(a)
            out.sort(key=lambda a: (a['created_at'], a['id']))
            return [self.annotation_public(a) for a in out]
