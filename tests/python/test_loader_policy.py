"""dmcache.Loader's uniformity policy, applied by the daemon's decode workers: size= with
resize='bilinear' | 'area' | 'nearest', crop=, pad= with pad_value=, channels=, window=
and dtype='float16' / 'bfloat16'. Every batch of a shuffled epoch over the mixed
int16/uint16 'ct' project is one tensor; every value equals an independent computation
here (Pillow's resize of the same float32 planes, numpy's indexing, clipping and casts)
from the daemon's own unpolicied output of the same items (itself checked against pydicom
by test_loader_training.py)."""
import ctypes
import os
import re
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import dmcache
from conftest import counters

ARENA = 64 << 20


def unpolicied(project, **kw):
    """{index: numpy array (F, C, H, W)} of every item, as the daemon serves it without a
    policy (collate='list': items may differ)."""
    loader = dmcache.Loader(project, batch_size=8, arena_bytes=ARENA, collate='list',
                            metadata=False, copy=True, **kw)
    out = {}
    for b in loader:
        for x, i in zip(b.images, b.indices):
            out[i] = x.numpy().copy()
    loader.close()
    return out


@pytest.fixture(scope='module')
def ct_f32(daemon):
    """The stored values of every ct slice as float32 (exact: 16-bit integers)."""
    out = unpolicied('ct', dtype='float32')
    assert len(out) == 72
    return out


@pytest.fixture(scope='module')
def ct_hu(daemon):
    """The modality LUT's output of every ct slice, float64 (as the window reads it)."""
    return unpolicied('ct', lut=True, dtype='float64')


def epoch(want_dtype, want_shape, **kw):
    """(index, tensor (F, C, H, W)) of a shuffled epoch over 'ct' under a policy; every
    batch must be one tensor of want_dtype."""
    loader = dmcache.Loader('ct', batch_size=8, shuffle=True, seed=5, arena_bytes=ARENA,
                            metadata=False, **kw)
    seen = []
    for b in loader:
        assert isinstance(b.images, torch.Tensor), kw
        assert b.images.dtype == want_dtype, (kw, b.images.dtype)
        assert tuple(b.images.shape) == (len(b.indices),) + want_shape, kw
        seen += [(i, b.images[k].clone()) for k, i in enumerate(b.indices)]
    loader.close()
    assert sorted(i for i, _ in seen) == list(range(72))
    return seen


def pillow_resize(a, h, w, method):
    """Pillow's resampling of each float32 plane of a (F, C, H, W) array (mode "F")."""
    out = np.empty(a.shape[:2] + (h, w), np.float32)
    for f in range(a.shape[0]):
        for c in range(a.shape[1]):
            im = Image.fromarray(np.ascontiguousarray(a[f, c], dtype=np.float32), mode='F')
            out[f, c] = np.asarray(im.resize((w, h), method))
    return out


@pytest.mark.parametrize('resize,method,size', [
    ('bilinear', Image.BILINEAR, (100, 77)),
    ('bilinear', Image.BILINEAR, (600, 530)),
    ('area', Image.BOX, (100, 77)),
    ('area', Image.BOX, (512, 300)),
])
def test_resize_equals_pillow(daemon, ct_f32, resize, method, size):
    """Mixed int16/uint16 slices, resampled: float32 tensors, every value equal to
    Pillow's resize of the same float32 planes (the daemon computes Pillow's algorithm:
    same coefficients, double sums, float32 between the passes)."""
    for i, x in epoch(torch.float32, (1, 1) + size, size=size, resize=resize):
        assert np.array_equal(x.numpy(), pillow_resize(ct_f32[i], *size, method)), (i, resize)


def test_nearest_keeps_values(daemon, ct_f32):
    h, w = 300, 700
    sy = (2 * np.arange(h) + 1) * 512 // (2 * h)
    sx = (2 * np.arange(w) + 1) * 512 // (2 * w)
    for i, x in epoch(torch.int32, (1, 1, h, w), size=(h, w), resize='nearest',
                      dtype='int32'):
        want = ct_f32[i][:, :, sy][:, :, :, sx].astype(np.int32)
        assert np.array_equal(x.numpy(), want), i
        # the same pixels as Pillow's NEAREST, except where the source position
        # (x + 0.5) * in / out is an exact integer: Pillow computes it in floating point,
        # which can land just below and take the previous pixel (rows 37 and 262 of 300)
        pil = pillow_resize(ct_f32[i], h, w, Image.NEAREST)
        ry = ((2 * np.arange(h) + 1) * 512) % (2 * h) != 0
        rx = ((2 * np.arange(w) + 1) * 512) % (2 * w) != 0
        assert (~ry).any()
        assert np.array_equal(x.numpy()[:, :, ry][:, :, :, rx], pil[:, :, ry][:, :, :, rx]), i


def canvas(a, h, w, value, centered):
    """a (F, C, H, W) on an (h, w) canvas of `value`: centered (offset floor((in - out) /
    2), cut or padded around) or at the top-left."""
    out = np.full(a.shape[:2] + (h, w), value, dtype=a.dtype)
    oy = (a.shape[2] - h) // 2 if centered else 0
    ox = (a.shape[3] - w) // 2 if centered else 0
    xs = np.arange(w) + ox
    ok = (xs >= 0) & (xs < a.shape[3])
    for y in range(h):
        if 0 <= y + oy < a.shape[2]:
            out[:, :, y, ok] = a[:, :, y + oy, xs[ok]]
    return out


@pytest.mark.parametrize('kind,hw,value', [
    ('crop', (300, 600), -7),   # cut in height, padded in width (offset -44)
    ('crop', (511, 101), 0),
    ('pad', (600, 300), 5.5),   # padded below, cut at the right
])
def test_crop_and_pad(daemon, ct_f32, kind, hw, value):
    kw = {kind: hw, 'pad_value': value, 'dtype': 'float32'}
    for i, x in epoch(torch.float32, (1, 1) + hw, **kw):
        want = canvas(ct_f32[i], *hw, np.float32(value), kind == 'crop')
        assert np.array_equal(x.numpy(), want), (i, kind)


def window(x, center, width):
    return np.clip((x - (center - width / 2)) / width, 0, 1).astype(np.float32)


def test_window_after_the_modality_lut(daemon, ct_hu):
    """window= needs no dtype=: int16 and uint16 slices all come as float32 in [0, 1]."""
    c, w = 40.0, 400.0
    outside = 0
    for i, x in epoch(torch.float32, (1, 1, 512, 512), window=(c, w)):
        want = window(ct_hu[i], c, w)
        assert np.array_equal(x.numpy(), want), i
        outside += int((want == 0).sum() + (want == 1).sum())
    assert outside > 0  # the window clips something: the test sees both ends
    # with lut=True too (the window applies the LUT either way), and with a resize after
    for i, x in epoch(torch.float32, (1, 1, 64, 64), window=(c, w), lut=True, size=(64, 64)):
        want = pillow_resize(window(ct_hu[i], c, w), 64, 64, Image.BILINEAR)
        assert np.array_equal(x.numpy(), want), i


def test_channels_and_half_dtypes(daemon, ct_f32, ct_hu):
    for i, x in epoch(torch.int32, (1, 3, 512, 512), channels=3, dtype='int32'):
        assert np.array_equal(x.numpy(), np.repeat(ct_f32[i], 3, axis=1).astype(np.int32))
    # float16 and bfloat16 made by the daemon: numpy's and torch's casts of float32
    for i, x in epoch(torch.float16, (1, 1, 512, 512), dtype='float16'):
        assert np.array_equal(x.numpy(), ct_f32[i].astype(np.float16)), i
    for i, x in epoch(torch.bfloat16, (1, 1, 512, 512), dtype='bfloat16'):
        assert torch.equal(x, torch.from_numpy(ct_f32[i]).to(torch.bfloat16)), i
    hw = (1, 3, 128, 96)
    for i, x in epoch(torch.float16, hw, window=(-600, 1500), size=(128, 96),
                      resize='area', channels=3, dtype=torch.float16):
        w = pillow_resize(window(ct_hu[i], -600, 1500), 128, 96, Image.BOX)
        assert np.array_equal(x.numpy(), np.repeat(w, 3, axis=1).astype(np.float16)), i


def test_channels_of_color_and_gray_images(daemon):
    """'formats' PNG/JPEG items of 1, 2, 3 and 4 channels: channels=3 repeats gray (and
    gray+alpha's gray) and drops alpha; channels=1 is the luma of RGB(A) in float32."""
    src = unpolicied('formats', dtype='float64')
    assert {a.shape[1] for a in src.values()} >= {1, 2, 3, 4}
    for n in (1, 3):
        got = {}
        loader = dmcache.Loader('formats', batch_size=4, arena_bytes=ARENA, collate='list',
                                metadata=False, channels=n, copy=True)
        for b in loader:
            for x, i in zip(b.images, b.indices):
                got[i] = x.numpy()
        loader.close()
        assert got.keys() == src.keys()
        for i, a in src.items():
            c = a.shape[1]
            assert got[i].shape[1] == n, i
            if n == 1 and c >= 3:
                luma = (0.299 * a[:, 0:1] + 0.587 * a[:, 1:2] + 0.114 * a[:, 2:3])
                assert got[i].dtype == np.float32, i
                assert np.array_equal(got[i], luma.astype(np.float32)), i
                continue
            # copies of planes: the decoded dtype and values
            if c == n:
                want = a
            elif n == 3:
                want = a[:, [0, 0, 0]] if c <= 2 else a[:, :3]
            else:
                want = a[:, :1]  # gray+alpha's gray
            assert np.array_equal(got[i].astype(np.float64), want), i


def test_mismatch_names_the_parameter(daemon):
    # a crop alone leaves int16 and uint16 apart: dtype= is named
    loader = dmcache.Loader('ct', batch_size=8, shuffle=True, arena_bytes=ARENA,
                            crop=(64, 64))
    with pytest.raises(dmcache.BatchMismatchError) as e:
        for _ in loader:
            pass
    text = str(e.value)
    assert 'int16' in text and 'uint16' in text and 'dtype=' in text, text
    assert '(1, 1, 64, 64)' in text, text
    loader.close()
    # 'formats': shapes that differ; the message names what differs and what fixes it
    loader = dmcache.Loader('formats', batch_size=64, arena_bytes=ARENA, dtype='float32')
    with pytest.raises(dmcache.BatchMismatchError) as e:
        next(iter(loader))
    text = str(e.value)
    loader.close()
    shapes = [tuple(int(v) for v in s.split(', '))
              for s in re.findall(r'float32 \(([0-9, ]+)\)', text)]
    assert len(shapes) == 2, text
    (f1, c1, h1, w1), (f2, c2, h2, w2) = shapes
    assert ('size=(H, W)' in text) == ((h1, w1) != (h2, w2)), text
    assert ('channels=' in text) == (c1 != c2), text
    assert ('return_frame_by_frame=True' in text) == (f1 != f2), text
    assert 'dtype=' not in text.split('mixes')[1], text


def test_policy_is_part_of_the_cache_key(daemon):
    """The decoded tensors are kept per policy: another policy decodes again, the same
    policy is served from the kept tensors."""
    def read(**kw):
        loader = dmcache.Loader('ct', batch_size=8, arena_bytes=ARENA, metadata=False,
                                dtype='float32', **kw)
        out = {i: x.clone() for b in loader for i, x in zip(b.indices, b.images)}
        loader.close()
        return out

    def decoded():
        return counters(daemon.socket)['serve_items_decoded_total']

    d0 = decoded()
    a = read(size=(32, 48))
    d1 = decoded()
    assert d1 - d0 == 72
    b = read(size=(48, 32))
    assert decoded() - d1 == 72  # another policy: nothing of the first one reused
    assert all(a[i].shape[-2:] == (32, 48) and b[i].shape[-2:] == (48, 32) for i in a)
    d2 = decoded()
    again = read(size=(32, 48))
    assert decoded() == d2  # the same policy: every item kept (hot set or store)
    assert all(torch.equal(a[i], again[i]) for i in a)


def test_bad_parameters_are_refused(daemon):
    for kw, word in ((dict(size=(8, 8), crop=(8, 8)), 'exclude'),
                     (dict(size=(8, 8), resize='cubic'), 'resize'),
                     (dict(size=(0, 8)), 'size='),
                     (dict(pad=(8, 70000)), 'pad='),
                     (dict(crop=(8, 8), pad_value=float('nan')), 'pad_value'),
                     (dict(channels=2), 'channels'),
                     (dict(window=(40, 0)), 'window='),
                     (dict(window=40), 'window='),
                     (dict(masks=True, size=(8, 8)), 'masks')):
        with pytest.raises(ValueError) as e:
            dmcache.Loader('ct', **kw)
        assert word in str(e.value), (kw, str(e.value))
    loader = dmcache.Loader('ct', size=64, resize='nearest', dtype='int32')
    assert 'size=64' in repr(loader) and "resize='nearest'" in repr(loader)
    loader.close()


def test_cli_get_applies_the_policy(daemon, ct_hu, ct_f32, tmp_path):
    """dmcache get --window/--size/--resize/--crop/--channels/--dtype float16: the same
    policy through the CLI, written as .npy."""
    cli = os.path.join(os.environ['DMC_BUILD_ROOT'], 'client', 'dmcache')

    def get(index, *args):
        out = str(tmp_path / ('item%d.npy' % index))
        r = subprocess.run([cli, '--socket', daemon.socket, 'get', 'ct', str(index), '-o',
                            out] + list(args), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return np.load(out)

    a = get(3, '--window', '40,400', '--size', '64x48', '--resize', 'area', '--dtype',
            'float16')
    want = pillow_resize(window(ct_hu[3], 40, 400), 64, 48, Image.BOX).astype(np.float16)
    assert a.dtype == np.float16 and np.array_equal(a, want)
    a = get(5, '--crop', '100x600', '--pad-value', '-1', '--channels', '3', '--dtype', 'int32')
    want = np.repeat(canvas(ct_f32[5], 100, 600, np.float32(-1), True), 3, axis=1)
    assert a.shape == (1, 3, 100, 600) and np.array_equal(a.astype(np.float32), want)
    for args in (['--size', '8x8', '--pad', '8x8'], ['--size', '0x8'], ['--resize', 'area'],
                 ['--window', '40'], ['--channels', '2'], ['--dtype', 'bfloat16']):
        r = subprocess.run([cli, '--socket', daemon.socket, 'get', 'ct', '0', '-o',
                            str(tmp_path / 'bad.npy')] + args, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and r.stderr.startswith('dmcache get:'), (args, r.stderr)


def test_a_mixed_project_frame_by_frame_becomes_one_tensor_per_batch(daemon):
    """'sample' mixes CT slices, gray and RGB PNG/JPEG and NIfTI volumes of other sizes:
    frame by frame, channels=3 and size= make every batch one tensor, each frame equal to
    Pillow's resize of its channels (gray repeated, alpha dropped)."""
    src = unpolicied('sample', return_frame_by_frame=True, dtype='float32')
    assert len({a.shape[1:] for a in src.values()}) > 2  # really mixed
    loader = dmcache.Loader('sample', batch_size=16, shuffle=True, seed=3, arena_bytes=ARENA,
                            return_frame_by_frame=True, channels=3, size=(40, 56),
                            metadata=False)
    seen = 0
    for b in loader:
        assert isinstance(b.images, torch.Tensor) and b.images.dtype == torch.float32
        assert tuple(b.images.shape[1:]) == (1, 3, 40, 56)
        for x, i in zip(b.images, b.indices):
            a = src[i]
            a3 = a[:, [0, 0, 0]] if a.shape[1] <= 2 else a[:, :3]
            assert np.array_equal(x.numpy(), pillow_resize(a3, 40, 56, Image.BILINEAR)), i
            seen += 1
    loader.close()
    assert seen == len(src)
    # indices= reads with GETs: the same policy applies
    loader = dmcache.Loader('sample', batch_size=4, indices=[0, 2, 5, 7],
                            arena_bytes=ARENA, return_frame_by_frame=True, channels=3,
                            size=(40, 56), metadata=False)
    for b in loader:
        assert tuple(b.images.shape) == (len(b.indices), 1, 3, 40, 56)
        for x, i in zip(b.images, b.indices):
            a = src[i]
            a3 = a[:, [0, 0, 0]] if a.shape[1] <= 2 else a[:, :3]
            assert np.array_equal(x.numpy(), pillow_resize(a3, 40, 56, Image.BILINEAR)), i
    loader.close()


def test_libdmcache_refuses_a_bad_policy_before_sending(daemon):
    """dmc_open_policy() checks the policy as the daemon would (dmc_policy_check): a SIZE
    without a resize mode never reaches the daemon."""
    from dmcache import _lib
    client = _lib.Client(daemon.socket)
    try:
        bad = _lib.Policy(ops=_lib.POLICY_SIZE, resize=0, height=8, width=8)
        with pytest.raises(dmcache.DmcacheError) as e:
            client.open(_lib.SOURCE_DATAMINT, 'ct', server=os.environ['DATAMINT_API_URL'],
                        api_key=os.environ['DATAMINT_API_KEY'], policy=bad)
        assert '[EINVAL]' in str(e.value), str(e.value)
        good = _lib.Policy(ops=_lib.POLICY_SIZE, resize=_lib.RESIZE_CODES['area'], height=8,
                           width=8)
        ds = client.open(_lib.SOURCE_DATAMINT, 'ct', server=os.environ['DATAMINT_API_URL'],
                         api_key=os.environ['DATAMINT_API_KEY'], policy=good)
        items = ds.get([0])
        assert tuple(items[0].shape) == (1, 1, 8, 8)
        assert _lib.DTYPES[items[0].dtype] == 'float32'
        ds.release(items)
        ds.close()
    finally:
        client.close()


def test_stored_files_refuse_a_policy(daemon):
    """DMC_OPEN_RAW serves each item's file as it was stored: the daemon refuses a policy
    with it (a resized file would not be the file), with the reason."""
    from dmcache import _lib
    client = _lib.Client(daemon.socket)
    try:
        pol = _lib.Policy(ops=_lib.POLICY_SIZE, resize=_lib.RESIZE_CODES['area'], height=8,
                          width=8)
        with pytest.raises(dmcache.DmcacheError) as e:
            client.open(_lib.SOURCE_DATAMINT, 'ct', server=os.environ['DATAMINT_API_URL'],
                        api_key=os.environ['DATAMINT_API_KEY'], raw=True, policy=pol)
        assert 'invalid_argument' in str(e.value) and 'policy' in str(e.value), str(e.value)
        ds = client.open(_lib.SOURCE_DATAMINT, 'ct', server=os.environ['DATAMINT_API_URL'],
                         api_key=os.environ['DATAMINT_API_KEY'], raw=True)
        items = ds.get([0])
        assert _lib.DTYPES[items[0].dtype] == 'uint8'
        data = ctypes.string_at(items[0].data, items[0].nbytes)
        assert data[128:132] == b'DICM'
        ds.release(items)
        ds.close()
    finally:
        client.close()
