"""vkd.gan: DiffAugment, the BigGAN-style networks, FID against its closed form, resumable training."""

import copy
import json
from dataclasses import replace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vkd import data
from vkd.cli import main
from vkd.engine import TrainConfig, train
from vkd.gan import (
    FID,
    Discriminator,
    GANConfig,
    Generator,
    ImageEmbedding,
    class_spread,
    classifier_embedding,
    clip_embedding,
    diff_augment,
    evaluation_embedding,
    fid_real_images,
    generate,
    load_generator,
    train_gan,
)
from vkd.gan.augment import cutout, translation
from vkd.gan.train import GANTraining
from vkd.launch import _child_env, train_many


def test_translation_moves_content_by_at_most_an_eighth_and_fills_zeros():
    torch.manual_seed(0)
    x = torch.zeros(64, 3, 32, 32)
    x[:, :, 16, 16] = 1.0
    out = translation(x)
    assert out.shape == x.shape
    for image in out:
        where = image[0].nonzero()
        assert len(where) == 1  # the pixel moved (never duplicated or lost: it stays inside)
        assert (where[0] - 16).abs().max() <= 4
    shifts = {tuple(image[0].nonzero()[0].tolist()) for image in out}
    assert len(shifts) > 10  # shifts differ between images
    ones = translation(torch.ones(256, 3, 32, 32))
    assert (ones == 0).any() and set(ones.unique().tolist()) <= {0.0, 1.0}


def test_cutout_zeroes_a_square_of_half_the_side():
    torch.manual_seed(0)
    out = cutout(torch.ones(200, 3, 32, 32))
    zeros = (out[:, 0] == 0).sum(dim=(1, 2))
    assert zeros.max() == 16 * 16 and zeros.min() >= 8 * 8  # clipped by the border at worst to a quarter
    assert torch.equal(out[:, 0], out[:, 1])  # the same square in every channel


def test_diff_augment_is_differentiable_and_checks_its_policy():
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    diff_augment(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(diff_augment(x, ""), x)
    with pytest.raises(ValueError, match="unknown DiffAugment policy 'flip'"):
        diff_augment(x, "color,flip")


def test_generator_and_discriminator_shapes_and_conditioning():
    torch.manual_seed(0)
    g, d = Generator(10, channels=16, z_dim=8), Discriminator(10, channels=16, head_dim=6)
    images = g(torch.randn(5, 8), torch.arange(5))
    assert images.shape == (5, 3, 32, 32) and images.abs().max() <= 1
    logits, embedding = d(images, torch.arange(5))
    assert logits.shape == (5,) and embedding.shape == (5, 6)
    other, _ = d(images, torch.arange(5) + 1)
    assert not torch.allclose(logits, other)  # the projection term makes D class-conditional
    assert Discriminator(10, channels=16)(images, torch.arange(5))[1].shape == (5, 16)
    with pytest.raises(ValueError, match=r"z of shape \(B, 8\)"):
        g(torch.randn(5, 7), torch.arange(5))


def _pixels_as_features() -> ImageEmbedding:
    """uint8 images (B, 3, 1, 2) -> their 6 pixel values / 255 as features."""
    return ImageEmbedding(nn.Flatten(), 6, mean=(0, 0, 0), std=(1, 1, 1), name="pixels")


def _gaussian_images(n, mean, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(mean) + torch.randn(n, 6, generator=generator) @ torch.as_tensor(scale).T
    return x.round().clamp(0, 255).to(torch.uint8).view(n, 3, 1, 2)


def _frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Closed form between Gaussians fitted to the rows of a and b: |Δμ|² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½)."""
    a, b = a.double(), b.double()
    mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)
    evals, evecs = torch.linalg.eigh(cov_a)
    root_a = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * middle)


def test_fid_equals_the_closed_form_between_two_gaussians_and_zero_for_identical_sets():
    mean_a, mean_b = torch.full((6,), 120.0), torch.tensor([100.0, 130, 120, 110, 140, 125])
    scale_a = torch.eye(6) * 20
    scale_b = torch.eye(6) * 15 + torch.ones(6, 6) * 4  # correlated features
    real, fake = _gaussian_images(4000, mean_a, scale_a, 0), _gaussian_images(4000, mean_b, scale_b, 1)
    fid = FID(_pixels_as_features())
    fid.add_real(real.split(1000))
    features = lambda images: images.flatten(1).double() / 255  # noqa: E731
    assert fid(fake.split(1000)) == pytest.approx(_frechet(features(real), features(fake)), rel=1e-4)
    # and the population value: the sampled sets estimate it (features are pixels / 255)
    population = ((mean_a - mean_b).square().sum() + (scale_a @ scale_a.T).trace() + (scale_b @ scale_b.T).trace()
                  - 2 * torch.linalg.eigvals(scale_a @ scale_a.T @ scale_b @ scale_b.T).sqrt().real.sum()) / 255**2
    assert fid(fake.split(1000)) == pytest.approx(float(population), rel=0.1)
    assert abs(fid(real.split(1000))) < 1e-6
    assert "not comparable" in fid.feature_space


def test_clip_teacher_loads_a_local_open_clip_file(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32")
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    embedding = clip_embedding(str(tmp_path / "clip.pt"), model_name="ViT-S-32")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    expected = model.encode_image((F.interpolate((images + 1) / 2, size=224, mode="bilinear") - embedding.mean)
                                  / embedding.std)
    assert torch.allclose(embedding(images), expected, atol=1e-5)
    assert embedding.num_features == expected.shape[1]


def test_class_spread_is_the_mean_within_class_variance_and_zero_for_repeated_images():
    images = _gaussian_images(300, torch.full((6,), 120.0), torch.eye(6) * 20, 0)
    labels = torch.arange(300) % 3
    features = images.flatten(1).double() / 255
    expected = sum(torch.cov(features[labels == c].T).trace() for c in range(3)) / 3
    assert class_spread(_pixels_as_features(), images, labels) == pytest.approx(float(expected), rel=1e-6)
    repeated = images[:3].repeat(100, 1, 1, 1)  # image c for every sample of class c
    assert class_spread(_pixels_as_features(), repeated, torch.arange(300) % 3) == pytest.approx(0, abs=1e-9)


def test_missing_inception_and_clip_weights_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Inception weights at .*nowhere.pth: download"):
        FID("inception", inception_weights=str(tmp_path / "nowhere.pth"))
    with pytest.raises((FileNotFoundError, ImportError), match="no CLIP weights at .*clip.bin: download|open_clip"):
        clip_embedding(str(tmp_path / "clip.bin"))


def test_a_discriminator_update_is_one_pass_over_real_then_generated_images_with_the_hinge_and_vkd_terms():
    """As BigGAN's and DiffAugment's code: D sees the B real and B generated images as one batch (one pass, one
    spectral-norm power iteration); each half's VkD term normalises the teacher with that half's statistics."""
    torch.manual_seed(0)
    teacher = classifier_embedding("resnet8", checkpoint=None)
    images, labels = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (16,))
    config = GANConfig(method="vkd", norm="whiten", channels=8, z_dim=8, batch_size=4, d_steps=1, ema_decay=0)
    training = GANTraining(config, images, labels, 10, teacher, torch.device("cpu"))
    kd_loss = copy.deepcopy(training.kd_loss)  # its projector as the update finds it
    passes = []
    training.discriminator.register_forward_hook(
        lambda module, args, output: passes.append((args[0].detach(), *(o.detach() for o in output))))
    terms = training.iteration(0)
    assert [len(p[0]) for p in passes] == [8, 4]  # the update's 4 real + 4 generated, then the generator's 4
    augmented, logits, embedding = passes[0]
    torch.testing.assert_close(terms["d_loss"], F.relu(1 - logits[:4]).mean() + F.relu(1 + logits[4:]).mean())
    torch.testing.assert_close((terms["d_real"], terms["d_fake"]), (logits[:4].mean(), logits[4:].mean()))
    targets = teacher(augmented)
    halves = kd_loss(embedding[:4], targets[:4]) + kd_loss(embedding[4:], targets[4:])
    torch.testing.assert_close(terms["kd_loss"], halves)


def test_channels_last_changes_the_layout_of_the_networks_images_not_their_arithmetic():
    teacher = classifier_embedding("resnet8", checkpoint=None)
    images, labels = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (16,))
    terms, layouts = {}, {}
    for channels_last in (False, True):
        torch.manual_seed(0)  # the same initial weights and random draws for both layouts
        config = GANConfig(method="vkd", norm="layernorm", channels=8, z_dim=8, batch_size=4, d_steps=2, ema_decay=0,
                           channels_last=channels_last)
        training = GANTraining(config, images, labels, 10, teacher, torch.device("cpu"))
        seen = []
        training.discriminator.register_forward_hook(lambda module, args, output, seen=seen: seen.append(args[0]))
        terms[channels_last] = training.iteration(0)
        layouts[channels_last] = {x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
                                  for x in seen}
    assert layouts == {False: {False}, True: {True}}  # every image batch D saw: NCHW, or NHWC
    torch.testing.assert_close(terms[True], terms[False], rtol=1e-4, atol=1e-5)


@pytest.fixture
def teacher(tmp_path, monkeypatch, tiny_archive):
    """A resnet8 trained for one epoch on the tiny archive: the teacher and the FID feature space."""
    monkeypatch.setenv(data.ARCHIVE_ENV, str(tiny_archive))
    train(TrainConfig(name="teacher", out_dir=str(tmp_path / "runs"), data_root=str(tmp_path / "data"),
                      student="resnet8", epochs=1, batch_size=2, progress=False))
    return str(tmp_path / "runs/teacher/model.pt")


def gan_config(tmp_path, teacher, **changes) -> GANConfig:
    base = dict(out_dir=str(tmp_path / "runs"), data_root=str(tmp_path / "data"), fraction=1.0, teacher="resnet8",
                teacher_checkpoint=teacher, channels=8, z_dim=8, batch_size=4, d_steps=2, iterations=4,
                eval_every=2, ema_decay=0.9, fid_samples=6, fid_features="teacher", progress=False)
    return GANConfig(**{**base, **changes})


def test_resumed_gan_run_equals_uninterrupted_run(tmp_path, teacher):
    for method in ("da", "vkd"):
        full = train_gan(gan_config(tmp_path, teacher, name=f"{method}-full", method=method))
        # interrupted between evaluations (a checkpoint every iteration; checkpoints do not change the run, so
        # its settings and folder are the same), at an evaluation, and between evaluations again
        split = gan_config(tmp_path, teacher, name=f"{method}-split", method=method, checkpoint_every=1)
        for stop in (1, 2, 3):
            assert train_gan(split, stop_after_iteration=stop) == {"stopped_after_iteration": stop}
        assert len(pd.read_csv(tmp_path / f"runs/{method}-split/metrics.csv")) == 1  # iteration 3's terms wait
        resumed = train_gan(split)
        assert resumed["last_fid"] == full["last_fid"]
        a = torch.load(tmp_path / f"runs/{method}-full/generator.pt")["generator"]
        b = torch.load(tmp_path / f"runs/{method}-split/generator.pt")["generator"]
        assert all(torch.equal(a[k], b[k]) for k in a)
        metrics = [pd.read_csv(tmp_path / f"runs/{method}-{run}/metrics.csv").drop(columns="seconds")
                   for run in ("full", "split")]
        pd.testing.assert_frame_equal(*metrics)
        assert list(metrics[0].iteration) == [2, 4]
        assert ("kd_loss" in metrics[0]) == (method == "vkd")
    assert "resnet8" in resumed["fid_feature_space"] and "not comparable" in resumed["fid_feature_space"]
    assert (tmp_path / "runs/vkd-full/samples.png").is_file()
    generator = load_generator(tmp_path / "runs/vkd-full/generator.pt")
    assert not generator.training and generator(torch.randn(2, 8), torch.tensor([0, 1])).shape == (2, 3, 32, 32)


def test_summary_records_the_final_generators_within_class_spread(tmp_path, teacher):
    config = gan_config(tmp_path, teacher, name="spread", method="vkd")
    summary = train_gan(config)
    embedding = evaluation_embedding(config)
    test = fid_real_images(config)
    generator = load_generator(config.run_dir() / "generator.pt")
    images = torch.cat(list(generate(generator, len(test.labels), 500, config.seed + 3, torch.device("cpu"))))
    real = class_spread(embedding, test.images, test.labels)
    generated = class_spread(embedding, images, torch.arange(len(images)) % generator.num_classes)
    assert summary["real_spread"] == pytest.approx(real, rel=1e-9)
    assert summary["spread_ratio"] == pytest.approx(generated / real, rel=1e-9)
    assert summary["spread_space"] == embedding.name
    assert summary["software"]["torch"] == torch.__version__ and summary["software"]["python"]
    # a summary written before the spread was recorded is completed from generator.pt, on disk too
    path = config.run_dir() / "summary.json"
    older = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("spread_ratio", "real_spread",
                                                                                "spread_space")}
    path.write_text(json.dumps(older))
    assert train_gan(config) == summary == json.loads(path.read_text())


def test_gan_runs_in_parallel_processes_match_runs_in_this_process(tmp_path, teacher):
    configs = [gan_config(tmp_path, teacher, name=f"p-{method}", method=method) for method in ("da", "vkd")]
    parallel = train_many(configs, processes=2)  # each a `python -m vkd gan --config` process
    assert (tmp_path / "runs/p-vkd/config.json").is_file() and (tmp_path / "runs/p-vkd/train.log").is_file()
    threads = torch.get_num_threads()
    torch.set_num_threads(int(_child_env(2)["OMP_NUM_THREADS"]))  # as each process had: same float sums
    try:
        alone = train_many([replace(c, out_dir=str(tmp_path / "alone")) for c in configs])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(parallel, alone, strict=True):
        assert (a["name"], a["last_fid"], a["spread_ratio"]) == (b["name"], b["last_fid"], b["spread_ratio"])
    path = tmp_path / "runs/p-vkd/summary.json"  # finished before summaries held the spread
    path.write_text(json.dumps({k: v for k, v in parallel[1].items() if k != "spread_ratio"}))
    assert train_many(configs, processes=2) == parallel
    assert main(["gan", "-s", "iteration", "4"]) == 2


def test_inception_weights_that_cannot_be_downloaded_are_refused_before_the_first_iteration(tmp_path, monkeypatch,
                                                                                            tiny_archive, capsys):
    """Offline with no inception_weights: `python -m vkd gan` says where to get them, without a traceback."""
    from urllib.error import URLError

    import torchmetrics.image.fid

    def offline(*args, **kwargs):
        raise URLError("Name or service not known")

    monkeypatch.setattr(torchmetrics.image.fid, "FrechetInceptionDistance", offline)
    monkeypatch.setenv(data.ARCHIVE_ENV, str(tiny_archive))
    with pytest.raises(FileNotFoundError, match="no Inception weights: torch-fidelity could not download them"):
        FID("inception")
    settings = dict(out_dir=str(tmp_path / "runs"), data_root=str(tmp_path / "data"), fraction=1.0, channels=8,
                    z_dim=8, batch_size=4, iterations=2, eval_every=2, fid_samples=6, progress=False)
    assert main(["gan", *(word for key, value in settings.items() for word in ("-s", key, json.dumps(value)))]) == 2
    assert "error: no Inception weights: torch-fidelity could not download them" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # no run folder for a run that could not start


def test_gan_config_errors(tmp_path, teacher):
    with pytest.raises(ValueError, match=r"embedding \(128-d\) is wider than the teacher's \(64-d\).*head_dim <= 64"):
        train_gan(gan_config(tmp_path, teacher, method="vkd", channels=128))


def test_bench_gan_times_an_iteration_of_each_setup():
    from vkd.bench import bench_gan

    table = bench_gan(channels=8, batch=4, d_steps=1, teacher="resnet8", steps=1)
    assert list(table.setup) == ["DiffAugment (da)", "vkd-layernorm", "vkd-whiten"]
    assert (table.ms_per_iteration > 0).all() and table.time_vs_da[0] == 1
    # wider than the teacher (resnet8: 64-d) needs the linear head, as notebook 06's GPU params set it
    with pytest.raises(ValueError, match="set head_dim <= 64"):
        bench_gan(channels=128, batch=4, d_steps=1, teacher="resnet8", steps=1)
    assert len(bench_gan(channels=128, batch=4, d_steps=1, teacher="resnet8", head_dim=16, steps=1)) == 3
    with pytest.raises(ValueError, match="method 'da' takes no teacher"):
        GANTraining(GANConfig(method="da"), torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1), 10,
                    _pixels_as_features(), torch.device("cpu"))
