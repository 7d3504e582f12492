"""The 2025 Datamint client's annotation outputs (datamintapi/dataset/{base_dataset,
dataset}.py at tag 1.2.4, the same in datamint/dataset/ up to v2.22), computed from the
dataset folder entries that dmcache._metainfo gives:

  segmentations  {annotator: [per frame BoolTensor (n_instances, H, W)]} from each
                 segmentation's PNG: convert('L'), resize((W, H), NEAREST), == 255
  seg_labels     {annotator: [per frame IntTensor (n_instances,)]}, codes 1.. into the
                 sorted segmentation names
  semantic       {annotator: FloatTensor (frames, L + 1, H, W)} (channel 0: background),
                 merged by 'union' / 'intersection' / 'mode' into one tensor
  frame_labels   {annotator: IntTensor (frames, n_frame_labels)} one-hot
  image_labels   {annotator: IntTensor (n_image_labels,)} one-hot
  filters        include/exclude annotators, segmentation, image and frame label names
  alb_transform  an albumentations transform (any callable t(image=, masks=) -> dict) over
                 the (H, W, C) image and every instance mask (frame by frame only)

Functions here are pure: the Dataset gives them the entries and a mask reader.
"""
import io

import numpy as np

FILTERS = ('include_annotators', 'exclude_annotators', 'include_segmentation_names',
           'exclude_segmentation_names', 'include_image_label_names',
           'exclude_image_label_names', 'include_frame_label_names',
           'exclude_frame_label_names')


def check_filters(opts):
    for a, b in zip(FILTERS[::2], FILTERS[1::2]):
        if opts.get(a) is not None and opts.get(b) is not None:
            raise ValueError('Cannot set both %s and %s at the same time' % (a, b))


def _keep(name, include, exclude):
    if include is not None:
        return name in include
    if exclude is not None:
        return name not in exclude
    return True


def filter_annotations(anns, o):
    """base_dataset.py@1.2.4 _filter_annotations."""
    out = []
    for a in anns or ():
        if not _keep(a.get('added_by'), o.get('include_annotators'), o.get('exclude_annotators')):
            continue
        if a['type'] == 'segmentation':
            if not _keep(a['name'], o.get('include_segmentation_names'),
                         o.get('exclude_segmentation_names')):
                continue
        elif a['type'] == 'label':
            if a.get('index') is None:
                if not _keep(a['name'], o.get('include_image_label_names'),
                             o.get('exclude_image_label_names')):
                    continue
            elif not _keep(a['name'], o.get('include_frame_label_names'),
                           o.get('exclude_frame_label_names')):
                continue
        out.append(a)
    return out


def of_kind(anns, type='all', scope='all'):
    """base_dataset.py@1.2.4 _get_annotations_internal."""
    out = []
    for a in anns:
        s = 'image' if a.get('index') is None else 'frame'
        if (type == 'all' or a['type'] == type) and (scope == 'all' or scope == s):
            out.append(a)
    return out


def label_sets(all_anns, framed):
    """base_dataset.py@1.2.4 _get_labels_set: (sets, codes) over every item."""
    scope = 'frame' if framed else 'image'
    ml, seg, mc = set(), set(), set()
    for anns in all_anns:
        ml.update(a['name'] for a in of_kind(anns, 'label', scope))
        seg.update(a['name'] for a in of_kind(anns, 'segmentation', scope))
        mc.update((a['name'], a.get('value')) for a in of_kind(anns, 'category', scope))
    ml, seg, mc = sorted(ml), sorted(seg), sorted(mc)
    return ({'multilabel': ml, 'segmentation': seg, 'multiclass': mc},
            {'multilabel': {n: i for i, n in enumerate(ml)},
             'segmentation': {n: i + 1 for i, n in enumerate(seg)},
             'multiclass': {n: i for i, n in enumerate(mc)}})


def load_segmentations(torch, anns, img_shape, frame_by_frame, seg_codes, read_mask):
    """dataset.py@1.2.4 _load_segmentations. read_mask(ann) -> the mask file's bytes, or
    None for a mask that is not an image (a NIfTI volume: left out)."""
    from PIL import Image
    if frame_by_frame:
        _, h, w = img_shape
        nframes = 1
    else:
        nframes, _, h, w = img_shape
    segs, labels = {}, {}
    for a in anns:
        if a['type'] != 'segmentation' or 'file' not in a:
            continue
        data = read_mask(a)
        if data is None:
            continue
        m = Image.open(io.BytesIO(data)).convert('L').resize((w, h), Image.NEAREST)
        m = torch.from_numpy(np.array(m)) == 255
        frame = 0 if frame_by_frame else a['index']
        if frame is None:
            continue  # an image-scoped mask has no frame slot in the client either
        by = a['added_by']
        if by not in segs:
            segs[by], labels[by] = [None] * nframes, [None] * nframes
        if segs[by][frame] is None:
            segs[by][frame], labels[by][frame] = [], []
        segs[by][frame].append(m)
        labels[by][frame].append(seg_codes[a['name']])
    for by in segs:
        for i in range(len(segs[by])):
            if segs[by][i] is not None:
                segs[by][i] = torch.stack(segs[by][i])
                labels[by][i] = torch.tensor(labels[by][i], dtype=torch.int32)
            else:
                segs[by][i] = torch.zeros((0, h, w), dtype=torch.bool)
                labels[by][i] = torch.zeros(0, dtype=torch.int32)
    return segs, labels


def to_semantic(torch, segs, labels, nlabels):
    """dataset.py@1.2.4 _instanceseg2semanticseg: (frames, L + 1, H, W) float."""
    h, w = segs[0].shape[1:]
    out = torch.zeros((len(segs), nlabels + 1, h, w), dtype=torch.uint8)
    for i in range(len(segs)):
        for j in range(len(segs[i])):
            out[i, labels[i][j]] += segs[i][j]
    out = out > 0
    out[:, 0] = out.sum(dim=1) == 0
    return out.float()


def merge(torch, strategy, sem, nframes, nlabels, h, w):
    """dataset.py@1.2.4 apply_semantic_seg_merge_strategy ('intersection' as the client
    computes it: ones + every mask, so every pixel is True)."""
    if strategy is None:
        return sem
    if not sem:
        out = torch.zeros((nframes, nlabels + 1, h, w), dtype=torch.get_default_dtype())
        out[:, 0] = 1
        return out
    first = list(sem.values())[0]
    acc = torch.ones_like(first) if strategy == 'intersection' else torch.zeros_like(first)
    for s in sem.values():
        acc += s
    if strategy == 'mode':
        acc = acc >= len(sem) / 2
    elif strategy in ('union', 'intersection'):
        acc = acc.bool()
    else:
        raise ValueError('Unknown semantic_seg_merge_strategy: %s' % strategy)
    return acc.to(torch.get_default_dtype())


def onehot(torch, anns, nlabels, codes, num_frames, frame_by_frame):
    """dataset.py@1.2.4 _convert_labels_annotations."""
    size = (nlabels,) if num_frames is None else (num_frames, nlabels)
    out = {}
    for a in anns:
        by = a['added_by']
        if by not in out:
            out[by] = torch.zeros(size=size, dtype=torch.int32)
        code = codes[a['name']]
        idx = a.get('index')
        if idx is None:
            out[by][code] = 1
        elif frame_by_frame:
            out[by][0, code] = 1
        else:
            out[by][idx, code] = 1
    if frame_by_frame and num_frames is not None:
        out = {k: v[0] for k, v in out.items()}
    return out


def alb_with_masks(torch, transform, img, segs):
    """dataset.py@1.2.4 __apply_alb_transform_segmentation, then the image back to (C, H, W):
    every instance mask of every annotator as one uint8 array (N, H, W) (None when there is
    none) goes through transform(image=<(H, W, C) array>, masks=...) with the image; each
    annotator's masks come back as numpy uint8 arrays (n_i, H', W'), as in the client."""
    every, keys, n = [], {}, 0
    for by, lst in segs.items():
        keys[by] = []
        for seg in lst:
            if seg is None:
                keys[by].append(None)
                continue
            every.append(torch.as_tensor(seg))
            keys[by].append(list(range(n, n + seg.shape[0])))
            n += seg.shape[0]
    masks = torch.cat(every).numpy().astype(np.uint8) if every else None
    out = transform(image=img.numpy().transpose(1, 2, 0), masks=masks)
    got = out['masks'] if masks is not None else None
    new = {by: [None if k is None else np.stack([got[j] for j in k]) for k in ks]
           for by, ks in keys.items()}
    return torch.from_numpy(out['image']).permute(2, 0, 1), new
