import json

import pandas as pd
import pytest
import torch

from vkd import data
from vkd.engine import NonFiniteLossError, TrainConfig, load_weights, train


@pytest.fixture
def data_root(tmp_path, monkeypatch, tiny_archive):
    monkeypatch.setenv(data.ARCHIVE_ENV, str(tiny_archive))
    return tmp_path / "data"


def config(root, tmp_path, **changes):
    base = dict(name="run", out_dir=str(tmp_path / "runs"), data_root=str(root), student="resnet8", epochs=3,
                batch_size=2, lr=0.05, progress=False)
    return TrainConfig(**{**base, **changes})


def test_resumed_run_equals_uninterrupted_run(data_root, tmp_path):
    full = train(config(data_root, tmp_path, name="full"))
    interrupted = config(data_root, tmp_path, name="split")
    assert train(interrupted, stop_after_epoch=1) == {"stopped_after_epoch": 1}
    resumed = train(interrupted)
    assert resumed["best_acc"] == full["best_acc"] and resumed["last_acc"] == full["last_acc"]
    a = torch.load(tmp_path / "runs/full/model.pt")["model"]
    b = torch.load(tmp_path / "runs/split/model.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics_a = pd.read_csv(tmp_path / "runs/full/metrics.csv").drop(columns="epoch_seconds")
    metrics_b = pd.read_csv(tmp_path / "runs/split/metrics.csv").drop(columns="epoch_seconds")
    pd.testing.assert_frame_equal(metrics_a, metrics_b)


def test_every_method_distils_from_a_trained_teacher(data_root, tmp_path):
    teacher = train(config(data_root, tmp_path, name="teacher", student="resnet20", epochs=1))
    checkpoint = tmp_path / "runs/teacher/model.pt"
    for method in ("kd", "fitnet", "dkd", "srd", "vkd", "srd+dkd"):
        summary = train(config(data_root, tmp_path, name=method, method=method, epochs=1, teacher="resnet20",
                               teacher_checkpoint=str(checkpoint)))
        metrics = pd.read_csv(tmp_path / f"runs/{method}/metrics.csv")
        assert summary["teacher_sha256"] and summary["device"].startswith("cpu")
        terms = [c for c in metrics.columns if c.startswith("train_") and c not in ("train_loss", "train_acc")]
        assert len(terms) >= 2, (method, terms)  # CE plus the method's own term(s)
    assert json.loads((tmp_path / "runs/vkd/summary.json").read_text())["config"]["method"] == "vkd"
    assert teacher["epochs"] == 1


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


def test_non_finite_loss_stops_with_a_clear_message(data_root, tmp_path):
    cfg = config(data_root, tmp_path, name="nan", lr=1e30, epochs=3)
    with pytest.raises(NonFiniteLossError, match=r"nan, epoch 1: non-finite loss .*no epoch ended"):
        train(cfg)


def test_teacher_checksum_and_missing_file(data_root, tmp_path):
    model = torch.nn.Linear(2, 2)
    path = tmp_path / "w.pt"
    torch.save({"model": {k: v.half() for k, v in model.state_dict().items()}}, path)
    digest = load_weights(torch.nn.Linear(2, 2), path)
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_weights(torch.nn.Linear(2, 2), path, expected_sha256="0" * 64)
    assert load_weights(torch.nn.Linear(2, 2), path, expected_sha256=digest) == digest
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_weights(model, tmp_path / "missing.pt")


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


def test_resume_refuses_other_settings_but_not_cosmetic_ones(data_root, tmp_path):
    train(config(data_root, tmp_path, name="same", epochs=1))
    assert train(config(data_root, tmp_path, name="same", epochs=1, progress=True))["epochs"] == 1
    with pytest.raises(ValueError, match=r"belongs to a run with other settings \(\['lr'\]\)"):
        train(config(data_root, tmp_path, name="same", epochs=1, lr=0.1))
