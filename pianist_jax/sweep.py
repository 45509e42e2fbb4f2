"""`python -m pianist_jax.sweep`: the command of `pianist_jax.scaling.sweep`."""

import sys

from pianist_jax.scaling.sweep import main

if __name__ == "__main__":
    sys.exit(main())
