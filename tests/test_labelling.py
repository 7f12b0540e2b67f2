"""The batch-labelling engine: output schema, resume after a crash, shards, bad images and answers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from muva_core.data.samples import PARTS, Sample
from muva_core.grounding.base import GroundingBackend, PartBox
from muva_core.grounding.labelling import (
    LABEL_COLUMNS,
    LabellingError,
    label_dataset,
    label_dataset_distributed,
    merge_shards,
    parse_shard,
    select_shard,
    shard_from_env,
    shard_path,
    summarize_labels,
    wait_for_shards,
)
from muva_core.grounding.simulated import SimulatedExpert

W, H = 32, 64  # tiny person crops
N = 23


class Killed(BaseException):
    """Stands in for the process being killed (not an Exception: nothing may swallow it)."""


class Wrapper(GroundingBackend):
    """Counts the images it is asked about; can die after some batches or fail on chosen keys."""

    name = "synthetic"

    def __init__(self, inner, die_after=None, exc=Killed, fail_keys=(), answer=None):
        self.inner, self.die_after, self.exc, self.fail_keys, self.answer = inner, die_after, exc, set(fail_keys), answer
        self.batch_size = inner.batch_size
        self.calls = 0
        self.images = 0

    def ground(self, images, keys=None, parts=PARTS):
        if self.die_after is not None and self.calls >= self.die_after:
            raise self.exc("simulated crash")
        self.calls += 1
        if self.fail_keys & set(keys):
            raise RuntimeError(f"cannot process {sorted(self.fail_keys & set(keys))}")
        self.images += len(images)
        if self.answer is not None:
            return [self.answer(k) for k in keys]
        return self.inner.ground(images, keys, parts)


@pytest.fixture()
def dataset(tmp_path):
    """A fake synthetic domain: N tiny JPEGs, ground truth for them, samples (shuffled)."""
    root = tmp_path / "synth_A"
    rng = np.random.default_rng(0)
    samples, rows = [], []
    for i in range(N):
        rel = f"bounding_box_train/{i // 3:04d}_c{i % 2 + 1}s1_{i:06d}_00.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / rel)
        samples.append(Sample(str(root / rel), i // 3, i % 2, "synth_A", rel))
        top = rng.uniform(0, 8)
        for part, (y0, y1, x0, x1) in {"head": (0, 10, 11, 21), "upper": (8, 30, 6, 26), "legs": (28, 55, 8, 24),
                                       "person": (0, 55, 6, 26)}.items():
            rows.append(dict(relpath=rel, part=part, x0=x0, y0=y0 + top, x1=x1, y1=y1 + top, visible=1.0, img_w=W, img_h=H))
    pd.DataFrame(rows).to_parquet(root / "part_boxes.parquet")
    rng.shuffle(samples)
    return tmp_path, samples


def expert(tmp_path, batch_size=4):
    return SimulatedExpert(tmp_path, seed=5, batch_size=batch_size)


def same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.drop(columns="seconds").reset_index(drop=True), b.drop(columns="seconds").reset_index(drop=True))


def test_uninterrupted_run(dataset):
    tmp_path, samples = dataset
    out = tmp_path / "labels" / "boxes.parquet"
    table = label_dataset(samples, expert(tmp_path), out, progress=True)
    assert list(table.columns) == list(LABEL_COLUMNS) and len(table) == 3 * N
    assert table["key"].is_monotonic_increasing and all(t == PARTS for t in table.groupby("key")["part"].apply(tuple))
    assert (table["dataset"] == "synth_A").all() and (table["img_w"] == W).all() and (table["img_h"] == H).all()
    assert table["key"].eq("synth_A/" + table["relpath"]).all()
    assert (table["backend"] == "synthetic").all() and (table["seconds"] >= 0).all()
    assert set(table["status"]) <= {"ok", "clipped", "missing", "degenerate"}
    same(pd.read_parquet(out), table)
    assert not (tmp_path / "labels" / "boxes.parquet.parts").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["boxes.parquet"]
    # the answers are the expert's, in the image's pixels
    first = expert(tmp_path).ground(None, [table["key"][0]])[0]
    assert table.loc[0, "raw"] == first[0].raw


@pytest.mark.parametrize("exc,on_error", [(Killed, "record"), (RuntimeError, "raise")])
def test_resume_after_crash(dataset, exc, on_error):
    tmp_path, samples = dataset
    reference = label_dataset(samples, expert(tmp_path), tmp_path / "ref.parquet", progress=False)
    out = tmp_path / "boxes.parquet"
    dying = Wrapper(expert(tmp_path), die_after=3, exc=exc)
    with pytest.raises(exc, match="simulated crash"):
        label_dataset(samples, dying, out, flush_every=8, on_error=on_error, progress=False)
    parts_dir = tmp_path / "boxes.parquet.parts"
    chunks = sorted(parts_dir.glob("chunk-*.parquet"))
    assert not out.exists() and len(chunks) == 1  # 3 batches of 4 done, 8 images flushed, 4 lost with the crash
    assert pd.read_parquet(chunks[0])["key"].nunique() == 8
    again = Wrapper(expert(tmp_path))
    table = label_dataset(samples, again, out, flush_every=8, on_error=on_error, progress=False)
    assert again.images == N - 8  # only what no chunk held
    assert not table.duplicated(["key", "part"]).any() and table["key"].nunique() == N
    same(table, reference)
    assert not parts_dir.exists()
    # a finished output is returned as is
    idle = Wrapper(expert(tmp_path))
    same(label_dataset(samples, idle, out, progress=False), reference)
    assert idle.calls == 0


def test_resume_state_of_another_run_is_refused(dataset):
    tmp_path, samples = dataset
    out = tmp_path / "boxes.parquet"
    with pytest.raises(Killed):
        label_dataset(samples, Wrapper(expert(tmp_path), die_after=2), out, flush_every=4, progress=False)
    with pytest.raises(LabellingError, match="different run"):
        label_dataset(samples[:10], expert(tmp_path), out, progress=False)
    table = label_dataset(samples[:10], expert(tmp_path), out, resume=False, progress=False)
    assert table["key"].nunique() == 10
    with pytest.raises(ValueError, match="duplicate"):
        label_dataset(samples + samples[:1], expert(tmp_path), out, progress=False)


def test_bad_images_and_bad_answers_are_recorded(dataset):
    tmp_path, samples = dataset
    broken = Sample(str(tmp_path / "synth_A" / "query" / "broken.jpg"), 1, 0, "synth_A", "query/broken.jpg")
    (tmp_path / "synth_A" / "query").mkdir()
    (tmp_path / "synth_A" / "query" / "broken.jpg").write_bytes(b"no jpeg here")
    gone = Sample(str(tmp_path / "nowhere.jpg"), 1, 0, "synth_A", "query/nowhere.jpg")
    failing = sorted(s.key for s in samples)[5]
    backend = Wrapper(expert(tmp_path), fail_keys=[failing])
    table = label_dataset(samples + [broken, gone], backend, tmp_path / "out.parquet", progress=False)
    assert table["key"].nunique() == N + 2 and len(table) == 3 * (N + 2)
    bad = table[table["key"] == broken.key]
    assert (bad["status"] == "unreadable").all() and bad["raw"].str.contains("broken.jpg").all()
    assert (table.loc[table["key"] == gone.key, "status"] == "unreadable").all()
    err = table[table["key"] == failing]
    assert (err["status"] == "error").all() and err["raw"].str.contains("RuntimeError").all()
    assert (table.loc[~table["key"].isin([broken.key, gone.key, failing]), "status"] != "error").all()
    summary = summarize_labels(table)
    assert summary["unreadable_images"] == 2 and summary["error_images"] == 1 and summary["images"] == N + 2

    def odd(key):
        i = int(key.split("_")[-2]) % 4
        if i == 0:
            return [PartBox("head", (1.0, 2.0, np.nan, 4.0)), PartBox("upper", (0, 0, 5, 5)), PartBox("legs", None)]
        if i == 1:
            return [PartBox("head", (0, 0, 5, 5))]  # too few
        if i == 2:
            return "[[12,4,500,999]]"  # not parsed at all
        return [PartBox("a", (0, 0, 1, 1)), PartBox("b", (0, 0, 2, 2)), PartBox("c", (0, 0, 3, 3))]  # positional
    table = label_dataset(samples, Wrapper(expert(tmp_path), answer=odd), tmp_path / "odd.parquet", progress=False)
    assert len(table) == 3 * N
    kinds = table["key"].str.split("_").str[-2].astype(int) % 4
    t0 = table[kinds == 0].set_index("part")
    assert (t0.loc["head", "status"] == "parse_error").all() and (t0.loc["upper", "status"] == "ok").all()
    assert (t0.loc["legs", "status"] == "missing").all()
    t1 = table[kinds == 1].set_index("part")
    assert (t1.loc["head", "status"] == "ok").all() and (t1.loc[["upper", "legs"], "status"] == "missing").all()
    assert (table.loc[kinds == 2, "status"] == "parse_error").all()
    t3 = table[kinds == 3]
    assert (t3["status"] == "ok").all() and (t3.loc[t3["part"] == "legs", "x1"] == 3).all()


def test_systematic_backend_failure_stops_the_run(dataset):
    tmp_path, samples = dataset
    dead = Wrapper(expert(tmp_path), die_after=0, exc=RuntimeError)
    with pytest.raises(LabellingError, match="in a row"):
        label_dataset(samples, dead, tmp_path / "x.parquet", max_consecutive_errors=5, progress=False)


def test_shards_merge_to_the_unsharded_result(dataset):
    tmp_path, samples = dataset
    reference = label_dataset(samples, expert(tmp_path), tmp_path / "ref.parquet", progress=False)
    out = tmp_path / "boxes.parquet"
    shards = [select_shard(samples, i, 3) for i in range(3)]
    assert sorted(s.key for sh in shards for s in sh) == sorted(s.key for s in samples)
    assert [s.key for s in shards[1]] == [s.key for s in select_shard(samples[::-1], 1, 3)]  # independent of input order
    for i in (0, 2):
        label_dataset(samples, expert(tmp_path), out, shard=(i, 3), progress=False)
    assert shard_path(out, 2, 3).name == "boxes.shard-2-of-3.parquet" and shard_path(out, 2, 3).is_file()
    with pytest.raises(LabellingError, match="shard-1-of-3"):
        merge_shards(out, 3)
    label_dataset(samples, expert(tmp_path), out, shard=(1, 3), progress=False)
    merged = merge_shards(out, 3)
    same(merged, reference)
    same(pd.read_parquet(out), reference)
    # the same key in two shards is refused
    s0 = pd.read_parquet(shard_path(out, 0, 3))
    pd.concat([pd.read_parquet(shard_path(out, 1, 3)), s0.head(3)]).to_parquet(shard_path(out, 1, 3))
    with pytest.raises(LabellingError, match="several shards"):
        merge_shards(out, 3)


def test_distributed_labelling_with_file_barrier(dataset):
    tmp_path, samples = dataset
    reference = label_dataset(samples, expert(tmp_path), tmp_path / "ref.parquet", progress=False)
    out = tmp_path / "dist.parquet"
    own = label_dataset_distributed(samples, expert(tmp_path), out, shard=(1, 2), progress=False)
    assert own["key"].nunique() == len(select_shard(samples, 1, 2)) and not out.exists()
    merged = label_dataset_distributed(samples, expert(tmp_path), out, shard=(0, 2), poll_seconds=0.01, progress=False)
    same(merged, reference)
    with pytest.raises(LabellingError, match="timed out.*shard-3-of-4"):
        wait_for_shards(out, 4, timeout=0.05, poll_seconds=0.01)


def test_shard_from_env_and_parse():
    assert shard_from_env({}) == (0, 1)
    assert shard_from_env({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}) == (2, 4)
    assert shard_from_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "3"}) == (1, 3)
    with pytest.raises(ValueError, match="shard"):
        shard_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "1-4", "x/2"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)


def test_end_to_end_on_the_synthetic_generator(tmp_path):
    """Generator ground truth -> simulated expert -> labelling of the JPEGs -> calibration -> masks."""
    synthetic = pytest.importorskip("muva_core.data.synthetic")
    from muva_core.data.datasets import load_dataset
    from muva_core.grounding.calibration import calibrate_boxes, iou_against_truth
    from muva_core.grounding.voting import MaskStore

    root = synthetic.generate_synthetic(tmp_path / "synth", seed=0, scale="small", domains=("A",), progress=False)
    ds = load_dataset("synth_A", root)
    samples = list(ds.train) + list(ds.query) + list(ds.gallery)
    table = label_dataset(samples, SimulatedExpert(root, seed=0), tmp_path / "boxes.parquet", progress=False)
    assert table["key"].nunique() == len(samples) and set(table["dataset"]) == {"synth_A"}
    truth = synthetic.load_part_boxes(root / "synth_A")
    cal, report = calibrate_boxes(table)
    before, after = iou_against_truth(cal, truth, "raw"), iou_against_truth(cal, truth, "calibrated")
    assert after["all"] > before["all"] and after["legs"] > before["legs"]
    assert report.counts["legs"].get("height_high", 0) > 0  # the whole-person leg boxes
    store = MaskStore.from_table(cal)
    store.require(s.key for s in samples)
    assert store.masks.shape == (len(samples), 3, 128)
