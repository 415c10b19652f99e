"""One training loop for every method (the student alone, teachers, and every distillation method).

``train(TrainConfig(...))`` writes to ``<out_dir>/<name>/``:
``metrics.csv`` (one row per epoch), ``summary.json`` (best/last accuracy, wall time, device, git
revision, every hyperparameter), ``checkpoint.pt`` (written atomically after every epoch; a rerun with
the same name resumes from it exactly) and ``model.pt`` (the final student weights).

Around it: :mod:`vkd.runtime` (devices, processes, random streams, provenance), :mod:`vkd.checkpoints`
(weights files) and :mod:`vkd.launch` (runs in processes of their own).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePath
from typing import ClassVar

import pandas as pd
import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup, create_transform
from timm.data.mixup import mixup_target
from timm.optim import create_optimizer_v2, get_optimizer_class
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from tqdm.auto import tqdm

from . import data as vdata
from .checkpoints import is_sha256, load_file, load_state, load_weights, read_checkpoint
from .distillers import Distiller, MethodConfig
from .models import check_model_names
from .paths import portable, progress_default, resolve, save_atomic, save_json_atomic, write_atomic
from .projectors import OrthogonalProjector
from .runtime import (
    Processes,
    device_description,
    git_revision,
    join_processes,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
    software_versions,
)
from .settings import at_least, positive, settings_file, wrong_settings


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the last epoch's checkpoint is left as it was."""


class RunConfig:
    """What every run configuration (a dataclass with ``name``, ``out_dir``, ``seed`` and ``teacher_sha256``)
    shares: its folder, the settings that shape its result, a digest of them that names the folder, the limits of
    those four fields, reading it from a file, and training it (in this process, or as
    ``python -m vkd COMMAND --config FILE``)."""

    NOT_SHAPING = ("name", "out_dir", "progress")  # fields that do not change the result
    PATHS: ClassVar[tuple[str, ...]] = ()  # fields naming a file or folder: compared as :func:`portable` paths
    COMMAND: ClassVar[str]  # the ``python -m vkd`` command that trains one run of this kind

    def __post_init__(self):
        """Refuse a setting whose value is not of its field's declared type (a string where a number belongs),
        then one outside its :meth:`limits` (a fraction of 1.5, a batch of 0), naming each."""
        wrong = wrong_settings(self)
        if wrong:
            raise ValueError(f"{type(self).__name__}: {'; '.join(wrong)}")

    def limits(self) -> list[tuple[str, bool, str]]:
        """``(setting, whether its value is allowed, what it must be)`` for the settings with a range or a choice:
        those every run configuration has (name, seed, teacher_sha256), to which each adds its own."""
        folder = PurePath(self.name)
        return [("name", bool(folder.parts) and not folder.is_absolute() and ".." not in folder.parts,
                 "a folder name under out_dir (not empty, not absolute, no '..')"),
                ("seed", 0 <= self.seed < 2**32, "in [0, 2**32) (NumPy's seeds)"),
                ("teacher_sha256", self.teacher_sha256 is None or is_sha256(self.teacher_sha256),
                 "64 hex digits, as sha256sum prints them")]

    def run(self, stop_after: int | None = None) -> dict:
        """Train this run (resuming or reusing it) and return its summary; ``stop_after`` ends it after that
        epoch / iteration as if interrupted."""
        raise NotImplementedError

    @classmethod
    def from_values(cls, **values):
        """``cls(**values)`` with a clear error naming any field it does not have; lists (from YAML or
        JSON) become tuples where the field's default is one."""
        defaults = asdict(cls())
        unknown = sorted(set(values) - set(defaults))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} setting(s) {', '.join(map(repr, unknown))}; "
                             f"the settings are: {', '.join(sorted(defaults))}")
        return cls(**{k: tuple(v) if isinstance(defaults[k], tuple) else v for k, v in values.items()})

    @classmethod
    def from_file(cls, path: str | Path, **overrides):
        """A config from a YAML (or JSON) file of its fields, then ``overrides``; unknown fields, and a file that is not
        YAML ``field: value`` pairs, are refused (ValueError)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config file at {path}")
        return cls.from_values(**{**settings_file(path), **overrides})

    def run_dir(self) -> Path:
        return resolve(self.out_dir) / self.name

    @classmethod
    def shaping(cls, config: dict) -> dict:
        """``config`` (this class as a dict, possibly read back from JSON or an older checkpoint) without
        the fields that do not shape the result, with fields added since it was written at their defaults
        and paths as :func:`portable` spells them."""
        defaults = {k: v for k, v in asdict(cls()).items() if k not in cls.NOT_SHAPING}
        merged = {**defaults, **{k: v for k, v in config.items() if k in defaults}}
        merged.update({k: portable(merged[k]) for k in cls.PATHS if merged[k]})
        return json.loads(json.dumps(merged, default=str))  # tuples -> lists, as after a JSON round trip

    def settings(self) -> dict:
        """The fields that shape the result (all but NOT_SHAPING), JSON-normalised."""
        return self.shaping(asdict(self))

    def digest(self) -> str:
        """8 hex digits identifying :meth:`settings`; only the settings that differ from their defaults
        enter, so adding a setting leaves the digests of earlier runs as they were."""
        defaults = type(self)().settings()
        changed = {k: v for k, v in self.settings().items() if v != defaults[k]}
        return hashlib.sha1(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]

    def refuse_other_settings(self, saved: dict, checkpoint: Path) -> None:
        """Raise if ``saved`` (the config a checkpoint recorded) differs from this one in a shaping setting."""
        previous = self.shaping(saved)
        changed = sorted(k for k, v in self.settings().items() if previous[k] != v)
        if changed:
            raise ValueError(f"{checkpoint} belongs to a run with other settings ({changed}); "
                             f"use another name or delete {checkpoint.parent}")

    def named(self, prefix: str):
        """This config with name ``<prefix>-<digest>``: changing any setting gives a new run folder, and
        rerunning with the same settings finds (and resumes or reuses) the old one."""
        return replace(self, name=f"{prefix}-{self.digest()}")


@dataclass
class TrainConfig(RunConfig):
    """Everything a run depends on; stored in the checkpoint and in summary.json."""

    COMMAND: ClassVar[str] = "train"
    PATHS: ClassVar[tuple[str, ...]] = ("data_root", "teacher_checkpoint")

    name: str = "run"  # run folder name under out_dir
    out_dir: str = "runs"  # relative to the project root
    dataset: str = "cifar10-jpeg"  # vkd.data.DATASETS
    data_root: str = "data"
    download: bool = False  # let torchvision download CIFAR (online users)
    fraction: float = 1.0  # class-stratified fraction of the training set
    test_fraction: float = 1.0  # class-stratified fraction of the test set
    student: str = "resnet8x4"  # timm model name
    student_options: dict = field(default_factory=dict)  # extra timm.create_model arguments, e.g. {"depth": 4}
    teacher: str | None = None  # timm model name of the frozen teacher
    teacher_checkpoint: str | None = None  # weights of the teacher (vkd or mdistiller format)
    teacher_sha256: str | None = None  # expected sha256 of the teacher checkpoint, checked when given
    method: str = "ce"  # vkd.distillers.METHODS
    method_options: dict = field(default_factory=dict)  # MethodConfig overrides, e.g. {"vkd_weight": 2}
    epochs: int = 240
    batch_size: int = 64
    optimizer: str = "sgd"  # any timm optimizer name (sgd, adamw, ...)
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "multistep"  # multistep | cosine
    milestones: tuple = (0.625, 0.75, 0.875)  # multistep: fractions of the run (150/180/210 of 240)
    gamma: float = 0.1  # multistep decay
    warmup_epochs: int = 0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast (GPU only)
    channels_last: bool = True  # networks and images in NHWC (faster convolutions on GPUs and CPUs)
    teacher_cache_views: int = 0  # >0: cache teacher outputs for this many augmentation views (TeacherCache)
    teacher_pretrained: bool = False  # no teacher_checkpoint: take the teacher's weights from timm's hub (online)
    # ImageNet-style recipes (DeiT); the defaults leave the CIFAR runs as they are
    image_size: int = 224  # dataset "imagefolder": training crop and evaluation size in pixels
    auto_augment: str = ""  # dataset "imagefolder": timm policy, e.g. "rand-m9-mstd0.5-inc1"
    reprob: float = 0.0  # dataset "imagefolder": random-erasing probability
    workers: int = 4  # dataset "imagefolder": data-loading processes per training process
    mixup: float = 0.0  # mixup alpha (0: off)
    cutmix: float = 0.0  # cutmix alpha (0: off)
    label_smoothing: float = 0.0
    drop_path: float = 0.0  # the student's stochastic-depth rate (timm drop_path_rate)
    clip_grad: float = 0.0  # largest gradient norm (0: no clipping)
    ema_decay: float = 0.0  # >0: also keep and evaluate an exponential moving average of the student
    compile: bool | str = False  # torch.compile the training forward (student, teacher, losses): True, or a mode
    # of torch.compile ("reduce-overhead": CUDA graphs, for small models whose steps are launch-bound on a GPU)
    cuda_graph: bool = False  # replay the whole step (forward, backward, SGD update, retraction) as one CUDA graph
    # (CapturedStep; one process, SGD, no "exp" projector; with compile true or false, not a CUDA-graph mode of it)
    progress: bool = field(default_factory=progress_default)  # tqdm bars

    def __post_init__(self):
        """Refuse, when the config is made rather than when it trains: unknown models, methods and method
        options; a method that distils without a teacher, a teacher without weights; an unknown compile mode
        and settings a captured step cannot run with; a setting of the wrong type or outside its :meth:`limits`."""
        super().__post_init__()
        check_model_names(self.student, self.teacher)
        if MethodConfig.for_method(self.method, **self.method_options).distils and self.teacher is None:
            raise ValueError(f"method {self.method!r} distils from a teacher: set teacher (a timm model name)")
        if self.teacher is not None and self.teacher_checkpoint is None and not self.teacher_pretrained:
            raise ValueError(f"teacher {self.teacher!r} needs teacher_checkpoint (a trained model's weights) "
                             f"or teacher_pretrained=True (timm's hub, online)")
        if self.compile:
            compile_options(self.compile)
        if self.cuda_graph:
            check_cuda_graph(self.compile, self.optimizer)

    def limits(self) -> list[tuple[str, bool, str]]:
        datasets = (*vdata.DATASETS, "imagefolder")
        return [*super().limits(),
                ("dataset", self.dataset in datasets, f"one of {datasets}"),
                ("fraction", 0 < self.fraction <= 1, "in (0, 1]"),
                ("test_fraction", 0 < self.test_fraction <= 1, "in (0, 1]"),
                *at_least(self, 1, "epochs", "batch_size", "image_size"),
                *positive(self, "lr"),
                ("gamma", 0 < self.gamma <= 1, "in (0, 1], the multistep schedule's decay factor"),
                ("optimizer", is_timm_optimizer(self.optimizer),
                 "a timm optimizer name, e.g. 'sgd' or 'adamw' (timm.optim.list_optimizers())"),
                ("schedule", self.schedule in SCHEDULES, f"one of {SCHEDULES}"),
                ("milestones", all(isinstance(f, (int, float)) and 0 < f <= 1 for f in self.milestones)
                 and list(self.milestones) == sorted(self.milestones),
                 "increasing fractions of the run in (0, 1], e.g. (0.625, 0.75, 0.875): epochs 150/180/210 of 240"),
                *at_least(self, 0, "momentum", "weight_decay", "mixup", "cutmix", "clip_grad"),
                *((name, 0 <= getattr(self, name) < 1, "in [0, 1)")
                  for name in ("label_smoothing", "drop_path", "ema_decay")),
                ("reprob", 0 <= self.reprob <= 1, "in [0, 1]"),
                ("warmup_epochs", 0 <= self.warmup_epochs < self.epochs,
                 f"at least 0 and below epochs ({self.epochs})"),
                *at_least(self, 0, "workers"),
                ("teacher_cache_views", self.teacher_cache_views >= 0, "at least 0 (0: no cache)")]

    def run(self, stop_after: int | None = None) -> dict:
        return train(self, stop_after_epoch=stop_after)


SCHEDULES = ("multistep", "cosine")


def is_timm_optimizer(name: str) -> bool:
    """Whether timm's optimizer registry knows ``name`` (the names :func:`build_optimizer` accepts)."""
    try:
        get_optimizer_class(name, bind_defaults=False)
    except ValueError:
        return False
    return True


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_options(setting: bool | str) -> dict:
    """torch.compile's keyword arguments for a ``compile`` setting: True (the default mode) or a mode name."""
    if setting is True:
        return {}
    if setting in COMPILE_MODES:
        return {"mode": setting}
    raise ValueError(f"compile: expected true, false or one of {COMPILE_MODES}, got {setting!r}")


def build_teacher(config: TrainConfig, num_classes: int) -> tuple[nn.Module | None, str | None]:
    if config.teacher is None:
        return None, None
    if config.teacher_checkpoint is None and config.teacher_pretrained:
        try:
            return timm.create_model(config.teacher, pretrained=True, num_classes=num_classes), "timm-pretrained"
        except Exception as error:  # offline: the hub cannot be reached, or the name has no weights
            raise RuntimeError(
                f"could not get timm's pretrained weights for {config.teacher!r} ({type(error).__name__}: {error}); "
                f"offline, download them elsewhere and pass the file as teacher_checkpoint") from None
    teacher = timm.create_model(config.teacher, num_classes=num_classes)
    return teacher, load_weights(teacher, config.teacher_checkpoint, config.teacher_sha256)


def build_distiller(config: TrainConfig, num_classes: int) -> tuple[Distiller, str | None]:
    """A new student (timm, ``num_classes`` outputs), ``config``'s frozen teacher and the method's loss
    modules, on the CPU; and the teacher checkpoint's sha256 (None without a teacher file)."""
    options = {**config.student_options, **({"drop_path_rate": config.drop_path} if config.drop_path else {})}
    try:
        student = timm.create_model(config.student, num_classes=num_classes, **options)
    except TypeError as error:  # an argument the model does not take
        raise ValueError(f"student {config.student!r} does not take the arguments {options} (student_options, and "
                         f"drop_path as drop_path_rate): {error}") from None
    teacher, teacher_digest = build_teacher(config, num_classes)
    return Distiller(student, teacher, MethodConfig.for_method(config.method, **config.method_options)), teacher_digest


def load_distiller(config: TrainConfig) -> Distiller:
    """The finished run ``config`` names, on the CPU in eval mode: its student and loss modules (projectors)
    as its last epoch left them, with its frozen teacher -- for analyses of trained projectors."""
    if finished_summary(config) is None:
        raise FileNotFoundError(f"no finished run with these settings in {config.run_dir()}; train(config) first")
    final, state = load_file(config.run_dir() / "model.pt"), load_file(config.run_dir() / "checkpoint.pt")
    distiller, _ = build_distiller(config, final["num_classes"])
    distiller.student.load_state_dict(state["student"])
    distiller.losses.load_state_dict(state["losses"])
    return distiller.eval()


def _split_loader(config: TrainConfig, device: torch.device, processes: Processes, train: bool):
    """The training (augmented, shuffled) or evaluation loader of ``config``'s dataset; ``.num_classes`` set."""
    shard = dict(rank=processes.rank, world=processes.world)
    fraction = config.fraction if train else config.test_fraction
    if config.dataset == "imagefolder":
        vdata.use_compatible_posterize()
        mean, std = vdata.stats("imagenet")
        common = dict(interpolation="bicubic", mean=mean, std=std)
        if train:
            transform = create_transform(config.image_size, is_training=True, auto_augment=config.auto_augment or None,
                                         re_prob=config.reprob, **common)
        else:
            transform = create_transform(config.image_size, crop_pct=0.875, **common)
        split = "train" if train else vdata.evaluation_split(config.data_root)
        data = vdata.imagefolder(config.data_root, split, transform)
        if fraction < 1:
            data = vdata.folder_subset(data, vdata.stratified_indices(data.targets, fraction, config.seed))
        loader = vdata.FolderLoader(data, config.batch_size, train, device, config.workers, config.seed, **shard)
    else:
        data = vdata.load_tensor_data(config.dataset, "train" if train else "test", config.data_root, config.download,
                                      config.progress)
        if fraction < 1:
            data = data.subset(vdata.stratified_indices(data.labels, fraction, config.seed))
        mean, std = vdata.stats(config.dataset)
        loader = vdata.TensorLoader(data, config.batch_size if train else 256, mean, std, train, device,
                                    seed=config.seed, **shard)
    loader.num_classes = len(data.classes)
    return loader


def _loaders(config: TrainConfig, device: torch.device, processes: Processes = Processes()):
    train = _split_loader(config, device, processes, train=True)
    if len(train) == 0:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {len(train.labels)} training images "
                         f"(fraction {config.fraction}, {processes.world} process(es)); an epoch would have no step")
    return train, _split_loader(config, device, processes, train=False), train.num_classes


@torch.no_grad()
def evaluate(model: nn.Module, loader, autocast, processes: Processes = Processes()) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) and mean cross-entropy of ``model`` over ``loader`` (all processes' shares)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=loader.device)  # correct, top-5 correct, loss, count
    count = 0
    for images, labels, _ in loader:  # sums stay on the device: one synchronisation per evaluation
        with autocast:
            logits = model(images)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        totals[:3] += torch.stack([(top5[:, 0] == labels).sum(), (top5 == labels[:, None]).any(1).sum(),
                                   F.cross_entropy(logits.float(), labels, reduction="sum")]).double()
        count += len(labels)
    totals[3] = count
    correct, correct5, loss, count = processes.sum(totals).tolist()
    return {"test_acc": 100.0 * correct / count, "test_top5": 100.0 * correct5 / count, "test_loss": loss / count}


@dataclass
class TeacherOutputs:
    """The teacher's pooled features (views, N, d_t) and logits (views, N, C), float32, of every training image
    in each augmentation view, as the teacher gave them; ``complete``: the views an epoch has filled entirely.
    ``key`` names what they depend on (:func:`teacher_outputs_key`)."""

    key: str
    features: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    complete: set[int] = field(default_factory=set)


_last_teacher_outputs: TeacherOutputs | None = None  # the last cached run's, for the next run of this process


def teacher_outputs_key(config: TrainConfig, teacher_sha256: str | None, loader: vdata.TensorLoader) -> str:
    """What a run's cached teacher outputs depend on: its settings but those of the student's training alone,
    the teacher's weights (their sha256) and the loader's batching (shuffle, crops and flips, chunks)."""
    student_only = {"name", "out_dir", "student", "student_options", "method", "method_options", "epochs",
                    "optimizer", "lr", "momentum", "weight_decay", "schedule", "milestones", "gamma",
                    "warmup_epochs", "label_smoothing", "drop_path", "clip_grad", "ema_decay", "progress",
                    "test_fraction"}
    settings = {k: v for k, v in asdict(config).items() if k not in student_only}
    batching = {"samples": len(loader.labels), "batch_size": loader.batch_size, "chunk_size": loader.chunk_size,
                "rank": loader.rank, "world": loader.world}
    return json.dumps({**settings, "teacher_weights": teacher_sha256, **batching}, sort_keys=True, default=str)


class TeacherCache:
    """Teacher outputs for ``views`` augmentation draws of every training image, filled on first use.

    Epoch e uses augmentation view e mod views (the loader replays that view's shuffle, crops and
    flips), so from epoch ``views`` on the teacher is never run again.  Features are stored pooled,
    (d_t,) per image: exact for the pooled feature losses (VkD, SRD) and the logit losses.  ``lookup``
    takes a loader's chunk (:meth:`vkd.data.TensorLoader.chunks`): on a GPU thousands of images, so
    the teacher filling the cache runs in large batches, not launch-bound at the training batch.  A
    view counts as filled once an epoch over it has ended (``complete``); an epoch replays exactly the
    chunks of the first pass, so no per-sample bookkeeping (and no device synchronisation) is needed.

    The epoch that fills a view trains on the teacher's outputs as given; later epochs on their float16
    rounding.  Runs of one process with the same ``key`` (:func:`teacher_outputs_key`; e.g. a notebook's
    students of one teacher) share the stored outputs: a run reads a view that an earlier run completed
    instead of running the teacher over it -- after checking, on the view's first chunk, that the teacher
    gives exactly the stored values -- and so trains exactly as it would have alone."""

    def __init__(self, views: int, num_samples: int, device: torch.device, key: str):
        global _last_teacher_outputs
        self.views, self.num_samples, self.device = views, num_samples, device
        if _last_teacher_outputs is None or _last_teacher_outputs.key != key:
            _last_teacher_outputs = TeacherOutputs(key)
        self.store = _last_teacher_outputs
        self.filled: set[int] = set()  # the views this run has trained an epoch on
        self.checked: set[int] = set()  # the views another run filled whose first chunk this run has checked

    def view(self, epoch: int) -> int:
        return epoch % self.views

    def complete(self, view: int) -> None:
        """Record that an epoch over ``view`` has ended: its entries are filled from now on."""
        self.filled.add(view)
        self.store.complete.add(view)

    @torch.no_grad()
    def lookup(self, view: int, index: torch.Tensor, distiller: Distiller,
               images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's pooled features (N, d_t) and logits (N, C), float32, for ``images`` (N, 3, H, W), the
        samples ``index`` (N,) in augmentation ``view``: from the cache, or from the teacher (then stored)."""
        store = self.store
        if view in self.filled:
            return store.features[view, index].half().float(), store.logits[view, index].half().float()
        if view in store.complete and view in self.checked:
            return store.features[view, index], store.logits[view, index]
        pooled, logits = (output.float() for output in distiller.teacher_outputs(images, pooled=True))
        if view in store.complete:  # filled by an earlier run: used only if the teacher agrees on this chunk
            self.checked.add(view)
            if torch.equal(store.features[view, index], pooled) and torch.equal(store.logits[view, index], logits):
                return pooled, logits
            store.complete.discard(view)
        if store.features is None:
            store.features = torch.zeros(self.views, self.num_samples, pooled.shape[1], device=self.device)
            store.logits = torch.zeros(self.views, self.num_samples, logits.shape[1], device=self.device)
        store.features[view, index] = pooled
        store.logits[view, index] = logits
        return pooled, logits

    def refill(self, epochs_done: int, loader, distiller: Distiller, prepare: Callable, autocast) -> None:
        """After a resume: fill the views that the first ``epochs_done`` epochs filled, chunk by chunk as they
        did (``prepare`` gives a chunk the training memory format), so that the resumed run reads the stored
        values where the uninterrupted one would have."""
        for view in sorted({self.view(e) for e in range(epochs_done)}):
            loader.set_epoch(view)
            for images, _, index, _ in loader.chunks():
                with autocast:
                    self.lookup(view, index, distiller, prepare(images))
            self.complete(view)


def train_step(distiller: Distiller, optimizer, images, labels, epoch: int | torch.Tensor = 0, teacher_outputs=None,
               autocast=None, model: nn.Module | None = None,
               clip_grad: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimisation step of ``distiller``; returns (student logits, weighted loss terms).

    ``model`` is what runs the forward pass when it is not ``distiller`` itself (its DDP wrapper);
    ``clip_grad`` > 0 clips the gradients' total norm.  On the CPU a non-finite loss raises here; on a
    GPU that check would stall the pipeline every step, so ``train`` checks the epoch's summed terms
    instead (before any checkpoint is written)."""
    with autocast if autocast is not None else torch.autocast(images.device.type, enabled=False):
        logits, terms = (model or distiller)(images, labels, epoch, teacher_outputs=teacher_outputs)
        loss = sum(terms.values())
    if loss.device.type == "cpu" and not torch.isfinite(loss):
        raise NonFiniteLossError(f"non-finite loss ({ {k: float(v.detach()) for k, v in terms.items()} })")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(distiller.trainable_parameters(), clip_grad)
    optimizer.step()
    distiller.after_optimizer_step()
    return logits, terms


def mixed_precision(device: torch.device, enabled: bool = True, captured: bool = False) -> torch.autocast:
    """The autocast a training or evaluation step runs under: bf16 on a GPU (when ``enabled``), off on the CPU.
    A captured step (``captured``, see :class:`CapturedStep`) cannot reuse autocast's cache of cast weights."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda",
                          cache_enabled=not captured)


def check_cuda_graph(compile: bool | str, optimizer: str, processes: int = 1,
                     distiller: nn.Module | None = None) -> None:
    """Refuse the settings (and the ``distiller``'s modules) that a captured step (``cuda_graph``) cannot run
    with, saying why."""
    if processes > 1:
        raise ValueError(f"cuda_graph captures one process's step; this run has {processes} processes")
    if compile in ("reduce-overhead", "max-autotune"):
        raise ValueError(f"cuda_graph captures the whole step itself; compile {compile!r} captures CUDA graphs "
                         "too: use compile true (or \"max-autotune-no-cudagraphs\") or false")
    if get_optimizer_class(optimizer, bind_defaults=False) is not torch.optim.SGD:
        raise ValueError(f"cuda_graph supports SGD (optimizer sgd, momentum or nesterov), got {optimizer!r}: "
                         "another optimizer's step count would be frozen into the graph")
    if distiller is not None and any(isinstance(m, OrthogonalProjector) and m.method == "exp"
                                     for m in distiller.modules()):
        raise ValueError('cuda_graph cannot capture the "exp" orthogonal projector, which sizes its Taylor series '
                         'from the data every step (a host sync): use vkd_method "stiefel" (exact, the same '
                         'manifold) or cuda_graph false')


def _record_cuda_graph(step: Callable[[], None], warmup: int) -> Callable[[], None]:
    """Run ``step`` ``warmup`` times on a side stream (lazy initialisation, cuDNN's choice, compilation), then
    capture one call in a CUDA graph; returns the graph's replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _record_eagerly(step: Callable[[], None], warmup: int) -> Callable[[], None]:
    """The CPU's stand-in for :func:`_record_cuda_graph`: the same warm-up calls, then ``step`` itself."""
    for _ in range(warmup):
        step()
    return step


class CapturedStep:
    """``step(*inputs)`` replayed from a CUDA graph: the inputs are copied into fixed tensors and one graph
    launch runs every kernel of the step, so the host's cost no longer grows with the number of kernels.

    ``state()`` lists every tensor the step changes (parameters, buffers, optimiser state, accumulators).
    The capture runs ``warmup`` real steps first; afterwards each of those tensors is put back as it was,
    and one created by them (SGD's momentum, a lazily made accumulator) is zeroed -- which is how it
    starts, so the run is the one it would have been without the warm-up.  Python numbers that a step
    uses are frozen into the graph: ``frozen()`` returns them (the learning rates), and the step is captured
    again when they change.  On the CPU the same bookkeeping runs and each call simply runs ``step``."""

    def __init__(self, step: Callable, state: Callable[[], list[torch.Tensor]], frozen: Callable[[], object],
                 device: torch.device, warmup: int = 3):
        self.step, self.state, self.frozen, self.warmup = step, state, frozen, warmup
        self.record = _record_cuda_graph if device.type == "cuda" else _record_eagerly
        self.inputs: list[torch.Tensor] = []
        self.replay: Callable[[], None] | None = None
        self.captured_with: object = None

    def __call__(self, *inputs: torch.Tensor) -> None:
        if self.replay is None or self.frozen() != self.captured_with:
            self.captured_with = self.frozen()
            self.inputs = [x.clone() for x in inputs]
            before = {id(t): t.clone() for t in self.state()}
            self.replay = self.record(lambda: self.step(*self.inputs), self.warmup)
            with torch.no_grad():
                for tensor in self.state():
                    if id(tensor) in before:
                        tensor.copy_(before[id(tensor)])
                    else:
                        tensor.zero_()
        for fixed, x in zip(self.inputs, inputs, strict=True):
            fixed.copy_(x)
        self.replay()


def captured_training_step(step: Callable, distiller: Distiller, optimizer: torch.optim.Optimizer,
                           device: torch.device,
                           accumulators: Callable[[], list[torch.Tensor]] = list) -> CapturedStep:
    """``step(images, targets, ...)`` (one :func:`train_step` of ``distiller`` and ``optimizer``) as a
    :class:`CapturedStep`, as ``cuda_graph`` runs it: its state is every tensor the step changes -- the trainable
    parameters, the student's and the loss modules' buffers (BatchNorm statistics), the optimiser's state
    (momentum) and ``accumulators()`` (the step's running sums) -- and it is captured again when a learning
    rate changes."""
    def state() -> list[torch.Tensor]:
        return [*distiller.trainable_parameters(), *distiller.student.buffers(), *distiller.losses.buffers(),
                *(t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)),
                *accumulators()]

    return CapturedStep(step, state, lambda: [group["lr"] for group in optimizer.param_groups], device)


def build_optimizer(parameters, name: str, lr: float, weight_decay: float, momentum: float,
                    device: torch.device) -> torch.optim.Optimizer:
    """timm's optimizer ``name`` (``sgd`` is Nesterov SGD), over ``parameters`` on ``device``.  On a GPU, torch's
    fused step where the optimizer has one (SGD, Adam, AdamW): one kernel instead of several per parameter
    group, which matters when a small model's steps are bound by kernel launches."""
    optimizer_class = get_optimizer_class(name, bind_defaults=False)
    fused = device.type == "cuda" and "fused" in inspect.signature(optimizer_class).parameters
    return create_optimizer_v2(parameters, opt=name, lr=lr, weight_decay=weight_decay, momentum=momentum,
                               **({"fused": True} if fused else {}))


def _scheduler(config: TrainConfig, optimizer):
    if config.schedule == "multistep":
        milestones = [max(1, round(f * config.epochs)) for f in config.milestones]
        return MultiStepLRScheduler(optimizer, decay_t=milestones, decay_rate=config.gamma,
                                    warmup_t=config.warmup_epochs, warmup_lr_init=config.lr * 0.01)
    return CosineLRScheduler(optimizer, t_initial=config.epochs, lr_min=config.lr * 1e-2,
                             warmup_t=config.warmup_epochs, warmup_lr_init=config.lr * 0.01)


Probe = Callable[[Distiller], dict]


def train(config: TrainConfig, stop_after_epoch: int | None = None, probe: Probe | None = None,
          probe_every: int = 0) -> dict:
    """Train ``config.student`` with ``config.method``; resumes from the run folder's checkpoint if present.

    ``probe(distiller)`` -> dict of JSON values is called (in eval mode, without gradients) before
    training and then every ``probe_every`` optimiser steps, or after every epoch when 0; its records
    go to ``probes.json`` (e.g. projector singular values).  ``stop_after_epoch`` (1-based) ends the
    call after that epoch as if interrupted (for tests).  Returns the summary also written to summary.json;
    a finished run with the same settings is not trained again: its summary is returned as it is."""
    run_dir = config.run_dir()
    summary = finished_summary(config)
    if summary is not None:
        return summary
    revision = git_revision()  # the code that runs, whatever the checkout becomes meanwhile
    processes, device = join_processes(config.device)
    seed_everything(config.seed)
    if not processes.main:  # rank 0 extracts / decodes the data first; the others then read its cache
        processes.barrier()
    train_loader, test_loader, num_classes = _loaders(config, device, processes)
    if processes.main:
        processes.barrier()
    distiller, teacher_digest = build_distiller(config, num_classes)
    distiller.to(device)
    if config.channels_last:
        distiller.to(memory_format=torch.channels_last)
    if config.compile:  # the whole forward (student, teacher, losses); in place, so checkpoints keep their names
        distiller.compile(**compile_options(config.compile))
    model = distiller
    if processes.world > 1:  # gradients averaged over the processes; rank 0's BatchNorm statistics shared
        model = torch.nn.parallel.DistributedDataParallel(
            distiller, device_ids=[device.index] if device.type == "cuda" else None)
        seed_everything(config.seed + processes.rank)  # dropout, drop-path, mixup, augmentation: a stream per process
    autocast = mixed_precision(device, config.amp, config.cuda_graph)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: let cuDNN pick its fastest kernels
    optimizer = build_optimizer(distiller.trainable_parameters(), config.optimizer, config.lr, config.weight_decay,
                                config.momentum, device)
    scheduler = _scheduler(config, optimizer)
    cache = None  # pooled features only: FitNet's hint needs the teacher's maps, so it runs the teacher
    if config.teacher_cache_views and distiller.teacher is not None and "fitnet" not in distiller.losses:
        if config.dataset == "imagefolder" or config.mixup or config.cutmix:
            raise ValueError("teacher_cache_views needs augmentations that can be replayed (the CIFAR tensor "
                             "loader, without mixup / cutmix); set it to 0")
        cache = TeacherCache(config.teacher_cache_views, len(train_loader.labels), device,
                             teacher_outputs_key(config, teacher_digest, train_loader))
    mixup = None
    if config.mixup or config.cutmix:
        mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.label_smoothing,
                      num_classes=num_classes)
    ema = ModelEmaV3(distiller.student, config.ema_decay) if config.ema_decay else None

    run_dir.mkdir(parents=True, exist_ok=True)  # once data, models and options are found: a refused start leaves none
    checkpoint_path = run_dir / "checkpoint.pt"
    rows, probes, start_epoch, elapsed = [], [], 0, 0.0

    def record_probe(epoch: int, step: int) -> None:
        distiller.eval()
        with torch.no_grad():
            probes.append({"epoch": epoch, "step": step, **probe(distiller)})
        distiller.train()
        if processes.main:
            (run_dir / "probes.json").write_text(json.dumps(probes))

    def non_finite(epoch: int, detail: str):
        kept = f"the checkpoint of epoch {epoch} ({checkpoint_path}) is intact" if epoch else "no epoch ended"
        raise NonFiniteLossError(f"{config.name}, epoch {epoch + 1}: {detail}; {kept}. "
                                 f"Lower the learning rate or check the inputs.") from None

    if checkpoint_path.is_file():
        state = load_file(checkpoint_path, device)
        config.refuse_other_settings(state["config"], checkpoint_path)
        if state.get("world_size", 1) != processes.world:
            raise ValueError(f"{checkpoint_path} was written by {state.get('world_size', 1)} process(es); resume it "
                             f"with as many (now {processes.world}) or delete {run_dir}")
        distiller.student.load_state_dict(state["student"])
        distiller.losses.load_state_dict(state["losses"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        set_rng_state(state["rng"][processes.rank] if isinstance(state["rng"], list) else state["rng"], device)
        rows, probes, start_epoch, elapsed = state["metrics"], state["probes"], state["epoch"], state["elapsed"]
    if start_epoch == 0:
        scheduler.step(0)
        if probe is not None:
            record_probe(0, 0)
    step = start_epoch * len(train_loader)
    sums: dict[str, torch.Tensor] = {}  # an epoch's sums over its steps of each loss term times the batch size
    correct = torch.zeros((), device=device)  # and of the correctly classified training images
    epoch_on_device = torch.tensor(0, device=device)  # a tensor: a compiled forward is not re-traced per epoch

    def training_step(images: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, *teacher: torch.Tensor):
        logits, terms = train_step(distiller, optimizer, images, targets, epoch_on_device, teacher or None, autocast,
                                   model, config.clip_grad)
        for name, value in terms.items():
            sums.setdefault(name, torch.zeros((), device=device)).add_(value.detach() * len(labels))
        correct.add_((logits.argmax(1) == labels).sum())

    def prepare(chunk: torch.Tensor) -> torch.Tensor:
        """Images in the memory format the networks run in."""
        if config.channels_last:
            return chunk.contiguous(memory_format=torch.channels_last)
        return chunk

    if cache is not None and start_epoch:
        cache.refill(start_epoch, train_loader, distiller, prepare, autocast)
    if config.cuda_graph:
        check_cuda_graph(config.compile, config.optimizer, processes.world, distiller)
        training_step = captured_training_step(training_step, distiller, optimizer, device,
                                               lambda: [*sums.values(), correct])

    for epoch in range(start_epoch, config.epochs):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trains with
        view = cache.view(epoch) if cache is not None else epoch
        epoch_on_device.fill_(epoch)
        train_loader.set_epoch(view)
        distiller.train()
        for total in (*sums.values(), correct):
            total.zero_()
        seen = 0
        bar = tqdm(total=len(train_loader), desc=f"{config.name} epoch {epoch + 1}/{config.epochs}", leave=False,
                   disable=not (config.progress and processes.main), mininterval=2)
        for chunk, chunk_labels, index, sizes in train_loader.chunks():  # several batches at once on a GPU
            chunk = prepare(chunk)
            teacher_outputs = [None] * len(sizes)
            if cache is not None:
                with autocast:
                    features, teacher_logits = cache.lookup(view, index, distiller, chunk)
                teacher_outputs = list(zip(features.split(sizes), teacher_logits.split(sizes), strict=True))
            for images, labels, outputs in zip(chunk.split(sizes), chunk_labels.split(sizes), teacher_outputs,
                                               strict=True):
                targets = labels
                if mixup is not None:
                    images, targets = mixup(images, labels)
                elif config.label_smoothing:
                    targets = mixup_target(labels, num_classes, smoothing=config.label_smoothing)
                try:
                    training_step(images, targets, labels, *(outputs or ()))
                except NonFiniteLossError as error:
                    non_finite(epoch, str(error))
                if ema is not None:
                    ema.update(distiller.student, step=step)
                seen += len(labels)
                step += 1
                bar.update()
                if probe is not None and probe_every and step % probe_every == 0:
                    record_probe(epoch + (seen / len(train_loader.labels)), step)
        bar.close()
        totals = processes.sum(torch.stack([*sums.values(), correct, torch.tensor(seen, device=device)]).double())
        summed = dict(zip(sums, totals[:-2], strict=True))
        correct_total, seen = totals[-2].item(), totals[-1].item()
        if not all(torch.isfinite(v).item() for v in summed.values()):
            values = {k: float(v) for k, v in summed.items()}
            non_finite(epoch, f"non-finite loss in this epoch (summed terms {values})")
        if cache is not None:
            cache.complete(view)
        scheduler.step(epoch + 1)
        row = {"epoch": epoch + 1, "lr": lr}
        row.update({f"train_{k}": (v / seen).item() for k, v in summed.items()})
        row["train_loss"] = sum(row[f"train_{k}"] for k in summed)
        row["train_acc"] = 100.0 * correct_total / seen
        row.update(evaluate(distiller.student, test_loader, autocast, processes))
        if ema is not None:
            row.update({f"{k}_ema": v for k, v in evaluate(ema.module, test_loader, autocast, processes).items()})
        row["epoch_seconds"] = time.perf_counter() - start
        elapsed += row["epoch_seconds"]
        rows.append(row)
        if probe is not None and not probe_every:
            record_probe(epoch + 1, step)
        rng = processes.gather(rng_state(device))
        if processes.main:
            write_atomic(run_dir / "metrics.csv", lambda partial: pd.DataFrame(rows).to_csv(partial, index=False))
            save_atomic({"epoch": epoch + 1, "config": asdict(config), "student": distiller.student.state_dict(),
                          "losses": distiller.losses.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "rng": rng, "world_size": processes.world,
                          "ema": ema.module.state_dict() if ema is not None else None, "metrics": rows,
                          "probes": probes, "elapsed": elapsed}, checkpoint_path)
        processes.barrier()
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < config.epochs:
            return {"stopped_after_epoch": epoch + 1}

    accuracies = [r["test_acc"] for r in rows]
    summary = {
        "name": config.name, "method": config.method, "student": config.student, "teacher": config.teacher,
        "dataset": config.dataset, "fraction": config.fraction, "epochs": config.epochs, "seed": config.seed,
        "best_acc": max(accuracies), "best_epoch": accuracies.index(max(accuracies)) + 1,
        "last_acc": accuracies[-1], "last_top5": rows[-1]["test_top5"], "wall_seconds": elapsed,
        "device": device_description(device), "software": software_versions(), "processes": processes.world,
        "git_revision": revision, "teacher_sha256": teacher_digest, "teacher_cached": cache is not None,
        "config": asdict(config),
    }
    if ema is not None:
        summary.update(best_acc_ema=max(r["test_acc_ema"] for r in rows), last_acc_ema=rows[-1]["test_acc_ema"])
    if processes.main:
        save_atomic({"model": distiller.student.state_dict(), "arch": config.student, "num_classes": num_classes,
                      "options": config.student_options, "ema": ema.module.state_dict() if ema is not None else None},
                     run_dir / "model.pt")
        save_json_atomic(summary, run_dir / "summary.json")
    processes.barrier()
    return json.loads(json.dumps(summary))  # as a later call reusing the run reads it back


def finished_summary(config: RunConfig) -> dict | None:
    """The summary of the finished run ``config`` names, if its settings are ``config``'s; else None."""
    path = config.run_dir() / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if type(config).shaping(summary["config"]) == config.settings() else None


def train_teacher(arch: str, epochs: int, checkpoint: str = "", **settings) -> tuple[str, dict | None]:
    """The weights of a teacher: ``checkpoint`` when given, else a teacher trained with method ``ce``
    (or reused, if a finished run with the same settings exists).

    ``settings`` are further TrainConfig fields (out_dir, dataset, fraction, ...).  Returns the path
    of the weights and the training summary (None for a given checkpoint)."""
    if checkpoint:
        return checkpoint, None
    config = TrainConfig(student=arch, method="ce", epochs=epochs, **settings).named(f"teacher-{arch}")
    summary = train(config)
    print(f"teacher {arch}: best {summary['best_acc']:.2f} %, last {summary['last_acc']:.2f} %, "
          f"{summary['wall_seconds']:.0f} s on {summary['device']}")
    return str(config.run_dir() / "model.pt"), summary


def evaluate_checkpoint(checkpoint: str | Path, arch: str | None = None, dataset: str = "imagefolder",
                        data_root: str = "data", image_size: int = 224, batch_size: int = 256, device: str = "auto",
                        workers: int = 4, model_options: dict | None = None, num_classes: int | None = None) -> dict:
    """Top-1 / top-5 (%) of a checkpoint on a dataset's evaluation split (ImageFolder ``val/`` or ``test/``).

    ``arch`` defaults to the one a vkd checkpoint records.  Accepts vkd's files, DeiT-style
    ``{"model": state_dict}`` releases and plain state dicts; keys the model lacks (e.g. a
    distillation projector saved with the student) are listed and ignored."""
    device = resolve_device(device)
    state, _ = read_checkpoint(checkpoint)
    arch = arch or (state.get("arch") if isinstance(state, dict) else None)
    if arch is None:
        raise ValueError(f"{checkpoint} does not record its architecture: give arch (a timm model name)")
    check_model_names(arch)  # before the data are read

    def model_with_weights(classes: int) -> tuple[nn.Module, list[str]]:
        model = timm.create_model(arch, num_classes=classes, **(model_options or {}))
        return model, load_state(model, state, strict=False, source=str(resolve(checkpoint)))

    classes = num_classes or (state.get("num_classes") if isinstance(state, dict) else None)
    if classes:  # weights that do not fit are refused before the data are read
        model, ignored = model_with_weights(classes)
    config = TrainConfig.from_values(dataset=dataset, data_root=data_root, image_size=image_size, batch_size=batch_size,
                         workers=workers, device=str(device))
    loader = _split_loader(config, device, Processes(), train=False)
    if not classes:
        model, ignored = model_with_weights(loader.num_classes)
    model.to(device)
    autocast = mixed_precision(device)
    return {"checkpoint": str(checkpoint), "arch": arch, "images": len(loader.labels), "ignored_keys": ignored,
            **evaluate(model, loader, autocast)}
