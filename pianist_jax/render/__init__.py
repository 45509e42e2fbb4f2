"""Rendering scores into performances: the windowed `Renderer` and its command line
(`renderer`), the jitted window loop that drives the model's decoder (`core`), and per-slot
sampling settings (`decoding`). `python -m pianist_jax.render` runs `renderer.main`."""
