"""Image pre-scan: every unreadable file in one message, a cache keyed by size and mtime, clean loader errors."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from muva_core.data import scan as scan_mod
from muva_core.data.datasets import ImageReadError, load_dataset, read_image
from muva_core.data.samples import DatasetError
from muva_core.data.scan import UnreadableImagesError, require_readable, scan_images


def _truncated_jpeg(path: Path) -> Path:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 128), (10, 200, 30)).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def _all(ds):
    return [*ds.train, *ds.query, *ds.gallery]


@pytest.fixture
def broken_market(market_root: Path):
    """The fake Market-1501 with a non-image in train and a truncated JPEG in the gallery."""
    garbage = market_root / "bounding_box_train" / "0007_c3s1_000101_01.jpg"
    garbage.write_bytes(b"this is not a jpeg")
    truncated = _truncated_jpeg(market_root / "bounding_box_test" / "0010_c6s2_000076_01.jpg")
    return market_root, garbage, truncated


def test_two_corrupt_images_are_reported_in_one_message(broken_market):
    root, garbage, truncated = broken_market
    ds = load_dataset("market", root)  # names only: parsing does not open images
    samples = _all(ds)
    with pytest.raises(UnreadableImagesError) as err:
        require_readable(samples, progress=False, what="images of MA (train, query, gallery)")
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, DatasetError)  # the CLI prints it plainly
    assert f"2 of {len(samples)} images of MA (train, query, gallery) cannot be read" in msg
    assert str(garbage) in msg and str(truncated) in msg
    assert "1 truncated" in msg and "Truncated" in msg and "UnidentifiedImageError" in msg
    assert set(err.value.bad) == {str(garbage), str(truncated)}
    # the dataset's own verification reports both as well, in one error
    with pytest.raises(DatasetError) as err2:
        load_dataset("market", root, verify_images=True)
    assert str(garbage) in str(err2.value) and str(truncated) in str(err2.value)


def test_readable_split_passes_and_duplicates_are_scanned_once(market_root: Path):
    samples = _all(load_dataset("market", market_root))
    report = require_readable(samples + samples[:3], progress=False)
    assert report.ok and report.total == len(samples) and report.decoded == len(samples)
    assert "0 unreadable" in str(report)


def test_missing_file_and_plain_paths(market_root: Path, tmp_path: Path):
    good = market_root / "query" / "0002_c1s1_001051_00.jpg"
    gone = tmp_path / "gone.jpg"
    report = scan_images([good, str(gone)], progress=False)
    assert report.bad == {str(gone): "file does not exist"} and report.reasons() == {"missing": 1}


def test_second_scan_uses_the_cache_and_a_changed_file_is_decoded_again(broken_market, tmp_path, monkeypatch):
    root, garbage, truncated = broken_market
    samples = _all(load_dataset("market", root))
    cache = tmp_path / "cache" / "image-scan"
    calls: list[str] = []
    real = scan_mod.decode_image

    def counting(path):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(scan_mod, "decode_image", counting)
    first = scan_images(samples, cache_dir=cache, progress=False)
    assert first.decoded == len(samples) == len(calls) and first.cached == 0
    assert set(first.bad) == {str(garbage), str(truncated)}
    files = sorted(cache.glob("*.json"))
    assert [f.name for f in files] == ["market1501.json"]
    data = json.loads(files[0].read_text())  # plain JSON, no pickle
    assert data["format"] == scan_mod.CACHE_FORMAT and len(data["files"]) == len(samples)
    assert not list(cache.glob(".*.tmp"))  # written atomically, nothing left behind

    calls.clear()
    second = scan_images(samples, cache_dir=cache, progress=False)
    assert calls == [] and second.decoded == 0 and second.cached == len(samples)
    assert second.bad == first.bad  # bad results are cached too

    # repair the truncated file: new size and mtime -> decoded again, now readable
    from conftest import write_image

    write_image(truncated)
    st = truncated.stat()
    os.utime(truncated, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    calls.clear()
    third = scan_images(samples, cache_dir=cache, progress=False)
    assert calls == [str(truncated)] and third.decoded == 1 and set(third.bad) == {str(garbage)}


def test_truncated_file_fails_even_when_pil_is_told_to_load_truncated_images(tmp_path, monkeypatch):
    from PIL import ImageFile

    bad = _truncated_jpeg(tmp_path / "t.jpg")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    report = scan_images([bad], progress=False, workers=1)
    assert list(report.bad) == [str(bad)] and report.reasons() == {"truncated": 1}
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored after the scan


def test_parallel_and_serial_scans_agree(broken_market):
    root, _, _ = broken_market
    samples = _all(load_dataset("market", root))
    assert scan_images(samples, workers=1, progress=False).bad == scan_images(samples, workers=4, progress=False).bad


def test_long_lists_go_to_a_file(tmp_path, monkeypatch):
    monkeypatch.setattr(scan_mod, "MAX_LISTED", 2)
    paths = [tmp_path / f"missing{i}.jpg" for i in range(5)]
    with pytest.raises(UnreadableImagesError) as err:
        require_readable(paths, cache_dir=tmp_path / "scan", progress=False)
    msg = str(err.value)
    assert "5 of 5 images cannot be read" in msg and "and 3 more" in msg
    listing = Path(msg.split("the full list is in ")[1].split("\n")[0])
    assert listing.is_file() and len(listing.read_text().splitlines()) == 5


def test_loader_error_names_the_file_without_the_worker_traceback(broken_market):
    from torch.utils.data import DataLoader

    from muva_core.data.transforms import ReIDImageDataset

    root, garbage, _ = broken_market
    samples = [s for s in load_dataset("market", root).train if s.path == str(garbage)]
    with pytest.raises(ImageReadError) as err:
        read_image(garbage)
    assert str(err.value).startswith(f"cannot read image {garbage}: ")
    loader = DataLoader(ReIDImageDataset(samples), batch_size=1, num_workers=1)
    with pytest.raises(DatasetError) as err:
        next(iter(loader))
    msg = str(err.value)
    assert msg.startswith(f"cannot read image {garbage}: ") and "Traceback" not in msg, msg
    assert msg.endswith("(in DataLoader worker process 0)")
    assert isinstance(err.value, ValueError)
