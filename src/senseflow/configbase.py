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
    shift: bool = Field(True, description="map the draw through the teacher's shift / DDPM index; kind teacher: "
                        "true = the released table law (SD3: shift3(logit-normal)), false = logit-normal on native time")
    discrete: bool = Field(False, description="uniform only: integer index i in {1000 low .. 1000 high}, u = (i+1)/1000 "
                           "(released DMD2 / SenseFlow: 20..980)")

    @model_validator(mode="after")
    def _range(self) -> "TimeSamplerConfig":
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.discrete and self.kind != "uniform":
            raise ValueError(f"discrete applies to kind uniform only (got kind {self.kind!r}): remove discrete")
        return self

    def build(self) -> TimeSampler:
        return TimeSampler(kind=self.kind, low=self.low, high=self.high, mean=self.mean, std=self.std,
                           shift=self.shift, discrete=self.discrete)
