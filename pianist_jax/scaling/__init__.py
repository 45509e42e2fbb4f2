"""Scaling-law sweeps: plan and run the grid of sizes and budgets (`sweep`), fit power laws to
the results (`fit`). `python -m pianist_jax.sweep` runs `sweep.main`."""
