"""Benchmarks that print ratios measured in one process (never timed tests)."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Hashable, Iterable
from functools import partial

import pandas as pd
import timm
import torch
from torch import nn

from .distillers import Distiller, MethodConfig
from .engine import (
    build_optimizer,
    captured_training_step,
    check_cuda_graph,
    compile_options,
    mixed_precision,
    train_step,
)
from .models import check_model_names
from .projectors import ORTHOGONAL_METHODS, OrthogonalProjector, retract_
from .runtime import resolve_device

RECIPE_SGD = dict(name="sgd", lr=0.05, weight_decay=5e-4, momentum=0.9)  # the CIFAR recipe's optimiser


def _forward_backward(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad)

    return step


def time_interleaved(steps: dict[Hashable, Callable[[], None]], reps: int = 20, slow_s: float = 1.0,
                     warmup: int = 0) -> dict[Hashable, float]:
    """Median seconds per call of each step, run round-robin so drifts in machine speed hit all alike.

    Each step first runs ``warmup`` untimed calls (GPU: kernel selection, allocator).  A step whose
    next call takes longer than ``slow_s`` is reported by that one call (warm-up effects are
    negligible at that scale); the others count that call as a warm-up, then are timed ``reps`` times."""
    def timed(step: Callable[[], None]) -> float:
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    for step in steps.values():
        for _ in range(warmup):
            step()
    first = {name: timed(step) for name, step in steps.items()}
    times = {name: [t] if t > slow_s else [] for name, t in first.items()}
    fast = [name for name, t in first.items() if t <= slow_s]
    for _ in range(reps):
        for name in fast:
            times[name].append(timed(steps[name]))
    return {name: statistics.median(ts) for name, ts in times.items()}


def synchronized(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """``step`` followed by waiting for the device, so that host clocks time the device's work too."""
    if device.type != "cuda":
        return step

    def run() -> None:
        step()
        torch.cuda.synchronize(device)

    return run


def bench_projectors(
    student_dims: Iterable[int] = (192, 384),
    teacher_dims: Iterable[int] = (3024,),
    methods: Iterable[str] = ORTHOGONAL_METHODS,
    batch: int = 256,
    reps: int = 20,
    seed: int = 0,
    device: str = "cpu",
) -> pd.DataFrame:
    """Forward+backward time of each orthogonal method vs ``nn.Linear`` (same sizes, same process, float32),
    and the time of ``retract_``, which vkd's engine calls after every optimiser step.

    Returns one row per (method, d_s, d_t): ms (forward+backward), ratio_to_linear, retract_ms (0 for
    ``nn.Linear``), step_ratio_to_linear = (ms + retract_ms) / linear's ms (what a training step pays for the
    projector) and orthogonality_error = max|PᵀP - I|."""
    student_dims, teacher_dims = list(student_dims), list(teacher_dims)
    if min(student_dims) > max(teacher_dims):
        raise ValueError(f"no student width {student_dims} is at most a teacher width {teacher_dims}: an orthogonal "
                         "projector maps d_s to d_t >= d_s")
    torch.manual_seed(seed)
    device = resolve_device(device)
    rows = []
    for d_t in teacher_dims:
        for d_s in student_dims:
            if d_s > d_t:
                continue
            x = torch.randn(batch, d_s, device=device, requires_grad=True)
            grad = torch.randn(batch, d_t, device=device)
            modules: dict[str, nn.Module] = {"linear": nn.Linear(d_s, d_t, bias=False)}
            modules.update({m: OrthogonalProjector(d_s, d_t, method=m) for m in methods})
            modules = {name: module.to(device) for name, module in modules.items()}
            calls = {("step", n): synchronized(_forward_backward(m, x, grad), device) for n, m in modules.items()}
            calls.update({("retract", n): synchronized(partial(retract_, m), device) for n, m in modules.items()
                          if isinstance(m, OrthogonalProjector)})
            seconds = time_interleaved(calls, reps, warmup=3 if device.type == "cuda" else 0)
            for name, module in modules.items():
                step_s, retract_s = seconds["step", name], seconds.get(("retract", name), 0.0)
                error = _orthogonality_error(module.weight) if isinstance(module, OrthogonalProjector) else float("nan")
                rows.append(
                    dict(
                        method=name, student_dim=d_s, teacher_dim=d_t, batch=batch, ms=step_s * 1e3,
                        ratio_to_linear=step_s / seconds["step", "linear"], retract_ms=retract_s * 1e3,
                        step_ratio_to_linear=(step_s + retract_s) / seconds["step", "linear"],
                        orthogonality_error=error,
                    )
                )
    return pd.DataFrame(rows)


@torch.no_grad()
def _orthogonality_error(weight: torch.Tensor) -> float:
    """max|PᵀP - I| of a (d_t, d_s) weight, in float64."""
    w = weight.double()
    return (w.mT @ w - torch.eye(w.shape[1], dtype=w.dtype, device=w.device)).abs().max().item()


def _seeded_device(device: str, seed: int) -> torch.device:
    """``device`` resolved ("auto": a GPU when present), torch seeded, cuDNN autotuning on a GPU (as the engine)."""
    torch.manual_seed(seed)
    device = resolve_device(device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    return device


def _synthetic_batch(device: str, batch: int, image_size: int, num_classes: int, seed: int):
    """(device, random images (B, 3, S, S), labels (B,), autocast) set up as the engine trains: channels_last,
    and bf16 autocast and cuDNN autotuning on a GPU."""
    device = _seeded_device(device, seed)
    images = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    return device, images, labels, mixed_precision(device)


def _bench_distiller(student: str, teacher: nn.Module | None, config: MethodConfig, num_classes: int,
                     device: torch.device) -> Distiller:
    """A fresh ``student`` (timm name) distilling from the frozen ``teacher`` module, on ``device`` as the engine
    places it."""
    model = Distiller(timm.create_model(student, num_classes=num_classes), teacher, config)
    return model.to(device, memory_format=torch.channels_last)


def _cached_outputs(distiller: Distiller, images: torch.Tensor, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's pooled features and logits for ``images`` in float32, as the engine's TeacherCache returns them."""
    with autocast:
        features, logits = distiller.teacher_outputs(images, pooled=True)
    return features.float(), logits.float()


def _captured_step(distiller, optimizer: torch.optim.Optimizer, device: torch.device):
    """``step(images, labels, *teacher outputs)``: one :func:`vkd.engine.train_step` of ``distiller`` as the
    engine's ``cuda_graph`` runs it (a :class:`vkd.engine.CapturedStep`, under the captured step's autocast)."""
    autocast = mixed_precision(device, captured=True)
    return captured_training_step(lambda x, y, *t: train_step(distiller, optimizer, x, y, 0, t or None, autocast),
                                  distiller, optimizer, device)


def bench_train(student: str = "resnet8", teacher: str = "resnet20", method: str = "vkd", batch: int = 64,
                steps: int = 20, num_classes: int = 10, image_size: int = 32, device: str = "cpu",
                method_options: dict | None = None, compile: bool | str = False, cuda_graph: bool = False,
                seed: int = 0) -> pd.DataFrame:
    """Training-step throughput (images/s) of the student alone, and with ``method`` distilling from
    ``teacher`` with teacher outputs from the cache (steady state) and computed on the fly.

    The steps run as the engine runs them: channels_last; on a GPU bf16 autocast, synchronised per step;
    ``compile`` as the engine's setting (True or a torch.compile mode; compiled during the warm-up steps).
    ``cuda_graph`` adds the student alone and the cached-teacher step as the engine's ``cuda_graph`` runs them
    ("captured": :class:`vkd.engine.CapturedStep`, on a GPU one CUDA graph replayed per step); each is captured
    in an untimed first call, so the times are the replays'."""
    check_model_names(student, teacher)
    if cuda_graph:
        check_cuda_graph(compile, "sgd")

    device, images, labels, autocast = _synthetic_batch(device, batch, image_size, num_classes, seed)
    gpu = device.type == "cuda"
    frozen = timm.create_model(teacher, num_classes=num_classes)

    def distiller(name: str, with_teacher: bool) -> Distiller:
        config = MethodConfig.for_method(name, **(method_options or {} if name != "ce" else {}))
        model = _bench_distiller(student, frozen if with_teacher else None, config, num_classes, device)
        if compile:
            model.compile(**compile_options(compile))
        return model

    setups = {
        "student alone (ce)": distiller("ce", False),
        f"{method}, cached teacher": distiller(method, True),
        f"{method}, teacher on the fly": distiller(method, True),
    }
    if cuda_graph:
        setups.update({"student alone (ce), captured": distiller("ce", False),
                       f"{method}, cached teacher, captured": distiller(method, True)})
    cached = _cached_outputs(setups[f"{method}, cached teacher"], images, autocast)
    steps_by_name = {}
    for name, model in setups.items():
        optimizer = build_optimizer(model.trainable_parameters(), device=device, **RECIPE_SGD)
        outputs = cached if "cached" in name else None
        if name.endswith("captured"):
            step = _captured_step(model, optimizer, device)
            step(images, labels, *(outputs or ()))  # the capture and its warm-up steps, untimed
            steps_by_name[name] = synchronized(lambda s=step, t=outputs: s(images, labels, *(t or ())), device)
            continue
        steps_by_name[name] = synchronized(
            lambda d=model, o=optimizer, t=outputs: train_step(d, o, images, labels, 0, t, autocast), device)
    seconds = time_interleaved(steps_by_name, reps=steps, warmup=3 if gpu or compile else 0)
    base = seconds["student alone (ce)"]
    return pd.DataFrame([{"setup": name, "ms_per_step": s * 1e3, "images_per_s": batch / s,
                          "time_vs_student_alone": s / base} for name, s in seconds.items()])


def captured_step_difference(student: str = "resnet8", teacher: str = "resnet20", method: str = "vkd",
                             batch: int = 64, steps: int = 5, num_classes: int = 10, image_size: int = 32,
                             device: str = "cpu", method_options: dict | None = None, compile: bool | str = False,
                             seed: int = 0) -> dict[str, float]:
    """Whether the captured step (``cuda_graph``) computes what the eager step computes: one distiller and an
    exact copy of it train ``steps`` steps on the same random batches and cached teacher outputs, one eagerly,
    one through :func:`vkd.engine.captured_training_step` (on a GPU a replayed CUDA graph, after warm-up steps
    that it undoes).  Returns the largest absolute difference of any trainable parameter afterwards
    (``max_abs_difference``) and that difference relative to the largest parameter magnitude (``relative``):
    0 on the CPU (the same operations in the same order); on a GPU, rounding from non-deterministic kernels."""
    check_model_names(student, teacher)
    check_cuda_graph(compile, "sgd")
    device = _seeded_device(device, seed)
    autocast = mixed_precision(device)
    generator = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(batch, 3, image_size, image_size, generator=generator).to(device)
                .contiguous(memory_format=torch.channels_last),
                torch.randint(0, num_classes, (batch,), generator=generator).to(device)) for _ in range(steps)]
    eager = _bench_distiller(student, timm.create_model(teacher, num_classes=num_classes),
                             MethodConfig.for_method(method, **(method_options or {})), num_classes, device)
    cached = [_cached_outputs(eager, images, autocast) for images, _ in batches]
    captured = copy.deepcopy(eager)
    for model in (eager, captured):
        if compile:
            model.compile(**compile_options(compile))
    eager_optimizer, captured_optimizer = (build_optimizer(m.trainable_parameters(), device=device, **RECIPE_SGD)
                                           for m in (eager, captured))
    step = _captured_step(captured, captured_optimizer, device)
    for (images, labels), outputs in zip(batches, cached, strict=True):
        train_step(eager, eager_optimizer, images, labels, 0, outputs, autocast)
        step(images, labels, *outputs)
    with torch.no_grad():
        pairs = list(zip(eager.trainable_parameters(), captured.trainable_parameters(), strict=True))
        difference = max((a - b).abs().max().item() for a, b in pairs)
        largest = max(a.abs().max().item() for a, _ in pairs)
    return {"steps": steps, "max_abs_difference": difference, "relative": difference / largest}


def bench_deit(student: str = "deit_tiny_distilled_patch16_224", teacher: str = "regnety_160", batch: int = 256,
               steps: int = 10, image_size: int = 224, num_classes: int = 1000, device: str = "auto",
               seed: int = 0) -> pd.DataFrame:
    """A DeiT training step (AdamW, channels_last, bf16 autocast on a GPU) on synthetic images:
    the student alone (CE on the class head), with the teacher's forward and KD (T=1) on the
    distillation head, and with VkD added (orthogonal projection of the mean patch token to the
    teacher's layer-normed pooled features, smooth-L1).  The last row's ratio to the second is the
    cost of the VkD terms (projection, normalisation, loss)."""
    check_model_names(student, teacher)
    device, images, labels, autocast = _synthetic_batch(device, batch, image_size, num_classes, seed)
    gpu = device.type == "cuda"
    frozen = timm.create_model(teacher, num_classes=num_classes).to(device, memory_format=torch.channels_last)
    deit_objective = {"ce_weight": 1.0, "kd_weight": 1.0, "temperature": 1.0}
    configs = {
        "student alone (ce)": (MethodConfig.for_method("ce"), None),
        "+ teacher forward, KD": (MethodConfig.for_method("kd", **deit_objective), frozen),
        "+ teacher forward, KD + VkD": (MethodConfig.for_method("vkd", **deit_objective), frozen),
    }
    steps_by_name = {}
    for name, (config, frozen_teacher) in configs.items():
        model = _bench_distiller(student, frozen_teacher, config, num_classes, device)
        optimizer = build_optimizer(model.trainable_parameters(), "adamw", 5e-4, 0.05, 0.9, device)
        steps_by_name[name] = synchronized(
            lambda d=model, o=optimizer: train_step(d, o, images, labels, 0, None, autocast), device)
    seconds = time_interleaved(steps_by_name, reps=steps, warmup=3 if gpu else 0)
    names = list(seconds)
    return pd.DataFrame([{"setup": name, "ms_per_step": s * 1e3, "images_per_s": batch / s,
                          "time_vs_student_alone": s / seconds[names[0]],
                          "time_vs_previous_row": s / seconds[names[max(0, i - 1)]]}
                         for i, (name, s) in enumerate(seconds.items())])


def bench_gan(channels: int = 32, batch: int = 32, d_steps: int = 2, teacher: str = "resnet20", head_dim: int = 0,
              norms: Iterable[str] = ("layernorm", "whiten"), steps: int = 10, num_classes: int = 10,
              device: str = "cpu", seed: int = 0) -> pd.DataFrame:
    """One data-limited GAN iteration (``d_steps`` discriminator updates and one generator update, with
    DiffAugment; vkd.gan.GANTraining, as train_gan runs it) on random images: the DiffAugment baseline, and
    VkD with each teacher normalisation in ``norms``.  The teacher is an untrained ``teacher`` classifier's
    pooled features (the cost of a trained one); ``head_dim`` > 0 puts a linear head before the projector, as
    notebook 06 needs when ``channels`` exceeds the teacher's width.  Defaults: notebook 06's quick profile."""
    from .gan import GANConfig, classifier_embedding
    from .gan.train import GANTraining

    device = _seeded_device(device, seed)
    embedding = classifier_embedding(teacher, checkpoint=None).to(device)
    images = torch.randint(0, 256, (8 * batch, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, num_classes, (8 * batch,), device=device)
    setups = {"DiffAugment (da)": GANConfig(method="da", channels=channels, batch_size=batch, d_steps=d_steps)}
    setups.update({f"vkd-{norm}": GANConfig(method="vkd", norm=norm, channels=channels, batch_size=batch,
                                            d_steps=d_steps, head_dim=head_dim) for norm in norms})
    steps_by_name = {}
    for name, config in setups.items():
        training = GANTraining(config, images, labels, num_classes, embedding if config.method == "vkd" else None,
                               device)
        steps_by_name[name] = synchronized(lambda t=training: t.iteration(0), device)
    seconds = time_interleaved(steps_by_name, reps=steps, warmup=3 if device.type == "cuda" else 1)
    base = seconds["DiffAugment (da)"]
    return pd.DataFrame([{"setup": name, "ms_per_iteration": s * 1e3, "time_vs_da": s / base}
                         for name, s in seconds.items()])
