"""python -m rng_svc: the same as `dockercoins rng`."""

import sys

from dockercoins_tools.cli import main

main(["rng", *sys.argv[1:]])
