"""vkd.checkpoints: weights files checked by their sha256 and refused with the reason."""

import pytest
import torch

from vkd.checkpoints import load_weights


def test_teacher_checksum_and_missing_file(tmp_path):
    model = torch.nn.Linear(2, 2)
    path = tmp_path / "w.pt"
    torch.save({"model": {k: v.half() for k, v in model.state_dict().items()}}, path)
    digest = load_weights(torch.nn.Linear(2, 2), path)
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_weights(torch.nn.Linear(2, 2), path, expected_sha256="0" * 64)
    assert load_weights(torch.nn.Linear(2, 2), path, expected_sha256=digest) == digest
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_weights(model, tmp_path / "missing.pt")
