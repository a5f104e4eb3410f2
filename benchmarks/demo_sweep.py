"""Training recipes for the demo, fast: train (the demo's recipe + overrides), choose the operating
point on the validation sample as the demo does, then score the test sample in this process with
the shipped predictor (predict_reference) and the CREMI metrics. One JSON line per recipe goes to
benchmarks/results/demo-sweep.jsonl; the run's sweeps to <work>/<name>/sweeps.json. (E0–E19 in
demo-experiments.md ran an earlier form of this script, which chose on the training sample.)

    python benchmarks/demo_sweep.py NAME '{"iterations": 500, "threads": 1}' '{"max_weight": 1, "dice": 1}'

argument 2: DemoSettings fields; argument 3: extra training-config keys. EXP_DATA: a demo data
folder (train.zarr, validate.zarr, test.zarr; default: seed 0's data from benchmarks/demo_seeds.py), or
"synth": synthesize the samples the settings describe (e.g. a larger train_shape) into the run's folder.
"test_best" (the best threshold on the test sample) is a diagnostic of what the model could reach,
never an operating point: the demo chooses on the validation sample only. "train_voxel_ap" ranks the training sample
the same way (the gap to test_voxel_ap: what does not carry over to new data).
"""
import dataclasses, json, os, sys, time, resource
from pathlib import Path
import numpy as np
from cleftchunk.demo.pipeline import Demo, DemoSettings
from cleftchunk.train import train
from cleftchunk.train.operating_point import choose_operating_point, sweep, validation_arrays
from cleftchunk.model import ProbabilityModel, checkpoint_input_size, load_checkpoint, model_from_checkpoint
from cleftchunk.predict import predict_reference

def cpu():
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

name, settings_over, config_over = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3] if len(sys.argv) > 3 else "{}")
data = os.environ.get("EXP_DATA", str(Path(__file__).resolve().parent / "_data" / "demo-seeds" / "demo-seed-0" / "data"))
folder = Path(__file__).resolve().parent / "_data" / "demo-sweep" / name
import shutil; shutil.rmtree(folder, ignore_errors=True)
s = dataclasses.replace(DemoSettings(), **{k: tuple(v) if isinstance(v, list) else v for k, v in settings_over.items()})
s = dataclasses.replace(s, threads=s.threads or 2, loader_workers=s.loader_workers if s.loader_workers is not None else 0)
demo = Demo(folder, s, overwrite=True)
if data == "synth":  # the samples these settings describe (seed, shapes), synthesized here
    for stage in ("synthesize", "convert"):
        with demo.stage(stage) as detail:
            getattr(demo, stage)(detail)
    data = demo.data
else:
    data = Path(data).resolve()
    shutil.rmtree(demo.data, ignore_errors=True); demo.data.symlink_to(data)
config = demo.train_config(); config.update(config_over)
t0, c0 = time.perf_counter(), cpu()
ckpt = train(config, resume=False, overwrite=True)
t_train, c_train = time.perf_counter() - t0, cpu() - c0
point = choose_operating_point(ckpt, config["validate_image"], config["validate_labels"], None, batch_size=2,
                               tolerance=s.operating_point_tolerance)
ck = load_checkpoint(ckpt)
model = ProbabilityModel(model_from_checkpoint(ck)).eval()
raw, gt, invalid, vs = validation_arrays(str(data / "test.zarr/raw"), str(data / "test.zarr/clefts"), None)
prob = predict_reference(model, raw, checkpoint_input_size(ck), batch_size=2)
chosen = sweep(prob, gt, invalid, vs, thresholds=[point["threshold"]], min_sizes=[point["min_size"]])["validation"]
best = sweep(prob, gt, invalid, vs)
def ap(prob, gt):
    order = np.argsort(-prob.ravel(), kind="stable"); y = gt.ravel()[order]
    tp = np.cumsum(y); prec = tp / np.arange(1, len(y) + 1)
    return float((prec * y).sum() / max(y.sum(), 1))
row = {"name": name, "settings": settings_over, "config": config_over, "train_s": round(t_train), "train_cpu": round(c_train),
       "op": [point["threshold"], point["min_size"]], "near_best": point["near_best"], "val": [round(point["validation"]["cremi_score"],1), round(point["validation"]["f1"],3)],
       "test_chosen": [round(chosen["cremi_score"],1), round(chosen["f1"],3), round(chosen["precision"],3), round(chosen["recall"],3)],
       "test_best": [best["threshold"], best["min_size"], round(best["validation"]["cremi_score"],1), round(best["validation"]["f1"],3)],
       "test_voxel_ap": round(ap(prob.astype(np.float32), gt), 4), "load": os.getloadavg()[0]}
# The same ranking on the sample the model trained on: the gap between the two is how much of what
# it learned does not carry over to new data.
raw, gt, invalid, vs = validation_arrays(str(data / "train.zarr/raw"), str(data / "train.zarr/clefts"), None)
row["train_voxel_ap"] = round(ap(predict_reference(model, raw, checkpoint_input_size(ck), batch_size=2).astype(np.float32), gt), 4)
print(json.dumps(row))
json.dump({"row": row, "val_sweep": point, "test_best": best}, open(folder / "sweeps.json", "w"), indent=1)
with open(Path(__file__).resolve().parent / "results" / "demo-sweep.jsonl", "a") as f: f.write(json.dumps(row) + "\n")
