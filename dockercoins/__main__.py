"""python -m dockercoins: the same as the `dockercoins` command."""

from dockercoins.cli import main

main()
