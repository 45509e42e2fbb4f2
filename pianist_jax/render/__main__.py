import sys

from pianist_jax.render.cli import main

sys.exit(main())
