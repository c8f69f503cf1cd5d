"""The pipeline's stages that every task family shares (export, quantize, bench), and the
``Stage`` record both they and the task families' own stages are described by (see base.py).

Task-specific stages (teacher, distill, baseline, eval, prune) live with their family in
``edgekd/tasks/<family>/``; ``edgekd/pipeline.py`` puts the two together in one fixed order.
"""
