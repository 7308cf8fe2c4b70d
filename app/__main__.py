"""`python -m sd_lora_app --adapters DIR [--models DIR] ...`: the same as `sd-lora app ...`."""

import sys

from sd_lora.cli.main import main

sys.exit(main(["app", *sys.argv[1:]]))
