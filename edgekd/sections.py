"""The base of every recipe section (``edgekd.recipe`` and the task families' ``settings.py``): an
unknown key is an error, and so is assigning a wrong value to a loaded recipe."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def changed_keys(value: BaseModel, default: BaseModel | None = None, prefix: str = "",
                 keys: tuple[str, ...] | None = None) -> list[str]:
    """The dotted keys (``prefix`` + name) of ``value`` that differ from ``default`` (each field's own
    default when None), sub-sections walked key by key; only ``keys`` of the top level when given.
    How a recipe finds the keys it set that nothing would read."""
    fields = type(value).model_fields
    out = []
    for name in keys if keys is not None else fields:
        v = getattr(value, name)
        d = fields[name].get_default(call_default_factory=True) if default is None else getattr(default, name)
        if isinstance(v, BaseModel) and type(v) is type(d):
            out += changed_keys(v, d, f"{prefix}{name}.")
        elif v != d:
            out.append(f"{prefix}{name}")
    return out


def it_or_them(keys: list[str]) -> str:
    """The pronoun of a message that asks to drop ``keys``."""
    return "it" if len(keys) == 1 else "them"
