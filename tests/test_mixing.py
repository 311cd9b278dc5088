"""Batch mixing (mixup / CutMix) for KD runs: box area vs lam, exact CutMix labels, identities, 2D and 3D."""

from __future__ import annotations

import pytest
import torch

from medkd.data import BatchMixing, mixed_task_loss
from medkd.data.mixing import box_share, cutmix_box, mixup_images, paste_box

SPATIAL = {2: (12, 10), 3: (8, 6, 10)}


def batch(dims: int, b: int = 4):
    """Images whose every voxel value names its sample (distinct per sample), and random label maps."""
    spatial = SPATIAL[dims]
    image = torch.arange(b, dtype=torch.float32).view(b, 1, *[1] * dims).expand(b, 2, *spatial).clone() * 10 + 1
    label = torch.randint(0, 3, (b, 1, *spatial), generator=torch.Generator().manual_seed(dims))
    return image, label


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_cutmix_box_area_matches_lam_and_label_is_exact(dims, seed):
    image, label = batch(dims)
    mixed = BatchMixing("cutmix", alpha=1.0, seed=seed)(image, label)
    assert mixed.mixed and mixed.label_b is None and mixed.box is not None
    index = mixed.index
    from_other = mixed.image == image[index]  # voxels taken from the paired sample (their values differ)
    kept = mixed.image == image
    for b in range(image.shape[0]):
        if index[b] == b:
            continue
        # the kept share is lam: count voxels, not the box formula
        assert float(kept[b].float().mean()) == pytest.approx(mixed.lam, abs=1e-6)
        assert float(from_other[b].float().mean()) == pytest.approx(1 - mixed.lam, abs=1e-6)
    # the label map is exact: pasted exactly where the image was pasted
    region = from_other[:, :1] & ~kept[:, :1]
    torch.testing.assert_close(mixed.label[region], label[index][region])
    torch.testing.assert_close(mixed.label[~region], label[~region])


@pytest.mark.parametrize("dims", [2, 3])
def test_cutmix_box_follows_lam(dims):
    spatial = SPATIAL[dims]
    g = torch.Generator().manual_seed(0)
    assert box_share(cutmix_box(spatial, 1.0, g), spatial) == 0.0
    # lam 0: image-sized sides, clipped at the border: at least half of every axis
    assert all(box_share(cutmix_box(spatial, 0.0, g), spatial) >= 0.5**dims - 1e-9 for _ in range(20))
    # lam 0.75: sides of 0.25 ** (1 / dims) of the image; unclipped (the largest of many draws) the share is 1 - lam
    shares = [box_share(cutmix_box(spatial, 0.75, g), spatial) for _ in range(400)]
    assert max(shares) == pytest.approx(0.25, abs=0.03) and min(shares) < 0.25
    with pytest.raises(ValueError, match="lam must be in"):
        cutmix_box(spatial, 1.5)


@pytest.mark.parametrize("dims", [2, 3])
def test_mixup_mixes_images_and_keeps_both_labels(dims):
    image, label = batch(dims)
    mixed = BatchMixing("mixup", alpha=0.4, seed=3)(image, label)
    lam, index = mixed.lam, mixed.index
    assert 0.0 < lam < 1.0 and mixed.box is None
    expected = [lam * float(image[b, 0].flatten()[0]) + (1 - lam) * float(image[int(index[b]), 0].flatten()[0])
                for b in range(image.shape[0])]
    assert [float(mixed.image[b, 0].flatten()[0]) for b in range(image.shape[0])] == pytest.approx(expected, rel=1e-6)
    assert torch.equal(mixed.label, label) and torch.equal(mixed.label_b, label[index])


@pytest.mark.parametrize("dims", [2, 3])
def test_identities(dims):
    image, label = batch(dims)
    index = torch.tensor([2, 0, 3, 1])
    assert torch.equal(mixup_images(image, index, 1.0), image)
    assert torch.equal(mixup_images(image, index, 0.0), image[index])
    empty = tuple(slice(0, 0) for _ in SPATIAL[dims])
    assert torch.equal(paste_box(image, index, empty), image)
    whole = tuple(slice(0, s) for s in SPATIAL[dims])
    assert torch.equal(paste_box(label, index, whole), label[index])
    for mode in ("mixup", "cutmix"):  # prob 0: the batch passes through unchanged
        out = BatchMixing(mode, prob=0.0)(image, label)
        assert out.image is image and out.label is label and out.label_b is None and out.lam == 1.0 and not out.mixed


def test_same_seed_same_batches_and_state_resumes():
    image, label = batch(2, b=6)
    a, b = BatchMixing("cutmix", prob=0.7, seed=5), BatchMixing("cutmix", prob=0.7, seed=5)
    for _ in range(5):
        ma, mb = a(image, label), b(image, label)
        assert torch.equal(ma.image, mb.image) and ma.lam == mb.lam and torch.equal(ma.index, mb.index)
    state = a.state_dict()
    nxt = a(image, label)
    c = BatchMixing("cutmix", prob=0.7, seed=99)
    c.load_state_dict(state)
    again = c(image, label)
    assert torch.equal(nxt.image, again.image) and nxt.lam == again.lam
    other_seeds = [BatchMixing("cutmix", seed=seed)(image, label).image for seed in (6, 7)]
    assert not torch.equal(*other_seeds)


def test_labelled_mask_and_second_view():
    image, label = batch(2)
    labelled = torch.tensor([True, False, True, True])
    mixed = BatchMixing("mixup", seed=1)(image, label, labelled)
    assert torch.equal(mixed.labelled, labelled & labelled[mixed.index])
    view2 = image * 2
    torch.testing.assert_close(mixed.apply(view2), mixed.image * 2)
    cut = BatchMixing("cutmix", seed=1)(image, label)
    torch.testing.assert_close(cut.apply(view2), cut.image * 2)


def test_mixed_task_loss():
    pred = torch.randn(2, 3, 4, 4)
    label, label_b = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    calls = []

    def loss(p, y):
        calls.append(float(y.mean()))
        return (p.mean() - y.mean()) ** 2

    lam = 0.3
    value = mixed_task_loss(loss, pred, label, label_b, lam)
    assert float(value) == pytest.approx(lam * float(loss(pred, label)) + (1 - lam) * float(loss(pred, label_b)))
    assert float(mixed_task_loss(loss, pred, label, None, lam)) == pytest.approx(float(loss(pred, label)))
    assert float(mixed_task_loss(loss, pred, label, label_b, 1.0)) == pytest.approx(float(loss(pred, label)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        BatchMixing("mosaic")
    with pytest.raises(ValueError, match="alpha must be positive"):
        BatchMixing(alpha=0)
    with pytest.raises(ValueError, match="prob must be in"):
        BatchMixing(prob=2)
    with pytest.raises(ValueError, match="does not match the images"):
        BatchMixing()(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5))
