"""`edgekd serve`'s refusals at start are one clear error, raised before the server starts: batching a
dynamic-int8 export crashed uvicorn's startup (exit 3, a 41-line traceback, the advice inside it), and a
setting the export never reads came after uvicorn's startup traceback."""

from __future__ import annotations

import pytest

from edgekd.errors import EdgeKDError


@pytest.fixture
def no_uvicorn(monkeypatch):
    """uvicorn.Server replaced: a test fails if the server would have been started."""
    import uvicorn

    started = []

    class Server:
        def __init__(self, config):
            started.append(config)

        def run(self):
            raise AssertionError("the server was started")

    monkeypatch.setattr(uvicorn, "Server", Server)
    return started


def test_batching_a_dynamic_int8_export_is_refused_before_the_server_starts(run_copy, no_uvicorn):
    from edgekd.serving import ServeSettings
    from edgekd.serving.app import serve
    from edgekd.serving.model import default_loader

    def as_dynamic_int8(folder, **opts):  # the same file, said to be dynamic int8 as the quantize stage writes it
        runner, meta = default_loader(folder, **opts)
        return runner, {**meta, "precision": "int8-dynamic"}

    with pytest.raises(EdgeKDError, match="serve.batching is on, but this artifact is int8-dynamic"):
        serve(run_copy, settings=ServeSettings(batching=True), loader=as_dynamic_int8)
    assert no_uvicorn == []


def test_a_setting_the_export_never_reads_is_refused_before_the_server_starts(run_copy, no_uvicorn):
    from edgekd.serving import ServeSettings
    from edgekd.serving.app import serve

    with pytest.raises(EdgeKDError, match="max_images"):
        serve(run_copy, settings=ServeSettings(max_images=4))
    assert no_uvicorn == []


def test_a_good_export_starts_the_server_with_the_model_loaded_once(run_copy, no_uvicorn, monkeypatch):
    from edgekd.serving import ServeSettings
    from edgekd.serving import app as app_module
    from edgekd.serving.model import load_served_model

    loads = []
    monkeypatch.setattr(app_module, "load_served_model", lambda *a, **k: loads.append(1) or load_served_model(*a, **k))
    with pytest.raises(AssertionError, match="the server was started"):
        app_module.serve(run_copy, settings=ServeSettings())
    assert len(no_uvicorn) == 1 and loads == [1]  # loaded before the start, not again in the lifespan
