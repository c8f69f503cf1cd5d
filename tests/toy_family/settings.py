"""The toy family's recipe section (``rows:``)."""

from __future__ import annotations

from pydantic import Field

from edgekd.sections import Section


class RowsConfig(Section):
    features: int = Field(4, ge=1, description="Numbers per row.")
    examples: int = Field(400, ge=20, description="Rows generated (half train, a quarter each for validation and test).")
    steps: int = Field(200, ge=1, description="Training steps of the linear model.")


class RowsSection(Section):
    rows: RowsConfig = Field(default_factory=RowsConfig)


RECIPE = RowsSection
