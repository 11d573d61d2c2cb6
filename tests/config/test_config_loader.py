"""YAML reading, _base_ inheritance, --opts overrides and round trips of frcnn.config."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from frcnn.config import (
    Config,
    ConfigError,
    config_to_dict,
    dump_config,
    load_config,
    with_overrides,
)

# --- defaults --------------------------------------------------------------------------------


def test_empty_file_gives_the_dataclass_defaults(write_yaml):
    assert load_config(write_yaml("empty.yaml", "")) == Config()
    assert load_config(write_yaml("braces.yaml", "{}")) == Config()


def test_a_partial_section_keeps_the_other_defaults(write_yaml):
    cfg = load_config(write_yaml("x.yaml", "solver:\n  base_lr: 0.5\n"))
    assert cfg.solver == dataclasses.replace(Config().solver, base_lr=0.5)
    assert cfg.model == Config().model


def test_importing_the_config_package_does_not_import_torch():
    code = "import sys, frcnn.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


# --- _base_ inheritance ----------------------------------------------------------------------


@pytest.fixture
def three_levels(write_yaml):
    write_yaml(
        "configs/_base_/root.yaml",
        """
        solver: {base_lr: 0.1, max_iter: 100, steps: [10, 20, 30]}
        model: {num_classes: 3, rpn: {nms_thresh: 0.6, pre_nms_topk_test: 500}}
        """,
    )
    write_yaml(
        "configs/_base_/mid.yaml",
        """
        _base_: root.yaml
        solver: {max_iter: 50}
        model: {rpn: {nms_thresh: 0.65}}
        """,
    )
    return write_yaml(
        "configs/exp/top.yaml",
        """
        _base_: ../_base_/mid.yaml
        solver:
          steps: [40]
        model:
          rpn:
            post_nms_topk_test: 300
        """,
    )


def test_two_levels_of_bases_with_relative_paths_merge_dicts(three_levels):
    cfg = load_config(three_levels)
    assert cfg.solver.base_lr == 0.1  # from root, untouched by mid and top
    assert cfg.solver.max_iter == 50  # mid overrides root
    assert cfg.model.num_classes == 3
    rpn = cfg.model.rpn
    assert (rpn.nms_thresh, rpn.pre_nms_topk_test, rpn.post_nms_topk_test) == (0.65, 500, 300)
    assert rpn.fg_iou_thresh == Config().model.rpn.fg_iou_thresh  # never set: default


def test_lists_replace_instead_of_merging(three_levels):
    assert load_config(three_levels).solver.steps == [40]


def test_bases_resolve_relative_to_the_including_file_not_the_cwd(
    three_levels, tmp_path, monkeypatch
):
    expected = load_config(three_levels)
    monkeypatch.chdir(tmp_path / "configs" / "exp")
    assert load_config("top.yaml") == expected
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/exp/top.yaml") == expected


def test_a_list_of_bases_applies_in_order_and_absolute_paths_work(write_yaml):
    first = write_yaml("a.yaml", "solver: {base_lr: 0.1, gamma: 0.5}\n")
    write_yaml("b.yaml", "solver: {base_lr: 0.2}\n")
    top = write_yaml("sub/top.yaml", f"_base_: ['{first}', ../b.yaml]\n")
    cfg = load_config(top)
    assert (cfg.solver.base_lr, cfg.solver.gamma) == (0.2, 0.5)


def test_a_base_shared_by_two_bases_is_not_a_cycle(write_yaml):
    write_yaml("common.yaml", "seed: 7\n")
    write_yaml("left.yaml", "_base_: common.yaml\nlog_period: 5\n")
    write_yaml("right.yaml", "_base_: common.yaml\n")
    cfg = load_config(write_yaml("top.yaml", "_base_: [left.yaml, right.yaml]\n"))
    assert (cfg.seed, cfg.log_period) == (7, 5)


def test_a_cycle_of_bases_is_reported_with_its_files(write_yaml):
    write_yaml("a.yaml", "_base_: b.yaml\n")
    write_yaml("b.yaml", "_base_: sub/../a.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as info:
        load_config(write_yaml("top.yaml", "_base_: a.yaml\n"))
    assert "a.yaml -> " in str(info.value) and "b.yaml" in str(info.value)


def test_a_file_naming_itself_as_base_is_a_cycle(write_yaml):
    with pytest.raises(ConfigError, match="cycle"):
        load_config(write_yaml("self.yaml", "_base_: self.yaml\n"))


def test_a_missing_base_names_the_file_and_who_asked_for_it(write_yaml):
    top = write_yaml("top.yaml", "_base_: nowhere.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_config(top)
    message = str(info.value)
    assert "not found" in message and "nowhere.yaml" in message and "top.yaml" in message


@pytest.mark.parametrize("value", ["3", "[a.yaml, 4]", "{x: 1}", "''"])
def test_a_base_that_is_not_a_path_or_list_of_paths_fails(write_yaml, value):
    with pytest.raises(ConfigError, match="_base_ must be a file path"):
        load_config(write_yaml("top.yaml", f"_base_: {value}\n"))


def test_a_missing_config_file_fails_with_its_name(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*absent.yaml"):
        load_config(tmp_path / "absent.yaml")


# --- --opts overrides ------------------------------------------------------------------------


def test_override_values_of_every_type(write_yaml):
    path = write_yaml("x.yaml", "solver: {base_lr: 0.1, max_iter: 1000}\n")
    cfg = load_config(
        path,
        [
            "solver.base_lr=1e-3",  # YAML 1.1 reads this as a string; a float field takes it
            "solver.max_iter=500",
            "solver.steps=[100, 200]",
            "model.channels_last=true",
            "model.anchors.sizes=[[16, 32], [64, 128]]",  # ints into list[list[float]]
            "model.anchors.aspect_ratios=[[1]]",
            "model.backbone.name=resnet34_fpn",
            "model.anchors.sizes=[[16], [32], [64], [128], [256]]",  # the last one wins
            "data.train.images=/data/coco/train2017",
            "test.evaluators=[voc07, coco]",
            "model.weights=",
        ],
    )
    assert cfg.solver.base_lr == 0.001 and type(cfg.solver.base_lr) is float
    assert cfg.solver.max_iter == 500 and cfg.solver.steps == [100, 200]
    assert cfg.model.channels_last is True
    assert cfg.model.anchors.sizes == [[16.0], [32.0], [64.0], [128.0], [256.0]]
    assert all(type(v) is float for level in cfg.model.anchors.sizes for v in level)
    assert cfg.model.anchors.aspect_ratios == [[1.0]]
    assert cfg.data.train.images == "/data/coco/train2017"
    assert cfg.test.evaluators == ["voc07", "coco"]
    assert cfg.model.weights == ""


def test_an_int_is_accepted_for_a_float_field_and_stored_as_float(write_yaml):
    cfg = load_config(write_yaml("x.yaml", "solver: {gamma: 1}\n"), ["solver.base_lr=2"])
    assert (cfg.solver.gamma, cfg.solver.base_lr) == (1.0, 2.0)
    assert type(cfg.solver.gamma) is float and type(cfg.solver.base_lr) is float


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("solver.amp=off", "off"),  # YAML 1.1 would read a bare off as False
        ("data.check=off", "off"),
        ("output_dir=2024", "2024"),
        ("device=cuda:1", "cuda:1"),
        ("output_dir='runs/a b'", "runs/a b"),
        ("data.train.annotations=*.json", "*.json"),  # not valid YAML, still a fine string
    ],
)
def test_string_fields_take_the_text_as_typed(override, expected):
    key = override.partition("=")[0]
    cfg = with_overrides(Config(), [override])
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected


def test_overriding_a_section_with_a_mapping_merges_into_it(write_yaml):
    path = write_yaml("x.yaml", "model: {rpn: {nms_thresh: 0.6}}\n")
    cfg = load_config(path, ["model.rpn={fg_iou_thresh: 0.8}"])
    assert (cfg.model.rpn.nms_thresh, cfg.model.rpn.fg_iou_thresh) == (0.6, 0.8)


@pytest.mark.parametrize("override", ["solver.base_lr", "=0.1", "solver..base_lr=1", ".seed=1"])
def test_malformed_overrides_fail(override):
    with pytest.raises(ConfigError, match="dotted key=value"):
        with_overrides(Config(), [override])


def test_overrides_must_be_a_list_not_one_string():
    with pytest.raises(TypeError):
        with_overrides(Config(), "seed=1")


def test_with_overrides_returns_a_new_config_and_leaves_the_old_one():
    base = Config()
    changed = with_overrides(base, ["seed=3", "solver.max_iter=10", "solver.steps=[5]"])
    assert (changed.seed, changed.solver.max_iter, changed.solver.steps) == (3, 10, [5])
    assert base == Config()


# --- unknown keys ----------------------------------------------------------------------------


def test_unknown_key_in_a_file_names_the_file_and_the_closest_key(write_yaml):
    path = write_yaml("configs/x.yaml", "solver:\n  base_lrr: 0.01\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    shown = os.path.normpath(path)
    assert str(info.value) == (
        f"unknown key 'solver.base_lrr' in {shown}; did you mean 'solver.base_lr'?"
    )


def test_unknown_key_in_a_base_file_names_the_base(write_yaml):
    write_yaml("base.yaml", "model:\n  rpn:\n    nms_tresh: 0.5\n")
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml("top.yaml", "_base_: base.yaml\nseed: 1\n"))
    message = str(info.value)
    assert "'model.rpn.nms_tresh'" in message and "base.yaml" in message
    assert "top.yaml" not in message and "'model.rpn.nms_thresh'" in message


def test_unknown_key_from_opts_names_opts_and_the_closest_key():
    with pytest.raises(ConfigError) as info:
        with_overrides(Config(), ["solver.base_lrr=0.01"])
    assert str(info.value) == (
        "unknown key 'solver.base_lrr' in --opts; did you mean 'solver.base_lr'?"
    )


def test_unknown_key_from_opts_through_load_config(write_yaml):
    with pytest.raises(ConfigError, match=r"'model\.rpn\.post_nms_top_k' in --opts; did you"):
        load_config(write_yaml("x.yaml", "seed: 1\n"), ["model.rpn.post_nms_top_k=10"])


def test_misspelled_section_suggests_the_section(write_yaml):
    with pytest.raises(ConfigError, match="unknown key 'solvr' .*did you mean 'solver'"):
        load_config(write_yaml("x.yaml", "solvr: {base_lr: 0.1}\n"))


def test_key_in_the_wrong_section_suggests_where_it_lives(write_yaml):
    with pytest.raises(ConfigError, match="unknown key 'model.base_lr' .*'solver.base_lr'"):
        load_config(write_yaml("x.yaml", "model: {base_lr: 0.1}\n"))


def test_key_without_any_close_match_lists_the_valid_keys():
    with pytest.raises(ConfigError) as info:
        with_overrides(Config(), ["test.zzzzzz=1"])
    assert "valid keys in 'test': eval_period, evaluators, ims_per_batch" in str(info.value)


# --- wrong types -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_text", "fragment"),
    [
        ("solver: {max_iter: abc}", "'solver.max_iter' in {}: expected int, got 'abc' (str)"),
        ("solver: {max_iter: true}", "'solver.max_iter' in {}: expected int, got True (bool)"),
        ("solver: {max_iter: 100.0}", "expected int, got 100.0 (float); write it without"),
        ("solver: {base_lr: fast}", "'solver.base_lr' in {}: expected float, got 'fast'"),
        ("solver: {base_lr: true}", "expected float, got True (bool)"),
        ("solver: {amp: off}", "expected str, got False (bool); YAML reads unquoted"),
        ("model: {channels_last: 1}", "'model.channels_last' in {}: expected bool, got 1"),
        ("solver: 0.01", "'solver' in {}: expected a section"),
        ("model: {rpn: [1, 2]}", "'model.rpn' in {}: expected a section"),
        ("data: {min_size: 800}", "expected list[int], got 800 (int); write a list, e.g. [800]"),
        ("model: {anchors: {sizes: [[32], [x]]}}", "'model.anchors.sizes[1][0]' in {}: expected"),
        ("output_dir: null", "'output_dir' in {}: expected str, got null"),
    ],
)
def test_wrong_type_in_a_file_names_key_type_and_value(write_yaml, yaml_text, fragment):
    path = write_yaml("x.yaml", yaml_text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert fragment.format(os.path.normpath(path)) in str(info.value)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("solver.max_iter=1e4", "'solver.max_iter' in --opts: expected int, got '1e4' (str)"),
        ("solver.ims_per_batch=true", "expected int, got True (bool)"),
        ("solver.base_lr=abc", "'solver.base_lr' in --opts: expected float, got 'abc' (str)"),
        ("solver.steps=[1, x]", "'solver.steps[1]' in --opts: expected int, got 'x' (str)"),
        ("solver.steps=5", "'solver.steps' in --opts: expected list[int], got 5"),
        ("solver=3", "'solver' in --opts: expected a section"),
        ("model.channels_last=maybe", "expected bool, got 'maybe' (str)"),
    ],
)
def test_wrong_type_from_opts_names_key_type_and_value(override, fragment):
    with pytest.raises(ConfigError) as info:
        with_overrides(Config(), [override])
    assert fragment in str(info.value)


def test_every_mistake_is_reported_at_once(write_yaml):
    path = write_yaml(
        "x.yaml",
        """
        solver: {base_lrr: 0.1, max_iter: ten}
        model: {rpn: {fg_iou_thresh: high}}
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, ["test.evaluator=[coco]"])
    message = str(info.value)
    assert message.startswith("4 problems in the config:")
    for key in ("solver.base_lrr", "solver.max_iter", "model.rpn.fg_iou_thresh", "test.evaluator"):
        assert f"'{key}'" in message


# --- out of range ----------------------------------------------------------------------------


def test_out_of_range_in_a_file_names_key_value_and_file(write_yaml):
    path = write_yaml("x.yaml", "model: {rpn: {positive_fraction: 1.5}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"'model.rpn.positive_fraction' in {os.path.normpath(path)}: must be in [0, 1], got 1.5"
    )


def test_out_of_range_from_opts_names_key_value_and_opts(write_yaml):
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml("x.yaml", "seed: 1\n"), ["solver.ims_per_batch=0"])
    assert str(info.value) == "'solver.ims_per_batch' in --opts: must be >= 1, got 0"


def test_out_of_range_caused_by_a_default_says_so(write_yaml):
    # max_iter from the file makes the default steps [60000, 80000] impossible
    path = write_yaml("x.yaml", "solver: {max_iter: 1000}\n")
    with pytest.raises(ConfigError, match=r"'solver\.steps' \(default\): must increase"):
        load_config(path)


# --- safety: configs are data, never code ----------------------------------------------------


def _payload(marker: Path) -> str:
    return f'seed: !!python/object/apply:os.system ["touch {marker}"]\n'


def test_the_payload_used_below_does_run_under_an_unsafe_loader(tmp_path):
    # proves the refusal tests below would notice if the payload executed
    marker = tmp_path / "ran"
    yaml.unsafe_load(_payload(marker))
    assert marker.exists()


def test_a_python_tag_in_a_file_is_refused_and_its_payload_does_not_run(write_yaml, tmp_path):
    marker = tmp_path / "pwned"
    path = write_yaml("evil.yaml", _payload(marker))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert os.path.normpath(path) in message and "line 1" in message
    assert "'!!python/object/apply:os.system'" in message
    assert not marker.exists()


def test_a_python_tag_in_a_base_file_is_refused(write_yaml, tmp_path):
    marker = tmp_path / "pwned"
    write_yaml("evil_base.yaml", "model:\n  rpn:\n    " + _payload(marker))
    with pytest.raises(ConfigError, match="evil_base.yaml, line 3: refused YAML tag"):
        load_config(write_yaml("top.yaml", "_base_: evil_base.yaml\n"))
    assert not marker.exists()


@pytest.mark.parametrize("key", ["seed", "output_dir"])
def test_a_python_tag_in_opts_is_refused_and_does_not_run(tmp_path, key):
    marker = tmp_path / "pwned"
    override = f'{key}=!!python/object/apply:os.system ["touch {marker}"]'
    with pytest.raises(ConfigError, match="--opts .*refused YAML tag"):
        with_overrides(Config(), [override])
    assert not marker.exists()


# --- other malformed files -------------------------------------------------------------------


def test_a_key_given_twice_in_one_file_fails_instead_of_silently_dropping_one(write_yaml):
    path = write_yaml("x.yaml", "solver:\n  base_lr: 0.1\nseed: 1\nsolver:\n  max_iter: 5\n")
    with pytest.raises(ConfigError, match=r"x.yaml, line 4: key 'solver' is given twice"):
        load_config(path)


def test_a_nested_key_given_twice_is_named_with_its_section(write_yaml):
    path = write_yaml("x.yaml", "solver:\n  base_lr: 0.1\n  base_lr: 0.2\n")
    with pytest.raises(ConfigError, match="key 'solver.base_lr' is given twice"):
        load_config(path)


def test_invalid_yaml_names_the_file(write_yaml):
    path = write_yaml("broken.yaml", "solver: {base_lr: 0.1\n")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML"):
        load_config(path)


def test_a_top_level_that_is_not_a_mapping_fails(write_yaml):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write_yaml("x.yaml", "- solver\n- model\n"))


# --- writing the resolved config -------------------------------------------------------------


def test_config_to_dict_holds_plain_types_only():
    def walk(value):
        if isinstance(value, dict):
            assert all(isinstance(k, str) for k in value)
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        else:
            assert type(value) in (str, int, float, bool), value

    data = config_to_dict(Config())
    walk(data)
    assert data["solver"]["base_lr"] == Config().solver.base_lr
    assert data["model"]["anchors"]["sizes"] == [[32.0], [64.0], [128.0], [256.0], [512.0]]


def test_dump_then_load_gives_an_equal_config(write_yaml, tmp_path):
    path = write_yaml("x.yaml", "solver: {base_lr: 3.0e-05, max_iter: 10, steps: [4, 8]}\n")
    cfg = load_config(
        path,
        [
            "solver.amp=off",
            "output_dir=2024",
            "data.train.class_names=['yes', 'null', '1e3']",
            "model.anchors.allowed_border=0",
            "solver.weight_decay=1e-7",
        ],
    )
    out = dump_config(cfg, tmp_path / "run" / "nested" / "config.yaml")
    assert out.exists()
    assert "!!" not in out.read_text()
    assert load_config(out) == cfg
    assert load_config(dump_config(Config(), tmp_path / "defaults.yaml")) == Config()
