"""cleftchunk: synaptic cleft detection in EM volumes of any size.

Stages, one module each, in the order data flows through them:
volumes → geometry → model → train → predict → segment → metrics.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from cleftchunk.errors import CleftchunkError  # noqa: E402
from cleftchunk.geometry import Block, ChunkGrid, Roi  # noqa: E402
from cleftchunk.io.volumes import Volume, create_volume, open_volume  # noqa: E402


def load_model(checkpoint_path: Any, device: Any = "cpu") -> Any:
    """Rebuild a trained model from a checkpoint file alone (eval mode, probabilities out)."""
    from cleftchunk.model import load_model as _load

    return _load(checkpoint_path, device=device)


__all__ = [
    "Block",
    "ChunkGrid",
    "CleftchunkError",
    "Roi",
    "Volume",
    "__version__",
    "create_volume",
    "load_model",
    "open_volume",
]
