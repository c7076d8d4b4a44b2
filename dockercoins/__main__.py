"""python -m dockercoins: the same as the `dockercoins` command."""

from dockercoins.cli import main

if __name__ == "__main__":
    main()
