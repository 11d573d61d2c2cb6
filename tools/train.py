"""Train a detector from a YAML config, on CPU, one GPU, or many through torchrun.

python tools/train.py --config configs/quickstart.yaml
python tools/train.py --config C --output-dir D --resume --opts solver.base_lr=0.01
torchrun --nproc_per_node=8 tools/train.py --config C
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from frcnn.build import build_model, build_trainer, check_training_data, prepare_data
from frcnn.config import ConfigError, dump_config, load_config, with_overrides
from frcnn.datasets.check import DatasetCheckError
from frcnn.engine import (
    CheckpointError,
    init_distributed,
    load_weights_file,
    wrap_ddp,
)
from frcnn.engine.distributed import (
    broadcast_object,
    destroy,
    get_rank,
    get_world_size,
    is_main_process,
    wait_for_main_process,
)
from frcnn.engine.logger import setup_logging
from frcnn.engine.seed import seed_all, set_deterministic

logger = logging.getLogger("frcnn.train")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train Faster R-CNN.")
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--output-dir", default=None, help="overrides output_dir of the config")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument(
        "--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.opts)
        if args.output_dir:
            cfg = with_overrides(cfg, [f"output_dir={args.output_dir}"])
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    device = init_distributed(cfg.device)
    seed_all(cfg.seed, get_rank())
    set_deterministic(cfg.deterministic)
    output_dir = Path(cfg.output_dir)
    train_fixes = None
    if is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, output_dir / "config.yaml")
        prepare_data(cfg)
        setup_logging(output_dir)  # the dataset check's report goes to log.txt too
        train_fixes = check_training_data(cfg, output_dir / "dataset_check_train.json")
    wait_for_main_process()
    # every rank builds the training set with the image verdicts rank 0 found
    train_fixes = broadcast_object(train_fixes)

    model = build_model(cfg.model).to(device)
    if cfg.model.weights:
        load_weights_file(model, cfg.model.weights, allow_head_reinit=True)
    if get_world_size() > 1:
        model = wrap_ddp(model, device)
    trainer = build_trainer(cfg, model, device, output_dir, train_fixes)
    trainer.resume_or_load(args.resume)
    outcome = trainer.train()
    if not outcome.completed:
        logger.info(
            "Stopped by %s at iteration %d; continue with --resume",
            outcome.stop_signal,
            outcome.iteration,
        )
        return 130 if outcome.stop_signal == "SIGINT" else 143
    destroy()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, FileNotFoundError, DatasetCheckError, CheckpointError) as error:
        # a clear message, not a traceback from deep inside, for mistakes in the inputs
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
