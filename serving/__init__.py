"""The FastAPI inference server and the runtime backends it serves from.

``serve(run_dir, target, settings)`` runs it; ``create_app(settings)`` builds the ASGI app (for
uvicorn/gunicorn factories and tests). Importing this package imports no torch.
"""

from edgekd.serving.app import create_app, serve
from edgekd.serving.settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "serve"]
