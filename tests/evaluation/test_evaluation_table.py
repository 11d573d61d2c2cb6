"""The per-class and metric tables printed after every evaluation."""

from __future__ import annotations

import math

from frcnn.evaluation import format_metrics_table, format_per_class_table, format_results


def test_per_class_table_has_three_column_pairs_and_aligned_rows():
    per_class = {"person": 52.3456, "bicycle": 7.0, "car": math.nan, "toothbrush": 100.0}
    text = format_per_class_table(per_class, "Per-class AP")
    lines = text.splitlines()
    assert lines[0] == "Per-class AP"
    header = [cell.strip() for cell in lines[1].strip("|").split("|")]
    assert header == ["class", "AP"] * 3
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[3:]]
    assert rows == [
        ["person", "52.346", "bicycle", "7.000", "car", "nan"],
        ["toothbrush", "100.000", "", "", "", ""],
    ]
    assert len({len(line) for line in lines[1:]}) == 1  # every row as wide as the header


def test_short_and_empty_tables():
    lines = format_per_class_table({"cat": 50.0}, "t").splitlines()
    assert [c.strip() for c in lines[1].strip("|").split("|")] == ["class", "AP"]
    assert format_per_class_table({}, "t") == "t\n(no classes)"


def test_results_print_scalars_then_every_per_class_table():
    results = {
        "mAP_07": 72.0,
        "mAP": 70.5,
        "per_class_07": {"cat": 68.0, "dog": 76.0},
        "per_class": {"cat": 66.0, "dog": 75.0},
    }
    metrics = format_metrics_table(results, "voc").splitlines()
    assert [c.strip() for c in metrics[1].strip("|").split("|")] == ["mAP_07", "mAP"]
    assert [c.strip() for c in metrics[3].strip("|").split("|")] == ["72.000", "70.500"]
    text = format_results(results, "voc")
    assert "voc: per_class_07" in text and "voc: per_class" in text
    assert text.index("68.000") < text.index("66.000")
