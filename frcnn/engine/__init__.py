"""Training and inference machinery: loop, optimizer and schedule, checkpoints, processes."""

from frcnn.engine.checkpoint import (
    Checkpointer,
    CheckpointError,
    load_checkpoint,
    load_model_weights,
    load_weights_file,
)
from frcnn.engine.distributed import init_distributed, unwrap_model, wrap_ddp
from frcnn.engine.inference import inference_on_dataset
from frcnn.engine.optim import build_lr_scheduler, build_optimizer
from frcnn.engine.seed import seed_all, set_deterministic
from frcnn.engine.trainer import Trainer, TrainOutcome
from frcnn.engine.visualize import draw_detection_panels

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "TrainOutcome",
    "Trainer",
    "build_lr_scheduler",
    "build_optimizer",
    "draw_detection_panels",
    "inference_on_dataset",
    "init_distributed",
    "load_checkpoint",
    "load_model_weights",
    "load_weights_file",
    "seed_all",
    "set_deterministic",
    "unwrap_model",
    "wrap_ddp",
]
