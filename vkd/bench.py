"""Benchmarks that print ratios measured in one process (never timed tests)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable

import pandas as pd
import torch
from torch import nn

from .projectors import ORTHOGONAL_METHODS, OrthogonalProjector


def _forward_backward(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad)

    return step


def time_interleaved(steps: dict[str, Callable[[], None]], reps: int = 20, slow_s: float = 1.0) -> dict[str, float]:
    """Median seconds per call of each step, run round-robin so drifts in machine speed hit all alike.

    A step whose first call takes longer than ``slow_s`` is reported by that one call (warm-up
    effects are negligible at that scale); the others are warmed up once, then timed ``reps`` times."""
    def timed(step: Callable[[], None]) -> float:
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    first = {name: timed(step) for name, step in steps.items()}
    times = {name: [t] if t > slow_s else [] for name, t in first.items()}
    fast = [name for name, t in first.items() if t <= slow_s]
    for _ in range(reps):
        for name in fast:
            times[name].append(timed(steps[name]))
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_projectors(
    student_dims: Iterable[int] = (192, 384),
    teacher_dims: Iterable[int] = (3024,),
    methods: Iterable[str] = ORTHOGONAL_METHODS,
    batch: int = 256,
    reps: int = 20,
    seed: int = 0,
) -> pd.DataFrame:
    """Forward+backward time of each orthogonal method vs ``nn.Linear`` (same sizes, same process).

    Returns one row per (method, d_s, d_t): ms, ratio_to_linear, orthogonality_error = max|PᵀP - I|."""
    torch.manual_seed(seed)
    rows = []
    for d_t in teacher_dims:
        for d_s in student_dims:
            if d_s > d_t:
                continue
            x = torch.randn(batch, d_s, requires_grad=True)
            grad = torch.randn(batch, d_t)
            modules: dict[str, nn.Module] = {"linear": nn.Linear(d_s, d_t, bias=False)}
            modules.update({m: OrthogonalProjector(d_s, d_t, method=m) for m in methods})
            seconds = time_interleaved({n: _forward_backward(m, x, grad) for n, m in modules.items()}, reps)
            for name, module in modules.items():
                with torch.no_grad():
                    w = module.weight.float()
                    error = (w.mT @ w - torch.eye(d_s)).abs().max().item() if name != "linear" else float("nan")
                rows.append(
                    dict(
                        method=name, student_dim=d_s, teacher_dim=d_t, batch=batch, ms=seconds[name] * 1e3,
                        ratio_to_linear=seconds[name] / seconds["linear"], orthogonality_error=error,
                    )
                )
    return pd.DataFrame(rows)


def bench_train(student: str = "resnet8", teacher: str = "resnet20", method: str = "vkd", batch: int = 64,
                steps: int = 20, num_classes: int = 10, seed: int = 0) -> pd.DataFrame:
    """Training-step throughput (images/s) of the student alone, and with ``method`` distilling from
    ``teacher`` with teacher outputs from the cache (steady state) and computed on the fly."""
    import timm

    from .distillers import Distiller, MethodConfig
    from .engine import train_step

    torch.manual_seed(seed)
    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, num_classes, (batch,))
    frozen = timm.create_model(teacher, num_classes=num_classes)
    setups = {
        "student alone (ce)": Distiller(timm.create_model(student, num_classes=num_classes), None,
                                        MethodConfig.for_method("ce")),
        f"{method}, cached teacher": Distiller(timm.create_model(student, num_classes=num_classes), frozen,
                                               MethodConfig.for_method(method)),
        f"{method}, teacher on the fly": Distiller(timm.create_model(student, num_classes=num_classes), frozen,
                                                   MethodConfig.for_method(method)),
    }
    cached = setups[f"{method}, cached teacher"].teacher_outputs(images, pooled=True)  # as TeacherCache returns
    steps_by_name = {}
    for name, distiller in setups.items():
        optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01, momentum=0.9)
        outputs = cached if "cached" in name else None
        steps_by_name[name] = (lambda d=distiller, o=optimizer, t=outputs: train_step(d, o, images, labels, 0, t))
    seconds = time_interleaved(steps_by_name, reps=steps)
    base = seconds["student alone (ce)"]
    return pd.DataFrame([{"setup": name, "images_per_s": batch / s, "time_vs_student_alone": s / base}
                         for name, s in seconds.items()])
