"""vkd.checkpoints: weights files checked by their sha256 and refused with the reason."""

import pytest
import torch

from vkd.checkpoints import CheckpointMismatchError, load_weights


def test_teacher_checksum_and_missing_file(tmp_path):
    model = torch.nn.Linear(2, 2)
    path = tmp_path / "w.pt"
    torch.save({"model": {k: v.half() for k, v in model.state_dict().items()}}, path)
    digest = load_weights(torch.nn.Linear(2, 2), path)
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_weights(torch.nn.Linear(2, 2), path, expected_sha256="0" * 64)
    assert load_weights(torch.nn.Linear(2, 2), path, expected_sha256=digest) == digest
    assert load_weights(torch.nn.Linear(2, 2), path, expected_sha256=digest.upper()) == digest  # as some tools print
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_weights(model, tmp_path / "missing.pt")


def _truncated_checkpoint(path):
    torch.save({"model": torch.nn.Linear(64, 64).state_dict()}, path)
    path.write_bytes(path.read_bytes()[:3000])  # an interrupted copy


@pytest.mark.parametrize("write, message", [
    (lambda path: path.write_bytes(b""), "is not a checkpoint torch.load can read (truncated, or another kind of "
     "file?): EOFError: Ran out of input"),
    (lambda path: path.write_text("epochs: 3\n"), "is not a checkpoint torch.load can read"),
    (_truncated_checkpoint, "is not a checkpoint torch.load can read (truncated, or another kind of file?): "
     "RuntimeError: PytorchStreamReader failed reading zip archive"),
    (lambda path: torch.save([1, 2], path), "holds a list, not weights: expected a state dict"),
    (lambda path: torch.save({"model": 5, "epoch": 3}, path), "'s weights do not fit the Linear: Missing key(s)"),
])
def test_a_file_that_is_no_checkpoint_is_refused_naming_it(tmp_path, write, message):
    path = tmp_path / "w.pt"
    write(path)
    with pytest.raises(CheckpointMismatchError) as error:
        load_weights(torch.nn.Linear(2, 2), path)
    assert str(error.value).startswith(str(path)) and message in str(error.value), error.value
