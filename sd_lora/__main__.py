import sys

from sd_lora.cli import main

sys.exit(main())
