"""Runs trained in processes of their own: several at once (``train_many``), or one as a ``torchrun`` job
(``launch_torchrun``); interrupting the caller stops them, and each resumes from its last epoch."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace

import torch
from tqdm.auto import tqdm

from .engine import RunConfig, TrainConfig, finished_summary
from .paths import project_root

TRAIN_LOG = "train.log"  # in each run folder: the output of the process that trains it


def train_many(configs: list[RunConfig], processes: int = 1) -> list[dict]:
    """Train ``configs`` (TrainConfig, or vkd.gan's GANConfig) and return their summaries, in order.

    ``processes=1`` trains them one after the other in this process.  More runs them concurrently as
    ``python -m vkd train`` (``gan``) processes (each writes ``config.json`` and ``train.log`` into its run
    folder): small CIFAR models leave a GPU mostly idle, so several runs share one well; with several
    GPUs visible the processes are spread over them; on the CPU the cores are divided between them.
    Finished runs are reused and interrupted ones resume, as with :func:`vkd.engine.train`."""
    if processes <= 1:
        return [config.run() for config in configs]
    gpus = torch.cuda.device_count()
    env = _child_env(processes)
    waiting = [(slot, config) for slot, config in enumerate(configs) if finished_summary(config) is None]
    running, failed = {}, []
    bar = tqdm(total=len(waiting), desc=f"{len(waiting)} runs, {processes} at a time", mininterval=5)
    with _stopped_on_exit(running):
        while waiting or running:
            while waiting and len(running) < processes:
                slot, config = waiting.pop(0)
                if gpus > 1:
                    env = {**env, "CUDA_VISIBLE_DEVICES": str(slot % gpus)}
                running[slot] = _start(config, [sys.executable, "-m", "vkd", config.COMMAND], env)
            time.sleep(1)
            for slot, process in list(running.items()):
                if process.poll() is not None:
                    del running[slot]
                    bar.update()
                    if process.returncode:
                        log = _log_tail(configs[slot], 5)
                        failed.append(f"{configs[slot].name} (exit {process.returncode}): " + "\n    ".join(log))
    bar.close()
    if failed:
        raise RuntimeError("training failed for " + "\n  ".join(failed))
    return [config.run() for config in configs]  # finished: their summaries (completed where a kind needs it)


@contextlib.contextmanager
def _stopped_on_exit(running: dict[int, subprocess.Popen], grace_s: float = 30.0):
    """Leave no training process of ``running`` (slot -> process, as it stands on exit) going on behind an
    interrupted caller (Ctrl-C, a notebook's interrupt, an error): each is terminated, and killed if it has not
    ended within ``grace_s``.  Their checkpoints are written atomically, so each run resumes where its last
    epoch ended when started again."""
    try:
        yield
    finally:
        for process in running.values():
            if process.poll() is None:
                process.terminate()
        for process in running.values():
            try:
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _child_env(processes: int) -> dict:
    """The environment of ``processes`` training processes started together: unbuffered output, and the
    CPU threads divided between them."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}


def _start(config: RunConfig, launcher: list[str], env: dict) -> subprocess.Popen:
    """Start ``launcher ... --config <run>/config.json`` in the background, logging to ``<run>/train.log``."""
    run_dir = config.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(replace(config, progress=False)), indent=1))
    with open(run_dir / TRAIN_LOG, "a") as log:
        return subprocess.Popen([*launcher, "--config", str(run_dir / "config.json")], cwd=project_root(), env=env,
                                stdout=log, stderr=subprocess.STDOUT)


def _log_tail(config: RunConfig, lines: int) -> list[str]:
    """The last ``lines`` lines of the run's training log (what a failed process printed last).

    torchrun ends a failed job's log with its own traceback (``ChildFailedError``), which names the failed
    rank but not the cause; that traceback is left out, so the tail shows what the workers printed."""
    log = (config.run_dir() / TRAIN_LOG).read_text().strip().splitlines()
    launcher_failure = [i for i, line in enumerate(log) if "ChildFailedError" in line]
    if launcher_failure:
        starts = [i for i, line in enumerate(log[:launcher_failure[-1]]) if line.startswith("Traceback")]
        log = log[:starts[-1]] if starts else log
    return log[-lines:]


def launch_torchrun(config: TrainConfig, nproc_per_node: int = 1, nnodes: int = 1, node_rank: int = 0,
                    rdzv_endpoint: str = "", follow_every: float = 30.0) -> dict:
    """Train ``config`` as a ``torchrun`` job (``python -m vkd train`` in each process) and wait for it.

    One node: ``--standalone``.  Several: every node runs this with the same ``rdzv_endpoint``
    (host:port of node 0) and its own ``node_rank``.  While the job runs, the newest line of its
    ``metrics.csv`` is printed every ``follow_every`` seconds; a failure raises with the log's tail.
    Returns the run's summary."""
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    if nnodes == 1:
        launcher.append("--standalone")
    else:
        if not rdzv_endpoint:
            raise ValueError(f"nnodes={nnodes} needs rdzv_endpoint (host:port of node 0)")
        launcher += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
                     f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={config.name}"]
    summary = finished_summary(config)
    if summary is not None:
        return summary
    process = _start(config, [*launcher, "--module", "vkd", "train"], _child_env(nproc_per_node))
    metrics, shown = config.run_dir() / "metrics.csv", None
    with _stopped_on_exit({0: process}):
        while process.poll() is None:
            time.sleep(min(follow_every, 2.0) if shown is None else follow_every)
            if metrics.is_file():
                last = metrics.read_text().strip().splitlines()
                if len(last) > 1 and last[-1] != shown:
                    shown = last[-1]
                    print(dict(zip(last[0].split(","), shown.split(","), strict=False)), flush=True)
    if process.returncode:
        tail = _log_tail(config, 15)
        raise RuntimeError(f"torchrun job {config.name} failed (exit {process.returncode}):\n  " + "\n  ".join(tail))
    return finished_summary(config)
