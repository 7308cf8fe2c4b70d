import sys

from sd_lora.cli.main import main

sys.exit(main())
