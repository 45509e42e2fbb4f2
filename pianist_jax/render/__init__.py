"""Rendering scores into performances: the windowed `Renderer` (`renderer`), the jitted window
loop that drives the model's decoder (`core`), per-slot sampling settings (`decoding`), and the
command line (`cli`) with its musician's controls (`controls`), audio (`audio`) and pictures
(`plot`). `python -m pianist_jax.render` runs `cli.main`."""
