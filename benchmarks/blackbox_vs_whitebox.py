"""What does distilling from a black box cost? The same teacher, white box against black box, over seeds.

    python benchmarks/blackbox_vs_whitebox.py [runs/default] [--variants whitebox,blackbox-unlabelled,...]
        [--seeds 42,43,44] [--port P] [--augment-copies 1]

The teacher is the finished run's fine-tuned teacher (``edgekd run`` wrote it to ``teacher/model``).
This script exports it to ONNX with the project's exporter, serves it with ``edgekd serve`` on
loopback, and distils the run's 3-layer student again, with the run's data, split and distillation
settings, once per seed (``--seeds``) and variant (``--variants``):

- ``whitebox``: the teacher read locally (its logits), the student built from its layers 0/2/4,
  as the run did: re-distilled with each seed so that every variant has the same seeds;
- ``blackbox``: the teacher reached only through ``POST /predict`` of the server
  (``teacher: {kind: edgekd, url: ...}``), nothing but its probabilities; the student is built from
  the public base model (the run's ``teacher.model``, e.g. minilm-l6), as it must be when the
  weights are out of reach;
- ``blackbox-unlabelled``: the same, and the teacher also labels the unlabelled ``movie-snippets``
  texts (``teacher.unlabelled``; their own labels are never read). The loader drops every snippet
  already in the labelled data (any split, the test split included): most of them are;
- ``blackbox-augmented``: the same, and the teacher also labels perturbed copies of the training
  texts (``teacher.augment``: a crop or a word deletion, ``--augment-copies`` per text, a fixed
  augmentation seed so every training seed shares the teacher's answers). Only training texts are
  perturbed;
- ``greybox``: the probabilities over HTTP, but the student built from the fine-tuned teacher's
  layers like the white-box student: it isolates the route of the soft targets (HTTP, ONNX Runtime,
  JSON) from the initialisation.

A variant may carry its own epoch count, ``NAME@EPOCHS`` (e.g. ``blackbox-augmented@5``); without
it the run's ``distill.train.epochs`` applies.

Every answer of the served teacher is cached (one shared cache, merged into and out of each run
folder), so each text is sent once per invocation and server port, whatever the seeds and variants.
Results are written after each distillation to ``runs/<name>-blackbox-vs-whitebox/blackbox_vs_whitebox.json``
(with the environment) and merged with those of earlier invocations, so variants and seeds can be run
selectively; the summary (mean ± sd per variant, paired differences to the white box over the seeds
both have) covers everything in the file. Each distilled student's own run folder and manifest is
``runs/<name>-<variant>-s<seed>/``. ``kill PID`` (SIGTERM) stops it cleanly: the server is stopped and
the invocation recorded; finished distillations are kept, and a later invocation skips them.

Cost on 2 CPU cores: one distillation of the 3-layer student takes about 2-4 min (twice that for
``blackbox-augmented``, whose training set is twice as large); labelling the ~13k texts of the
splits over HTTP about a minute, the ~9.6k augmented texts about two.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgekd.errors import StageError
from edgekd.recipe import AugmentConfig

VARIANTS = ("whitebox", "blackbox", "blackbox-unlabelled", "blackbox-augmented", "greybox")
SCHEMA = 2
UNLABELLED_ASSET = "movie-snippets"
AUGMENT_SEED = 1234
DEFAULT_PORT = 18642  # fixed, so the answer cache (keyed by the teacher's URL) is reused across invocations


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


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


def export_teacher(recipe, out: Path) -> tuple[Path, dict[str, Any] | None]:
    from edgekd.teachers.export import export_run_teacher, parity_summary

    folder = out / "served-teacher" / "onnx"
    if (folder / "artifact.json").is_file():
        return folder, None
    rec = export_run_teacher(recipe, out / "served-teacher")
    print(f"teacher exported to ONNX: {folder} ({parity_summary(rec)})", flush=True)
    return folder, rec.get("parity")


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


# --- the answer cache shared by every run folder of this benchmark ------------------------------------------
def merge_cache(src: Path, dst: Path) -> int:
    """Append to each ``dst/<teacher>.jsonl`` the answers of ``src/<teacher>.jsonl`` it lacks; returns how many."""
    added = 0
    if not src.is_dir():
        return 0
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.jsonl")):
        target = dst / f.name
        have: set[str] = set()
        if target.is_file():
            data = target.read_bytes()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                os.truncate(target, end)  # a partial last line (a crash): the cache itself drops it the same way
            have = {json.loads(line)["k"] for line in data[:end].splitlines() if line.strip()}
        data = f.read_bytes()
        new = [line for line in data[: data.rfind(b"\n") + 1].splitlines()
               if line.strip() and json.loads(line)["k"] not in have]
        if new:
            with open(target, "ab") as out:
                out.write(b"\n".join(new) + b"\n")
            added += len(new)
    return added


def cache_size(folder: Path) -> int:
    return sum(sum(1 for line in f.open("rb") if line.strip()) for f in folder.glob("*.jsonl")) if folder.is_dir() else 0


# --- recipes -------------------------------------------------------------------------------------------------
def parse_variant(spec: str) -> tuple[str, float | None]:
    name, _, epochs = spec.partition("@")
    return name, (float(epochs) if epochs else None)


def label_of(name: str, epochs: float | None) -> str:
    return name if epochs is None else f"{name}@{epochs:g}ep"


def variant_recipe(recipe, name: str, epochs: float | None, seed: int, run_dir: Path, url: str | None,
                   unlabelled: str | None, augment_copies: int = 1):
    from edgekd.recipe import parse_recipe

    data = recipe.model_dump(mode="json")
    finetuned = str((run_dir / "teacher" / "model").resolve())
    suffix = name if epochs is None else f"{name}-e{epochs:g}"
    data["name"] = f"{recipe.name}-{suffix}-s{seed}"
    data["seed"] = seed
    if name == "whitebox":
        # the run's own teacher section, its model now the fine-tuned folder (it has a task head: no fine-tuning)
        data["teacher"]["model"] = finetuned
    else:
        init = finetuned if name == "greybox" else recipe.teacher.model
        data["teacher"] = {"kind": "edgekd", "url": url, "model": init, "client": {"batch_size": 32}}
        if unlabelled:
            data["teacher"]["unlabelled"] = {"dataset": unlabelled}
        if name == "blackbox-augmented":
            # one augmentation seed for every training seed: the teacher is asked about each copy once
            data["teacher"]["augment"] = {"copies": augment_copies, "seed": AUGMENT_SEED}
    if epochs is not None:
        data["distill"]["train"]["epochs"] = epochs
    data["baseline"] = {"enabled": False}
    data["prune"] = {"enabled": False}
    data["quantize"] = {"enabled": False}
    data["export"] = {"targets": []}
    data["bench"] = {"enabled": False}
    return parse_recipe(data, f"{label_of(name, epochs)} variant (seed {seed}) of {run_dir}")


# --- summary ---------------------------------------------------------------------------------------------
def mean_sd(xs: list[float]) -> dict[str, Any]:
    return {"n": len(xs), "mean": round(statistics.fmean(xs), 3) if xs else None,
            "sd": round(statistics.stdev(xs), 3) if len(xs) > 1 else None,
            "min": round(min(xs), 3) if xs else None, "max": round(max(xs), 3) if xs else None}


def summarise(report: dict[str, Any]) -> str:
    """Fill report['summary'] (points, i.e. %) and return the markdown table."""
    runs = report["runs"]
    white = {int(s): r["student_test_accuracy"] for s, r in runs.get("whitebox", {}).items()}
    summary: dict[str, Any] = {}
    order = sorted(runs, key=lambda v: (VARIANTS.index(v.split("@")[0]), v))
    for label in order:
        per_seed = {int(s): r for s, r in runs[label].items()}
        accs = [100 * per_seed[s]["student_test_accuracy"] for s in sorted(per_seed)]
        entry: dict[str, Any] = {
            "seeds": sorted(per_seed),
            "student_test_accuracy_pct": mean_sd(accs),
            "per_seed_pct": {s: round(100 * per_seed[s]["student_test_accuracy"], 2) for s in sorted(per_seed)},
            "agreement_with_teacher_pct": mean_sd([100 * r["student_agreement_with_teacher"] for r in per_seed.values()]),
            "teacher_test_accuracy_pct": sorted({round(100 * r["teacher_test_accuracy"], 2) for r in per_seed.values()}),
            "epochs": sorted({r["epochs"] for r in per_seed.values()}),
            "train_rows": sorted({r["train_rows"] for r in per_seed.values()}),
        }
        if label != "whitebox":
            paired = sorted(set(per_seed) & set(white))
            diffs = [100 * (per_seed[s]["student_test_accuracy"] - white[s]) for s in paired]
            d = mean_sd(diffs)
            if len(diffs) > 1:
                d["se"] = round(statistics.stdev(diffs) / len(diffs) ** 0.5, 3)
            d["per_seed"] = {s: round(x, 2) for s, x in zip(paired, diffs, strict=True)}
            d["within_1_point"] = (d["mean"] >= -1.0) if diffs else None
            entry["difference_vs_whitebox_points"] = d
        summary[label] = entry
    report["summary"] = summary
    asked = [r for label in runs if label != "whitebox" for r in runs[label].values()]
    report["teacher_traffic"] = {  # what every black-box run in the report sent (the cache answers the rest)
        "texts_sent": sum(int(r.get("texts_asked") or 0) for r in asked),
        "requests": sum(int(r.get("teacher_requests") or 0) for r in asked),
        "texts_answered_from_cache": sum(int(r.get("texts_from_cache") or 0) for r in asked),
        "answers_in_shared_cache": report.get("teacher_answers_cached"),
    }

    def pm(ms: dict[str, Any], signed: bool = False) -> str:
        if ms["mean"] is None:
            return "—"
        m = f"{ms['mean']:+.2f}" if signed else f"{ms['mean']:.2f}"
        return m + (f" ± {ms['sd']:.2f}" if ms["sd"] is not None else "")

    lines = [f"test split: {report['test_examples']} examples; mean ± sd over seeds (sample sd); "
             f"differences paired by seed", "",
             "| distillation | student init | train rows | epochs | seeds | student acc % (per seed) | "
             "mean ± sd % | vs white box, points (mean ± sd) | agrees w/ teacher % |",
             "|---|---|---|---|---|---|---|---|---|"]
    init = {"whitebox": "fine-tuned teacher layers", "greybox": "fine-tuned teacher layers"}
    route = {"whitebox": "white box (local logits)", "blackbox": "black box (HTTP probs)",
             "blackbox-unlabelled": f"black box + {UNLABELLED_ASSET} unlabelled",
             "blackbox-augmented": "black box + augmented train texts", "greybox": "grey box (HTTP probs)"}
    for label, e in summary.items():
        name = label.split("@")[0]
        per = ", ".join(f"{v:.2f}" for v in e["per_seed_pct"].values())
        diff = pm(e["difference_vs_whitebox_points"], signed=True) if "difference_vs_whitebox_points" in e else "—"
        lines.append(f"| {route[name]}{'' if '@' not in label else ' ' + label.split('@')[1]} | "
                     f"{init.get(name, 'public base model')} | {'/'.join(map(str, e['train_rows']))} | "
                     f"{'/'.join(f'{x:g}' for x in e['epochs'])} | {','.join(map(str, e['seeds']))} | {per} | "
                     f"{pm(e['student_test_accuracy_pct'])} | {diff} | {pm(e['agreement_with_teacher_pct'])} |")
    wb = report["run_white_box"]
    lines.append(f"\nthe run itself (seed {wb['seed']}): teacher {100 * wb['teacher_test_accuracy']:.2f} %, white-box "
                 f"student {100 * wb['student_test_accuracy']:.2f} %, hard-label baseline "
                 + (f"{100 * wb['baseline_test_accuracy']:.2f} %" if wb.get("baseline_test_accuracy") else "—"))
    t = report["teacher_traffic"]
    lines.append(f"served teacher: {t['texts_sent']} texts sent in {t['requests']} POST /predict requests, "
                 f"{t['texts_answered_from_cache']} answered from the cache")
    return "\n".join(lines)


def load_report(path: Path, run_dir: Path) -> dict[str, Any]:
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("schema") == SCHEMA and old.get("run") == str(run_dir.resolve()):
            return old
        print(f"note: {path} is from another layout or run; starting a new report", flush=True)
    return {"schema": SCHEMA, "run": str(run_dir.resolve()), "runs": {}, "invocations": []}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", nargs="?", default="runs/default", type=Path)
    ap.add_argument("--variants", default="whitebox,blackbox-unlabelled",
                    help=f"comma-separated NAME[@EPOCHS], NAME of {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", default=None, help="comma-separated training seeds (default: the run's seed and the next two)")
    ap.add_argument("--port", type=int, default=None,
                    help=f"loopback port of the served teacher (default {DEFAULT_PORT}, else a free one)")
    ap.add_argument("--augment-copies", type=int, default=1, help="perturbed copies per training text (blackbox-augmented)")
    ap.add_argument("--force", action="store_true", help="re-run the stages of runs already in the report")
    args = ap.parse_args(argv)
    specs = [parse_variant(v.strip()) for v in args.variants.split(",") if v.strip()]
    bad = [n for n, _ in specs if n not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")

    from edgekd.pipeline import run_stages
    from edgekd.runfolder import RunFolder, atomic_write_text, environment

    recipe, wb = white_box(args.run_dir)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [recipe.seed, recipe.seed + 1, recipe.seed + 2]
    out = Path(recipe.output_dir) / f"{recipe.name}-blackbox-vs-whitebox"
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "blackbox_vs_whitebox.json"
    report = load_report(report_path, args.run_dir)
    report["test_examples"] = wb["summary"]["test_examples"]
    report["run_white_box"] = {
        "seed": recipe.seed, "teacher_test_accuracy": wb["teacher"]["accuracy"],
        "student_test_accuracy": wb["student"]["accuracy"],
        "student_agreement_with_teacher": wb["student"]["agreement_with_teacher"],
        "baseline_test_accuracy": (wb.get("baseline") or {}).get("accuracy")}
    report["settings"] = {"student_layers": recipe.student.layers, "distill": recipe.distill.model_dump(mode="json"),
                          "base_model": recipe.teacher.model, "data": recipe.data.dataset,
                          "augment": AugmentConfig(copies=args.augment_copies, seed=AUGMENT_SEED).model_dump(mode="json")}

    shared_cache = out / "teacher-answers"
    served = None
    invocation: dict[str, Any] = {"argv": sys.argv[1:] if argv is None else argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                  "texts_sent_to_teacher": 0, "teacher_requests": 0, "distillations": 0}
    t_start = time.perf_counter()
    # `kill PID` ends the benchmark through the finally below: the server stopped, this invocation recorded
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if any(n != "whitebox" for n, _ in specs):
            folder, parity = export_teacher(recipe, out)
            if parity:
                report["served_teacher_onnx_parity"] = parity
            port = args.port or (DEFAULT_PORT if port_is_free(DEFAULT_PORT) else free_port())
            served = Served(folder, port, out / "serve.log")
            report["served_teacher_url"] = served.url
            print(f"teacher served at {served.url} ({folder})", flush=True)
        for seed in seeds:
            for name, epochs in specs:
                label = label_of(name, epochs)
                if not args.force and str(seed) in report["runs"].get(label, {}):
                    print(f"{label} seed {seed}: in the report already (--force to redo)", flush=True)
                    continue
                unl = UNLABELLED_ASSET if name == "blackbox-unlabelled" else None
                r = variant_recipe(recipe, name, epochs, seed, args.run_dir, served.url if served else None, unl,
                                   args.augment_copies)
                cache = r.run_dir() / "teacher" / "requests"
                if name != "whitebox":
                    merge_cache(shared_cache, cache)  # same teacher, same URL: its answers are not asked again
                print(f"\n=== {label}, seed {seed}: {r.run_dir()} ===", flush=True)
                before = RunFolder(r.run_dir()).stage_record("teacher") if r.run_dir().is_dir() else None
                t0 = time.perf_counter()
                ctx = run_stages(r, ["teacher", "distill", "eval"], force=args.force)
                seconds = round(time.perf_counter() - t0, 1)
                stages = ctx.run.manifest()["stages"]
                ev, teach, dist = stages["eval"]["metrics"], stages["teacher"]["metrics"], stages["distill"]["metrics"]
                res: dict[str, Any] = {
                    "seed": seed,
                    "epochs": r.distill.train.epochs,
                    "teacher_test_accuracy": ev["teacher"]["accuracy"],
                    "student_test_accuracy": ev["student"]["accuracy"],
                    "student_macro_f1": ev["student"].get("macro_f1"),
                    "student_agreement_with_teacher": ev["student"]["agreement_with_teacher"],
                    "student_validation_accuracy": dist["validation"]["accuracy"],
                    "student_initialised_from": r.teacher.model,
                    "train_rows": dist["train_examples"],
                    "distill_train_seconds": dist["train_seconds"],
                    "seconds": seconds,
                    "run_folder": str(ctx.run.root),
                }
                if name != "whitebox":
                    member = teach["teachers"][0]
                    res.update(teacher_requests=member.get("requests"), texts_asked=member.get("asked"),
                               texts_from_cache=member.get("from_cache"), labelling_seconds=member.get("seconds"),
                               teacher_client=member)
                    if "unlabelled" in teach:
                        res["unlabelled"] = teach["unlabelled"]
                    if stages["teacher"].get("finished") != (before or {}).get("finished"):  # not skipped as unchanged
                        invocation["texts_sent_to_teacher"] += int(member.get("asked") or 0)
                        invocation["teacher_requests"] += int(member.get("requests") or 0)
                    merge_cache(cache, shared_cache)
                invocation["distillations"] += 1
                report["runs"].setdefault(label, {})[str(seed)] = res
                report["table"] = summarise(report)
                report["environment"] = environment()
                atomic_write_text(report_path, json.dumps(report, indent=2, default=str))
                print(f"{label} seed {seed}: student {100 * res['student_test_accuracy']:.2f} % "
                      f"({seconds:.0f} s)", flush=True)
    finally:
        if served is not None:
            served.stop()
        invocation["seconds"] = round(time.perf_counter() - t_start, 1)
        invocation["teacher_answers_cached"] = cache_size(shared_cache)
        report.setdefault("invocations", []).append(invocation)
        report["teacher_answers_cached"] = cache_size(shared_cache)
        if report["runs"]:
            report["table"] = summarise(report)
        report["environment"] = environment()
        atomic_write_text(report_path, json.dumps(report, indent=2, default=str))

    print("\n" + report.get("table", "(no results)"))
    print(f"\nwritten: {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
