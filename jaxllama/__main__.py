"""`python -m jaxllama`: the command line (`jaxllama.cli`)."""

import sys

from jaxllama.cli import main

if __name__ == "__main__":
    sys.exit(main())
