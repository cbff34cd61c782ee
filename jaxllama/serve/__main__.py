"""`python -m jaxllama.serve ...` is `jaxllama serve ...`."""

import sys

from jaxllama.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
