from jaxllama.cli import main
import sys
sys.exit(main())
