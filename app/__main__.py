"""`python -m app --adapters DIR [--models DIR] ...`: the same as `sd-lora app ...`."""

import sys

from sd_lora.cli import main

sys.exit(main(["app", *sys.argv[1:]]))
