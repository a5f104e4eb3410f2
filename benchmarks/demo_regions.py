"""Where a demo model's operating point should be chosen: the regions of the training sample.

For runs of ``benchmarks/demo_sweep.py`` (their checkpoints and test sweeps), predict the whole
training sample once with the shipped predictor, then sweep each region as the demo sweeps — the
held-out sections, the whole sample, the trained sections — and look the chosen threshold and
minimum size up in the run's test sweep. Also counts each region's clefts and how many of their
voxels the model marks at p ≥ 252/255. One JSON line per (run, region) on stdout.

    EXP_DATA=<demo data folder> python benchmarks/demo_regions.py E14-w5-1200-s0 E16-w5-1200-s1

The rows of demo-experiments.md ("The operating point chosen on other regions") come from here.
"""
import json, os, sys
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

from cleftchunk.demo.pipeline import DemoSettings
from cleftchunk.model import ProbabilityModel, checkpoint_input_size, load_checkpoint, model_from_checkpoint
from cleftchunk.predict import predict_reference
from cleftchunk.train.operating_point import sweep, validation_arrays

HERE = Path(__file__).resolve().parent
data = Path(os.environ.get("EXP_DATA", str(HERE / "_data" / "demo-run" / "data")))
settings = DemoSettings()
z, held = settings.train_shape[0], 16  # the 16 sections the demo then held out of training (E14–E17)
REGIONS = {"held-out": slice(z - held, z), "sample": slice(0, z), "trained": slice(0, z - held)}

raw, gt, invalid, voxel_size = validation_arrays(str(data / "train.zarr/raw"), str(data / "train.zarr/clefts"), None)
for name in sys.argv[1:]:
    run = HERE / "_data" / "demo-sweep" / name
    ckpt = load_checkpoint(run / "model" / "last.pth")
    model = ProbabilityModel(model_from_checkpoint(ckpt)).eval()
    prob = predict_reference(model, raw, checkpoint_input_size(ckpt), batch_size=2)
    test = {(r["threshold"], r["min_size"]): r for r in json.load(open(run / "sweeps.json"))["test_best"]["thresholds"]}
    for region, sl in REGIONS.items():
        chosen = sweep(prob[sl], gt[sl], None if invalid is None else invalid[sl], voxel_size)
        t, m = chosen["threshold"], chosen["min_size"]
        on_test = test.get((t, m)) or test.get((t, 0))  # the test sweep holds min sizes at its own best t only
        cleft = gt[sl] > 0
        print(json.dumps({
            "run": name, "region": region, "clefts": int(ndi.label(cleft)[1]), "cleft_voxels": int(cleft.sum()),
            "cleft_voxels_at_252": int((cleft & (prob[sl] >= 252)).sum()), "chosen": [t, m],
            "region_score": [round(chosen["validation"]["cremi_score"], 1), round(chosen["validation"]["f1"], 3)],
            "test": [round(on_test["cremi_score"], 1), round(on_test["f1"], 3)], "test_min_size_looked_up": (t, m) in test,
        }), flush=True)
