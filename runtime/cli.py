"""``geosurge-run``: the on-device command line (torch-free)."""
from __future__ import annotations

import argparse
import sys

from geosurge import __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geosurge-run", description="Run a geosurge bundle on this device (no torch).")
    p.add_argument("--version", action="version", version=f"geosurge-run {__version__}")
    p.add_subparsers(dest="command", metavar="COMMAND")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
