import sys

from pianist_jax.train.loop import main

sys.exit(main())
