"""Turn a torchvision Faster R-CNN checkpoint on local disk into an frcnn checkpoint.

    python tools/convert_weights.py --arch fasterrcnn_resnet50_fpn --input TV.pth --output OUT.pth

then name OUT.pth in ``model.weights`` of configs/torchvision/<arch>.yaml. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from frcnn.build import build_model
from frcnn.config import ConfigError, load_config
from frcnn.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_weights,
    model_state_from_checkpoint,
)
from frcnn.modeling.weight_import import convert_torchvision_state_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "torchvision"
ARCHS = ("fasterrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_fpn")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, choices=ARCHS)
    parser.add_argument("--input", required=True, help="torchvision state_dict (.pth)")
    parser.add_argument("--output", required=True, help="frcnn checkpoint to write")
    args = parser.parse_args(argv)
    source = Path(args.input)
    try:
        cfg = load_config(CONFIGS / f"{args.arch}.yaml")
        state = model_state_from_checkpoint(load_checkpoint(source))
        converted = convert_torchvision_state_dict(dict(state), cfg.model.rpn.objectness)
        model = build_model(cfg.model)
        load_model_weights(model, converted, allow_head_reinit=False, source=str(source))
    except CheckpointError as error:
        print(
            f"error: {source} is not a torchvision {args.arch} checkpoint: {error}", file=sys.stderr
        )
        return 2
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "arch": args.arch}, output)
    print(f"wrote {output} ({len(converted)} tensors) for configs/torchvision/{args.arch}.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
