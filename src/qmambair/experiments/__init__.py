"""Experiments that run trainings to compare methods: the benchmark, the demo, their reports and figures.

Above ``qmambair.train`` (they train) and ``qmambair.loading``; the evaluation primitives they use
(metrics, tiled inference, complexity) live below, in ``qmambair.eval``.
"""
