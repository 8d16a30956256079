"""The loader on small HDF5 files made here: good ones, and every way they can be wrong."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REAL_TEST, REAL_TRAIN, make_images, needs_data, write_h5

from catnet.hdf5 import flatten, load_dataset, load_split
from catnet.errors import ConfigError, DataError
from catnet.preprocess import fit

SHAPE = (64, 64, 3)


@pytest.fixture
def good(tmp_path):
    x, y = make_images(6, np.random.default_rng(0))
    return x, y, write_h5(tmp_path / "good.h5", x, y, "train")


def test_loads_a_good_file(good):
    x, y, path = good
    split = load_split(path, "train", SHAPE)
    assert split.x.dtype == np.uint8 and split.x.shape == (6, 64, 64, 3)
    assert np.array_equal(split.x, x) and split.y.tolist() == y.tolist()


def test_flatten_is_row_major_pixel_triples(good):
    x, _, path = good
    flat = flatten(load_split(path, "train", SHAPE))
    assert flat.x.shape == (6, 12288) and flat.x.flags.c_contiguous
    i, r, c, ch = 4, 10, 33, 2
    assert flat.x[i, (r * 64 + c) * 3 + ch] == x[i, r, c, ch]
    assert flat.x[i, :3].tolist() == x[i, 0, 0].tolist()  # first pixel's R, G, B


def test_other_prefix_and_row_labels_are_accepted(tmp_path):
    x, y = make_images(4, np.random.default_rng(1))
    path = write_h5(tmp_path / "other.h5", x, y.reshape(1, -1), "dev")
    assert load_split(path, "test", SHAPE).y.tolist() == y.tolist()


def test_scale_normalization_is_x_over_255(good):
    _, _, path = good
    flat = flatten(load_split(path, "train", SHAPE))
    norm = fit(flat.x)
    np.testing.assert_array_equal(norm.apply(flat.x, np.float64), flat.x / 255.0)
    assert norm.apply(flat.x).dtype == np.float32


def test_standardize_uses_training_statistics(good):
    _, _, path = good
    flat = flatten(load_split(path, "train", SHAPE))
    z = fit(flat.x, "standardize").apply(flat.x, np.float64)
    varying = flat.x.std(0) > 0
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(z[:, varying].std(0), 1, atol=1e-9)


def test_statistics_and_evaluation_in_blocks_match_the_whole_set():
    """Blocks bound memory for big sets: the per-feature statistics and the metrics must not
    depend on the block size."""
    from catnet.metrics import evaluate
    from catnet.network import init_network

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(101, 30), dtype=np.uint8)
    x[:, 4] = 9  # a feature that never varies
    y = rng.integers(0, 2, size=101)
    whole, blocked = fit(x, "standardize", block=1000), fit(x, "standardize", block=7)
    np.testing.assert_allclose(blocked.shift, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(blocked.scale, np.where(x.std(0) > 0, x.std(0), 1.0), rtol=1e-12)
    np.testing.assert_allclose(blocked.scale, whole.scale, rtol=1e-12)
    net = init_network([30, 5, 1], np.random.default_rng(0), dtype=np.float64)
    direct = evaluate(net, whole.apply(x, np.float64), y)
    streamed = evaluate(net, x, y, transform=lambda rows: whole.apply(rows, np.float64), block=10)
    assert streamed["accuracy"] == direct["accuracy"] and streamed["tp"] == direct["tp"]
    np.testing.assert_allclose(streamed["error"], direct["error"], rtol=1e-12)


def _bad_files(tmp_path):
    rng = np.random.default_rng(0)
    x, y = make_images(6, rng)
    cases = {}

    def h5(name, *args, **kw):
        cases[name] = write_h5(tmp_path / f"{name.replace('/', '_')}.h5", *args, **kw)

    (tmp_path / "empty.h5").write_bytes(b"")
    cases["empty file"] = tmp_path / "empty.h5"
    (tmp_path / "text.h5").write_text("not hdf5 at all\n" * 100)
    cases["not HDF5"] = tmp_path / "text.h5"
    write_h5(tmp_path / "full.h5", x, y)
    data = (tmp_path / "full.h5").read_bytes()
    (tmp_path / "truncated.h5").write_bytes(data[: len(data) // 2])
    cases["truncated"] = tmp_path / "truncated.h5"
    h5("no images", None, y)
    h5("no labels", x, None)
    h5("wrong image shape", rng.integers(0, 255, (6, 32, 32, 3)).astype(np.uint8), y)
    h5("wrong rank", x.reshape(6, -1), y)
    h5("strings as images", np.array([b"a"] * 6), y)
    h5("pixels above 255", x.astype(np.int64) + 200, y)
    h5("negative pixels", x.astype(np.int64) - 200, y)
    nan = x.astype(np.float64)
    nan[0, 0, 0, 0] = np.nan
    h5("non-finite pixels", nan, y)
    h5("labels outside 0/1", x, np.array([0, 1, 2, 0, 1, 0]))
    h5("fewer labels than images", x, y[:4])
    h5("empty set", x[:0], y[:0])
    h5("one class only", x, np.ones(6, dtype=np.int64))
    return cases


EXPECTED = {
    "empty file": "empty", "not HDF5": "not an HDF5 file", "truncated": "HDF5",
    "no images": "no dataset 'train_set_x'", "no labels": "no dataset 'train_set_y'",
    "wrong image shape": "expected images of shape", "wrong rank": "expected images of shape",
    "strings as images": "must be numbers", "pixels above 255": "0..255", "negative pixels": "0..255",
    "non-finite pixels": "NaN or infinite", "labels outside 0/1": "must be 0 or 1",
    "fewer labels than images": "4 labels for 6 images", "empty set": "empty",
    "one class only": "only label 1",
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_file_gives_one_clear_line(tmp_path, case):
    bad = _bad_files(tmp_path)[case]
    x, y = make_images(6, np.random.default_rng(2))
    good_test = write_h5(tmp_path / "test_ok.h5", x, y, "test")
    with pytest.raises(DataError) as e:
        load_dataset(bad, good_test, SHAPE, names=("data.train_path=bad.h5", "data.test_path=t.h5"))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("data.train_path=bad.h5")
    assert EXPECTED[case] in msg


def test_missing_file_and_train_test_mismatch(tmp_path):
    x, y = make_images(6, np.random.default_rng(0))
    train = write_h5(tmp_path / "train.h5", x, y, "train")
    with pytest.raises(DataError, match="file not found"):
        load_dataset(train, tmp_path / "nowhere.h5", SHAPE)
    small = write_h5(tmp_path / "small.h5", x[:, :32, :32], y, "test")
    with pytest.raises(DataError, match=r"small.h5.*expected images of shape \(N, 64, 64, 3\)"):
        load_dataset(train, small, SHAPE)


@needs_data
def test_real_data_and_its_dvc_digest():
    import yaml

    from pipeline.common import ROOT

    train, test = load_dataset(REAL_TRAIN, REAL_TEST, SHAPE)
    assert (len(train), len(test), int(train.y.sum())) == (209, 50, 72)
    tracked = yaml.safe_load((ROOT / "data/raw.dvc").read_text())["outs"][0]["md5"]
    from pipeline.load import dvc_dir_digest

    assert dvc_dir_digest(REAL_TRAIN.parent) + ".dir" == tracked


def test_streamed_batches_equal_the_loaded_images(good):
    from catnet.hdf5 import H5Images

    x, y, path = good
    with H5Images(path, "train", SHAPE) as src:
        assert len(src) == 6 and src.y.tolist() == y.tolist()
        idx = np.array([4, 0, 5, 2])
        np.testing.assert_array_equal(src.take(idx), x[idx].reshape(4, -1))


def test_npy_rows_read_what_was_written_block_by_block(tmp_path):
    from catnet.npy import NpyRows, write_npy_rows

    x = np.random.default_rng(0).integers(0, 256, size=(23, 7), dtype=np.uint8)
    with open(tmp_path / "x.npy", "wb") as f:
        write_npy_rows(f, 23, 7, (x[s:s + 5] for s in range(0, 23, 5)))
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), x)  # a standard .npy file
    rows = NpyRows(tmp_path / "x.npy")
    assert rows.shape == (23, 7) and len(rows) == 23 and rows.dtype == np.uint8
    idx = np.array([5, 2, 22, 2, 0])
    mask = np.arange(23) % 3 == 0
    for key, expected in ((slice(3, 11), x[3:11]), (slice(None), x), (slice(20, 40), x[20:]), (idx, x[idx]),
                          (mask, x[mask]), (slice(1, 12, 4), x[1:12:4]), (np.array([-1]), x[[-1]])):
        got = rows[key]
        np.testing.assert_array_equal(got, expected)
        assert got.flags.writeable and got.flags.c_contiguous
    np.testing.assert_array_equal(np.array(rows, dtype=np.float64), x.astype(np.float64))
    with pytest.raises(IndexError):
        rows[np.array([23])]
    with open(tmp_path / "short.npy", "wb") as f:
        with pytest.raises(ValueError, match="wrote 5 rows, announced 6"):
            write_npy_rows(f, 6, 7, [x[:5]])


def test_load_stage_checks_every_block_and_keeps_old_outputs_on_a_bad_one(tmp_path, compose_cfg, monkeypatch):
    """Images are read and checked a block at a time; one bad image in the last block of the
    test file leaves the outputs of the previous load as they were."""
    from pipeline import load
    from pipeline.common import ROOT
    from pipeline.config import prepare

    rng = np.random.default_rng(0)
    x, y = make_images(9, rng)
    xt, yt = make_images(5, rng)
    train, test = write_h5(tmp_path / "train.h5", x, y), write_h5(tmp_path / "test.h5", xt, yt, split="test")
    monkeypatch.setattr(load, "BLOCK", 2)
    cfg = prepare(compose_cfg(f"data.train_path={train}", f"data.test_path={test}", f"paths.out_dir={tmp_path / 'out'}",
                              "data.val_fraction=0.3"), ROOT)
    splits = load.run(cfg)
    from catnet.splits import stratified_indices

    rest, val = stratified_indices(y, 0.3, np.random.default_rng(cfg.data.split_seed))
    np.testing.assert_array_equal(np.asarray(splits.train.x), x[rest].reshape(len(rest), -1))
    np.testing.assert_array_equal(splits.val.x[:], x[val].reshape(len(val), -1))
    np.testing.assert_array_equal(splits.val.y, y[val])
    np.testing.assert_array_equal(splits.test.x[:], xt.reshape(5, -1))
    before = {p.name: p.read_bytes() for p in (tmp_path / "out/data/flat").iterdir()}
    bad = xt.astype(np.float64)
    bad[4, 0, 0, 0] = np.nan  # the last block of the test file
    write_h5(tmp_path / "test.h5", bad, yt, split="test")
    with pytest.raises(DataError, match="NaN or infinite"):
        load.run(cfg)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out/data/flat").iterdir()} == before


def test_hflip_mirrors_each_image_left_to_right():
    from catnet.augment import hflip

    images = np.random.default_rng(0).integers(0, 256, size=(3, 4, 5, 3), dtype=np.uint8)
    flat = images.reshape(3, -1)
    mirrored = hflip(flat, (4, 5, 3)).reshape(3, 4, 5, 3)
    for r in range(4):
        for c in range(5):  # pixel (r, c) moves to (r, W-1-c), channels untouched
            np.testing.assert_array_equal(mirrored[:, r, 4 - c], images[:, r, c])
    np.testing.assert_array_equal(hflip(hflip(flat, (4, 5, 3)), (4, 5, 3)), flat)


@pytest.mark.parametrize("on_disk", [False, True])
def test_augmented_rows_are_the_images_then_their_mirrors(tmp_path, on_disk):
    from catnet.augment import augment, hflip
    from catnet.npy import NpyRows

    shape = (2, 3, 3)
    x = np.random.default_rng(1).integers(0, 256, size=(7, 18), dtype=np.uint8)
    y = np.array([0, 1, 1, 0, 0, 1, 0])
    if on_disk:
        np.save(tmp_path / "x.npy", x)
    rows, labels = augment(NpyRows(tmp_path / "x.npy") if on_disk else x, y, "hflip", shape)
    whole = np.concatenate([x, hflip(x, shape)])
    assert rows.shape == (14, 18) and len(rows) == 14
    np.testing.assert_array_equal(labels, np.concatenate([y, y]))
    np.testing.assert_array_equal(np.asarray(rows), whole)
    order = np.random.default_rng(2).permutation(14)
    for key in (order, order[:5], slice(5, 12), np.arange(14) % 3 == 0):
        np.testing.assert_array_equal(rows[key], whole[key])
    np.testing.assert_array_equal(x, np.load(tmp_path / "x.npy") if on_disk else x)  # source untouched
    kept = augment(x, y, None, shape)
    assert kept[0] is x and kept[1] is y
    with pytest.raises(ConfigError, match="augment='vflip': must be one of hflip"):
        augment(x, y, "vflip", shape)
