"""The augmentations of :mod:`cleftchunk.train.augment`, applied batch-wise with torch on the model's device.

The CPU loader workers draw each sample's :class:`~cleftchunk.train.augment.Plan` exactly as the
numpy path does (from the per-sample seed, so the crop stream does not depend on worker or GPU
counts and resumes exactly), read the oversized box (``Augmenter.source_shape``) and its uint8
label codes, and pack the plans into tensors (:func:`pack_plans`). :class:`TorchAugmenter` then
does, for a whole batch on one device:

1. z selection by indexing the box with the plans' ``z_keep``;
2. one float32 sampling grid per output slice combining rotation, rescale, the elastic field (the
   plan's coarse control grid upsampled by the same bilinear matrices as the numpy path) and the
   misalignment shift, and ONE ``grid_sample`` over all slices of the batch for the image
   (bilinear, reflection = ``map_coordinates``' mirror) and one for the label codes (nearest, so
   a label is always a code that was there, never an interpolated value);
3. label smoothing as max pooling (the dilations) and a separable Gaussian convolution with
   ndimage's kernel and symmetric padding, threshold 0.8;
4. grayscale, the missing part (band filled with the slice mean), flips and the x–y transpose as
   tensor operations.

Nothing here is random and nothing waits for the device (no ``.item()``, control flow reads the
plans' CPU copies), so the work queues behind the model's step (see
:class:`cleftchunk.train.device_batches.DevicePrefetcher`).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cleftchunk.labels import CLEFT_BIT, INVALID_BIT
from cleftchunk.train.augment import Augmenter, Plan, control_shape, elastic_spacing, interpolation_matrix

#: Keys of a packed plan batch (all CPU tensors; see :func:`pack_plans`).
PLAN_KEYS = ("z_keep", "matrix", "elastic", "shifts", "smooth", "gray", "has_gray", "part", "has_part", "flips")


def pack_plans(plans: Sequence[Plan], augmenter: Augmenter) -> dict[str, torch.Tensor]:
    """The plans of one batch as tensors (what crosses from the loader workers to the trainer)."""
    z, h, w = augmenter.out_shape
    n = len(plans)
    c = augmenter.config
    gy, gx = control_shape((h, w), c.elastic_sigma)
    out = {
        "z_keep": torch.zeros((n, z), dtype=torch.int64),
        "matrix": torch.zeros((n, 2, 2), dtype=torch.float64),
        "elastic": torch.zeros((n, 2, gy, gx), dtype=torch.float32),
        "shifts": torch.zeros((n, z, 2), dtype=torch.float32),
        "smooth": torch.zeros(n, dtype=torch.bool),
        "gray": torch.tensor([1.0, 0.0, 1.0]).repeat(n, z, 1),
        "has_gray": torch.zeros(n, dtype=torch.bool),
        "part": torch.zeros((n, 5), dtype=torch.float64),
        "has_part": torch.zeros(n, dtype=torch.bool),
        "flips": torch.zeros((n, 4), dtype=torch.bool),
    }
    for i, plan in enumerate(plans):
        out["z_keep"][i] = torch.from_numpy(np.asarray(plan.z_keep, dtype=np.int64))
        cos, sin = math.cos(plan.angle) / plan.scale, math.sin(plan.angle) / plan.scale
        out["matrix"][i] = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64)
        if plan.elastic is not None:
            out["elastic"][i] = torch.from_numpy(plan.elastic)
        if plan.shifts is not None:
            out["shifts"][i] = torch.from_numpy(np.asarray(plan.shifts, dtype=np.float32))
        out["smooth"][i] = bool(plan.smooth_labels)
        if plan.grayscale is not None:
            out["gray"][i] = torch.from_numpy(np.asarray(plan.grayscale, dtype=np.float32))
            out["has_gray"][i] = True
        if plan.missing_part is not None:
            out["part"][i] = torch.tensor(plan.missing_part, dtype=torch.float64)
            out["has_part"][i] = True
        out["flips"][i] = torch.tensor(plan.flips, dtype=torch.bool)
    return out


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """ndimage's 1-D Gaussian (radius ``int(truncate·σ + 0.5)``, normalised), float32."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (x / sigma) ** 2)
    return torch.from_numpy((weights / weights.sum()).astype(np.float32))


class TorchAugmenter:
    """Applies packed plans to a batch of source boxes on ``device`` (see the module docstring)."""

    def __init__(self, augmenter: Augmenter, device: torch.device | str = "cpu", sigma: float = 2.0, threshold: float = 0.8):
        self.augmenter = augmenter
        self.device = torch.device(device)
        z, h, w = augmenter.out_shape
        s = elastic_spacing(augmenter.config.elastic_sigma)
        gy, gx = control_shape((h, w), augmenter.config.elastic_sigma)
        as_tensor = lambda a: torch.from_numpy(a.astype(np.float32)).to(self.device)  # noqa: E731
        self.upsample_y = as_tensor(interpolation_matrix(h, gy, s))
        self.upsample_x = as_tensor(interpolation_matrix(w, gx, s))
        self.kernel = gaussian_kernel(sigma).to(self.device)
        self.threshold = float(threshold)
        cy, cx = (h - 1) / 2, (w - 1) / 2
        self.centre = (cy, cx)
        yy = torch.arange(h, dtype=torch.float32, device=self.device) - cy
        xx = torch.arange(w, dtype=torch.float32, device=self.device) - cx
        self.dy, self.dx = yy[:, None], xx[None, :]
        _, hs, ws = augmenter.source_shape  # the boxes' y–x: pixels to grid_sample's [-1, 1]
        self.norm = (2.0 / max(hs - 1, 1), 2.0 / max(ws - 1, 1))

    # -- geometry ------------------------------------------------------------------------------------
    def coordinates(self, plans: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, x), each (B, Z, H, W) float32: the source of each output voxel in box pixels —
        rotation and rescale about the crop centre, the upsampled elastic field, the shift."""
        m = self.augmenter.margin_yx
        cy, cx = self.centre
        a = plans["matrix"].to(self.device, torch.float32, non_blocking=True)[:, :, :, None, None]  # (B, 2, 2, 1, 1)
        elastic = self.upsample_y @ plans["elastic"].to(self.device, non_blocking=True) @ self.upsample_x.T  # (B, 2, H, W)
        y = a[:, 0, 0] * self.dy + a[:, 0, 1] * self.dx + elastic[:, 0] + (cy + m)  # (B, H, W)
        x = a[:, 1, 0] * self.dy + a[:, 1, 1] * self.dx + elastic[:, 1] + (cx + m)
        shifts = plans["shifts"].to(self.device, non_blocking=True)[:, :, :, None, None]  # (B, Z, 2, 1, 1)
        return y[:, None] + shifts[:, :, 0], x[:, None] + shifts[:, :, 1]

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch``: "image" (B, Zs, Hs, Ws) uint8 (or float32 already scaled), "codes" (B, Zs, Hs, Ws)
        uint8, the :data:`PLAN_KEYS`, and whatever else passes through (tries, index). Returns the
        model's batch: image, label and mask (B, 1, Z, H, W) float32 on the device."""
        plans = {k: batch[k] for k in PLAN_KEYS}
        image_box = batch["image"].to(self.device, non_blocking=True)
        codes_box = batch["codes"].to(self.device, non_blocking=True)
        b, zs, hs, ws = image_box.shape
        z, h, w = self.augmenter.out_shape
        # The source slice of every output slice, as a row of the boxes flattened to (B·Zs, Hs, Ws).
        rows = (plans["z_keep"].to(self.device, non_blocking=True) + torch.arange(b, device=self.device)[:, None] * zs).reshape(-1)
        y, x = self.coordinates(plans)
        # grid_sample wants (x, y) normalised to [-1, 1] (align_corners=True: -1 and 1 are the edge voxels' centres).
        grid = torch.stack([x * self.norm[1] - 1.0, y * self.norm[0] - 1.0], dim=-1).reshape(b * z, h, w, 2)
        source = image_box.reshape(b * zs, 1, hs, ws).index_select(0, rows).float()
        image = F.grid_sample(source, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
        image = image.reshape(b, z, h, w)
        if image_box.dtype == torch.uint8:
            image = image * (1.0 / 255)
        codes = self.nearest(codes_box.reshape(b * zs, hs, ws), rows, y.reshape(b * z, h, w), x.reshape(b * z, h, w))
        codes = codes.reshape(b, z, h, w)
        label = (codes & CLEFT_BIT) > 0
        valid = (codes & INVALID_BIT) == 0
        label = self.smooth(label, plans["smooth"])
        image = self.grayscale(image, plans)
        image = self.missing_part(image, plans)
        image, label, valid = self.flip([image, label.float(), valid.float()], plans["flips"])
        out = {k: v for k, v in batch.items() if k not in PLAN_KEYS and k not in ("image", "codes")}
        out.update(image=image[:, None].contiguous(), label=label[:, None].contiguous(), mask=valid[:, None].contiguous())
        return out

    @staticmethod
    def nearest(codes: torch.Tensor, rows: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Label codes at the nearest source voxel: a gather of uint8, what ``grid_sample(mode=
        "nearest")`` gives without turning the codes into floats. The index within a slice
        (< 2**24 voxels) is exact in float32. The box holds every coordinate a plan reaches
        (``Augmenter.margin_yx``); the clamp only keeps a rounding slip inside the slice."""
        n, hs, ws = codes.shape
        within = torch.add(x.round(), y.round(), alpha=ws).to(torch.int32).clamp_(0, hs * ws - 1)
        flat = within + (rows.to(torch.int32) * (hs * ws))[:, None, None]
        # index_select, not codes[flat]: advanced indexing is ~20× slower on a CPU (measured).
        return codes.reshape(-1).index_select(0, flat.reshape(-1)).reshape(flat.shape)

    # -- labels --------------------------------------------------------------------------------------
    def smooth(self, label: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """Per slice: dilate 3×3, Gaussian σ (symmetric edges), dilate 3×3, > threshold (augment.smooth_labels)."""
        chosen = [i for i, f in enumerate(flags.tolist()) if f]
        if not chosen:
            return label
        b, z, h, w = label.shape
        x = label[chosen].reshape(len(chosen) * z, 1, h, w).float()
        if x.device.type == "cpu":
            smoothed = self._smooth_boxes(x)
        else:
            smoothed = self._smooth_slices(x)  # on a GPU: all slices at once, nothing waits
        out = label.clone()
        out[chosen] = smoothed.reshape(len(chosen), z, h, w)
        return out

    def _smooth_boxes(self, x: torch.Tensor) -> torch.Tensor:
        """On a CPU, as the numpy path: each slice's label bounding box grown by the filters' reach
        (beyond it every value is 0), so empty slices and empty space cost nothing."""
        out = torch.zeros_like(x, dtype=torch.bool)
        n, _, h, w = x.shape
        reach = 1 + (self.kernel.numel() - 1) // 2 + 1 + 2  # dilation, Gaussian, dilation, spare
        rows, cols = x[:, 0].any(dim=2), x[:, 0].any(dim=1)  # (n, H), (n, W)
        for k in rows.any(dim=1).nonzero().flatten().tolist():
            r, c = rows[k].nonzero().flatten(), cols[k].nonzero().flatten()
            y0, y1 = max(int(r[0]) - reach, 0), min(int(r[-1]) + 1 + reach, h)
            x0, x1 = max(int(c[0]) - reach, 0), min(int(c[-1]) + 1 + reach, w)
            out[k, :, y0:y1, x0:x1] = self._smooth_slices(x[k : k + 1, :, y0:y1, x0:x1])[0]
        return out

    def _smooth_slices(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(x, 3, stride=1, padding=1)  # binary dilation (outside counts as 0)
        r = (self.kernel.numel() - 1) // 2
        k = self.kernel
        x = F.conv2d(_symmetric_pad(x, r, dim=-1), k.view(1, 1, 1, -1))
        x = F.conv2d(_symmetric_pad(x, r, dim=-2), k.view(1, 1, -1, 1))
        x = F.max_pool2d(x, 3, stride=1, padding=1)  # grey dilation: a max, so any edge rule is the same
        return x > self.threshold

    # -- image ---------------------------------------------------------------------------------------
    def grayscale(self, image: torch.Tensor, plans: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per slice: ×contrast, +brightness, clip [0, 1], ^gamma — only where the plan has it."""
        if not bool(plans["has_gray"].any()):
            return image
        gray = plans["gray"].to(self.device, non_blocking=True)[:, :, :, None, None]  # (B, Z, 3, 1, 1)
        changed = torch.clamp(image * gray[:, :, 0] + gray[:, :, 1], 0.0, 1.0).pow(gray[:, :, 2])
        has = plans["has_gray"].to(self.device, non_blocking=True)[:, None, None, None]
        return torch.where(has, changed, image)

    def missing_part(self, image: torch.Tensor, plans: dict[str, torch.Tensor]) -> torch.Tensor:
        """A band across one slice (through (cy, cx) at an angle, a width) filled with the slice mean."""
        chosen = [i for i, f in enumerate(plans["has_part"].tolist()) if f]
        if not chosen:
            return image
        b, z, h, w = image.shape
        part = plans["part"][chosen].to(self.device, non_blocking=True)  # float64, as numpy computes the band
        k = plans["part"][chosen, 0].long().to(self.device, non_blocking=True)
        cy, cx, angle, width = (part[:, i, None, None] for i in range(1, 5))
        yy = torch.arange(h, dtype=torch.float64, device=self.device)[None, :, None]
        xx = torch.arange(w, dtype=torch.float64, device=self.device)[None, None, :]
        band = torch.abs((yy - cy) * torch.cos(angle) - (xx - cx) * torch.sin(angle)) <= width / 2
        index = torch.as_tensor(chosen).to(self.device, non_blocking=True)
        slices = image[index, k]  # (n, H, W)
        mean = slices.mean(dim=(1, 2), keepdim=True)
        out = image.clone()
        out[index, k] = torch.where(band, mean, slices)
        return out

    @staticmethod
    def flip(arrays: list[torch.Tensor], flips: torch.Tensor) -> list[torch.Tensor]:
        """Flips of z, y, x and the x–y transpose, per sample (augment.apply_flips)."""
        outs: list[list[torch.Tensor]] = [[] for _ in arrays]
        for i, (fz, fy, fx, transpose) in enumerate(flips.tolist()):
            dims = [d for d, f in zip((0, 1, 2), (fz, fy, fx)) if f]
            for out, a in zip(outs, arrays):
                s = a[i].flip(dims) if dims else a[i]
                out.append(s.transpose(1, 2) if transpose else s)
        return [torch.stack(out) for out in outs]


def _symmetric_pad(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Pad ``r`` voxels each side along ``dim`` by mirroring with the edge repeated (ndimage's "reflect")."""
    n = x.shape[dim]
    if r <= n:
        return torch.cat([x.narrow(dim, 0, r).flip(dim), x, x.narrow(dim, n - r, r).flip(dim)], dim=dim)
    index = torch.arange(-r, n + r, device=x.device)
    period = 2 * n
    index = torch.remainder(index, period)
    index = torch.where(index < n, index, period - 1 - index)
    return x.index_select(dim if dim >= 0 else x.dim() + dim, index)


__all__ = ["PLAN_KEYS", "TorchAugmenter", "gaussian_kernel", "pack_plans"]
