"""The toy family as the server sees it: POST /predict takes {"rows": [[...], ...]}, v2 takes an FP32
``features`` tensor, ``edgekd.load(...).predict`` takes rows."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from fastapi import Request
from pydantic import BaseModel, Field

from edgekd.serving.codec import label_names, softmax
from edgekd.serving.context import Serving, within_deadline
from edgekd.serving.errors import RequestError
from edgekd.serving.family import ServeFamily
from edgekd.serving.http import read_json, require_json, validate_body
from edgekd.serving.v2_core import FLOAT_TYPES, ModelSpec, Output, Tensor


class RowsCodec:
    task: ClassVar[str] = "rows"
    accepts: ClassVar[str] = "rows"

    def __init__(self, features: int, labels: list[str]):
        self.features, self.labels = features, labels
        self.input_names = ("features",)

    @classmethod
    def for_artifact(cls, folder: Path, meta: dict[str, Any], runner: Any, settings: Any) -> RowsCodec:
        return cls(int(meta["features"]), label_names(meta))

    def check(self, rows: Sequence[Any]) -> np.ndarray:
        arr = np.asarray(rows, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != self.features or not len(arr):
            raise RequestError(f"send rows of {self.features} numbers (got shape {list(arr.shape)}).", 422)
        return arr

    def pad(self, items: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        return {"features": np.stack(items)}

    def select_outputs(self, output_names: Sequence[str]) -> tuple[str, ...]:
        return ("logits",)

    def facts(self) -> dict[str, Any]:
        return {"task": self.task, "inputs": self.accepts, "features": self.features}

    def answers(self, logits: np.ndarray) -> list[dict[str, Any]]:
        probs = softmax(logits)
        return [{"label": self.labels[int(p.argmax())], "score": float(p.max())} for p in probs]


class RowsRequest(BaseModel):
    rows: list[list[float]] = Field(description="Rows of numbers, one answer each.")


class RowAnswer(BaseModel):
    label: str
    score: float


class RowsResponse(BaseModel):
    model: str
    target: str
    predictions: list[RowAnswer]


async def predict(request: Request, serving: Serving) -> RowsResponse:
    await require_json(request)
    body = validate_body(RowsRequest, await read_json(request))
    codec = serving.model.codec
    logits = await within_deadline(serving.engine.logits(list(codec.check(body.rows))), serving.settings)
    serving.metrics.counter("edgekd_rows", "Rows classified.").inc(len(logits))
    return RowsResponse(model=serving.model.name, target=serving.model.target,
                        predictions=[RowAnswer(**a) for a in codec.answers(logits)])


def v2_spec(codec: RowsCodec) -> ModelSpec:
    n = len(codec.labels)
    return ModelSpec([("features", "FP32", [-1, codec.features])], [("logits", "FP32", [-1, n])],
                     {"features": codec.features})


async def v2_infer(tensors: dict[str, Tensor], serving: Serving) -> dict[str, Output]:
    t = tensors.get("features")
    if t is None or len(tensors) != 1 or t.datatype not in FLOAT_TYPES:
        raise RequestError("send one FP32 input 'features' [batch, features].")
    rows = serving.model.codec.check(np.asarray(t.data, dtype=np.float32).reshape(t.shape))
    logits = await within_deadline(serving.engine.logits(list(rows)), serving.settings)
    return {"logits": Output("logits", "FP32", np.asarray(logits, dtype=np.float32))}


def predict_local(codec: RowsCodec, engine: Any, rows: Any, batch_size: int, options: dict[str, Any]) -> list:
    if options:
        raise TypeError(f"{', '.join(options)}: this model takes no options.")
    arr = codec.check(rows)
    return [a for start in range(0, len(arr), batch_size)
            for a in codec.answers(engine.run_items(list(arr[start:start + batch_size]))["logits"])]


SERVING = ServeFamily(
    task="rows",
    accepts="rows",
    codec=RowsCodec.for_artifact,
    predict=predict,
    response_model=RowsResponse,
    request_models=(RowsRequest,),
    openapi_content={"application/json": {"schema": {"$ref": "#/components/schemas/RowsRequest"}}},
    v2_spec=v2_spec,
    v2_infer=v2_infer,
    max_batch=lambda settings: settings.max_items,
    local_predict=predict_local,
)
