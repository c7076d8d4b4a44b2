"""python -m worker_svc: the same as `dockercoins worker`."""

import sys

from dockercoins.cli import main

main(["worker", *sys.argv[1:]])
