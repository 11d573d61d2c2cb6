"""Plain-text tables of evaluation results, printed by the engine after every evaluation."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

# Pairs of (class, AP) columns side by side: a long class list stays short on screen.
_NUM_COLUMN_PAIRS = 3


def format_per_class_table(per_class: Mapping[str, float], title: str) -> str:
    """An aligned table of per-class APs, up to three (class, AP) column pairs per row.

    Undefined APs (NaN: no ground truth of that class) print as ``nan``.
    """
    if not per_class:
        return f"{title}\n(no classes)"
    pairs = [(name, _format_number(value)) for name, value in per_class.items()]
    num_pairs = min(_NUM_COLUMN_PAIRS, len(pairs))
    rows = [
        [cell for pair in pairs[start : start + num_pairs] for cell in pair]
        for start in range(0, len(pairs), num_pairs)
    ]
    rows[-1] += [""] * (2 * num_pairs - len(rows[-1]))
    return f"{title}\n{_render(['class', 'AP'] * num_pairs, rows)}"


def format_metrics_table(metrics: Mapping[str, object], title: str) -> str:
    """A one-row table of the scalar metrics (nested per-class dicts are skipped)."""
    scalars = {key: value for key, value in metrics.items() if isinstance(value, (int, float))}
    row = [_format_number(float(value)) for value in scalars.values()]  # type: ignore[arg-type]
    return f"{title}\n{_render(list(scalars), [row])}"


def format_results(results: Mapping[str, object], title: str) -> str:
    """The scalar metrics, then one per-class table for every ``per_class*`` entry."""
    parts = [format_metrics_table(results, title)]
    for key, value in results.items():
        if key.startswith("per_class") and isinstance(value, Mapping):
            parts.append(format_per_class_table(value, f"{title}: {key}"))
    return "\n\n".join(parts)


def _format_number(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.3f}"


def _render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    columns = [header, *rows]
    widths = [max(len(row[index]) for row in columns) for index in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(width) if _is_number(cell) else cell.ljust(width)
            for cell, width in zip(cells, widths)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True
