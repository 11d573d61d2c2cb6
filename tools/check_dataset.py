"""Check the datasets of a config: every annotation record and every image header.

    python tools/check_dataset.py --config configs/quickstart.yaml
    python tools/check_dataset.py --config C --split train --strict --json report.json

Prints, per kind of problem, a count and the first examples (file, image id, annotation id) and
what lenient training does about it. Exit status: 0 when training can use the data (with
--strict: when there is no error at all), 1 otherwise, 2 for a bad config or a missing path.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from frcnn.build import check_data, prepare_data
from frcnn.config import ConfigError, load_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Check the datasets of a config.")
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument(
        "--split", choices=("train", "test", "all"), default="all", help="which dataset(s)"
    )
    parser.add_argument(
        "--strict", action="store_true", help="fail on any error, as data.check=strict does"
    )
    parser.add_argument("--json", default=None, help="write every problem found to this file")
    parser.add_argument(
        "--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.opts)
        prepare_data(cfg)
        splits = ("train", "test") if args.split == "all" else (args.split,)
        reports = [check_data(cfg, split).report for split in splits]
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failed = False
    for report in reports:
        print(report.format())
        if args.strict and report.first_error is not None:
            print(f"error: {report.strict_message()}", file=sys.stderr)
            failed = True
        elif not report.usable:
            print(f"error: {report.name}: {report.lenient_summary()}", file=sys.stderr)
            failed = True
    if args.json:
        payload = {report.name: report.to_dict() for report in reports}
        Path(args.json).write_text(json.dumps(payload, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
