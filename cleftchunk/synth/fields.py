"""Random fields that are pure functions of (seed, stream, integer coordinates).

The synthetic generator must give byte-identical voxels whatever region it is asked for, so it
never draws from a random stream whose state depends on the traversal order. Instead every
random number is a counter-based hash of its integer key (splitmix64 finalizer), and smooth
fields are value noise: hashed lattice values interpolated with elementwise arithmetic only
(no BLAS, no reductions, no transcendental functions), so that a voxel's value does not depend
on the shape of the array it is computed in.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_TWO_POW_M53 = 2.0**-53
_TWO_POW_M32 = np.float32(2.0**-32)
_LOW32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)


def _as_u64(values) -> np.ndarray:
    """Integers (possibly negative) as uint64 bit patterns, at least 1-d so numpy wraps silently."""
    a = np.asarray(values)
    if a.dtype != np.uint64:
        a = np.atleast_1d(a.astype(np.int64)).view(np.uint64)
    return np.atleast_1d(a)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a bijective, well-mixed scramble of uint64 values."""
    x = x ^ (x >> _S30)
    x = x * _MIX1
    x = x ^ (x >> _S27)
    x = x * _MIX2
    return x ^ (x >> _S31)


def hash_key(seed: int, stream: int, *coords) -> np.ndarray:
    """uint64 hash of (seed, stream, coords...); coords broadcast against each other."""
    with np.errstate(over="ignore"):
        h = mix64(_as_u64(seed) * _GOLDEN + _as_u64(stream))
        for c in coords:
            h = mix64(h ^ (_as_u64(c) * _GOLDEN))
    return h


def uniform(h: np.ndarray) -> np.ndarray:
    """float64 in [0, 1) from the top 53 bits of a hash."""
    return (h >> np.uint64(11)).astype(np.float64) * _TWO_POW_M53


def rand(seed: int, stream: int, *coords) -> np.ndarray:
    """Uniform [0, 1) numbers keyed by integer coordinates."""
    return uniform(hash_key(seed, stream, *coords))


def voxel_noise(seed: int, stream: int, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per-voxel zero-mean noise (sum of two uniforms, std 1) as float32 of shape (Z, Y, X).

    One hash per voxel: the section key is hashed once, then combined with the in-plane
    position, which keeps this cheap enough to run on every voxel.
    """
    with np.errstate(over="ignore"):
        key_z = hash_key(seed, stream, z)[:, None, None]
        yx = (_as_u64(y)[:, None] * np.uint64(0x100000001B3)) ^ _as_u64(x)[None, :]
        h = mix64(key_z + yx[None])
    low = (h & _LOW32).astype(np.float32) * _TWO_POW_M32
    high = (h >> _S32).astype(np.float32) * _TWO_POW_M32
    # The sum of two uniforms has variance 1/6; scale to unit std.
    return (low + high - np.float32(1.0)) * np.float32(2.449489742783178)


def _lattice_weights(coords: np.ndarray, spacing: int) -> tuple[np.ndarray, np.ndarray]:
    """Lattice cell index of each coordinate and its smoothstep weight within the cell."""
    coords = np.asarray(coords, dtype=np.int64)
    cell = np.floor_divide(coords, spacing)
    t = (coords - cell * spacing).astype(np.float32) / np.float32(spacing)
    return cell, t * t * (np.float32(3.0) - np.float32(2.0) * t)


def value_noise(
    seed: int, stream: int, z: np.ndarray, y: np.ndarray, x: np.ndarray, spacing: Sequence[int]
) -> np.ndarray:
    """Smooth noise in [-0.5, 0.5) on the grid z × y × x (1-d integer coordinate arrays).

    Lattice values are hashed at multiples of ``spacing`` and interpolated with smoothstep
    weights one axis at a time, each output element by the same fixed sequence of float32
    operations, so any sub-grid gives exactly the same values as the whole grid.
    """
    out_axes = []
    for coords, s in zip((z, y, x), spacing):
        cell, w = _lattice_weights(coords, int(s))
        base = int(cell.min())
        out_axes.append((cell - base, w, base, int(cell.max()) - base + 2))
    (iz, wz, bz, nz), (iy, wy, by, ny), (ix, wx, bx, nx) = out_axes
    lz = np.arange(bz, bz + nz)[:, None, None]
    ly = np.arange(by, by + ny)[None, :, None]
    lx = np.arange(bx, bx + nx)[None, None, :]
    lattice = (rand(seed, stream, lz, ly, lx) - 0.5).astype(np.float32)
    v = _lerp(lattice[:, :, ix], lattice[:, :, ix + 1], wx[None, None, :])
    v = _lerp(v[:, iy, :], v[:, iy + 1, :], wy[None, :, None])
    return _lerp(v[iz], v[iz + 1], wz[:, None, None])


def _lerp(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    return a + (b - a) * w


def value_noise_at(seed: int, stream: int, points: np.ndarray, spacing: Sequence[int]) -> np.ndarray:
    """:func:`value_noise` at scattered integer points (n, 3), same arithmetic as on a grid."""
    points = np.asarray(points, dtype=np.int64).reshape(-1, 3)
    cells, weights = zip(*(_lattice_weights(points[:, a], int(s)) for a, s in enumerate(spacing)))
    (cz, cy, cx), (wz, wy, wx) = cells, weights

    def corner(dz, dy, dx):
        return (rand(seed, stream, cz + dz, cy + dy, cx + dx) - 0.5).astype(np.float32)

    v = {(dz, dy): _lerp(corner(dz, dy, 0), corner(dz, dy, 1), wx) for dz in (0, 1) for dy in (0, 1)}
    v0 = _lerp(v[0, 0], v[0, 1], wy)
    v1 = _lerp(v[1, 0], v[1, 1], wy)
    return _lerp(v0, v1, wz)
