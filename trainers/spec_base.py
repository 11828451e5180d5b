"""The base of every run-spec model (torch-free, like `trainers.spec`): unknown keys are
errors, field docstrings become the CLI help and the JSON Schema, defaults are validated."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True,
                              allow_inf_nan=False)
