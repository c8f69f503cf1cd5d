"""Tiny random models of every encoder family, saved as ordinary Hugging Face folders (shared by the tests).

Every family gets the test vocabulary of edgekd.testing with a BertTokenizerFast (the tokenizer is not
what these tests are about); configs are the families' own, shaped like the real checkpoints
(ELECTRA/ALBERT embedding projections, DeBERTa-v3 relative attention with shared key projections and
log buckets, DeBERTa-v2 with separate position projections, ModernBERT's global attention every 3rd layer, local between
attention).
"""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("bert", "minilm", "roberta", "xlm-roberta", "distilbert", "electra", "albert", "deberta-v2",
            "deberta-v3", "mpnet", "modernbert")


def config(family: str, vocab_size: int, layers: int = 4, hidden: int = 32, heads: int = 4, inter: int = 64):
    import transformers as T

    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=inter, max_position_embeddings=128, pad_token_id=0)
    if family == "bert":
        return T.BertConfig(**common)
    if family == "minilm":  # MiniLM-style: a narrow, shallow BERT with more heads than usual per width
        return T.BertConfig(**{**common, "num_attention_heads": 8})
    if family == "roberta":
        return T.RobertaConfig(**common, bos_token_id=2, eos_token_id=3, type_vocab_size=1)
    if family == "xlm-roberta":
        return T.XLMRobertaConfig(**common, bos_token_id=2, eos_token_id=3, type_vocab_size=1)
    if family == "electra":
        return T.ElectraConfig(**common, embedding_size=16)
    if family == "albert":
        return T.AlbertConfig(**common, embedding_size=16, num_hidden_groups=1, inner_group_num=1)
    if family == "distilbert":
        return T.DistilBertConfig(vocab_size=vocab_size, dim=hidden, n_layers=layers, n_heads=heads,
                                  hidden_dim=inter, max_position_embeddings=128, pad_token_id=0)
    if family == "deberta-v3":
        return T.DebertaV2Config(**common, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                 position_biased_input=False, position_buckets=16, max_relative_positions=-1,
                                 norm_rel_ebd="layer_norm", share_att_key=True, type_vocab_size=0)
    if family == "deberta-v2":
        return T.DebertaV2Config(**common, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                 position_biased_input=False, share_att_key=False, type_vocab_size=0)
    if family == "mpnet":
        return T.MPNetConfig(**common, bos_token_id=2, eos_token_id=3, relative_attention_num_buckets=32)
    if family == "modernbert":
        return T.ModernBertConfig(**common, bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3,
                                  global_attn_every_n_layers=3, local_attention=8, reference_compile=False)
    raise ValueError(family)


def tiny_family(family: str, out_dir: str | Path, layers: int = 4, num_labels: int | None = None,
                seed: int = 0) -> Path:
    """Save a tiny random model of ``family`` (with a 2-label head when ``num_labels``) and its tokenizer."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, BertTokenizerFast

    from edgekd.testing import write_vocab

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab(out / "vocab.txt")
    tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    cfg = config(family, len(vocab.read_text().split()), layers=layers)
    torch.manual_seed(seed)
    if num_labels:
        cfg.num_labels = num_labels
        model = AutoModelForSequenceClassification.from_config(cfg)
    else:
        model = AutoModel.from_config(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def classifier(family: str, layers: int = 4, seed: int = 0):
    """A tiny 2-label classifier of ``family`` in memory (eval mode, random weights)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    cfg = config(family, 45, layers=layers)
    cfg.num_labels = 2
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(cfg).eval()


def batch(n: int = 4, length: int = 10, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 45, (n, length), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # one padded row: masks are part of what must survive
    ids[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1] * (n // 2))}
