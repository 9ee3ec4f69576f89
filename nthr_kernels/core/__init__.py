"""Layers 0-2: the rules (:mod:`.rules`), the input checks and the :class:`~.checks.Batch`
(:mod:`.checks`), and the plan of a batch (:mod:`.plan`). Nothing here runs a kernel."""
