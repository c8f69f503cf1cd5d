"""The FastAPI inference server and the runtime backends it serves from.

``serve(run_dir, target, settings)`` runs it; ``create_app(settings)`` builds the ASGI app (for
uvicorn/gunicorn factories and tests). Importing this package imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgekd.serving.app import create_app, serve
    from edgekd.serving.settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    # Imported on first use, not with the package: the app's /predict route imports every task family's
    # serve module, and those import this package's submodules; a family module imported first would
    # otherwise re-enter it half-initialised (an import ring through edgekd.serving.family).
    if name in ("create_app", "serve"):
        from edgekd.serving import app

        return getattr(app, name)
    if name == "ServeSettings":
        from edgekd.serving.settings import ServeSettings

        return ServeSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
