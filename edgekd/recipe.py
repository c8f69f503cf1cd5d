"""The recipe: one pydantic model per stage, loaded from and dumped to YAML.

Unknown keys and wrong types are errors that name the key and the allowed values, and every
problem is reported at once. Field docstrings (``description``) are the recipe reference.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgekd.errors import RecipeError

BUILTIN_RECIPES = ("default",)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitConfig(Section):
    """How a dataset without its own splits is cut into train/validation/test (seeded, recorded)."""

    validation: float = Field(0.1, gt=0, lt=0.5, description="Fraction held out for validation.")
    test: float = Field(0.1, gt=0, lt=0.5, description="Fraction held out for the final test.")
    seed: int = Field(13, description="Seed of the shuffle; the same seed gives the same split.")


class DataConfig(Section):
    dataset: str = Field(
        "rotten-tomatoes",
        description="A named asset (rotten-tomatoes), a Hugging Face dataset id, or a local "
        ".csv/.tsv/.jsonl file with text and label columns.",
    )
    hub_config: str | None = Field(None, description="Configuration name of a hub dataset.")
    text_column: str = Field("text", description="Column holding the input text.")
    label_column: str = Field("label", description="Column holding the label (name or integer id).")
    max_length: int = Field(64, ge=8, le=4096, description="Tokens kept per text (longer texts are truncated).")
    split: SplitConfig = Field(default_factory=SplitConfig)
    max_train_examples: int | None = Field(
        None, ge=1, description="Use only the first N training examples (quick trials)."
    )


class TrainConfig(Section):
    """Optimisation settings of one training loop (teacher fine-tune, distillation, baseline)."""

    epochs: float = Field(3, gt=0, description="Passes over the training split (fractions allowed).")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-5, gt=0, description="Peak learning rate (AdamW, linear decay after warm-up).")
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_grad_norm: float = Field(1.0, gt=0)


class TeacherConfig(Section):
    model: str = Field(
        "minilm-l6",
        description="A named asset (minilm-l6), a Hugging Face model id, or a local model folder.",
    )
    finetune: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=2, lr=5e-5, batch_size=32),
        description="Used when the teacher has no task head yet (it is fine-tuned first).",
    )


class StudentConfig(Section):
    model: str | None = Field(
        None, description="Load the student from this model id/folder instead of building it from the teacher."
    )
    layers: list[int] | None = Field(
        None, description="Teacher layers the student keeps (0-based). Default: every other layer."
    )

    @model_validator(mode="after")
    def _one_source(self) -> StudentConfig:
        if self.model and self.layers:
            raise ValueError("give either student.model or student.layers, not both")
        return self


class DistillConfig(Section):
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the soft-target (KL) loss; 1-alpha goes to labels.")
    temperature: float = Field(2.0, gt=0, description="Softmax temperature of the soft targets (loss scaled by T^2).")
    kl: Literal["forward", "reverse"] = Field(
        "forward", description="forward: KL(teacher||student); reverse: KL(student||teacher)."
    )
    hidden_weight: float = Field(0.0, ge=0, description="Weight of the hidden-state matching loss (0 = off).")
    hidden_loss: Literal["mse", "cosine"] = Field("cosine", description="Hidden-state loss.")
    attention_weight: float = Field(0.0, ge=0, description="Weight of the attention-map loss (0 = off).")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=3, lr=1e-4, batch_size=32))


class BaselineConfig(Section):
    enabled: bool = Field(
        True, description="Also train the same student on hard labels only, to measure the gain from distillation."
    )


class EvalConfig(Section):
    batch_size: int = Field(128, ge=1)


class RuntimeConfig(Section):
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Training precision. auto: bf16 where the CPU/GPU has fast bf16 (AMX, Ampere+), else fp32."
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: all cores).")


class PruneConfig(Section):
    enabled: bool = Field(False, description="Run the prune stage.")


class QuantizeConfig(Section):
    enabled: bool = Field(False, description="Run the quantize stage.")


class ExportConfig(Section):
    targets: list[str] = Field(
        default_factory=list,
        description="Export targets: onnx, tensorrt, coreml, executorch, torchscript-lite.",
    )
    parity_examples: int = Field(256, ge=1, description="Test examples compared against the source model.")
    min_top1_agreement: float | None = Field(
        None, ge=0, le=1, description="Fail the stage when an artifact agrees with its source on fewer examples."
    )
    options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Per-target options.")


class BenchConfig(Section):
    enabled: bool = Field(False, description="Run the bench stage.")


class ServeConfig(Section):
    target: str | None = Field(None, description="Export folder to serve (e.g. onnx, onnx-int8).")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)


STAGES = ("teacher", "distill", "baseline", "eval", "prune", "quantize", "export", "bench")


class Recipe(Section):
    name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Run name: runs/<name>/.")
    task: Literal["text-classification"] = "text-classification"
    seed: int = Field(42, description="Seed of model initialisation and data order.")
    output_dir: str = Field("runs", description="Folder that holds run folders.")
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------------
# Loading with errors a person can act on


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        allowed = sorted(parent.model_fields) if parent else []
        guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" Did you mean '{guess[0]}'?" if guess else ""
        return f"{key}: unknown key.{hint} Allowed keys here: {', '.join(allowed)}."
    msg = err["msg"]
    if "input" in err and err["type"] not in ("missing",):
        msg += f" (got {err['input']!r})"
    return f"{key}: {msg}"


def parse_recipe(data: dict[str, Any] | None, source: str | None = None) -> Recipe:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"the recipe must be a mapping of sections, got {type(data).__name__}"], source)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError([_describe(err) for err in e.errors()], source) from None


def builtin_recipe_text(name: str = "default") -> str:
    if name not in BUILTIN_RECIPES:
        raise RecipeError([f"no built-in recipe '{name}'; built-in recipes: {', '.join(BUILTIN_RECIPES)}"])
    return resources.files("edgekd").joinpath("recipes", f"{name}.yaml").read_text()


def load_recipe(source: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe from a YAML file or a built-in name (None = the default), then apply
    ``key.path=value`` overrides (values parsed as YAML)."""
    if source is None or (str(source) in BUILTIN_RECIPES and not Path(str(source)).exists()):
        name = "default" if source is None else str(source)
        text, where = builtin_recipe_text(name), f"built-in recipe '{name}'"
    else:
        path = Path(source)
        if not path.is_file():
            raise RecipeError(
                [f"recipe file {path} does not exist (built-in recipes: {', '.join(BUILTIN_RECIPES)})"]
            )
        text, where = path.read_text(), str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError([f"not valid YAML: {e}"], where) from None
    data = data or {}
    problems = []
    for item in overrides or []:
        if "=" not in item:
            problems.append(f"override '{item}' must look like key.path=value (e.g. distill.temperature=4)")
            continue
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                problems.append(f"override '{item}': {p} is not a section")
                break
        else:
            node[parts[-1]] = yaml.safe_load(raw)
    if problems:
        raise RecipeError(problems, where)
    return parse_recipe(data, where)
