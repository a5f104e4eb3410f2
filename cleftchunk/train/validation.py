"""Validation during training, with the predictor users run (:func:`cleftchunk.predict.predict_reference`)
and the CREMI metrics of :mod:`cleftchunk.post.metrics`, so a validation score is what ``predict``
followed by ``evaluate`` gives in fp32 (predict's default on the CPU; on a GPU predict defaults to
bf16 autocast, which ``--precision fp32`` turns off)."""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from cleftchunk.labels import cleft_mask
from cleftchunk.post.metrics import cremi_metrics_reference
from cleftchunk.io.stores import resolved
from cleftchunk.train.data import label_codes
from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import Roi
from cleftchunk.train.config import TrainConfig
from cleftchunk.train.loss import weighted_bce
from cleftchunk.train.trainer import TrainState, Trainer


# -- validation ------------------------------------------------------------------------------------
def same_dataset(a: Any, b: Any) -> bool:
    """Whether two opened volumes are the same stored dataset."""
    try:
        return resolved(a.container) == resolved(b.container) and (a.inner or "") == (b.inner or "")
    except AttributeError:
        return a is b


def parse_roi(text: str | None, shape: Sequence[int]) -> tuple[slice, ...]:
    """``z0:z1,y0:y1,x0:x1`` (empty bounds allowed) to slices; None = the whole volume."""
    if not text:
        return tuple(slice(0, s) for s in shape)
    parts = text.split(",")
    if len(parts) != 3:
        raise CleftchunkError(f"--validate-roi {text!r} must be z0:z1,y0:y1,x0:x1")
    out = []
    for part, size in zip(parts, shape):
        lo, _, hi = part.partition(":")
        try:
            s = slice(int(lo) if lo else 0, int(hi) if hi else size)
        except ValueError:
            raise CleftchunkError(f"--validate-roi {text!r} must hold integers, e.g. 0:16,0:512,0:512") from None
        out.append(s)
    return tuple(out)


def predict_validation(net: nn.Module, image: np.ndarray, window: Sequence[int], device: torch.device) -> np.ndarray:
    """uint8 probabilities (p·255) over the held-out region, computed as ``cleftchunk predict``
    computes them in fp32 (:func:`cleftchunk.predict.predict_reference`: 50 % overlap, Gaussian
    blending): on the CPU, exactly predict's defaults.

    Always fp32, also on a GPU where predict's default is bf16 autocast: validation scores then do
    not depend on the device that trained, and compare across runs; bf16 moves some voxels of a
    prediction by a step or two of 1/255."""
    from cleftchunk.predict import predict_reference

    model = nn.Sequential(net, nn.Sigmoid())  # the training net gives logits; predict reads probabilities
    return predict_reference(model, image, window, device=str(device))


class Validator:
    """A hook: every ``every`` iterations, predict the held-out region and report loss + CREMI metrics.

    The prediction is the shipped one (:func:`predict_validation`); CREMI metrics come from :mod:`cleftchunk.post.metrics`.
    Results go to TensorBoard (``val/*``) and ``<output>/validation.jsonl``.
    """

    def __init__(self, config: TrainConfig):
        from cleftchunk.frames import Frame, align
        from cleftchunk.intensity import image_scale
        from cleftchunk.train.data import under_root, resolve_label_mode
        from cleftchunk.io.volumes import open_volume

        image = open_volume(under_root(config.validate_image, config.root))
        labels = open_volume(under_root(config.validate_labels, config.root))
        # --validate-roi is in the image's voxels and also holds training crops out: one frame, not an overlap
        align(Frame.of(image, f"validation image {image.spec}"), Frame.of(labels, f"labels {labels.spec}"), config.ignore_frame, "same")
        roi = parse_roi(config.validate_roi, image.shape)
        self.volume = image
        self.whole_volume = not config.validate_roi
        self.roi = Roi.from_bounds([s.start for s in roi], [s.stop for s in roi])
        self.every = int(config.validate_every)
        self.window = list(config.input_size)
        region = image[roi]
        # predict divides uint8 by 255 itself; other dtypes are scaled here by training's rule
        self.image = region if region.dtype == np.uint8 else region.astype(np.float32) * np.float32(image_scale(image.dtype))
        codes = label_codes(labels[roi], resolve_label_mode(config.label_mode, labels))
        self.label = (codes & 1).astype(bool)
        self.invalid = (codes & 2).astype(bool)
        self.voxel_size = image.voxel_size
        self.path = config.output_dir / "validation.jsonl"

    def holdout_for(self, volumes: Sequence[Any]) -> list[Roi | None]:
        """The validation region, for each training volume that is the validation volume."""
        out: list[Roi | None] = []
        for v in volumes:
            same = same_dataset(v.image, self.volume)
            if same and self.whole_volume:
                raise CleftchunkError(
                    f"--validate-image {self.volume} is also a training volume: hold out a region of it with --validate-roi"
                )
            out.append(self.roi if same else None)
        return out

    def __call__(self, state: TrainState) -> None:
        if not self.every or state.iteration % self.every and state.iteration != state.config.iteration_total:
            return
        result = self.evaluate(state.trainer)
        result["iteration"] = state.iteration
        state.metrics.update(result)
        if state.writer is not None:
            for key, value in result.items():
                if key != "iteration" and isinstance(value, (int, float)) and math.isfinite(value):
                    state.writer.add_scalar(f"val/{key}", value, state.iteration)
            with self.path.open("a") as f:
                f.write(json.dumps(result) + "\n")

    def evaluate(self, trainer: Trainer) -> dict:
        with trainer.inference_net() as net:
            predicted = predict_validation(net, self.image, self.window, trainer.dist.device)
        prob = predicted.astype(np.float32) / 255
        valid = ~self.invalid
        loss = float(weighted_bce(torch.logit(torch.from_numpy(prob).clamp(1e-6, 1 - 1e-6))[None, None],
                                  torch.from_numpy(self.label.astype(np.float32))[None, None],
                                  torch.from_numpy(valid.astype(np.float32))[None, None]))
        result: dict[str, Any] = {"loss": loss}
        pred_mask = cleft_mask(predicted, "prob")  # binarized as segment and evaluate do
        metrics = cremi_metrics_reference(pred_mask, self.label, self.voxel_size, invalid_mask=self.invalid)
        for key in ("f1", "precision", "recall", "cremi_score", "adgt", "adf", "fp", "fn"):
            value = metrics.get(key)
            result[key] = float(value) if value is not None else None
        return result
