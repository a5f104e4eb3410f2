"""Crop sampling: label rules, lazy reads, volume weighting, rejection rate, reproducible streams."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cleftchunk import CleftchunkError
from cleftchunk.train.augment import AugmentConfig
from cleftchunk.train.data import (
    CACHE_CHUNKS,
    CropSampler,
    CropStream,
    RejectionConfig,
    TrainingVolume,
    label_codes,
    make_loader,
    open_training_volumes,
    resolve_label_mode,
    split_list,
)
from cleftchunk.labels import CREMI_BACKGROUND, CREMI_INVALID
from cleftchunk.io.volumes import create_volume

BG, INVALID = int(CREMI_BACKGROUND), int(CREMI_INVALID)
OUT = (2, 32, 32)


def test_cremi_labels_clefts_background_and_invalid():
    raw = np.array([BG, 0, 5, INVALID, BG], dtype=np.uint64)
    codes = label_codes(raw, "cremi")
    np.testing.assert_array_equal(codes & 1, [0, 1, 1, 0, 0])  # id 0 is a cleft in CREMI files
    np.testing.assert_array_equal(codes & 2, [0, 0, 0, 2, 0])


def test_nonzero_labels_and_the_auto_rule():
    np.testing.assert_array_equal(label_codes(np.array([0, 1, 7], np.uint8), "nonzero"), [0, 1, 1])
    cremi = np.full((8, 64, 64), BG, np.uint64)
    cremi[2:4, 10:20, 10:20] = 0  # id 0 is a valid cleft id in CREMI files
    zero_background = np.zeros((8, 64, 64), np.uint64)
    zero_background[2:4, 10:20, 10:20] = 7
    assert resolve_label_mode("auto", cremi) == "cremi"
    assert resolve_label_mode("auto", zero_background) == "nonzero"
    assert resolve_label_mode("auto", np.zeros((8, 64, 64), np.uint8)) == "nonzero"
    assert resolve_label_mode("auto", np.zeros((8, 64, 64), np.uint32)) == "nonzero"
    assert resolve_label_mode("cremi", zero_background) == "cremi"  # an explicit mode wins
    with pytest.raises(CleftchunkError, match="unknown label mode"):
        resolve_label_mode("main", zero_background)


def test_uint64_labels_in_a_dataset_named_main_are_zero_background(tmp_path):
    import h5py

    from cleftchunk.io.volumes import open_volume

    with h5py.File(tmp_path / "syn.h5", "w") as f:
        f["main"] = np.full((4, 32, 32), BG, np.uint64)  # even if it happens to hold 0xFF..FF
    assert resolve_label_mode("auto", open_volume(f"{tmp_path}/syn.h5:main")) == "nonzero"


def test_split_list_takes_the_tutorials_at_lists():
    assert split_list("a.h5@b/c.h5") == ["a.h5", "b/c.h5"]
    assert split_list(["x"]) == ["x"]


def test_invalid_voxels_are_masked_out():
    labels = np.full((4, 64, 64), BG, dtype=np.uint64)
    labels[:, :, :32] = INVALID
    labels[:, 40:50, 40:50] = 9
    image = np.zeros((4, 64, 64), np.uint8)
    sampler = CropSampler([TrainingVolume(image, labels)], (2, 64, 64), AugmentConfig.off(), RejectionConfig(keep_p=1))
    sample = sampler.sample(np.random.default_rng(0))
    np.testing.assert_array_equal(sample["mask"][:, :, :32], 0)
    np.testing.assert_array_equal(sample["mask"][:, :, 32:], 1)
    assert sample["label"][:, 40:50, 40:50].all() and sample["label"].sum() == 2 * 100


class RecordingArray:
    """An array that records every region read from it."""

    def __init__(self, data):
        self.data = data
        self.shape = data.shape
        self.dtype = data.dtype
        self.reads = []

    def __getitem__(self, key):
        self.reads.append(tuple((s.stop - s.start) for s in key))
        return self.data[key]


@pytest.mark.parametrize("cache_mb", [0, 64])
def test_reads_are_lazy_boxes_never_whole_volumes(cache_mb):
    shape = (64, 2000, 2000)  # broadcast views: no memory behind them
    image = RecordingArray(np.broadcast_to(np.uint8(0), shape))
    labels = RecordingArray(np.broadcast_to(np.uint8(1), shape))
    sampler = CropSampler([TrainingVolume(image, labels)], (8, 256, 256), cache_mb=cache_mb)
    # without a cache: the box the sample needs; with one: whole chunks (16×256×256 for unchunked data)
    bound = sampler.augmenter.source_shape if cache_mb == 0 else CACHE_CHUNKS
    for seed in range(3):
        sampler.sample(np.random.default_rng(seed))
    assert image.reads and labels.reads
    for read in image.reads + labels.reads:
        assert all(r <= b for r, b in zip(read, bound)), f"read {read} exceeds {bound}"
    assert sum(np.prod(r) for r in image.reads) < np.prod(shape) / 5


def test_the_chunk_cache_gives_the_same_crops_within_its_budget(tmp_path):
    raw, clefts = zarr_pair(tmp_path)
    volumes = open_training_volumes([raw], [clefts])
    cached = CropSampler(volumes, OUT, AugmentConfig(), RejectionConfig(), cache_mb=0.05)
    plain = CropSampler(volumes, OUT, AugmentConfig(), RejectionConfig(), cache_mb=0)
    for seed in range(6):
        a, b = cached.sample(np.random.default_rng(seed)), plain.sample(np.random.default_rng(seed))
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(a[key], b[key])
    assert cached.cache.hits > 0 and cached.cache.bytes <= 0.05 * 2**20
    assert cached.reopen().cache.bytes == 0  # a worker starts with an empty cache


def test_a_cached_view_reads_boxes_across_chunks_as_the_source_does():
    from cleftchunk.train.chunk_cache import ChunkCache, ChunkedView

    source = np.arange(6 * 70 * 50, dtype=np.uint16).reshape(6, 70, 50)
    view = ChunkedView(source, ChunkCache(2**20), "ids", convert=lambda a: (a % 7).astype(np.uint8))
    view.grid = type(view.grid)(view.grid.roi, (4, 32, 16))  # several chunks along every axis
    expected = (source % 7).astype(np.uint8)
    for begin, end in (((0, 0, 0), (6, 70, 50)), ((3, 31, 15), (5, 33, 49)), ((2, 40, 17), (3, 41, 18))):
        key = tuple(slice(b, e) for b, e in zip(begin, end))
        got = view[key]
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, expected[key])
        out = np.full([e - b for b, e in zip(begin, end)], 255, np.uint8)
        np.testing.assert_array_equal(view.read_into(begin, end, out), expected[key])


def test_volumes_are_chosen_in_proportion_to_their_valid_positions():
    small = TrainingVolume(np.zeros((2, 40, 40), np.uint8), np.zeros((2, 40, 40), np.uint8))
    big = TrainingVolume(np.zeros((2, 56, 40), np.uint8), np.zeros((2, 56, 40), np.uint8))
    sampler = CropSampler([small, big], OUT, AugmentConfig.off())
    # positions: 1 * 9 * 9 = 81 and 1 * 25 * 9 = 225
    np.testing.assert_allclose(sampler.weights, [81 / 306, 225 / 306])
    rng = np.random.default_rng(0)
    picks = np.array([sampler.draw_position(rng)[0] for _ in range(3000)])
    assert abs(picks.mean() - 225 / 306) < 0.03
    offsets = np.array([o for i, o in (sampler.draw_position(rng) for _ in range(3000)) if i == 1])
    assert offsets[:, 1].min() == 0 and offsets[:, 1].max() == 24  # the big volume's whole range, uniformly
    assert abs(offsets[:, 1].mean() - 12) < 1


def test_held_out_regions_are_never_touched_by_training_crops():
    from cleftchunk.geometry import Roi

    volume = TrainingVolume(np.zeros((4, 320, 64), np.uint8), np.zeros((4, 320, 64), np.uint8))
    held = Roi((0, 200, 0), (4, 120, 64))
    sampler = CropSampler([volume], OUT, AugmentConfig(), holdout=[held])
    before, after = sampler.augmenter.source_context()
    rng = np.random.default_rng(0)
    for _ in range(200):
        _, offset = sampler.draw_position(rng)
        assert Roi(offset, OUT).grow(before, after).intersect(held).empty
    everything = CropSampler([volume], OUT, AugmentConfig(), holdout=[Roi((0, 0, 0), (4, 320, 64))])
    with pytest.raises(CleftchunkError, match="no room for training crops"):
        everything.draw_position(rng, max_draws=50)


@pytest.mark.parametrize("keep_p", [0.1, 0.3])
def test_rejection_rate_on_label_free_data(keep_p):
    empty = TrainingVolume(np.zeros((4, 64, 64), np.uint8), np.zeros((4, 64, 64), np.uint8))
    sampler = CropSampler([empty], OUT, AugmentConfig.off(), RejectionConfig(min_voxels=100, keep_p=keep_p))
    tries = [sampler.sample(np.random.default_rng([7, i]))["tries"] for i in range(400)]
    # every crop is "empty": each try is kept with probability keep_p, so tries ~ Geometric(keep_p)
    assert abs(1 / np.mean(tries) - keep_p) < 0.25 * keep_p


def test_crops_with_enough_cleft_voxels_are_always_kept():
    full = TrainingVolume(np.zeros((4, 64, 64), np.uint8), np.ones((4, 64, 64), np.uint8))
    sampler = CropSampler([full], OUT, AugmentConfig.off(), RejectionConfig(min_voxels=100, keep_p=0.0))
    assert {sampler.sample(np.random.default_rng(i))["tries"] for i in range(20)} == {1}
    # 2*32*32 = 2048 cleft voxels: not more than 5000, so with keep_p 0 every crop is refused
    strict = CropSampler([full], OUT, AugmentConfig.off(), RejectionConfig(min_voxels=5000, keep_p=0.0, max_tries=5))
    assert strict.sample(np.random.default_rng(0))["tries"] == 5


def zarr_pair(tmp_path, shape=(6, 96, 96), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    labels = np.full(shape, BG, dtype=np.uint64)
    labels[1:5, 20:70, 30:80] = 3
    for name, data in (("raw", image), ("clefts", labels)):
        v = create_volume(tmp_path / f"d.zarr/{name}", shape, data.dtype, chunks=(2, 32, 32))
        v.write(v.roi, data)
    return str(tmp_path / "d.zarr/raw"), str(tmp_path / "d.zarr/clefts")


def take(stream, n, workers):
    out = []
    for batch in make_loader(stream, workers):
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_stream_is_the_same_for_any_number_of_workers_and_resumes_by_index(tmp_path):
    raw, clefts = zarr_pair(tmp_path)
    volumes = open_training_volumes([raw], [clefts])
    sampler = CropSampler(volumes, OUT, AugmentConfig(), RejectionConfig())
    in_process = take(CropStream(sampler, batch_size=2, seed=3), 4, workers=0)
    two_workers = take(CropStream(sampler, batch_size=2, seed=3), 4, workers=2)
    resumed = take(CropStream(sampler, batch_size=2, seed=3, start=2), 2, workers=0)
    assert [int(b["index"]) for b in two_workers] == [0, 1, 2, 3]
    for a, b in zip(in_process, two_workers):
        for key in ("image", "label", "mask"):
            assert torch.equal(a[key], b[key])
    for a, b in zip(in_process[2:], resumed):
        assert torch.equal(a["image"], b["image"])
    assert not torch.equal(in_process[0]["image"], in_process[1]["image"])
    assert in_process[0]["image"].shape == (2, 1, *OUT) and in_process[0]["image"].dtype == torch.float32


def test_processes_share_the_global_batch(tmp_path):
    raw, clefts = zarr_pair(tmp_path)
    sampler = CropSampler(open_training_volumes([raw], [clefts]), OUT)
    whole = next(iter(CropStream(sampler, batch_size=2, seed=1)))
    parts = [next(iter(CropStream(sampler, batch_size=1, seed=1, rank=r, world_size=2))) for r in (0, 1)]
    assert torch.equal(torch.cat([p["image"] for p in parts]), whole["image"])


def test_relative_specs_are_taken_under_the_root(tmp_path):
    zarr_pair(tmp_path)
    (volume,) = open_training_volumes(["d.zarr/raw"], ["d.zarr/clefts"], root=tmp_path)
    assert volume.shape == (6, 96, 96) and volume.label_mode == "cremi"


def test_bad_pairs_are_one_line_errors(tmp_path):
    with pytest.raises(CleftchunkError, match="labels covering exactly the image"):
        TrainingVolume(np.zeros((4, 64, 64), np.uint8), np.zeros((4, 64, 60), np.uint8))
    with pytest.raises(CleftchunkError, match="larger than the volume"):
        CropSampler([TrainingVolume(np.zeros((4, 64, 64), np.uint8), np.zeros((4, 64, 64), np.uint8))], (8, 64, 64))
    with pytest.raises(CleftchunkError, match="one label per image"):
        open_training_volumes(["a", "b"], ["c"])
    with pytest.raises(CleftchunkError, match="no training images"):
        open_training_volumes([], [])
    with pytest.raises(CleftchunkError, match="not supported"):
        TrainingVolume(np.zeros((4, 64, 64), np.int64), np.zeros((4, 64, 64), np.uint8))


# -- near-cleft sampling -----------------------------------------------------------------------------
def _sparse_clefts(shape=(8, 128, 128)):
    labels = np.full(shape, BG, np.uint64)
    labels[3:5, 100:104, 20:24] = 1  # 32 cleft voxels: a uniform crop rarely shows them
    labels[2:4, 10:12, 110:114] = 2
    return np.zeros(shape, np.uint8), labels


@pytest.mark.parametrize("cache_mb", [0, 8])
def test_near_cleft_crops_are_centred_on_cleft_voxels(cache_mb):
    image, labels = _sparse_clefts()
    sampler = CropSampler(
        [TrainingVolume(image, labels)], OUT, AugmentConfig.off(), RejectionConfig(near_cleft=1.0, keep_p=0.0), cache_mb=cache_mb
    )
    assert sampler.draw_near_cleft(np.random.default_rng(0)) is not None and sampler.cleft_index.total == 48
    for seed in range(20):
        sample = sampler.sample(np.random.default_rng(seed))
        assert sample["tries"] == 1  # kept without rejection
        z, y, x = (o + s // 2 for o, s in zip(sample["offset"], OUT))
        assert (labels[z, y, x] != BG) or sample["label"].sum() > 0  # centred on a cleft (or clipped next to one)
        assert sample["label"].sum() > 0


def test_near_cleft_fraction_and_uniform_draws_mix():
    image, labels = _sparse_clefts()
    sampler = CropSampler([TrainingVolume(image, labels)], OUT, AugmentConfig.off(), RejectionConfig(near_cleft=0.5, keep_p=1.0))
    with_clefts = [sampler.sample(np.random.default_rng(s))["label"].sum() > 0 for s in range(200)]
    # half the crops are centred on clefts; uniform crops of 32x32 in 128x128 seldom see one
    assert 0.4 < np.mean(with_clefts) < 0.8


def test_near_cleft_draws_avoid_the_held_out_region():
    from cleftchunk.geometry import Roi

    image, labels = _sparse_clefts((16, 128, 128))
    labels[10:12, 50:54, 50:54] = 3  # only this cleft lies outside the held-out sections 0..7
    sampler = CropSampler(
        [TrainingVolume(image, labels)], OUT, AugmentConfig.off(), RejectionConfig(near_cleft=1.0),
        holdout=[Roi((0, 0, 0), (8, 128, 128))],
    )
    for seed in range(10):
        sample = sampler.sample(np.random.default_rng(seed))
        assert sample["offset"][0] >= 8 and sample["label"].sum() > 0


def test_near_cleft_without_clefts_falls_back_to_uniform_draws():
    image = np.zeros((4, 64, 64), np.uint8)
    sampler = CropSampler([TrainingVolume(image, np.full((4, 64, 64), BG, np.uint64))], OUT, AugmentConfig.off(),
                          RejectionConfig(near_cleft=1.0, keep_p=1.0))
    assert sampler.sample(np.random.default_rng(0))["label"].sum() == 0
    with pytest.raises(CleftchunkError, match="near_cleft"):
        RejectionConfig.from_dict({"near_cleft": 1.5})
