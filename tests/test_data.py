import hashlib
import pickle

import numpy as np
import pytest
import torch
from torchvision import datasets

from efficientml.data import DATASETS, DataMissingError, ImageDataset, TensorLoader, data_root, load_dataset


# -- loading through torchvision ---------------------------------------------------------------

def test_fashion_mnist_from_data_root(fashion_train, fashion_test):
    assert len(fashion_train) == 60000 and len(fashion_test) == 10000
    assert fashion_train.images.dtype == torch.uint8
    assert fashion_train.images.shape == (60000, 1, 28, 28)
    assert fashion_train.labels.dtype == torch.int64
    assert fashion_train.class_counts().tolist() == [6000] * 10
    assert fashion_train.classes[0] == "T-shirt/top" and len(fashion_train.classes) == 10
    spec = DATASETS["fashion-mnist"]
    assert fashion_train.shape == spec.shape and fashion_train.num_classes == spec.num_classes


def test_normalisation_constants_match_the_data(fashion_train):
    x = fashion_train.images.float() / 255
    assert x.mean().item() == pytest.approx(fashion_train.mean[0], abs=1e-3)
    assert x.std().item() == pytest.approx(fashion_train.std[0], abs=1e-3)


def test_root_comes_from_argument_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFICIENTML_DATA", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("EFFICIENTML_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data_root() == tmp_path / "cache" / "efficientml" / "data"


def test_missing_data_gives_one_clear_error(tmp_path):
    with pytest.raises(DataMissingError) as err:
        load_dataset("cifar10", train=False, root=tmp_path, download=False)
    msg = str(err.value)
    assert "cifar10" in msg and str(tmp_path / "cifar-10-batches-py") in msg
    assert "EFFICIENTML_DATA" in msg and "download" in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained traceback
    assert isinstance(err.value, FileNotFoundError)


def test_unknown_dataset_rejected():
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("imagenet-21k")


def _write_cifar10(root, n_per_file=20, seed=0):
    """Write a tiny data set in CIFAR-10's on-disk format: pickled dicts with str keys (the release
    was pickled by Python 2), uint8 rows of 3072 values and int labels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    arrays = {}
    for name in names:
        data = rng.integers(0, 256, size=(n_per_file, 3 * 32 * 32), dtype=np.uint8)  # rows: R plane, G, B
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_file)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data,
                         "filenames": ["x.png"] * n_per_file}, f, protocol=2)
        arrays[name] = (data, labels)
    meta = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": meta, "num_cases_per_batch": n_per_file, "num_vis": 3072}, f, protocol=2)
    return folder, arrays


def test_cifar10_path_reads_files_in_cifar10_format(tmp_path, monkeypatch):
    folder, arrays = _write_cifar10(tmp_path)
    # torchvision checks each file against the md5 of the real CIFAR-10 release; ours are small
    # files in the same format, so tell it their md5 instead (the reading code stays torchvision's).
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    monkeypatch.setattr(datasets.CIFAR10, "train_list", [[n, md5[n]] for n in sorted(md5) if n.startswith("data_batch")])
    monkeypatch.setattr(datasets.CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(datasets.CIFAR10, "meta", dict(datasets.CIFAR10.meta, md5=md5["batches.meta"]))

    train = load_dataset("cifar10", train=True, root=tmp_path, download=False)
    test = load_dataset("cifar10", train=False, root=tmp_path, download=False)
    assert len(train) == 100 and len(test) == 20
    assert train.images.shape == (100, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.classes[1] == "automobile" and train.hflip and train.crop_padding == 4
    assert train.shape == DATASETS["cifar10"].shape and train.num_classes == DATASETS["cifar10"].num_classes
    # first image of data_batch_1: 1024 red values, then green, then blue, row-major
    data, labels = arrays["data_batch_1"]
    assert torch.equal(train.images[0], torch.from_numpy(data[0].reshape(3, 32, 32)))
    assert train.labels[:20].tolist() == labels
    x, y = next(iter(TensorLoader(train, 8)))
    assert x.shape == (8, 3, 32, 32) and y.shape == (8,)


# -- subsets -----------------------------------------------------------------------------------

def test_subset_is_balanced_and_deterministic(fashion_train):
    a = fashion_train.subset(50, seed=1)
    b = fashion_train.subset(50, seed=1)
    c = fashion_train.subset(50, seed=2)
    assert len(a) == 500 and a.class_counts().tolist() == [50] * 10
    assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
    assert not torch.equal(a.indices, c.indices)
    assert len(set(a.indices.tolist())) == 500  # no example twice
    assert torch.equal(a.images, fashion_train.images[a.indices])
    assert torch.equal(a.labels, fashion_train.labels[a.indices])
    sub = a.subset(10, seed=0)  # a subset of a subset still points into the full split
    assert torch.equal(sub.images, fashion_train.images[sub.indices])


@pytest.mark.parametrize("n", [0, -3, 6001, 2.5])
def test_subset_rejects_impossible_sizes(fashion_train, n):
    with pytest.raises(ValueError):
        fashion_train.subset(n)


def test_subset_skip_holds_out_the_next_examples(fashion_train):
    train = fashion_train.subset(30, seed=4)
    held_out = fashion_train.subset(20, seed=4, skip=30)
    both = fashion_train.subset(50, seed=4)  # the same shuffle per class: the first 30, then 20
    assert held_out.class_counts().tolist() == [20] * 10
    assert not set(train.indices.tolist()) & set(held_out.indices.tolist())
    assert set(train.indices.tolist()) | set(held_out.indices.tolist()) == set(both.indices.tolist())
    assert torch.equal(held_out.images, fashion_train.images[held_out.indices])
    for skip in (-1, 1.5, 5990):
        with pytest.raises(ValueError):
            fashion_train.subset(20, seed=4, skip=skip)


def test_without_removes_exactly_the_other_examples(fashion_test):
    part = fashion_test.subset(7, seed=0)
    rest = fashion_test.without(part)
    assert len(rest) == len(fashion_test) - 70
    assert not set(rest.indices.tolist()) & set(part.indices.tolist())
    assert torch.equal(rest.images, fashion_test.images[rest.indices])
    assert torch.equal(rest.labels, fashion_test.labels[rest.indices])
    assert rest.indices.tolist() == sorted(rest.indices.tolist())  # the order kept
    shoes = fashion_test.select_classes([5, 7, 9])  # relabelled; indices still into the split
    fewer = shoes.without(part)
    assert len(fewer) == len(shoes) - 21 and fewer.class_counts().tolist() == [993] * 3
    with pytest.raises(ValueError, match="not a subset"):
        fashion_test.without(ImageDataset("other", False, part.images, part.labels, part.classes,
                                          part.mean, part.std))


def test_imagedataset_checks_its_tensors():
    with pytest.raises(TypeError, match="uint8"):
        ImageDataset("x", True, torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), ["a"], (0.5,), (0.5,))
    with pytest.raises(ValueError, match="labels"):
        ImageDataset("x", True, torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long),
                     ["a"], (0.5,), (0.5,))


# -- the tensor-resident loader ----------------------------------------------------------------

def test_loader_shapes_dtypes_and_normalisation(fashion_test):
    loader = TensorLoader(fashion_test, batch_size=256)
    assert len(loader) == 40  # ceil(10000 / 256)
    xs, ys = zip(*loader)
    assert all(x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28) for x in xs)
    assert all(y.dtype == torch.int64 for y in ys)
    assert xs[-1].shape[0] == 10000 - 39 * 256
    x = torch.cat(xs)
    assert torch.equal(torch.cat(ys), fashion_test.labels)  # no shuffle: the split's own order
    # the normalisation uses the training split's statistics; the test split's are close
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.02
    expected = (fashion_test.images[:5].float() / 255 - fashion_test.mean[0]) / fashion_test.std[0]
    torch.testing.assert_close(x[:5], expected)


def test_loader_epoch_is_a_permutation_and_repeatable(fashion_test):
    loader = TensorLoader(fashion_test.subset(30, seed=0), batch_size=64, shuffle=True, drop_last=False, seed=3)
    labels = lambda: torch.cat([y for _, y in loader])
    first = labels()
    assert sorted(first.tolist()) == sorted(loader.dataset.labels.tolist())
    assert torch.equal(first, labels())        # same epoch, same order
    loader.set_epoch(1)
    assert not torch.equal(first, labels())    # next epoch, new order
    assert len(TensorLoader(loader.dataset, 64, drop_last=True)) == 300 // 64


def _candidates(img, pad, hflip):
    """Every image RandomCrop(padding=pad) + RandomHorizontalFlip could make of ``img`` (C, H, W)."""
    c, h, w = img.shape
    padded = torch.nn.functional.pad(img, (pad, pad, pad, pad))
    crops = [padded[:, dy:dy + h, dx:dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
    return crops + ([cr.flip(2) for cr in crops] if hflip else [])


def test_augmentation_is_a_padded_crop_and_flip_of_the_image(fashion_test):
    ds = fashion_test.subset(4, seed=0)
    plain = TensorLoader(ds, 40, augment=False)
    aug = TensorLoader(ds, 40, augment=True, seed=7)
    (x0, y0), = list(plain)
    (x1, y1), = list(aug)
    assert torch.equal(y0, y1) and x1.shape == x0.shape
    assert not torch.equal(x0, x1)
    zero = (0 - ds.mean[0]) / ds.std[0]  # a padded (black) pixel after normalisation
    offsets_seen = set()
    for i in range(len(ds)):
        raw = ds.images[i].float()
        cands = _candidates(raw, ds.crop_padding, ds.hflip)
        match = [k for k, cand in enumerate(cands)
                 if torch.allclose((cand / 255 - ds.mean[0]) / ds.std[0], x1[i], atol=1e-5)]
        assert match, f"augmented image {i} is no padded crop or flip of the original"
        offsets_seen.add(match[0])
        assert x1[i].min() >= zero - 1e-5
    assert len(offsets_seen) > 5  # offsets and flips really vary


def test_augmentation_without_flip_for_digits(fashion_test):
    from dataclasses import replace
    ds = replace(fashion_test.subset(3, seed=0), hflip=False, crop_padding=0)
    x_aug, _ = next(iter(TensorLoader(ds, 30, augment=True)))
    x_plain, _ = next(iter(TensorLoader(ds, 30)))
    assert torch.equal(x_aug, x_plain)  # nothing to do: no padding, no flip
    assert DATASETS["mnist"].hflip is False and DATASETS["cifar10"].hflip is True


def test_loader_rejects_bad_arguments(fashion_test):
    with pytest.raises(ValueError):
        TensorLoader(fashion_test, batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        TensorLoader(fashion_test, batch_size=2.5)
    with pytest.raises(ValueError, match="gives no batch"):
        TensorLoader(fashion_test.subset(1, seed=0), batch_size=64, drop_last=True)
    with pytest.raises(TypeError, match="seed"):
        TensorLoader(fashion_test, seed="0")
    with pytest.raises(ValueError, match="epoch"):
        TensorLoader(fashion_test).set_epoch(-1)


def test_an_epoch_s_randomness_is_drawn_at_once(fashion_test):
    """``draw`` gives the whole epoch's order, crop offsets and flips (on the CPU, moved to the
    device in one transfer); batches are slices of it."""
    ds = fashion_test.subset(13, seed=0)                      # 130 images: batches 64, 64, 2
    loader = TensorLoader(ds, 64, shuffle=True, augment=True, seed=5)
    loader.set_epoch(2)
    drawn = loader.draw(loader.generator())
    assert sorted(drawn["order"].tolist()) == list(range(130))
    assert drawn["shift"].shape == (130, 2) and drawn["flip"].shape == (130,)
    assert int(drawn["shift"].min()) == 0 and int(drawn["shift"].max()) == 2 * ds.crop_padding
    assert all(t.device.type == "cpu" for t in drawn.values())
    batches = list(loader)
    assert [len(y) for _, y in batches] == [64, 64, 2]
    assert torch.equal(torch.cat([y for _, y in batches]), ds.labels[drawn["order"]])
    assert torch.equal(loader.batch(drawn, 2)[0], batches[2][0])


def test_loaders_name_every_device_and_make_no_float64(fashion_test):
    """The mistakes a GPU would catch, caught here (tests/device_checks.py)."""
    from device_checks import implicit_device_trap, no_float64
    from efficientml.data import SequenceTask, TokenBatches
    loaders = [TensorLoader(fashion_test.subset(20, seed=1), 64, shuffle=True, augment=True, seed=2),
               TensorLoader(fashion_test.subset(5, seed=1), 64),
               TokenBatches(torch.arange(1000) % 65, 16, 4, 3), SequenceTask(steps=3, min_length=3),
               SequenceTask("copy", steps=2)]
    with implicit_device_trap(), no_float64():
        for loader in loaders:
            assert len(list(loader)) == len(loader)
        fashion_test.subset(5, seed=0, skip=3)
        fashion_test.select_classes([1, 2]).subset(3)


@pytest.mark.parametrize("kw, match", [({"batch_size": 0}, "batch_size"), ({"steps": 0}, "steps"),
                                       ({"block_size": 0}, "block_size"), ({"batch_size": 2.0}, "batch_size")])
def test_token_batches_reject_bad_sizes(kw, match):
    """batch_size=0 used to be reported by fit as a divergence at epoch 0.0, steps=0 as a division by zero."""
    from efficientml.data import TokenBatches
    args = {"tokens": torch.arange(100), "block_size": 8, "batch_size": 4, "steps": 5} | kw
    with pytest.raises(ValueError, match=match):
        TokenBatches(**args)


def test_load_text_downloads_atomically_and_checks_the_file(tmp_path, monkeypatch):
    """An interrupted or damaged download leaves no file that a later call would read as the text."""
    import hashlib
    import io
    import urllib.request

    from efficientml import data
    good = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_MD5", hashlib.md5(good).hexdigest())

    class Interrupted(io.BytesIO):
        def read(self, *a):
            raise ConnectionResetError("connection lost halfway")

    for response in (Interrupted(good), io.BytesIO(good[:20])):       # cut off; wrong checksum
        monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: response)
        with pytest.raises(DataMissingError, match="could not be downloaded"):
            data.load_text(root=tmp_path, download=True)
        assert not list(tmp_path.rglob("*.*")), "nothing left behind"
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(good))
    assert data.load_text(root=tmp_path, download=True) == good.decode()
    assert [p.name for p in tmp_path.rglob("*.*")] == ["input.txt"]
