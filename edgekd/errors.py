"""One small error hierarchy. Every message says what was wrong and what to do."""

from __future__ import annotations


class EdgeKDError(Exception):
    """Base class of every error edgekd raises on purpose."""


class RecipeError(EdgeKDError):
    """The recipe (YAML or CLI overrides) is invalid. Lists every problem at once."""

    def __init__(self, problems: list[str], source: str | None = None, one_off: str | None = None,
                 one_off_problems: list[str] | None = None):
        """``one_off``: the settings given for one command only (``--to onnx (export.targets=[onnx])``) that
        the ``problems`` come from, not from the recipe ``source``: the message blames them, not it. With
        ``one_off_problems`` too, ``problems`` are the recipe's own and those the one-off settings', each
        group under its own heading (``problems`` then holds both)."""
        self.problems = list(problems) + list(one_off_problems or [])
        self.source, self.one_off = source, one_off
        where = f" in {source}" if source else ""
        one_off_where = f" with this command's one-off {one_off}, given for this command only"
        if one_off and one_off_problems:
            own = "\n".join(f"  - {p}" for p in problems)
            theirs = "\n".join(f"  - {p}" for p in one_off_problems)
            super().__init__(f"Invalid recipe{where}:\n{own}\nand{one_off_where}:\n{theirs}")
            return
        if one_off:
            where = one_off_where + (f", not from {source}" if source else "")
        body = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"Invalid recipe{where}:\n{body}")


class ArgumentError(RecipeError, ValueError):
    """An argument of the Python API (``edgekd.distill``, ``edgekd.load``, ``Model.predict``) is invalid. Each
    problem starts with the argument's name; a ``RecipeError`` (and a ``ValueError``) too, so that code catching
    those still catches it."""

    def __init__(self, problems: list[str]):
        super().__init__(problems)
        body = self.problems[0] if len(self.problems) == 1 else "\n" + "\n".join(f"  - {p}" for p in self.problems)
        self.args = (f"Invalid argument{'s' if len(self.problems) > 1 else ''}: {body}",)


class AssetError(EdgeKDError):
    """A model or dataset could not be found, fetched or verified."""


class ChecksumError(AssetError):
    """A fetched file does not match its pinned sha256."""


class DataError(EdgeKDError):
    """A dataset is malformed: missing columns, empty texts, unknown labels."""


class MissingBackendError(EdgeKDError):
    """An optional dependency is not installed. The message carries the pip install hint."""

    def __init__(self, what: str, package: str, extra: str | None = None, why: str | None = None):
        hint = f"pip install 'edgekd[{extra}]'" if extra else f"pip install {package}"
        reason = f" ({why})" if why else ""
        super().__init__(f"{what} needs the '{package}' package, which is not installed{reason}. Install it with: {hint}")
        self.package = package
        self.hint = hint


class UnsupportedTargetError(EdgeKDError):
    """An export target is unknown, unavailable here, or cannot convert an operator of the model."""


class ParityError(EdgeKDError):
    """An exported artifact disagrees with its source model beyond the recipe's threshold."""


class StageError(EdgeKDError):
    """A stage cannot run: its inputs are missing from the run folder, or a prerequisite failed."""
