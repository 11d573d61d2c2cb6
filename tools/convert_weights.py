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
    if not source.is_file():
        print(f"error: --input {source} does not exist", file=sys.stderr)
        return 2
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same advice
        print(f"error: cannot read {source} as a tensor-only checkpoint: {error}", file=sys.stderr)
        return 2
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        cfg = load_config(CONFIGS / f"{args.arch}.yaml")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    converted = convert_torchvision_state_dict(state, cfg.model.rpn.objectness)
    model = build_model(cfg.model)
    result = model.load_state_dict(converted, strict=False)
    if result.missing_keys or result.unexpected_keys:
        print(
            f"error: {source} is not a torchvision {args.arch} checkpoint: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}",
            file=sys.stderr,
        )
        return 2
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "arch": args.arch}, output)
    print(f"wrote {output} ({len(converted)} tensors) for configs/torchvision/{args.arch}.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
