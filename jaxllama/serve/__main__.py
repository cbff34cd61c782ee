"""`python -m jaxllama.serve ...` is `jaxllama serve ...`."""

import sys

from jaxllama.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
