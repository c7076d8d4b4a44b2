"""python -m webui: the same as `dockercoins webui`."""

import sys

from dockercoins_tools.cli import main

main(["webui", *sys.argv[1:]])
