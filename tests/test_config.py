"""Typed config loading: YAML + dotted overrides, strict keys and types, resolved config saved."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from fashionshoot.config import config_from_argv, load_config, save_config, to_dict
from fashionshoot.errors import ConfigError


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Run:
    name: str = "run"
    steps: int = 10
    tiers: list[str] = field(default_factory=lambda: ["high"])
    precision: Literal["no", "fp16", "bf16"] = "no"
    resume: str | None = None
    use_ema: bool = False
    optim: Optim = field(default_factory=Optim)


def test_defaults_file_and_overrides_layer_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 20\noptim:\n  lr: 0.001\n")
    cfg = load_config(Run, path, ["optim.lr=3e-4", "tiers=[high, medium]", "resume=latest"])
    assert cfg.steps == 20 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.tiers == ["high", "medium"] and cfg.resume == "latest"
    assert cfg.optim.betas == (0.9, 0.999) and isinstance(cfg.optim.betas, tuple)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("look #3 on a rooftop at dusk", "look #3 on a rooftop at dusk"),  # YAML: a comment after "look"
     ("no", "no"), ("1.5", "1.5"), ("a: b", "a: b"), ('""', ""), ("'it''s'", "it's"), ("", "")],
)
def test_a_string_field_takes_the_value_as_typed_unless_quoted(value, expected):
    assert load_config(Run, None, [f"name={value}"]).name == expected


def test_a_choice_takes_the_value_as_typed_and_its_errors_name_the_override(tmp_path):
    assert load_config(Run, None, ["precision=no"]).precision == "no"  # YAML reads no as False
    path = tmp_path / "run.yaml"
    path.write_text("steps: 20\n")
    with pytest.raises(ConfigError, match=r"precision: expected one of .*'fp8' \(from override 'precision=fp8'\)$"):
        load_config(Run, path, ["precision=fp8"])
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) optim\.lrr;.* \(from override 'optim\.lrr=1'\)$"):
        load_config(Run, path, ["optim.lrr=1"])


def test_int_is_accepted_where_float_is_expected():
    assert load_config(Run, None, ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("stepz=3", "unknown config key(s) stepz"),
        ("optim.momentum=0.9", "optim.momentum"),
        ("steps=ten", "steps: expected int"),
        ("steps=2.5", "steps: expected int"),
        ("use_ema=maybe", "use_ema: expected bool"),
        ("precision=fp8", "precision: expected one of"),
        ("optim.betas=[0.9]", "optim.betas: expected 2 items"),
        ("optim=3", "optim: expected a mapping"),
        ("nonsense", "dotted.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_config(Run, None, [override])


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.lrr.*bad\.yaml"):
        load_config(Run, path)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Run, tmp_path / "missing.yaml")


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(Run, None, ["name=x", "optim.lr=0.5", "tiers=[low]"])
    path = save_config(cfg, tmp_path / "out")
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == 0.5
    assert load_config(Run, path) == cfg


def test_argv_form():
    cfg = config_from_argv(Run, ["steps=4", "--config", "/nonexistent.yaml"][:1])
    assert cfg.steps == 4 and to_dict(cfg)["optim"]["betas"] == [0.9, 0.999]
