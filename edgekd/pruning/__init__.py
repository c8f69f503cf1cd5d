"""Pruning: attention heads and FFN neurons of transformer encoders, CNN channels, unstructured.

``prune_model(model, PruneConfig, PruneContext) -> (model, metrics)`` is the stage; methods
register under the recipe's ``prune.method`` names (see ``base.register``).
"""

from edgekd.pruning import channels, heads_ffn, unstructured  # noqa: F401  (register the methods)
from edgekd.pruning.base import (  # noqa: F401
    PruneContext,
    StepGoal,
    count_params,
    get_method,
    registered_methods,
)
from edgekd.pruning.encoder import FFN_SIZES_KEY, Encoder, load_pruned_model  # noqa: F401
from edgekd.pruning.stage import prune_model  # noqa: F401
from edgekd.pruning.unstructured import gzip_bytes, weight_sparsity  # noqa: F401
