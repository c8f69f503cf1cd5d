"""Device profiles (YAML) and the benchmark harness (local, over SSH, and on phones).

    from edgekd.devices import bench_run, report, load_profile, list_profiles, import_result

Names load lazily: the measuring child process imports only what it needs.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "bench_run": "edgekd.devices.bench",
    "discover": "edgekd.devices.bench",
    "report": "edgekd.devices.tables",
    "load_results": "edgekd.devices.tables",
    "pareto_front": "edgekd.devices.tables",
    "DeviceProfile": "edgekd.devices.profiles",
    "ProfileError": "edgekd.devices.profiles",
    "list_profiles": "edgekd.devices.profiles",
    "load_profile": "edgekd.devices.profiles",
    "detect_local": "edgekd.devices.profiles",
    "import_result": "edgekd.devices.ondevice",
    "RemoteError": "edgekd.devices.remote",
    "TorchRunner": "edgekd.devices.torch_runner",
    "summarize": "edgekd.devices.remote_runner",
    "environment": "edgekd.devices.remote_runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'edgekd.devices' has no attribute '{name}'")
