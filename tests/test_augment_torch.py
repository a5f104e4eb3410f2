"""Augmentation on the model's device (torch) against the numpy reference, for the same plans."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from cleftchunk import CleftchunkError
from cleftchunk.labels import CREMI_BACKGROUND, CREMI_INVALID
from cleftchunk.train.augment import AugmentConfig, Augmenter, draw_elastic, elastic_field
from cleftchunk.train.augment_torch import TorchAugmenter
from cleftchunk.train.data import CropSampler, CropStream, RejectionConfig, TrainingVolume, make_loader
from cleftchunk.train.device_batches import DevicePrefetcher, SourceSampler, read_box, resolve_augment_on
from test_train import config

OUT = (4, 64, 64)
SQUARE = np.ones((1, 1, 1, 3, 3), dtype=bool)


def cremi_volume(shape=(14, 200, 200), seed=0, dtype=np.uint8):
    """A textured image and CREMI ids with blobs of clefts and a patch of invalid voxels."""
    rng = np.random.default_rng(seed)
    blobs = ndi.gaussian_filter(rng.standard_normal(shape), sigma=(0, 4, 4))
    labels = np.full(shape, CREMI_BACKGROUND, dtype=np.uint64)
    labels[blobs > 0.1] = 7
    labels[:, 20:50, 120:170] = CREMI_INVALID
    image = (ndi.gaussian_filter(rng.standard_normal(shape), 2) * 400 + 128).clip(0, 255).astype(np.uint8)
    if dtype != np.uint8:
        image = image.astype(dtype) / 255
    return TrainingVolume(image, labels)


def both(volume, augment: AugmentConfig, out=OUT):
    rejection = RejectionConfig(keep_p=1.0)  # every first candidate is kept: the same plan on both paths
    reference = CropSampler([volume], out, augment, rejection, cache_mb=0)
    device = SourceSampler([volume], out, augment, rejection, cache_mb=0)
    return reference, device, TorchAugmenter(device.augmenter)


def boundary(mask: np.ndarray) -> np.ndarray:
    """In-plane boundary voxels of a (B, 1, Z, Y, X) mask: where a 3×3 neighbourhood holds both values."""
    return ndi.binary_dilation(mask, SQUARE) & ~ndi.binary_erosion(mask, SQUARE, border_value=1)


def assert_paths_agree(reference, device, augment, seeds, size=4) -> None:
    mismatched = {"label": 0, "mask": 0}
    edges = {"label": 0, "mask": 0}
    for seed in seeds:
        a = reference.batch(seed, 0, size)
        b = augment(device.batch(seed, 0, size))
        assert b["image"].shape == a["image"].shape and b["image"].dtype == torch.float32
        inner = (a["image"] - b["image"])[..., 2:-2, 2:-2].abs()
        assert float(inner.max()) <= 1 / 255, f"seed {seed}: images differ by {float(inner.max()) * 255:.2f}/255"
        assert torch.equal(a["tries"], b["tries"]) and int(a["index"]) == int(b["index"])
        for key in mismatched:
            ma, mb = a[key].numpy() > 0.5, b[key].numpy() > 0.5
            assert set(np.unique(b[key].numpy())) <= {0.0, 1.0}  # labels, never interpolated values
            mismatched[key] += int((ma != mb).sum())
            edges[key] += int(boundary(ma).sum())
    for key in mismatched:
        assert mismatched[key] <= 0.01 * max(edges[key], 1), f"{key}: {mismatched[key]} of {edges[key]} boundary voxels differ"


def test_the_whole_recipe_gives_the_numpy_result_for_the_same_plans():
    reference, device, augment = both(cremi_volume(), AugmentConfig())
    assert_paths_agree(reference, device, augment, seeds=range(8))


PARTS = {
    "rotation": {"rotation_p": 1.0},
    "rescale": {"rescale_p": 1.0},
    "elastic": {"elastic_p": 1.0, "elastic_alpha": 30.0},
    "misalignment": {"misalignment_p": 1.0},
    "missing_sections": {"missing_sections_p": 1.0},
    "smoothing": {"label_smoothing": True, "rotation_p": 1.0},
    "grayscale": {"grayscale_p": 1.0},
    "missing_parts": {"missing_parts_p": 1.0},
    "flips": {"flip_p": 1.0},
}


@pytest.mark.parametrize("name", list(PARTS))
def test_each_augmentation_alone_agrees(name):
    config = AugmentConfig.off()
    for key, value in PARTS[name].items():
        setattr(config, key, value)
    reference, device, augment = both(cremi_volume(seed=1), config)
    assert_paths_agree(reference, device, augment, seeds=range(3))


def test_no_augmentation_is_the_plain_crop_on_both_paths():
    reference, device, augment = both(cremi_volume(), AugmentConfig.off())
    a, b = reference.batch(3, 0, 2), augment(device.batch(3, 0, 2))
    # grid_sample's [-1, 1] grid is not exact at integer positions: neighbours get weights ~1e-7.
    torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=1e-6)
    for key in ("label", "mask"):
        assert torch.equal(a[key], b[key]), key


def test_boxes_beyond_the_volume_are_mirrored_like_the_numpy_path():
    # 6×80×80: the oversized box of a 4×64×64 crop does not fit, so reads reach beyond the edges.
    reference, device, augment = both(cremi_volume(shape=(6, 80, 80), seed=2), AugmentConfig())
    assert_paths_agree(reference, device, augment, seeds=range(4))


def test_the_chunk_cache_gives_the_same_batches():
    volume = cremi_volume(seed=4)
    plain = SourceSampler([volume], OUT, AugmentConfig(), RejectionConfig(keep_p=0.3), cache_mb=0)
    cached = SourceSampler([volume], OUT, AugmentConfig(), RejectionConfig(keep_p=0.3), cache_mb=16)
    for b in range(3):
        x, y = plain.batch(1, b, 2), cached.batch(1, b, 2)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert cached.cache.hits > 0


def test_float_images_cross_scaled_and_agree():
    reference, device, augment = both(cremi_volume(seed=3, dtype=np.float32), AugmentConfig())
    batch = device.batch(0, 0, 2)
    assert batch["image"].dtype == torch.float32 and batch["codes"].dtype == torch.uint8
    assert_paths_agree(reference, device, augment, seeds=range(2), size=2)


def test_the_loader_hands_over_uint8_boxes_and_plans_only():
    _, device, _ = both(cremi_volume(), AugmentConfig())
    batch = device.batch(0, 0, 2)
    _, hs, ws = device.augmenter.source_shape
    assert batch["image"].dtype == torch.uint8 and tuple(batch["image"].shape) == (2, OUT[0], hs, ws)  # kept slices only
    assert all(isinstance(v, torch.Tensor) for v in batch.values())


def test_both_paths_draw_the_same_positions_and_plans():
    reference, device, _ = both(cremi_volume(), AugmentConfig())
    for seed in range(5):
        a = reference.sample(np.random.default_rng(seed))
        b = device.sample(np.random.default_rng(seed))
        assert (a["volume"], a["offset"], a["tries"]) == (b["volume"], b["offset"], b["tries"])


def test_rejection_on_the_device_path_counts_the_unwarped_footprint():
    from cleftchunk.geometry import Roi

    volume = cremi_volume()
    device = SourceSampler([volume], OUT, AugmentConfig(), RejectionConfig(min_voxels=200, keep_p=0.0), cache_mb=0)
    m = device.augmenter.margin_yx
    for seed in range(4):
        sample = device.sample(np.random.default_rng(seed))
        index, box = sample["source"]
        codes = read_box(device.codes[index], Roi.from_shape(volume.shape), box)
        footprint = codes[np.asarray(sample["plan"].z_keep), m : m + OUT[1], m : m + OUT[2]]
        assert np.count_nonzero(footprint == 1) > 200 or sample["tries"] == device.rejection.max_tries


def test_elastic_control_grid_keeps_the_originals_spread_and_bound():
    rng = np.random.default_rng(0)
    original = np.stack([ndi.gaussian_filter(rng.uniform(-1, 1, (256, 256)), 4.0) * 12 for _ in range(16)])
    fields = np.stack([elastic_field(draw_elastic(rng, (256, 256), 4.0, 12.0), (256, 256), 4.0) for _ in range(16)])
    assert abs(fields.std() / original.std() - 1) < 0.15
    assert np.abs(fields).max() <= 12.0 + 1e-4
    corr = lambda f, lag: np.mean(f[..., :-lag] * f[..., lag:]) / np.mean(f * f)  # noqa: E731
    assert abs(corr(fields, 8) - corr(original, 8)) < 0.15


def test_read_box_mirrors_like_reflect_padding():
    from cleftchunk.geometry import Roi

    data = np.arange(5 * 7 * 9).reshape(5, 7, 9)
    box = Roi((-3, -4, 2), (12, 9, 20))
    padded = np.pad(data, ((3, 4), (4, 0), (0, 13)), mode="reflect")
    np.testing.assert_array_equal(read_box(data, Roi.from_shape(data.shape), box), padded[:, :9, 2:22])
    out = np.zeros(box.shape, data.dtype)
    assert read_box(data, Roi.from_shape(data.shape), box, out) is out
    np.testing.assert_array_equal(out, padded[:, :9, 2:22])


def test_prefetcher_yields_the_stream_in_order_augmented():
    _, device, augment = both(cremi_volume(), AugmentConfig())
    stream = CropStream(device, batch_size=2, seed=5)
    prefetched = DevicePrefetcher(iter(make_loader(stream, 0)), augment)
    for b in range(3):
        got = next(prefetched)
        want = augment(device.batch(5, b, 2))
        assert int(got["index"]) == b
        for key in ("image", "label", "mask"):
            assert torch.equal(got[key], want[key])


def test_prefetcher_hands_out_every_batch_of_a_finite_source():
    _, device, augment = both(cremi_volume(), AugmentConfig.off())
    sources = [device.batch(0, b, 1) for b in range(3)]
    assert [int(b["index"]) for b in DevicePrefetcher(iter(sources), augment)] == [0, 1, 2]


def test_augment_on_choices():
    assert resolve_augment_on("auto", torch.device("cpu")) == "cpu"
    assert resolve_augment_on("auto", torch.device("cuda", 0)) == "device"
    assert resolve_augment_on("device", torch.device("cpu")) == "device"
    with pytest.raises(CleftchunkError, match="use auto, cpu or device"):
        resolve_augment_on("gpu", torch.device("cpu"))


def test_torch_augmenter_on_cpu_uses_no_more_than_it_is_given():
    # What the benchmark's device-augment-torch-cpu row runs: a batch of 4 at the default recipe.
    _, device, augment = both(cremi_volume(shape=(12, 300, 300)), AugmentConfig(), out=(8, 128, 128))
    batch = augment(device.batch(0, 0, 4))
    assert batch["image"].shape == (4, 1, 8, 128, 128) and float(batch["image"].min()) >= 0 and float(batch["image"].max()) <= 1
    assert isinstance(Augmenter((8, 128, 128)).margin_yx, int)


# -- training with --augment-on device (on the CPU here) ---------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from cleftchunk.io.volumes import create_volume

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    labels = np.full((8, 96, 96), CREMI_BACKGROUND, dtype=np.uint64)
    labels[2:7, 30:60, 20:80] = 5
    image = rng.integers(120, 200, labels.shape, dtype=np.uint8)
    image[labels != CREMI_BACKGROUND] //= 3
    for name, array in {"raw": image, "clefts": labels}.items():
        v = create_volume(root / f"d.zarr/{name}", array.shape, array.dtype, chunks=(4, 48, 48))
        v.write(v.roi, array)
    return root


def train_config(data, out, **overrides) -> dict:
    """test_train's settings, with the augmentation on the model's device."""
    return config(data, out, **{"augment_on": "device", **overrides})


def test_cli_trains_with_augmentation_on_the_device_and_says_so(data, tmp_path, run_cli):
    from cleftchunk.model import load_checkpoint

    out = tmp_path / "run"
    result = run_cli("train", "-t", data, "-dn", "d.zarr/raw", "-ln", "d.zarr/clefts", "-o", out, "-mi", "4,64,64",
                     "--preset", "small", "-b", "2", "-c", "1", "--iteration-total", "3", "--iteration-save", "3",
                     "--threads", "1", "--log-dir", tmp_path / "runs", "--augment-on", "device")
    assert "augmentation on the model's device (cpu, torch): --augment-on device" in result.output
    assert load_checkpoint(out / "last.pth")["iteration"] == 3
    assert load_checkpoint(out / "last.pth")["config"]["augment_on"] == "device"
    result = run_cli("train", "-t", data, "-dn", "d.zarr/raw", "-ln", "d.zarr/clefts", "-o", tmp_path / "bad",
                     "--augment-on", "gpu", expect=2)
    assert "gpu" in result.output and "device" in result.output


@pytest.mark.slow
def test_resume_with_device_augmentation_is_exact(data, tmp_path):
    from cleftchunk.model import load_checkpoint
    from cleftchunk.train import train

    whole = train(train_config(data, tmp_path / "whole"))
    train(train_config(data, tmp_path / "part", iteration_total=2))
    resumed = train(train_config(data, tmp_path / "part"), resume=True)
    a, b = load_checkpoint(whole)["model"], load_checkpoint(resumed)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_train_with_device_augmentation(data, tmp_path):
    from cleftchunk.model import load_checkpoint
    from cleftchunk.train import train

    last = train(train_config(data, tmp_path / "ddp", cpu_processes=2, iteration_total=2))
    assert load_checkpoint(last)["iteration"] == 2
