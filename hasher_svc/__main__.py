"""python -m hasher_svc: the same as `dockercoins hasher`."""

import sys

from dockercoins.cli import main

main(["hasher", *sys.argv[1:]])
