"""dmcache.Loader's split= and filter=, against the real daemon and the emulator: a split
the project defines (the emulator's GET /projects/{id}/splits, resources tagged
split:<name>) and a filter on labels or any metadata become an indices= subset, read in
the same deterministic, rank-sharded, seedable order; errors say what is missing."""
import json
import os

import numpy as np
import pytest
import torch

import dmcache
from conftest import ARENA, KEY, make_dicom_folder, reference


@pytest.fixture(scope='module')
def ct_splits(daemon, emu):
    """Tags ct's resources split:train / split:val (every 4th, by the project's listing
    order) / none (every 9th) at the emulator; returns ({split: resource ids}, {index:
    resource id}, {index: pydicom int32 array}) of the new version, read independently."""
    root = os.path.join(emu.corpus, 'projects', 'ct')
    with open(os.path.join(root, 'project.json')) as f:
        resources = json.load(f)['resources']
    splits = {'train': set(), 'val': set()}
    for j, r in enumerate(resources):
        name = None if j % 9 == 0 else 'val' if j % 4 == 0 else 'train'
        tags = ['split:' + name] if name else ['unsplit']
        resp = emu.request('PUT', '/resources/%s/tags' % r['id'], key=KEY,
                           json_body={'tags': tags})
        assert resp.status == 200, resp.body
        if name:
            splits[name].add(r['id'])
    by_file = {r['id']: r['file'] for r in resources}
    plain = dmcache.Loader('ct', batch_size=8, collate='list', arena_bytes=ARENA)
    ids, ref = {}, {}
    for b in plain:
        for m, i in zip(b.meta, b.indices):
            ids[i] = m['resource']['id']
            ref[i] = reference(os.path.join(root, by_file[ids[i]]))[0].astype(np.int32)
    plain.close()
    assert len(ids) == 72
    return splits, ids, ref


def test_split_reads_the_splits_items_sharded_and_seeded(daemon, emu, ct_splits):
    splits, ids, ref = ct_splits
    for name in ('train', 'val'):
        want = sorted(i for i, rid in ids.items() if rid in splits[name])
        assert 0 < len(want) < 72
        for epoch in (0, 3):
            seen = []
            for rank in range(2):
                loader = dmcache.Loader('ct', batch_size=4, shuffle=True, seed=11,
                                        dtype='int32', split=name, rank=rank, world_size=2,
                                        arena_bytes=ARENA)
                loader.set_epoch(epoch)
                order = [want[p] for p in dmcache.rank_indices(len(want), epoch, 11, True,
                                                                rank, 2)]
                assert loader.indices() == order
                got = []
                for b in loader:
                    assert torch.equal(b.images, torch.from_numpy(
                        np.stack([ref[i] for i in b.indices])))
                    assert all(m['resource']['id'] in splits[name] for m in b.meta)
                    got += b.indices
                assert got == order
                seen += got
                loader.close()
            # every item of the split, once (one repeated to make the ranks equal)
            assert set(seen) == set(want) and len(seen) - len(want) in (0, 1)
    # the same seed and epoch: the same order; another seed: another
    a = dmcache.Loader('ct', shuffle=True, seed=1, split='train', metadata=False)
    b = dmcache.Loader('ct', shuffle=True, seed=1, split='train', metadata=False)
    c = dmcache.Loader('ct', shuffle=True, seed=2, split='train', metadata=False)
    assert a.indices() == b.indices() != c.indices()
    for x in (a, b, c):
        x.close()


def test_split_with_indices_filter_and_errors(daemon, emu, ct_splits):
    splits, ids, _ = ct_splits
    # indices= and split=: the given items that are in the split, in the given order
    given = [70, 1, 2, 3, 40, 41, 5, 8, 9, 10]
    loader = dmcache.Loader('ct', split='train', indices=given, metadata=False)
    assert loader._subset == [i for i in given if ids[i] in splits['train']]
    assert loader.indices() == loader._subset
    loader.close()
    # filter= with any callable on the metadata; with split= both must hold
    third = {rid for i, rid in ids.items() if i % 3 == 0}
    loader = dmcache.Loader('ct', batch_size=5, collate='list', split='val',
                            filter=lambda m: m['resource']['id'] in third)
    got = [i for b in loader for i in b.indices]
    want = sorted(i for i, rid in ids.items() if rid in splits['val'] and i % 3 == 0)
    assert want and got == want
    loader.close()
    # a split the project does not have: nothing kept, said so
    with pytest.raises(ValueError) as e:
        dmcache.Loader('ct', split='no-such-split')
    assert "split='no-such-split'" in str(e.value) and '72 items' in str(e.value)
    with pytest.raises(ValueError) as e:
        dmcache.Loader('ct', split='train', weights=[1.0] * 72)
    assert 'weights=' in str(e.value)
    # the splits come from the server: not offline
    with pytest.raises(ValueError) as e:
        dmcache.Loader('ct', split='train', offline=True)
    assert 'offline' in str(e.value)
    with pytest.raises(TypeError):
        dmcache.Loader('ct', filter=42)
    assert dmcache.Client(daemon.socket).status()['counters']['serve_arena_used_bytes'] == 0


def test_filter_on_label_names(daemon, tmpdir_short):
    facts = make_dicom_folder(tmpdir_short, 'xr', 10)
    fracture = {f['id'] for f in facts.values() if f['fracture']}
    folder = os.path.join(tmpdir_short, 'xr')
    for spec in ('fracture', {'fracture'}, ['fracture', 'no-such-label']):
        seen = []
        for rank in range(2):
            loader = dmcache.Loader(folder, batch_size=2, shuffle=True, seed=3,
                                    filter=spec, rank=rank, world_size=2)
            for b in loader:
                assert all('fracture' in m['labels'] for m in b.meta)
                seen += [m['resource']['id'] for m in b.meta]
            loader.close()
        # the 5 items with the label, one repeated to make the ranks equal (6)
        assert set(seen) == fracture and len(seen) == 6
    both = dmcache.Loader(folder, filter={'fracture', 'normal'}, metadata=False)
    assert both.indices() == list(range(10))
    both.close()
    with pytest.raises(ValueError) as e:
        dmcache.Loader(folder, split='train')
    assert 'local dataset folder has no splits' in str(e.value)
