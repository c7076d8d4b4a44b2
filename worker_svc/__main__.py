"""python -m worker_svc: the same as `dockercoins worker`."""

import sys

from dockercoins_tools.cli import main

main(["worker", *sys.argv[1:]])
