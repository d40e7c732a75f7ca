"""Device-resident two-view loader: determinism, rank-disjoint shards, mid-epoch resume."""

import pytest
import torch

from vssl_fast.data.augment import view_specs
from vssl_fast.data.loader import DeviceTwoViewLoader


def _data(n=96):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g), torch.arange(n)


def _loader(rank=0, world=1, seed=3, bs=8, chunk=1):
    x, y = _data()
    return DeviceTwoViewLoader(x, y, bs, view_specs("cifar10", crop_size=16), seed, rank, world, chunk=chunk)


def test_same_seed_same_batches_other_seed_other_batches():
    a = [b for b in _loader()]
    b = [b for b in _loader()]
    c = [b for b in _loader(seed=4)]
    assert len(a) == 96 // 8
    for (a1, a2, ay), (b1, b2, by) in zip(a, b):
        assert torch.equal(a1, b1) and torch.equal(a2, b2) and torch.equal(ay, by)
    assert not torch.equal(a[0][2], c[0][2])
    assert not torch.equal(a[0][0], a[0][1])  # the two views differ


def test_ranks_read_disjoint_shards_with_different_augmentations():
    r0, r1 = _loader(0, 2), _loader(1, 2)
    assert len(r0) == len(r1) == 96 // 16
    seen0 = torch.cat([y for _, _, y in r0])
    seen1 = torch.cat([y for _, _, y in r1])
    assert not set(seen0.tolist()) & set(seen1.tolist())
    assert len(set(seen0.tolist()) | set(seen1.tolist())) == 96
    # the same image on two ranks would still get a different stream: augmentation seeds depend on the rank
    assert not torch.equal(r0.batch(0, 0)[0], r1.batch(0, 0)[0])


def test_mid_epoch_resume_gives_the_same_next_batches():
    full = _loader()
    it = iter(full)
    for _ in range(5):
        next(it)
    state = full.state_dict()
    rest = list(it) + [b for b in full][:3]  # finish epoch 0, then three batches of epoch 1
    resumed = _loader()
    resumed.load_state_dict(state)
    again = list(resumed) + [b for b in resumed][:3]
    assert len(rest) == len(again) == (12 - 5) + 3
    for a, b in zip(rest, again):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    # epochs reshuffle
    e0 = torch.cat([y for _, _, y in _loader()])
    ld = _loader()
    list(ld)
    e1 = torch.cat([y for _, _, y in ld])
    assert not torch.equal(e0, e1) and sorted(e0.tolist()) == sorted(e1.tolist())


def test_bad_shapes_are_rejected():
    import pytest

    x, y = _data()
    with pytest.raises(ValueError, match=r"images must be uint8 \[N, 3, H, W\]"):
        DeviceTwoViewLoader(x.float(), y, 8, view_specs("cifar10"), 0)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        DeviceTwoViewLoader(x[:4], y[:4], 8, view_specs("cifar10"), 0)


def test_chunked_augmentation_epochs_resume_mid_chunk_and_chunk_one_is_per_step():
    """chunk=K augments K steps in one call: exact epochs (a partial last chunk), the same labels in
    the same order as chunk=1, batches a pure function of (epoch, step), a resume in the middle of a
    chunk regenerates it; chunk=1 is the per-step stream, batch for batch."""
    one = [b for b in _loader()]
    x, y = _data()
    g_first = DeviceTwoViewLoader(x, y, 8, view_specs("cifar10", crop_size=16), 3).batch(0, 0)
    assert all(torch.equal(u, v) for u, v in zip(one[0], g_first))
    chunked = _loader(chunk=5)  # 12 steps per epoch: chunks of 5, 5, 2
    ep0 = [b for b in chunked]
    ep1 = [b for b in chunked]
    assert len(ep0) == len(ep1) == 12 and all(b[0].shape == (8, 3, 16, 16) for b in ep0 + ep1)
    assert all(torch.equal(a[2], b[2]) for a, b in zip(one, ep0))  # order does not depend on the chunk
    assert not torch.equal(ep0[0][0], ep0[1][0]) and not torch.equal(ep0[5][0], ep0[6][0])
    resumed = _loader(chunk=5)
    resumed.load_state_dict({"epoch": 0, "step": 7, "seed": 3, "world": 1, "chunk": 5})  # mid-chunk
    again = list(resumed) + list(resumed)
    for a, b in zip(ep0[7:] + ep1, again):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    cl = DeviceTwoViewLoader(x, y, 8, view_specs("cifar10", crop_size=16), 3, channels_last=True, chunk=4)
    v1, v2, _ = cl.batch(0, 2)
    assert v1.is_contiguous(memory_format=torch.channels_last) and v2.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="data.aug_chunk=5, resuming with 1"):
        _loader().load_state_dict(chunked.state_dict())
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        _loader(chunk=0)
