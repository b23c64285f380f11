"""``python -m nbcustom.serve``: the server process that ``%nbc serve`` starts (the API key
comes in the environment, never on this command line)."""

import argparse
import sys

from ..errors import NbCustomError
from . import DEFAULT_PORT, run

parser = argparse.ArgumentParser(prog="python -m nbcustom.serve")
parser.add_argument("names", nargs="*")
parser.add_argument("--store", required=True)
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=DEFAULT_PORT)
parser.add_argument("--parent", type=int, help="stop when this process ends")
args = parser.parse_args()
try:
    run(args.store, args.names, args.host, args.port, args.parent)
except NbCustomError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
