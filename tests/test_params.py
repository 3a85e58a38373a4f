from pathlib import Path

import pytest

from compaction.params import Params, ParamsError, flatten, load_params

PARAM_FILES = ["demo", "smoke", "qwen3-8b"]


@pytest.mark.parametrize("name", PARAM_FILES)
def test_shipped_params_files_load(repo, name):
    p = load_params(repo / "params" / f"{name}.yaml")
    assert isinstance(p, Params)
    assert Path(p.paths.artifacts).is_absolute()
    assert p.tracking.tracking_uri.startswith("sqlite:////")


def test_qwen3_8b_has_paper_settings(repo):
    p = load_params(repo / "params" / "qwen3-8b.yaml")
    assert p.opsd.divergence == "reverse_kl" and p.opsd.teacher == "frozen" and p.opsd.context == "solution"
    assert p.eval.k == 8 and p.eval.temperature == 0.6
    assert {b.name for b in p.eval.benchmarks} >= {"math500", "aime24", "aime25"}


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("sft:\n  lrr: 0.1\n")
    with pytest.raises(ParamsError) as e:
        load_params(f)
    assert str(f) in str(e.value) and "sft.lrr" in str(e.value) and "unknown key" in str(e.value)


def test_unknown_section_is_an_error(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("sftt: {}\n")
    with pytest.raises(ParamsError, match=r"sftt: unknown key"):
        load_params(f)


def test_wrong_type_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("rollout:\n  n: many\n")
    with pytest.raises(ParamsError) as e:
        load_params(f)
    assert str(f) in str(e.value) and "rollout.n" in str(e.value)


def test_out_of_range_value_is_an_error(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("data:\n  synthetic:\n    redundancy_rate: 1.5\n")
    with pytest.raises(ParamsError, match=r"data.synthetic.redundancy_rate"):
        load_params(f)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match="nope.yaml: params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_non_mapping_file_is_an_error(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="top level must be a mapping"):
        load_params(f)


def test_overrides_are_typed_and_applied(repo):
    p = load_params(repo / "params" / "demo.yaml",
                    ["sft.lr=3e-4", "opsd.conditions=[correct, incorrect]", "rollout.n=7", "opsd.clip=null"])
    assert p.sft.lr == pytest.approx(3e-4)
    assert p.opsd.conditions == ["correct", "incorrect"]
    assert p.rollout.n == 7 and p.opsd.clip is None


def test_unknown_override_key_is_an_error(repo):
    with pytest.raises(ParamsError, match=r"demo.yaml: --set sft.nope: unknown key"):
        load_params(repo / "params" / "demo.yaml", ["sft.nope=1"])


def test_bad_override_value_names_key(repo):
    with pytest.raises(ParamsError, match=r"rollout.temperature"):
        load_params(repo / "params" / "demo.yaml", ["rollout.temperature=hot"])


def test_override_without_equals_is_an_error():
    with pytest.raises(ParamsError, match="expected key=value"):
        load_params(None, ["sft.lr"])


def test_dataset_source_requires_train_set():
    with pytest.raises(ParamsError, match="data.train_set is required"):
        load_params(None, ["data.source=dataset"])


def test_relative_paths_resolve_against_base(tmp_path):
    p = load_params(None, base=tmp_path)
    assert p.paths.root == str(tmp_path.resolve())
    assert p.paths.artifacts == str(tmp_path.resolve() / "artifacts")
    assert p.tracking.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_section_hash_changes_only_with_its_section():
    a, b = load_params(None), load_params(None, ["sft.lr=0.5"])
    assert a.section_hash("data") == b.section_hash("data")
    assert a.section_hash("sft") != b.section_hash("sft")


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": 1, "a.c": "[1, 2]", "d": "x"}


@pytest.mark.parametrize("beta, kl", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_jsd_at_beta_0_or_1_is_refused_with_the_kl_it_means(repo, beta, kl):
    """JSD at the ends of beta is identically 0 (no gradient): a run would learn nothing. TRL's
    generalized JSD means forward KL at 0 and reverse KL at 1: the error points there."""
    with pytest.raises(ParamsError, match=rf"demo.yaml: opsd.beta: .*trains nothing.*opsd.divergence={kl}"):
        load_params(repo / "params" / "demo.yaml", ["opsd.divergence=jsd", f"opsd.beta={beta}"])
    assert load_params(repo / "params" / "demo.yaml", ["opsd.divergence=jsd", "opsd.beta=0.3"]).opsd.beta == 0.3
    assert load_params(repo / "params" / "demo.yaml", [f"opsd.beta={beta}"]).opsd.divergence == "reverse_kl"
