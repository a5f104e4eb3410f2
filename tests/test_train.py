"""Training: loss, learning, exact resume, failures, the CLI end to end, several processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cleftchunk import CleftchunkError
from cleftchunk.model import build_model, load_checkpoint, load_model, set_output_prior
from cleftchunk.train import (
    TrainConfig,
    dice_loss,
    free_port,
    make_optimizer,
    train,
    training_loss,
    weighted_bce,
)
from cleftchunk.labels import CREMI_BACKGROUND
from cleftchunk.io.volumes import create_volume

SHAPE = (8, 96, 96)
MI = [4, 64, 64]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A Zarr image with one dark cleft slab, its CREMI labels, and a few broken variants."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    labels = np.full(SHAPE, CREMI_BACKGROUND, dtype=np.uint64)
    labels[2:7, 30:60, 20:80] = 5
    image = rng.integers(120, 200, SHAPE, dtype=np.uint8)
    image[labels != CREMI_BACKGROUND] //= 3
    nan_image = image.astype(np.float32) / 255
    nan_image[:, 40:50, 40:50] = np.nan
    arrays = {
        "raw": image, "clefts": labels, "nan_raw": nan_image,
        "short_clefts": labels[:, :90], "tiny_raw": image[:, :48, :48], "tiny_clefts": labels[:, :48, :48],
    }
    for name, array in arrays.items():
        v = create_volume(root / f"d.zarr/{name}", array.shape, array.dtype, chunks=(4, 48, 48))
        v.write(v.roi, array)
    return root


def config(data, out, **overrides) -> dict:
    values = {
        "root": str(data), "images": "d.zarr/raw", "labels": "d.zarr/clefts", "output": str(out),
        "input_size": MI, "preset": "small", "batch_size": 2, "loader_workers": 0, "iteration_total": 4,
        "iteration_save": 2, "progress": False, "threads": 1, "log_dir": str(out) + "-runs", "rejection": {"keep_p": 0.5},
    }
    values.update(overrides)
    return values


def weights(path, key="model"):
    return load_checkpoint(path)[key]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# -- loss ------------------------------------------------------------------------------------------
def test_weighted_bce_is_the_originals_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 2, 4, 4)
    target = (torch.rand(2, 1, 2, 4, 4) > 0.8).float()
    p = torch.sigmoid(logits).double()
    expected = 0
    for n in range(2):
        y = target[n].double()
        wf = max(float(y.mean()), 0.01)
        w = y * (1 - wf) / wf + (1 - y)
        expected += float((-w * (y * torch.log(p[n]) + (1 - y) * torch.log(1 - p[n]))).sum())
    expected /= target.numel()
    assert abs(float(weighted_bce(logits, target)) - expected) < 1e-5


def test_masked_voxels_do_not_count():
    torch.manual_seed(1)
    logits = torch.randn(1, 1, 2, 8, 8)
    target = (torch.rand(1, 1, 2, 8, 8) > 0.7).float()
    mask = torch.ones_like(target)
    mask[..., :4] = 0
    changed = logits.clone()
    changed[..., :4] = 50.0
    assert torch.allclose(weighted_bce(logits, target, mask), weighted_bce(changed, target, mask))
    assert not torch.allclose(weighted_bce(logits, target), weighted_bce(changed, target))


def test_max_weight_caps_the_positive_weight():
    torch.manual_seed(2)
    logits = torch.randn(2, 1, 2, 8, 8)
    target = (torch.rand(2, 1, 2, 8, 8) > 0.95).float()
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert abs(float(weighted_bce(logits, target, max_weight=1.0)) - float(plain)) < 1e-6
    assert float(weighted_bce(logits, target)) > float(weighted_bce(logits, target, max_weight=3.0)) > float(plain)
    assert float(weighted_bce(logits, target, max_weight=1e9)) == float(weighted_bce(logits, target))


def test_dice_term():
    target = torch.zeros(1, 1, 2, 8, 8)
    target[..., 2:6, 2:6] = 1
    perfect = (target * 2 - 1) * 20
    assert float(dice_loss(perfect, target)) < 1e-3
    assert float(dice_loss(-perfect, target)) > 0.9
    unsure = torch.zeros_like(target)
    assert float(training_loss(unsure, target, dice=1.0)) > float(training_loss(unsure, target)) + 0.3


def test_a_few_optimizer_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    net = build_model(preset="small")
    optimizer = make_optimizer(net.parameters(), TrainConfig(lr=1e-2))
    image = torch.rand(2, 1, *MI)
    label = torch.zeros_like(image)
    label[..., 20:40, 20:40] = 1
    image[label > 0] *= 0.3
    losses = []
    for _ in range(8):
        loss = training_loss(net(image), label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("prior", [0.01, 0.3])
def test_output_prior_sets_the_starting_probability_everywhere(prior):
    torch.manual_seed(0)
    net = build_model(preset="small")
    set_output_prior(net, prior)
    net.eval()
    with torch.no_grad():
        p = torch.sigmoid(net(torch.rand(1, 1, *MI)))
    # The eval-mode BatchNorm of a fresh net is the identity on its running stats (0, 1), so the
    # probability is prior's up to the conv's small output: within a factor of a few.
    assert prior / 3 < float(p.median()) < min(3 * prior, 0.9)
    with pytest.raises(CleftchunkError, match="between 0 and 1"):
        set_output_prior(net, 1.0)


@pytest.mark.parametrize("values, message", [({"max_weight": 0}, "max-weight 0 must be positive"),
                                             ({"output_prior": 1.5}, "output-prior 1.5 must lie strictly between 0 and 1")])
def test_bad_loss_settings_are_one_line_errors(data, tmp_path, values, message):
    with pytest.raises(CleftchunkError, match=message):
        TrainConfig.from_dict({**config(data, tmp_path / "bad"), **values})


def test_a_training_run_starts_from_the_configured_prior(data, tmp_path):
    from cleftchunk.train.trainer import Trainer
    from cleftchunk.train.distributed import Dist

    trainer = Trainer(TrainConfig.from_dict({**config(data, tmp_path / "p"), "output_prior": 0.02}), Dist())
    assert abs(float(trainer.net.head[-1].bias.detach()) - np.log(0.02 / 0.98)) < 1e-6


# -- resume ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_gives_bitwise_the_weights_of_an_uninterrupted_run(data, tmp_path):
    whole = train(config(data, tmp_path / "whole"))
    part = train(config(data, tmp_path / "part", iteration_total=2))
    assert load_checkpoint(part)["iteration"] == 2
    resumed = train(config(data, tmp_path / "part"), resume=True)
    ckpt = load_checkpoint(resumed)
    assert ckpt["iteration"] == 4
    assert_same_state(weights(whole), ckpt["model"])
    assert load_checkpoint(whole)["optimizer"]["state"].keys() == ckpt["optimizer"]["state"].keys()
    assert sorted(p.name for p in (tmp_path / "part").glob("*.pth")) == ["last.pth", "volume_2.pth", "volume_4.pth"]


class Interrupt(Exception):
    pass


def stop_at(iteration):
    def hook(state):
        if state.iteration == iteration:
            raise Interrupt

    return hook


@pytest.mark.slow
def test_interrupted_adamw_cosine_ema_run_resumes_exactly(data, tmp_path):
    options = {"optimizer": "adamw", "lr_schedule": "cosine", "warmup": 1, "ema": 0.9, "dice": 0.5, "iteration_save": 2}
    whole = train(config(data, tmp_path / "whole", iteration_total=5, **options))
    with pytest.raises(Interrupt):
        train(config(data, tmp_path / "cut", iteration_total=5, **options), hooks=[stop_at(3)])
    assert load_checkpoint(tmp_path / "cut" / "last.pth")["iteration"] == 2
    resumed = train(config(data, tmp_path / "cut", iteration_total=5, **options), resume=True)
    for key in ("model", "model_raw"):
        assert_same_state(weights(whole, key), weights(resumed, key))
    ema, raw = weights(resumed, "model"), weights(resumed, "model_raw")
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # the EMA is what prediction loads
    assert load_checkpoint(resumed)["scheduler"]["last_epoch"] == 5


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    import cleftchunk.train.trainer as train_module

    calls = {"n": 0}
    real = train_module.training_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_module, "training_loss", poisoned)
    with pytest.raises(CleftchunkError) as e:
        train(config(data, tmp_path / "nan"))
    message = str(e.value)
    assert "nan at iteration 3" in message and "last good checkpoint" in message and "iteration 2)" in message
    assert load_checkpoint(tmp_path / "nan" / "last.pth")["iteration"] == 2
    assert not (tmp_path / "nan" / "volume_4.pth").exists()


def test_validation_hook_reports_cremi_metrics(data, tmp_path):
    values = config(
        data, tmp_path / "val", iteration_total=2, validate_every=2,
        validate_image="d.zarr/tiny_raw", validate_labels="d.zarr/tiny_clefts", validate_roi="0:4,:,:",
    )
    train(values)
    (line,) = (tmp_path / "val" / "validation.jsonl").read_text().splitlines()
    result = json.loads(line)
    assert result["iteration"] == 2 and np.isfinite(result["loss"])
    assert "f1" in result and "cremi_score" in result


def test_the_library_resumes_with_the_stored_config_like_the_command(data, tmp_path):
    """train(values, resume=True) takes the run's stored settings, then the explicit ones on top."""
    out = tmp_path / "lib"
    train(config(data, out, iteration_total=2, augment={"rotation_p": 0.25}))
    last = train({"output": str(out), "iteration_total": 3, "augment": {"flip_p": 0.0}}, resume=True)
    stored = load_checkpoint(last)["config"]
    assert load_checkpoint(last)["iteration"] == 3
    assert stored["preset"] == "small" and stored["input_size"] == MI  # from the stored config
    assert stored["augment"]["rotation_p"] == 0.25 and stored["augment"]["flip_p"] == 0.0  # merged key by key


@pytest.mark.slow
def test_validation_scores_are_what_predict_then_evaluate_give(data, tmp_path):
    """Validation runs the shipped predictor: the score it logs for the final weights equals the one
    a user gets from `predict` (with its defaults) and `evaluate` on the same region."""
    from cleftchunk.io.volumes import open_volume
    from cleftchunk.post.metrics import evaluate
    from cleftchunk.predict import predict
    from cleftchunk.run.options import RunOptions

    values = config(
        data, tmp_path / "val", iteration_total=2, validate_every=2,
        validate_image="d.zarr/tiny_raw", validate_labels="d.zarr/tiny_clefts", validate_roi="0:4,:,:",
    )
    last = train(values)
    logged = json.loads((tmp_path / "val" / "validation.jsonl").read_text().splitlines()[-1])
    region = {}
    for name in ("tiny_raw", "tiny_clefts"):
        source = open_volume(data / f"d.zarr/{name}")
        array = source[:4]
        copy = create_volume(tmp_path / f"region.zarr/{name}", array.shape, array.dtype, chunks=(4, 48, 48))
        copy.write(copy.roi, array)
        region[name] = copy
    predict(last, region["tiny_raw"], tmp_path / "region.zarr/pred", run=RunOptions(workers=0, progress=False))
    metrics = evaluate(tmp_path / "region.zarr/pred", region["tiny_clefts"])
    for key in ("f1", "fp", "fn"):
        assert logged[key] == pytest.approx(float(metrics[key])), key


def test_validation_on_a_training_volume_needs_a_held_out_region(data, tmp_path):
    values = config(data, tmp_path / "v", iteration_total=1, validate_every=1,
                    validate_image="d.zarr/raw", validate_labels="d.zarr/clefts")
    with pytest.raises(CleftchunkError, match="also a training volume"):
        train(values)


# -- the command line ------------------------------------------------------------------------------
def test_cli_end_to_end_with_yaml_overridden_by_flags(data, tmp_path, run_cli):
    out = tmp_path / "cli"
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("lr: 0.5\niteration_save: 2\nbatch_size: 2\naugment:\n  rotation_p: 0.25\n")
    result = run_cli(
        "train", "-t", data, "-dn", "d.zarr/raw", "-ln", "d.zarr/clefts", "-o", out, "-lr", "0.002",
        "--iteration-total", "3", "-mi", "4,64,64", "-c", "0", "-ac", "unetv0", "--preset", "small",
        "--config", yaml_file, "--log-dir", tmp_path / "runs", "--no-progress", "--threads", "1",
    )
    assert "last.pth" in result.output
    import yaml

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["lr"] == 0.002  # the flag wins over the file
    assert resolved["iteration_save"] == 2 and resolved["batch_size"] == 2  # the file wins over defaults
    assert resolved["augment"]["rotation_p"] == 0.25 and resolved["augment"]["elastic_p"] == 0.75
    assert sorted(p.name for p in out.glob("*.pth")) == ["last.pth", "volume_2.pth", "volume_3.pth"]
    model = load_model(out / "last.pth")
    with torch.no_grad():
        prob = model(torch.rand(1, 1, *MI))
    assert prob.shape == (1, 1, *MI) and 0 <= float(prob.min()) and float(prob.max()) <= 1
    assert_tensorboard_has(tmp_path / "runs", {"loss/train", "lr", "samples_per_s"}, images=True)

    # continue the same run for two more iterations with only the output folder and --resume
    run_cli("train", "-o", out, "--resume", "--iteration-total", "5", "--no-progress", "--log-dir", tmp_path / "runs", "--threads", "1")
    assert load_checkpoint(out / "last.pth")["iteration"] == 5


def assert_tensorboard_has(folder, scalars, images):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    tags = acc.Tags()
    assert scalars <= set(tags["scalars"]), tags["scalars"]
    assert bool(tags["images"]) == images


@pytest.mark.parametrize(
    "args, message",
    [
        (["-ln", "d.zarr/short_clefts"], "labels covering exactly the image"),
        (["-dn", "d.zarr/tiny_raw", "-ln", "d.zarr/tiny_clefts"], "larger than the volume"),
        (["-ln", "d.zarr/missing"], "no Zarr array or group there"),
        (["-mi", "9,64,64"], "nearest valid: 8,64,64"),
        (["-mi", "4,64"], "three positive sizes"),
        (["-dn", "d.zarr/nan_raw", "--no-augment"], "the loss became nan at iteration 1"),
        (["-g", "3"], "torch sees 0"),
        (["--augment", "spin_p=1"], "unknown augmentation setting"),
    ],
)
def test_cli_bad_input_is_a_one_line_error(data, tmp_path, run_cli, args, message):
    base = ["train", "-t", data, "-dn", "d.zarr/raw", "-ln", "d.zarr/clefts", "-o", tmp_path / "o", "-mi", "4,64,64",
            "--preset", "small", "-b", "2", "-c", "0", "--iteration-total", "2", "--no-progress", "--log-dir", tmp_path / "r",
            "--threads", "1"]
    result = run_cli(*base, *args, expect=2)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], result.output


@pytest.mark.parametrize(
    "old, printed",
    [
        (["--scheduler", "cosine"], "error: train --scheduler is now --lr-schedule, the learning-rate schedule: "
                                    "on the block-wise commands --scheduler is the address of a Dask scheduler"),
        (["--workers", "2"], "error: train --workers is now --loader-workers (-c), the data loader processes: "
                             "on the block-wise commands --workers is the number of Dask worker processes"),
    ],
)
def test_retired_flags_name_their_new_spelling(data, tmp_path, run_cli, old, printed):
    """--scheduler and --workers mean Dask schedulers and workers on the block-wise commands."""
    result = run_cli("train", "-t", data, "-dn", "d.zarr/raw", "-ln", "d.zarr/clefts", "-o", tmp_path / "o", *old, expect=2)
    assert result.output == printed + "\n"
    assert not (tmp_path / "o").exists()


def test_loader_workers_and_lr_schedule_flags_and_older_stored_names(data, tmp_path, run_cli):
    """-c is --loader-workers (the tutorial's -c); --lr-schedule sets the schedule; a config stored
    by an older version (``workers``, ``scheduler``) still loads, under the new names."""
    import yaml

    out = tmp_path / "o"
    run_cli("train", "-t", data, "-dn", "d.zarr/raw", "-ln", "d.zarr/clefts", "-o", out, "-mi", "4,64,64", "--preset", "small",
            "-b", "2", "--loader-workers", "0", "--lr-schedule", "cosine", "--iteration-total", "1", "--no-progress",
            "--log-dir", tmp_path / "r", "--threads", "1")
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["loader_workers"] == 0 and resolved["lr_schedule"] == "cosine"
    assert "workers" not in resolved and "scheduler" not in resolved
    stored = {k: v for k, v in config(data, out).items() if k != "loader_workers"} | {"workers": 2, "scheduler": "constant"}
    older = TrainConfig.from_dict(stored)
    assert (older.loader_workers, older.lr_schedule) == (2, "constant")
    assert TrainConfig.from_dict(stored | {"loader_workers": 1}).loader_workers == 1  # the new name wins


def test_cli_guards_an_existing_run(data, tmp_path, run_cli):
    out = tmp_path / "o"
    base = ["train", "-t", data, "-dn", "d.zarr/raw", "-ln", "d.zarr/clefts", "-o", out, "-mi", "4,64,64",
            "--preset", "small", "-b", "2", "-c", "0", "--iteration-total", "1", "--no-progress", "--log-dir", tmp_path / "r",
            "--threads", "1"]
    run_cli(*base)
    before = (out / "last.pth").read_bytes()
    result = run_cli(*base, expect=2)
    assert "pass --resume to continue that run or --overwrite" in result.output
    assert (out / "last.pth").read_bytes() == before
    result = run_cli("train", "-o", out, "--resume", "--preset", "medium", "--no-progress", expect=2)
    assert "holds architecture unetv0(8,12,16,20,24)" in result.output
    result = run_cli(*base, "--resume", "-mi", "2,64,64", expect=2)
    assert "trained with input size 4,64,64" in result.output
    run_cli(*base, "--overwrite", "--seed", "5")
    assert load_checkpoint(out / "last.pth")["config"]["seed"] == 5
    result = run_cli("train", "-o", tmp_path / "empty", "--resume", expect=2)
    assert "nothing to resume" in result.output


# -- several processes (DistributedDataParallel with gloo on the CPU) -------------------------------
RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, torch
    torch.set_num_threads(1)
    from cleftchunk.train import train
    values = json.loads(sys.argv[1])
    def dump(state):
        if state.iteration == values["iteration_total"]:
            params = {k: v.detach() for k, v in state.trainer.net.named_parameters()}
            torch.save(params, os.path.join(values["output"], f"rank{os.environ['RANK']}.pt"))
    train(values, hooks=[dump])
    """
)


@pytest.mark.slow
def test_ddp_under_torchrun_environment_keeps_ranks_in_step(data, tmp_path):
    out = tmp_path / "ddp"
    values = config(data, out, iteration_total=2, batch_size=2)
    env_common = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, json.dumps(values)], env={**env_common, "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    a, b = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert_same_state(a, b)  # gradients were averaged: every rank holds the same weights
    ckpt = load_checkpoint(out / "last.pth")
    assert ckpt["iteration"] == 2
    assert_same_state({k: ckpt["model"][k] for k in a}, a)


@pytest.mark.slow
def test_ddp_spawned_by_the_command_itself(data, tmp_path):
    last = train(config(data, tmp_path / "spawn", iteration_total=2, cpu_processes=2))
    ckpt = load_checkpoint(last)
    assert ckpt["iteration"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_ctrl_c_says_how_to_continue(data, tmp_path):
    from cleftchunk.train import TrainingInterrupted

    def ctrl_c(state):
        if state.iteration == 3:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as e:
        train(config(data, tmp_path / "int"), hooks=[ctrl_c])
    assert e.value.exit_code == 130
    assert "interrupted at iteration 3" in str(e.value) and "holds iteration 2" in str(e.value) and "--resume" in str(e.value)
