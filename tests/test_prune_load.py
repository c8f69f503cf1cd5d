"""``load_pruned_model``: a pruned folder (built from its config) is loaded as ``from_pretrained`` loads a plain
one, the same dtype and attention implementation for the same keyword arguments, and a keyword it cannot honour
is refused rather than dropped. And ``scope: per_layer`` with a count that does not split evenly leaves unequal
FFN widths, which only ``load_pruned_model`` reloads (the recipe reference says so)."""

from __future__ import annotations

import pytest
import torch

from edgekd.pruning import FFN_SIZES_KEY, Encoder, PruneContext, load_pruned_model, prune_model
from edgekd.recipe import PruneConfig

LAYERS, HEADS, HIDDEN, FFN = 3, 4, 32, 64


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A plain folder and the same model with unequal FFN widths (config.ffn_sizes_per_layer)."""
    from transformers import AutoModelForSequenceClassification

    from edgekd.testing import tiny_bert

    root = tmp_path_factory.mktemp("load-pruned")
    plain = tiny_bert(root / "plain", num_layers=LAYERS, hidden=HIDDEN, heads=HEADS, intermediate=FFN, num_labels=2)
    m = AutoModelForSequenceClassification.from_pretrained(plain)
    Encoder(m).remove_neurons({0: [0, 1, 2, 3], 1: [5, 6]})
    m.save_pretrained(root / "pruned")
    return plain, root / "pruned"


def _ids() -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("kwargs", [
    {},
    {"dtype": torch.float16, "attn_implementation": "eager"},
    {"torch_dtype": "bfloat16"},
    {"dtype": "auto", "attn_implementation": "sdpa"},
    {"attn_implementation": "eager"},
])
def test_a_pruned_folder_loads_with_the_dtype_and_attention_a_plain_one_gets(folders, kwargs):
    plain, pruned = folders
    a, b = load_pruned_model(plain, **kwargs), load_pruned_model(pruned, **kwargs)
    assert getattr(b.config, FFN_SIZES_KEY) == [60, 62, 64]  # built from its config, not from_pretrained
    assert {p.dtype for p in b.parameters()} == {p.dtype for p in a.parameters()}
    assert len({p.dtype for p in b.parameters()}) == 1
    assert b.config._attn_implementation == a.config._attn_implementation
    assert not b.training


def test_the_dtype_default_is_torchs_as_for_a_plain_folder_whatever_the_folder_was_saved_in(folders, tmp_path):
    from transformers import AutoModelForSequenceClassification

    plain, pruned = folders
    half = load_pruned_model(pruned).to(torch.bfloat16)
    half.save_pretrained(tmp_path / "bf16")
    plain_half = AutoModelForSequenceClassification.from_pretrained(plain).to(torch.bfloat16)
    plain_half.save_pretrained(tmp_path / "plain-bf16")
    for kwargs, want in (({}, torch.float32), ({"dtype": "auto"}, torch.bfloat16)):
        assert {p.dtype for p in load_pruned_model(tmp_path / "bf16", **kwargs).parameters()} == {want}
        assert {p.dtype for p in load_pruned_model(tmp_path / "plain-bf16", **kwargs).parameters()} == {want}
    # the weights as saved, whatever the dtype asked
    want = half.float()(**_ids()).logits
    torch.testing.assert_close(load_pruned_model(tmp_path / "bf16")(**_ids()).logits, want)


def test_a_keyword_a_pruned_folder_cannot_honour_is_refused(folders):
    plain, pruned = folders
    load_pruned_model(plain, low_cpu_mem_usage=True)  # from_pretrained takes it
    with pytest.raises(TypeError, match="honours dtype, torch_dtype, attn_implementation only, not "
                                        "low_cpu_mem_usage, revision"):
        load_pruned_model(pruned, low_cpu_mem_usage=True, revision="main")
    with pytest.raises(TypeError, match="not a floating torch dtype"):
        load_pruned_model(pruned, dtype=torch.int8)


def test_per_layer_counts_that_do_not_split_evenly_leave_widths_only_load_pruned_model_reloads(folders, tmp_path):
    from transformers import AutoModelForSequenceClassification

    plain, _ = folders
    m = AutoModelForSequenceClassification.from_pretrained(plain).eval()
    m, _ = prune_model(m, PruneConfig(enabled=True, remove_neurons=10, importance="magnitude"), PruneContext())
    assert Encoder(m).neurons() == [60, 61, 61] and getattr(m.config, FFN_SIZES_KEY) == [60, 61, 61]
    m.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="size mismatch"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(load_pruned_model(tmp_path)(**_ids()).logits, m(**_ids()).logits)
    from edgekd.recipe import PruneConfig as P

    assert "60, 61, 61" in P.model_fields["scope"].description
