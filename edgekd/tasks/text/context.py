"""The run context of a text-classification recipe: examples loaded, split and tokenised once."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np

from edgekd.context import RunContext
from edgekd.errors import StageError
from edgekd.runfolder import fingerprint
from edgekd.tasks.text.task import TextClassificationTask, TokenizedSplit


class TextRunContext(RunContext):
    # --- data ---------------------------------------------------------------------------------
    @cached_property
    def examples(self):
        from edgekd.data import load_examples

        return load_examples(self.recipe.data)

    @cached_property
    def splits(self):
        from edgekd import assets
        from edgekd.data import split_examples
        from edgekd.tasks.text.checks import calibrates

        d = self.recipe.data
        # A named dataset read with data.source auto brings the hub copy's splits where the hub answers, and
        # none from the mirror it falls back to, whose split reads the seed: the same recipe keeps it anywhere.
        falls_back = assets.is_named_asset(d.dataset) and d.source == "auto"
        return split_examples(self.examples, d.split, d.max_train_examples,
                              calibrates=None if falls_back else calibrates(self.recipe))

    @cached_property
    def data_summary(self) -> dict[str, Any]:
        return self.splits.summary()

    @cached_property
    def data_fingerprint(self) -> str:
        return fingerprint({"data": self.recipe.data.model_dump(mode="json"), "split": self.data_summary})

    @cached_property
    def task(self) -> TextClassificationTask:
        return TextClassificationTask(self.examples.label_names, self.recipe.data.max_length)

    @cached_property
    def tokenizer(self):
        """The teacher's tokenizer, which every student-side stage reads too: a ``student.model`` trains on
        its own tokenizer's ids, and one whose ids differ from these is refused (the recipe check, else the
        distill stage), so they are the student's ids as well."""
        return self.task.load_tokenizer(self.recipe.teacher.model)

    def tokenized(self, split: str, tokenizer=None) -> TokenizedSplit:
        tok = tokenizer or self.tokenizer
        key = (split, id(tok))
        cache = self.__dict__.setdefault("_tokenized", {})
        if key not in cache:
            idx = getattr(self.splits, split)
            texts = [self.examples.texts[i] for i in idx]
            labels = self.examples.labels[idx]
            cache[key] = TokenizedSplit(self.task.tokenize(tok, texts), labels, tok.pad_token_id or 0)
        return cache[key]

    @property
    def shipped_tokenizer(self):
        """The tokenizer of the model that ships: the pruned student's own when ``prune.trim_vocab``
        rewrote its vocabulary (export, quantize and bench feed its ids), else the teacher's."""
        p = self.recipe.prune
        if p.enabled and p.trim_vocab:
            from edgekd.tasks.text.prune import load_pruned_tokenizer

            return load_pruned_tokenizer(self)
        return self.tokenizer

    def parity_data(self, n: int | None = None, tokenizer=None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Real test examples, padded to one shape, for export parity and artifact accuracy
        (tokenized for the shipped model unless ``tokenizer`` is given)."""
        test = self.tokenized("test", tokenizer or self.shipped_tokenizer)
        idx = np.arange(len(test) if n is None else min(n, len(test)))
        batch = test.collate(idx)
        return {k: batch[k] for k in ("input_ids", "attention_mask")}, batch["labels"]

    def ood_data(self) -> tuple[str, dict[str, np.ndarray], np.ndarray] | None:
        """The OOD set tokenized as the shipped artifacts read it (the trimmed vocabulary's ids)."""
        from edgekd.ood import ood_inputs

        found = ood_inputs(self, self.shipped_tokenizer)
        return (found[0].name, found[1], found[2]) if found else None

    def bench_torch_models(self, models: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
        """With a trimmed vocabulary the unpruned models read the original tokenizer's ids: they are marked
        by the id table in front (``FromTrimmedIds``), which the bench takes off to time them on their own
        ids of the same texts (``bench_original_inputs``)."""
        p = self.recipe.prune
        if not (p.enabled and p.trim_vocab):
            return models
        from edgekd.pruning.vocab import FromTrimmedIds, original_ids

        table = original_ids(self.shipped_tokenizer, self.tokenizer)
        return {k: ((FromTrimmedIds(m, table), io) if k != "student-pruned" else (m, io)) for k, (m, io) in models.items()}

    def bench_original_inputs(self, n: int | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None] | None:
        """With a trimmed vocabulary, the same test texts (and out-of-domain set) in the untrimmed tokenizer's
        ids, which the teacher and the distilled student read: the trimmed tokenizer splits the words it
        dropped into more pieces, so timing them on the shipped ids would time longer inputs than they serve."""
        p = self.recipe.prune
        if not (p.enabled and p.trim_vocab):
            return None
        from edgekd.ood import ood_inputs

        test, _ = self.parity_data(n, tokenizer=self.tokenizer)
        ood = ood_inputs(self, self.tokenizer)
        return test, (ood[1] if ood else None)

    def bench_own_outputs(self, models: dict[str, tuple[Any, Any]], n: int | None) -> dict[str, tuple[
            dict[str, np.ndarray], dict[str, np.ndarray] | None, str | None]]:
        """With a trimmed vocabulary, each unpruned model's logits on its own tokenizer's ids of the same
        texts (the test split's first ``n``, the out-of-domain set): the accuracy it gives its users.
        The bench times and scores it on these ids of the same texts (``bench_original_inputs``).

        The eval stage ran the same models on the same texts in these ids: its logits are read where its
        record is current and its token ids are these, row for row (``saved_logits``); the model runs here
        otherwise. The third element says which, and why the eval stage's logits were not used: the bench's
        note shows it, so a row scored again here says what kept it from the logits the eval stage saved."""
        p = self.recipe.prune
        if not (p.enabled and p.trim_vocab):
            return {}
        from types import SimpleNamespace

        from edgekd.devices.remote_runner import run_dataset
        from edgekd.export.parity import source_outputs
        from edgekd.ood import ood_inputs
        from edgekd.tasks.text.evaluate import saved_logits

        test, _ = self.parity_data(n, tokenizer=self.tokenizer)
        found = ood_inputs(self, self.tokenizer)
        ood = found[1] if found else None
        saved, why_not = saved_logits(self, test, ood)

        def outputs(module: Any, io: Any, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            # batches of similar lengths, each cut to its longest text (an eager model takes any width)
            runner = SimpleNamespace(run=lambda b: source_outputs(module, b, io.output_names))
            return run_dataset(runner, arrays, 64, trim_ok=lambda b, w: True)

        def own(name: str, module: Any, io: Any) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None,
                                                          str | None]:
            if name in saved and list(io.output_names) == ["logits"]:
                t, o = saved[name]
                return {"logits": t}, ({"logits": o} if o is not None else None), "the eval stage's logits"
            why = (why_not if not saved else f"the eval stage saved no logits of {name!r}" if name not in saved
                   else f"its outputs are {list(io.output_names)}, the eval stage saved logits alone")
            return (outputs(module, io, test), (outputs(module, io, ood) if ood is not None else None),
                    f"run here: {why}")

        return {name: own(name, module, io) for name, (module, io) in models.items() if name != "student-pruned"}

    def validation_data(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The validation split as model inputs and labels (quantization calibration and guard)."""
        val = self.tokenized("validation", self.shipped_tokenizer)
        batch = val.collate(np.arange(len(val)))
        return {k: batch[k] for k in ("input_ids", "attention_mask")}, batch["labels"]

    def calibration_data(self, split: str, n: int) -> dict[str, np.ndarray]:
        """``n`` examples of the train or validation split as model inputs (quantization calibration; the
        test split is never read for it), tokenized as the shipped model reads them: a sample stratified by
        label, seeded by data.split.seed (``calibration_rows``; the whole split when it has at most ``n``),
        never the first ``n`` in file order. Its ``rows`` say which, for the quantize report."""
        from edgekd.quantization.calibration import CalibrationInputs, calibration_record, calibration_rows

        if split not in ("train", "validation"):
            raise StageError(f"calibration reads the train or validation split, not {split!r}")
        part = self.tokenized(split, self.shipped_tokenizer)
        seed = self.recipe.data.split.seed
        idx = calibration_rows(len(part), n, seed, part.labels)
        batch = part.collate(idx)
        out = CalibrationInputs({k: batch[k] for k in ("input_ids", "attention_mask")})
        out.rows = calibration_record(split, len(part), idx, seed, stratified=True)
        return out
