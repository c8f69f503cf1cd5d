"""What does distilling from a black box cost? The same teacher, white box against black box.

    python benchmarks/blackbox_vs_whitebox.py [runs/default] [--variants blackbox,greybox] [--port P]

The white-box figures are those of the finished run (``edgekd run`` wrote them to its manifest:
the student distilled from the teacher's logits, its layers copied from the fine-tuned teacher).
This script exports that run's fine-tuned teacher to ONNX with the project's exporter, serves it
with ``edgekd serve`` on loopback, and distils the same 3-layer student again, the teacher now
reached only through ``POST /predict`` (``teacher: {kind: edgekd, url: ...}``):

- ``blackbox``: nothing but the teacher's probabilities; the student is built from the public
  base model (``teacher.model`` of the run, e.g. minilm-l6), as it must be when the weights
  are out of reach;
- ``greybox``: the same probabilities over HTTP, but the student is built from the fine-tuned
  teacher's layers like the white-box student: it isolates the soft targets' route (HTTP, ONNX
  Runtime, JSON) from the initialisation.

Same data, split, seed and distillation settings as the run. Prints test accuracy of each
variant, the white-box student's, and the differences; writes ``blackbox_vs_whitebox.json`` (with
the environment) to ``runs/<name>-blackbox-vs-whitebox/``. One seed: a difference of about 2 points is within
the noise of a ~1.3k-example test split.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgekd.errors import StageError

VARIANTS = ("blackbox", "greybox")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def white_box(run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """The finished run's recipe and its eval metrics (teacher, distilled student, baseline)."""
    from edgekd.cli import load_recipe_or_run
    from edgekd.runfolder import RunFolder

    run = RunFolder(run_dir)
    stages = run.manifest().get("stages", {})
    missing = [s for s in ("teacher", "distill", "eval") if stages.get(s, {}).get("status") != "done"]
    if missing or not (run_dir / "teacher" / "model").is_dir():
        raise StageError(f"{run_dir} lacks the finished stage(s) {missing or ['teacher model']}: "
                         f"run `edgekd run` (the default recipe writes runs/default) first.")
    return load_recipe_or_run(str(run_dir), None), stages["eval"]["metrics"]


def export_teacher(recipe, run_dir: Path, out: Path) -> Path:
    from edgekd.context import RunContext
    from edgekd.teachers import export_classifier

    folder = out / "served-teacher" / "onnx"
    if (folder / "artifact.json").is_file():
        return folder
    ctx = RunContext.create(recipe)
    texts, labels = ctx.splits.texts("test")[:256], ctx.splits.labels("test")[:256]
    rec = export_classifier(run_dir / "teacher" / "model", out / "served-teacher", texts, labels.tolist(),
                            max_length=recipe.data.max_length, name=f"{recipe.name}-teacher")
    print(f"teacher exported to ONNX: {folder} (parity top-1 {rec['parity']['top1_agreement']:.4f}, "
          f"max |diff| {rec['parity']['max_abs_diff']:.2e})", flush=True)
    return folder


class Served:
    """`edgekd serve FOLDER` in a child process on a loopback port."""

    def __init__(self, folder: Path, port: int, log: Path):
        import httpx

        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log, "ab")  # the server's access log, one line per request
        self.proc = subprocess.Popen([sys.executable, "-m", "edgekd", "serve", str(folder), "--port", str(port)],
                                     start_new_session=True, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise StageError(f"`edgekd serve {folder}` exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise StageError("`edgekd serve` did not become ready within 180 s")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def variant_recipe(recipe, variant: str, url: str, run_dir: Path):
    from edgekd.recipe import parse_recipe

    data = recipe.model_dump(mode="json")
    init = recipe.teacher.model if variant == "blackbox" else str((run_dir / "teacher" / "model").resolve())
    data["name"] = f"{recipe.name}-{variant}"
    data["teacher"] = {"kind": "edgekd", "url": url, "model": init, "client": {"batch_size": 32}}
    data["baseline"] = {"enabled": False}
    data["prune"] = {"enabled": False}
    data["quantize"] = {"enabled": False}
    data["export"] = {"targets": []}
    data["bench"] = {"enabled": False}
    return parse_recipe(data, f"{variant} variant of {run_dir}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", nargs="?", default="runs/default", type=Path)
    ap.add_argument("--variants", default="blackbox,greybox", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--port", type=int, default=None, help="loopback port of the served teacher (default: a free one)")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")

    from edgekd.pipeline import run_stages
    from edgekd.runfolder import atomic_write_text, environment

    recipe, wb = white_box(args.run_dir)
    out = Path(recipe.output_dir) / f"{recipe.name}-blackbox-vs-whitebox"
    folder = export_teacher(recipe, args.run_dir, out)
    served = Served(folder, args.port or free_port(), out / "serve.log")
    results: dict[str, Any] = {}
    previous_cache: Path | None = None
    try:
        for variant in variants:
            r = variant_recipe(recipe, variant, served.url, args.run_dir)
            cache = r.run_dir() / "teacher" / "requests"
            if previous_cache is not None and not cache.exists():
                # same teacher, same URL: the answers of the previous variant are reused, not asked again
                shutil.copytree(previous_cache, cache)
            t0 = time.perf_counter()
            ctx = run_stages(r, ["teacher", "distill", "eval"])
            stages = ctx.run.manifest()["stages"]
            ev, teach = stages["eval"]["metrics"], stages["teacher"]["metrics"]
            results[variant] = {
                "teacher_test_accuracy": ev["teacher"]["accuracy"],
                "student_test_accuracy": ev["student"]["accuracy"],
                "student_agreement_with_teacher": ev["student"]["agreement_with_teacher"],
                "student_initialised_from": r.teacher.model,
                "teacher_requests": teach["teachers"][0].get("requests"),
                "texts_asked": teach["teachers"][0].get("asked"),
                "texts_from_cache": teach["teachers"][0].get("from_cache"),
                "labelling_seconds": teach.get("cache_seconds"),
                "distill_train_seconds": stages["distill"]["metrics"]["train_seconds"],
                "seconds": round(time.perf_counter() - t0, 1),
                "run_folder": str(ctx.run.root),
            }
            previous_cache = cache
    finally:
        served.stop()

    white = {"teacher_test_accuracy": wb["teacher"]["accuracy"], "student_test_accuracy": wb["student"]["accuracy"],
             "student_agreement_with_teacher": wb["student"]["agreement_with_teacher"],
             "baseline_test_accuracy": (wb.get("baseline") or {}).get("accuracy")}
    lines = [f"test split: {wb['summary']['test_examples']} examples; one seed ({recipe.seed})", "",
             "| distillation | student init | teacher acc % | student acc % | vs white box (points) | agrees w/ teacher % |",
             "|---|---|---|---|---|---|",
             f"| white box (run {recipe.name}, logits) | fine-tuned teacher layers | "
             f"{100 * white['teacher_test_accuracy']:.2f} | {100 * white['student_test_accuracy']:.2f} | — | "
             f"{100 * white['student_agreement_with_teacher']:.2f} |"]
    for variant, res in results.items():
        diff = 100 * (res["student_test_accuracy"] - white["student_test_accuracy"])
        res["difference_vs_white_box_points"] = round(diff, 2)
        init = "base model" if variant == "blackbox" else "fine-tuned teacher layers"
        lines.append(f"| {variant} (HTTP /predict, probabilities) | {init} | {100 * res['teacher_test_accuracy']:.2f} | "
                     f"{100 * res['student_test_accuracy']:.2f} | {diff:+.2f} | "
                     f"{100 * res['student_agreement_with_teacher']:.2f} |")
    if white["baseline_test_accuracy"] is not None:
        lines.append(f"\nhard-label baseline of the run (same student, no teacher): "
                     f"{100 * white['baseline_test_accuracy']:.2f} %")
    table = "\n".join(lines)
    print(table)
    report = {"white_box": white, "variants": results, "table": table, "environment": environment()}
    atomic_write_text(out / "blackbox_vs_whitebox.json", json.dumps(report, indent=2, default=str))
    print(f"\nwritten: {out / 'blackbox_vs_whitebox.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
