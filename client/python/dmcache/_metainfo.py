"""metainfo as the Datamint client gives it: the item's entry of the dataset folder.

The Datamint client's Dataset returns, as metainfo, the item's entry of the dataset.json it
downloaded (datamintapi/dataset.py@af98a24 __getitem__): the resource object plus `file` (the image's path
inside the dataset folder), `annotations` in the folder's short form (one dict per
annotation: `type`, `name`, `index`, `added_by`, `value` for a category, `file` for a
segmentation mask) and `frame_labels` (frame-scoped labels as {label, frame, created_by},
or None). dmcache's daemon sends the API's resource record with the API's long annotation
records; this module turns it into that entry, with the folder paths the server's dataset
ZIP uses (`images/<id><ext>`, `masks/<created_by>/<resource id>/<annotation id><ext>`).
A local folder's entry is already that entry and is passed through.
"""
import os

# long field name (API annotation record) -> short one (the dataset folder's dataset.json)
SHORT = (('annotation_type', 'type'), ('identifier', 'name'), ('frame_index', 'index'),
         ('created_by', 'added_by'))


# keys the daemon adds to a record for its own use (not the client's)
DAEMON_KEYS = ('mask_blobs',)


def ext_of(name):
    """The extension the dataset folder gives a file of this name ('.nii.gz' whole)."""
    low = (name or '').lower()
    if low.endswith('.nii.gz'):
        return '.nii.gz'
    return os.path.splitext(low)[1]


def is_long(a):
    return isinstance(a, dict) and 'annotation_type' in a and 'type' not in a


def short_annotation(a, resource_id):
    """One API annotation record -> the dataset folder's short dict."""
    e = {s: a.get(k) for k, s in SHORT}
    if a.get('annotation_type') == 'category':
        e['value'] = a.get('text_value')
    if a.get('associated_file') or (a.get('annotation_type') == 'segmentation' and a.get('file')):
        e['file'] = 'masks/%s/%s/%s%s' % (a.get('created_by'), resource_id, a.get('id'),
                                          ext_of(a.get('associated_file') or ''))
    return e


def frame_labels(short):
    """The entry's frame_labels: frame-scoped labels, None when there are none."""
    out = [{'label': a['name'], 'frame': a['index'], 'created_by': a.get('added_by')}
           for a in short if a.get('type') == 'label' and a.get('index') is not None]
    return out or None


def from_record(record, local):
    """The dataset folder entry of an item from the record the daemon sends."""
    rec = dict(record or {})
    for k in DAEMON_KEYS:
        rec.pop(k, None)
    if local:
        return rec
    anns = [a for a in rec.get('annotations') or () if isinstance(a, dict)
            and not a.get('deleted')]
    rid = rec.get('id')
    if anns and not all(is_long(a) for a in anns):
        short = [dict(a) for a in anns]  # already short
    else:
        short = [short_annotation(a, rid) for a in anns]
    rec['file'] = 'images/%s%s' % (rid, ext_of(rec.get('filename')))
    rec['annotations'] = short
    rec['frame_labels'] = frame_labels(short)
    return rec


def annotation_frame(a):
    """An annotation's frame index in either naming (None: image-scoped)."""
    if not isinstance(a, dict):
        return None
    return a['index'] if 'index' in a else a.get('frame_index')


def for_frame(entry, frame):
    """The entry of one frame, as the client's return_frame_by_frame gives it: only the
    annotations of that frame (image-scoped ones, index None, are dropped, as in the
    client's `ann['index'] == index`)."""
    out = dict(entry)
    out['annotations'] = [a for a in entry.get('annotations') or ()
                          if annotation_frame(a) == frame]
    return out
