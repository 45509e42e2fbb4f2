"""`python -m pianist_jax.export`: the command of `pianist_jax.artifacts.checkpoint_export`."""

import sys

from pianist_jax.artifacts.checkpoint_export import main

if __name__ == "__main__":
    sys.exit(main())
