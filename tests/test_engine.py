import json
import platform
import re
from dataclasses import replace
from functools import partialmethod
from types import SimpleNamespace

import pandas as pd
import pytest
import timm
import torch
import torchvision
import yaml

from vkd import data, engine, launch
from vkd.checkpoints import CheckpointMismatchError, export_weights, load_weights
from vkd.cli import main
from vkd.distillers import Distiller
from vkd.engine import (
    NonFiniteLossError,
    TrainConfig,
    build_optimizer,
    compile_options,
    load_distiller,
    train,
)
from vkd.gan import GANConfig
from vkd.launch import train_many


@pytest.fixture
def data_root(tmp_path, monkeypatch, tiny_archive):
    monkeypatch.setenv(data.ARCHIVE_ENV, str(tiny_archive))
    return tmp_path / "data"


def config(root, tmp_path, **changes):
    base = dict(name="run", out_dir=str(tmp_path / "runs"), data_root=str(root), student="resnet8", epochs=3,
                batch_size=2, lr=0.05, progress=False)
    return TrainConfig(**{**base, **changes})


def new_process(monkeypatch):
    """Forget the teacher outputs that this process's earlier runs left for its next run (TeacherCache)."""
    monkeypatch.setattr(engine, "_last_teacher_outputs", None)


def count_teacher_batches(monkeypatch) -> list[int]:
    """The sizes of the batches the teacher runs on from now on (appended as it runs)."""
    sizes = []
    teacher_outputs = Distiller.teacher_outputs

    def counted(self, images, pooled=False):
        sizes.append(len(images))
        return teacher_outputs(self, images, pooled)

    monkeypatch.setattr(Distiller, "teacher_outputs", counted)
    return sizes


@pytest.mark.parametrize("distilled", [False, True])
def test_resumed_run_equals_uninterrupted_run(data_root, tmp_path, distilled, monkeypatch):
    settings = {}
    if distilled:  # from a teacher cache of 2 views: epoch 3 reads view 0, which the interrupted process filled
        train(config(data_root, tmp_path, name="teacher", epochs=1))
        settings = dict(method="vkd", teacher="resnet8", teacher_checkpoint=str(tmp_path / "runs/teacher/model.pt"),
                        teacher_cache_views=2)
    full = train(config(data_root, tmp_path, name="full", **settings))
    new_process(monkeypatch)
    interrupted = config(data_root, tmp_path, name="split", **settings)
    assert train(interrupted, stop_after_epoch=1) == {"stopped_after_epoch": 1}
    new_process(monkeypatch)
    resumed = train(interrupted)
    assert resumed["best_acc"] == full["best_acc"] and resumed["last_acc"] == full["last_acc"]
    a = torch.load(tmp_path / "runs/full/model.pt")["model"]
    b = torch.load(tmp_path / "runs/split/model.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics_a = pd.read_csv(tmp_path / "runs/full/metrics.csv").drop(columns="epoch_seconds")
    metrics_b = pd.read_csv(tmp_path / "runs/split/metrics.csv").drop(columns="epoch_seconds")
    pd.testing.assert_frame_equal(metrics_a, metrics_b)


def test_load_distiller_gives_back_the_trained_student_and_projector(data_root, tmp_path):
    train(config(data_root, tmp_path, name="teacher", epochs=1))
    run = config(data_root, tmp_path, name="vkd", method="vkd", epochs=2, teacher="resnet8",
                 teacher_checkpoint=str(tmp_path / "runs/teacher/model.pt"))
    with pytest.raises(FileNotFoundError, match="train\\(config\\) first"):
        load_distiller(run)
    images = torch.rand(8, 3, 32, 32)
    train(run, probe=lambda d: {"projected": d.projector_io(images, "vkd")[1].tolist()})
    distiller = load_distiller(run)
    assert not distiller.training and distiller.teacher is not None
    last_probe = json.loads((run.run_dir() / "probes.json").read_text())[-1]["projected"]
    with torch.no_grad():
        torch.testing.assert_close(distiller.projector_io(images, "vkd")[1], torch.tensor(last_probe))
    final = torch.load(run.run_dir() / "model.pt")["model"]
    assert all(torch.equal(final[k], v) for k, v in distiller.student.state_dict().items())


def test_every_method_distils_from_a_trained_teacher(data_root, tmp_path):
    teacher = train(config(data_root, tmp_path, name="teacher", student="resnet20", epochs=1))
    checkpoint = tmp_path / "runs/teacher/model.pt"
    for method in ("kd", "fitnet", "dkd", "srd", "vkd", "srd+dkd"):
        summary = train(config(data_root, tmp_path, name=method, method=method, epochs=1, teacher="resnet20",
                               teacher_checkpoint=str(checkpoint)))
        metrics = pd.read_csv(tmp_path / f"runs/{method}/metrics.csv")
        assert summary["teacher_sha256"] and summary["device"].startswith("cpu")
        assert summary["software"] == {"python": platform.python_version(), "torch": torch.__version__,
                                       "torchvision": torchvision.__version__, "timm": timm.__version__,
                                       "cuda": torch.version.cuda or "none"}
        terms = [c for c in metrics.columns if c.startswith("train_") and c not in ("train_loss", "train_acc")]
        assert len(terms) >= 2, (method, terms)  # CE plus the method's own term(s)
    assert json.loads((tmp_path / "runs/vkd/summary.json").read_text())["config"]["method"] == "vkd"
    assert teacher["epochs"] == 1


@pytest.mark.parametrize(("method", "mode", "epochs"), [("vkd", True, 1), ("dkd", "reduce-overhead", 2)])
def test_compiled_run_matches_the_eager_run(data_root, tmp_path, method, mode, epochs):
    # dkd over 2 epochs: its warm-up weight changes with the epoch, which reaches the compiled forward as a tensor
    teacher = tmp_path / "runs/teacher/model.pt"
    train(config(data_root, tmp_path, name="teacher", epochs=1))
    common = dict(method=method, epochs=epochs, teacher="resnet8", teacher_checkpoint=str(teacher))
    eager = train(config(data_root, tmp_path, name="eager", **common))
    compiled = train(config(data_root, tmp_path, name="compiled", compile=mode, **common))
    assert compiled["config"]["compile"] == mode and not eager["config"]["compile"]
    a = pd.read_csv(tmp_path / "runs/eager/metrics.csv")
    b = pd.read_csv(tmp_path / "runs/compiled/metrics.csv")
    for column in ("train_ce", f"train_{method}", "test_acc"):
        assert b[column].tolist() == pytest.approx(a[column].tolist(), rel=1e-3, abs=1e-4), column
    weights = torch.load(tmp_path / "runs/compiled/model.pt")["model"]
    assert set(weights) == set(torch.load(tmp_path / "runs/eager/model.pt")["model"])  # no "_orig_mod." names


def test_an_unknown_compile_mode_is_refused_with_the_modes():
    assert compile_options(True) == {} and compile_options("reduce-overhead") == {"mode": "reduce-overhead"}
    with pytest.raises(ValueError, match="compile: expected true, false or one of .*reduce-overhead.*, got 'fast'"):
        compile_options("fast")


def test_teacher_cache_gives_the_same_run(data_root, tmp_path):
    teacher = tmp_path / "runs/teacher/model.pt"
    train(config(data_root, tmp_path, name="teacher", epochs=1))
    common = dict(method="vkd", epochs=2, teacher="resnet8", teacher_checkpoint=str(teacher))
    plain = train(config(data_root, tmp_path, name="plain", **common))
    cached = train(config(data_root, tmp_path, name="cached", teacher_cache_views=2, **common))
    a = pd.read_csv(tmp_path / "runs/plain/metrics.csv")
    b = pd.read_csv(tmp_path / "runs/cached/metrics.csv")
    pd.testing.assert_series_equal(a.test_acc, b.test_acc)
    pd.testing.assert_series_equal(a.train_vkd, b.train_vkd, rtol=1e-3)  # teacher stored in float16
    assert plain["best_acc"] == cached["best_acc"]


def test_teacher_cache_fills_a_chunk_of_batches_at_a_time(data_root, tmp_path, monkeypatch):
    # on a GPU the loader serves 8192 images per chunk and the teacher fills the cache a chunk at a time
    teacher = tmp_path / "runs/teacher/model.pt"
    train(config(data_root, tmp_path, name="teacher", epochs=1))
    common = dict(method="vkd", epochs=3, teacher="resnet8", teacher_checkpoint=str(teacher), teacher_cache_views=2)
    by_batch = train(config(data_root, tmp_path, name="by-batch", **common))
    teacher_batches = count_teacher_batches(monkeypatch)
    monkeypatch.setattr(data.TensorLoader, "__init__", partialmethod(data.TensorLoader.__init__, chunk_size=6))
    chunked = config(data_root, tmp_path, name="chunked", **common)
    assert train(chunked, stop_after_epoch=1) == {"stopped_after_epoch": 1}
    used = len(data.load_tensor_data("cifar10-jpeg", "train", data_root).labels) // 2 * 2  # whole batches of 2
    per_view = [6] * (used // 6) + ([used % 6] if used % 6 else [])  # chunks of three batches
    assert teacher_batches == per_view  # epoch 1 filled view 0
    new_process(monkeypatch)
    summary = train(chunked)  # resumed with an empty cache: epoch 2 fills view 1, epoch 3 view 0 again
    assert teacher_batches == per_view * 3
    a = pd.read_csv(tmp_path / "runs/by-batch/metrics.csv")
    b = pd.read_csv(tmp_path / "runs/chunked/metrics.csv")
    pd.testing.assert_series_equal(a.test_acc, b.test_acc)
    pd.testing.assert_series_equal(a.train_vkd, b.train_vkd, rtol=1e-3)  # the teacher at another batch size
    assert by_batch["best_acc"] == summary["best_acc"]


@pytest.mark.parametrize("stored", ["as given", "altered"])
def test_runs_of_one_process_share_teacher_outputs_and_train_as_alone(data_root, tmp_path, monkeypatch, stored):
    # a notebook's students of one teacher: the second reads the views the first filled (after checking the first
    # chunk of each against the teacher) and ends with the weights and metrics it gets in a process of its own
    teacher = tmp_path / "runs/teacher/model.pt"
    train(config(data_root, tmp_path, name="teacher", epochs=1))
    common = dict(epochs=3, teacher="resnet8", teacher_checkpoint=str(teacher), teacher_cache_views=2)
    train(config(data_root, tmp_path, name="alone", method="vkd", **common))
    new_process(monkeypatch)
    train(config(data_root, tmp_path, name="first", method="kd", **common))
    if stored == "altered":  # e.g. the data changed on disk between the runs: the check finds it, the teacher runs
        engine._last_teacher_outputs.features[1] += 1
    teacher_batches = count_teacher_batches(monkeypatch)
    train(config(data_root, tmp_path, name="second", method="vkd", **common))
    epoch = len(data.load_tensor_data("cifar10-jpeg", "train", data_root).labels) // 2  # batches of 2
    assert teacher_batches == {"as given": [2, 2], "altered": [2] + [2] * epoch}[stored]  # view 1 run in full
    alone = torch.load(tmp_path / "runs/alone/model.pt")["model"]
    second = torch.load(tmp_path / "runs/second/model.pt")["model"]
    assert all(torch.equal(second[k], alone[k]) for k in alone)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "runs/second/metrics.csv").drop(columns="epoch_seconds"),
                                  pd.read_csv(tmp_path / "runs/alone/metrics.csv").drop(columns="epoch_seconds"),
                                  check_exact=True)


def test_a_captured_step_gives_the_eager_run_bit_for_bit(data_root, tmp_path, monkeypatch):
    # on the CPU the CUDA-graph step runs its bookkeeping (warm-up steps undone, fixed inputs, re-capture when
    # the learning rate drops, accumulators inside the step) and then the step itself: the run must not change
    teacher = tmp_path / "runs/teacher/model.pt"
    train(config(data_root, tmp_path, name="teacher", epochs=1))
    common = dict(method="vkd", epochs=3, teacher="resnet8", teacher_checkpoint=str(teacher), teacher_cache_views=2,
                  milestones=(0.5,))  # the rate drops after epoch 1
    train(config(data_root, tmp_path, name="eager", **common))
    recordings = []
    record = engine._record_eagerly

    def counted(step, warmup):
        recordings.append(warmup)
        return record(step, warmup)

    monkeypatch.setattr(engine, "_record_eagerly", counted)
    train(config(data_root, tmp_path, name="captured", cuda_graph=True, **common))
    assert recordings == [3, 3]  # epoch 1, and epoch 2 at the new rate
    split = config(data_root, tmp_path, name="split", cuda_graph=True, **common)
    train(split, stop_after_epoch=1)
    train(split)
    assert recordings == [3] * 4  # the resumed process captures again (epoch 2), and only then
    eager = torch.load(tmp_path / "runs/eager/model.pt")["model"]
    expected = pd.read_csv(tmp_path / "runs/eager/metrics.csv").drop(columns="epoch_seconds")
    for name in ("captured", "split"):
        weights = torch.load(tmp_path / f"runs/{name}/model.pt")["model"]
        assert all(torch.equal(weights[k], eager[k]) for k in eager), name
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / f"runs/{name}/metrics.csv").drop(columns="epoch_seconds"),
                                      expected, check_exact=True)


@pytest.mark.parametrize(("changes", "message"), [
    (dict(optimizer="adamw"), "cuda_graph supports SGD .* got 'adamw'"),
    (dict(compile="reduce-overhead"), "compile 'reduce-overhead' captures CUDA graphs too"),
])
def test_a_captured_step_refuses_what_it_cannot_capture(data_root, tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        train(config(data_root, tmp_path, epochs=1, cuda_graph=True, **changes))


def test_a_captured_step_refuses_the_exp_projector(data_root, tmp_path):
    teacher = tmp_path / "runs/teacher/model.pt"
    train(config(data_root, tmp_path, name="teacher", epochs=1))
    with pytest.raises(ValueError, match='cannot capture the "exp" orthogonal projector'):
        train(config(data_root, tmp_path, epochs=1, cuda_graph=True, method="vkd", teacher="resnet8",
                     teacher_checkpoint=str(teacher), method_options={"vkd_method": "exp"}))


def test_on_a_gpu_the_optimizer_steps_fused_and_as_the_unfused_one():
    torch.manual_seed(0)
    weights = [torch.randn(5, 3), torch.randn(3)]
    grads = [torch.randn_like(w) for w in weights]
    updated = {}
    for device in ("cpu", "cuda"):  # "cuda" only chooses the fused step; it runs here on the CPU
        parameters = [torch.nn.Parameter(w.clone()) for w in weights]
        optimizer = build_optimizer(parameters, "sgd", 0.1, 5e-4, 0.9, torch.device(device))
        assert bool(optimizer.defaults.get("fused")) == (device == "cuda") and optimizer.defaults["nesterov"]
        for _ in range(3):
            for parameter, grad in zip(parameters, grads, strict=True):
                parameter.grad = grad.clone()
            optimizer.step()
        updated[device] = parameters
    for a, b in zip(updated["cpu"], updated["cuda"], strict=True):
        torch.testing.assert_close(a, b)
    assert "fused" not in build_optimizer([torch.nn.Parameter(weights[0])], "lamb", 0.1, 0, 0.9,
                                          torch.device("cuda")).defaults


def test_non_finite_loss_stops_with_a_clear_message(data_root, tmp_path):
    cfg = config(data_root, tmp_path, name="nan", lr=1e30, epochs=3)
    with pytest.raises(NonFiniteLossError, match=r"nan, epoch 1: non-finite loss .*no epoch ended"):
        train(cfg)


def test_train_command_explains_missing_data_and_weights(tmp_path, monkeypatch, tiny_archive, capsys):
    base = ["train", "-s", "out_dir", str(tmp_path / "runs"), "-s", "epochs", "1", "-s", "batch_size", "2",
            "-s", "progress", "false", "-s", "data_root", str(tmp_path / "data")]
    monkeypatch.delenv(data.ARCHIVE_ENV, raising=False)
    assert main(base) == 2
    assert capsys.readouterr().err.startswith(f"error: CIFAR-10 (JPEG) not found; looked in: {tmp_path / 'data'}")
    monkeypatch.setenv(data.ARCHIVE_ENV, str(tiny_archive))
    missing = tmp_path / "teacher.pt"
    distilled = ["-s", "method", "kd", "-s", "teacher", "resnet8", "-s", "teacher_checkpoint", str(missing)]
    assert main([*base, *distilled]) == 2
    assert f"error: no checkpoint at {missing}" in capsys.readouterr().err
    torch.save({"model": timm.create_model("resnet20", num_classes=2).state_dict(), "arch": "resnet20"}, missing)
    assert main([*base, *distilled]) == 2
    assert capsys.readouterr().err.startswith(f"error: {missing}'s weights do not fit the CifarResNet (it holds a "
                                              f"'resnet20'): ")
    assert main([*base, *distilled, "-s", "teacher", "resnet20", "-s", "teacher_sha256", "f" * 64]) == 2
    assert f"error: checksum mismatch for {missing}: expected sha256 {'f' * 64}" in capsys.readouterr().err
    missing.write_bytes(missing.read_bytes()[:1000])  # a copy that was cut off
    assert main([*base, *distilled]) == 2
    assert capsys.readouterr().err.startswith(f"error: {missing} is not a checkpoint torch.load can read")
    assert not (tmp_path / "runs").exists()  # no run folder for a run that could not start


def test_a_run_whose_checkpoint_was_cut_off_is_refused_naming_it(data_root, tmp_path):
    cfg = config(data_root, tmp_path, name="cut", epochs=2)
    train(cfg, stop_after_epoch=1)
    checkpoint = tmp_path / "runs/cut/checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:4096])  # copied from a disk that filled up, say
    with pytest.raises(CheckpointMismatchError, match=re.escape(f"{checkpoint} is not a checkpoint torch.load can")):
        train(cfg)


def test_probes_are_recorded_and_survive_resume(data_root, tmp_path):
    def probe(distiller):
        assert not distiller.training and not torch.is_grad_enabled()
        return {"norm": float(distiller.student.fc.weight.norm())}

    cfg = config(data_root, tmp_path, name="probed", epochs=2)
    train(cfg, stop_after_epoch=1, probe=probe)
    train(cfg, probe=probe)
    records = json.loads((tmp_path / "runs/probed/probes.json").read_text())
    assert [r["epoch"] for r in records] == [0, 1, 2] and all(r["norm"] > 0 for r in records)
    train(config(data_root, tmp_path, name="every-step", epochs=1), probe=probe, probe_every=1)
    records = json.loads((tmp_path / "runs/every-step/probes.json").read_text())
    assert [r["step"] for r in records] == [0, 1, 2, 3]  # 6 training images, batch 2


def test_deit_recipe_on_an_imagefolder_is_reproducible(data_root, tmp_path):
    """RandAugment and random erasing draw from Python's / torch's streams, Mixup from NumPy's: all seeded."""
    folder = data.cifar10_jpeg_dir(data_root)
    recipe = dict(dataset="imagefolder", data_root=str(folder), student="deit_tiny_distilled_patch16_224",
                  student_options={"img_size": 32, "patch_size": 8, "depth": 1}, image_size=32,
                  auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0, label_smoothing=0.1,
                  optimizer="adamw", lr=5e-4, weight_decay=0.05, schedule="cosine", epochs=2)
    for workers in (0, 1):
        runs = [pd.read_csv(tmp_path / f"runs/{name}{workers}/metrics.csv").drop(columns="epoch_seconds")
                for name in ("first", "second")
                if train(config(data_root, tmp_path, name=f"{name}{workers}", workers=workers, **recipe))]
        pd.testing.assert_frame_equal(*runs)


def test_resume_refuses_other_settings_but_not_cosmetic_ones(data_root, tmp_path):
    train(config(data_root, tmp_path, name="same", epochs=1))
    assert train(config(data_root, tmp_path, name="same", epochs=1, progress=True))["epochs"] == 1
    with pytest.raises(ValueError, match=r"belongs to a run with other settings \(\['lr'\]\)"):
        train(config(data_root, tmp_path, name="same", epochs=1, lr=0.1))


def test_run_digests_name_a_file_however_it_is_spelt_and_wherever_the_checkout_lies(tmp_path, monkeypatch):
    from vkd import paths
    from vkd.gan import GANConfig

    def digest(root, kind=TrainConfig, **settings):
        monkeypatch.setattr(paths, "project_root", lambda: root)
        return kind(**settings).digest()

    here, moved = tmp_path / "vkd", tmp_path / "elsewhere" / "vkd"
    teacher = "runs/teachers/teacher-resnet32x4-1234abcd/model.pt"
    spelt = {digest(here, teacher_checkpoint=teacher), digest(here, teacher_checkpoint=str(here / teacher)),
             digest(here, teacher_checkpoint=f"./runs/../{teacher}"),
             digest(moved, teacher_checkpoint=str(moved / teacher))}
    assert len(spelt) == 1
    assert digest(here, teacher_checkpoint=teacher.replace("1234abcd", "5678ef90")) not in spelt
    outside = str(tmp_path / "weights.pt")  # a file outside the checkout stays absolute: moving the checkout keeps it
    assert digest(here, teacher_checkpoint=outside) == digest(moved, teacher_checkpoint=outside)
    assert digest(here, data_root=str(here / "data")) == digest(here) != digest(here, data_root=str(tmp_path / "data"))
    assert (digest(here, GANConfig, teacher_checkpoint=str(here / "data/teachers/resnet32x4_cifar10-jpeg.pt"))
            == digest(moved, GANConfig))


def test_finished_run_is_reused_not_trained_again(data_root, tmp_path):
    first = train(config(data_root, tmp_path, epochs=1))
    (tmp_path / "runs/run/checkpoint.pt").unlink()
    assert train(config(data_root, tmp_path, epochs=1)) == first
    assert not (tmp_path / "runs/run/checkpoint.pt").exists()  # nothing was trained
    with pytest.raises(ValueError, match=r"batch_size 64 exceeds the 6 training images"):
        train(config(data_root, tmp_path, name="big", batch_size=64))


def test_train_command_reads_a_config_and_refuses_unknown_settings(data_root, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(f"out_dir: {tmp_path / 'runs'}\ndata_root: {data_root}\nstudent: resnet8\nepochs: 1\n"
                    "batch_size: 2\nprogress: false\n")
    assert main(["train", "--config", str(path), "-s", "lr", "0.01", "--named", "cli"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["name"].startswith("cli-") and summary["epochs"] == 1
    assert json.loads((tmp_path / "runs" / summary["name"] / "summary.json").read_text())["config"]["lr"] == 0.01
    assert main(["train", "--config", str(path), "-s", "learning_rate", "0.01"]) == 2
    assert "unknown TrainConfig setting(s) 'learning_rate'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "gan"])
@pytest.mark.parametrize("text, message", [
    ("epochs: [1,\n", "is not valid YAML at line 2, column 1: expected the node content"),
    ("- epochs: 1\n", "holds the list [{'epochs': 1}]; expected name: value pairs"),
    ("1: 2\n", "has names that are not text, [1]; expected name: value pairs"),
])
def test_a_config_file_that_is_not_yaml_field_value_pairs_is_refused_in_one_line(command, text, message, tmp_path,
                                                                                 capsys):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert main([command, "--config", str(path)]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {path} {message}"), line


@pytest.mark.parametrize("argv", [
    ["train", "--stop-after-epoch", "0"], ["eval", "model.pt", "--batch", "0"], ["eval", "model.pt", "--workers", "-1"],
    ["bench", "projectors", "--student-dims", "192", "0"], ["bench", "projectors", "--reps", "0"],
    ["bench", "train", "--steps", "0"], ["bench", "train", "--batch", "ten"], ["bench", "gan", "--head-dim", "-1"],
    ["bench", "deit", "--image-size", "0"],
])
def test_a_count_below_its_least_value_is_a_usage_error_naming_the_option(argv, capsys):
    with pytest.raises(SystemExit) as exit_status:
        main(argv)
    assert exit_status.value.code == 2
    option = next(word for word in reversed(argv) if word.startswith("--"))
    least = 0 if option in ("--workers", "--head-dim") else 1
    assert f"argument {option}: expected an integer of at least {least}, got {argv[-1]!r}" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["train", "-s", "epochs", "[1,"], ["gan", "-s", "epochs", "[1,"], ["run", "01", "-p", "epochs", "[1,"],
    ["eval", "model.pt", "-o", "img_size", "{"], ["bench", "train", "--option", "vkd_weight", "["],
    ["bench", "train", "--compile", "["],
])
def test_an_option_value_that_is_not_yaml_is_a_usage_error_naming_the_option(argv, capsys):
    with pytest.raises(SystemExit) as exit_status:
        main(argv)
    assert exit_status.value.code == 2
    pair = f"{argv[-3]} {argv[-2]} {argv[-1]!r}" if argv[-3].startswith("-") else f"{argv[-2]}: {argv[-1]!r}"
    assert f"{pair} is not valid YAML at line 1, column {len(argv[-1]) + 1}" in capsys.readouterr().err


@pytest.mark.parametrize("command, kind", [("train", TrainConfig), ("gan", GANConfig)])
def test_the_help_of_train_and_gan_lists_every_field_with_its_default(command, kind, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # one line: argparse would otherwise wrap inside a value
    with pytest.raises(SystemExit) as exit_status:
        main([command, "--help"])
    assert exit_status.value.code == 0
    help_text = capsys.readouterr().out
    for name, value in vars(kind()).items():
        assert f"{name}={value!r}" in help_text


@pytest.mark.parametrize("setting, message", [
    (["student", "resnet9"], "unknown model 'resnet9': expected one of vkd's CIFAR models resnet8, resnet20"),
    (["teacher", "resnet33x4"], "unknown model 'resnet33x4'"),
    (["method", "vkdx"], "unknown method 'vkdx'; expected one of ('ce', 'kd'"),
    (["method_options", "{vkd_wieght: 2}"], "unknown method option(s) ['vkd_wieght']"),
    (["method_options", "{vkd_weight: two}"], "method options: vkd_weight expects float, got 'two' (str)"),
    (["method_options", "{vkd_norm: zca}"], "unknown normalisation 'zca'; expected one of ('none', 'l2'"),
    (["method_options", "{srd_projector: cnn}"], "unknown projector 'cnn'"),
])
def test_a_config_with_an_unknown_model_method_or_option_is_refused_when_made(setting, message, capsys):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig.from_values(**{setting[0]: yaml.safe_load(setting[1])})
    assert main(["train", "-s", *setting]) == 2
    assert message in capsys.readouterr().err
    if setting[0] in ("student", "teacher", "method"):
        assert main(["bench", "train", f"--{setting[0]}", setting[1], "--steps", "1"]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("command, settings, message", [
    ("train", {"method": "kd"}, "method 'kd' distils from a teacher: set teacher"),
    ("train", {"method": "vkd", "teacher": "resnet8"}, "teacher 'resnet8' needs teacher_checkpoint"),
    ("train", {"compile": "fast"}, "compile: expected true, false or one of"),
    ("train", {"cuda_graph": True, "optimizer": "adamw"}, "cuda_graph supports SGD"),
    ("gan", {"method": "kd"}, "unknown GAN method 'kd'"),
    ("gan", {"iterations": 5}, "iterations (5) must be a multiple of eval_every"),
    ("gan", {"norm": "whitening"}, "unknown normalisation 'whitening'"),
    ("gan", {"distance": "l1"}, "unknown distance 'l1'"),
    ("gan", {"fid_features": "resnet20"}, "fid_features must be 'inception', 'teacher' or 'ARCH:CHECKPOINT'"),
    ("train", {"epochs": "ten"}, "TrainConfig: epochs expects int, got 'ten' (str)"),
    ("train", {"amp": 1, "teacher": 3}, "teacher expects str | None, got 3 (int); amp expects bool, got 1 (int)"),
    ("gan", {"iterations": 1.5}, "GANConfig: iterations expects int, got 1.5 (float)"),
    ("train", {"fraction": 1.5}, "TrainConfig: fraction must be in (0, 1], got 1.5"),
    ("train", {"batch_size": 0, "schedule": "step"},
     "batch_size must be at least 1, got 0; schedule must be one of ('multistep', 'cosine'), got 'step'"),
    ("train", {"dataset": "cifar11"}, "dataset must be one of ('cifar10', 'cifar10-jpeg', 'cifar100', 'imagefolder')"),
    ("gan", {"eval_every": 0}, "GANConfig: eval_every must be at least 1, got 0"),
    ("gan", {"checkpoint_every": 0}, "GANConfig: checkpoint_every must be at least 1, got 0"),
    ("train", {"optimizer": "adamm"}, "optimizer must be a timm optimizer name, e.g. 'sgd' or 'adamw'"),
    ("train", {"milestones": [150, 180, 210]}, "milestones must be increasing fractions of the run in (0, 1]"),
    ("train", {"milestones": [0.75, 0.5]}, "milestones must be increasing fractions of the run in (0, 1]"),
    ("gan", {"lr_d": 0, "betas": [0.9]}, "lr_d must be positive, got 0; betas must be two values in [0, 1)"),
    ("gan", {"z_dim": 0, "ema_decay": 1.5}, "z_dim must be at least 1, got 0; ema_decay must be in [0, 1)"),
    ("train", {"method": "kd", "teacher": "resnet20", "teacher_checkpoint": "t.pt",
               "method_options": {"kd_weight": -1, "temperature": 0}},
     "method options: kd_weight must be at least 0, got -1; temperature must be positive, got 0"),
    ("train", {"weight_decay": -1e-4, "ema_decay": 1.0},
     "weight_decay must be at least 0, got -0.0001; ema_decay must be in [0, 1), got 1.0"),
    ("train", {"epochs": 4, "warmup_epochs": 4, "gamma": 0},
     "gamma must be in (0, 1], the multistep schedule's decay factor, got 0; warmup_epochs must be at least 0 and "
     "below epochs (4), got 4"),
    ("train", {"image_size": 0, "workers": -1}, "image_size must be at least 1, got 0; workers must be at least 0"),
    ("train", {"name": "../elsewhere", "seed": -1},
     "name must be a folder name under out_dir (not empty, not absolute, no '..'), got '../elsewhere'; seed must be "
     "in [0, 2**32) (NumPy's seeds), got -1"),
    ("gan", {"name": "", "teacher_sha256": "abc123"},
     "GANConfig: name must be a folder name under out_dir (not empty, not absolute, no '..'), got ''; teacher_sha256 "
     "must be 64 hex digits, as sha256sum prints them, got 'abc123'"),
])
def test_a_config_that_cannot_train_is_refused_when_made(command, settings, message, capsys):
    """Before any data is read: `python -m vkd train` (`gan`) answers with the reason, not a traceback from the run."""
    with pytest.raises(ValueError, match=re.escape(message)):
        {"train": TrainConfig, "gan": GANConfig}[command].from_values(**settings)
    overrides = [word for key, value in settings.items() for word in ("-s", key, json.dumps(value))]
    assert main([command, *overrides]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("settings, message", [
    ({"student_options": {"depthh": 4}}, "student 'resnet8' does not take the arguments {'depthh': 4}"),
    ({"drop_path": 0.1}, "student 'resnet8' does not take the arguments {'drop_path_rate': 0.1}"),
    ({"student": "resnet8x4", "teacher": "resnet20", "method": "vkd"}, "the student has 256 features, the teacher 64"),
])
def test_models_that_cannot_train_as_configured_are_refused_in_one_line(data_root, tmp_path, settings, message, capsys):
    """Found only once the models are built (after the data are read): still no traceback from `vkd train`."""
    teacher = tmp_path / "resnet20.pt"  # weights for the tiny archive's 2 classes
    torch.save(timm.create_model("resnet20", num_classes=2).state_dict(), teacher)
    settings = {"out_dir": str(tmp_path / "runs"), "data_root": str(data_root), "student": "resnet8", "epochs": 1,
                "batch_size": 2, "teacher_checkpoint": str(teacher) if "teacher" in settings else None, **settings}
    assert main(["train", *(word for key, value in settings.items() for word in ("-s", key, json.dumps(value)))]) == 2
    assert message in capsys.readouterr().err


def test_an_interrupted_train_many_leaves_no_training_process_behind(data_root, tmp_path, monkeypatch):
    started, start = [], launch._start
    monkeypatch.setattr(launch, "_start", lambda *args: started.append(start(*args)) or started[-1])

    def interrupted(seconds):  # Ctrl-C, or a notebook's interrupt, while the runs train
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "time", SimpleNamespace(sleep=interrupted))
    configs = [config(data_root, tmp_path, name=f"i{seed}", seed=seed, epochs=100) for seed in (0, 1)]
    try:
        with pytest.raises(KeyboardInterrupt):
            train_many(configs, processes=2)
        assert len(started) == 2 and all(process.poll() is not None for process in started)
    finally:
        for process in started:
            process.kill()


def test_a_run_failing_in_train_many_is_named_with_the_end_of_its_log(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ARCHIVE_ENV, raising=False)  # no data anywhere: each process stops at once
    configs = [config(tmp_path / "no-data", tmp_path, name=f"f{seed}", seed=seed) for seed in (0, 1)]
    with pytest.raises(RuntimeError) as failure:
        train_many(configs, processes=2)
    for name in ("f0", "f1"):
        assert f"{name} (exit 2)" in str(failure.value)
    assert str(failure.value).count("CIFAR-10 (JPEG) not found") == 2  # the tail of each run's train.log


def test_runs_in_parallel_processes_match_runs_in_this_process(data_root, tmp_path):
    configs = [config(data_root, tmp_path, name=f"p{seed}", seed=seed, epochs=2) for seed in (0, 1)]
    parallel = train_many(configs, processes=2)
    assert [s["name"] for s in parallel] == ["p0", "p1"]
    assert (tmp_path / "runs/p1/config.json").is_file() and (tmp_path / "runs/p1/train.log").is_file()
    alone = train_many([replace(c, out_dir=str(tmp_path / "alone")) for c in configs])
    for a, b in zip(parallel, alone, strict=True):
        assert a["last_acc"] == b["last_acc"]
        ma = pd.read_csv(tmp_path / "runs" / a["name"] / "metrics.csv")
        mb = pd.read_csv(tmp_path / "alone" / b["name"] / "metrics.csv")
        pd.testing.assert_series_equal(ma.train_loss, mb.train_loss, rtol=1e-4)


def test_exported_half_precision_weights_load_with_their_checksum(data_root, tmp_path, capsys):
    assert main(["export", str(tmp_path / "runs/run"), str(tmp_path / "teacher.pt")]) == 2  # not trained yet
    assert "no finished run (model.pt) at" in capsys.readouterr().err
    train(config(data_root, tmp_path, epochs=1))
    info = export_weights(tmp_path / "runs/run", tmp_path / "teacher.pt")
    state = torch.load(tmp_path / "teacher.pt")
    assert state["arch"] == "resnet8" and all(v.dtype == torch.float16 for v in state["model"].values()
                                               if v.is_floating_point())
    original = timm.create_model("resnet8", num_classes=2)
    load_weights(original, tmp_path / "runs/run/model.pt")
    exported = timm.create_model("resnet8", num_classes=2)
    assert load_weights(exported, tmp_path / "teacher.pt", expected_sha256=info["sha256"]) == info["sha256"]
    for (name, a), b in zip(original.state_dict().items(), exported.state_dict().values(), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)
    assert main(["export", str(tmp_path / "runs/run"), str(tmp_path)]) == 2
    refusal = f"error: {tmp_path} is a folder: give the file to write, e.g. {tmp_path / 'teacher.pt'}"
    assert refusal in capsys.readouterr().err


def test_files_named_on_the_command_line_are_relative_to_the_working_directory(data_root, tmp_path, monkeypatch,
                                                                              capsys):
    train(config(data_root, tmp_path, epochs=1))
    monkeypatch.chdir(tmp_path / "runs")
    assert main(["export", "run", "teacher.pt"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(tmp_path / "runs/teacher.pt")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "runs/teacher.pt", "--dataset", "cifar10-jpeg", "--data-root", str(data_root)]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(tmp_path / "runs/teacher.pt")


def test_eval_command_reproduces_the_runs_test_accuracy(data_root, tmp_path, capsys):
    summary = train(config(data_root, tmp_path, epochs=1))
    args = ["eval", str(tmp_path / "runs/run/model.pt"), "--dataset", "cifar10-jpeg", "--data-root", str(data_root),
            "--device", "cpu"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["arch"] == "resnet8" and result["images"] == 6 and result["ignored_keys"] == []
    assert result["test_acc"] == summary["last_acc"] and result["test_top5"] == 100.0
    assert main(["eval", str(tmp_path / "nothing.pt"), "--dataset", "cifar10-jpeg"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_status:  # a usage error, before the checkpoint is read
        main(["eval", str(tmp_path / "runs/run/model.pt"), "--dataset", "cifar7"])
    assert exit_status.value.code == 2
    assert "invalid choice: 'cifar7'" in (usage := capsys.readouterr().err) and "imagefolder" in usage
    other_model = ["--model", "resnet20", "--dataset", "cifar10-jpeg", "--data-root", str(tmp_path / "no data")]
    assert main(["eval", str(tmp_path / "runs/run/model.pt"), *other_model]) == 2  # weights first, then data
    assert "model.pt lacks 72 of the model's weights (it holds a 'resnet8')" in capsys.readouterr().err


def test_summary_records_the_revision_the_run_started_with(data_root, tmp_path, monkeypatch):
    revisions = iter(["abc1234", "def5678+dirty"])  # the checkout changes while the run trains
    current = {"revision": next(revisions)}
    monkeypatch.setattr("vkd.engine.git_revision", lambda: current["revision"])

    def edit_the_checkout(distiller):
        current["revision"] = next(revisions, current["revision"])
        return {}

    summary = train(config(data_root, tmp_path, name="revision", epochs=1), probe=edit_the_checkout)
    assert summary["git_revision"] == "abc1234"


def test_progress_bars_follow_the_environment_switch(monkeypatch):
    monkeypatch.setenv("VKD_PROGRESS", "0")  # what batch notebook runs set for their kernel
    assert not TrainConfig().progress
    monkeypatch.setenv("VKD_PROGRESS", "1")
    assert TrainConfig().progress


def test_bench_train_times_each_setup_and_the_captured_steps():
    from vkd.bench import bench_train

    table = bench_train("resnet8", "resnet8", batch=4, steps=1, cuda_graph=True)
    assert list(table.setup) == ["student alone (ce)", "vkd, cached teacher", "vkd, teacher on the fly",
                                 "student alone (ce), captured", "vkd, cached teacher, captured"]
    assert (table.ms_per_step > 0).all() and table.time_vs_student_alone.iloc[0] == 1
    with pytest.raises(ValueError, match="captures CUDA graphs too"):
        bench_train("resnet8", "resnet8", batch=4, steps=1, compile="reduce-overhead", cuda_graph=True)


def test_bench_train_times_the_captured_steps_replays_not_their_capture(monkeypatch):
    from vkd import bench

    captures, timing = [], bench.time_interleaved
    record = engine._record_eagerly
    monkeypatch.setattr(engine, "_record_eagerly", lambda step, warmup: captures.append(warmup) or record(step, warmup))

    def timed_after_the_captures(steps, **options):
        assert len(captures) == 2, "the captured steps are timed from their first call, the capture"
        seconds = timing(steps, **options)
        assert len(captures) == 2, "a timed call captured again"
        return seconds

    monkeypatch.setattr(bench, "time_interleaved", timed_after_the_captures)
    bench.bench_train("resnet8", "resnet8", batch=4, steps=2, cuda_graph=True)


def test_the_captured_step_check_finds_no_difference_on_the_cpu_and_catches_an_undone_warm_up(monkeypatch, capsys):
    from vkd.bench import captured_step_difference

    assert captured_step_difference("resnet8", "resnet8", batch=4, steps=4)["max_abs_difference"] == 0
    assert main(["bench", "train", "--student", "resnet8", "--teacher", "resnet8", "--batch", "4", "--steps", "1",
                 "--cuda-graph"]) == 0
    assert "captured vs eager step, 5 steps from the same weights: largest parameter difference 0 (0 of" in \
        capsys.readouterr().out
    capture = engine.CapturedStep.__init__

    def keeping_the_warm_up(self, step, state, frozen, device, warmup=3):  # restores nothing after its warm-up
        capture(self, step, list, frozen, device, warmup)

    monkeypatch.setattr(engine.CapturedStep, "__init__", keeping_the_warm_up)
    assert captured_step_difference("resnet8", "resnet8", batch=4, steps=4)["relative"] > 1e-3
