"""Prune-stage variants on a finished run folder: validation/test accuracy, parameters and the
shipped (int8 ONNX) size side by side, chosen on validation, reported on test.

    python benchmarks/prune_variants.py default vocab-stats                    # kept tokens and coverage per setting
    python benchmarks/prune_variants.py runs/default trim@distill              # vocabulary trimming of the run's distilled student
    python benchmarks/prune_variants.py runs/default hidden="prune.recover_hidden_weight=1.0"
    python benchmarks/prune_variants.py ood-sets runs/default runs/default-hidden   # shipped vs student, 3 OOD sets
    python benchmarks/prune_variants.py ensembles runs/default      # teacher, student and the two averaged
    python benchmarks/prune_variants.py chain runs/default-seed42 runs/default-seed43   # student -> shipped, step by step
    python benchmarks/prune_variants.py versus hidden runs/default-seed42 runs/default-seed43  # <run>-hidden against <run>

``trim[:MIN_COUNT][:chars][:first=N][@STAGE]`` (e.g. ``trim:1:first=10000@distill``) trims the run's pruned (or STAGE's, e.g. distill) student as it
is (no retraining). Any other
``NAME="key=value;key=value"`` reruns `edgekd prune`, `edgekd export --to onnx` and `edgekd quantize`
with those overrides in a hard-linked copy of the run folder (<run>-NAME; stages write to new
folders and rename, so the copy never changes the original).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Scored by `ood-sets`: the default's eval.ood_dataset and two sets no recipe choice reads.
OOD_SETS = ["amazon-snippets", "tweet-snippets", "nyt-snippets"]


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.onnx"))


def trim_variant(run: Path, spec: str) -> dict:
    import numpy as np

    from edgekd.cli import load_recipe_or_run
    from edgekd.export import get_exporter
    from edgekd.export.parity import run_as_served
    from edgekd.pipeline import create_context
    from edgekd.quantization.onnx_methods import make_method
    from edgekd.stages.base import load_stage_model
    from edgekd.tasks.text.prune import _trim_vocab

    spec, _, stage = spec.partition("@")
    min_count, chars, first = 1, False, 0
    for part in spec.split(":")[1:]:
        if part == "chars":
            chars = True
        elif part.startswith("first="):
            first = int(part.removeprefix("first="))
        elif part.isdigit():
            min_count = int(part)
        else:
            raise SystemExit(f"{spec}: unknown part '{part}' (MIN_COUNT, chars or first=N)")
    recipe = load_recipe_or_run(str(run), ["prune.enabled=true", "prune.trim_vocab=true",
                                           f"prune.vocab_min_count={min_count}", f"prune.vocab_keep_chars={chars}",
                                           f"prune.vocab_keep_first={first}"])
    ctx = create_context(recipe)
    model = load_stage_model(ctx, stage or "prune").eval()
    t0 = time.perf_counter()
    model, tok, info = _trim_vocab(ctx, model, ctx.tokenized("train", ctx.tokenizer))
    seconds = time.perf_counter() - t0
    out = {"variant": f"{spec} of the {stage or 'prune'} stage's model", "val": info["after"]["validation"]["accuracy"], "test": info["after"]["test"]["accuracy"],
           "val_untrimmed": info["before"]["validation"]["accuracy"], "test_untrimmed": info["before"]["test"]["accuracy"],
           "params": info["params_after"], "params_untrimmed": info["params_before"], "vocab": info["vocab_after"],
           "trim_s": round(seconds, 1)}
    # The shipped form: ONNX, the recipe's int8 (no guard), test accuracy with the trimmed tokenizer's ids,
    # scored as served and as the quantize stage scores the NAME=... rows (dynamic int8: one text per call at
    # its own length, its activation scales being per call), so the column holds one kind of figure.
    test = ctx.tokenized("test", tok)
    batch = test.collate(np.arange(len(test)))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with tempfile.TemporaryDirectory() as tmp:
        ex = get_exporter("onnx")
        module, _ = ctx.task.shipped_module(model, recipe.export, inputs)
        res = ex.export(module, {k: v[:8] for k, v in inputs.items()}, ctx.task.model_io(),
                        Path(tmp) / "fp32")
        import onnx

        g = onnx.load(str(res.path), load_external_data=False).graph
        names = [i.name for i in g.input]
        dtypes = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in g.input}
        q = make_method(recipe.quantize, None, names, dtypes, Path(tmp), False)
        dst = Path(tmp) / "int8.onnx"
        q.quantize(Path(res.path), dst, [])
        runner = ex.load(dst, threads=recipe.runtime.threads)
        acc = ctx.task.metrics(run_as_served(runner.run, inputs, 64, q.precision), batch["labels"])["accuracy"]
        out.update({"int8_test": acc, "int8_onnx_bytes": dst.stat().st_size})
    return out


def one_at_a_time(run: Path, folder: Path, ood_sets: list[str] | None = None) -> dict[str, float]:
    """Accuracy of an export folder as it is served (a dynamic-int8 file one text per call at its own
    length: ``edgekd.export.parity.run_as_served``) on the validation and test splits and the recipe's
    out-of-domain set, with the folder's tokenizer; with ``ood_sets``, on those named out-of-domain
    sets instead of the splits (keyed by name)."""
    return {name: acc for name, (acc, _) in served_outputs(run, folder, ood_sets).items()}


def served_outputs(run: Path, folder: Path, ood_sets: list[str] | None = None,
                   ood: bool = True) -> dict[str, tuple[float, Any]]:
    """:func:`one_at_a_time`'s (accuracy, logits) per split; ``ood=False`` leaves out the recipe's
    out-of-domain set (validation and test only)."""
    import numpy as np

    from edgekd.export.parity import run_as_served
    from edgekd.export.stage import load_artifact
    from edgekd.pipeline import create_context
    from edgekd.recipe import load_recipe

    recipe = load_recipe(run / "recipe.yaml")
    ctx = create_context(recipe)
    tok = ctx.task.load_tokenizer(folder)
    if ood_sets:
        splits = {name: _ood_split(ctx, name, tok) for name in ood_sets}
    else:
        splits = {"val": ctx.tokenized("validation", tok), "test": ctx.tokenized("test", tok)}
        if ood and recipe.eval.ood_dataset:
            splits["ood"] = _ood_split(ctx, recipe.eval.ood_dataset, tok)
    runner, meta = load_artifact(folder, threads=recipe.runtime.threads)
    out = {}
    for name, split in splits.items():
        batch = split.collate(np.arange(len(split)))
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        outputs = run_as_served(runner.run, inputs, 64, meta.get("precision"))
        out[name] = (float(ctx.task.metrics(outputs, split.labels)["accuracy"]), outputs["logits"])
    return out


def _shipped_int8(run: Path) -> Path:
    """The run's int8 export folder, once it is the folder the run ships (the rule of `edgekd serve`,
    ``edgekd.report.shipped_artifact``); a run that ships another is refused, never read as if it did."""
    from edgekd.report import shipped_artifact
    from edgekd.runfolder import RunFolder

    name, why = shipped_artifact(RunFolder(run))
    if name != "onnx-int8":
        raise SystemExit(f"{run}: ships {name or 'nothing'} ({why}), not the int8 file these tables score")
    return run / "export" / name


def _student_accuracy(ctx, split, what: str) -> tuple[float, Any]:
    """(accuracy, logits) of the run's fp32 distilled student (PyTorch) on ``split``, tokenized with
    the teacher's tokenizer as the distill stage reads it."""
    from edgekd.stages.base import load_stage_model
    from edgekd.train import predict

    cache = ctx.__dict__.setdefault("_variants_student", {})
    if "model" not in cache:
        cache["model"] = load_stage_model(ctx, "distill").eval()
    logits = predict(cache["model"], split, ctx.recipe.eval.batch_size, what)
    return float(ctx.task.metrics({"logits": logits}, split.labels)["accuracy"]), logits


def _ood_split(ctx, name: str, tok):
    from edgekd.ood import load_ood, run_texts
    from edgekd.tasks.text.task import TokenizedSplit

    ood = load_ood(name, ctx.task.label_names, ctx.recipe.eval.ood_min_abs_score, exclude=run_texts(ctx))
    return TokenizedSplit(ctx.task.tokenize(tok, ood.texts), ood.labels, tok.pad_token_id or 0)


def ood_sets(runs: list[Path], names: list[str]) -> None:
    """The shipped int8 file of each run (one text at a time) and its fp32 distilled student (PyTorch)
    on the named out-of-domain sets: how much of the student's accuracy the shipped file keeps there."""
    from edgekd.pipeline import create_context
    from edgekd.recipe import load_recipe

    print("| run | " + " | ".join(f"{n}: shipped / student" for n in names) + " |")
    print("|---|" + "--:|" * len(names))
    for run in runs:
        shipped = one_at_a_time(run, _shipped_int8(run), names)
        ctx = create_context(load_recipe(run / "recipe.yaml"))
        cells = []
        for name in names:
            acc, _ = _student_accuracy(ctx, _ood_split(ctx, name, ctx.tokenizer), f"student: {name}")
            cells.append(f"{shipped[name]:.2%} / {acc:.2%} ({shipped[name] / acc:.1%})")
        print(f"| {run.name} | " + " | ".join(cells) + " |", flush=True)


def vocab_stats(run_or_recipe: str) -> None:
    """Kept tokens per setting and the share of validation/test token ids they cover (no model needed)."""
    import numpy as np

    from edgekd.cli import load_recipe_or_run
    from edgekd.pipeline import create_context
    from edgekd.pruning.vocab import domain_token_ids

    ctx = create_context(load_recipe_or_run(run_or_recipe, None))
    tok = ctx.tokenizer
    train = ctx.tokenized("train", tok)
    from transformers import AutoConfig

    width = AutoConfig.from_pretrained(ctx.task.resolve(ctx.recipe.teacher.model)).hidden_size
    print("| vocab_min_count | vocab_keep_chars | vocab_keep_first | kept tokens | embedding params | validation ids "
          "kept | test ids kept |")
    print("|--:|---|--:|--:|--:|--:|--:|")
    for mc, chars, first in [(mc, chars, 0) for mc in (1, 2, 3, 5) for chars in (False, True)] + [
            (1, False, first) for first in (5000, 10000, 20000)]:
        keep = set(domain_token_ids(train.input_ids, tok, mc, chars, first))
        cov = []
        for split in ("validation", "test"):
            ids = [i for seq in ctx.tokenized(split, tok).input_ids for i in seq]
            cov.append(float(np.mean([i in keep for i in ids])))
        print(f"| {mc} | {chars} | {first} | {len(keep)} of {len(tok)} | {len(keep) * width / 1e6:.2f}M | "
              f"{cov[0]:.2%} | {cov[1]:.2%} |")


def chain(runs: list[Path]) -> None:
    """Where the shipped file's accuracy goes, step by step, on validation, test and the two pooled
    (2,550 texts): the fp32 distilled student (PyTorch), the same student with its vocabulary trimmed
    (the prune stage's own record), the pruned fp32 student (its ONNX export) and the shipped int8 file
    (one text at a time). The splits are the same texts for every seed (``data.split.seed``; runs whose
    labels differ are refused), so the last two lines average the pruned and the shipped file minus the
    student over the runs text by text, the text as the unit (``_compare_report.seed_averaged``): the
    expected gap, which one split of 1,275 texts says little about."""
    import numpy as np
    from _compare_report import seed_averaged

    from edgekd.pipeline import create_context
    from edgekd.recipe import load_recipe

    if not runs:
        raise SystemExit("chain: give one or more run folders (e.g. runs/default-seed42 runs/default-seed43)")
    splits = ("val", "test")
    print("| run | student: val / test / pooled | vocabulary trimmed: val / test | pruned fp32: val / test / pooled "
          "| shipped int8: val / test / pooled |")
    print("|---|--:|--:|--:|--:|")
    pairs: dict[str, list] = {"fp32": [], "shipped": []}
    labels, means = None, []
    for run in runs:
        ctx = create_context(load_recipe(run / "recipe.yaml"))
        shipped = served_outputs(run, _shipped_int8(run), ood=False)
        fp32 = served_outputs(run, run / "export" / "onnx", ood=False)
        vocab = json.loads((run / "manifest.json").read_text())["stages"]["prune"]["metrics"].get("vocab", {})
        answers: dict[str, list[int]] = {"student": [], "fp32": [], "shipped": []}
        run_labels: list[int] = []
        n_val = 0
        for split, full in zip(splits, ("validation", "test"), strict=True):
            data = ctx.tokenized(full, ctx.tokenizer)
            n_val = n_val or len(data.labels)
            answers["student"] += np.asarray(_student_accuracy(ctx, data, f"student: {full}")[1]).argmax(-1).tolist()
            answers["fp32"] += np.asarray(fp32[split][1]).argmax(-1).tolist()
            answers["shipped"] += np.asarray(shipped[split][1]).argmax(-1).tolist()
            run_labels += [int(y) for y in data.labels]
        labels = _same_texts(run, labels, run_labels)
        y = np.asarray(labels)
        acc = {k: [float(np.mean(np.asarray(v)[sl] == y[sl])) for sl in (slice(0, n_val), slice(n_val, None),
                                                                         slice(None))] for k, v in answers.items()}
        acc["trimmed"] = [vocab["after"][s]["accuracy"] if vocab.get("after") else float("nan")
                          for s in ("validation", "test")]
        means.append(acc)
        print(f"| {run.name} | " + " | ".join(_pcts(acc[k]) for k in ("student", "trimmed", "fp32", "shipped")) + " |",
              flush=True)
        for key in pairs:
            pairs[key].append((answers[key], answers["student"]))
    order = ("student", "trimmed", "fp32", "shipped")
    mean = {k: np.mean([m[k] for m in means], axis=0) for k in order}
    print("| mean | " + " | ".join(_pcts(mean[k]) for k in order) + " |\n")
    for key, name in (("fp32", "pruned fp32"), ("shipped", "shipped int8")):
        got = seed_averaged(pairs[key], labels)
        lo, hi = got["ci95_pp"]
        print(f"{name} minus student, validation and test pooled ({got['n']} texts), averaged over {got['seeds']} "
              f"runs text by text: {got['diff_pp']:+.2f} points (95% interval {lo:+.2f} to {hi:+.2f})")


def _same_texts(run: Path, labels: list[int] | None, run_labels: list[int]) -> list[int]:
    """``run_labels`` once they are the earlier runs' (``labels``; None for the first run): averaging
    text by text over runs needs the same validation and test texts in every one."""
    if labels is not None and labels != run_labels:
        raise SystemExit(f"{run}: its validation and test labels are not the other runs' (another data.split?): "
                         "the text-by-text average needs the same texts in every run")
    return run_labels


def versus(name: str, runs: list[Path]) -> None:
    """Each run's shipped int8 file against its variant's (``<run>-NAME``, made by ``RUN NAME=...``),
    both one text at a time: per run and on average, validation / test / pooled / out of domain, then
    the variant minus the run averaged over the runs text by text (``_compare_report.seed_averaged``) on
    validation, test and the two pooled. A variant folder whose stages before prune are not its run's
    (another teacher or student, e.g. the run was made again after the copy) is refused: the
    difference would not be the prune settings' alone."""
    import numpy as np
    from _compare_report import seed_averaged

    from edgekd.pipeline import create_context
    from edgekd.recipe import load_recipe

    if not runs:
        raise SystemExit(f"versus {name}: give the run folders whose '-{name}' copies to compare "
                         f"(e.g. runs/default-seed42 runs/default-seed43)")
    print(f"| run | shipped: val / test / pooled / OOD | {name}: val / test / pooled / OOD |")
    print("|---|--:|--:|")
    labels = None
    pairs: dict[str, list] = {"val": [], "test": [], "pooled": []}
    table = []
    for run in runs:
        var = run.parent / f"{run.name}-{name}"
        if not (var / "manifest.json").exists():
            raise SystemExit(f"{var}: no such variant run (make it with: python benchmarks/prune_variants.py "
                             f"{run} {name}=\"key=value;...\")")
        stages = [json.loads((r / "manifest.json").read_text())["stages"] for r in (run, var)]
        for stage in ("teacher", "distill"):
            if stages[0][stage]["fingerprint"] != stages[1][stage]["fingerprint"]:
                raise SystemExit(f"{var}: its {stage} stage is not {run}'s (made again since the copy?); "
                                 "make the variant again from the run as it is")
        ctx = create_context(load_recipe(run / "recipe.yaml"))
        run_labels = [int(y) for split in ("validation", "test") for y in ctx.tokenized(split, ctx.tokenizer).labels]
        labels = _same_texts(run, labels, run_labels)
        row, answers = [], []
        for r in (run, var):
            out = served_outputs(r, _shipped_int8(r))
            ans = {k: np.asarray(out[k][1]).argmax(-1).tolist() for k in ("val", "test")}
            ood = out["ood"][0] if "ood" in out else float("nan")  # a recipe without eval.ood_dataset: '-'
            acc = [out["val"][0], out["test"][0], (out["val"][0] + out["test"][0]) / 2, ood]
            row.append(acc)
            answers.append(ans)
        table.append(row)
        print(f"| {run.name} | " + " | ".join(_pcts(a) for a in row) + " |", flush=True)
        base, variant = answers
        for key in pairs:
            pick = (lambda x: x["val"] + x["test"]) if key == "pooled" else (lambda x, k=key: x[k])
            pairs[key].append((pick(variant), pick(base)))  # seed_averaged: the first minus the second
    mean = np.mean(np.asarray(table), axis=0)
    print("| mean | " + " | ".join(_pcts(m) for m in mean) + " |\n")
    n_val = len(pairs["val"][0][0])
    for key, ys in (("val", labels[:n_val]), ("test", labels[n_val:]), ("pooled", labels)):
        got = seed_averaged(pairs[key], ys)
        lo, hi = got["ci95_pp"]
        print(f"{name} minus the run's shipped file, {key} ({got['n']} texts), averaged over {got['seeds']} runs "
              f"text by text: {got['diff_pp']:+.2f} points (95% interval {lo:+.2f} to {hi:+.2f})")


def _pcts(values) -> str:
    return " / ".join("-" if v != v else f"{v:.2%}" for v in values)  # NaN: a run without a vocabulary trim


def ensembles(runs: list[Path]) -> None:
    """The teacher, the distilled student and the two averaged (the mean of their softmaxes, as
    ``prune.recover_soft_targets: teacher+unpruned`` trains against at the distillation temperature,
    here at 1) on validation and test: how much an ensemble of the two knows beyond either."""
    import numpy as np
    import torch

    from edgekd.pipeline import create_context
    from edgekd.recipe import load_recipe

    print("| run | validation: teacher / student / both | test: teacher / student / both |")
    print("|---|--:|--:|")
    for run in runs:
        ctx = create_context(load_recipe(run / "recipe.yaml"))
        cells = []
        for split in ("validation", "test"):
            data = ctx.tokenized(split, ctx.tokenizer)
            acc_s, logits = _student_accuracy(ctx, data, split)
            t = torch.softmax(torch.from_numpy(np.load(run / "teacher" / f"{split}_logits.npy")).float(), -1)
            both = (t + torch.softmax(torch.as_tensor(logits).float(), -1)) / 2
            accs = [float(ctx.task.metrics({"logits": p.numpy()}, data.labels)["accuracy"]) for p in (t, both)]
            cells.append(f"{accs[0]:.2%} / {acc_s:.2%} / {accs[1]:.2%}")
        print(f"| {run.name} | " + " | ".join(cells) + " |", flush=True)


def rerun_variant(run: Path, name: str, overrides: str) -> dict:
    dst = run.parent / f"{run.name}-{name}"
    if dst.exists():
        shutil.rmtree(dst)
    subprocess.run(["cp", "-al", str(run), str(dst)], check=True)
    sets = [x for o in overrides.split(";") if o.strip() for x in ("--set", o.strip())]
    times = {}
    for cmd in (["prune"], ["export", "--to", "onnx"], ["quantize"]):
        t0 = time.perf_counter()
        res = subprocess.run(["edgekd", *cmd, str(dst), *sets, "--force"] if cmd[0] == "prune" else
                             ["edgekd", *cmd, str(dst), *sets], capture_output=True, text=True)
        times[cmd[0]] = round(time.perf_counter() - t0, 1)
        sys.stdout.write(res.stdout[-3000:])
        if res.returncode:
            sys.stderr.write(res.stderr[-3000:])
            raise SystemExit(f"{name}: edgekd {cmd[0]} failed")
    st = json.loads((dst / "manifest.json").read_text())["stages"]
    pm, qm = st["prune"]["metrics"], st["quantize"]["metrics"]
    vocab = pm.get("vocab", {})
    batch1 = one_at_a_time(dst, _shipped_int8(dst))
    return {"variant": f"{name}: {overrides}", "val": pm["metric_after"]["accuracy"],
            **{f"int8_{k}_batch1": v for k, v in batch1.items()},
            "test": qm["test"]["float"]["accuracy"], "int8_test": qm["test"]["quantized"]["accuracy"],
            "params": pm["params_after"], "vocab": vocab.get("vocab_after"), "steps": len(pm["steps"]),
            "kept_step": pm.get("kept_step"), "stopped": pm.get("stopped"),
            "int8_onnx_bytes": _size(dst / "export" / "onnx-int8"), "prune_s": st["prune"].get("seconds"),
            "times": times}


def main(argv: list[str]) -> None:
    if argv[1:] == ["vocab-stats"]:
        return vocab_stats(argv[0])
    if argv[0] == "ood-sets":
        return ood_sets([Path(a) for a in argv[1:]], OOD_SETS)
    if argv[0] == "ensembles":
        return ensembles([Path(a) for a in argv[1:]])
    if argv[0] == "chain":
        return chain([Path(a) for a in argv[1:]])
    if argv[0] == "versus":
        if len(argv) < 2:
            raise SystemExit("versus: give the variant's name, then run folders (versus NAME RUN...)")
        return versus(argv[1], [Path(a) for a in argv[2:]])
    run = Path(argv[0])
    rows = []
    for spec in argv[1:]:
        if spec.startswith("trim"):
            rows.append(trim_variant(run, spec))
        else:
            name, _, overrides = spec.partition("=")
            rows.append(rerun_variant(run, name, overrides))
        print(json.dumps(rows[-1]), flush=True)
    nan = float("nan")
    print("\n| variant | val acc | test acc (fp32) | test acc (int8 ONNX, as served) | int8, one text at a time: val / test / "
          "OOD | params | vocab | int8 ONNX MB |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        alone = " / ".join(f"{r.get(f'int8_{k}_batch1', nan):.2%}" for k in ("val", "test", "ood"))
        print(f"| {r['variant']} | {r['val']:.2%} | {r['test']:.2%} | {r.get('int8_test', nan):.2%} | {alone} | "
              f"{r['params'] / 1e6:.2f}M | {r.get('vocab') or '-'} | {r['int8_onnx_bytes'] / 1e6:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
