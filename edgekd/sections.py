"""The base of every recipe section (``edgekd.recipe`` and the task families' ``settings.py``): an
unknown key is an error, and so is assigning a wrong value to a loaded recipe."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
