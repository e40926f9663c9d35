"""Typed --set overrides and schedules (pure parts of the configuration)."""

from dataclasses import dataclass

import pytest

from benchmark.config import apply_overrides, check_sections, parse_set_options
from benchmark.errors import ConfigError


@dataclass(frozen=True)
class Section:
    iterations: int = 10
    lr: float = 1e-4
    flip: bool = True
    scales: tuple[float, ...] = (1.0,)
    name: str = "x"
    weights: str | None = None


def test_parse_set_options_groups_by_section():
    got = parse_set_options(["step0.iterations=20", "method.kd_weight=5", "step0.lr=3e-4"])
    assert got == {"step0": {"iterations": "20", "lr": "3e-4"}, "method": {"kd_weight": "5"}}


@pytest.mark.parametrize("bad", ["iterations=3", "step0.iterations", "=3", ".x=1"])
def test_parse_set_options_rejects_malformed(bad):
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_set_options([bad])


def test_apply_overrides_converts_to_field_types():
    got = apply_overrides(Section(), {"iterations": "2e4", "lr": "0.5", "flip": "off",
                                      "scales": "0.5,1,2", "weights": "none", "name": "y"}, "s")
    assert got == Section(iterations=20000, lr=0.5, flip=False, scales=(0.5, 1.0, 2.0), weights=None, name="y")
    assert isinstance(got.iterations, int)


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError) as err:
        apply_overrides(Section(), {"iteration": "3"}, "step0")
    assert "step0.iteration" in err.value.message and "step0.iterations" in err.value.hint


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match=r"step0\.iterations.*'ten'"):
        apply_overrides(Section(), {"iterations": "ten"}, "step0")
    with pytest.raises(ConfigError):
        apply_overrides(Section(), {"iterations": "2.5"}, "step0")


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown --set section 'stepp0'") as err:
        check_sections({"stepp0": {}}, ["step0", "increment"])
    assert "step0" in err.value.hint
