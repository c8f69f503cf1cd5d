"""Students by layer copy: a DistilBERT-style student whose block i is a copy of teacher block
``layers[i]`` (``build_student``), from a plain or a pruned teacher (its per-layer heads and FFN widths
follow the copied layers: ``student_config``). The encoder families are described in
:mod:`edgekd.encoders`; a pruned block is sliced by :mod:`edgekd.pruning.encoder`."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from edgekd.encoders import (
    SLICED_HEADS_KEY,
    EncoderFamily,
    block_prefix,
    family_of,
    layer_kind,
    verify_student,
)
from edgekd.errors import RecipeError, StageError
from edgekd.pruning.encoder import FFN_SIZES_KEY, shape_from_config


def build_student(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """DistilBERT-style student: the teacher's config with ``len(layers)`` blocks, student block i a copy
    of teacher block ``layers[i]``, everything else copied as is; verified by :func:`verify_student`."""
    fam = family_of(teacher)
    if fam.no_layer_copy_why:
        raise RecipeError([f"student.layers: {fam.no_layer_copy_why}"])
    n_teacher = int(getattr(teacher.config, fam.layers_key))
    bad = [i for i in layers if not 0 <= i < n_teacher]
    if bad or not layers or len(set(layers)) != len(layers):
        raise RecipeError([f"student.layers: {layers} must be distinct layer indices in 0..{n_teacher - 1} "
                           f"(the teacher has {n_teacher} layers)"])
    kinds = [(i, t, layer_kind(teacher.config, i), layer_kind(teacher.config, t)) for i, t in enumerate(layers)]
    wrong = [f"student layer {i} would be {ks} but teacher layer {t} is {kt}" for i, t, ks, kt in kinds if ks != kt]
    if wrong:
        raise RecipeError([f"student.layers: {layers} cannot be copied into a {fam.name} student: "
                           + "; ".join(wrong) + ". Pick teacher layers whose kind matches their new position."])
    cfg = student_config(teacher.config, fam, layers)
    student = type(teacher)(cfg)  # heads pruned through Hugging Face (config.pruned_heads) are gone already
    shape_from_config(student, cfg, f"the {fam.name} student")
    prefix = block_prefix(teacher, fam)
    src = teacher.state_dict()
    new_sd = {}
    for key in student.state_dict():
        src_key = key
        if key.startswith(prefix):
            index, _, rest = key[len(prefix):].partition(".")
            src_key = f"{prefix}{layers[int(index)]}.{rest}"
        if src_key not in src:
            raise StageError(f"building the {fam.name} student: teacher has no {src_key} for student {key}")
        new_sd[key] = src[src_key].clone()
    student.load_state_dict(new_sd)
    verify_student(teacher, student, layers)
    return student


def _by_teacher_layer(record: Any) -> dict[int, list[int]]:
    return {int(k): list(v) for k, v in (record or {}).items()}


def student_config(config: Any, fam: EncoderFamily, layers: list[int]) -> Any:
    """The teacher's config for a student of teacher ``layers``: the layer count, and what a pruned teacher
    records per layer (heads removed through Hugging Face in ``pruned_heads``, heads edgekd sliced in
    ``edgekd_pruned_heads``, unequal FFN widths in ``ffn_sizes_per_layer``) keyed by student layer: student
    layer i gets teacher layer ``layers[i]``'s entry."""
    cfg = copy.deepcopy(config)
    setattr(cfg, fam.layers_key, len(layers))
    pruned = _by_teacher_layer(getattr(cfg, "pruned_heads", None))
    cfg.pruned_heads = {i: pruned[t] for i, t in enumerate(layers) if pruned.get(t)}
    sliced = getattr(cfg, SLICED_HEADS_KEY, None)
    if sliced:
        by_layer = _by_teacher_layer(sliced)
        setattr(cfg, SLICED_HEADS_KEY, {str(i): by_layer[t] for i, t in enumerate(layers) if by_layer.get(t)})
    sizes = getattr(cfg, FFN_SIZES_KEY, None)
    if sizes:
        kept = [int(sizes[t]) for t in layers]
        setattr(cfg, fam.ffn_key, max(kept))
        if len(set(kept)) == 1:
            delattr(cfg, FFN_SIZES_KEY)
        else:
            setattr(cfg, FFN_SIZES_KEY, kept)
    return cfg
