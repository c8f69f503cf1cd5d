"""What a run ships: one rule for `edgekd serve RUN` without ``--target``, `edgekd.load`, the summary, the
HTML report and the benchmark scripts, so that they never name different exports.

The rule, over the export folders on disk (``RUN/export/<name>/artifact.json``):

1. the quantize stage's recommendation, when the recipe runs that stage and it recorded one: shipped when
   its folder is there and is still the one the stage measured, else nothing (and why);
2. else the run's only current export: quantized folders of a quantize stage the recipe now turns off are
   earlier results, not current (the bench stage does not time them as current either); a quantized
   folder made from an export redone since ships nothing;
3. else nothing: several exports, choose one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekd.errors import StageError
from edgekd.export.base import (
    ARTIFACT_META,
    made_from_an_earlier_export,
    read_json_file,
    recommendation_out_of_date,
)
from edgekd.runfolder import MANIFEST, RunFolder

CHOOSE = "choose an export"  # what the caller may do instead; `edgekd serve` says how (--target)


def export_folders(root: Path) -> list[str]:
    """The names of the export folders under ``root/export`` (those holding an artifact.json), sorted; hidden
    ones (an export stage's staged folders, not published yet) are not exports."""
    export_root = Path(root) / "export"
    if not export_root.is_dir():
        return []
    return sorted(p.name for p in export_root.iterdir() if not p.name.startswith(".") and (p / ARTIFACT_META).is_file())


def read_manifest(root: Path) -> dict[str, Any]:
    """The run folder's manifest; unreadable or not a JSON object is an error that names the file."""
    manifest = read_json_file(Path(root) / MANIFEST, f"restore it, or serve the export folder from a copy outside {root}")
    if not isinstance(manifest, dict):
        raise StageError(f"{Path(root) / MANIFEST} holds {type(manifest).__name__}, not a JSON object: restore it.")
    return manifest


def _recommendation(manifest: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The export folder name the quantize stage recommends (float or quantized), if it recorded one, and
    the stage's record (its metrics)."""
    rec = (manifest.get("stages") or {}).get("quantize")
    metrics = rec.get("metrics") if isinstance(rec, dict) else None
    if not isinstance(metrics, dict) or not metrics.get("recommended_dir"):
        return None, {}
    # By name: the run folder may have moved since the path was recorded.
    return Path(str(metrics["recommended_dir"])).name, metrics


def shipped_export(root: str | Path, choose: str = CHOOSE) -> tuple[str | None, str]:
    """(export folder name, why) of what the run ships by the rule above; (None, why and what to do) when
    it ships nothing as it stands (``choose``: how the caller picks an export instead)."""
    root = Path(root)
    on_disk = export_folders(root)
    manifest = read_manifest(root) if (root / MANIFEST).is_file() else {}
    # A quantize stage the recipe now turns off: its choice is not read, its folders are earlier results.
    off = RunFolder(root).recipe_turns_off("quantize")
    name, quantize = (None, {}) if off else _recommendation(manifest)
    if not on_disk and name is None:
        export = (manifest.get("stages") or {}).get("export") or {}
        made = [t for t, r in ((export.get("metrics") or {}).get("targets") or {}).items()
                if isinstance(r, dict) and r.get("status") == "ok"]
        if made:
            return None, (f"the export stage recorded {', '.join(made)}, but {root / 'export'} holds no export folder: "
                          "run `edgekd export` again")
        return None, "no export yet (run `edgekd export`)"
    if name is not None:
        if name not in on_disk:
            return None, (f"the quantize stage's recommendation ({name}) is not in {root / 'export'}: run `edgekd "
                          f"quantize` again, or {choose}")
        stale = recommendation_out_of_date(root / "export" / name, quantize)
        if stale:
            return None, f"the quantize stage's recommendation ({name}) is out of date: {stale}, or {choose}"
        why = f"the quantize stage's recommendation ({quantize.get('recommended')})"
        if quantize.get("reasons"):
            why += ": " + "; ".join(str(r) for r in quantize["reasons"])
        return name, why
    if off:
        from edgekd.stages.quantize import quantized_folder_names

        earlier = [p.name for p in quantized_folder_names(root / "export")]
    else:
        earlier = []
    current = [t for t in on_disk if t not in earlier]
    kept = [t for t in on_disk if t in earlier]
    if len(current) == 1:
        stale = made_from_an_earlier_export(root / "export" / current[0])
        if stale:
            return None, f"the run's only export ({current[0]}) is out of date: {stale}, or {choose}"
        why = "the run's only export"
        if kept:
            why += (f" ({', '.join(kept)}: made by a quantize stage this recipe turns off, kept as an earlier "
                    "result)")
        return current[0], why
    if not current:
        return None, (f"only quantized exports made by a quantize stage this recipe turns off ({', '.join(kept)}): "
                      f"run `edgekd export`, or {choose}")
    tail = ("its recipe turns the quantize stage off, so its earlier recommendation is not read" if off
            else "no quantize stage recommendation is recorded")
    return None, f"several exports ({', '.join(current)}): {choose} ({tail})"
