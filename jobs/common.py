"""What every job's command line shares: `--params FILE --set key=value`, and the stage folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from compaction.params import Params, load_params


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params/demo.yaml", help="params YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a param, e.g. --set rollout.n=8 (repeatable)")
    return p


def params_from(args: argparse.Namespace) -> Params:
    return load_params(args.params, args.overrides)


def stage_dir(params: Params, stage: str, key: str) -> Path:
    """``artifacts/<stage>/<key>/``: where one stage's output for one set of inputs lives."""
    return Path(params.paths.artifacts) / stage / key


def parse(argv: Sequence[str] | None, p: argparse.ArgumentParser) -> argparse.Namespace:
    return p.parse_args(argv)
