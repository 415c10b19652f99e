import tarfile

import numpy as np
import pytest
from PIL import Image


def write_archive(folder, per_class=3, classes=("cat", "dog"), seed=0):
    """A tiny cifar10-jpeg-style archive: cifar10/{train,test}/<class>/NNNN.jpg of class-dependent noise."""
    source = folder / "src" / "cifar10"
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for k, c in enumerate(classes):
            target = source / split / c
            target.mkdir(parents=True)
            for i in range(per_class):
                base = np.full((32, 32, 3), 60 + 120 * k, dtype=np.int64)
                image = np.clip(base + rng.integers(-50, 50, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(target / f"{i:04d}.jpg")
    archive = folder / "tiny-cifar10-jpeg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="cifar10")
    return archive


@pytest.fixture
def tiny_archive(tmp_path_factory):
    return write_archive(tmp_path_factory.mktemp("archive"))


@pytest.fixture(autouse=True)
def new_process_teacher_cache(monkeypatch):
    """Each test starts as a new process would: no teacher outputs shared from an earlier test's runs."""
    from vkd import engine

    monkeypatch.setattr(engine, "_last_teacher_outputs", None)
