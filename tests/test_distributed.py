"""``python -m vkd train`` under torchrun: two CPU processes (gloo), checkpoint and exact resume."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from vkd import data
from vkd.engine import TrainConfig
from vkd.launch import launch_torchrun
from vkd.paths import project_root


def torchrun(config_path, *extra):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--module", "vkd", "train", "--config", str(config_path), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=project_root(), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def write_config(tmp_path, archive, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nout_dir: {tmp_path / 'runs'}\ndata_root: {tmp_path / 'data'}\nstudent: resnet8\n"
                    "epochs: 3\nbatch_size: 1\nlr: 0.05\nprogress: false\n")
    return path


def test_two_process_run_resumes_exactly_from_its_checkpoint(tmp_path, tiny_archive, monkeypatch):
    monkeypatch.setenv(data.ARCHIVE_ENV, str(tiny_archive))
    out = torchrun(write_config(tmp_path, tiny_archive, "full"))
    summary = json.loads(out.strip().splitlines()[-1])  # printed once, by rank 0
    assert summary["processes"] == 2 and summary["epochs"] == 3

    split = write_config(tmp_path, tiny_archive, "split")
    torchrun(split, "--stop-after-epoch", "1")
    assert len(pd.read_csv(tmp_path / "runs/split/metrics.csv")) == 1
    torchrun(split)
    a = pd.read_csv(tmp_path / "runs/full/metrics.csv").drop(columns="epoch_seconds")
    b = pd.read_csv(tmp_path / "runs/split/metrics.csv").drop(columns="epoch_seconds")
    pd.testing.assert_frame_equal(a, b)
    wa, wb = (torch.load(tmp_path / f"runs/{n}/model.pt")["model"] for n in ("full", "split"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert torch.load(tmp_path / "runs/split/checkpoint.pt", weights_only=False)["world_size"] == 2


def test_a_failing_torchrun_job_is_named_with_the_end_of_its_log(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ARCHIVE_ENV, raising=False)  # no data anywhere: the process stops at once
    config = TrainConfig(name="no-data", out_dir=str(tmp_path / "runs"), data_root=str(tmp_path / "no-data"),
                         student="resnet8", epochs=1, progress=False)
    with pytest.raises(RuntimeError, match=r"torchrun job no-data failed \(exit [1-9]") as failure:
        launch_torchrun(config, follow_every=0.1)
    assert "CIFAR-10 (JPEG) not found" in str(failure.value)  # the tail of the job's train.log
