"""`python -m pipeline ...` is the same as `mobilenet-embed ...`."""
import sys

from pipeline.cli import main

sys.exit(main())
