"""Quantization-aware distillation: the rounding trained with is the rounding ONNX Runtime's dynamic
int8 export applies, gradients pass through it, the model comes back unchanged, and the prune stage
recovers with it when the recipe asks (and refuses settings it cannot honour)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgekd.errors import RecipeError
from edgekd.quantization.fake_quant import dynamic_int8_training
from edgekd.recipe import parse_recipe
from edgekd.testing import tiny_recipe


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(24, 32), nn.GELU(), nn.Linear(32, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    with torch.no_grad():  # uneven rows, so per-channel scales differ from the per-tensor one
        m[0].weight.mul_(torch.linspace(0.1, 3.0, 32)[:, None])
    return m


def _ort_int8(model: nn.Module, x: np.ndarray, tmp: Path, **opts) -> np.ndarray:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = tmp / "fp32.onnx", tmp / "int8.onnx"
    torch.onnx.export(model, (torch.from_numpy(x),), str(src), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, dynamo=False)
    weight_type = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}[opts["weight_type"]]
    quantize_dynamic(str(src), str(dst), per_channel=opts["per_channel"], reduce_range=opts["reduce_range"],
                     weight_type=weight_type, op_types_to_quantize=["MatMul", "Gemm"])
    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


# Settings ONNX Runtime computes exactly on every CPU. (Full-range int8 weights without reduce_range
# can saturate the int16 pair sums of the u8s8 kernel on x86 CPUs without VNNI: not a rounding.)
@pytest.mark.parametrize("opts", [
    {"per_channel": False, "weight_type": "qint8", "reduce_range": True},
    {"per_channel": True, "weight_type": "qint8", "reduce_range": True},
    {"per_channel": False, "weight_type": "quint8", "reduce_range": False},
    {"per_channel": True, "weight_type": "quint8", "reduce_range": False},
])
def test_training_rounding_is_onnx_runtime_dynamic_int8(tmp_path, opts):
    model = _mlp()
    rows = [np.random.default_rng(i).normal(scale=2.0, size=(1, 24)).astype(np.float32) for i in range(16)]
    # One row per call: dynamic quantization takes each input's own range, as a batch-1 server does.
    int8 = np.concatenate([_ort_int8(model, x, tmp_path, **opts) for x in rows])
    with torch.no_grad():
        fp32 = np.concatenate([model(torch.from_numpy(x)).numpy() for x in rows])
        with dynamic_int8_training(model, **opts) as n:
            aware = np.concatenate([model(torch.from_numpy(x)).numpy() for x in rows])
    assert n == 3
    gap = np.abs(fp32 - int8).max()
    assert gap > 1e-3  # int8 really rounds
    assert np.abs(aware - int8).max() < 1e-4 < gap / 10  # and the training forward rounds the same way


class _Tokens(nn.Module):
    """The MLP over each position of [texts, positions, 24], called as the prune stage calls a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = _mlp()

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.mlp(x)


def test_text_ranges_round_each_padded_text_as_onnx_runtime_rounds_it_alone(tmp_path):
    """ranges='text': in a padded batch, each text's real positions come out as ONNX Runtime's int8
    gives them for that text alone, whatever the padding holds; ranges='batch' lets the padding and
    the other texts set the range."""
    model = _Tokens().eval()
    opts = {"per_channel": False, "weight_type": "qint8", "reduce_range": True}
    rng = np.random.default_rng(0)
    lengths = [3, 7, 5]
    texts = [rng.normal(scale=1.0 + i, size=(1, n, 24)).astype(np.float32) for i, n in enumerate(lengths)]
    alone = [_ort_int8(model.mlp, x, tmp_path, **opts)[0] for x in texts]
    batch = np.full((len(texts), max(lengths), 24), 40.0, np.float32)  # padding far outside every text's range
    mask = np.zeros(batch.shape[:2], np.int64)
    for i, (x, n) in enumerate(zip(texts, lengths, strict=True)):
        batch[i, :n], mask[i, :n] = x[0], 1
    with torch.no_grad():
        with dynamic_int8_training(model, ranges="text", **opts):
            per_text = model(torch.from_numpy(batch), attention_mask=torch.from_numpy(mask)).numpy()
        with dynamic_int8_training(model, ranges="batch", **opts):
            shared = model(torch.from_numpy(batch), attention_mask=torch.from_numpy(mask)).numpy()
    for i, n in enumerate(lengths):
        assert np.abs(per_text[i, :n] - alone[i]).max() < 1e-4
        assert np.abs(shared[i, :n] - alone[i]).max() > 1e-2
    assert not model._forward_pre_hooks  # the mask hook goes with the block
    with torch.no_grad(), dynamic_int8_training(model, ranges="text", **opts):  # no mask: refused, not guessed
        with pytest.raises(ValueError, match="needs the attention mask .* called with no attention mask"):
            model(torch.from_numpy(batch))
        with pytest.raises(ValueError, match=r"attention mask of shape \(3, 2\)"):
            model(torch.from_numpy(batch), attention_mask=torch.from_numpy(mask[:, :2]))
    with pytest.raises(ValueError, match="text, batch"), dynamic_int8_training(model, ranges="row"):
        pass


def test_gradients_pass_and_the_model_comes_back(tmp_path):
    model = _mlp()
    x = torch.randn(4, 24)
    before = model(x).detach()
    with dynamic_int8_training(model, per_channel=True):
        model(x).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert torch.equal(model(x).detach(), before)
    assert not any("forward" in vars(m) for m in model.modules())
    with pytest.raises(RuntimeError), dynamic_int8_training(model):
        raise RuntimeError("inside")
    assert not any("forward" in vars(m) for m in model.modules())  # restored after an error too
    with pytest.raises(ValueError, match="qint8 or quint8"), dynamic_int8_training(model, weight_type="int4"):
        pass


def test_recipe_refuses_quant_aware_it_cannot_honour(tmp_path):
    base = tiny_recipe(tmp_path, tmp_path, tmp_path / "x.csv")
    ok = {**base, "prune": {"enabled": True, "keep_params": 0.5, "recover_epochs": 1, "quant_aware": True},
          "quantize": {"enabled": True, "method": "dynamic"}, "export": {"targets": ["onnx"]}}
    assert parse_recipe(ok).prune.quant_aware
    bad = {**ok, "quantize": {"enabled": True, "method": "static"}}
    with pytest.raises(RecipeError, match="prune.quant_aware: .*quantize.method: dynamic"):
        parse_recipe(bad)
    with pytest.raises(RecipeError, match="no recovery trains"):
        parse_recipe({**ok, "prune": {**ok["prune"], "recover_epochs": 0}})
    with pytest.raises(RecipeError, match="quant_aware_ranges: 'text' .* prune.quant_aware is false"):
        parse_recipe({**ok, "prune": {**ok["prune"], "quant_aware": False, "quant_aware_ranges": "text"}})


def test_a_family_that_cannot_train_int8_aware_refuses_it(tmp_path):
    from edgekd.recipe_check import check_inputs

    recipe = parse_recipe({"task": "detection", "output_dir": str(tmp_path), "eval": {"ood_dataset": None},
                           "student": {"model": "edgekd-det-s"},
                           "prune": {"enabled": True, "method": "channels", "keep_params": 0.5,
                                     "recover_epochs": 1, "quant_aware": True},
                           "quantize": {"enabled": True, "method": "dynamic", "guard_metric": "map50"},
                           "export": {"targets": ["onnx"]}})
    assert check_inputs(recipe) == ["prune.quant_aware: the detection prune stage does not train int8-aware (text "
                                    "classification does): remove it"]


@pytest.mark.slow
def test_prune_stage_recovers_int8_aware(tmp_path, tiny_teacher_dir, tiny_csv, monkeypatch):
    """The prune stage trains inside the rounding (every recovery round), records it, and the setting
    is part of its fingerprint."""
    import edgekd.tasks.text.prune as prune_mod
    from edgekd.pipeline import fingerprint_of, run_stages

    entered = []
    real = prune_mod.dynamic_int8_training

    def spy(model, **kw):
        entered.append(kw)
        return real(model, **kw)

    monkeypatch.setattr(prune_mod, "dynamic_int8_training", spy)
    data = tiny_recipe(tmp_path, tiny_teacher_dir, tiny_csv, teacher={"finetune": {"epochs": 1}},
                       distill={"train": {"epochs": 1, "batch_size": 32}},
                       prune={"enabled": True, "keep_params": 0.6, "steps": 2, "recover_epochs": 0.5,
                              "quant_aware": True},
                       quantize={"enabled": True, "method": "dynamic", "per_channel": True},
                       export={"targets": ["onnx"]})
    recipe = parse_recipe(data)
    ctx = run_stages(recipe, ["teacher", "distill", "prune"])
    assert entered == [{"per_channel": True, "weight_type": "qint8", "reduce_range": False, "ranges": "batch"}] * 2
    rec = ctx.run.manifest()["stages"]["prune"]["metrics"]
    assert rec["quant_aware"] == {"int8": "dynamic", "per_channel": True, "weight_type": "qint8",
                                  "reduce_range": False, "ranges": "batch"}
    off = parse_recipe({**data, "prune": {**data["prune"], "quant_aware": False}})
    other = parse_recipe({**data, "quantize": {**data["quantize"], "per_channel": False}})
    text = parse_recipe({**data, "prune": {**data["prune"], "quant_aware_ranges": "text"}})
    assert prune_mod._int8_rounding(text)["ranges"] == "text"  # what the recovery's rounding is given
    fps = {fingerprint_of(ctx, "prune")} | {fingerprint_of(type(ctx)(recipe=r, run=ctx.run, family=ctx.family), "prune")
                                           for r in (off, other, text)}
    assert len(fps) == 4
