import sys

from pianist_jax.evaluate.histograms import main

sys.exit(main())
