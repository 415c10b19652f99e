"""Where a run executes and what it records about that: the device (refused with the reason when the
machine lacks it), the processes of a ``torchrun`` job, every random stream (seeded, saved and restored for
exact resume), and the provenance a summary records (device model, software versions, git revision)."""

from __future__ import annotations

import os
import platform
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.distributed as dist
import torchvision

from .paths import project_root


class DeviceNotFoundError(ValueError):
    """The device a run or benchmark names is not on this machine (or is no device name); the message says why."""


def resolve_device(name: str) -> torch.device:
    """``auto`` (a GPU if there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; a GPU this machine does
    not have raises :class:`DeviceNotFoundError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise DeviceNotFoundError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceNotFoundError(f"device {name!r}: torch sees no GPU on this machine (torch {torch.__version__}, "
                                      f"CUDA {torch.version.cuda or 'none'}); use device 'cpu' or 'auto'")
        if (device.index or 0) >= count:
            raise DeviceNotFoundError(f"device {name!r}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return device


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The processor's model name ("AMD EPYC", "Intel(R) Xeon(R) ...") where Linux's ``cpuinfo`` gives one,
    else what :mod:`platform` knows ("x86_64")."""
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    return platform.processor() or platform.machine()


def device_description(device: torch.device) -> str:
    """The GPU's name, or for the CPU its model, the instruction set torch's kernels use (AVX2, AVX512, ...) and
    the thread count: what decides whether two CPU runs can agree to the last bit (kernels of different
    instruction sets round differently, so a run repeats exactly only on the same kind of CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"


def software_versions() -> dict[str, str]:
    """The versions a run's summary records next to its device: Python, torch (and the CUDA it was built
    with, "none" for a CPU build), torchvision and timm."""
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "cuda": torch.version.cuda or "none"}


REGENERATED_OUTPUTS = ("figures", "notebooks/executed")  # tracked, but rewritten by every notebook run


def git_revision() -> str:
    """The project's commit, with "+dirty" when a tracked file other than the regenerated outputs differs
    from it (so a rerun of the notebooks on a clean checkout still records a clean revision)."""
    try:
        root = project_root()
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        excluded = [f":(exclude){path}" for path in REGENERATED_OUTPUTS]
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded],
                               cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@dataclass(frozen=True)
class Processes:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the processes (unchanged in a single process)."""
        if self.world > 1:
            values = values.clone()
            dist.all_reduce(values)
        return values

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, value) -> list:
        """``value`` (any picklable object) of every process, in rank order."""
        if self.world == 1:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values


def join_processes(device_name: str) -> tuple[Processes, torch.device]:
    """Join the ``torchrun`` job this process belongs to (NCCL on GPUs, gloo on the CPU), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world == 1:
        return Processes(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(rank, world), device


def seed_everything(seed: int) -> None:
    """Seed every random stream a run draws from: torch (CPU and GPUs), NumPy (timm's Mixup) and Python's
    ``random`` (timm's augmentations when the main process loads the images)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def rng_state(device: torch.device) -> dict:
    """Every random stream a training step may draw from (torch CPU and CUDA, NumPy, Python)."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state, device: torch.device) -> None:
    """Restore what ``rng_state`` saved.  Its generator states are CPU byte tensors, whatever device the
    checkpoint was loaded onto (``torch.load(map_location="cuda")`` moves them too)."""
    if isinstance(state, torch.Tensor):  # checkpoints written before the other streams were saved
        torch.set_rng_state(state.cpu())
        return
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
