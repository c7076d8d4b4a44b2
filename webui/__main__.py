"""python -m webui: the same as `dockercoins webui`."""

import sys

from dockercoins.cli import main

main(["webui", *sys.argv[1:]])
