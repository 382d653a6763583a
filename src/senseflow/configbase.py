"""Shared pydantic building blocks for typed configs (every section forbids unknown keys)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .schedules import TimeSampler


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, assignments are validated, numbers are finite
    (``.inf`` / ``.nan`` in a config is always a mistake: an infinite lr or shift poisons the weights)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TimeSamplerConfig(StrictModel):
    """A timestep law in unit time (see :class:`senseflow.schedules.TimeSampler`)."""

    kind: Literal["uniform", "logit_normal", "teacher"] = "uniform"
    low: float = Field(0.0, ge=0.0, le=1.0)
    high: float = Field(1.0, ge=0.0, le=1.0)
    mean: float = 0.0
    std: float = Field(1.0, gt=0.0)
    shift: bool = True

    @model_validator(mode="after")
    def _range(self) -> "TimeSamplerConfig":
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        return self

    def build(self) -> TimeSampler:
        return TimeSampler(kind=self.kind, low=self.low, high=self.high, mean=self.mean, std=self.std,
                           shift=self.shift)
