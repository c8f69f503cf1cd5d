"""The toy family: generated rows of numbers, two classes, a linear model trained in the distill stage."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgekd.context import RunContext
from edgekd.export.base import ModelIO
from edgekd.recipe import Recipe
from edgekd.runfolder import RunFolder, fingerprint
from edgekd.stages.base import Stage

LABELS = ["low", "high"]


class RowsTask:
    name = "rows"
    primary_metric = "accuracy"
    agreement = None  # parity compares the argmax

    def __init__(self, features: int):
        self.features = features
        self.label_names = list(LABELS)

    def load_model(self, source: str | Path) -> torch.nn.Module:
        model = torch.nn.Linear(self.features, len(LABELS))
        model.load_state_dict(torch.load(Path(source) / "model.pt"))
        return model

    def model_io(self) -> ModelIO:
        return ModelIO(["features"], ["logits"], {"features": {0: "batch"}, "logits": {0: "batch"}},
                       {"features": "float32"})

    def export_module(self, model: torch.nn.Module) -> torch.nn.Module:
        class Logits(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, features):
                return (self.inner(features),)

        return Logits(model).eval()

    def shipped_module(self, model: torch.nn.Module, cfg: Any, inputs: dict[str, np.ndarray]):
        return self.export_module(model), {}

    def metrics(self, outputs: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
        return {"accuracy": float((outputs["logits"].argmax(axis=1) == labels).mean())}

    def export_meta(self) -> dict[str, Any]:
        return {"features": self.features}


@dataclass
class RowsRunContext(RunContext):
    @cached_property
    def data(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        cfg = self.recipe.rows
        rng = np.random.default_rng(self.recipe.seed)
        x = rng.normal(size=(cfg.examples, cfg.features)).astype(np.float32)
        y = (x.sum(axis=1) > 0).astype(np.int64)
        a, b = cfg.examples // 2, 3 * cfg.examples // 4
        return {"train": (x[:a], y[:a]), "validation": (x[a:b], y[a:b]), "test": (x[b:], y[b:])}

    @cached_property
    def task(self) -> RowsTask:
        return RowsTask(self.recipe.rows.features)

    @property
    def data_summary(self) -> dict[str, Any]:
        return {"source": "generated rows", **{k: len(v[1]) for k, v in self.data.items()}}

    @property
    def data_fingerprint(self) -> str:
        return fingerprint({"rows": self.recipe.rows.model_dump(mode="json"), "seed": self.recipe.seed})

    def parity_data(self, n: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        x, y = self.data["test"]
        return {"features": x[:n]}, y[:n]

    def validation_data(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        x, y = self.data["validation"]
        return {"features": x}, y

    def calibration_data(self, split: str, n: int) -> dict[str, np.ndarray]:
        return {"features": self.data[split][0][:n]}


def train_fingerprint(ctx: RowsRunContext) -> str:
    return fingerprint({"data": ctx.data_fingerprint, "seed": ctx.recipe.seed})


def run_train(ctx: RowsRunContext) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.manual_seed(ctx.recipe.seed)
    model = torch.nn.Linear(ctx.recipe.rows.features, len(LABELS))
    x, y = (torch.from_numpy(a) for a in ctx.data["train"])
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(ctx.recipe.rows.steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    folder = ctx.model_dir("distill")
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "model.pt")
    with torch.no_grad():
        xv, yv = ctx.validation_data()
        acc = ctx.task.metrics({"logits": model(torch.from_numpy(xv["features"])).numpy()}, yv)
    metrics = {"params": sum(p.numel() for p in model.parameters()), "validation": acc}
    ctx.run.record("distill", train_fingerprint(ctx), metrics, [folder], seconds=time.perf_counter() - t0)
    return metrics


class Rows:
    name = "rows"
    skipped = {stage: "a linear model needs no teacher, baseline, eval or pruning"
               for stage in ("teacher", "baseline", "eval", "prune")}
    unread_keys: dict[str, str] = {}
    metric_names = ("accuracy",)

    def create_context(self, recipe: Recipe) -> RowsRunContext:
        return RowsRunContext(recipe=recipe, run=RunFolder(recipe.run_dir()), family=self)

    def stages(self) -> dict[str, Stage]:
        return {"distill": Stage("distill", run_train, train_fingerprint, produces_model=True)}

    def check_inputs(self, recipe: Recipe) -> list[str]:
        return []


FAMILY = Rows()
