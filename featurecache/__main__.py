"""`python -m featurecache ...` runs the command line, as the `featurecache` script does."""

from .cli import main

if __name__ == "__main__":
    main()
