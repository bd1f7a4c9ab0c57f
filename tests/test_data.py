"""Tests of mlopt.data: episodic sampling, Omniglot, mini-ImageNet, hyper-cleaning data."""

from __future__ import annotations

import gzip
import io
import itertools
import pickle
import struct
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlopt.data import (
    EpisodicSampler,
    MiniImageNetDataset,
    OneShotRun,
    Task,
    TaskLoader,
    corrupt_labels,
    load_digits_cleaning,
    load_miniimagenet_folder,
    load_miniimagenet_pickle,
    load_mnist_cleaning,
    load_omniglot,
    load_one_shot_runs,
    meta_batch,
    one_shot_error,
    read_idx,
)
from mlopt.errors import ConfigError

# ---------------------------------------------------------------- episodic sampling


@pytest.fixture
def toy() -> tuple[torch.Tensor, torch.Tensor]:
    """12 classes x 9 examples of distinct, non-symmetric 5x5 images, in float64."""
    n = 12 * 9
    x = torch.arange(n * 25, dtype=torch.float64).reshape(n, 1, 5, 5)
    y = torch.arange(n) % 12
    return x, y


def _index_of(x: torch.Tensor, img: torch.Tensor) -> int:
    hits = torch.nonzero((x == img).flatten(1).all(1)).flatten()
    assert len(hits) == 1
    return int(hits[0])


def test_sampler_task_structure(toy):
    x, y = toy
    sampler = EpisodicSampler((x, y), ways=5, shots=2, queries=3, seed=0)
    for i in range(10):
        task, info = sampler[i], sampler.task_info(i)
        assert task.support_x.shape == (10, 1, 5, 5) and task.query_x.shape == (15, 1, 5, 5)
        assert task.support_y.tolist() == [c for c in range(5) for _ in range(2)]
        assert task.query_y.tolist() == [c for c in range(5) for _ in range(3)]
        assert len(set(info.classes.tolist())) == 5
        assert set(info.support_indices.tolist()).isdisjoint(info.query_indices.tolist())
        for xs, ys, idx in (
            (task.support_x, task.support_y, info.support_indices),
            (task.query_x, task.query_y, info.query_indices),
        ):
            assert torch.equal(xs, x[idx])
            # every example of new label c comes from original class classes[c]
            assert torch.equal(y[idx], info.classes[ys])


def test_sampler_deterministic_per_seed_and_index(toy):
    x, y = toy
    a = EpisodicSampler((x, y), 5, 1, 2, seed=3)
    b = EpisodicSampler((x, y), 5, 1, 2, seed=3)
    late_first = b[7]
    in_order = list(itertools.islice(iter(a), 8))
    for got, want in zip(in_order[7], late_first, strict=True):
        assert torch.equal(got, want)
    other = EpisodicSampler((x, y), 5, 1, 2, seed=4)
    assert not torch.equal(other[7].support_x, late_first.support_x)
    assert not torch.equal(a[6].support_x, a[7].support_x)


def test_sampler_sequence_of_pairs_matches_tensors(toy):
    x, y = toy
    pairs = [(x[i], int(y[i])) for i in range(len(y))]
    t1 = EpisodicSampler(pairs, 4, 2, 2, seed=1)[5]
    t2 = EpisodicSampler((x, y), 4, 2, 2, seed=1)[5]
    for a, b in zip(t1, t2, strict=True):
        assert torch.equal(a, b)


def test_sampler_rotation_classes(toy):
    x, y = toy
    sampler = EpisodicSampler((x, y), 10, 2, 2, seed=0, augment="rotate")
    assert sampler.num_classes == 48
    seen = set()
    for i in range(20):
        task, info = sampler[i], sampler.task_info(i)
        pairs = list(zip(info.classes.tolist(), info.rotations.tolist(), strict=True))
        assert len(set(pairs)) == 10
        seen.update(info.rotations.tolist())
        for xs, ys, idx in (
            (task.support_x, task.support_y, info.support_indices),
            (task.query_x, task.query_y, info.query_indices),
        ):
            for img, label, j in zip(xs, ys, idx, strict=True):
                k = int(info.rotations[label]) // 90
                assert torch.equal(img, torch.rot90(x[j], k, dims=(-2, -1)))
        support = set(
            zip(
                info.support_indices.tolist(),
                info.rotations[task.support_y].tolist(),
                strict=True,
            )
        )
        query = set(
            zip(info.query_indices.tolist(), info.rotations[task.query_y].tolist(), strict=True)
        )
        assert support.isdisjoint(query)
    assert seen == {0, 90, 180, 270}


def test_sampler_groups_draw_each_task_from_one_group_at_one_rotation(toy):
    x, y = toy
    groups = ["a"] * 5 + ["b"] * 4 + ["c"] * 3  # c is too small for 4-way tasks
    sampler = EpisodicSampler((x, y), 4, 1, 2, seed=0, augment="rotate", groups=groups)
    drawn, turns = set(), set()
    for i in range(60):
        info = sampler.task_info(i)
        classes = info.classes.tolist()
        assert len(set(classes)) == 4 and len({groups[c] for c in classes}) == 1
        assert len(set(info.rotations.tolist())) == 1
        drawn.update(classes)
        turns.add(int(info.rotations[0]))
        task = sampler[i]
        for img, label, j in zip(task.query_x, task.query_y, info.query_indices, strict=True):
            k = int(info.rotations[label]) // 90
            assert torch.equal(img, torch.rot90(x[j], k, dims=(-2, -1)))
    assert drawn == set(range(9)) and turns == {0, 90, 180, 270}
    again = EpisodicSampler((x, y), 4, 1, 2, seed=0, augment="rotate", groups=groups)
    assert torch.equal(again.task_info(7).classes, sampler.task_info(7).classes)
    with pytest.raises(ConfigError, match="largest has 5"):
        EpisodicSampler((x, y), 6, 1, 2, groups=groups)
    with pytest.raises(ConfigError, match="one entry per class label"):
        EpisodicSampler((x, y), 2, 1, 2, groups=groups[:5])


def test_sampler_custom_augment_is_deterministic(toy):
    x, y = toy

    def noise(images, gen):
        return images + torch.randn(images.shape, generator=gen, dtype=images.dtype)

    a = EpisodicSampler((x, y), 3, 1, 1, seed=0, augment=noise)
    plain = EpisodicSampler((x, y), 3, 1, 1, seed=0)
    assert torch.equal(a[2].support_x, a[2].support_x)
    assert not torch.equal(a[2].support_x, plain[2].support_x)
    assert torch.equal(a[2].support_y, plain[2].support_y)


def test_meta_batch_and_task_loader(toy):
    x, y = toy
    sampler = EpisodicSampler((x, y), 3, 2, 1, seed=0, num_tasks=12)
    batch = meta_batch([sampler[0], sampler[1]])
    assert isinstance(batch, Task) and batch.support_x.shape == (2, 6, 1, 5, 5)
    loader = TaskLoader(sampler, 4, start=0)
    assert len(loader) == 3
    batches = list(loader)
    assert len(batches) == 3
    assert torch.equal(batches[2].query_x, meta_batch([sampler[i] for i in range(8, 12)]).query_x)
    infinite = TaskLoader(EpisodicSampler((x, y), 3, 2, 1, seed=0), 2, dtype=torch.float32)
    first = list(itertools.islice(iter(infinite), 5))
    assert first[4].support_x.dtype == torch.float32 and first[4].support_y.dtype == torch.long
    assert torch.equal(first[0].support_x, batch.support_x.float())
    with pytest.raises(TypeError):
        len(infinite)


def test_sampler_bad_input(toy):
    x, y = toy
    with pytest.raises(ConfigError, match="only 12 qualify"):
        EpisodicSampler((x, y), 13, 1, 1, seed=0)
    with pytest.raises(ConfigError, match="qualify"):
        EpisodicSampler((x, y), 5, 5, 5, seed=0)  # 9 examples per class < 10
    with pytest.raises(ConfigError, match="shots"):
        EpisodicSampler((x, y), 5, 0, 1, seed=0)
    with pytest.raises(ConfigError, match="len"):
        EpisodicSampler((x, y[:-1]), 5, 1, 1, seed=0)
    with pytest.raises(ConfigError, match="square"):
        EpisodicSampler((x.reshape(-1, 1, 25, 1), y), 2, 1, 1, seed=0, augment="rotate")[0]
    with pytest.raises(ConfigError, match="shapes"):
        meta_batch([EpisodicSampler((x, y), 2, 1, 1)[0], EpisodicSampler((x, y), 3, 1, 1)[0]])
    with pytest.raises(IndexError):
        EpisodicSampler((x, y), 2, 1, 1, num_tasks=3)[3]


# ---------------------------------------------------------------- Omniglot (real data)


@pytest.fixture(scope="module")
def small1(omniglot_root):
    return load_omniglot(omniglot_root, "background_small1")


@pytest.fixture(scope="module")
def runs(omniglot_root):
    return load_one_shot_runs(omniglot_root)


def test_omniglot_small_split_from_zip(small1):
    assert small1.images.shape == (2720, 1, 28, 28) and small1.images.dtype == torch.float32
    assert small1.num_classes == 136
    assert torch.bincount(small1.labels).tolist() == [20] * 136
    assert small1.alphabets == ["Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"]
    assert float(small1.images.min()) >= 0.0 and float(small1.images.max()) <= 1.0
    # inverted: background 0 (corners), strokes near 1
    assert float(small1.images[..., 0, 0].max()) == 0.0
    assert float(small1.images.amax(dim=(1, 2, 3)).min()) > 0.5
    for i in (0, 1000, 2719):
        alphabet, character = small1.characters[int(small1.labels[i])]
        assert f"/{alphabet}/{character}/" in small1.files[i]
    assert len(set(small1.characters)) == 136


def test_omniglot_metadata_and_held_out_characters(omniglot_root, small1):
    small2 = load_omniglot(omniglot_root / "images_background_small2.zip", "background_small2")
    assert small2.num_classes == 156
    assert set(small1.characters) & set(small2.characters) == {
        c for c in small1.characters if c[0] in ("Greek", "Latin")
    }
    # Greek and Latin hold the same drawings in both minimal splits (README): metadata aligns
    for alphabet in ("Greek", "Latin"):
        a, b = small1.select_alphabets([alphabet]), small2.select_alphabets([alphabet])
        assert a.characters == b.characters and torch.equal(a.images, b.images)
    train = small1.select_classes(range(100))
    test = small1.select_classes(range(100, 136))
    assert set(train.characters).isdisjoint(test.characters)
    assert len(train) == 2000 and len(test) == 720 and int(test.labels.max()) == 35
    with pytest.raises(ConfigError, match="unknown alphabets"):
        small1.select_alphabets(["Klingon"])
    task = EpisodicSampler(test, 20, 1, 5, seed=0, augment="rotate")[0]
    assert task.support_x.shape == (20, 1, 28, 28)


def test_omniglot_folder_cache_raw_size_and_layouts(omniglot_root, small1, tmp_path):
    raw = load_omniglot(omniglot_root, "background_small1", image_size=None, invert=False)
    assert raw.images.shape == (2720, 1, 105, 105)
    assert float(raw.images[..., 0, 0].min()) == 1.0  # white background, not inverted
    assert set(torch.unique(raw.images).tolist()) == {0.0, 1.0}  # binary drawings
    cached = load_omniglot(omniglot_root, "background_small1", cache_dir=tmp_path / "cache")
    assert (tmp_path / "cache" / "images_background_small1" / "Latin" / "character01").is_dir()
    assert torch.equal(cached.images, small1.images) and cached.characters == small1.characters
    # torchvision's layout: root/omniglot-py/images_background_small1/...
    (tmp_path / "omniglot-py").symlink_to(tmp_path / "cache")
    from_folder = load_omniglot(tmp_path, "background_small1")
    assert torch.equal(from_folder.labels, small1.labels)


def test_omniglot_missing_data_and_download_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="images_evaluation"):
        load_omniglot(tmp_path, "evaluation")
    with pytest.raises(ConfigError, match="split"):
        load_omniglot(tmp_path, "train")
    with pytest.raises(ConfigError, match="download=True supports"):
        load_omniglot(tmp_path, "background_small1", download=True)


def _fake_torchvision(monkeypatch, omniglot_class):
    """Put a stand-in ``torchvision.datasets`` (with ``Omniglot = omniglot_class``) in place."""
    torchvision, datasets = (
        types.ModuleType("torchvision"),
        types.ModuleType("torchvision.datasets"),
    )
    datasets.Omniglot, torchvision.datasets = omniglot_class, datasets
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)


def test_omniglot_download_through_torchvision(monkeypatch, tmp_path):
    calls = []

    class Omniglot:  # writes what torchvision's Omniglot(download=True) leaves on disk
        def __init__(self, root, background=True, download=False):
            calls.append((root, background, download))
            folder = "images_background" if background else "images_evaluation"
            base = Path(root) / "omniglot-py"
            base.mkdir(parents=True, exist_ok=True)
            alphabets = ("Alphabet_of_the_Magi", "Latin") if background else ("Atlantean",)
            with zipfile.ZipFile(base / f"{folder}.zip", "w") as archive:
                for a, c, k in itertools.product(alphabets, (1, 2), (1, 2, 3)):
                    png = io.BytesIO()
                    Image.new("L", (105, 105), 255 if k % 2 else 0).save(png, "PNG")
                    archive.writestr(
                        f"{folder}/{a}/character{c:02d}/{c}_{k:02d}.png", png.getvalue()
                    )
            with zipfile.ZipFile(base / f"{folder}.zip") as archive:
                archive.extractall(base)

    _fake_torchvision(monkeypatch, Omniglot)
    root = tmp_path / "new" / "omniglot"  # created by the download
    bg = load_omniglot(root, "background", download=True)
    assert calls == [(str(root), True, True)]
    assert (root / "omniglot-py" / "images_background" / "Latin" / "character02").is_dir()
    assert bg.num_classes == 4 and len(bg) == 12 and bg.images.shape == (12, 1, 28, 28)
    assert bg.alphabets == ["Alphabet_of_the_Magi", "Latin"]
    assert bg.files[0] == "Alphabet_of_the_Magi/character01/1_01.png"  # read from the folder
    ev = load_omniglot(root, "evaluation", download=True)
    assert calls[-1] == (str(root), False, True) and ev.characters[0] == (
        "Atlantean",
        "character01",
    )
    again = load_omniglot(root, "background", download=True)  # found on disk: no new download
    assert len(calls) == 2 and torch.equal(again.images, bg.images)


def test_omniglot_download_errors(monkeypatch, tmp_path):
    import urllib.error

    class Offline:
        def __init__(self, root, background=True, download=False):
            raise urllib.error.URLError("[Errno -2] Name or service not known")

    _fake_torchvision(monkeypatch, Offline)
    with pytest.raises(ConnectionError, match=r"images_evaluation\.zip.*network.*Name or service"):
        load_omniglot(tmp_path, "evaluation", download=True)

    class Corrupt:
        def __init__(self, root, background=True, download=False):
            raise RuntimeError("File not found or corrupted.")

    _fake_torchvision(monkeypatch, Corrupt)
    with pytest.raises(RuntimeError, match="could not fetch images_background.zip.*corrupted"):
        load_omniglot(tmp_path, "background", download=True)

    class Nothing:  # "succeeds" without writing the split
        def __init__(self, root, background=True, download=False):
            pass

    _fake_torchvision(monkeypatch, Nothing)
    with pytest.raises(FileNotFoundError, match="download left no images_background"):
        load_omniglot(tmp_path, "background", download=True)

    monkeypatch.setitem(sys.modules, "torchvision", None)  # not installed: import fails
    monkeypatch.delitem(sys.modules, "torchvision.datasets")
    with pytest.raises(ImportError, match=r"mlopt\[vision\]"):
        load_omniglot(tmp_path, "background", download=True)


def test_torchvision_omniglot_layout_matches_loader():
    """Where torchvision imports, its Omniglot class still writes what load_omniglot reads."""
    try:
        from torchvision.datasets import Omniglot
    except Exception as err:  # absent, or beside the CPU torch build (see ENVIRONMENT notes)
        pytest.skip(f"torchvision not importable: {err}")
    assert Omniglot.folder == "omniglot-py"
    assert set(Omniglot.zips_md5) == {"images_background", "images_evaluation"}
    assert "brendenlake/omniglot" in Omniglot.download_url_prefix


def test_one_shot_runs_answer_mapping(omniglot_root, runs):
    assert len(runs) == 20
    for run in runs:
        assert run.train_images.shape == (20, 1, 28, 28) and run.test_images.shape == (
            20,
            1,
            28,
            28,
        )
        assert sorted(run.answers.tolist()) == list(range(20))  # one query per class
    # run01/test/item01.png -> run01/training/class08.png, read from the raw file
    with zipfile.ZipFile(omniglot_root / "all_runs.zip") as archive:
        first = archive.read("run01/class_labels.txt").decode().splitlines()[0]
    assert first.split()[1].endswith("class08.png") and int(runs[0].answers[0]) == 7
    truth = {id(r.train_images): r.answers for r in runs}
    assert one_shot_error(lambda train, test: truth[id(train)], runs) == 0.0
    assert one_shot_error(lambda train, test: torch.zeros(len(test)), runs) == 95.0


def test_one_shot_nearest_neighbour_baseline(runs):
    def nearest(train, test):
        return torch.cdist(test.flatten(1).double(), train.flatten(1).double()).argmin(1)

    err = one_shot_error(nearest, runs)
    print(f"pixel-space 1-NN error on Lake's 20 runs (28x28, inverted): {err:.1f}%")
    assert 0.0 < err <= 100.0


def test_one_shot_error_checks_predictions():
    run = OneShotRun(torch.zeros(3, 1, 2, 2), torch.zeros(3, 1, 2, 2), torch.tensor([2, 0, 1]))
    assert one_shot_error(lambda a, b: [2, 0, 0], [run]) == pytest.approx(100 / 3)
    with pytest.raises(ConfigError, match="one index per test image"):
        one_shot_error(lambda a, b: torch.zeros(2), [run])
    with pytest.raises(ConfigError, match="no runs"):
        one_shot_error(lambda a, b: b, [])


# ---------------------------------------------------------------- mini-ImageNet


def test_miniimagenet_folder(tmp_path):
    colours = {"n02": (255, 0, 128), "n01": (10, 20, 30), "n03": (0, 255, 0)}
    sizes = [(100, 80), (84, 84), (500, 375)]
    for name, colour in colours.items():
        (tmp_path / name).mkdir()
        for k, size in enumerate(sizes):
            Image.new("RGB", size, colour).save(tmp_path / name / f"img{k}.png")
    Image.new("L", (30, 40), 77).save(tmp_path / "n03" / "grey.jpg")  # any mode, any size
    (tmp_path / "n03" / "notes.txt").write_text("not an image")
    ds = load_miniimagenet_folder(tmp_path, dtype=torch.float64)
    assert ds.class_names == ["n01", "n02", "n03"]
    assert len(ds) == 10 and ds.images.shape == (10, 3, 84, 84)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    img, label = ds[3]
    assert label == 1 and img.dtype == torch.float64
    expected = torch.tensor([1.0, 0.0, 128 / 255], dtype=torch.float64).view(3, 1, 1)
    assert torch.allclose(img, expected.expand(3, 84, 84), atol=0, rtol=0)
    assert torch.allclose(ds[6][0], torch.full((3, 84, 84), 77 / 255, dtype=torch.float64))


def test_miniimagenet_pickle_and_sampling(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(24, 84, 84, 3), dtype=np.uint8)
    perm = rng.permutation(24)
    class_dict = {"zebra": perm[:8].tolist(), "apple": perm[8:16].tolist(), "moth": perm[16:]}
    path = tmp_path / "mini-imagenet-cache-test.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"image_data": data, "class_dict": class_dict}, fh)
    ds = load_miniimagenet_pickle(path, dtype=torch.float64)
    assert ds.class_names == ["apple", "moth", "zebra"] and len(ds) == 24
    for label, name in enumerate(ds.class_names):
        for i in class_dict[name]:
            img, lab = ds[int(i)]
            assert lab == label
            want = torch.from_numpy(data[i]).permute(2, 0, 1).double() / 255
            assert torch.equal(img, want)
    task = EpisodicSampler(ds, 3, 2, 3, seed=0)[0]
    assert task.support_x.shape == (6, 3, 84, 84) and task.query_x.dtype == torch.float64
    normed = MiniImageNetDataset(ds.images, ds.labels, ds.class_names, normalize=True)
    assert normed.get_batch(torch.tensor([0])).shape == (1, 3, 84, 84)
    with open(tmp_path / "bad.pkl", "wb") as fh:
        pickle.dump({"images": data}, fh)
    with pytest.raises(ConfigError, match="image_data"):
        load_miniimagenet_pickle(tmp_path / "bad.pkl")


# ---------------------------------------------------------------- hyper-cleaning data


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("num_classes", [2, 10])
def test_corrupt_labels_exact_count_and_always_wrong(fraction, num_classes):
    y = torch.arange(1001) % num_classes
    noisy, mask = corrupt_labels(y, fraction, num_classes, seed=3)
    assert int(mask.sum()) == round(fraction * 1001)
    assert bool((noisy[mask] != y[mask]).all()) and torch.equal(noisy[~mask], y[~mask])
    assert int(noisy.min()) >= 0 and int(noisy.max()) < num_classes
    if num_classes == 2:
        assert torch.equal(noisy[mask], 1 - y[mask])
    again, mask2 = corrupt_labels(y, fraction, num_classes, seed=3)
    assert torch.equal(again, noisy) and torch.equal(mask2, mask)


def test_corrupt_labels_bad_input():
    with pytest.raises(ConfigError, match="num_classes"):
        corrupt_labels(torch.zeros(4, dtype=torch.long), 0.5, 1)
    with pytest.raises(ConfigError, match="fraction"):
        corrupt_labels(torch.zeros(4, dtype=torch.long), 1.5, 3)
    with pytest.raises(ConfigError, match="labels must lie"):
        corrupt_labels(torch.tensor([0, 3]), 0.5, 3)


def test_load_digits_cleaning():
    d = load_digits_cleaning(seed=0, dtype=torch.float64)
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (449, 449, 899)
    assert d.x_train.shape == (449, 64) and d.x_train.dtype == torch.float64
    assert float(d.x_test.min()) >= 0.0 and float(d.x_test.max()) <= 1.0
    assert int(d.corrupted.sum()) == 224
    assert bool((d.y_train[d.corrupted] != d.y_train_clean[d.corrupted]).all())
    assert torch.equal(d.y_train[~d.corrupted], d.y_train_clean[~d.corrupted])
    from sklearn.datasets import load_digits

    ref = torch.as_tensor(load_digits().data / 16.0)
    total = torch.cat([d.x_train, d.x_val, d.x_test])
    assert len(total) == len(ref) and torch.allclose(total.sum(0), ref.sum(0))
    assert torch.equal(load_digits_cleaning(seed=0).y_train, load_digits_cleaning(seed=0).y_train)


def _write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


@pytest.mark.parametrize("layout", ["flat-gz", "torchvision-raw"])
def test_load_mnist_cleaning_from_idx(tmp_path, layout):
    rng = np.random.default_rng(1)
    train_x = rng.integers(0, 128, size=(60, 28, 28)).astype(np.uint8) * 2  # even pixels
    test_x = rng.integers(0, 127, size=(30, 28, 28)).astype(np.uint8) * 2 + 1  # odd pixels
    train_y, test_y = np.arange(60) % 10, np.arange(30) % 10
    name = "MNIST" if layout == "flat-gz" else "FashionMNIST"
    folder = tmp_path if layout == "flat-gz" else tmp_path / name / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    gz = layout == "flat-gz"
    suffix = ".gz" if gz else ""
    _write_idx(folder / f"train-images-idx3-ubyte{suffix}", train_x, gz)
    _write_idx(folder / f"train-labels-idx1-ubyte{suffix}", train_y, gz)
    _write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", test_x, gz)
    _write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", test_y, gz)
    assert np.array_equal(read_idx(folder / f"t10k-images-idx3-ubyte{suffix}"), test_x)
    d = load_mnist_cleaning(tmp_path, name, seed=0, sizes=(20, 20, 10), dtype=torch.float64)
    assert d.x_train.shape == (20, 784) and d.x_test.shape == (10, 784)
    assert int(d.corrupted.sum()) == 10
    for xs, ys, source_x, source_y in (
        (d.x_train, d.y_train_clean, train_x, train_y),
        (d.x_val, d.y_val, train_x, train_y),
        (d.x_test, d.y_test, test_x, test_y),
    ):
        flat = torch.from_numpy(source_x.reshape(len(source_x), -1)).double() / 255
        for row, label in zip(xs, ys, strict=True):
            j = _index_of(flat, row)
            assert int(source_y[j]) == int(label)
    train_rows = {tuple(r.tolist()) for r in d.x_train}
    assert train_rows.isdisjoint(tuple(r.tolist()) for r in d.x_val)
    with pytest.raises(ConfigError, match="sizes"):
        load_mnist_cleaning(tmp_path, name, sizes=(50, 20, 10))


def test_mnist_cleaning_missing_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist_cleaning(tmp_path)
    with pytest.raises(ConfigError, match="MNIST"):
        load_mnist_cleaning(tmp_path, "KMNIST")
    (tmp_path / "junk").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ConfigError, match="magic"):
        read_idx(tmp_path / "junk")
