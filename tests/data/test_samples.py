import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from hfp8.data.sample_config import SampleConfig
from hfp8.data.samples import SampleError, SampleFolder

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
SMALL = SampleConfig(resize=40, crop=32, batch_size=4)


def _normalize(pixels: np.ndarray, mean=MEAN, std=STD) -> torch.Tensor:
    """Reference ToTensor + Normalize in float64: (H, W[, C]) uint8 -> (C, H, W)."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    values = (pixels.astype(np.float64) / 255.0 - mean) / std
    return torch.from_numpy(values.transpose(2, 0, 1)).float()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= atol


def _small(array: np.ndarray, size=(64, 48)) -> Image.Image:
    return Image.fromarray(array).resize(size, Image.BILINEAR)


def _write_npy(folder: Path, count: int, shape=(2, 3)) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = [np.full(shape, i, dtype=np.float64) + np.arange(np.prod(shape)).reshape(shape)
              for i in range(count)]
    for i, array in enumerate(arrays):
        np.save(folder / f"s{i:02d}.npy", array)
    return arrays


def _batches(folder):
    return [b.clone() if torch.is_tensor(b) else tuple(t.clone() for t in b) for b in folder]


def _jpeg_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "_source.jpg"
    _small(data.chelsea()).save(path, quality=90)
    return path.read_bytes()


@pytest.fixture()
def mixed(tmp_path):
    """Images of several formats, nested folders, hidden entries and a text file."""
    root = tmp_path / "mixed"
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / ".hidden_dir").mkdir()
    _small(data.astronaut()).save(root / "a.png")
    _small(data.chelsea()).save(root / "B.JPG", quality=95)
    _small(data.astronaut()).save(root / "nested" / "c.bmp")
    _small(data.chelsea()).save(root / "nested" / "deeper" / "d.webp", lossless=True)
    _small(data.camera()).save(root / "nested" / "e.jpeg")
    (root / ".hidden.png").write_bytes((root / "a.png").read_bytes())
    (root / ".hidden_dir" / "f.png").write_bytes((root / "a.png").read_bytes())
    (root / "notes.txt").write_text("not a sample")
    return root


def test_default_transform_matches_a_hand_computation(tmp_path):
    image = Image.fromarray(data.chelsea())  # 451 x 300
    image.save(tmp_path / "cat.png")
    (batch,) = list(SampleFolder(tmp_path, SampleConfig()))
    # Short side 300 -> 256, long side int(256 * 451 / 300) = 384; crop box left 80, top 16.
    resized = image.resize((384, 256), Image.BILINEAR)
    expected = _normalize(np.asarray(resized)[16:240, 80:304])
    assert batch.shape == (1, 3, 224, 224) and batch.dtype == torch.float32
    _assert_close(batch[0], expected, 1e-6)


def test_greyscale_and_custom_normalization(tmp_path):
    grey = _small(data.camera())
    grey.save(tmp_path / "grey.png")
    config = SampleConfig(resize=None, crop=None, channels=1, mean=(0.5,), std=(0.25,))
    (batch,) = list(SampleFolder(tmp_path, config))
    _assert_close(batch[0], _normalize(np.asarray(grey), 0.5, 0.25), 1e-6)
    (rgb,) = list(SampleFolder(tmp_path, SampleConfig(resize=None, crop=None)))
    expected = _normalize(np.repeat(np.asarray(grey)[:, :, None], 3, axis=2))
    _assert_close(rgb[0], expected, 1e-6)


def test_rgba_drops_alpha_and_palette_converts_quietly(tmp_path):
    rgb = np.asarray(_small(data.astronaut()))
    alpha = np.zeros(rgb.shape[:2], dtype=np.uint8)
    alpha[:, :20] = 255
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "a_rgba.png")
    palette = _small(data.chelsea()).quantize(16)
    palette.info["transparency"] = bytes([0] + [255] * 15)  # per-entry alpha, stored in tRNS
    palette.save(tmp_path / "b_palette.png")
    config = SampleConfig(resize=None, crop=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (batch,) = list(SampleFolder(tmp_path, config))
    _assert_close(batch[0], _normalize(rgb), 1e-6)
    with Image.open(tmp_path / "b_palette.png") as reopened:
        assert reopened.mode == "P"
        colours = np.asarray(reopened.convert("RGBA"))[:, :, :3]
    _assert_close(batch[1], _normalize(colours), 1e-6)


def test_lossless_formats_agree_and_discovery_order(mixed):
    folder = SampleFolder(mixed, SampleConfig(resize=None, crop=None, batch_size=8))
    names = [p.relative_to(mixed).as_posix() for p in folder.files]
    assert names == ["B.JPG", "a.png", "nested/c.bmp", "nested/deeper/d.webp", "nested/e.jpeg"]
    (batch,) = list(folder)
    assert batch.shape == (5, 3, 48, 64)
    _assert_close(batch[1], batch[2], 0)  # PNG == BMP
    assert (batch[0] - batch[3]).abs().mean() < 0.05  # JPEG ~ lossless WebP, same picture
    flat = SampleFolder(mixed, SampleConfig(resize=None, crop=None, recursive=False))
    assert [p.name for p in flat.files] == ["B.JPG", "a.png"]


def test_tensor_files_are_used_as_is(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(12, dtype=np.int16).reshape(3, 2, 2))
    torch.save(torch.linspace(0, 1, 12, dtype=torch.float64).reshape(3, 2, 2), tmp_path / "b.pt")
    (batch,) = list(SampleFolder(tmp_path, SampleConfig(batch_size=2)))
    assert batch.dtype == torch.float32 and batch.shape == (2, 3, 2, 2)
    assert torch.equal(batch[0], torch.arange(12, dtype=torch.float32).reshape(3, 2, 2))
    assert torch.equal(batch[1], torch.linspace(0, 1, 12, dtype=torch.float64).float()
                       .reshape(3, 2, 2))


def test_int32_and_int64_tensor_files_are_token_ids_and_stay_integers(tmp_path):
    np.save(tmp_path / "a.npy", np.array([5, 0, 91], dtype=np.int32))
    torch.save(torch.tensor([7, 8, 2**40]), tmp_path / "b.pt")
    (batch,) = list(SampleFolder(tmp_path, SampleConfig(batch_size=2)))
    assert batch.dtype == torch.int64
    assert batch.tolist() == [[5, 0, 91], [7, 8, 2**40]]


def test_batching_and_reiteration(tmp_path):
    arrays = _write_npy(tmp_path, 10)
    folder = SampleFolder(tmp_path, SampleConfig(batch_size=4))
    assert len(folder) == 3 and folder.num_samples == 10
    first = _batches(folder)
    assert [b.shape[0] for b in first] == [4, 4, 2]
    assert torch.equal(torch.cat(first), torch.from_numpy(np.stack(arrays)).float())
    second = _batches(folder)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    one, two = iter(folder), iter(folder)  # independent passes
    assert torch.equal(next(one), next(two)) and torch.equal(next(one), first[1])


def test_seeded_subset(tmp_path):
    _write_npy(tmp_path, 10)

    def subset(seed, count=4):
        folder = SampleFolder(tmp_path, SampleConfig(num_samples=count, seed=seed))
        return [p.name for p in folder.files], folder

    names, folder = subset(0)
    assert len(names) == 4 and names == sorted(names) and folder.num_samples == 4
    assert subset(0)[0] == names
    assert subset(1)[0] != names
    batch = torch.cat(list(folder))
    expected = torch.stack([torch.from_numpy(np.load(tmp_path / n)).float() for n in names])
    assert torch.equal(batch, expected)
    assert len(subset(0, count=50)[0]) == 10


def test_workers_give_identical_batches(mixed):
    (mixed / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    serial = SampleFolder(mixed, SampleConfig(resize=40, crop=32, batch_size=2))
    threaded = SampleFolder(mixed, SampleConfig(resize=40, crop=32, batch_size=2, workers=2))
    with pytest.warns(RuntimeWarning):
        expected = _batches(serial)
    with pytest.warns(RuntimeWarning):
        got = _batches(threaded)
    assert [b.shape[0] for b in got] == [2, 2, 1]
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    for batch in threaded:  # stopping early must not hang or break the next pass
        break
    assert all(torch.equal(a, b) for a, b in zip(expected, threaded, strict=True))


def test_corrupt_files_are_skipped_with_one_warning(tmp_path):
    jpeg = _jpeg_bytes(tmp_path / "..")
    root = tmp_path / "data"
    root.mkdir()
    for i in range(3):
        (root / f"good{i}.jpg").write_bytes(jpeg)
    (root / "random.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    torch.save({"not": "a tensor"}, root / "zdict.pt")
    (root / "zzz.npy").write_bytes(b"garbage")
    folder = SampleFolder(root, SMALL)
    assert folder.num_samples == 7
    with pytest.warns(RuntimeWarning, match=r"skipped 4 unusable sample files") as caught:
        batches = _batches(folder)
    assert len(caught) == 1
    message = str(caught[0].message)
    for name in ("random.jpg (UnidentifiedImageError", "truncated.jpg (OSError", "zdict.pt (ValueError"):
        assert name in message, message
    assert message.endswith(", ... (strict=True raises instead)")
    assert "zzz" not in message
    assert [b.shape[0] for b in batches] == [3]
    assert folder.num_samples == 3 and len(folder) == 1
    assert set(p.name for p in folder.skipped) == {"random.jpg", "truncated.jpg", "zdict.pt",
                                                    "zzz.npy"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # later passes stay quiet
        assert torch.equal(torch.cat(list(folder)), batches[0])
    strict = SampleFolder(root, SampleConfig(resize=40, crop=32, strict=True))
    with pytest.raises(SampleError, match=r"cannot use sample .*random\.jpg: "):
        list(strict)


def test_all_corrupt_is_an_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"nope")
    (tmp_path / "b.png").write_bytes(b"nope")
    folder = SampleFolder(tmp_path, SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SampleError, match=r"all 2 sample files in .* are unusable"):
            list(folder)
    with pytest.raises(SampleError, match="unusable"):
        list(folder)


def test_folder_problems(tmp_path):
    with pytest.raises(SampleError, match="does not exist"):
        SampleFolder(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(SampleError, match="is a file, not a folder"):
        SampleFolder(tmp_path / "file.png")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(SampleError, match="is empty"):
        SampleFolder(tmp_path / "empty")
    other = tmp_path / "other"
    other.mkdir()
    (other / "readme.txt").write_text("x")
    (other / ".DS_Store").write_bytes(b"x")
    with pytest.raises(SampleError, match=r"no samples found in .*other \(2 files, none with a "
                                          r"supported extension: \.bmp .*\.webp\)"):
        SampleFolder(other)


def test_labels(tmp_path):
    _write_npy(tmp_path / "dog", 3)
    _write_npy(tmp_path / "cat" / "inner", 2)
    np.save(tmp_path / "stray.npy", np.zeros((2, 3)))  # outside any class folder: ignored
    folder = SampleFolder(tmp_path, SampleConfig(labels=True, batch_size=4))
    assert folder.class_names == ("cat", "dog") and folder.num_samples == 5
    batches = list(folder)
    assert [t.tolist() for _, t in batches] == [[0, 0, 1, 1], [1]]
    assert batches[0][1].dtype == torch.int64 and batches[0][0].shape == (4, 2, 3)
    assert SampleFolder(tmp_path / "dog").class_names is None
    with pytest.raises(SampleError, match="one sub-folder per class"):
        SampleFolder(tmp_path / "dog", SampleConfig(labels=True))
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(SampleError, match="empty_class has no samples"):
        SampleFolder(tmp_path, SampleConfig(labels=True))


def test_shape_mismatch(tmp_path):
    _small(data.astronaut(), (40, 30)).save(tmp_path / "a.png")
    _small(data.astronaut(), (30, 40)).save(tmp_path / "b.png")
    with pytest.raises(SampleError, match=r"b\.png has shape \(3, 40, 30\) but .*a\.png has "
                                          r"\(3, 30, 40\)"):
        list(SampleFolder(tmp_path, SampleConfig(resize=None, crop=None)))
    assert len(list(SampleFolder(tmp_path, SampleConfig(resize=None, crop=24)))) == 1
    with pytest.raises(SampleError, match=r"a\.png: image is 40x30 pixels, smaller than crop 32"):
        list(SampleFolder(tmp_path, SampleConfig(resize=None, crop=32)))
    tensors = tmp_path / "tensors"
    tensors.mkdir()
    torch.save(torch.zeros(3, 4, 4), tensors / "a.pt")
    np.save(tensors / "b.npy", np.zeros((1, 4, 4)))
    with pytest.raises(SampleError, match=r"b\.npy has shape \(1, 4, 4\) but .* \(3, 4, 4\)"):
        list(SampleFolder(tensors))


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"batch_size": True}, "batch_size must be an integer"),
    ({"workers": -1}, "workers must be an integer >= 0"),
    ({"num_samples": 0}, "num_samples must be an integer >= 1 or None"),
    ({"resize": 100}, r"resize \(100\) must be >= crop \(224\)"),
    ({"channels": 2}, "channels must be 1 or 3"),
    ({"channels": 1}, "mean has 3 values but channels is 1"),
    ({"std": (1.0, 0.0, 1.0)}, "std must be at least 1e-06"),
    ({"std": (1e-45,)}, "std must be at least 1e-06"),
    ({"resize": 30000}, "resize must be at most 8192"),
    ({"crop": 9000, "resize": None}, "crop must be at most 8192"),
    ({"mean": (float("nan"),)}, "mean must be finite"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"strict": "yes"}, "strict must be True or False"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(SampleError, match=message):
        SampleConfig(**kwargs)


def test_config_normalizes_sequences():
    config = SampleConfig(mean=[0.5], std=[0.5])
    assert config.mean == (0.5,) and hash(config)


def test_the_0_2_path_hfp8_calibration_samplefolder_still_works_and_warns():
    import pytest

    import hfp8.calibration
    from hfp8.data import SampleConfig, SampleFolder

    with pytest.warns(DeprecationWarning, match="moved to hfp8.data.SampleFolder"):
        assert hfp8.calibration.SampleFolder is SampleFolder
    with pytest.warns(DeprecationWarning):
        assert hfp8.calibration.SampleConfig is SampleConfig
    with pytest.raises(AttributeError):
        hfp8.calibration.NoSuchName  # noqa: B018
