"""A third task family written the way the README's architecture section says one is added: this
folder (family, settings, serve, summary) plus one line in ``edgekd.registry.TASKS``. It classifies
rows of numbers with a linear model; ``tests/test_new_family.py`` registers it and runs it through
the pipeline, the console summary, ``edgekd serve`` and ``edgekd.load``. Nothing outside this folder
knows it."""
