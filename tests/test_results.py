"""Results tables: the committed teachers' records."""

import shutil

from vkd.paths import project_root
from vkd.results import committed_teacher_row


def test_a_committed_teacher_brings_its_measured_row(tmp_path):
    teacher = project_root() / "data/teachers/resnet32x4_cifar10-jpeg.pt"
    row = committed_teacher_row("data/teachers/resnet32x4_cifar10-jpeg.pt")
    assert row["method"] == "teacher" and row["teacher"] == "resnet32x4"
    assert (row["best_top1"], row["last_top1"], row["epochs"], row["batch"]) == (91.95, 91.83, 240, 256)
    tampered = tmp_path / teacher.name  # same name, other bytes: not the teacher the record measured
    shutil.copy(teacher, tampered)
    with open(tampered, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert committed_teacher_row(tampered) is None
    assert committed_teacher_row(tmp_path / "unknown.pt") is None
