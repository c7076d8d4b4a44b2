"""python -m hasher_svc: the same as `dockercoins hasher`."""

import sys

from dockercoins_tools.cli import main

main(["hasher", *sys.argv[1:]])
