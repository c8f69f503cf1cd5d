"""The black-box teachers: an ONNX export, an edgekd server, any Open Inference Protocol v2 endpoint.

Each answers a batch of texts with one value per text, in the data's label order: a probability
(or logit) vector, or a label index when it gives labels only. ``ask_all`` asks for the texts
the on-disk cache does not hold yet, batch by batch, caching every batch as it arrives.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgekd.errors import RecipeError, StageError
from edgekd.recipe import TeacherClientConfig, TeacherEndpoint
from edgekd.runfolder import sha256_file
from edgekd.teachers.cache import AnswerCache
from edgekd.teachers.client import TeacherClient, TeacherRequestError, api_key_headers
from edgekd.teachers.combine import check_probabilities, softmax

Answer = Any  # list[float] (probs/logits, data label order) or int (label index)


class BlackBox(Protocol):
    where: str
    targets: str
    identity: dict[str, Any]

    def ask(self, texts: list[str]) -> list[Answer]: ...

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def label_index(name: Any, data_labels: list[str], where: str) -> int:
    if isinstance(name, str) and name in data_labels:
        return data_labels.index(name)
    raise TeacherRequestError(f"{where} answered the label {name!r}, which is not one of the data's labels "
                              f"{data_labels}: the teacher must be trained for the same labels.")


def reorder(vectors: np.ndarray, endpoint_labels: list[str], data_labels: list[str], where: str) -> np.ndarray:
    """Columns of ``vectors`` (in ``endpoint_labels`` order) put in the data's label order."""
    if sorted(endpoint_labels) != sorted(data_labels):
        raise TeacherRequestError(
            f"{where} scores the labels {endpoint_labels} but the data has {data_labels}: set {where}.labels to "
            "the data's label names in the order of the teacher's outputs, or use a teacher of the same labels.")
    if vectors.ndim != 2 or vectors.shape[1] != len(endpoint_labels):
        raise TeacherRequestError(f"{where} returned outputs of shape {list(vectors.shape)}, expected "
                                  f"[n, {len(endpoint_labels)}].")
    return vectors[:, [endpoint_labels.index(name) for name in data_labels]]


def _identity(endpoint: TeacherEndpoint, data_labels: list[str], **extra: Any) -> dict[str, Any]:
    return {"kind": endpoint.kind, "targets": endpoint.targets, "labels": endpoint.labels,
            "version": endpoint.version, "data_labels": list(data_labels), **extra}


class OnnxTeacher:
    """An exported folder, run here with the project's ONNX runner and the server's tokenizer code.

    A batch of texts runs as one call, except for an artifact whose rows depend on each other (dynamic
    int8: activation scales per call, padding included): each text then runs alone at its own length, as
    the server runs it, so a text's cached answer does not depend on the texts asked beside it."""

    def __init__(self, endpoint: TeacherEndpoint, data_labels: list[str], where: str, threads: int | None = None):
        from edgekd.devices.remote_runner import ROW_DEPENDENT_PRECISIONS
        from edgekd.export.base import ARTIFACT_META
        from edgekd.export.stage import load_artifact
        from edgekd.serving.codec import label_names
        from edgekd.tasks.text.codec import TextCodec

        path = Path(str(endpoint.path)).expanduser()
        folder = path.parent if path.is_file() else path
        if not (folder / ARTIFACT_META).is_file():
            raise RecipeError([f"{where}.path: {path} is not an export folder (no {ARTIFACT_META}); export the "
                               "teacher with `edgekd export` or edgekd.teachers.export_classifier first"])
        self.runner, meta = load_artifact(folder, threads=threads)
        self.precision = meta.get("precision")
        self.where, self.targets, self.data_labels = where, endpoint.targets, data_labels
        self.labels = list(endpoint.labels or label_names(meta))
        self.codec = TextCodec.from_folder(folder, max_length=int(meta["max_length"]), overflow="truncate",
                                           input_names=self.runner.input_names, labels=self.labels)
        outputs = self.runner.output_names
        self.output = "logits" if "logits" in outputs else outputs[0]
        # One text per call gives other answers than the whole batches cached before: a cache of its own.
        alone = {"rows_per_call": 1} if str(self.precision) in ROW_DEPENDENT_PRECISIONS else {}
        self.identity = _identity(endpoint, data_labels, artifact_sha256=meta.get("sha256") or
                                  sha256_file(folder / meta["file"]), **alone)
        self.seconds = 0.0

    def ask(self, texts: list[str]) -> list[Answer]:
        from edgekd.export.parity import run_as_served

        t0 = time.perf_counter()
        inputs = self.codec.pad(self.codec.encode(texts))
        outputs = run_as_served(self.runner.run, inputs, len(texts), self.precision)
        logits = np.asarray(outputs[self.output], dtype=np.float64)
        self.seconds += time.perf_counter() - t0
        logits = reorder(logits, self.labels, self.data_labels, self.where)
        if self.targets == "labels":
            return [int(k) for k in logits.argmax(axis=1)]
        if self.targets == "probs":
            return softmax(logits).tolist()
        return logits.tolist()

    def stats(self) -> dict[str, Any]:
        return {"requests": 0, "seconds": round(self.seconds, 2)}

    def close(self) -> None:
        return None


class EdgeKDTeacher:
    """A running edgekd server: ``POST /predict {"texts": [...]}``."""

    def __init__(self, endpoint: TeacherEndpoint, data_labels: list[str], where: str, cfg: TeacherClientConfig,
                 sleep: Callable[[float], None] = time.sleep):
        self.where, self.targets, self.data_labels = where, endpoint.targets, data_labels
        self.identity = _identity(endpoint, data_labels, url=str(endpoint.url).rstrip("/"), route="/predict")
        self.client = TeacherClient(str(endpoint.url), cfg, api_key_headers(endpoint, where), where, sleep)

    def ask(self, texts: list[str]) -> list[Answer]:
        body = self.client.request("POST", "/predict", json={"texts": texts})
        preds = body.get("predictions") if isinstance(body, dict) else None
        if not isinstance(preds, list) or len(preds) != len(texts):
            raise TeacherRequestError(f"{self.where}: /predict answered without one prediction per text "
                                      f"({len(texts)} sent): is {self.client.client.base_url} an edgekd server?")
        if self.targets == "labels":
            return [label_index(p.get("label"), self.data_labels, self.where) for p in preds]
        probs = [p.get("probabilities") or {} for p in preds]
        if not all(probs):
            raise TeacherRequestError(f"{self.where}: /predict answered without probabilities (labels only?): "
                                      f"set {self.where}.targets to labels to learn from its labels.")
        names = list(probs[0])
        rows = np.asarray([[row.get(n, np.nan) for n in names] for row in probs], dtype=np.float64)
        if np.isnan(rows).any():
            raise TeacherRequestError(f"{self.where}: /predict gave probabilities for different labels per text.")
        check_probabilities(rows, self.where, kind="edgekd")  # before the answers are cached
        return reorder(rows, names, self.data_labels, self.where).tolist()

    def stats(self) -> dict[str, Any]:
        return self.client.stats.as_dict()

    def close(self) -> None:
        self.client.close()


class V2Teacher:
    """An Open Inference Protocol v2 endpoint: texts as a BYTES tensor, probabilities/logits/labels back."""

    DEFAULT_OUTPUT = {"probs": "probabilities", "logits": "logits", "labels": "label"}

    def __init__(self, endpoint: TeacherEndpoint, data_labels: list[str], where: str, cfg: TeacherClientConfig,
                 sleep: Callable[[float], None] = time.sleep):
        self.where, self.targets, self.data_labels = where, endpoint.targets, data_labels
        self.model_name = str(endpoint.model_name)
        self.input_name = endpoint.input_name
        self.output = endpoint.output_name or self.DEFAULT_OUTPUT[endpoint.targets]
        self.labels = list(endpoint.labels) if endpoint.labels else None
        self.identity = _identity(endpoint, data_labels, url=str(endpoint.url).rstrip("/"), model=self.model_name,
                                  input=self.input_name, output=self.output)
        self.client = TeacherClient(str(endpoint.url), cfg, api_key_headers(endpoint, where), where, sleep)

    def _endpoint_labels(self) -> list[str]:
        """The label order of the output vectors: the recipe's, else the model's metadata (edgekd publishes it)."""
        if self.labels is None:
            meta = self.client.request("GET", f"/v2/models/{self.model_name}")
            published = (meta.get("parameters") or {}).get("labels") if isinstance(meta, dict) else None
            if not isinstance(published, str) or not published:
                raise RecipeError([f"{self.where}.labels: the v2 model '{self.model_name}' does not publish its "
                                   "label names; set them in the order of its outputs, e.g. [negative, positive]"])
            self.labels = [s.strip() for s in published.split(",")]
        return self.labels

    def ask(self, texts: list[str]) -> list[Answer]:
        labels = None if self.targets == "labels" else self._endpoint_labels()
        body = self.client.request("POST", f"/v2/models/{self.model_name}/infer", json={
            "inputs": [{"name": self.input_name, "shape": [len(texts)], "datatype": "BYTES", "data": texts}],
            "outputs": [{"name": self.output}],
        })
        outputs = {o.get("name"): o for o in body.get("outputs", [])} if isinstance(body, dict) else {}
        if self.output not in outputs:
            raise TeacherRequestError(f"{self.where}: the v2 answer has no output '{self.output}' (it has "
                                      f"{sorted(outputs)}); set {self.where}.output_name.")
        data = outputs[self.output].get("data") or []
        if self.targets == "labels":
            if len(data) != len(texts):
                raise TeacherRequestError(f"{self.where}: output '{self.output}' has {len(data)} labels for "
                                          f"{len(texts)} texts.")
            return [label_index(name, self.data_labels, self.where) for name in data]
        assert labels is not None
        vectors = np.asarray(data, dtype=np.float64)
        if vectors.size != len(texts) * len(labels):
            raise TeacherRequestError(f"{self.where}: output '{self.output}' has {vectors.size} values for "
                                      f"{len(texts)} texts x {len(labels)} labels.")
        vectors = reorder(vectors.reshape(len(texts), len(labels)), labels, self.data_labels, self.where)
        if self.targets == "probs":  # refused at the first batch, before any answer is cached
            check_probabilities(vectors, self.where)
        return vectors.tolist()

    def stats(self) -> dict[str, Any]:
        return self.client.stats.as_dict()

    def close(self) -> None:
        self.client.close()


def open_black_box(endpoint: TeacherEndpoint, data_labels: list[str], where: str, cfg: TeacherClientConfig,
                   sleep: Callable[[float], None] = time.sleep) -> BlackBox:
    if endpoint.kind == "onnx":
        return OnnxTeacher(endpoint, data_labels, where)
    if endpoint.kind == "edgekd":
        return EdgeKDTeacher(endpoint, data_labels, where, cfg, sleep)
    if endpoint.kind == "v2":
        return V2Teacher(endpoint, data_labels, where, cfg, sleep)
    raise StageError(f"{where}.kind '{endpoint.kind}' is not a black-box teacher")


@dataclass
class Asked:
    outputs: np.ndarray  # (n, K) floats, or (n,) label indices
    asked: int  # distinct texts sent to the teacher in this run
    from_cache: int  # distinct texts answered from the cache


def ask_all(teacher: BlackBox, texts: list[str], cache: AnswerCache, batch_size: int,
            progress: Callable[[int], None] | None = None) -> Asked:
    """The teacher's answer for every text; texts already cached (this run or an earlier one) are not sent."""
    unique = list(dict.fromkeys(texts))
    todo = [t for t in unique if t not in cache]
    for i in range(0, len(todo), batch_size):
        batch = todo[i:i + batch_size]
        answers = teacher.ask(batch)
        if len(answers) != len(batch):
            raise TeacherRequestError(f"{teacher.where} gave {len(answers)} answers for {len(batch)} texts.")
        cache.add(batch, answers)
        if progress:
            progress(len(batch))
    values = [cache.get(t) for t in texts]
    dtype = np.int64 if teacher.targets == "labels" else np.float64
    return Asked(np.asarray(values, dtype=dtype), asked=len(todo), from_cache=len(unique) - len(todo))
