"""``generator.first_input_time``: the config field, its unit -> native map and its refusals.

The field is in unit time, like ``generator.anchors``, and takes the same map (the teacher's shift for
SenseFlow / DMD2; none for SiD without ``use_sd3_shift``); values are hand-computed from SD3's static
shift ``s u / (1 + (s - 1) u)`` and SDXL's index ``round(1000 u) - 1``.
"""

from __future__ import annotations

import pytest

from senseflow.build import native_first_input_time
from senseflow.config import validate
from senseflow.schedules import DDPM, RectifiedFlow
from senseflow.teachers.base import SenseflowError

BASE = {"paths": {"teacher": "builtin:toy"}, "teacher": {"family": "toy", "resolution": 32}}


def _config(generator: dict, method: str = "dmd2"):
    return validate({**BASE, "generator": generator, "method": {"name": method}})


def test_default_is_none_and_maps_to_none():
    config = _config({"anchors": [1.0]})
    assert config.generator.first_input_time is None
    assert native_first_input_time(config, RectifiedFlow(shift=3.0)) is None


@pytest.mark.parametrize("value", [0.0, -0.1, 1.0, 1.5, "nan"])
def test_values_outside_zero_to_the_first_anchor_are_refused_in_one_line(value):
    with pytest.raises(SenseflowError) as err:
        _config({"anchors": [1.0, 0.5], "first_input_time": float(value)})
    msg = str(err.value)
    assert "\n" not in msg and "first_input_time" in msg


def test_the_bound_is_the_first_anchor_not_one():
    with pytest.raises(SenseflowError, match="first_input_time"):
        _config({"anchors": [0.5], "first_input_time": 0.6})
    assert _config({"anchors": [0.5], "first_input_time": 0.4}).generator.first_input_time == 0.4


def test_unit_time_takes_the_anchors_map():
    # DMD2 / SenseFlow: through the teacher's shift, 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    shifted = _config({"anchors": [1.0], "first_input_time": 0.5})
    assert native_first_input_time(shifted, RectifiedFlow(shift=3.0)) == pytest.approx(0.75, abs=1e-12)
    # SiD without use_sd3_shift: unshifted anchors, so unshifted input time
    sid = validate({**BASE, "generator": {"anchors": [1.0], "first_input_time": 0.5},
                    "method": {"name": "sid", "use_sd3_shift": False}})
    assert native_first_input_time(sid, RectifiedFlow(shift=3.0)) == pytest.approx(0.5, abs=1e-12)
    # SDXL's index: round(1000 * 0.7) - 1 = 699
    assert native_first_input_time(_config({"anchors": [1.0], "first_input_time": 0.7}),
                                   DDPM.scaled_linear()) == 699.0


def test_a_value_the_schedule_rounds_onto_the_anchor_is_refused_at_build_time():
    # 0.9996 < 1 in unit time, but SDXL's index rounds both to 999
    config = _config({"anchors": [1.0], "first_input_time": 0.9996})
    with pytest.raises(SenseflowError) as err:
        native_first_input_time(config, DDPM.scaled_linear())
    assert "\n" not in str(err.value) and "generator.first_input_time" in str(err.value) and "999" in str(err.value)
    # ... and one that rounds onto clean data (index -1)
    with pytest.raises(SenseflowError, match="clean data"):
        native_first_input_time(_config({"anchors": [1.0], "first_input_time": 0.0004}), DDPM.scaled_linear())


def test_the_gmm_runner_takes_the_same_field():
    from senseflow.toy.gmm.run import RunSpec, generator_config

    assert generator_config(RunSpec(steps=1, generator_input_time=0.3)).first_input_time == 0.3
    assert generator_config(RunSpec(steps=4)).first_input_time is None
    with pytest.raises(SenseflowError) as err:
        generator_config(RunSpec(steps=1, generator_input_time=1.0))   # the anchor itself: omit the option
    assert "\n" not in str(err.value) and "first_input_time" in str(err.value)


def test_a_run_does_not_resume_under_another_input_time(tmp_path):
    from senseflow.train.rundir import check_resumable

    ckpt = tmp_path / "step_10"
    with pytest.raises(SenseflowError) as err:
        check_resumable({"generator": {"first_input_time": None}}, {"generator": {"first_input_time": 0.5}}, ckpt)
    assert "generator.first_input_time" in str(err.value) and "\n" not in str(err.value)
    check_resumable({"generator": {"first_input_time": 0.5}}, {"generator": {"first_input_time": 0.5}}, ckpt)
    check_resumable({"generator": {}}, {"generator": {"first_input_time": None}}, ckpt)   # a config from before
