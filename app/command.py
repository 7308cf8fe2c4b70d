"""`sd-lora app`: the command's flags are defined by the CLI; this runs them.

The CLI finds this function through the `sd_lora.front_ends` entry point, so the library never
imports the app and `pip install sd-lora` (without the `app` extra) trains without a UI stack.
"""

from __future__ import annotations

import argparse
import sys

from sd_lora.services.workspace import Workspace

from .server import check_port, launch, parse_auth


def run(args: argparse.Namespace) -> int:
    auth = parse_auth(args.auth)
    check_port(args.host, args.port)  # before any folder is made
    workspace = Workspace.create(args.adapters, outputs=args.outputs, runs=args.runs,
                                 models=args.models, datasets=args.datasets)
    exposed = args.share or args.host not in (None, "127.0.0.1", "localhost")
    if exposed and auth is None:
        where = "a public link" if args.share else args.host
        print(f"warning: serving on {where} without --auth: anyone who can reach it can use the "
              "app (train, generate, read the adapters)", file=sys.stderr)
    launch(workspace, host=args.host, port=args.port, share=args.share, auth=auth)
    return 0
