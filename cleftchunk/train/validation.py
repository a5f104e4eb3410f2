"""Validation during training, with the predictor users run (:func:`cleftchunk.predict.predict_reference`)
and the CREMI metrics of :mod:`cleftchunk.post.metrics`, so a validation score is what ``predict``
followed by ``evaluate`` gives."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

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
        return Path(a.container).resolve() == Path(b.container).resolve() and (a.inner or "") == (b.inner or "")
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


def predict_in_memory(net: nn.Module, image: np.ndarray, window: Sequence[int], device: torch.device) -> np.ndarray:
    """Probabilities over a small in-memory region: 50 %-overlap tiles, mean blending, reflect padding."""
    from cleftchunk.geometry import tile_starts

    pad = [(max(0, (w - s + 1) // 2), max(0, w - s - (w - s + 1) // 2)) for s, w in zip(image.shape, window)]
    padded = np.pad(image, pad, mode="reflect") if any(a or b for a, b in pad) else image
    total = np.zeros(padded.shape, np.float32)
    weight = np.zeros(padded.shape, np.float32)
    starts = [tile_starts(s, w, max(w // 2, 1)) for s, w in zip(padded.shape, window)]
    with torch.no_grad():
        for z in starts[0]:
            for y in starts[1]:
                for x in starts[2]:
                    sl = (slice(z, z + window[0]), slice(y, y + window[1]), slice(x, x + window[2]))
                    tile = torch.from_numpy(np.ascontiguousarray(padded[sl]))[None, None].to(device)
                    total[sl] += torch.sigmoid(net(tile)).float()[0, 0].cpu().numpy()
                    weight[sl] += 1
    prob = total / weight
    return prob[tuple(slice(a, a + s) for (a, _), s in zip(pad, image.shape))]


class Validator:
    """A hook: every ``every`` iterations, predict the held-out region and report loss + CREMI metrics.

    CREMI metrics come from :mod:`cleftchunk.metrics` when it is installed; otherwise only the loss.
    Results go to TensorBoard (``val/*``) and ``<output>/validation.jsonl``.
    """

    def __init__(self, config: TrainConfig):
        from cleftchunk.intensity import image_scale
        from cleftchunk.train.data import under_root, resolve_label_mode
        from cleftchunk.io.volumes import open_volume

        image = open_volume(under_root(config.validate_image, config.root))
        labels = open_volume(under_root(config.validate_labels, config.root))
        if image.shape != labels.shape:
            raise CleftchunkError(f"validation image {image} {image.shape} and labels {labels} {labels.shape} differ in shape")
        roi = parse_roi(config.validate_roi, image.shape)
        self.volume = image
        self.whole_volume = not config.validate_roi
        self.roi = Roi.from_bounds([s.start for s in roi], [s.stop for s in roi])
        self.every = int(config.validate_every)
        self.window = list(config.input_size)
        self.image = image[roi].astype(np.float32) * np.float32(image_scale(image.dtype))
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
            prob = predict_in_memory(net, self.image, self.window, trainer.dist.device)
        valid = ~self.invalid
        loss = float(weighted_bce(torch.logit(torch.from_numpy(prob).clamp(1e-6, 1 - 1e-6))[None, None],
                                  torch.from_numpy(self.label.astype(np.float32))[None, None],
                                  torch.from_numpy(valid.astype(np.float32))[None, None]))
        result: dict[str, Any] = {"loss": loss}
        try:
            from cleftchunk.post.metrics import cremi_metrics_reference
        except ImportError:  # evaluation not installed: loss only
            return result
        pred_mask = np.round(prob * 255) >= 128  # the uint8 prediction binarized as the original does
        metrics = cremi_metrics_reference(pred_mask, self.label, self.voxel_size, invalid_mask=self.invalid)
        for key in ("f1", "precision", "recall", "cremi_score", "adgt", "adf", "fp", "fn"):
            value = metrics.get(key)
            result[key] = float(value) if value is not None else None
        return result
