"""Training a data-limited class-conditional GAN, with or without VkD distillation into the discriminator.

``train_gan(GANConfig(...))`` writes to ``<out_dir>/<name>/``: ``metrics.csv`` (one row per evaluation:
losses, FID, seconds), ``samples.png`` (a fixed grid of the EMA generator's images after the last
evaluation), ``summary.json`` and ``checkpoint.pt`` (written atomically every ``checkpoint_every`` iterations
and at every evaluation; a rerun resumes from it exactly, so a crash or Ctrl-C loses at most
``checkpoint_every`` iterations), ``generator.pt`` at the end.

One iteration = ``d_steps`` discriminator updates, then one generator update (hinge losses, Adam),
with DiffAugment on every image the discriminator sees; a discriminator update passes the real and the
generated batch through D as one batch, as BigGAN's and DiffAugment's code do.  Method ``"vkd"`` adds to
the discriminator's loss

    kd_weight · [VkD(head(D(T(x))), teacher(T(x))) + VkD(head(D(T(G(z)))), teacher(T(G(z))))]

-- the discriminator's pooled features (or a regression head's map of them) through VkD's orthogonal
projector, against the teacher's embedding of the same augmented image normalised by ``norm`` (``none`` /
``layernorm`` / ``whiten``: vkd.normalization), for the real batch and the generated batch separately.
Method ``"da"`` is the DiffAugment baseline.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import pandas as pd
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torchvision.utils import save_image
from tqdm.auto import tqdm

from .. import data as vdata
from ..checkpoints import load_file
from ..engine import NonFiniteLossError, RunConfig, finished_summary
from ..losses import VkDLoss, get_distance
from ..normalization import get_normalization
from ..paths import progress_default, resolve, save_atomic, save_json_atomic, write_atomic
from ..projectors import retract_
from ..runtime import (
    device_description,
    git_revision,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
    software_versions,
)
from ..settings import at_least, positive
from .augment import DIFFAUGMENT_POLICY, diff_augment
from .features import ImageEmbedding, classifier_embedding, clip_embedding
from .fid import FID, class_spread, to_uint8
from .models import Discriminator, Generator

GAN_METHODS = ("da", "vkd")


@dataclass
class GANConfig(RunConfig):
    """Everything a GAN run depends on; stored in the checkpoint and in summary.json."""

    COMMAND: ClassVar[str] = "gan"
    NOT_SHAPING = (*RunConfig.NOT_SHAPING, "checkpoint_every")  # checkpoints do not change the run
    PATHS: ClassVar[tuple[str, ...]] = ("data_root", "teacher_checkpoint", "inception_weights")

    name: str = "gan"
    out_dir: str = "runs"
    dataset: str = "cifar10-jpeg"  # vkd.data.DATASETS
    data_root: str = "data"
    download: bool = False
    fraction: float = 0.1  # class-stratified fraction of the training set (the data-limited setting)
    method: str = "da"  # da (DiffAugment baseline) | vkd
    norm: str = "whiten"  # vkd: teacher normalisation none | layernorm | whiten
    distance: str = "mse"  # vkd: vkd.losses.DISTANCES
    kd_weight: float = 1.0
    teacher: str = "resnet32x4"  # vkd: a classifier (timm name) or "clip" (open_clip ViT-B/32)
    teacher_checkpoint: str = "data/teachers/resnet32x4_cifar10-jpeg.pt"  # its weights (CLIP: open_clip file)
    teacher_sha256: str | None = None
    channels: int = 256  # width of generator and discriminator (BigGAN CIFAR: 256)
    head_dim: int = 0  # vkd: 0 projects D's pooled features (channels <= teacher width); >0: a linear head first
    z_dim: int = 128
    iterations: int = 100_000  # generator updates
    batch_size: int = 50
    d_steps: int = 4  # discriminator updates per generator update
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas: tuple = (0.0, 0.999)
    ema_decay: float = 0.9999  # generator EMA (0: evaluate the generator itself)
    policy: str = DIFFAUGMENT_POLICY
    channels_last: bool = True  # generator, discriminator and images in NHWC (faster convolutions on CPUs and GPUs)
    eval_every: int = 5000  # iterations between FID evaluations (each also writes the checkpoint)
    checkpoint_every: int = 500  # iterations between checkpoints (at most this many are lost to a crash)
    fid_samples: int = 10_000  # generated images per FID; the real set is as many test images
    fid_features: str = "inception"  # inception | teacher (the teacher's embedding) | an arch:checkpoint pair
    inception_weights: str = ""  # local Inception file (empty: torch-fidelity downloads it; online)
    seed: int = 0
    device: str = "auto"
    progress: bool = field(default_factory=progress_default)  # tqdm bars

    def __post_init__(self):
        """Refuse, when the config is made rather than when it trains: an unknown method, teacher normalisation,
        distance or FID feature space, evaluations that do not divide the iterations, a setting of the wrong type
        or outside its :meth:`limits`."""
        super().__post_init__()
        if self.method not in GAN_METHODS:
            raise ValueError(f"unknown GAN method {self.method!r}; expected one of {GAN_METHODS}")
        get_normalization(self.norm)
        get_distance(self.distance)
        if self.fid_features not in ("inception", "teacher") and ":" not in self.fid_features:
            raise ValueError(f"fid_features must be 'inception', 'teacher' or 'ARCH:CHECKPOINT', got "
                             f"{self.fid_features!r}")
        if self.iterations % self.eval_every:
            raise ValueError(f"iterations ({self.iterations}) must be a multiple of eval_every ({self.eval_every})")

    def limits(self) -> list[tuple[str, bool, str]]:
        return [*super().limits(),
                ("dataset", self.dataset in vdata.DATASETS, f"one of {vdata.DATASETS}"),
                ("fraction", 0 < self.fraction <= 1, "in (0, 1]"),
                *at_least(self, 1, "channels", "z_dim", "iterations", "batch_size", "d_steps", "eval_every",
                          "checkpoint_every"),
                *at_least(self, 0, "head_dim", "kd_weight"),
                *positive(self, "lr_g", "lr_d"),
                ("betas", len(self.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas),
                 "two values in [0, 1), Adam's (beta1, beta2)"),
                ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1) (0: evaluate the generator itself)"),
                ("fid_samples", self.fid_samples >= 2, "at least 2 (a covariance)")]

    def run(self, stop_after: int | None = None) -> dict:
        return train_gan(self, stop_after_iteration=stop_after)


def build_teacher_embedding(config: GANConfig) -> ImageEmbedding:
    if config.teacher == "clip":
        return clip_embedding(config.teacher_checkpoint, sha256=config.teacher_sha256)
    return classifier_embedding(config.teacher, config.teacher_checkpoint, config.teacher_sha256, config.dataset)


def evaluation_embedding(config: GANConfig, teacher: ImageEmbedding | None = None) -> ImageEmbedding | None:
    """The feature space ``fid_features`` names: the teacher's embedding ("teacher"), a classifier's pooled
    features ("ARCH:CHECKPOINT"), or None for "inception" (torchmetrics' own network)."""
    if config.fid_features == "inception":
        return None
    if config.fid_features == "teacher":
        return teacher if teacher is not None else build_teacher_embedding(config)
    arch, _, checkpoint = config.fid_features.partition(":")
    return classifier_embedding(arch, checkpoint, dataset=config.dataset)


def fid_real_images(config: GANConfig) -> vdata.TensorData:
    """The test images FID (and the within-class spread) compare against: a class-stratified subset of
    ``fid_samples`` of them (all when there are fewer)."""
    test = vdata.load_tensor_data(config.dataset, "test", config.data_root, config.download, config.progress)
    fraction = min(1.0, config.fid_samples / len(test.labels))
    return test.subset(vdata.stratified_indices(test.labels.numpy(), fraction, config.seed))


@torch.no_grad()
def generate(generator: Generator, count: int, batch_size: int, seed: int, device: torch.device):
    """``count`` uint8 images (in batches) from a fixed noise stream, classes in turn (0, 1, ..., C-1, 0, ...)."""
    stream = torch.Generator().manual_seed(seed)
    for start in range(0, count, batch_size):
        n = min(batch_size, count - start)
        z = torch.randn(n, generator.z_dim, generator=stream).to(device)
        labels = (torch.arange(start, start + n) % generator.num_classes).to(device)
        yield to_uint8(generator(z, labels))


@torch.no_grad()
def within_class_spread(config: GANConfig, generator: Generator, embedding: ImageEmbedding, test_data: vdata.TensorData,
                        device: torch.device) -> dict:
    """Diversity of a generator: the within-class spread (:func:`~vkd.gan.fid.class_spread`) of as many of
    its images as there are FID test images (classes in turn, a fixed noise stream) over that of the test
    images, in ``embedding``'s space.  1: as varied within a class as real data; 0: one image per class."""
    real = class_spread(embedding, test_data.images.to(device), test_data.labels.to(device))
    images = torch.cat(list(generate(generator, len(test_data.labels), 500, config.seed + 3, device)))
    labels = torch.arange(len(images), device=device) % generator.num_classes
    return {"spread_ratio": class_spread(embedding, images, labels) / real, "real_spread": real,
            "spread_space": embedding.name}


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> Generator:
    """The (EMA) generator a finished run saved as ``generator.pt``, in eval mode and in the memory layout it
    trained in (so that it draws the images its run evaluated, to the last bit)."""
    state = load_file(resolve(path))
    generator = Generator(state["num_classes"], state["channels"], state["z_dim"])
    generator.load_state_dict(state["generator"])
    layout = torch.channels_last if state.get("channels_last") else torch.contiguous_format
    return generator.to(device, memory_format=layout).eval()


class GANTraining:
    """The networks, optimisers and training iteration of a GAN run: ``d_steps`` discriminator updates,
    then one generator update, on real images (N, 3, H, W) uint8 with labels (N,) held on ``device``.
    ``teacher`` (method "vkd" only): the frozen embedding the discriminator's features are distilled towards."""

    def __init__(self, config: GANConfig, real_images: torch.Tensor, real_labels: torch.Tensor, num_classes: int,
                 teacher: ImageEmbedding | None, device: torch.device):
        if (teacher is not None) != (config.method == "vkd"):
            raise ValueError(f"method {config.method!r} {'needs' if config.method == 'vkd' else 'takes no'} teacher")
        self.layout = layout = torch.channels_last if config.channels_last else torch.contiguous_format
        self.config, self.device, self.num_classes, self.teacher = config, device, num_classes, teacher
        self.real_images, self.real_labels = real_images.contiguous(memory_format=layout), real_labels
        self.generator = Generator(num_classes, config.channels, config.z_dim).to(device, memory_format=layout)
        self.discriminator = Discriminator(num_classes, config.channels, config.head_dim if teacher is not None else 0
                                           ).to(device, memory_format=layout)
        self.kd_loss = None
        if teacher is not None:
            if self.discriminator.embedding_dim > teacher.num_features:
                raise ValueError(f"the discriminator's embedding ({self.discriminator.embedding_dim}-d) is wider than "
                                 f"the teacher's ({teacher.num_features}-d), which an orthogonal projector cannot map; "
                                 f"set head_dim <= {teacher.num_features} (a linear regression head) or fewer channels")
            self.kd_loss = VkDLoss(self.discriminator.embedding_dim, teacher.num_features, norm=config.norm,
                                   distance=config.distance).to(device)
        d_parameters = [*self.discriminator.parameters(), *(self.kd_loss.parameters() if self.kd_loss else [])]
        betas = tuple(float(beta) for beta in config.betas)  # YAML may give [0, 0.999]; Adam wants floats
        self.g_optimizer = torch.optim.Adam(self.generator.parameters(), config.lr_g, betas=betas)
        self.d_optimizer = torch.optim.Adam(d_parameters, config.lr_d, betas=betas)
        self.ema = ModelEmaV3(self.generator, config.ema_decay, use_warmup=True) if config.ema_decay else None
        self.evaluated = self.ema.module if self.ema is not None else self.generator  # what FID and samples use

    def state_dict(self) -> dict:
        return {"generator": self.generator.state_dict(), "discriminator": self.discriminator.state_dict(),
                "kd_loss": self.kd_loss.state_dict() if self.kd_loss else None,
                "g_optimizer": self.g_optimizer.state_dict(), "d_optimizer": self.d_optimizer.state_dict(),
                "ema": self.ema.module.state_dict() if self.ema else None}

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        if self.kd_loss is not None:
            self.kd_loss.load_state_dict(state["kd_loss"])
        self.g_optimizer.load_state_dict(state["g_optimizer"])
        self.d_optimizer.load_state_dict(state["d_optimizer"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])

    def iteration(self, step: int) -> dict[str, torch.Tensor]:
        """One iteration (``step``: the generator updates so far, for the EMA's warm-up); returns the
        discriminator's terms and logits averaged over its updates, and the generator's loss (detached)."""
        self.generator.train()
        self.discriminator.train()
        means: dict[str, torch.Tensor] = {}
        for _ in range(self.config.d_steps):
            for name, value in self._discriminator_step().items():
                means[name] = means.get(name, 0) + value.detach() / self.config.d_steps
        means["g_loss"] = self._generator_step(step).detach()
        return means

    def _real_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(len(self.real_labels), (self.config.batch_size,), device=self.device)
        return self.real_images[index].float() / 127.5 - 1, self.real_labels[index]

    def _fake_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(self.config.batch_size, self.config.z_dim, device=self.device)
        labels = torch.randint(self.num_classes, (self.config.batch_size,), device=self.device)
        return self.generator(z, labels), labels

    def _augmented(self, images: torch.Tensor) -> torch.Tensor:
        """DiffAugment, in the run's memory layout (its translation returns NHWC strides whatever it is given)."""
        return diff_augment(images, self.config.policy).contiguous(memory_format=self.layout)

    def _discriminator_step(self) -> dict[str, torch.Tensor]:
        config = self.config
        images, labels = self._real_batch()
        with torch.no_grad():
            fakes, fake_labels = self._fake_batch()
        # real and generated images through D (and the teacher) as one batch (B real, then B generated), as
        # BigGAN's and DiffAugment's code do: one pass and one spectral-norm power iteration per update
        augmented = self._augmented(torch.cat([images, fakes]))
        logits, embedding = self.discriminator(augmented, torch.cat([labels, fake_labels]))
        real_logits, fake_logits = logits.chunk(2)
        terms = {"d_loss": F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()}
        if self.kd_loss is not None:  # the teacher normalised with the statistics of each half
            targets = self.teacher(augmented)
            terms["kd_loss"] = config.kd_weight * sum(self.kd_loss(student, teacher) for student, teacher
                                                      in zip(embedding.chunk(2), targets.chunk(2), strict=True))
        self.d_optimizer.zero_grad(set_to_none=True)
        sum(terms.values()).backward()
        self.d_optimizer.step()
        if self.kd_loss is not None:
            retract_(self.kd_loss)
        terms.update(d_real=real_logits.mean(), d_fake=fake_logits.mean())
        return terms

    def _generator_step(self, step: int) -> torch.Tensor:
        fakes, labels = self._fake_batch()
        logits, _ = self.discriminator(self._augmented(fakes), labels)
        loss = -logits.mean()
        self.g_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.g_optimizer.step()
        if self.ema is not None:
            self.ema.update(self.generator, step=step)
        return loss


def train_gan(config: GANConfig, stop_after_iteration: int | None = None) -> dict:
    """Train the GAN ``config`` describes (resuming from its checkpoint; a finished run is reused).

    ``stop_after_iteration`` ends the call after the checkpoint at that iteration, as if interrupted (tests)."""
    summary = finished_summary(config)
    if summary is not None:
        return summary if "spread_ratio" in summary else _add_spread(config, summary)
    device = resolve_device(config.device)
    run_dir = config.run_dir()
    revision = git_revision()  # the code that runs, whatever the checkout becomes meanwhile
    seed_everything(config.seed)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: let cuDNN pick its fastest kernels

    train_data = vdata.load_tensor_data(config.dataset, "train", config.data_root, config.download, config.progress)
    train_data = train_data.subset(vdata.stratified_indices(train_data.labels.numpy(), config.fraction, config.seed))
    test_data = fid_real_images(config)
    num_classes = len(train_data.classes)

    teacher = build_teacher_embedding(config).to(device) if config.method == "vkd" else None
    training = GANTraining(config, train_data.images.to(device), train_data.labels.to(device), num_classes, teacher,
                           device)
    embedding = evaluation_embedding(config, teacher)  # None: Inception's (inside torchmetrics)
    fid = FID(embedding.to(device) if embedding else "inception", config.inception_weights, device)
    fid.add_real(test_data.images.split(500))

    run_dir.mkdir(parents=True, exist_ok=True)  # once data, models and weights are found: a refused start leaves none
    checkpoint_path = run_dir / "checkpoint.pt"
    # sums: the training terms summed since the last evaluation; seconds: the time spent since then
    rows, iteration, elapsed, sums, seconds = [], 0, 0.0, {}, 0.0
    if checkpoint_path.is_file():
        state = load_file(checkpoint_path, device)
        config.refuse_other_settings(state["config"], checkpoint_path)
        training.load_state_dict(state)
        set_rng_state(state["rng"], device)
        rows, iteration, elapsed = state["metrics"], state["iteration"], state["elapsed"]
        sums, seconds = state.get("sums", {}), state.get("seconds", 0.0)  # checkpoints between evaluations
    saved = iteration

    evaluated = training.evaluated
    bar = tqdm(total=config.iterations, initial=iteration, desc=config.name, disable=not config.progress,
               mininterval=5)
    while iteration < config.iterations:
        start = time.perf_counter()
        stop = min(_next_multiple(iteration, config.eval_every), _next_multiple(iteration, config.checkpoint_every))
        for _ in range(stop - iteration):
            for name, value in training.iteration(iteration).items():
                sums[name] = sums.get(name, 0) + value
            iteration += 1
            bar.update()
        if not all(math.isfinite(value.item()) for value in sums.values()):
            kept = f"the checkpoint of iteration {saved} is intact" if saved else "none was written"
            raise NonFiniteLossError(f"{config.name}, iterations up to {iteration}: non-finite loss "
                                     f"{ {name: value.item() for name, value in sums.items()} }; {kept}. "
                                     f"Lower the learning rates.")
        if iteration % config.eval_every == 0:
            means = {name: (value / config.eval_every).item() for name, value in sums.items()}
            evaluated.eval()
            score = fid(generate(evaluated, len(test_data.labels), 500, config.seed + 1, device))
            save_image(next(generate(evaluated, 10 * num_classes, 10 * num_classes, config.seed + 2, device)).float()
                       / 255, run_dir / "samples.png", nrow=num_classes)
            seconds += time.perf_counter() - start
            elapsed += seconds
            rows.append({"iteration": iteration, **means, "fid": score, "seconds": seconds})
            write_atomic(run_dir / "metrics.csv", lambda partial: pd.DataFrame(rows).to_csv(partial, index=False))
            sums, seconds = {}, 0.0
        else:
            seconds += time.perf_counter() - start
        save_atomic({"iteration": iteration, "config": asdict(config), **training.state_dict(),
                     "rng": rng_state(device), "metrics": rows, "elapsed": elapsed, "sums": sums, "seconds": seconds},
                    checkpoint_path)
        saved = iteration
        if stop_after_iteration is not None and iteration >= stop_after_iteration and iteration < config.iterations:
            bar.close()
            return {"stopped_after_iteration": iteration}
    bar.close()

    fids = [row["fid"] for row in rows]
    evaluated.eval()
    spread = within_class_spread(config, evaluated, _spread_embedding(config, embedding, teacher, device),
                                 test_data, device)
    summary = {
        "name": config.name, "method": config.method, "norm": config.norm if teacher is not None else None,
        "dataset": config.dataset, "fraction": config.fraction, "iterations": config.iterations, "seed": config.seed,
        "best_fid": min(fids), "best_iteration": rows[fids.index(min(fids))]["iteration"], "last_fid": fids[-1],
        "fid_feature_space": fid.feature_space, "fid_samples": len(test_data.labels),
        **spread, "teacher": (teacher.name if teacher is not None else None), "wall_seconds": elapsed,
        "device": device_description(device), "software": software_versions(), "git_revision": revision,
        "config": asdict(config),
    }
    save_atomic({"generator": evaluated.state_dict(), "num_classes": num_classes, "channels": config.channels,
                 "z_dim": config.z_dim, "channels_last": config.channels_last}, run_dir / "generator.pt")
    save_json_atomic(summary, run_dir / "summary.json")
    return json.loads(json.dumps(summary))


def _next_multiple(count: int, step: int) -> int:
    """The smallest multiple of ``step`` above ``count``."""
    return (count // step + 1) * step


def _spread_embedding(config: GANConfig, fid_embedding: ImageEmbedding | None, teacher: ImageEmbedding | None,
                      device: torch.device) -> ImageEmbedding:
    """The space of the within-class spread: FID's, or the teacher's where FID's is Inception's (inside
    torchmetrics)."""
    return (fid_embedding or teacher or build_teacher_embedding(config)).to(device)


def _add_spread(config: GANConfig, summary: dict) -> dict:
    """A summary written before the within-class spread was part of it, completed from ``generator.pt``."""
    device = resolve_device(config.device)
    generator = load_generator(config.run_dir() / "generator.pt", device)
    embedding = _spread_embedding(config, evaluation_embedding(config), None, device)
    summary.update(within_class_spread(config, generator, embedding, fid_real_images(config), device))
    save_json_atomic(summary, config.run_dir() / "summary.json")
    return summary
