"""The calculate_shift schedule shared by FLUX.1, Qwen-Image and Z-Image (teachers/common.py)."""

import pytest

from senseflow.schedules import flux_mu
from senseflow.teachers.base import SenseflowError
from senseflow.teachers.common import calculate_shift_schedule, exponential_shift_schedule


def test_dynamic_mu_follows_the_scheduler_line():
    sched = {"base_image_seq_len": 256, "max_image_seq_len": 8192, "base_shift": 0.5, "max_shift": 0.9}
    s = exponential_shift_schedule(sched, 4096, label="X", where="f")
    assert s.mu == pytest.approx(0.5 + 0.4 / (8192 - 256) * (4096 - 256))
    assert exponential_shift_schedule({}, 1024, label="X", where="f").mu == pytest.approx(flux_mu(1024))


def test_explicit_and_static_shifts():
    assert exponential_shift_schedule({}, 64, label="X", where="f", mu=0.7).mu == pytest.approx(0.7)
    assert exponential_shift_schedule({}, 64, label="X", where="f", shift=3.0).shift == pytest.approx(3.0)
    static = exponential_shift_schedule({"use_dynamic_shifting": False, "shift": 2.0}, 64, label="X", where="f")
    assert static.shift == pytest.approx(2.0) and static.mu is None


@pytest.mark.parametrize("sched, kwargs, match", [
    ({}, {"mu": 1.0, "shift": 3.0}, "either mu= .* or shift=, not both|not both"),
    ({"time_shift_type": "linear"}, {}, "time_shift_type='linear'; X uses 'exponential'"),
    ({"base_image_seq_len": 256, "max_image_seq_len": 256}, {}, "base_image_seq_len == max_image_seq_len"),
])
def test_refusals_name_the_problem(sched, kwargs, match):
    with pytest.raises(SenseflowError, match=match):
        exponential_shift_schedule(sched, 64, label="X", where="folder", **kwargs)


def test_fix_text_is_the_callers():
    with pytest.raises(SenseflowError, match="set teacher.shift"):
        calculate_shift_schedule({"time_shift_type": "linear"}, 64, label="Z-Image", where="f", fix="set teacher.shift")
