"""A killed RLVR or OPSD job, restarted with the same command, resumes from its newest complete
checkpoint and ends with bitwise the same weights as a job that was never killed (CPU).

Every job here is a subprocess with the same environment (one thread), so that the uninterrupted
reference and the killed-and-restarted run compute with the same kernels."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compaction.training import staging_folder

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
# Rewards vary with length under the soft overlong penalty, so the smoke model's RLVR steps move it.
RLVR_SETS = ["rlvr.rounds=4", "rlvr.save_every=2", "rlvr.overlong=penalty", "rlvr.max_new_tokens=48",
             "rlvr.overlong_buffer=40", "rlvr.dynamic_sampling=false", "rlvr.prompts_per_round=3",
             "rlvr.samples_per_prompt=2", "rollout.batch_size=4"]
OPSD_SETS = ["opsd.rounds=4", "opsd.save_every=2", "opsd.unit=rollout", "opsd.teacher=ema", "opsd.ema_decay=0.5",
             "opsd.prompts_per_round=3", "opsd.samples_per_prompt=2", "opsd.max_new_tokens=24", "opsd.lr=1e-2",
             "opsd.redundancy_map_samples=2"]
#: How a checkpoint is written (launcher settings): straight to disk; staged as files in a memory
#: folder (the FSDP path); copied into host buffers (the default where processes hold whole tensors).
MODES = {"null": ["launcher.checkpoint_staging_dir=null"],
         "staged": ["launcher.checkpoint_staging_dir={shm}", "launcher.checkpoint_snapshot=false"],
         "snapshot": ["launcher.checkpoint_staging_dir={shm}"]}
#: Runs the job with its checkpoint of ``step`` stopping half-written on disk (after the accelerate
#: state, before the trainer state): the moment to SIGKILL it. Written straight to the stage folder,
#: that is inside the atomic folder; staged in memory, inside the background copy to the stage folder;
#: from a snapshot, inside the background write.
STALL_IN_CHECKPOINT = """
import shutil, sys, time
from pathlib import Path
from compaction import rounds, training

def stall(where):
    print("IN CHECKPOINT", where, flush=True)
    time.sleep(600)

original_checkpoint, original_copy = rounds.RoundStage.checkpoint, training.copy_staged
original_write = training.HostSnapshot.write
def checkpoint(self, done):
    if done == {step}:
        self.save_extra = stall
    return original_checkpoint(self, done)
def copy_staged(src, dst):
    if src.name == "step-{step:08d}":
        shutil.copytree(src / "state", dst / "state")
        stall(dst)
    return original_copy(src, dst)
def write(self, folder):
    original_write(self, folder)
    if folder.parent.name == ".step-{step:08d}.tmp":
        stall(folder)
rounds.RoundStage.checkpoint = checkpoint if "{staging}" == "null" else rounds.RoundStage.checkpoint
training.copy_staged = copy_staged
training.HostSnapshot.write = write
from jobs import {job}
{job}.main(sys.argv[1:])
"""

def job_args(job: str, policy: str, problems: str, out: Path, sets: list[str], *extra: str) -> list[str]:
    return ["--params", "params/smoke.yaml", *[a for s in sets for a in ("--set", s)], "--policy", policy,
            "--problems", problems, "--out", str(out), *extra]


def run_job(cmd: list[str], kill_on: str | None = None) -> list[str]:
    """Run ``cmd``; with ``kill_on``, SIGKILL its process group at the first output line containing it."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    killed = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if kill_on and kill_on in line and not killed.is_set():
                killed.set()
                os.killpg(proc.pid, signal.SIGKILL)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    rc = proc.wait(timeout=300)
    reader.join(10)
    if kill_on:
        assert killed.is_set() and rc == -signal.SIGKILL, "".join(lines[-30:])
    else:
        assert rc == 0, "".join(lines[-30:])
    return lines


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def rlvr_reference(smoke_data, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("rlvr-ref") / "rlvr"
    run_job([sys.executable, "-m", "jobs.rlvr", *job_args("rlvr", tiny_model, smoke_data["problems"], out, RLVR_SETS)])
    # The policy moved, so equal weights below say something.
    start, end = load_file(f"{tiny_model}/model.safetensors"), load_file(str(out / "final" / "model.safetensors"))
    assert any(not torch.equal(start[k], end[k]) for k in start)
    return out


@pytest.mark.slow
def test_rlvr_killed_between_checkpoints_resumes_to_the_same_weights(rlvr_reference, smoke_data, tiny_model,
                                                                      tmp_path):
    out = tmp_path / "rlvr"
    cmd = [sys.executable, "-m", "jobs.rlvr", *job_args("rlvr", tiny_model, smoke_data["problems"], out, RLVR_SETS)]
    # Round 2 recorded: its checkpoint comes after round 3 (save_every 2), so the job dies between two.
    run_job(cmd, kill_on="rlvr round 2 of 4")
    assert checkpoints(out) == ["step-00000002"] and (out / "round-0002" / "metrics.json").is_file()
    assert not (out / "final").exists()
    lines = run_job(cmd)
    assert any("resumed from its checkpoint after 2 of 4 rounds" in ln for ln in lines), "".join(lines[-30:])
    assert checkpoints(out) == ["step-00000002", "step-00000004"]
    assert_same_weights(rlvr_reference, out)


@pytest.mark.slow
@pytest.mark.parametrize("staging", list(MODES))
def test_rlvr_killed_while_writing_a_checkpoint_resumes_from_the_one_before(rlvr_reference, smoke_data, tiny_model,
                                                                          tmp_path, staging):
    out, shm = tmp_path / "rlvr", tmp_path / "shm"
    shm.mkdir()
    mode = [m.format(shm=shm) for m in MODES[staging]]
    args = job_args("rlvr", tiny_model, smoke_data["problems"], out, [*RLVR_SETS, *mode])
    run_job([sys.executable, "-c", STALL_IN_CHECKPOINT.format(step=4, job="rlvr", staging=staging), *args],
            kill_on="IN CHECKPOINT")
    # The half-written checkpoint is a temporary folder (its state written, no trainer_state.json).
    assert checkpoints(out) == [".step-00000004.tmp", "step-00000002"]
    assert (out / "checkpoints" / ".step-00000004.tmp" / "state" / "model.safetensors").is_file()
    assert not (out / "checkpoints" / ".step-00000004.tmp" / "trainer_state.json").exists()
    if staging == "staged":  # the killed job's staged copy is still in memory
        assert sorted(p.name for p in staging_folder(shm, out).iterdir()) == ["owner.pid", "step-00000004"]
        # An orphan of another stage (its owner gone) is freed by the next job too; a live owner's is not.
        orphan, alive = staging_folder(shm, tmp_path / "gone"), staging_folder(shm, tmp_path / "alive")
        for folder, pid in ((orphan, 2 ** 22 + 1), (alive, os.getpid())):
            (folder / "step-00000002").mkdir(parents=True)
            (folder / "owner.pid").write_text(str(pid))
    lines = run_job([sys.executable, "-m", "jobs.rlvr", *args])
    assert any("resumed from its checkpoint after 2 of 4 rounds" in ln for ln in lines), "".join(lines[-30:])
    assert checkpoints(out) == ["step-00000002", "step-00000004"]
    if staging == "staged":  # the restarted job freed its own and the orphan
        assert list(shm.iterdir()) == [alive]
    if staging == "snapshot":  # nothing was written to the staging folder
        assert list(shm.iterdir()) == []
    assert_same_weights(rlvr_reference, out)


@pytest.mark.slow
def test_opsd_with_an_ema_teacher_killed_between_checkpoints_resumes_to_the_same_weights(smoke_data, tiny_model,
                                                                                        tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"

    def cmd(folder):
        return [sys.executable, "-m", "jobs.opsd",
                *job_args("opsd", tiny_model, smoke_data["problems"], folder, OPSD_SETS, "--condition", "all")]

    run_job(cmd(ref))
    run_job(cmd(out), kill_on="opsd round 2 of 4")
    assert checkpoints(out) == ["step-00000002"]
    lines = run_job(cmd(out))
    assert any("resumed from its checkpoint after 2 of 4 rounds" in ln for ln in lines), "".join(lines[-30:])
    assert_same_weights(ref, out)
    # The EMA teacher came back with the checkpoint: the restarted job's teacher equals the reference's.
    ta = load_file(str(ref / "checkpoints" / "step-00000004" / "ema_teacher.safetensors"))
    tb = load_file(str(out / "checkpoints" / "step-00000004" / "ema_teacher.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.slow
def test_checkpoints_from_a_snapshot_hold_what_a_direct_write_holds(rlvr_reference, smoke_data, tiny_model, tmp_path):
    """The reference wrote its checkpoints from host-memory snapshots (the default); written straight
    to disk by accelerate, the same job's checkpoints hold the same files, weights, optimizer state
    and trainer state."""
    out = tmp_path / "rlvr"
    run_job([sys.executable, "-m", "jobs.rlvr",
             *job_args("rlvr", tiny_model, smoke_data["problems"], out, [*RLVR_SETS, *MODES["null"]])])
    assert checkpoints(out) == checkpoints(rlvr_reference) == ["step-00000002", "step-00000004"]
    for step in checkpoints(out):
        snap, direct = rlvr_reference / "checkpoints" / step / "state", out / "checkpoints" / step / "state"
        assert sorted(p.name for p in snap.iterdir()) == sorted(p.name for p in direct.iterdir())
        assert (snap.parent / "trainer_state.json").read_text() == (direct.parent / "trainer_state.json").read_text()
        ws, wd = load_file(str(snap / "model.safetensors")), load_file(str(direct / "model.safetensors"))
        assert ws.keys() == wd.keys() and all(torch.equal(ws[k], wd[k]) for k in ws)
        os_, od = (torch.load(d / "optimizer.bin", weights_only=True) for d in (snap, direct))
        assert os_["param_groups"] == od["param_groups"] and os_["state"].keys() == od["state"].keys()
        assert all(torch.equal(os_["state"][i][n], od["state"][i][n]) for i in os_["state"] for n in os_["state"][i])
        # The global RNGs are not seeded in these jobs (their draws are), so only the layout compares.
        rs, rd = (torch.load(d / "random_states_0.pkl", weights_only=False) for d in (snap, direct))
        assert rs.keys() == rd.keys() and rs["step"] == rd["step"]
    assert_same_weights(rlvr_reference, out)
