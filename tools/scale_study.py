"""How training-step time and peak memory grow with image size, ground-truth boxes per image and
batch size, for frcnn and torchvision's FasterRCNN side by side (tools/benchmark.py's models,
inputs and measurements, one point at a time).

    python tools/scale_study.py --arch quickstart --markdown scale.md --json scale.json

Each point varies one axis from the base point (``--base-size``, ``--base-gt``, ``--base-batch``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmark  # noqa: E402


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,10,100, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(benchmark.CONFIGS), default="quickstart")
    parser.add_argument("--sizes", type=_int_list, default=[400, 640, 800, 1024, 1333])
    parser.add_argument("--gt-boxes", type=_int_list, default=[1, 10, 100, 1000])
    parser.add_argument("--batches", type=_int_list, default=[1, 2, 4, 8])
    parser.add_argument("--base-size", type=int, default=400)
    parser.add_argument("--base-gt", type=int, default=10)
    parser.add_argument("--base-batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory columns")
    parser.add_argument(
        "--malloc",
        choices=benchmark.MALLOC_CHOICES,
        default=benchmark.MALLOC_CHOICES[0],
        help="as tools/benchmark.py's",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    for path in (args.json, args.markdown):
        if path is not None and not path.parent.is_dir():
            parser.error(f"{path}: folder {path.parent} does not exist")
    return args


def points(args: argparse.Namespace) -> list[tuple[str, int, int, int]]:
    """(axis, size, gt boxes, batch) for every point of the study."""
    base = (args.base_size, args.base_gt, args.base_batch)
    grid = [("image size", size, base[1], base[2]) for size in args.sizes]
    grid += [("gt boxes", base[0], gt, base[2]) for gt in args.gt_boxes]
    grid += [("batch", base[0], base[1], batch) for batch in args.batches]
    return grid


def measure(args: argparse.Namespace, size: int, gt: int, batch: int) -> dict[str, float]:
    argv = ["--arch", args.arch, "--size", str(size), "--gt-boxes", str(gt)]
    argv += ["--batch", str(batch), "--iters", str(args.iters), "--warmup", str(args.warmup)]
    argv += ["--malloc", args.malloc]
    point = benchmark.parse_args(argv)
    device = benchmark.pick_device(point.device)
    ours, theirs = benchmark.build_pair(point, device)
    num_classes = ours.roi_heads.box_predictor.cls_score.out_features - 1
    inputs = benchmark.make_inputs(point, num_classes, device)
    train = benchmark.train_steps(ours, theirs, inputs, device, point.amp)
    times = benchmark.alternate(train, point.warmup, point.iters, device)
    result = {f"step_{side}": value for side, value in times.items()}
    if not args.no_memory:
        peaks = benchmark.measure_memory(point, argv, train, device)
        result.update({f"memory_{side}": value for side, value in peaks.items()})
    return result


def to_markdown(rows: list[dict], with_memory: bool) -> str:
    header = "| axis | value | step frcnn (s) | step torchvision (s) | ratio |"
    rule = "| --- | --- | --- | --- | --- |"
    if with_memory:
        header += " peak MB frcnn | peak MB torchvision | ratio |"
        rule += " --- | --- | --- |"
    lines = [header, rule]
    for row in rows:
        step_ratio = row["step_frcnn"] / row["step_torchvision"]
        line = (
            f"| {row['axis']} | {row['value']} | {row['step_frcnn']:.3f} | "
            f"{row['step_torchvision']:.3f} | {step_ratio:.2f} |"
        )
        if with_memory:
            mem_ratio = row["memory_frcnn"] / max(row["memory_torchvision"], 1e-9)
            line += (
                f" {row['memory_frcnn']:.0f} | {row['memory_torchvision']:.0f} | {mem_ratio:.2f} |"
            )
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    grid = points(args)
    for index, (axis, size, gt, batch) in enumerate(grid, 1):
        start = time.perf_counter()
        value = {"image size": size, "gt boxes": gt, "batch": batch}[axis]
        row = {"axis": axis, "value": value, "size": size, "gt_boxes": gt, "batch": batch}
        row.update(measure(args, size, gt, batch))
        rows.append(row)
        took = time.perf_counter() - start
        print(f"[{index}/{len(grid)}] {axis}={value}: {json.dumps(row)} ({took:.0f} s)", flush=True)
    table = to_markdown(rows, not args.no_memory)
    print(table)
    settings = {
        "arch": args.arch,
        "base": {"size": args.base_size, "gt_boxes": args.base_gt, "batch": args.base_batch},
        "iters": args.iters,
        "warmup": args.warmup,
        "hardware": benchmark.hardware(benchmark.pick_device("auto")),
        "torch": torch.__version__,
    }
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "settings": settings}, indent=1))
    if args.markdown is not None:
        args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
