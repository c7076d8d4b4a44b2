"""python -m dockercoins_tools: the same as the `dockercoins` command."""

from dockercoins_tools.cli import main

if __name__ == "__main__":
    main()
