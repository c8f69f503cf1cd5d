"""The contracts every export target follows: an Exporter writes an artifact, a Runner runs it.

The benchmark harness, the parity check and the server all go through ``Runner.run`` so that
what is measured is what is served. Targets register themselves by name with ``@register``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from edgekd.errors import MissingBackendError, UnsupportedTargetError

ARTIFACT_META = "artifact.json"


@runtime_checkable
class Runner(Protocol):
    """One artifact on one runtime. Inputs and outputs are named numpy arrays."""

    input_names: list[str]
    output_names: list[str]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class ModelIO:
    """What a task's export module takes and returns, declared once for every target.

    ``dynamic_axes`` maps each input/output name to {axis index: axis name}, as torch.onnx does.
    ``dtypes`` maps input names to numpy dtype strings (e.g. "int64").
    """

    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    dtypes: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (as written into artifact.json; axis indices become strings there)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelIO:
        """Inverse of ``to_dict``, also after a JSON round trip (string axis indices)."""
        return cls(
            input_names=list(d["input_names"]),
            output_names=list(d["output_names"]),
            dynamic_axes={k: {int(a): str(n) for a, n in v.items()} for k, v in d.get("dynamic_axes", {}).items()},
            dtypes={k: str(v) for k, v in d.get("dtypes", {}).items()},
        )


@dataclass
class ExportResult:
    """What an exporter wrote. ``path`` is the artifact a Runner loads; ``built`` is False when the
    target wrote only what can be built elsewhere (e.g. TensorRT without TensorRT) and ``reason`` says why."""

    target: str
    path: Path
    files: list[Path]
    built: bool = True
    reason: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    # Numeric precision of the artifact's weights/compute (fp32, fp16, int8, ...).
    precision: str = "fp32"
    # The artifact's own io when it differs from the requested one (e.g. an axis made static).
    io: ModelIO | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["files"] = [str(f) for f in self.files]
        return d


class Exporter(ABC):
    """One export target. Subclasses set the class attributes and implement export/load."""

    name: ClassVar[str]
    suffix: ClassVar[str]
    # Python modules the target needs, and the pip extra that installs them.
    requires: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str | None] = None
    needs_gpu: ClassVar[bool] = False
    # Options this target accepts in the recipe's export section (name -> description).
    options: ClassVar[dict[str, str]] = {}
    # Compressed variants the quantize stage writes beside the artifact: quantize method or mode ->
    # the suffix of its folder (export/<name>-<suffix>), a str.format template over the quantize section.
    quantized: ClassVar[dict[str, str]] = {}
    # Whether its runner applies ``threads`` (the runtime's intra-op threads). A runner that does not (its
    # runtime schedules its own: Core ML, TensorRT on the GPU, the TorchScript lite interpreter on torch's
    # process-wide pool) refuses the option at load; callers pass threads only where this is true.
    applies_threads: ClassVar[bool] = True

    @classmethod
    def available(cls) -> tuple[bool, str | None]:
        """(True, None) when this target can export and run here; otherwise (False, why)."""
        for mod in cls.requires:
            if importlib.util.find_spec(mod) is None:
                hint = f"pip install 'edgekd[{cls.extra}]'" if cls.extra else f"pip install {mod}"
                return False, f"'{mod}' is not installed ({hint})"
        return True, None

    @classmethod
    def runs_here(cls) -> str | None:
        """Why an artifact of this target cannot run on this machine (None when it can): a bench skips
        it before starting a process to find out."""
        return None

    @classmethod
    def require(cls) -> None:
        ok, why = cls.available()
        if not ok:
            missing = next((m for m in cls.requires if importlib.util.find_spec(m) is None), cls.name)
            raise MissingBackendError(f"The '{cls.name}' export target", missing, cls.extra, why)

    @classmethod
    def check_options(cls, opts: dict[str, Any]) -> None:
        unknown = sorted(set(opts) - set(cls.options))
        if unknown:
            allowed = ", ".join(sorted(cls.options)) or "none"
            raise UnsupportedTargetError(
                f"Export target '{cls.name}' does not accept option(s) {', '.join(unknown)}; allowed: {allowed}."
            )

    @abstractmethod
    def export(
        self,
        module: Any,
        example_inputs: dict[str, np.ndarray],
        io: ModelIO,
        out_dir: Path,
        **opts: Any,
    ) -> ExportResult:
        """Write the artifact for ``module`` (a torch.nn.Module taking the inputs of ``io`` as
        keyword tensors and returning a tuple in the order of ``io.output_names``) under ``out_dir``."""

    @abstractmethod
    def load(self, path: Path, **runtime_opts: Any) -> Runner:
        """Load an artifact written by ``export`` into a Runner."""

    def stand_in(self, result: ExportResult, folder: Path) -> tuple[Runner | str, str] | None:
        """For an artifact that cannot run here: a Runner over what it is built from, where that runs here,
        and what that checks (or why it cannot run, and what it would check). The export stage checks its
        parity and records it as what it is (``parity.graph``). None: nothing stands in (the default)."""
        return None


_REGISTRY: dict[str, type[Exporter]] = {}


def register(cls: type[Exporter]) -> type[Exporter]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"export target '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[Exporter]]:
    return dict(_REGISTRY)


def quantized_folder(target: str, method: str, **settings: Any) -> str:
    """The export folder name of ``target`` compressed by ``method`` (e.g. onnx + static ->
    onnx-int8-static; coreml + palettize, palette_bits=4 -> coreml-palettize4)."""
    cls = _REGISTRY.get(target)
    if cls is None or method not in cls.quantized:
        known = ", ".join(f"{t}: {', '.join(c.quantized)}" for t, c in sorted(_REGISTRY.items()) if c.quantized)
        raise UnsupportedTargetError(f"export target '{target}' has no quantized variant '{method}' (known: {known}).")
    return f"{target}-{cls.quantized[method].format(**settings)}"


def get_exporter(name: str) -> Exporter:
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise UnsupportedTargetError(f"Unknown export target '{name}'. Known targets: {known}.")
    return _REGISTRY[name]()


# artifact.json's digest of its own content (every other key, as canonical JSON): labels, io and max_length
# live in artifact.json, so a changed label or io is refused like a changed model file.
META_DIGEST = "meta_sha256"
# Every file beside the artifact that serving it reads (tokenizer files, config.json) -> sha256.
EXTRA_DIGESTS = "extra_sha256"
# Runtime options the artifact's own runner opens it with (keyword options of its exporter's ``load``,
# e.g. an ONNX folder's ``disabled_optimizers``), recorded with the measurement that chose them.
RUNTIME_OPTIONS = "runtime_options"
# A Hugging Face config beside the artifact: Optimum / transformers load the folder as is.
HF_CONFIG = "config.json"


def meta_digest(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != META_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def write_artifact_meta(out_dir: Path, meta: dict[str, Any]) -> Path:
    """Write ``artifact.json`` beside an artifact (atomically): target, precision, io, labels, sha256,
    sealed with the digest of its own content (``meta_sha256``)."""
    from edgekd.runfolder import atomic_write_text

    path = Path(out_dir) / ARTIFACT_META
    # Round-trip first so the digest is taken over exactly what a reader will load (default=str, tuples).
    body = json.loads(json.dumps({k: v for k, v in meta.items() if k != META_DIGEST}, default=str))
    body[META_DIGEST] = meta_digest(body)
    atomic_write_text(path, json.dumps(body, indent=2, sort_keys=True))
    return path


def read_artifact_meta(out_dir: Path) -> dict[str, Any]:
    """artifact.json as a dict; a file that is not a JSON object is an error naming it."""
    path = Path(out_dir) / ARTIFACT_META
    if not path.is_file():
        raise UnsupportedTargetError(
            f"{out_dir} holds no {ARTIFACT_META}: it is not an edgekd export folder. "
            "Run `edgekd export RUN_DIR --to TARGET` first."
        )
    meta = read_json_file(path, f"re-export this target (`edgekd export RUN_DIR --to {Path(out_dir).name}`)")
    if not isinstance(meta, dict):
        raise UnsupportedTargetError(f"{path} holds {type(meta).__name__}, not a JSON object: re-export this target.")
    return meta


def made_from_an_earlier_export(folder: Path) -> str | None:
    """Why the quantized export ``folder`` no longer matches the export it was made from (its artifact.json's
    ``source``: the folder, by name beside it, and that folder's sha256 then); None when it does, or when it
    records no source (an export of its own)."""
    def read(path: Path) -> dict[str, Any] | None:  # an unreadable file is for its folder's loader to report
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    folder = Path(folder)
    source = (read(folder / ARTIFACT_META) or {}).get("source")
    if not isinstance(source, dict) or not source.get("folder") or not source.get("sha256"):
        return None
    src = folder.parent / Path(str(source["folder"])).name  # by name: the run folder may have moved
    now = (read(src / ARTIFACT_META) or {}).get("sha256")
    if now == source["sha256"]:
        return None
    what = ("was exported again since" if now is not None else "is gone" if not (src / ARTIFACT_META).is_file()
            else "has an unreadable artifact.json")
    return f"made from the {src.name} export, which {what}: run `edgekd quantize` again"


def recommendation_out_of_date(folder: Path, quantize: dict[str, Any]) -> str | None:
    """Why the export folder the quantize stage recommends (``quantize``: its record's metrics) is no longer
    the one it measured: a quantized folder made from an export redone since (``made_from_an_earlier_export``),
    or, when it recommended the float folder, that folder holding another file than the sha256 the stage
    recorded for it. None when it is current (or the record predates that sha256)."""
    why = made_from_an_earlier_export(folder)
    if why or quantize.get("recommended") != "float":
        return why
    measured = (quantize.get("float") or {}).get("sha256")
    try:
        now = json.loads((Path(folder) / ARTIFACT_META).read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None  # an unreadable artifact.json: the folder's own loader reports it
    if measured and now != measured:
        return (f"the {Path(folder).name} export was exported again after the quantize stage measured and chose it: "
                "run `edgekd quantize` again")
    return None


def read_json_file(path: Path, remedy: str) -> Any:
    """JSON from ``path``; unreadable or invalid JSON is one clear error naming the file and the remedy."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text)
    except (OSError, UnicodeDecodeError) as e:
        raise UnsupportedTargetError(f"cannot read {path} ({e}): {remedy}.") from None
    except json.JSONDecodeError as e:
        raise UnsupportedTargetError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}; "
                                     f"truncated or edited?): {remedy}.") from None


def hf_model_config(source: Path | None, labels: list[str] | None) -> dict[str, Any] | None:
    """The source model's Hugging Face ``config.json`` with ``id2label``/``label2id`` set from ``labels``
    (the names the export serves), or None when the source is not a transformers model."""
    if source is None or not (Path(source) / HF_CONFIG).is_file():
        return None
    config = read_json_file(Path(source) / HF_CONFIG, "the source model folder is damaged: train it again")
    if not isinstance(config, dict) or "model_type" not in config:
        return None  # not a transformers config (e.g. an edgekd detector's own config.json)
    if labels:
        config["id2label"] = {str(i): str(n) for i, n in enumerate(labels)}
        config["label2id"] = {str(n): i for i, n in enumerate(labels)}
    return config
