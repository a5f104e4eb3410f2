"""Training: loss, optimizers, the loop, checkpoints, logging, validation, and several GPUs.

``train(config) -> Path`` runs a whole training and returns ``<output>/last.pth``. The defaults are
the original pipeline's (see shared/reference/pipeline-facts.md): class-rebalanced BCE, Adam with
amsgrad and reduce-on-plateau, checkpoints ``volume_<iteration>.pth`` every ``iteration_save``
iterations and at the end. Options: a Dice term, AdamW + cosine decay, an EMA of the weights.

With an EMA (``ema`` = its decay, e.g. 0.999), the checkpoint's ``model`` entry holds the EMA
weights — the ones prediction loads — and ``model_raw`` the weights being trained (for resuming).

Determinism: the model is initialised from ``seed``; batch ``b`` is a pure function of (seed, b)
(see :mod:`cleftchunk.train.data`), so ``--resume`` from ``last.pth`` continues exactly: on the CPU with
the same settings, a resumed run ends with bitwise the same weights as an uninterrupted one.

Logging: TensorBoard event files under ``log_dir`` (default ``runs/<output folder name>``, so that
``tensorboard --logdir runs`` run where training was started shows it): loss, learning rate,
samples/s, image panels (input | label | prediction) of three sections, validation metrics; a tqdm
progress bar with iteration, loss, samples/s and ETA.

Several processes: DistributedDataParallel with synchronized batch norm on GPUs (``gpus`` = N:
the command spawns N processes; under ``torchrun`` the environment's ranks are used). ``batch_size``
is the global batch (the tutorial's ``-b 8 -g 4`` = 2 crops per GPU). ``cpu_processes`` = N runs
the same code path on the CPU with the gloo backend (plain per-process batch norm, which
SyncBatchNorm does not support on the CPU); it exists to test the multi-process path, not for speed.
"""

from cleftchunk.train.config import TrainConfig, load_yaml_config
from cleftchunk.train.distributed import free_port
from cleftchunk.train.loop import train
from cleftchunk.train.loss import dice_loss, training_loss, weighted_bce
from cleftchunk.train.optim import make_optimizer
from cleftchunk.train.trainer import TrainingInterrupted

__all__ = [
    "TrainConfig",
    "TrainingInterrupted",
    "dice_loss",
    "free_port",
    "load_yaml_config",
    "make_optimizer",
    "train",
    "training_loss",
    "weighted_bce",
]
