"""The bench stage: every export folder of a run (and optionally the eager fp32 teacher and student)
measured on one device profile, written to ``runs/<name>/bench/<profile>/``.

    results.json  every figure, the environment, the profile and the settings
    results.csv   one row per model and (batch, sequence) case
    table.md      target x precision: size, p50/p99, throughput, accuracy, change vs teacher
    pareto.png    accuracy against p50 latency, Pareto front marked
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.devices import measure, remote_runner, tables
from edgekd.devices.profiles import DeviceProfile, load_profile
from edgekd.errors import EdgeKDError, RecipeError, StageError
from edgekd.export import registered
from edgekd.export.base import made_from_an_earlier_export, read_artifact_meta
from edgekd.progress import progress_bar
from edgekd.recipe import BenchConfig
from edgekd.sections import changed_keys

RESULTS_SCHEMA = 1


def artifact_size(folder: Path, meta: dict[str, Any]) -> int | None:
    """Bytes on disk of the artifact: its file or package folder plus any external-data files."""
    if meta.get("size_bytes") is not None:
        return int(meta["size_bytes"])
    path = folder / meta.get("file", "")
    if not meta.get("file") or not path.exists():
        return None
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    files += [p for p in folder.glob(f"{path.name}.data*") if p.is_file()]
    return sum(p.stat().st_size for p in files)


def discover(run_dir: Path, only: list[str] | None = None) -> list[dict[str, Any]]:
    """One entry per folder under ``run_dir/export/``: its artifact.json, or why it cannot be measured
    (no or an unreadable artifact.json, not built, or its parity check failed when it was exported: such a
    folder is skipped on every connection, as edgekd's loader and the device's runner refuse it)."""
    export_dir = Path(run_dir) / "export"
    if not export_dir.is_dir():
        return []
    found = []
    for folder in sorted(p for p in export_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if only is not None and folder.name not in only:
            continue
        entry: dict[str, Any] = {"name": folder.name, "kind": "artifact", "folder": str(folder)}
        meta_path = folder / "artifact.json"
        if not meta_path.is_file():
            entry.update(status="skipped", reason="no artifact.json: not a finished export folder")
            found.append(entry)
            continue
        try:
            meta = read_artifact_meta(folder)
        except EdgeKDError as e:  # truncated or not an object: named, with its remedy, and the others measured
            entry.update(status="skipped", reason=str(e))
        else:
            entry.update(
                meta=meta, target=meta.get("target", folder.name), precision=meta.get("precision", "fp32"),
                # the runtime that runs it: a quantized folder (onnx-int8) is run by its exporter's (onnx)
                exporter=meta.get("exporter") or meta.get("target", folder.name),
                file=meta.get("file"), sha256=meta.get("sha256"), size_bytes=artifact_size(folder, meta),
            )
            failed_parity = remote_runner.parity_refusal(meta)
            if meta.get("built") is False:
                why = meta.get("reason") or "no reason recorded"
                entry.update(status="skipped", reason=why if why.startswith("not built") else f"not built here: {why}")
            elif failed_parity:  # refused on every connection: timing a model that answers wrongly ranks nothing
                entry.update(status="skipped", reason=failed_parity)
        found.append(entry)
    if only:
        missing = sorted(set(only) - {e["name"] for e in found})
        if missing:
            known = ", ".join(p.name for p in sorted(export_dir.iterdir()) if p.is_dir()) or "none"
            raise StageError(f"bench.targets names export folder(s) {missing} that do not exist; present: {known}.")
    return found


def _torch_entries(torch_models: dict[str, tuple[Any, Any]] | None, workdir: Path) -> list[dict[str, Any]]:
    """Save each eager module so a child process can load it; its file size is the fp32 size."""
    entries = []
    for name, (module, io) in (torch_models or {}).items():
        import torch

        fname = f"torch-{name}.pt"
        torch.save(module, workdir / fname)
        first = next(module.parameters(), None)
        entries.append({
            "name": f"pytorch-{name}", "kind": "torch", "target": "pytorch", "precision": "fp32",
            "module_file": fname, "io": io.to_dict(), "file": fname,
            "preload": sorted({type(m).__module__ for m in module.modules()}),
            "device": str(first.device) if first is not None else "cpu",  # measured where the caller keeps it
            "size_bytes": (workdir / fname).stat().st_size,
        })
    return entries


def _untrimmed_inputs(torch_models: dict[str, tuple[Any, Any]], cfg: BenchConfig, inputs: measure.Inputs,
                      original: tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None] | None,
                      workdir: Path) -> tuple[dict[str, tuple[Any, Any]], dict[str, Any]]:
    """A run that trimmed its vocabulary hands the bench its unpruned PyTorch models (the teacher, the
    distilled student) behind the trimmed vocabulary's id table (``FromTrimmedIds``), so that they read the
    shipped ids. The trimmed tokenizer splits a word it dropped into more pieces, so those ids are longer
    than the ones these models serve: each is timed instead without the table, on ``original`` (the same
    test texts, in the same order, and the same out-of-domain texts, as the tokenizer these models read
    gives them: the run context's ``bench_original_inputs``), in the same plan of calls. Returns the models
    to time and, where any was unwrapped, what they are fed: the files of their inputs (``examples``,
    ``eval_inputs``), the unwrapped names, and the record of both tokenizers' lengths."""
    from edgekd.pruning.vocab import FromTrimmedIds

    wrapped = {n for n, (m, _) in torch_models.items() if isinstance(m, FromTrimmedIds)}
    if not wrapped:
        return torch_models, {}
    models = {n: ((m.module, io) if n in wrapped else (m, io)) for n, (m, io) in torch_models.items()}
    own: dict[str, Any] = {"names": wrapped, "files": {}}
    if inputs.eval_inputs is None:  # synthetic ids: no texts to tokenize, every row fed the same arrays
        return models, own
    if original is None:
        raise StageError(f"the PyTorch models {sorted(wrapped)} read another tokenizer's ids than the shipped files, "
                         "and the bench was not given their ids of the same texts (original_inputs): it would time "
                         "them on the trimmed vocabulary's longer ids")
    theirs = measure.Inputs.from_config(cfg, original[0], original[1], inputs.ood_name)
    if (theirs.n_test, len(next(iter(theirs.eval_inputs.values())))) != (
            inputs.n_test, len(next(iter(inputs.eval_inputs.values())))):
        raise StageError("the original tokenizer's inputs hold other texts than the shipped ones (counts differ): "
                         "they must be the same test and out-of-domain texts in the same order")
    np.savez(workdir / "eval_inputs-original.npz", **theirs.eval_inputs)
    own["files"]["eval_inputs"] = "eval_inputs-original.npz"
    if inputs.examples is not None and theirs.examples is not None:  # the timed texts, in the same plan
        np.savez(workdir / "examples-original.npz", **theirs.examples)
        own["files"]["examples"] = "examples-original.npz"
    n_test = inputs.n_test or len(theirs.eval_inputs["input_ids"])
    shipped = remote_runner.marked_lengths({"attention_mask": np.asarray(inputs.eval_inputs["attention_mask"])[:n_test]})
    their = remote_runner.marked_lengths({"attention_mask": np.asarray(theirs.eval_inputs["attention_mask"])[:n_test]})
    own["tokenizers"] = {
        "texts": int(n_test), "shipped": {"mean_tokens_per_text": float(shipped.mean())},
        "original": {"mean_tokens_per_text": float(their.mean()),
                     "how": f"{', '.join(f'pytorch-{n}' for n in sorted(wrapped))}: the same texts, tokenized by "
                            "the tokenizer these models read (the run's untrimmed one)"},
        "texts_differing_in_length": int((shipped != their).sum()),
    }
    return models, own


# The bench keys a phone's own tool reads (ON_DEVICE.md, devices/ondevice.py): executor_runner over adb takes
# the threads, the warm-up and timed iterations and real or synthetic inputs, at batch 1 only; Xcode's Core ML
# performance report takes none of them. The bench itself reads the rest of what applies on every profile
# (which folders, whether the PyTorch rows are listed, the profile, isolate: checked apart).
TOOL_READS = {"adb": ("threads", "warmup", "runs", "inputs", "batch_sizes"), "xcode": ()}
TOOL_NAMES = {"adb": "ExecuTorch's executor_runner over adb", "xcode": "Xcode's Core ML performance report"}
BENCH_READS = ("enabled", "profile", "targets", "torch_models", "isolate")


def _phone_problems(cfg: BenchConfig, prof: DeviceProfile) -> list[str]:
    """The bench keys set away from their defaults that the profile's phone tool does not read, each named
    with the tool: the phone is timed by that tool as ON_DEVICE.md says, so such a key would be accepted
    and silently ignored (the time budget, the rounds, the scoring keys, ...)."""
    tool = prof.connection.tool
    reads, name = TOOL_READS[tool], TOOL_NAMES[tool]
    reads_text = (", ".join(f"bench.{k}" + (" (batch 1 only)" if k == "batch_sizes" else "") for k in reads)
                  or "none of the bench section's timing keys")
    problems = []
    for key in changed_keys(cfg):
        top = key.split(".", 1)[0]
        if top in BENCH_READS:
            continue
        if top == "batch_sizes" and top in reads:
            if list(cfg.batch_sizes) != [1]:
                problems.append(f"bench.batch_sizes: {name} times batch 1 only (profile '{prof.name}'), so batch "
                                f"sizes {cfg.batch_sizes} would not be timed: set bench.batch_sizes: [1] or drop it")
            continue
        if top not in reads:
            problems.append(f"bench.{top}: the profile '{prof.name}' is timed by {name} (ON_DEVICE.md), which does not "
                            f"read it (it reads {reads_text}): drop bench.{top}")
    return list(dict.fromkeys(problems))


def config_problems(cfg: BenchConfig, prof: DeviceProfile) -> list[str]:
    """What of ``cfg`` the bench on ``prof`` would accept and not apply, each naming its recipe key; []
    when none. ``bench.isolate: false`` measures in this process, so nothing can stop a runtime call that
    hangs (``bench.timeout_s`` stops a child process) and pinning CPUs (the profile's ``cpus``) would pin
    the caller: both are refused there rather than dropped. A phone (a manual profile) is timed by its own
    tool, which reads only some bench keys: the others, set, are refused (:func:`_phone_problems`)."""
    if prof.connection.kind != "local":
        problems = []
        if (prof.connection.kind == "manual" and prof.connection.tool == "adb" and not cfg.threads
                and not (prof.threads or prof.cores)):
            problems.append(f"bench.threads: the profile '{prof.name}' sets neither threads nor cores, and the "
                            "phone's core count cannot be read from here for executor_runner's --cpu_threads: set "
                            "threads (or cores) in the profile, or bench.threads")
        if prof.connection.kind == "manual":
            problems += _phone_problems(cfg, prof)
        # a remote or phone bench runs each model in a process of its own on the device, whatever isolate says
        return problems if cfg.isolate else [*problems,
            f"bench.isolate: false measures in this process, and the profile '{prof.name}' measures on its device "
            f"({prof.connection.kind}), each model in a process of its own there: drop bench.isolate"]
    if cfg.isolate:
        return []
    problems = []
    if changed_keys(cfg, keys=("timeout_s",)):
        problems.append(f"bench.timeout_s: {cfg.timeout_s:g} s stops a measuring child process, and bench.isolate "
                        "is false (every model runs in this process, where a runtime call cannot be stopped): "
                        "drop bench.timeout_s, or set bench.isolate: true")
    if prof.cpus is not None:
        problems.append(f"bench.isolate: false runs every model in this process, which the profile '{prof.name}' "
                        f"cpus {prof.cpus} cannot pin without pinning the caller: set bench.isolate: true, or "
                        "use a profile without cpus")
    return problems


def _measure_local(entries: list[dict[str, Any]], prof: DeviceProfile, cfg: BenchConfig, inputs: measure.Inputs,
                   workdir: Path, own_files: dict[str, str] | None = None) -> None:
    """Measure every entry in rounds. An entry whose ``tokenizer`` is ``original`` (an unpruned model of a
    trimmed run) is fed ``own_files`` instead (its own tokenizer's ids of the same texts), in the same plan."""
    files = inputs.write(workdir)
    threads = cfg.threads or prof.bench_threads()
    # One case list for every model: the same lengths, padding and batches for each row of the table.
    case_list = measure.bench_cases(cfg, entries, inputs)
    todo = []
    for e in entries:
        if e.get("status"):
            continue
        if e["kind"] == "artifact" and not prof.runs_target(e["exporter"]):
            e.update(status="skipped", reason=f"profile '{prof.name}' does not run target '{e['target']}'")
            continue
        cls = registered().get(e.get("exporter", "")) if e["kind"] == "artifact" else None
        why = cls.runs_here() if cls is not None else None
        if why:  # this machine cannot run it: said here, without a process started to find out
            e.update(status="skipped", reason=f"not run here: {why}")
            continue
        todo.append(e)
    spans = measure.round_spans(cfg.runs, cfg.rounds)

    def round_job(e: dict[str, Any], r: int, offset: int, runs: int) -> dict[str, Any]:
        job = measure.round_job(measure.base_job(cfg, e["name"], threads, prof.onnx_providers, prof.cpus, files,
                                                 case_list), cfg, r, len(spans), offset, runs)
        if e.get("tokenizer") == "original":  # the same texts and plan, in its own tokenizer's ids
            job.update({k: v for k, v in (own_files or {}).items() if k in job and job[k] is not None})
        if e.get("scored_elsewhere"):  # its accuracy comes from bench_run's own_outputs: timed only
            job.pop("eval_inputs", None)
        if e["kind"] == "torch":
            job.update(kind="torch", module_file=e["module_file"], io=e["io"], preload=e["preload"],
                       device=e["device"])
        else:
            job.update(kind="artifact", folder=e["folder"])
        return job

    def measure_one(e: dict[str, Any], r: int, offset: int, runs: int) -> tuple[dict, dict | None]:
        job = round_job(e, r, offset, runs)
        bar.note(e["name"] if len(spans) == 1 else f"{e['name']}, round {r + 1}/{len(spans)}")
        try:
            if ahead is not None:  # a fresh process per model and round, started ahead of its turn
                return ahead.run(job)
            return measure.run_job(job, workdir, cfg.isolate, cfg.timeout_s)
        finally:
            bar.advance()

    def plan(order: list[dict[str, Any]], r: int, offset: int, runs: int) -> None:
        if ahead is not None:
            ahead.plan([round_job(e, r, offset, runs) for e in order])

    with progress_bar("bench", total=len(todo) * len(spans)) as bar, contextlib.ExitStack() as stack:
        # POSIX: a process started ahead hears "go" on a pipe it inherits (pass_fds); elsewhere one starts per turn
        # (a profile's cpus pin every measuring process from its start: as many import side by side as they allow)
        ahead = (stack.enter_context(measure.Prestarted(workdir, cfg.timeout_s, width=len(prof.cpus or []) or None))
                 if cfg.isolate and os.name == "posix" else None)
        measure.in_rounds(todo, cfg.runs, cfg.rounds, measure_one, on_skip=bar.advance, on_round=plan)
    for e in todo:
        e.pop("preload", None)


def bench_run(
    run_dir: Path,
    profile: str | None = None,
    cfg: BenchConfig | None = None,
    eval_inputs: dict[str, np.ndarray] | None = None,
    eval_labels: np.ndarray | None = None,
    metric_fn: Callable[[dict[str, np.ndarray], np.ndarray], dict[str, float]] | None = None,
    torch_models: dict[str, tuple[Any, Any]] | None = None,
    reference: dict[str, float] | None = None,
    metric: str = "accuracy",
    input_desc: str | None = None,
    ood: tuple[str, dict[str, np.ndarray], np.ndarray] | None = None,
    own_outputs: Callable[[], dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None, str | None]]]
    | None = None,
    not_current: dict[str, str] | None = None,
    original_inputs: tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None] | None = None,
) -> dict[str, Any]:
    """Measure every export folder of ``run_dir`` (and the eager ``torch_models``, name -> (export
    module, ModelIO)) on ``profile`` (a shipped name or a YAML path; default ``cfg.profile``, i.e.
    local); write ``run_dir/bench/<profile>/`` and return its summary.

    ``eval_inputs``/``eval_labels``/``metric_fn`` give each model's accuracy on the test split;
    ``reference`` ({"teacher": acc, "student": acc}) overrides the run manifest's eval figures;
    ``metric`` is the key of ``metric_fn``'s result that fills the accuracy column (map50_95 for
    detectors). ``ood`` (name, inputs, labels) adds each model's accuracy on an out-of-domain set.
    ``own_outputs()`` (entry name -> (test outputs, OOD outputs, where they came from or None); called only
    where PyTorch models are measured, before they are) scores a model that is timed on inputs it does not
    read as they are (an unpruned model behind a trimmed vocabulary's id table) on the outputs given instead,
    and says so in its note (with their source); such a model is then only timed, not scored a second time
    on inputs it does not read.
    ``not_current`` (folder name -> why) lists export folders the run's recipe no longer makes (the quantized
    ones of a quantize stage it turns off): they are listed as skipped, not measured as current.
    ``original_inputs`` (test inputs, out-of-domain inputs or None) are the same texts in the ids the
    unpruned PyTorch models read where those differ from the shipped ones (a trimmed vocabulary): such a
    model is timed on them, in the same plan of calls as every other row.
    """
    cfg = cfg or BenchConfig()
    run_dir = Path(run_dir).resolve()  # the measuring child runs elsewhere
    prof = load_profile(profile or cfg.profile)
    problems = config_problems(cfg, prof)
    if problems:  # before anything is measured
        raise RecipeError(problems)
    ood_name, ood_inputs, ood_labels = ood or (None, None, None)
    inputs = measure.Inputs.from_config(cfg, eval_inputs, ood_inputs, ood_name)
    entries = discover(run_dir, cfg.targets)
    for e in entries:  # a quantized folder made from an export redone since is not measured as current
        why = None if e.get("status") else (made_from_an_earlier_export(Path(e["folder"]))
                                            or (not_current or {}).get(e["name"]))
        if why:
            e.update(status="skipped", reason=why)
    with tempfile.TemporaryDirectory(prefix="edgekd-bench-") as tmp:
        workdir = Path(tmp)
        kind = prof.connection.kind
        own_inputs: dict[str, Any] = {}
        if torch_models and cfg.torch_models:
            if kind == "local" and prof.runs_pytorch():
                torch_models, own_inputs = _untrimmed_inputs(torch_models, cfg, inputs, original_inputs, workdir)
                entries += _torch_entries(torch_models, workdir)
                for e in entries:
                    if e["name"].removeprefix("pytorch-") in own_inputs.get("names", ()) and e["kind"] == "torch":
                        e["tokenizer"] = "original"
            else:
                reason = (f"eager PyTorch models are measured on the local profile only, not over '{kind}'"
                          if kind != "local" else
                          f"profile '{prof.name}' does not list the pytorch runtime (runtimes: "
                          f"{', '.join(prof.runtimes)}): eager PyTorch models are not measured on it")
                entries += [{"name": f"pytorch-{n}", "kind": "torch", "target": "pytorch", "precision": "fp32",
                             "status": "skipped", "reason": reason} for n in torch_models]
        if not entries:
            raise StageError(
                f"Nothing to benchmark in {run_dir}: no export folders under {run_dir / 'export'} and no "
                "eager models given. Run `edgekd export` first."
            )
        extra_files: dict[str, bytes] = {}
        own: dict[str, Any] = {}
        if kind == "local" and own_outputs is not None and any(e["kind"] == "torch" and not e.get("status")
                                                               for e in entries):
            own = own_outputs()
            for e in entries:
                if e["name"] in own and e["kind"] == "torch":
                    e["scored_elsewhere"] = True
        if kind == "local":
            _measure_local(entries, prof, cfg, inputs, workdir, own_inputs.get("files"))
            env = remote_runner.environment(cfg.threads or prof.bench_threads())
        elif kind == "ssh":
            from edgekd.devices.remote import bench_ssh

            env = bench_ssh(entries, prof, cfg, inputs, workdir, run_dir)
        else:
            from edgekd.devices.ondevice import prepare_on_device

            extra_files = prepare_on_device(entries, prof, cfg, inputs, run_dir)
            env = None
        threads, threads_from = threads_used(cfg, prof, env, entries)
    _label_inputs(entries, inputs, own_inputs)
    ref = measure.reference_accuracies(run_dir, reference, metric)
    for e in entries:
        test_out, ood_out = inputs.split_outputs(e.pop("_outputs", None))
        if e.pop("scored_elsewhere", False) and e.get("status", "ok") == "ok":  # timed; scored on its own inputs
            test_out, ood_out, source = own[e["name"]]
            e["note"] = ("timed on its own tokenizer's ids of the same texts" if e.get("tokenizer") == "original"
                         else "timed on the shipped tokenizer's ids") + "; accuracy on its own tokenizer's ids" + (
                             f" ({source})" if source else "")
        elif e.get("eval_rows_per_call") and test_out is not None:
            e["note"] = f"accuracy: {e['eval_rows_per_call']}"
        metrics = measure.score(test_out, eval_labels, metric_fn)
        e["metrics"] = metrics
        e["accuracy"] = metrics.get(metric) if metrics else None
        e["scored_examples"] = len(next(iter(test_out.values()))) if metrics and test_out else None
        if inputs.ood_name:
            ood_metrics = measure.score(ood_out, ood_labels, metric_fn)
            e["ood_accuracy"] = ood_metrics.get(metric) if ood_metrics else None
    ref = measure.same_examples_reference(ref, entries, len(eval_labels) if eval_labels is not None else None)
    for e in entries:
        e.update(measure.deltas(e["accuracy"], ref))
        add_runtime_notes(e)
        meta = e.pop("meta", None) or {}
        e["max_length"] = meta.get("max_length")
        if meta.get("source_stage"):  # the stage whose model it exports: the table marks the pruned student's
            e["source_stage"] = meta["source_stage"]
    data = {
        "schema": RESULTS_SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": run_dir.name,
        "profile": prof.model_dump(mode="json"),
        "config": cfg.model_dump(mode="json"),
        "headline": tables.headline_case(cfg, real=inputs.plan is not None),
        "inputs": tables.inputs_record(cfg, inputs, threads,
                                       len(measure.round_spans(cfg.runs, cfg.rounds)) if kind in ("local", "ssh") else 1,
                                       threads_from=threads_from, tokenizers=own_inputs.get("tokenizers")),
        "ood": {"dataset": ood_name, "examples": len(ood_labels)} if ood_name else None,
        "metric": metric,
        "input": input_desc,  # e.g. "image 128x128" where inputs have no sequence axis
        "reference": ref,
        "environment": env,
        "results": entries,
    }
    out = run_dir / "bench" / prof.name
    tables.write_bench_dir(out, data, extra_files)
    return summary(data, out)


def _label_inputs(entries: list[dict[str, Any]], inputs: measure.Inputs, own_inputs: dict[str, Any]) -> None:
    """Say in each timed case what it was fed beside its arrays' sha256: the plan of texts (``plan_sha256``,
    the plan every job of this bench was given, real lengths only), and where some rows read another
    tokenizer's ids of those texts (a trimmed run's unpruned models), which tokenizer (``original`` or
    ``shipped``), so the tables check the arrays per tokenizer and the plan across all rows."""
    two = bool(own_inputs.get("files"))
    for e in entries:
        for c in e.get("cases") or []:
            if not c.get("inputs_sha256"):
                continue
            if c.get("seq") == "real" and inputs.plan is not None and f"b{c.get('batch')}" in inputs.plan:
                c["plan_sha256"] = measure.plan_sha256(inputs.plan[f"b{c['batch']}"])
            if two:
                c["tokenizer"] = e.get("tokenizer") or "shipped"


def threads_used(cfg: BenchConfig, prof: DeviceProfile, env: dict[str, Any] | None,
                 entries: list[dict[str, Any]]) -> tuple[int | None, str]:
    """(the thread count the bench's models ran with, where it came from), for its record and table
    header: ``bench.threads``, else the profile's ``threads`` or ``cores``, else all the device's logical
    cores (this machine's locally; over ssh the count the device reported, recorded in ``env``). A phone's
    thread count is the one ON_DEVICE.md passes executor_runner; Xcode's Core ML report takes none."""
    kind = prof.connection.kind
    if kind == "manual" and prof.connection.tool == "xcode":
        return None, "not set: Xcode's Core ML performance report chooses its own"
    if kind == "ssh" and env is not None:
        threads = (env.get("threads") or {}).get("requested")
    elif kind == "manual" and not any(e.get("status") == "pending" for e in entries):
        threads = cfg.threads or prof.threads or prof.cores  # nothing to run on the phone: what it would use
    elif kind == "ssh":
        threads = cfg.threads or prof.threads or prof.cores  # nothing ran on the device, which was not asked
    else:
        threads = cfg.threads or prof.bench_threads()
    if threads is None:
        return None, "not known: nothing ran on the device"
    if cfg.threads:
        return threads, "bench.threads"
    if prof.threads:
        return threads, "the profile's threads"
    if prof.cores and not prof.auto_detect:
        return threads, "the profile's cores"
    return threads, "all of this machine's logical cores" if kind == "local" else "all the device's logical cores"


def add_runtime_notes(e: dict[str, Any]) -> None:
    """Say in a measured row's note how its runtime ran where the table's header does not: the ONNX
    Runtime session its folder chose, and threads the runtime could not be given (the header's thread
    count is then not this row's)."""
    if e.get("status", "ok") != "ok":
        return
    disabled = (((e.get("meta") or {}).get("runtime_options") or {}).get("disabled_optimizers") or [])
    if disabled:  # the session the folder chose, said beside its figures
        session = f"ONNX Runtime session without {', '.join(disabled)} (artifact.json runtime_options)"
        e["note"] = f"{e['note']}; {session}" if e.get("note") else session
    not_applied = (e.get("runtime") or {}).get("threads_not_applied")
    if not_applied:  # first, so the table's note column (its first line) shows it
        e["note"] = f"{not_applied}; {e['note']}" if e.get("note") else not_applied


def summary(data: dict[str, Any], out: Path) -> dict[str, Any]:
    """What the pipeline records in the manifest: the headline figures per model and the files."""
    per_model = {}
    for e in data["results"]:
        row = tables.headline_row(e, data["headline"])
        per_model[e["name"]] = {k: row.get(k) for k in ("status", "p50_ms", "p99_ms", "throughput", "accuracy",
                                                         "ood_accuracy", "delta_vs_teacher", "size_bytes",
                                                         "inputs_sha256", "plan_sha256", "tokenizer")}
        per_model[e["name"]]["pruned"] = tables.pruned(e)  # (the summary's fastest line says so)
    return {
        "profile": data["profile"]["name"],
        "dir": str(out),
        "files": sorted(str(p) for p in out.iterdir() if p.is_file()),
        "headline": data["headline"],
        "inputs": data["inputs"],
        "reference": data["reference"],
        "models": per_model,
    }
