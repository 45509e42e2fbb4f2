import sys

from pianist_jax.render.renderer import main

sys.exit(main())
