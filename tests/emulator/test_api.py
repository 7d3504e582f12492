"""The emulator driven over HTTP the way the Datamint client does
(as its user guide shows), asserting the shapes of the Datamint REST API."""
import base64
import hashlib
import io
import json
import os
import zipfile

from client import KEY_ALL, KEY_CT, KEY_NONE, KEY_SAMPLE, Response, multipart

RESOURCE_REQUIRED = {'id', 'storage', 'location', 'filename', 'mimetype', 'size', 'status',
                     'created_at', 'created_by', 'resource_uri', 'upload_channel', 'customer_id',
                     'published', 'deleted'}  # HEAD Resource model, §3.4
PROJECT_REQUIRED = {'id', 'name', 'created_at', 'created_by', 'dataset_id', 'archived',
                    'resource_count', 'description', 'worklist_id'}  # §3.1
DATASET_FIELDS = {'id', 'name', 'created_at', 'created_by', 'description', 'customer_id',
                  'updated_at', 'total_resource', 'resource_ids'}  # §3.2


def is_json(r: Response):
    assert r.headers['Content-Type'] == 'application/json', r.headers['Content-Type']
    return r.json()


def err(r, status):
    assert r.status == status, (r.status, r.body[:300])
    body = is_json(r)
    assert isinstance(body['message'], str) and body['message']
    return body['message']


def walk(emu, key=KEY_ALL, limit=5, **filters):
    """The 1.x/HEAD paging loop (§3.0): until a page is shorter than the limit."""
    out, offset = [], 0
    while True:
        q = dict(filters, offset=offset, limit=limit)
        body = is_json(emu.get('/resources', key=key, query=q))
        assert set(body) == {'data', 'totalCount'} and len(body['data']) == 1
        page = body['data'][0]['resources']
        out += page
        if len(page) < limit:
            return out, body['totalCount']
        offset += limit


def test_auth_errors_and_entitlement(emu):
    assert 'API key' in err(emu.get('/projects', key=None), 401)
    assert 'API key' in err(emu.get('/projects', key='wrong'), 401)
    # Bearer is an alias of apikey (§2.1).
    r = emu.get('/projects', key=KEY_SAMPLE, bearer=True)
    assert r.status == 200 and [p['name'] for p in is_json(r)['data']] == ['sample']
    assert is_json(emu.get('/projects', key=KEY_NONE))['data'] == []
    # Not entitled looks exactly like missing (docs/security.md).
    ct = emu.project('ct')
    denied = emu.get('/projects/' + ct['id'], key=KEY_SAMPLE)
    missing = emu.get('/projects/00000000-0000-4000-8000-000000000000', key=KEY_SAMPLE)
    assert denied.status == missing.status == 404 and denied.body == missing.body
    assert err(denied, 404) == 'Not Found'  # NestJS's NotFoundException, what the clients test
    rid = json.loads(emu.get('/projects/%s/resources' % ct['id'], key=KEY_CT).body)[0]['id']
    a = emu.get('/resources/%s/file' % rid, key=KEY_SAMPLE)
    b = emu.get('/resources/00000000-0000-4000-8000-00000000abcd/file', key=KEY_SAMPLE)
    assert a.status == b.status == 404 and a.body == b.body
    assert emu.get('/resources/%s/file' % rid, key=KEY_CT).status == 200
    err(emu.get('/no/such/route'), 404)
    log = emu.log()
    text = json.dumps(log)
    assert 'dmc-key' not in text and 'wrong' not in text  # names of headers, never values
    assert any('apikey' in e['headers'] for e in log)
    assert {e['auth'] for e in log} == {None, 'apikey', 'bearer'}


def test_projects_and_datasets(emu):
    body = is_json(emu.get('/projects', query={'includeArchived': 'true', 'offset': 0, 'limit': 5000}))
    names = [p['name'] for p in body['data']]
    for n in ('sample', 'pydicom', 'ct', 'formats', 'bad', 'big', 'small'):
        assert n in names
    for p in body['data']:
        assert PROJECT_REQUIRED <= set(p)
        assert isinstance(p['resource_count'], str) and int(p['resource_count']) >= 0
        assert isinstance(p['resources_to_annotate_count'], int)
    big = next(p for p in body['data'] if p['name'] == 'big')
    assert big['resource_count'] == '1000000'
    sample = next(p for p in body['data'] if p['name'] == 'sample')
    assert is_json(emu.get('/projects/' + sample['id'])) == sample
    res = is_json(emu.get('/projects/%s/resources' % sample['id']))
    assert isinstance(res, list) and len(res) == int(sample['resource_count']) == 19
    assert all(RESOURCE_REQUIRED <= set(r) for r in res)
    ds = is_json(emu.get('/datasets', key=KEY_SAMPLE))['data']
    assert len(ds) == 1 and set(ds[0]) >= DATASET_FIELDS
    assert ds[0]['id'] == sample['dataset_id'] and ds[0]['total_resource'] == 19
    assert sorted(ds[0]['resource_ids']) == sorted(r['id'] for r in res)
    assert ds[0]['updated_at'].endswith('Z')
    assert is_json(emu.get('/datasets/' + sample['dataset_id'])) == \
        next(d for d in is_json(emu.get('/datasets'))['data'] if d['id'] == sample['dataset_id'])
    # Create a project from uploaded resources (§3.1 body), visible to its creator only.
    up = [is_json(emu.upload('p%d.png' % i, b'\x89PNG fake %d' % i, 'image/png', key=KEY_SAMPLE))['id']
          for i in range(2)]
    r = emu.request('POST', '/projects', key=KEY_SAMPLE, json_body={
        'name': 'created-by-bob', 'is_active_learning': False, 'resource_ids': up,
        'annotation_set': {'annotators': [], 'resource_ids': up, 'annotations': [],
                           'frame_labels': [], 'image_labels': []},
        'two_up_display': False, 'require_review': False, 'description': 'made in a test'})
    assert r.status == 201
    proj = is_json(r)
    assert proj['name'] == 'created-by-bob' and proj['resource_count'] == '2'
    assert 'created-by-bob' in [p['name'] for p in is_json(emu.get('/projects', key=KEY_SAMPLE))['data']]
    assert emu.get('/projects/' + proj['id'], key=KEY_CT).status == 404
    assert err(emu.request('POST', '/projects', key=KEY_SAMPLE, json_body={'name': 'created-by-bob'}), 409)


def test_upload_channel_labels_publish_and_filters(emu):
    """Upload with channel, labels and publish, then list with filters over pages."""
    ids = []
    for i in range(7):
        mime = 'application/dicom' if i % 2 == 0 else 'image/png'
        r = emu.upload('scan_%d.%s' % (i, 'dcm' if i % 2 == 0 else 'png'), b'DATA%d' % i * 100,
                       mime, key=KEY_CT, channel='CT scans test', tags='label1,label2',
                       modality='CT')
        assert r.status == 201
        body = is_json(r)
        assert set(body) == {'id'}
        ids.append(body['id'])
    res = is_json(emu.get('/resources/' + ids[0], key=KEY_CT))
    assert RESOURCE_REQUIRED <= set(res)
    assert res['status'] == 'inbox' and res['published'] is False
    assert res['tags'] == ['label1', 'label2'] and res['upload_channel'] == 'CT scans test'
    assert res['storage'] == 'DicomResource' and res['size'] == 500
    # Publish three of them (§3.4); publishing twice gives the tolerated 400 (§2.3).
    for rid in ids[:3]:
        assert emu.request('POST', '/resources/%s/publish' % rid, key=KEY_CT).status in (200, 201)
    assert 'Resource must be in inbox status to be approved' in \
        err(emu.request('POST', '/resources/%s/publish' % ids[0], key=KEY_CT), 400)
    # bypass_inbox publishes at upload (HEAD).
    r = emu.upload('direct.png', b'x', 'image/png', key=KEY_CT, channel='CT scans test',
                   bypass_inbox='true')
    direct = is_json(r)['id']
    assert is_json(emu.get('/resources/' + direct, key=KEY_CT))['status'] == 'published'
    # Filters across several pages (limit 2).
    chan = walk(emu, KEY_CT, limit=2, channel_name='CT scans test', status='')[0]
    assert sorted(r['id'] for r in chan) == sorted(ids + [direct])
    inbox, total = walk(emu, KEY_CT, limit=2, channel_name='CT scans test', status='inbox')
    assert sorted(r['id'] for r in inbox) == sorted(ids[3:]) and total == 4
    dicom, total = walk(emu, KEY_CT, limit=2, channel_name='CT scans test',
                        mimetype='application/dicom', status='')
    assert sorted(r['id'] for r in dicom) == sorted(ids[0::2]) and total == 4
    tagged, _ = walk(emu, KEY_CT, limit=3, tags=json.dumps({'items': ['label2'], 'filterType': 'union'}))
    assert set(ids) <= {r['id'] for r in tagged}
    # Newest first by default, ascending on request, and paging is exact.
    allct, total = walk(emu, KEY_CT, limit=7)
    assert total == len(allct) and len({r['id'] for r in allct}) == total
    assert [r['created_at'] for r in allct] == sorted((r['created_at'] for r in allct), reverse=True)
    asc, _ = walk(emu, KEY_CT, limit=50, order_by_asc='True', channel_name='CT scans test')
    assert [r['id'] for r in asc] == ids + [direct]
    # The resource listing keeps `data` non-empty on an empty result (§7.3).
    body = is_json(emu.get('/resources', key=KEY_NONE, query={'status': ''}))
    assert body == {'data': [{'resources': []}], 'totalCount': 0}
    # Project filter by name (JSON union / intersection).
    body = is_json(emu.get('/resources', key=KEY_CT, query={
        'project': json.dumps({'items': ['ct'], 'filterType': 'intersection'}), 'limit': 1000}))
    assert body['totalCount'] == 72
    # Channels (§3.5).
    chans = is_json(emu.get('/resources/channels', key=KEY_CT))
    c = next(c for c in chans['data'] if c['channel_name'] == 'CT scans test')
    assert c['resource_count'] == '8' and isinstance(chans['totalCount'], str)
    assert {d['resource_id'] for d in c['resource_data']} == set(ids + [direct])
    # Tags replace all tags (§3.4).
    r = emu.request('PUT', '/resources/%s/tags' % ids[1], key=KEY_CT, json_body={'tags': ['x']})
    assert r.status == 200 and is_json(emu.get('/resources/' + ids[1], key=KEY_CT))['tags'] == ['x']
    # Other keys do not see these uploads.
    assert emu.get('/resources/' + ids[1], key=KEY_SAMPLE).status == 404


def test_download_full_range_etag(emu):
    sample = emu.project('sample')
    res = is_json(emu.get('/projects/%s/resources' % sample['id']))
    man = json.load(open(os.path.join(emu.corpus, 'manifest.json')))
    by_id = {e.get('resource_id'): e for e in man['files']}
    r0 = next(r for r in res if r['filename'] == 'ct_000.dcm')
    full = emu.get('/resources/%s/file' % r0['id'], headers={'accept': 'application/octet-stream'})
    assert full.status == 200
    assert hashlib.sha256(full.body).hexdigest() == by_id[r0['id']]['sha256']
    assert int(full.headers['Content-Length']) == len(full.body) == r0['size']
    assert full.headers['Content-Type'] == 'application/dicom'
    etag = full.headers['ETag']
    assert etag.startswith('"') and not etag.startswith('W/')
    # the object's SHA-256 (RFC 9530), also on a part: what a client verifies against
    digest = 'sha-256=:%s:' % base64.b64encode(hashlib.sha256(full.body).digest()).decode()
    assert full.headers['Repr-Digest'] == digest
    part = emu.get('/resources/%s/file' % r0['id'], headers={'Range': 'bytes=100-1099'})
    assert part.status == 206 and part.body == full.body[100:1100]
    assert part.headers['Content-Range'] == 'bytes 100-1099/%d' % len(full.body)
    assert part.headers['Repr-Digest'] == digest
    tail = emu.get('/resources/%s/file' % r0['id'], headers={'Range': 'bytes=-10'})
    assert tail.status == 206 and tail.body == full.body[-10:]
    rest = emu.get('/resources/%s/file' % r0['id'],
                   headers={'Range': 'bytes=%d-' % (len(full.body) - 5), 'If-Range': etag})
    assert rest.status == 206 and rest.body == full.body[-5:]
    # If-Range with another validator: the whole body (RFC 9110 §13.1.5).
    stale = emu.get('/resources/%s/file' % r0['id'], headers={'Range': 'bytes=0-9', 'If-Range': '"old"'})
    assert stale.status == 200 and stale.body == full.body
    bad = emu.get('/resources/%s/file' % r0['id'], headers={'Range': 'bytes=%d-' % len(full.body)})
    assert bad.status == 416 and bad.headers['Content-Range'] == 'bytes */%d' % len(full.body)
    nm = emu.get('/resources/%s/file' % r0['id'], headers={'If-None-Match': etag})
    assert nm.status == 304 and nm.body == b''
    head = emu.request('HEAD', '/resources/%s/file' % r0['id'])
    assert head.status == 200 and head.headers['Content-Length'] == str(len(full.body))
    # Synthetic items: deterministic bytes, same answer twice, ranges consistent.
    big = is_json(emu.get('/projects/%s/resources' % emu.project('small')['id']))
    s1 = emu.get('/resources/%s/file' % big[3]['id'])
    s2 = emu.get('/resources/%s/file' % big[3]['id'])
    assert s1.status == 200 and s1.body == s2.body and len(s1.body) == 1000
    assert s1.body[:8] == b'DMCSYN1\0'
    assert s1.headers['Repr-Digest'] == \
        'sha-256=:%s:' % base64.b64encode(hashlib.sha256(s1.body).digest()).decode()
    sr = emu.get('/resources/%s/file' % big[3]['id'], headers={'Range': 'bytes=20-519'})
    assert sr.body == s1.body[20:520]
    assert emu.get('/resources/%s/file' % big[4]['id']).body != s1.body


def test_annotations_and_segmentation_upload(emu):
    sample = emu.project('sample')
    res = is_json(emu.get('/projects/%s/resources' % sample['id']))
    ct3 = next(r for r in res if r['filename'] == 'ct_003.dcm')
    anns = is_json(emu.get('/annotations', query={'resource_id': ct3['id']}))['data']
    assert {a['identifier'] for a in anns} == {'Liver', 'Spine', 'liver_visible'}
    seg = next(a for a in anns if a['identifier'] == 'Liver')
    for f in ('id', 'identifier', 'scope', 'annotation_type', 'resource_id', 'created_by',
              'annotation_worklist_id', 'status', 'frame_index', 'file', 'created_at'):
        assert f in seg
    assert seg['annotation_worklist_id'] == sample['worklist_id']
    m = emu.get('/annotations/%s/annotations/%s/file' % (ct3['id'], seg['id']))
    assert m.status == 200 and m.body[:8] == b'\x89PNG\r\n\x1a\n'
    assert m.headers['Content-Type'] == 'image/png' and 'ETag' in m.headers
    # Worklist listing with status filter (Generation C, §3.3.3).
    wl = is_json(emu.get('/annotations', query={'annotation_worklist_id': sample['worklist_id'],
                                                'status': 'published', 'offset': 0, 'limit': 5000}))
    allwl = is_json(emu.get('/annotations', query={'annotation_worklist_id': sample['worklist_id']}))
    assert 0 < len(wl['data']) < len(allwl['data'])
    srch = is_json(emu.request('POST', '/annotations/search', json_body={
        'annotation_worklist_id': sample['worklist_id'], 'offset': '0', 'limit': '5000'}))
    assert isinstance(srch, list) and [a['id'] for a in srch] == [a['id'] for a in allwl['data']]
    page2 = is_json(emu.request('POST', '/annotations/search', json_body={
        'annotation_worklist_id': sample['worklist_id'], 'offset': '3', 'limit': '2'}))
    assert [a['id'] for a in page2] == [a['id'] for a in srch[3:5]]
    # Upload a 2D segmentation the way upload_segmentations does (§3.6).
    before = is_json(emu.get('/datasets/' + sample['dataset_id']))['updated_at']
    r = emu.request('POST', '/annotations/%s/annotations' % ct3['id'], json_body=[
        {'type': 'segmentation', 'identifier': 'Kidney', 'scope': 'frame', 'frame_index': 0,
         'annotation_worklist_id': sample['worklist_id']}])
    assert r.status in (200, 201)
    new_ids = is_json(r)
    assert isinstance(new_ids, list) and len(new_ids) == 1 and isinstance(new_ids[0], str)
    png = b'\x89PNG\r\n\x1a\n' + b'mask-bytes' * 50
    body, ctype = multipart({}, {'file': ('Kidney', 'image/png', png)})
    r = emu.request('POST', '/annotations/%s/annotations/%s/file' % (ct3['id'], new_ids[0]),
                    body=body, headers={'Content-Type': ctype})
    assert r.status in (200, 201) and isinstance(is_json(r), dict) and 'error' not in r.json()
    got = emu.get('/annotations/%s/annotations/%s/file' % (ct3['id'], new_ids[0]))
    assert got.body == png
    after = is_json(emu.get('/datasets/' + sample['dataset_id']))['updated_at']
    assert after > before
    # Volume segmentation (§3.6, since v1.5).
    nii = open(os.path.join(emu.corpus, 'projects/sample/masks/brain_seg.nii.gz'), 'rb').read()
    brain = next(r for r in res if r['filename'] == 'brain_int16_scaled.nii.gz')
    body, ctype = multipart({'segmentation_map': json.dumps({'1': 'Femur', '2': 'Tibia'}),
                             'source': 'imported'},
                            {'file': ('seg.nii.gz', 'application/x-nifti', nii)})
    r = emu.request('POST', '/annotations/%s/segmentations/file' % brain['id'], body=body,
                    headers={'Content-Type': ctype})
    assert r.status in (200, 201)
    vids = is_json(r)
    assert len(vids) == 2 and 'error' not in vids
    one = is_json(emu.get('/annotations/' + vids[0]))
    assert one['identifier'] == 'Femur' and one['annotation_type'] == 'segmentation'
    assert emu.get('/annotations/%s/annotations/%s/file' % (brain['id'], vids[1])).body == nii
    # Errors have messages; a body that is not an array is refused.
    err(emu.request('POST', '/annotations/%s/annotations' % ct3['id'], json_body={'type': 'x'}), 400)
    err(emu.get('/annotations/%s/annotations/%s/file' % (ct3['id'], 'nope')), 404)


def _zip(data):
    z = zipfile.ZipFile(io.BytesIO(data))
    return z, json.loads(z.read('dataset.json'))


def test_dataset_download_generations(emu):
    sample = emu.project('sample')
    man = json.load(open(os.path.join(emu.corpus, 'manifest.json')))
    sha = {e.get('resource_id'): e['sha256'] for e in man['files']}
    # Generation A (§3.3.1): SSE progress, then {"zip": token}, then the ZIP.
    r = emu.get('/datasets/%s/download/png' % sample['dataset_id'], key=KEY_SAMPLE)
    assert r.status == 200 and r.headers['Content-Type'] == 'text/event-stream'
    lines = [ln for ln in r.body.decode().splitlines() if ln.strip()]
    assert all(ln.startswith('data: ') for ln in lines)
    events = [json.loads(ln[6:]) for ln in lines]
    assert events[0] == {'processedImages': 0, 'totalImages': 19}
    assert events[-2] == {'processedImages': 19, 'totalImages': 19} and 'zip' in events[-1]
    z = emu.get('/datasets/download/' + events[-1]['zip'], key=KEY_SAMPLE)
    assert z.status == 200 and z.headers['Content-Type'] == 'application/zip'
    assert int(z.headers['Content-Length']) == len(z.body)
    zf, meta = _zip(z.body)
    assert meta['id'] == sample['dataset_id'] and len(meta['resources']) == 19
    for ent in meta['resources']:
        assert hashlib.sha256(zf.read(ent['file'])).hexdigest() == sha[ent['id']]
        for a in ent['annotations']:
            assert {'type', 'name', 'index', 'added_by'} <= set(a)
            if a['type'] == 'segmentation':
                assert a['file'].startswith('masks/%s/%s/' % (a['added_by'], ent['id']))
                zf.read(a['file'])
    mf = next(e for e in meta['resources'] if e['filename'] == 'multiframe_4x128.dcm')
    assert [f['frame'] for f in mf['frame_labels']] == [1, 2, 3]
    # The HEAD client reads the token as a JSON string (§3.3.1).
    r = emu.get('/datasets/%s/download/nifti' % sample['dataset_id'], key=KEY_SAMPLE,
                headers={'Accept': 'application/json'})
    assert isinstance(is_json(r), str)
    assert emu.get('/datasets/download/' + r.json(), key=KEY_SAMPLE).status == 200
    # Generation B (§3.3.2): project ZIP with all_annotations / include_unannotated.
    r = emu.get('/projects/%s/annotated_dataset' % sample['id'], key=KEY_SAMPLE,
                query={'all_annotations': 'False'})
    assert r.status == 200 and int(r.headers['Content-Length']) == len(r.body)
    zf, meta = _zip(r.body)
    assert meta['all_annotations'] is False
    names = {a['name'] for e in meta['resources'] for a in e['annotations']}
    assert 'lesion' not in names and 'Liver' in names  # unpublished annotation left out
    r = emu.get('/projects/%s/annotated_dataset' % sample['id'], key=KEY_SAMPLE,
                query={'all_annotations': 'true', 'include_unannotated': 'true'})
    zf, meta = _zip(r.body)
    assert 'lesion' in {a['name'] for e in meta['resources'] for a in e['annotations']}
    # Generation C (§3.3.3): project resources + per-file + annotations by worklist.
    res = is_json(emu.get('/projects/%s/resources' % sample['id'], key=KEY_SAMPLE))
    for r0 in res[:5]:
        body = emu.get('/resources/%s/file' % r0['id'], key=KEY_SAMPLE).body
        assert hashlib.sha256(body).hexdigest() == sha[r0['id']]
    # Large synthetic projects refuse ZIPs with a clear message.
    assert 'too large' in err(emu.get('/projects/%s/annotated_dataset' % emu.project('big')['id']), 400)


def test_updated_at_bumps(emu):
    sample = emu.project('sample')
    d0 = is_json(emu.get('/datasets/' + sample['dataset_id']))['updated_at']
    rid = is_json(emu.upload('new.png', b'png', 'image/png'))['id']
    assert is_json(emu.get('/datasets/' + sample['dataset_id']))['updated_at'] == d0
    r = emu.request('POST', '/datasets/%s/resources' % sample['dataset_id'],
                    json_body={'resource_ids_to_add': [rid], 'all_files_selected': False})
    assert r.status in (200, 201)
    d1 = is_json(emu.get('/datasets/' + sample['dataset_id']))
    assert d1['updated_at'] > d0 and rid in d1['resource_ids']
    emu.request('POST', '/resources/%s/publish' % rid)
    d2 = is_json(emu.get('/datasets/' + sample['dataset_id']))['updated_at']
    assert d2 > d1['updated_at']
    assert emu.request('DELETE', '/resources/' + rid).status == 200
    d3 = is_json(emu.get('/datasets/' + sample['dataset_id']))
    assert d3['updated_at'] > d2 and rid not in d3['resource_ids']
    assert rid not in [r['id'] for r in is_json(emu.get('/projects/%s/resources' % sample['id']))]


# ---- What the client cannot tell from the server (the seed-era client's code, late 2024:
# datamintapi/api_handler.py@af98a24, and the 2.x client: datamint/api/base_api.py@v2.29.0)
MISSING = '00000000-0000-4000-8000-00000000abcd'
NOT_BIG = json.dumps({'items': ['sample', 'small'], 'filterType': 'union'})


def seed_client_not_found(r):
    """api_handler.py@af98a24 _check_errors_response: ResourceNotFoundError iff 404 and
    response.json()['message'] == 'Not Found'."""
    return r.status == 404 and r.json()['message'] == 'Not Found'


def head_client_not_found(r):
    """base_api.py@v2.29.0 line 449-452: ItemNotFoundError iff 404 and, in
    f"{e} | {text} | {json}" without '404 Not Found', ' not found' or 'Not Found'."""
    text = ("Client error '404 Not Found' | %s | %s" % (r.body.decode(), r.json())).replace(
        '404 Not Found', '')
    return r.status == 404 and (' not found' in text.lower() or 'Not Found' in text)


def test_not_found_body_is_the_servers(emu):
    sample = emu.project('sample')
    rid = emu.get('/projects/%s/resources' % sample['id']).json()[0]['id']
    for method, path in (('GET', '/resources/' + MISSING), ('GET', '/resources/%s/file' % MISSING),
                         ('POST', '/resources/%s/publish' % MISSING),
                         ('GET', '/projects/' + MISSING), ('GET', '/datasets/' + MISSING),
                         ('GET', '/annotations/' + MISSING),
                         ('GET', '/annotations/%s/annotations/%s/file' % (rid, MISSING)),
                         ('GET', '/upload-batches/' + MISSING)):
        r = emu.request(method, path)
        body = is_json(r)
        assert body == {'statusCode': 404, 'message': 'Not Found', 'error': 'Not Found'}, path
        assert seed_client_not_found(r) and head_client_not_found(r), path
    # an unknown route is NestJS's "Cannot GET": not an entity the client looks for
    r = emu.get('/no/such/route')
    assert err(r, 404) == 'Cannot GET /no/such/route' and not seed_client_not_found(r)


def test_not_found_text_style_for_the_1x_clients():
    from client import Emulator
    with Emulator(extra_args=['--not-found-style', 'text']) as e:
        r = e.get('/resources/' + MISSING)
        # root_api_handler.py@1.2.4 line 201: ' not found' in message.lower()
        assert ' not found' in err(r, 404).lower() and head_client_not_found(r)


def test_nifti_mimetype_is_application_nifti(emu):
    sample = emu.project('sample')
    res = emu.get('/projects/%s/resources' % sample['id']).json()
    nii = [r for r in res if r['filename'].endswith(('.nii', '.nii.gz'))]
    assert len(nii) == 2
    for r in nii:
        # api_handler.py@af98a24 convert_format dispatches on == 'application/nifti'
        assert r['mimetype'] == 'application/nifti' and r['storage'] == 'NiftiResource'
        f = emu.get('/resources/%s/file' % r['id'])
        assert f.status == 200 and f.headers['Content-Type'] == 'application/nifti'
    # both names are accepted: as a filter, and as an upload's mimetype (stored as the client's)
    for m in ('application/nifti', 'application/x-nifti'):
        got, _ = walk(emu, mimetype=m, project=json.dumps({'items': ['sample'],
                                                         'filterType': 'union'}))
        assert sorted(x['id'] for x in got) == sorted(x['id'] for x in nii)
    up = emu.upload('up.nii', b'\0' * 400, 'application/x-nifti')
    r = is_json(emu.get('/resources/' + up.json()['id']))
    assert r['mimetype'] == 'application/nifti'
    seg = emu.get('/annotations', query={'resource_id': nii[0]['id']}).json()['data']
    a = next(a for a in seg if a['associated_file'])
    f = emu.get('/annotations/%s/annotations/%s/file' % (nii[0]['id'], a['id']))
    assert f.headers['Content-Type'] == 'application/nifti'


def test_resources_ids_only(emu):
    proj = json.dumps({'items': ['sample', 'small'], 'filterType': 'union'})
    full, total = walk(emu, status='', limit=7, project=proj)
    ids, total2 = walk(emu, status='', limit=7, ids='True', project=proj)  # requests: True
    assert total == 19 + 25
    assert total == total2 and [x['id'] for x in full] == [x['id'] for x in ids]
    assert all(x == {'id': x['id']} for x in ids)


def test_labels_are_labels_not_tags(emu):
    sample = emu.project('sample')
    res = emu.get('/projects/%s/resources' % sample['id']).json()
    # expected from the corpus: resources with an image-scoped label annotation 'fracture'
    with open(os.path.join(emu.corpus, 'projects', 'sample', 'project.json')) as f:
        proj = json.load(f)
    want = sorted(r['id'] for r in proj['resources'] for a in r['annotations']
                  if a['type'] == 'label' and a['identifier'] == 'fracture'
                  and a.get('frame_index') is None)
    assert len(want) == 2
    # get_resources(labels=['fracture']) @af98a24: labels[0]=fracture
    got, _ = walk(emu, status='', project=NOT_BIG, **{'labels[0]': 'fracture'})
    assert sorted(x['id'] for x in got) == want
    assert all('fracture' in x['labels'] and 'fracture' not in x['tags'] for x in got)
    got, _ = walk(emu, status='', project=NOT_BIG, **{'labels[0]': 'png'})  # a tag, not a label
    assert got == []
    both, _ = walk(emu, status='', project=NOT_BIG,
                   **{'labels[0]': 'liver_visible', 'labels[1]': 'lesion'})
    assert [x['filename'] for x in both] == ['ct_006.dcm']
    # _upload_single_resource_async @af98a24: form fields labels[i]
    up = emu.upload('labelled.png', b'\x89PNG\r\n\x1a\n', 'image/png',
                    **{'labels[0]': 'fracture', 'labels[1]': 'wrist'})
    r = is_json(emu.get('/resources/' + up.json()['id']))
    assert r['labels'] == ['fracture', 'wrist'] and r['tags'] == []
    got, _ = walk(emu, status='', filename='labelled.png', **{'labels[0]': 'wrist'})
    assert [x['id'] for x in got] == [r['id']]
    assert r['id'] not in [x['id'] for x in walk(emu, status='', filename='labelled.png', tags=json.dumps(
        {'items': ['wrist'], 'filterType': 'union'}))[0]]
    # set_resource_labels: PUT /resources/{id}/labels replaces them
    r = is_json(emu.request('PUT', '/resources/%s/labels' % r['id'],
                            json_body={'labels': ['normal']}))
    assert r['labels'] == ['normal'] and r['tags'] == []
    assert res  # the project listing still answers


def test_upload_batches(emu):
    # get_batches @af98a24: GET /upload-batches, {"data": [...]}, offset/limit pages of 10
    def get_batches():
        out, offset = [], 0
        while True:
            page = is_json(emu.get('/upload-batches', key=KEY_CT,
                                   query={'offset': offset, 'limit': 10}))['data']
            out += page
            if len(page) < 10:
                return out
            offset += 10
    assert get_batches() == []
    ids = [is_json(emu.request('POST', '/upload-batches', key=KEY_CT,
                               json_body={'description': 'batch %d' % i, 'size': 1}))['id']
           for i in range(12)]
    got = get_batches()
    assert [b['id'] for b in got] == ids and got[3]['description'] == 'batch 3'
    b = is_json(emu.get('/upload-batches/' + ids[0], key=KEY_CT))
    assert b['id'] == ids[0] and b['images'] == []
    assert seed_client_not_found(emu.get('/upload-batches/' + ids[0], key=KEY_SAMPLE))


def test_deleted_resources_disappear(emu):
    up = emu.upload('gone.png', b'\x89PNG\r\n\x1a\n', 'image/png', bypass_inbox='true')
    rid = up.json()['id']
    mine = {'filename': 'gone.png'}
    assert rid in [x['id'] for x in walk(emu, status='', **mine)[0]]
    assert is_json(emu.request('DELETE', '/resources/' + rid))['deleted'] is True
    for path in ('/resources/' + rid, '/resources/%s/file' % rid):
        r = emu.get(path)
        assert seed_client_not_found(r) and head_client_not_found(r), path
    assert rid not in [x['id'] for x in walk(emu, status='', **mine)[0]]
    # unless the client asks for deleted ones
    r = is_json(emu.get('/resources/' + rid, query={'deleted': 'true'}))
    assert r['deleted'] is True and r['deleted_at'] and r['deleted_by'] == 'alice@example.org'
    assert rid in [x['id'] for x in walk(emu, status='', deleted='true', **mine)[0]]


def test_v2_dataset_routes(emu):
    """The routes the 2.x client's Dataset calls, read as its code reads them (datamint at
    tag v2.29.0; files and lines in tests/emulator/README.md)."""
    sample = emu.project('sample')
    with open(os.path.join(emu.corpus, 'projects', 'sample', 'project.json')) as f:
        corpus = json.load(f)
    # annotationsets_api.py get_by_project: a list, worklist_id/worklist_name -> id/name
    wl = is_json(emu.get('/projects/%s/worklists' % sample['id'], key=KEY_SAMPLE))
    assert isinstance(wl, list) and len(wl) == 1
    assert wl[0]['worklist_id'] == sample['worklist_id'] and wl[0]['worklist_name'] == 'sample'
    assert {'status', 'annotators'} <= set(wl[0])
    # AnnotationWorklist with its annotation specs (annotation_worklist.py, annotation_spec.py)
    w = is_json(emu.get('/annotationsets/' + sample['worklist_id'], key=KEY_SAMPLE))
    assert w['id'] == sample['worklist_id'] and w['name'] == 'sample'
    for spec in w['annotations']:
        assert {'type', 'scope', 'required', 'identifier'} <= set(spec)
    want = {(a.get('scope'), a['identifier']) for r in corpus['resources']
            for a in r['annotations'] if a['type'] != 'segmentation'
            and a.get('status', 'published') == 'published'}
    assert {(s['scope'], s['identifier']) for s in w['annotations']} >= want
    birads = next(s for s in w['annotations'] if s['identifier'] == 'BIRADS')
    assert birads['type'] == 'category' and birads['values'] == ['2', '3', '4']
    listed = is_json(emu.get('/projects/%s/resources' % sample['id'], key=KEY_SAMPLE))
    assert sorted(w['resource_ids']) == sorted(r['id'] for r in listed)
    # base.py _process_segmentation_group: groups[name]['index'] from 1
    groups = is_json(emu.get('/annotationsets/%s/segmentation-group' % sample['worklist_id'],
                             key=KEY_SAMPLE))['groups']
    live = is_json(emu.get('/annotations', query={
        'annotation_worklist_id': sample['worklist_id'], 'annotation_type': 'segmentation'}))
    seg = sorted({a['identifier'] for a in live['data']})
    lst = ['UNKNOWN'] * max(g['index'] for g in groups.values())
    for name, g in groups.items():
        lst[g['index'] - 1] = name
    assert lst == seg and {'Edema', 'Liver', 'Spine', 'Tumor'} <= set(seg)
    # projects_api.py get_splits: ProjectResourceSplit(**item) for item in the list
    assert is_json(emu.get('/projects/%s/splits' % sample['id'], key=KEY_SAMPLE)) == []
    up = emu.upload('split.png', b'\x89PNG\r\n\x1a\n', 'image/png', tags='split:train',
                    bypass_inbox='true')
    emu.request('POST', '/projects/%s/resources' % sample['id'],
                json_body={'resource_ids_to_add': [up.json()['id']], 'all_files_selected': False})
    sp = is_json(emu.get('/projects/%s/splits' % sample['id'], key=KEY_SAMPLE,
                         query={'as_of_timestamp': '2030-01-01T00:00:00Z'}))
    assert [(x['resource_id'], x['split_name']) for x in sp] == [(up.json()['id'], 'train')]
    assert set(sp[0]) == {'id', 'split_name', 'project_id', 'resource_id', 'created_at',
                          'created_by', 'deleted_at', 'deleted_by'}
    emu.request('DELETE', '/resources/' + up.json()['id'])
    # members, annotation statuses: lists of dicts
    members = is_json(emu.get('/projects/%s/members' % sample['id'], key=KEY_SAMPLE))
    assert {m['email'] for m in members} == {'alice@example.org', 'bob@example.org'}
    assert all({'email', 'firstname', 'lastname', 'roles', 'customer_id', 'created_at'}
               <= set(m) for m in members)
    st = is_json(emu.get('/projects/%s/annotation-statuses' % sample['id'], key=KEY_SAMPLE))
    assert st and all(x['status'] == 'closed' for x in st)
    # resources_api.py get_not_annotated: paged, return_field 'resources'
    body = is_json(emu.get('/resources/not-annotated', key=KEY_SAMPLE,
                           query={'offset': 0, 'limit': 5000}))
    got = body['data'][0]['resources']
    assert body['totalCount'] == len(got) and all(r['created_by'] == 'bob@example.org'
                                                  for r in got)  # bob's own uploads only
    ann = [r['id'] for r in corpus['resources']]
    assert not set(ann) & {r['id'] for r in got}  # every corpus item has annotations
    # frames: an image resource is its own frame 0
    png = next(r for r in corpus['resources'] if r['filename'] == 'xray_gray8.png')
    f = emu.get('/resources/%s/frames/0' % png['id'], key=KEY_SAMPLE,
                headers={'accept': 'image/*'})
    assert f.status == 200 and f.headers['Content-Type'] == 'image/png'
    with open(os.path.join(emu.corpus, 'projects', 'sample', png['file']), 'rb') as fh:
        assert f.body == fh.read()
    assert is_json(emu.get('/users/me', key=KEY_SAMPLE))['email'] == 'bob@example.org'
    assert emu.get('/models', key=KEY_SAMPLE).status == 200
    # none of them answers for a project or worklist the key does not see
    ct = emu.project('ct')
    for path in ('/projects/%s/worklists' % ct['id'], '/annotationsets/' + ct['worklist_id'],
                 '/annotationsets/%s/segmentation-group' % ct['worklist_id']):
        assert emu.get(path, key=KEY_SAMPLE).status == 404
