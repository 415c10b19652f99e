import multiprocessing
import sys
import tarfile

import numpy as np
import pytest
import torch

from vkd import data
from vkd.paths import save_atomic, save_json_atomic, write_atomic


def test_archive_is_extracted_once_and_decoded_to_tensors(tmp_path, monkeypatch, tiny_archive):
    monkeypatch.setenv(data.ARCHIVE_ENV, str(tiny_archive))
    root = tmp_path / "data"
    folder = data.cifar10_jpeg_dir(root)
    assert sorted(p.name for p in (folder / "train").iterdir()) == ["cat", "dog"]
    monkeypatch.delenv(data.ARCHIVE_ENV)
    assert data.cifar10_jpeg_dir(root) == folder  # no archive needed any more
    tensors = data.load_tensor_data("cifar10-jpeg", "train", root)
    assert tensors.images.shape == (6, 3, 32, 32) and tensors.images.dtype == torch.uint8
    assert tensors.labels.tolist() == [0, 0, 0, 1, 1, 1] and tensors.classes == ["cat", "dog"]
    assert (root / "cifar10-jpeg-train.pt").is_file()


def _extract_in_step(barrier, roots):
    """Extract into each of ``roots`` together with the other processes; exit with the number of failures."""
    failures = 0
    for root in roots:
        barrier.wait()  # every process starts on the same fresh folder at once
        try:
            data.cifar10_jpeg_dir(root)
        except OSError:
            failures += 1
    sys.exit(failures)


def test_processes_extracting_the_archive_at_once_all_get_one_whole_folder(tmp_path, monkeypatch, tiny_archive):
    """Runs started together (train_many, torchrun) extract the archive together; each gets the same complete
    folder. (A check-then-move once failed 38 of 600 such processes with FileExistsError, and left a nested
    cifar10/cifar10 in 20 folders.)"""
    monkeypatch.setenv(data.ARCHIVE_ENV, str(tiny_archive))
    roots = [tmp_path / f"data{i}" for i in range(40)]
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(4, timeout=60)
    workers = [context.Process(target=_extract_in_step, args=(barrier, roots)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert [worker.exitcode for worker in workers] == [0] * 4
    for root in roots:
        assert [p.name for p in root.iterdir()] == ["cifar10"]  # no temporary folder left behind
        assert sorted(p.name for p in (root / "cifar10").iterdir()) == ["test", "train"]


def test_missing_data_says_where_it_looked_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ARCHIVE_ENV, raising=False)
    with pytest.raises(data.DataNotFoundError) as error:
        data.image_dataset("cifar10-jpeg", "train", tmp_path)
    message = str(error.value)
    assert str(tmp_path / "cifar10") in message and "VKD_CIFAR10_ARCHIVE" in message and "download=True" in message
    with pytest.raises(data.DataNotFoundError, match="cifar100 not found.*download=True"):
        data.image_dataset("cifar100", "train", tmp_path)
    with pytest.raises(data.DataNotFoundError, match=r"no ImageFolder at .*imagenet/val"):
        data.imagefolder(tmp_path / "imagenet", "val")
    (tmp_path / "imagenet/val/n01440764").mkdir(parents=True)  # a class folder without images, then no class
    (tmp_path / "imagenet/val/n01440764/README.txt").write_text("not an image")
    with pytest.raises(data.DataNotFoundError, match=r"Found no valid file for the classes n01440764.* \(expected "):
        data.imagefolder(tmp_path / "imagenet", "val")
    (tmp_path / "imagenet/val/n01440764/README.txt").rename(tmp_path / "imagenet/val/README.txt")
    (tmp_path / "imagenet/val/n01440764").rmdir()
    with pytest.raises(data.DataNotFoundError, match=r"Couldn't find any class folder in .*imagenet/val.* \(expected "):
        data.imagefolder(tmp_path / "imagenet", "val")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        data.image_dataset("mnist", "train", tmp_path)


def test_an_archive_that_is_not_cifar10_says_so_and_extracts_nothing(tmp_path, monkeypatch):
    not_a_tar = tmp_path / "cifar10-jpeg.tar.gz"
    not_a_tar.write_bytes(b"not an archive")
    monkeypatch.setenv(data.ARCHIVE_ENV, str(not_a_tar))
    with pytest.raises(data.DataNotFoundError, match="is not a readable tar archive"):
        data.image_dataset("cifar10-jpeg", "train", tmp_path / "root")
    (tmp_path / "other/train/cat").mkdir(parents=True)  # train/ without test/
    (tmp_path / "other/train/cat/0.jpg").write_bytes(b"")
    with tarfile.open(tmp_path / "other.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "other", "other")
    monkeypatch.setenv(data.ARCHIVE_ENV, str(tmp_path / "other.tar.gz"))
    with pytest.raises(data.DataNotFoundError, match="holds no CIFAR-10 in ImageFolder layout: expected a folder with "
                                                     "train/ and test/"):
        data.image_dataset("cifar10-jpeg", "train", tmp_path / "root")
    assert not list((tmp_path / "root").iterdir())  # no half-extracted cifar10/ left behind


def test_stratified_fraction():
    targets = np.repeat(np.arange(10), 50)
    idx = data.stratified_indices(targets, 0.1, seed=3)
    assert np.bincount(targets[idx]).tolist() == [5] * 10
    assert np.array_equal(idx, data.stratified_indices(targets, 0.1, seed=3))
    assert not np.array_equal(idx, data.stratified_indices(targets, 0.1, seed=4))
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 1.5"):
        data.stratified_indices(targets, 1.5)


def test_tensor_loader_crops_and_flips_like_the_standard_augmentation():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    tensors = data.TensorData(images, torch.arange(16), [str(i) for i in range(16)])
    loader = data.TensorLoader(tensors, 16, (0, 0, 0), (1 / 255,) * 3, train=True, pad=2, seed=1)
    (batch, labels, index), = list(loader)
    assert torch.equal(index, labels)  # labels here are the sample positions
    padded = torch.nn.functional.pad(images.float(), (2, 2, 2, 2))
    for image, label in zip(batch, labels, strict=True):
        views = [padded[label, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        views += [v.flip(-1) for v in views]
        assert any(torch.equal(image, v) for v in views)
    again = next(iter(loader))[0]
    assert torch.equal(again, batch)  # same epoch, same draws
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))[0], batch)


def test_tensor_loader_draws_the_order_then_each_batch_crops_and_flips_in_turn():
    # the draw order fixes every committed result: the permutation, then per batch dy, dx, flip
    images = torch.randint(0, 256, (20, 3, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    tensors = data.TensorData(images, torch.arange(20), [str(i) for i in range(20)])
    loader = data.TensorLoader(tensors, 8, (0, 0, 0), (1 / 255,) * 3, train=True, pad=2, seed=3)
    loader.set_epoch(2)
    generator = data.epoch_generator(3, 2)
    order = torch.randperm(20, generator=generator)
    batches = list(loader)
    assert len(batches) == 2  # 20 samples in batches of 8, the last partial one dropped
    padded = torch.nn.functional.pad(images.float(), (2, 2, 2, 2))
    for i, (batch, labels, index) in enumerate(batches):
        assert torch.equal(index, order[i * 8:(i + 1) * 8]) and torch.equal(labels, index)
        dy, dx = torch.randint(0, 5, (8,), generator=generator), torch.randint(0, 5, (8,), generator=generator)
        flip = torch.rand(8, generator=generator) < 0.5
        for image, sample, y, x, f in zip(batch, index, dy, dx, flip, strict=True):
            crop = padded[sample, :, y:y + 6, x:x + 6]
            assert torch.equal(image, crop.flip(-1) if f else crop)


@pytest.mark.parametrize("train", [True, False])
def test_tensor_loader_batches_do_not_depend_on_the_chunk_size(train):
    images = torch.randint(0, 256, (45, 3, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    tensors = data.TensorData(images, torch.arange(45) % 7, [str(i) for i in range(7)])

    def epoch(chunk_size: int) -> list:
        loader = data.TensorLoader(tensors, 8, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), train=train, pad=2, seed=5,
                                   chunk_size=chunk_size)
        loader.set_epoch(1)
        chunk_sizes = [sizes for *_, sizes in loader.chunks()]
        assert all(len(sizes) == max(1, chunk_size // 8) for sizes in chunk_sizes[:-1])  # whole batches each
        return list(loader)

    one_batch_each = epoch(8)
    assert len(one_batch_each) == (5 if train else 6)  # 45 in batches of 8: the partial one kept for evaluation
    for chunk_size in (24, 1000):
        chunked = epoch(chunk_size)
        assert len(chunked) == len(one_batch_each)
        for got, expected in zip(chunked, one_batch_each, strict=True):
            assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))


def test_tensor_loader_eval_is_plain_normalisation():
    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    loader = data.TensorLoader(data.TensorData(images, torch.arange(5), []), 2, (0.5,) * 3, (0.25,) * 3, train=False)
    batches = list(loader)
    assert len(loader) == 3 and [b[2].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    torch.testing.assert_close(batches[0][0], (images[:2].float() / 255 - 0.5) / 0.25)


def test_fixed_test_batch(tmp_path, monkeypatch, tiny_archive):
    monkeypatch.setenv(data.ARCHIVE_ENV, str(tiny_archive))
    images, labels = data.test_batch("cifar10-jpeg", 4, seed=0, root=tmp_path)
    assert images.shape == (4, 3, 32, 32) and sorted(labels.tolist()) == [0, 0, 1, 1]
    again, _ = data.test_batch("cifar10-jpeg", 4, seed=0, root=tmp_path)
    assert torch.equal(images, again)
    assert data.stats("cifar100") == data.STATS["cifar100"] and data.stats("cifar10-jpeg") == data.STATS["cifar10"]


def test_deit_randaugment_survives_its_strongest_posterize():
    from PIL import Image
    from timm.data import create_transform

    data.use_compatible_posterize()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    transform = create_transform(32, is_training=True, auto_augment="rand-m9-mstd0.5-inc1")
    for _ in range(2000):  # the magnitude reaches 10 (0 bits kept) within a few hundred draws
        transform(image)
    black = data._posterize(image, 0)
    assert black.size == image.size and np.asarray(black).max() == 0


def _write_repeatedly(path, times):
    for i in range(times):
        save_atomic({"values": torch.arange(10_000) + i}, path)


def test_processes_writing_one_cache_at_once_leave_a_whole_file(tmp_path):
    path = tmp_path / "cache.pt"  # e.g. two training processes decoding the same dataset
    workers = [multiprocessing.get_context("fork").Process(target=_write_repeatedly, args=(path, 30))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert [worker.exitcode for worker in workers] == [0] * 4
    values = torch.load(path)["values"]
    assert torch.equal(values - values[0], torch.arange(10_000))
    assert [f.name for f in tmp_path.iterdir()] == ["cache.pt"]  # no temporary file left behind


def test_an_interrupted_write_keeps_the_previous_file_whole(tmp_path):
    path = tmp_path / "summary.json"  # e.g. Ctrl-C while a run writes its summary
    save_json_atomic({"best_acc": 50.0}, path)

    def interrupted(partial):
        partial.write_text('{"best_acc": 6')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, interrupted)
    assert path.read_text() == '{\n  "best_acc": 50.0\n}'
    assert [f.name for f in tmp_path.iterdir()] == ["summary.json"]  # the partial file is removed
