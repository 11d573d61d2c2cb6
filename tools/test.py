"""Evaluate trained weights on the test set of a config.

    python tools/test.py --config configs/quickstart.yaml \
        --weights outputs/quickstart/checkpoints/model_final.pth
    torchrun --nproc_per_node=8 tools/test.py --config C --weights W
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from frcnn.build import build_model, make_evaluate_fn, prepare_data
from frcnn.config import ConfigError, load_config
from frcnn.engine import CheckpointError, init_distributed, load_weights_file
from frcnn.engine.distributed import (
    destroy,
    get_rank,
    is_main_process,
    wait_for_main_process,
)
from frcnn.engine.logger import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evaluate Faster R-CNN weights.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--weights", required=True, help="an frcnn checkpoint (.pth)")
    parser.add_argument("--output-dir", default=None, help="where metrics.json goes")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.opts)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    device = init_distributed(cfg.device)
    output_dir = Path(args.output_dir or cfg.output_dir)
    if is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        prepare_data(cfg)
    setup_logging(output_dir, get_rank())
    wait_for_main_process()
    model = build_model(cfg.model).to(device)
    load_weights_file(model, args.weights, allow_head_reinit=False)
    results = make_evaluate_fn(cfg, device)(model)
    if is_main_process():
        summary = {
            name: {k: v for k, v in m.items() if not k.startswith("per_class")}
            for name, m in results.items()
        }
        print(json.dumps(summary, indent=2, default=float))
        (output_dir / "metrics.json").write_text(json.dumps(results, indent=2, default=float))
    destroy()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, FileNotFoundError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
