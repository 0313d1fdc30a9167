"""Datasets in their real formats (written by the tests), subsets and the device loader."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from sharp import data as data_module
from sharp.data import DeviceLoader, balanced_subset, evaluation_subset, load_cifar, load_dataset, load_folder
from sharp.errors import SharpError


def _write_cifar10(root, n_per_batch=6, n_test=5):
    """A tiny CIFAR-10 in the real python-pickle layout, with torchvision's checksums matched."""
    import torchvision

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    expected = {}

    def dump(name, count, offset):
        images = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        labels = [(offset + i) % 10 for i in range(count)]
        with open(folder / name, "wb") as handle:
            # the archive's pickles are protocol 2 with str keys, as Python 2 wrote them
            record = {
                "batch_label": name,
                "data": images,
                "labels": labels,
                "filenames": [f"{name}_{i}.png" for i in range(count)],
            }
            pickle.dump(record, handle, protocol=2)
        expected[name] = (images.reshape(count, 3, 32, 32), labels)

    for i in range(1, 6):
        dump(f"data_batch_{i}", n_per_batch, i)
    dump("test_batch", n_test, 0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": names, "num_cases_per_batch": n_per_batch}, handle, protocol=2)

    def md5(name):
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    cls = torchvision.datasets.CIFAR10
    return expected, {
        "train_list": [[n, md5(n)] for n, _ in cls.train_list],
        "test_list": [[n, md5(n)] for n, _ in cls.test_list],
        "meta": {**cls.meta, "md5": md5("batches.meta")},
    }


def test_cifar10_reader_on_a_tiny_archive_in_the_real_format(tmp_path, monkeypatch):
    import torchvision

    expected, checksums = _write_cifar10(tmp_path)
    for attribute, value in checksums.items():
        monkeypatch.setattr(torchvision.datasets.CIFAR10, attribute, value)
    data = load_cifar("cifar10", tmp_path)
    assert data.train_images.shape == (30, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (5, 3, 32, 32)
    assert torch.equal(data.train_images[:6], torch.from_numpy(expected["data_batch_1"][0]))
    assert data.train_labels[:6].tolist() == expected["data_batch_1"][1]
    assert data.classes[0] == "airplane" and data.num_classes == 10
    pixels = data.train_images.double() / 255
    assert data.mean[1] == pytest.approx(pixels[:, 1].mean().item())
    assert data.std[2] == pytest.approx(pixels[:, 2].std(unbiased=False).item())


def test_cifar100_reader_on_a_tiny_archive_in_the_real_format(tmp_path, monkeypatch):
    import torchvision

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(2)
    written = {}
    for name, count in (("train", 12), ("test", 4)):
        images = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, count)]
        record = {
            "filenames": [f"{i}.png" for i in range(count)],
            "batch_label": name,
            "fine_labels": fine,
            "coarse_labels": [v // 5 for v in fine],
            "data": images,
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(record, handle, protocol=2)
        written[name] = (images.reshape(count, 3, 32, 32), fine)
    with open(folder / "meta", "wb") as handle:
        pickle.dump(
            {
                "fine_label_names": [f"class{i:02d}" for i in range(100)],
                "coarse_label_names": [f"super{i:02d}" for i in range(20)],
            },
            handle,
            protocol=2,
        )

    def md5(name):
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    cls = torchvision.datasets.CIFAR100
    monkeypatch.setattr(cls, "train_list", [["train", md5("train")]])
    monkeypatch.setattr(cls, "test_list", [["test", md5("test")]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5("meta")})
    data = load_dataset("cifar100", data_root=tmp_path)
    assert data.num_classes == 100 and data.classes[7] == "class07"
    assert torch.equal(data.train_images, torch.from_numpy(written["train"][0]))
    assert (
        data.train_labels.tolist() == written["train"][1] and data.test_labels.tolist() == written["test"][1]
    )


def test_missing_cifar_says_what_to_do(tmp_path):
    with pytest.raises(SharpError, match="--download"):
        load_cifar("cifar100", tmp_path)


def _write_folder(root, sizes=None, classes=("cat", "dog", "frog"), per_class=4, mode="RGB"):
    rng = np.random.default_rng(1)
    images = {}
    for split in ("train", "test"):
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                size = (sizes or {}).get((split, name, i), 12)
                shape = (size, size, 3) if mode == "RGB" else (size, size)
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(pixels, mode).save(root / split / name / f"{i:03d}.png")
                images[(split, label, i)] = pixels
    return images


def test_folder_dataset_decodes_then_loads_from_cache(tmp_path, monkeypatch):
    images = _write_folder(tmp_path)
    first = load_folder(tmp_path)
    assert first.classes == ["cat", "dog", "frog"]
    assert first.train_images.shape == (12, 3, 12, 12)
    assert first.test_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert np.array_equal(first.train_images[5].permute(1, 2, 0).numpy(), images[("train", 1, 1)])

    def no_decoding(path):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(data_module, "_decode", no_decoding)
    second = load_dataset(f"folder:{tmp_path}")
    assert torch.equal(first.train_images, second.train_images)
    assert second.mean == first.mean


def test_folder_cache_is_rebuilt_when_files_change(tmp_path):
    _write_folder(tmp_path)
    load_folder(tmp_path)
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(tmp_path / "train" / "cat" / "extra.png")
    assert len(load_folder(tmp_path).train_labels) == 13


def test_grayscale_folder_has_one_channel(tmp_path):
    _write_folder(tmp_path, mode="L")
    assert load_folder(tmp_path).in_channels == 1


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: _write_folder(root, classes=("only",)), "at least 2"),
        (lambda root: _write_folder(root, sizes={("train", "dog", 2): 16}), "mixed sizes"),
        (lambda root: (root / "train").mkdir(), "train/<class>/ and test/<class>/"),
        (
            lambda root: [(root / s / c).mkdir(parents=True) for s in ("train", "test") for c in "ab"],
            "no images",
        ),
    ],
)
def test_bad_folders_give_one_line_errors(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(SharpError, match=message) as info:
        load_folder(tmp_path)
    assert "\n" not in str(info.value)


def test_digits_load_offline_with_a_fixed_split(digits):
    assert digits.train_images.shape == (1437, 1, 8, 8)
    assert digits.test_images.shape == (360, 1, 8, 8)
    assert int(digits.train_images.max()) == 255
    assert torch.bincount(digits.test_labels).min() >= 35  # stratified
    again = data_module.load_digits()
    assert torch.equal(again.train_labels, digits.train_labels)


def test_synthetic_is_seeded_and_class_structured(synthetic):
    again = data_module.load_synthetic(256)
    assert torch.equal(again.train_images, synthetic.train_images)
    means = torch.stack(
        [synthetic.train_images[synthetic.train_labels == c].double().mean(0) for c in range(10)]
    )
    spread_between = means.std(0).mean()
    assert spread_between > 10  # class means differ by many grey levels


def test_balanced_subset_is_balanced_seeded_and_sorted(digits):
    subset = balanced_subset(digits.train_labels, 203, seed=3)
    counts = torch.bincount(digits.train_labels[subset], minlength=10)
    assert counts.sum() == 203 and counts.max() - counts.min() <= 1
    assert torch.equal(subset, balanced_subset(digits.train_labels, 203, seed=3))
    assert not torch.equal(subset, balanced_subset(digits.train_labels, 203, seed=4))
    assert torch.equal(subset, torch.sort(subset).values)
    assert len(torch.unique(subset)) == 203


def test_evaluation_sets_mix_the_classes_of_a_dataset_stored_class_by_class():
    labels = torch.arange(10).repeat_interleave(100)  # a folder dataset's order: class by class
    subset = evaluation_subset(labels, 500, seed=2)
    # the same examples as the balanced subset, in another order, the same for the same seed
    assert torch.equal(torch.sort(subset).values, balanced_subset(labels, 500, seed=2))
    assert torch.equal(subset, evaluation_subset(labels, 500, seed=2))
    assert not torch.equal(subset, torch.sort(subset).values)
    # every batch of 50 (Keskar's 10% BN groups) holds most classes; in index order each holds one
    assert min(len(torch.unique(labels[batch])) for batch in subset.split(50)) >= 8
    assert max(len(torch.unique(labels[batch])) for batch in balanced_subset(labels, 500, 2).split(50)) == 1
    whole = evaluation_subset(labels, None, seed=0)  # no subset: every example, mixed
    assert torch.equal(torch.sort(whole).values, torch.arange(1000))
    assert len(torch.unique(labels[whole[:100]])) == 10


def test_balanced_subset_when_a_class_is_short():
    labels = torch.tensor([0] * 3 + [1] * 50 + [2] * 50)
    counts = torch.bincount(labels[balanced_subset(labels, 30, seed=0)])
    assert counts.tolist() == [3, 14, 13] or counts.tolist() == [3, 13, 14]


def _loader(data, **kw):
    return DeviceLoader(data.train_images, data.train_labels, data.mean, data.std, seed=5, **kw)


@pytest.mark.parametrize("augment", [False, True])
def test_epoch_order_and_augmentation_do_not_depend_on_batching(synthetic, augment):
    loader = _loader(synthetic, augment=augment)

    def epoch(batch, micro):
        xs, ys = [], []
        for window in loader.windows(2, batch, micro):
            for x, y in window.micro_batches():
                xs.append(x)
                ys.append(y)
        return torch.cat(xs), torch.cat(ys)

    x1, y1 = epoch(256, 256)
    x2, y2 = epoch(40, 7)
    assert torch.equal(y1, y2) and torch.equal(x1, x2)
    x3, _ = epoch(256, 256)
    assert torch.equal(x1, x3)
    other_epoch = next(iter(loader.windows(3, 256, 256)))
    assert not torch.equal(next(other_epoch.micro_batches())[1], y1)


def test_crop_and_flip_match_a_per_image_reference(synthetic):
    images = synthetic.train_images[:16]
    offsets = torch.randint(0, 9, (16, 2))
    flips = torch.rand(16) < 0.5
    out = DeviceLoader._crop_and_flip(images, offsets, flips)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(16):
        dy, dx = offsets[i].tolist()
        expected = padded[i, :, dy : dy + 32, dx : dx + 32]
        if flips[i]:
            expected = expected.flip(-1)
        assert torch.equal(out[i], expected)


def test_normalization_and_channels_last(synthetic):
    loader = _loader(synthetic, channels_last=True, dtype=torch.float64)
    x, y = next(loader.batches(256))
    assert x.is_contiguous(memory_format=torch.channels_last) and x.dtype == torch.float64
    mean = torch.tensor(synthetic.mean, dtype=torch.float64)
    manual = (synthetic.train_images.double() / 255 - mean.view(1, 3, 1, 1)) / torch.tensor(
        synthetic.std, dtype=torch.float64
    ).view(1, 3, 1, 1)
    assert torch.allclose(x, manual, atol=1e-12)
    assert torch.equal(y, synthetic.train_labels)


def test_windows_short_last_batch_and_drop_last(synthetic):
    loader = _loader(synthetic)
    sizes = [w.count for w in loader.windows(0, 100, 30)]
    assert sizes == [100, 100, 56]
    assert [w.count for w in loader.windows(0, 100, 30, drop_last=True)] == [100, 100]
    window = next(loader.windows(0, 100, 30))
    assert [len(y) for _, y in window.micro_batches()] == [30, 30, 30, 10]
    resumed = [w.count for w in loader.windows(0, 100, 30, start=200)]
    assert resumed == [56]
