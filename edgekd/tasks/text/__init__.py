"""Text classification: the task (BERT-family encoders, tokenisation, metrics; task.py), its run
context (context.py), its stages (teacher.py, distill.py for distill and baseline, evaluate.py,
prune.py) and the family object that puts them together (family.py)."""
