"""pianist-jax: the Pianist Transformer (score MIDI -> expressive performance) in JAX / Flax NNX."""

__version__ = "0.1.0"
