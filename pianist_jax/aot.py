"""`python -m pianist_jax.aot`: the command of `pianist_jax.train.aot`."""

import sys

from pianist_jax.train.aot import main

if __name__ == "__main__":
    sys.exit(main())
