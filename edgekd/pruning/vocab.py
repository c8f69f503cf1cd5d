"""Vocabulary trimming: keep the tokens a domain uses, shrink the embedding table to them.

A small encoder's embedding table is most of its parameters (MiniLM-L6: 30,522 x 384 = 11.7M of
a 3-layer student's 17.4M). Only the rows of tokens the tokenizer actually produces on the
domain's texts are ever read, so the others can go. The kept tokens keep their original order and
get new contiguous ids; the tokenizer files are rewritten to match, so the model folder (and every
export folder that copies its tokenizer) loads with plain ``AutoTokenizer``/``AutoModel``.

What a removed token becomes: the rewritten tokenizer is a standard WordPiece tokenizer over the
kept pieces, so a word whose original pieces are all kept segments exactly as before (the longest
match over a subset of the vocabulary is unchanged when it is in the subset); a word that needed a
removed piece is segmented into kept pieces where WordPiece can do so, else it becomes ``[UNK]``.
With ``keep_chars`` every single-character piece is kept, so words fall back to smaller pieces
instead of ``[UNK]``.

A word of the test texts that the training texts never used keeps its own token only if that token
is kept: otherwise it is split into smaller pieces the model read in other contexts, which costs
accuracy on unseen texts. ``keep_first`` keeps the language's common tokens as well: WordPiece
vocabularies (BERT's and the models built on it) list their word pieces by frequency in the corpus
they were built on, after the placeholders and single characters, so the first N ids are the most
frequent pieces of the language, not of the training texts.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgekd.errors import StageError

_PLACEHOLDER = re.compile(r"\[unused\d+\]|<unused\d+>")


def domain_token_ids(sequences: Iterable[Iterable[int]], tokenizer, min_count: int = 1,
                     keep_chars: bool = False, keep_first: int = 0) -> list[int]:
    """Ids to keep (ascending): those seen at least ``min_count`` times in ``sequences`` (token ids
    of the training texts), every special and added token, with ``keep_chars`` every
    single-character piece (``a``, ``##a``), and with ``keep_first`` every id below it except the
    vocabulary's unused placeholders (``[unused12]``), which no text produces."""
    counts: Counter[int] = Counter()
    for seq in sequences:
        counts.update(int(i) for i in seq)
    keep = {i for i, c in counts.items() if c >= min_count}
    keep |= set(tokenizer.all_special_ids)
    keep |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    if keep_chars:
        for tok, i in tokenizer.get_vocab().items():
            if len(tok.removeprefix("##")) == 1:
                keep.add(i)
    if keep_first:
        id_to_token = {i: t for t, i in tokenizer.get_vocab().items()}
        keep |= {i for i in range(min(keep_first, len(tokenizer)))
                 if not _PLACEHOLDER.fullmatch(id_to_token.get(i, ""))}
    size = len(tokenizer)
    bad = [i for i in keep if not 0 <= i < size]
    if bad:
        raise StageError(f"vocabulary trimming: token ids {sorted(bad)[:5]} are outside the tokenizer's {size} tokens; "
                         "the texts were tokenized with another tokenizer")
    return sorted(keep)


def trim_model_vocab(model: nn.Module, keep_ids: list[int]) -> nn.Module:
    """Keep only rows ``keep_ids`` (ascending) of the input embedding, and of a tied or untied
    output embedding (weight and bias) if the model has one; update ``config.vocab_size`` and
    ``config.pad_token_id``. In place; returns the model."""
    idx = torch.as_tensor(keep_ids, dtype=torch.long)
    emb = model.get_input_embeddings()
    if emb is None or not isinstance(emb, nn.Embedding):
        raise StageError(f"vocabulary trimming needs an nn.Embedding input table; {type(model).__name__} has {type(emb).__name__}")
    if idx.numel() and int(idx.max()) >= emb.num_embeddings:
        raise StageError(f"vocabulary trimming: id {int(idx.max())} is outside the embedding's {emb.num_embeddings} rows")
    new_id = {old: new for new, old in enumerate(keep_ids)}
    pad = emb.padding_idx
    new = nn.Embedding(len(keep_ids), emb.embedding_dim, padding_idx=new_id.get(pad) if pad is not None else None,
                       device=emb.weight.device, dtype=emb.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(emb.weight[idx])
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = out is not None and out.weight is emb.weight
    model.set_input_embeddings(new)
    if out is not None:
        with torch.no_grad():
            if tied:
                out.weight = new.weight
            else:
                out.weight = nn.Parameter(out.weight[idx].clone())
            if getattr(out, "bias", None) is not None:
                out.bias = nn.Parameter(out.bias[idx].clone())
        if hasattr(out, "out_features"):
            out.out_features = len(keep_ids)
    cfg = model.config
    cfg.vocab_size = len(keep_ids)
    if getattr(cfg, "pad_token_id", None) is not None:
        cfg.pad_token_id = new_id.get(cfg.pad_token_id)
    return model


def _remap_processor(node: Any, new_id: dict[int, int]) -> Any:
    """Rewrite the special-token ids a tokenizers post-processor carries (TemplateProcessing's
    ``special_tokens[*].ids``, BertProcessing/RobertaProcessing's ``cls``/``sep`` pairs, and
    the same inside a ``Sequence`` of processors)."""
    if isinstance(node, list):
        return [_remap_processor(x, new_id) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k == "ids" and isinstance(v, list):
            out[k] = [new_id[int(i)] for i in v]
        elif k in ("cls", "sep") and isinstance(v, list) and len(v) == 2 and isinstance(v[1], int):
            out[k] = [v[0], new_id[v[1]]]
        else:
            out[k] = _remap_processor(v, new_id)
    return out


def trim_tokenizer(tokenizer, keep_ids: list[int], out_dir: Path) -> None:
    """Save ``tokenizer`` to ``out_dir`` restricted to ``keep_ids`` (ascending), renumbered
    0..n-1 in their original order: tokenizer.json (WordPiece vocabulary, added tokens, post-processor
    and padding ids), vocab.txt and tokenizer_config.json's added-token ids, all consistent."""
    out_dir = Path(out_dir)
    if not getattr(tokenizer, "is_fast", False):
        raise StageError("vocabulary trimming needs a fast (tokenizers-backed) tokenizer; set prune.trim_vocab: false")
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    if model.get("type") != "WordPiece":
        raise StageError(
            f"vocabulary trimming supports WordPiece tokenizers (BERT, MiniLM, MPNet, ...); this one is "
            f"{model.get('type')}: set prune.trim_vocab: false"
        )
    new_id = {old: new for new, old in enumerate(keep_ids)}
    id_to_tok = {i: t for t, i in model["vocab"].items()}
    for a in state.get("added_tokens") or []:
        id_to_tok.setdefault(a["id"], a["content"])
    missing = [i for i in keep_ids if i not in id_to_tok]
    if missing:
        raise StageError(f"vocabulary trimming: ids {missing[:5]} are not in the tokenizer's vocabulary")
    if model.get("unk_token") not in {id_to_tok[i] for i in keep_ids}:
        raise StageError("vocabulary trimming: the unknown token must be kept (it is what removed words become)")
    model["vocab"] = {tok: new_id[i] for tok, i in model["vocab"].items() if i in new_id}
    state["added_tokens"] = [{**a, "id": new_id[a["id"]]} for a in state.get("added_tokens") or [] if a["id"] in new_id]
    if state.get("post_processor"):
        state["post_processor"] = _remap_processor(state["post_processor"], new_id)
    if state.get("padding") and state["padding"].get("pad_id") is not None:
        state["padding"]["pad_id"] = new_id[state["padding"]["pad_id"]]

    with tempfile.TemporaryDirectory(prefix="edgekd-vocab-") as tmp:
        tokenizer.save_pretrained(tmp)  # the files this tokenizer class writes, then rewritten below
        for f in Path(tmp).iterdir():
            if f.name == "tokenizer.json":
                f.write_text(json.dumps(state, ensure_ascii=False, indent=2))
            elif f.name == "vocab.txt":
                f.write_text("".join(id_to_tok[i] + "\n" for i in keep_ids), encoding="utf-8")
            elif f.name == "tokenizer_config.json":
                cfg = json.loads(f.read_text())
                dec = cfg.get("added_tokens_decoder") or {}
                cfg["added_tokens_decoder"] = {str(new_id[int(k)]): v for k, v in dec.items() if int(k) in new_id}
                f.write_text(json.dumps(cfg, ensure_ascii=False, indent=2))
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f.name).write_bytes(f.read_bytes())


def trim_vocabulary(model: nn.Module, tokenizer, keep_ids: list[int]) -> tuple[nn.Module, Any]:
    """Trim ``model`` and ``tokenizer`` to ``keep_ids``; returns the model (in place) and the
    rewritten tokenizer, reloaded with ``AutoTokenizer`` from the rewritten files (so what is
    returned is exactly what a saved folder will load)."""
    from transformers import AutoTokenizer

    keep_ids = sorted(set(int(i) for i in keep_ids))
    with tempfile.TemporaryDirectory(prefix="edgekd-vocab-tok-") as tmp:
        trim_tokenizer(tokenizer, keep_ids, Path(tmp))
        new_tok = AutoTokenizer.from_pretrained(tmp)
    if len(new_tok) != len(keep_ids):
        raise StageError(f"vocabulary trimming: the rewritten tokenizer has {len(new_tok)} tokens, expected {len(keep_ids)}")
    trim_model_vocab(model, keep_ids)
    return model, new_tok


def original_ids(trimmed_tok, original_tok) -> torch.Tensor:
    """Lookup table: id in ``trimmed_tok`` -> id of the same token in ``original_tok``."""
    orig = original_tok.get_vocab()
    table = torch.empty(len(trimmed_tok), dtype=torch.long)
    for tok, i in trimmed_tok.get_vocab().items():
        if tok not in orig:
            raise StageError(f"token {tok!r} of the trimmed vocabulary is not in the original one")
        table[i] = orig[tok]
    return table


class FromTrimmedIds(nn.Module):
    """A model that reads the original vocabulary's ids, fed ids of the trimmed one (the bench gives
    the teacher and the unpruned student the same inputs as the shipped artifacts). Words the
    trimmed tokenizer split differently reach them split that way too."""

    def __init__(self, module: nn.Module, table: torch.Tensor):
        super().__init__()
        self.module = module
        self.register_buffer("table", table, persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.module(self.table[input_ids], attention_mask)
