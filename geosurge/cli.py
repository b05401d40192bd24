"""``geosurge``: the workstation toolkit command line.

Each command group lives in its own module under ``geosurge.commands`` and registers itself here; heavy imports
(torch, onnx) happen inside the handlers, so ``geosurge --help`` and ``geosurge cells`` stay fast.
"""
from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import run_command

COMMAND_MODULES = ("cells", "model", "train", "distill", "export", "parity", "prune", "benchmark", "demo", "eval",
                   "reference", "views")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    p = argparse.ArgumentParser(prog="geosurge", description="GeoSURGE edge toolkit: cells, model, train, distill, "
                                "export (ONNX / TensorRT-bound / Core ML, fp16 / int8), parity, prune, benchmark, demo, "
                                "eval, reference, views.")
    p.add_argument("--version", action="version", version=f"geosurge {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"geosurge.commands.{name}").register(sub)
    return p


def main(argv=None) -> int:
    return run_command(build_parser(), argv, "geosurge")


if __name__ == "__main__":
    sys.exit(main())
