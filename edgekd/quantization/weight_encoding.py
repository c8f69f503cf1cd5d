"""Signed or unsigned int8 weights: the same numbers, stored for the CPU that multiplies them.

ONNX Runtime multiplies uint8 activations by int8 weights (u8s8) on x86 with ``VPMADDUBSW`` where the
CPU has no VNNI (AVX2, AVX-512 without VNNI). That instruction adds each pair of neighbouring products in
int16 and saturates: two large activations against two large weights of one sign give a wrong sum, not
an error (ONNX Runtime's quantization guide says so; ``tests/test_weight_encoding.py`` shows it on such a
CPU). Its u8u8 kernels widen to int16 first and do not saturate. A signed weight ``w`` (zero point
``z``) is the unsigned ``w + 128`` (zero point ``z + 128``): ``w - z`` is unchanged, so the model
computes the same numbers and quantization-aware recovery, which rounds as the signed file does, still
trains for it. VNNI CPUs (``VPDPBUSD``) and ARM multiply signed weights exactly and faster, and on an
AVX2 CPU the u8s8 kernel is faster too (about 10% on the default run's file), so the choice follows the
device the model is for and, where that is this machine, what the two measure (:func:`encodings`).

Optimum's ``AutoQuantizationConfig`` makes the same choice: ``avx2()`` and ``avx512()`` give uint8
weights, ``avx512_vnni()`` and ``arm64()`` int8.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np

# CPU features whose int8 dot product does not saturate (VPDPBUSD and AMX's TDPBUSD).
VNNI_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")
X86_ARCHES = ("x86_64", "amd64", "x86", "i386", "i686")
# (weight input, weight zero point input) of the operators that multiply an int8 weight initializer.
WEIGHT_SLOTS = {"DynamicQuantizeMatMul": (1, 3), "MatMulInteger": (1, 3), "QAttention": (1, 7),
                "QLinearMatMul": (3, 5), "QLinearConv": (3, 5), "ConvInteger": (1, 3)}


class Device(NamedTuple):
    """The CPU a model is quantized for: its architecture, ISA features, how to name it, and whether it
    is the machine this process runs on (where the two encodings can be measured)."""

    arch: str | None
    isa: tuple[str, ...]
    words: str
    here: bool


def saturates(arch: str | None, isa: Iterable[str]) -> bool:
    """True where ONNX Runtime's u8s8 kernels can saturate: an x86 CPU without VNNI."""
    return (arch or "").lower() in X86_ARCHES and not set(isa) & set(VNNI_FEATURES)


def this_machine() -> tuple[str, list[str]]:
    """(arch, ISA features) of the CPU this process runs on."""
    from edgekd.devices.remote_runner import cpu_facts, isa_features

    facts = cpu_facts()
    return facts.get("arch") or "", isa_features(facts.get("flags", []))


def local_device() -> Device:
    arch, isa = this_machine()
    return Device(arch, tuple(isa), "this machine", True)


def device_of(profile: str) -> Device:
    """The device a bench profile describes; the local profile is this machine."""
    from edgekd.devices.profiles import load_profile

    prof = load_profile(profile, detect=False)
    if prof.auto_detect:
        return local_device()
    return Device(prof.arch, tuple(prof.isa), f"the bench profile '{prof.name}'", False)


def encodings(cfg, device: Device | None = None) -> tuple[list[bool], str]:
    """``([unsigned?, ...], why)``: how the quantize setup ``cfg`` stores its int8 weights for ``device``
    (None: this machine). ``quantize.unsigned_weights`` true or false is one choice. ``auto``: signed where
    nothing can saturate (VNNI, ARM, 7-bit or unsigned weights, int8 activations, fp16); on an x86 CPU
    without VNNI both when it is this machine (the quantize stage scores and times the two, and ships the
    faster within the accuracy budget: ONNX Runtime's advice, u8s8 unless accuracy suffers, measured), and
    unsigned for another such device, where saturation cannot be measured from here."""
    device = device or local_device()
    setting = cfg.unsigned_weights
    if setting is True or setting is False:
        return [setting], "set in the recipe (quantize.unsigned_weights)"
    if cfg.method == "fp16":
        return [False], "fp16 has no int8 weights"
    if cfg.method == "static" and cfg.activation_type != "quint8":
        return [False], (f"activation_type {cfg.activation_type}: only uint8 activations against int8 weights "
                         "(u8s8) saturate")
    if cfg.weight_type != "qint8":
        return [False], f"weight_type {cfg.weight_type}: the weights are unsigned already"
    if cfg.reduce_range:
        return [False], "reduce_range: 7-bit weights cannot saturate an int16 pair sum"
    arch = device.arch or ""
    if saturates(arch, device.isa):
        where = f"{device.words} is x86 without VNNI ({arch}; {', '.join(device.isa) or 'no ISA features listed'})"
        if device.here:
            return [False, True], (f"{where}: ONNX Runtime's u8s8 kernels can saturate here and its u8u8 kernels "
                                   "cannot; both were scored and timed")
        return [True], (f"{where}: ONNX Runtime's u8s8 kernels can saturate there, which cannot be measured from "
                        "here; its u8u8 kernels cannot")
    if arch.lower() in X86_ARCHES:
        vnni = sorted(set(device.isa) & set(VNNI_FEATURES))
        return [False], f"{device.words} has {', '.join(vnni)}: signed weights are exact there, and faster"
    return [False], f"{device.words} is {arch or 'of an unknown architecture'}: signed weights are exact there"


def settle(cfg, device: Device | None = None):
    """``(cfg, why)``: ``cfg`` with ``unsigned_weights`` decided for ``device``, the first of
    :func:`encodings` (signed where both are built): the form a caller with one model to build uses."""
    (first, *_), why = encodings(cfg, device)
    return cfg.model_copy(update={"unsigned_weights": first}), why


def encode_unsigned(path: Path, external_data: bool = False) -> int:
    """Rewrite the ONNX file at ``path`` with every int8 weight initializer that an integer operator
    multiplies (and its zero point) stored as uint8, ``+ 128``: the same products, no u8s8 kernel.
    Weights read through ``DequantizeLinear`` (static QDQ) are rewritten too. Returns how many weights
    changed. Written to a temporary file, then renamed."""
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1

    def shift(name: str) -> None:
        t = inits[name]
        t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t).astype(np.int16) + 128).astype(np.uint8), name))

    done = 0
    for node in model.graph.node:
        slots = _weight_slots(node)
        if slots is None:
            continue
        w_at, z_at = slots
        w = node.input[w_at] if len(node.input) > w_at else ""
        if w not in inits or inits[w].data_type != onnx.TensorProto.INT8:
            continue
        z = node.input[z_at] if len(node.input) > z_at else ""
        if readers[w] > 1 or (z and readers.get(z, 0) > 1) or (z and z not in inits):
            # A weight (or zero point) another node also reads would change under it: left signed.
            continue
        shift(w)
        if z:
            shift(z)
        else:
            zp = f"{w}_zero_point_u8"
            model.graph.initializer.append(numpy_helper.from_array(np.array(128, np.uint8), zp))
            inputs = list(node.input) + [""] * (z_at + 1 - len(node.input))
            inputs[z_at] = zp
            del node.input[:]
            node.input.extend(inputs)
        done += 1
    if done:
        tmp = path.with_name(path.stem + ".u8" + path.suffix)
        onnx.save(model, str(tmp), save_as_external_data=external_data,
                  location=(path.name + ".data") if external_data else None)
        tmp.replace(path)
    return done


def signed_weights(path: Path) -> int:
    """How many int8 weight initializers of the ONNX file at ``path`` an integer operator multiplies
    (those :func:`encode_unsigned` would rewrite)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    int8 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    found = set()
    for node in graph.node:
        at = _weight_slots(node)
        if at and len(node.input) > at[0] and node.input[at[0]] in int8:
            found.add(node.input[at[0]])
    return len(found)


def _weight_slots(node) -> tuple[int, int] | None:
    """(weight input, zero point input) of a node that multiplies or dequantizes a weight; None otherwise."""
    if node.op_type == "DequantizeLinear":  # static QDQ: the weight is read through it
        return 0, 2
    return WEIGHT_SLOTS.get(node.op_type)
