"""The prediction engine in steady state: a null model (sigmoid of the input) over 256×1024×1024
uint8, overlap 0.5, on the default path (task threads in this process), in a warm process (imports
and a first run done), CPU seconds of the ``predict`` call alone, one and two task threads
alternated twice. Prints one JSON line per run (M output voxels per CPU-second and per second).

    python benchmarks/predict_steady.py        # about a minute on 2 cores, idle
"""

from __future__ import annotations

import json
import time

import torch

from cleftchunk.predict import OutputOptions, WindowOptions, predict
from cleftchunk.run.options import RunOptions
from predict import WORK, random_volume


class Null(torch.nn.Module):
    def forward(self, x):
        return torch.sigmoid(x)


def main() -> None:
    shape = (256, 1024, 1024)
    spec = random_volume(shape, (16, 256, 256))
    warm = random_volume((16, 512, 512), (16, 256, 256))
    window, run = WindowOptions((8, 256, 256), overlap=0.5), RunOptions(overwrite=True, progress=False)
    predict(Null(), warm, str(WORK / "steady_warm.zarr" / "pred"), window, run, log=lambda m: None)
    voxels = shape[0] * shape[1] * shape[2]
    for cores in (1, 2, 1, 2):
        wall, cpu = time.perf_counter(), time.process_time()
        predict(Null(), spec, str(WORK / "steady.zarr" / "pred"), window, run, OutputOptions(cores=cores), log=lambda m: None)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(json.dumps({"task_threads": cores, "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
                          "M_vox_per_cpu_s": round(voxels / cpu / 1e6, 1), "M_vox_per_s": round(voxels / wall / 1e6, 1)}), flush=True)


if __name__ == "__main__":
    main()
