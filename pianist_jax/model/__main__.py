"""``python -m pianist_jax.model [tiny small base sym66]``: parameters and FLOPs per preset."""

import sys

from pianist_jax.model import describe

print(describe(sys.argv[1:] or ["tiny", "small", "base", "sym66"]))
