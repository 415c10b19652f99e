"""vkd.runtime: devices refused with the reason, random streams restored, and the provenance a run records."""

import platform
import re
import subprocess

import pytest
import torch

from vkd import runtime
from vkd.cli import main
from vkd.runtime import git_revision, rng_state, set_rng_state


def test_a_device_this_machine_lacks_is_refused_with_the_reason(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    no_gpu = re.escape("device 'cuda': torch sees no GPU on this machine")
    with pytest.raises(runtime.DeviceNotFoundError, match=no_gpu):
        runtime.resolve_device("cuda")
    assert runtime.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(runtime.DeviceNotFoundError, match=re.escape("expected auto, cpu, cuda or cuda:N, got 'gpu0'")):
        runtime.resolve_device("gpu0")
    runs = ["-s", "out_dir", str(tmp_path), "-s", "device", "cuda"]
    for command in (["train", *runs], ["gan", *runs], ["bench", "projectors", "--device", "cuda"]):
        assert main(command) == 2
        assert "error: device 'cuda': torch sees no GPU on this machine" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before a run folder is made
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert runtime.resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(runtime.DeviceNotFoundError, match=re.escape("this machine has 1 GPU(s), cuda:0 to cuda:0")):
        runtime.resolve_device("cuda:1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a checkpoint loaded onto a GPU")
def test_random_streams_restore_from_a_checkpoint_loaded_onto_the_gpu(tmp_path):
    """Resuming on a GPU loads the checkpoint with map_location="cuda", which moves the saved generator
    states there too; they must still restore (the first H100 resume failed: "RNG state must be a ByteTensor")."""
    device = torch.device("cuda")
    torch.save(rng_state(device), tmp_path / "rng.pt")
    expected = torch.rand(3), torch.rand(3, device=device)
    set_rng_state(torch.load(tmp_path / "rng.pt", map_location=device, weights_only=False), device)
    assert torch.equal(torch.rand(3), expected[0])
    assert torch.equal(torch.rand(3, device=device), expected[1])


def test_git_revision_is_dirty_for_code_changes_not_for_regenerated_figures(tmp_path, monkeypatch):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "vkd").mkdir()
    (tmp_path / "figures").mkdir()
    (tmp_path / "vkd" / "code.py").write_text("x = 1\n")
    (tmp_path / "figures" / "table.csv").write_text("a\n1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    monkeypatch.setattr("vkd.runtime.project_root", lambda: tmp_path)
    clean = git_revision()
    assert len(clean) >= 7 and not clean.endswith("+dirty")
    (tmp_path / "figures" / "table.csv").write_text("a\n2\n")  # a notebook rerun rewrote a figure
    assert git_revision() == clean
    (tmp_path / "vkd" / "code.py").write_text("x = 2\n")  # the code changed
    assert git_revision() == clean + "+dirty"


def test_a_cpu_run_records_the_processor_and_the_instruction_set_its_kernels_use(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu\n")
    assert runtime.cpu_model(cpuinfo) == "AMD EPYC 7B13"
    assert runtime.cpu_model(tmp_path / "absent") == (platform.processor() or platform.machine())
    monkeypatch.setattr(runtime, "cpu_model", lambda: "AMD EPYC 7B13")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert runtime.device_description(torch.device("cpu")) == "cpu (AMD EPYC 7B13, AVX2, 2 threads)"
