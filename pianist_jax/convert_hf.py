"""`python -m pianist_jax.convert_hf`: the command of `pianist_jax.artifacts.convert_hf`."""

import sys

from pianist_jax.artifacts.convert_hf import main

if __name__ == "__main__":
    sys.exit(main())
