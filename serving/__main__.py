"""``python -m edgekd.serving [PATH] [--target T]``: the server alone, without the training CLI.

PATH is a run folder (with --target) or an export folder; without it, EDGEKD_SERVE_EXPORT_DIR.
Every other setting comes from EDGEKD_SERVE_* variables (see ``ServeSettings``).
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from edgekd.errors import EdgeKDError
from edgekd.serving import ServeSettings, serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgekd.serving", description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", help="run folder or export folder (default: EDGEKD_SERVE_EXPORT_DIR)")
    parser.add_argument("--target", help="export target folder inside RUN_DIR/export/ (e.g. onnx-int8)")
    args = parser.parse_args(argv)
    try:
        settings = ServeSettings.from_env()
        path = args.path or settings.export_dir
        if path is None:
            parser.error("give a run or export folder, or set EDGEKD_SERVE_EXPORT_DIR")
        serve(path, args.target, settings)
    except (EdgeKDError, ValidationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
