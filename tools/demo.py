"""Run a detector on images and write pictures with boxes plus detections.json.

    python tools/demo.py --config C --weights W --input IMAGE_OR_FOLDER --output DIR

detections.json holds one entry per detection in COCO results form (``bbox`` as x, y, w, h in
original image pixels, ``score``, ``category_id`` as the dataset names it) plus ``file_name``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torchvision import tv_tensors
from torchvision.io import write_jpeg

from frcnn.build import build_model, category_mapping
from frcnn.config import ConfigError, load_config
from frcnn.datasets import build_transforms, read_image
from frcnn.engine import CheckpointError, load_weights_file
from frcnn.engine.distributed import resolve_device
from frcnn.engine.visualize import draw_boxes

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def list_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    raise FileNotFoundError(f"--input {path} is neither an image nor a folder")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Detect objects in images.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--input", required=True, help="an image or a folder of images")
    parser.add_argument("--output", required=True, help="folder for pictures and detections.json")
    parser.add_argument("--score-thresh", type=float, default=0.5, help="drawn boxes only")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.opts)
        images = list_images(Path(args.input))
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    device = resolve_device(cfg.device)
    model = build_model(cfg.model).to(device).eval()
    load_weights_file(model, args.weights, allow_head_reinit=False)
    class_names, label_to_category = category_mapping(cfg)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    # the evaluation's own resize, so the demo sees what tools/test.py scores
    resize = build_transforms(cfg.data.test_min_size, cfg.data.test_max_size, 0.0, is_train=False)
    results = []
    for path in images:
        image = read_image(path)
        height, width = image.shape[-2:]
        resized = resize(tv_tensors.Image(image)).as_subclass(torch.Tensor)
        with torch.inference_mode():
            det = model([resized.to(device)], original_sizes=[(height, width)])[0]
        det = det.to("cpu")
        for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist()):
            x1, y1, x2, y2 = box
            results.append(
                {
                    "file_name": path.name,
                    "category_id": label_to_category.get(label, label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": score,
                }
            )
        keep = det.scores >= args.score_thresh
        drawn = draw_boxes(
            image, det.boxes[keep], det.labels[keep], det.scores[keep], "red", class_names or None
        )
        write_jpeg(drawn, str(output / f"{path.stem}.jpg"), quality=90)
    (output / "detections.json").write_text(json.dumps(results, indent=1))
    print(f"{len(images)} image(s), {len(results)} detection(s) written to {output}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, FileNotFoundError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
