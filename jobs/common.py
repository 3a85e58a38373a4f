"""What every job's command line shares: `--params FILE --set key=value`."""

from __future__ import annotations

import argparse
from typing import Sequence

from compaction.params import Params, add_params_args, load_params


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    add_params_args(p)
    return p


def params_from(args: argparse.Namespace) -> Params:
    return load_params(args.params, args.overrides)


def parse(argv: Sequence[str] | None, p: argparse.ArgumentParser) -> argparse.Namespace:
    return p.parse_args(argv)
