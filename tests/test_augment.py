"""Augmentations: image and labels stay aligned under every transform; each one does something."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from cleftchunk.train.augment import AugmentConfig, Augmenter, Plan, apply_flips, smooth_labels
from cleftchunk.train.data import CropSampler, RejectionConfig, TrainingVolume

OUT = (4, 64, 64)
LOW, HIGH = 20, 220  # image grey values off / on the drawn pattern


def pattern_volume(shape=(12, 160, 160), seed=0):
    """Blobs that differ from slice to slice, drawn identically in the image and the labels."""
    rng = np.random.default_rng(seed)
    noise = ndi.gaussian_filter(rng.standard_normal(shape), sigma=(0, 4, 4))
    noise /= noise.std(axis=(1, 2), keepdims=True)
    labels = (noise > 0.3).astype(np.uint8)
    image = np.where(labels > 0, HIGH, LOW).astype(np.uint8)
    return image, labels


def sampler_with(volume_shape=(12, 160, 160), **augment) -> CropSampler:
    image, labels = pattern_volume(volume_shape)
    config = AugmentConfig.off()
    for key, value in augment.items():
        setattr(config, key, value)
    return CropSampler([TrainingVolume(image, labels)], OUT, config, RejectionConfig(keep_p=1.0))


def assert_aligned(sample: dict) -> None:
    """Thresholded image == label except on a thin rim where bilinear and nearest differ."""
    image_on = sample["image"] > (LOW + HIGH) / 2 / 255
    label_on = sample["label"] > 0.5
    assert label_on.sum() > 0.05 * label_on.size and (~label_on).sum() > 0.05 * label_on.size
    mismatch = np.mean(image_on != label_on)
    assert mismatch < 0.02, f"image and label disagree on {mismatch:.1%} of the voxels"


def plain_crop(sampler: CropSampler, sample: dict) -> tuple[np.ndarray, np.ndarray]:
    volume = sampler.volumes[sample["volume"]]
    sl = tuple(slice(o, o + s) for o, s in zip(sample["offset"], OUT))
    return volume.image[sl] / 255, volume.labels[sl].astype(np.float32)


def test_no_augmentation_gives_the_plain_crop_exactly():
    sampler = sampler_with()
    for seed in range(3):
        sample = sampler.sample(np.random.default_rng(seed))
        image, label = plain_crop(sampler, sample)
        np.testing.assert_allclose(sample["image"], image.astype(np.float32), rtol=0, atol=1e-7)
        np.testing.assert_array_equal(sample["label"], label)
        assert sample["image"].shape == OUT and sample["image"].dtype == np.float32


GEOMETRIC = {
    "rotation": {"rotation_p": 1.0},
    "rescale": {"rescale_p": 1.0},
    "elastic": {"elastic_p": 1.0, "elastic_alpha": 30.0},  # stronger than the default so it shows
    "flip": {"flip_p": 1.0},
    "misalignment": {"misalignment_p": 1.0},
    "missing_sections": {"missing_sections_p": 1.0},
    "all_geometric": {
        "rotation_p": 1.0, "rescale_p": 1.0, "elastic_p": 1.0, "flip_p": 1.0,
        "misalignment_p": 1.0, "missing_sections_p": 1.0,
    },
}


@pytest.mark.parametrize("name", list(GEOMETRIC))
def test_geometric_augmentations_keep_image_and_label_aligned(name):
    sampler = sampler_with(**GEOMETRIC[name])
    changed = 0
    for seed in range(6):
        sample = sampler.sample(np.random.default_rng(seed))
        assert_aligned(sample)
        _, label = plain_crop(sampler, sample)
        changed += not np.array_equal(sample["label"], label)
    assert changed >= 3, f"{name} left the labels unchanged in {6 - changed} of 6 samples"


def test_alignment_holds_where_the_source_box_is_cut_by_the_volume_edge():
    # 4×64×64 crops from a 6×72×72 volume: rotation and misalignment read beyond the edges (mirrored).
    sampler = sampler_with(volume_shape=(6, 72, 72), rotation_p=1.0, misalignment_p=1.0, rescale_p=1.0)
    for seed in range(4):
        assert_aligned(sampler.sample(np.random.default_rng(seed)))


@pytest.mark.parametrize("name, settings", [("grayscale", {"grayscale_p": 1.0}), ("missing_parts", {"missing_parts_p": 1.0})])
def test_photometric_augmentations_change_the_image_only(name, settings):
    sampler = sampler_with(**settings)
    for seed in range(4):
        sample = sampler.sample(np.random.default_rng(seed))
        image, label = plain_crop(sampler, sample)
        np.testing.assert_array_equal(sample["label"], label)
        assert not np.allclose(sample["image"], image), f"{name} left the image unchanged"
        assert 0.0 <= sample["image"].min() and sample["image"].max() <= 1.0


def test_missing_part_is_a_band_filled_with_the_slice_mean():
    sampler = sampler_with(missing_parts_p=1.0)
    sample = sampler.sample(np.random.default_rng(5))
    image, _ = plain_crop(sampler, sample)
    changed = np.argwhere(~np.isclose(sample["image"], image))
    assert len(np.unique(changed[:, 0])) == 1  # one slice
    k = changed[0, 0]
    values = np.unique(np.round(sample["image"][k][~np.isclose(sample["image"][k], image[k])], 5))
    assert len(values) == 1 and np.isclose(values[0], image[k].mean(), atol=1e-5)


def test_missing_sections_drop_interior_source_slices_from_image_and_labels_alike():
    aug = Augmenter(OUT, AugmentConfig(**{**AugmentConfig.off().__dict__, "missing_sections_p": 1.0}))
    assert aug.source_shape == (OUT[0] + 2, *OUT[1:])
    plan = aug.draw(np.random.default_rng(3))
    assert len(plan.missing_sections) == 2 and all(0 < s < OUT[0] + 1 for s in plan.missing_sections)
    depth = OUT[0] + 2
    image = np.broadcast_to(np.arange(depth, dtype=np.uint8)[:, None, None] * 10, (depth, *OUT[1:])).copy()
    out = aug.resample(image, aug_roi(image), (1, 0, 0), plan, order=1)
    # The crop starts at z=1 and its source stack one slice earlier, at 0: slice values name the source.
    np.testing.assert_array_equal(out[:, 0, 0] / 10, plan.z_keep)
    labels = image.copy()
    np.testing.assert_array_equal(aug.resample(labels, aug_roi(labels), (1, 0, 0), plan, order=0), out)


def aug_roi(array):
    from cleftchunk.geometry import Roi

    return Roi.from_shape(array.shape)


def test_flips_and_transpose_apply_to_every_array_alike():
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    out_a, out_b = apply_flips([a, a * 2], (True, True, False, True))
    np.testing.assert_array_equal(out_a, a[::-1, ::-1].transpose(0, 2, 1))
    np.testing.assert_array_equal(out_b, 2 * out_a)


def test_label_smoothing_removes_thin_structures_and_keeps_large_ones():
    label = np.zeros((1, 64, 64), dtype=bool)
    label[0, 10:30, 10:30] = True  # a 20 px square
    label[0, 45, 5:60] = True  # a 1 px line
    label[0, 50:52, 5:60] = True  # a 2 px band
    out = smooth_labels(label)
    assert out[0, 12:28, 12:28].all()
    assert not out[0, 40:60].any()
    assert out[0, :35, :35].sum() >= 0.9 * 400


def test_plans_are_reproducible_and_differ_between_seeds():
    aug = Augmenter((8, 256, 256))
    a, b = aug.draw(np.random.default_rng(1)), aug.draw(np.random.default_rng(1))
    c = aug.draw(np.random.default_rng(2))
    assert a.angle == b.angle and np.array_equal(a.z_keep, b.z_keep) and a.flips == b.flips
    assert (a.angle, a.flips) != (c.angle, c.flips)


def test_default_source_box_is_about_the_originals():
    # The original reads about 10×497×497 for an 8×256×256 input; ours is a safe bound on the warps.
    z, y, x = Augmenter((8, 256, 256)).source_shape
    assert z == 10 and 480 <= y <= 520 and y == x


def test_config_rejects_bad_values():
    from cleftchunk import CleftchunkError

    with pytest.raises(CleftchunkError, match="must lie in"):
        AugmentConfig.from_dict({"rotation_p": 1.5})
    with pytest.raises(CleftchunkError, match="unknown augmentation"):
        AugmentConfig.from_dict({"rotate": 1})


def test_plan_without_warps_uses_integer_shifts_only():
    plan = Plan(z_keep=np.arange(2), shifts=np.array([[0, 0], [3, -2]]))
    assert not plan.warps_in_plane
    aug = Augmenter((2, 32, 32), AugmentConfig.off())
    source = np.random.default_rng(0).integers(0, 255, (2, 64, 64)).astype(np.uint8)
    out = aug.resample(source, aug_roi(source), (0, 10, 10), plan, order=1)
    np.testing.assert_array_equal(out[0], source[0, 10:42, 10:42])
    np.testing.assert_array_equal(out[1], source[1, 13:45, 8:40])


def test_plans_never_read_beyond_the_oversized_box():
    from cleftchunk.geometry import Roi

    aug = Augmenter((8, 256, 256))
    before, after = aug.source_context()
    box = Roi((0, 0, 0), (8, 256, 256)).grow(before, after)
    for seed in range(25):
        plan = aug.draw(np.random.default_rng(seed))
        assert box.contains(aug.source_roi((0, 0, 0), plan, aug.base_coordinates(plan)))


def test_label_smoothing_on_bounding_boxes_equals_the_whole_slice_definition():
    def whole_slice(label):
        out = np.zeros_like(label)
        square = np.ones((3, 3), bool)
        for k, section in enumerate(label):
            grown = ndi.binary_dilation(section, structure=square).astype(np.float32)
            out[k] = ndi.grey_dilation(ndi.gaussian_filter(grown, 2.0), footprint=square) > 0.8
        return out

    rng = np.random.default_rng(0)
    for _ in range(60):
        label = np.zeros((3, 80, 80), bool)
        for _ in range(rng.integers(0, 4)):
            y, x = rng.integers(-10, 80, 2)
            h, w = rng.integers(1, 30, 2)
            label[rng.integers(0, 3), max(y, 0) : y + h, max(x, 0) : x + w] = True
        np.testing.assert_array_equal(smooth_labels(label), whole_slice(label))


def test_constant_boxes_skip_the_warp_but_give_the_same_result():
    aug = Augmenter(OUT, AugmentConfig(rotation_p=1.0, elastic_p=1.0))
    plan = aug.draw(np.random.default_rng(0))
    source = np.full((8, 200, 200), 7, np.uint8)
    out = aug.resample(source, aug_roi(source), (2, 60, 60), plan, order=1)
    assert out.dtype == np.float32 and np.all(out == 7)
    codes = aug.resample(np.zeros_like(source), aug_roi(source), (2, 60, 60), plan, order=0)
    assert codes.dtype == np.uint8 and not codes.any()
