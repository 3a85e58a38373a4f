"""The params schema documents itself, and each choice set is spelled once.

- Every field of ``Params`` (nested sections included) has a description (TRL style).
- The OPSD conditions and units (compaction.enums, re-exported by compaction.selection) and the
  divergence kinds / kernel backends (kernels) are the single definitions: the params Literals,
  the CLI's ``--condition`` choices and the report's model order are derived from them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import typing
from typing import Any, Iterator

from pydantic import BaseModel

import compaction.enums as enums
import compaction.selection as selection
import kernels
from compaction.params import Params


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (``Section``, ``Section | None``, ``list[Section]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _fields(model: type[BaseModel], prefix: str = "", seen: frozenset = frozenset()) -> Iterator[tuple[str, Any, bool]]:
    """(dotted name, FieldInfo, is_leaf) of every field, walking nested sections recursively."""
    for name, info in model.model_fields.items():
        dotted = f"{prefix}{name}"
        nested = [m for m in _models_in(info.annotation) if m not in seen]
        yield dotted, info, not _models_in(info.annotation)
        for sub in nested:
            yield from _fields(sub, f"{dotted}.", seen | {model})


def _literal_values(annotation: Any) -> tuple:
    """The values of the Literal inside an annotation (``Literal[...]``, ``list[Literal[...]]``)."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation):
        values = _literal_values(arg)
        if values:
            return values
    return ()


def _field(dotted: str):
    model: Any = Params
    *sections, name = dotted.split(".")
    for section in sections:
        (model,) = _models_in(model.model_fields[section].annotation)
    return model.model_fields[name]


def test_walk_reaches_nested_sections():
    names = {name for name, _, _ in _fields(Params)}
    leaves = {name for name, _, leaf in _fields(Params) if leaf}
    # Sections two levels down, an optional section and a list of sections are all walked.
    assert {"model.tiny.head_dim", "data.synthetic.seed", "data.train_set.path", "eval.benchmarks.preset"} <= leaves
    assert {"opsd", "model.tiny", "data.train_set", "eval.benchmarks"} <= names - leaves


def test_every_leaf_field_has_a_description():
    missing = [name for name, info, leaf in _fields(Params) if leaf and not (info.description or "").strip()]
    assert not missing, f"{len(missing)} params field(s) without a description: {', '.join(missing)}"


def test_every_section_field_has_a_description():
    missing = [name for name, info, leaf in _fields(Params) if not leaf and not (info.description or "").strip()]
    assert not missing, f"{len(missing)} params section(s) without a description: {', '.join(missing)}"


# ------------------------------------------------------------------------ one definition per enum
def test_conditions_are_defined_once():
    assert enums.CONDITIONS == typing.get_args(enums.Condition) == ("baseline", "all", "correct", "incorrect")
    assert selection.CONDITIONS is enums.CONDITIONS
    assert selection.TRAINING_CONDITIONS is enums.TRAINING_CONDITIONS
    assert enums.TRAINING_CONDITIONS == tuple(c for c in enums.CONDITIONS if c != enums.BASELINE)
    assert enums.BASELINE in enums.CONDITIONS
    # The flow's branches: every condition, then the length-penalty baseline (not an OPSD condition).
    assert enums.BRANCHES == typing.get_args(enums.Branch) == (*enums.CONDITIONS, enums.LENPEN)
    assert enums.LENPEN not in enums.CONDITIONS
    assert _literal_values(_field("opsd.conditions").annotation) == enums.BRANCHES
    assert Params().opsd.conditions == list(enums.BRANCHES)


def test_units_are_defined_once():
    assert selection.UNITS is enums.UNITS == typing.get_args(enums.Unit)
    assert _literal_values(_field("opsd.unit").annotation) == enums.UNITS


def test_divergence_kinds_and_backends_are_defined_once():
    import kernels._common as common

    assert kernels.KINDS == typing.get_args(kernels.Kind) == ("reverse_kl", "forward_kl", "jsd", "sampled_token")
    assert common.KINDS is kernels.KINDS and common.BACKENDS is kernels.BACKENDS
    assert _literal_values(_field("opsd.divergence").annotation) == kernels.KINDS
    assert _literal_values(_field("model.kernel_backend").annotation) == kernels.BACKENDS == typing.get_args(
        kernels.Backend)


def test_cli_condition_choices_are_the_branches():
    from cli.main import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    run = subparsers.choices["run"]
    action = next(a for a in run._actions if a.dest == "conditions")
    assert tuple(action.choices) == enums.BRANCHES
    args = parser.parse_args(["run", "compaction", *(x for c in enums.BRANCHES for x in ("--condition", c))])
    assert args.conditions == list(enums.BRANCHES)


def test_report_orders_every_condition():
    from compaction.report import MODEL_ORDER, SAME_AS_RLVR

    # The report labels an OPSD model `opsd-<condition>` (tasks/opsd.py, compaction/report.py).
    opsd_models = [m for m in MODEL_ORDER if m.startswith("opsd-")]
    assert opsd_models == [f"opsd-{c}" for c in enums.CONDITIONS]
    assert MODEL_ORDER[:3] == ["sft", "rlvr", enums.LENPEN_MODEL]
    assert SAME_AS_RLVR == f"opsd-{enums.BASELINE}" and SAME_AS_RLVR in MODEL_ORDER


def test_params_schema_imports_no_torch_or_pandas(repo):
    # `compaction grade` / `compaction params` load the schema: it must not pay for torch or pandas.
    code = ("import sys, compaction.params, cli.main; cli.main.build_parser(); "
            "print(sorted(m for m in ('torch', 'pandas', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=repo).stdout
    assert out.strip() == "[]"
