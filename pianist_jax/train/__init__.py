"""Training: mesh and sharding rules, the jitted step, the loop, checkpoints, AOT compiles.

`python -m pianist_jax.train` runs `loop.main`; `python -m pianist_jax.aot` runs `aot.main`.
"""
