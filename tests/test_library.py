"""The library's parts a review found unguarded: every expectation here is worked out by hand
(or by scikit-learn, an independent implementation), never by the function under test."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_images, write_h5

from catnet.errors import BadValue, DataError

# the real training file's class counts: 72 cats, 137 non-cats
Y = np.array([1] * 72 + [0] * 137)


def test_the_validation_split_keeps_each_class_share():
    """val_fraction 0.2: round(0.2 * 72) = 14 cats and round(0.2 * 137) = 27 non-cats."""
    from catnet.splits import stratified_indices

    for seed in range(5):
        y = np.random.default_rng(seed).permutation(Y)
        rest, val = stratified_indices(y, 0.2, np.random.default_rng(seed))
        assert (int(y[val].sum()), int((y[val] == 0).sum())) == (14, 27)
        assert (int(y[rest].sum()), int((y[rest] == 0).sum())) == (58, 110)
        assert sorted([*rest, *val]) == list(range(209))


def test_every_fold_keeps_each_class_share():
    """5 folds of 72 cats and 137 non-cats: 72 = 14.4 x 5, so each fold holds 14 or 15 cats
    (two folds 15), and 27 or 28 non-cats (two folds 28); every image in exactly one fold."""
    from catnet.splits import stratified_folds

    y = np.random.default_rng(3).permutation(Y)
    folds = stratified_folds(y, 5, np.random.default_rng(0))
    cats = sorted(int(y[f].sum()) for f in folds)
    others = sorted(int((y[f] == 0).sum()) for f in folds)
    assert cats == [14, 14, 14, 15, 15] and others == [27, 27, 27, 28, 28]
    assert sorted(np.concatenate(folds).tolist()) == list(range(209))
    other = stratified_folds(y, 5, np.random.default_rng(1))
    assert any(not np.array_equal(a, b) for a, b in zip(folds, other))  # the seed draws the folds


def test_too_many_folds_or_a_bad_fraction_is_refused_in_one_line():
    from catnet.splits import stratified_folds, stratified_indices

    with pytest.raises(BadValue, match="folds=73: more folds than the 72 images of class 1"):
        stratified_folds(Y, 73, np.random.default_rng(0))
    with pytest.raises(BadValue, match="fraction=1.0: must lie in"):
        stratified_indices(Y, 1.0, np.random.default_rng(0))
    with pytest.raises(DataError, match="class 1 has 1 image"):
        stratified_indices(np.array([0, 0, 0, 1]), 0.5, np.random.default_rng(0))


def test_classification_metrics_against_counts_worked_out_by_hand():
    """3 cats (2 found), 7 non-cats (6 right): accuracy 8/10, balanced (2/3 + 6/7) / 2,
    precision 2/3 (2 of the 3 called cat are cats), recall 2/3."""
    from catnet.metrics import classification_metrics

    y = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    proba = np.array([0.9, 0.6, 0.2, 0.1, 0.3, 0.7, 0.0, 0.4, 0.49, 0.2])
    m = classification_metrics(proba, y)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 6 / 7) / 2)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 1, 6)


def test_metrics_on_a_set_of_one_class_or_none():
    """Balanced accuracy averages the classes the set holds: 7 non-cats, 5 right -> 5/7."""
    from catnet.metrics import classification_metrics

    m = classification_metrics(np.array([0.1, 0.2, 0.9, 0.3, 0.8, 0.0, 0.4]), np.zeros(7, dtype=int))
    assert m["balanced_accuracy"] == pytest.approx(5 / 7) and m["accuracy"] == pytest.approx(5 / 7)
    assert m["precision"] == 0.0 and m["recall"] == 0.0
    with pytest.raises(DataError, match="the set is empty"):
        classification_metrics(np.array([]), np.array([]))


def test_metrics_agree_with_scikit_learn():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, precision_score, recall_score

    from catnet.metrics import classification_metrics

    rng = np.random.default_rng(0)
    for n in (5, 50, 209):
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        proba = rng.random(n)
        m, pred = classification_metrics(proba, y), (proba >= 0.5).astype(int)
        assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
        assert m["precision"] == pytest.approx(precision_score(y, pred, zero_division=0))
        assert m["recall"] == pytest.approx(recall_score(y, pred, zero_division=0))


def test_the_divergence_counter_resets_when_the_error_recovers():
    """ratio 2, patience 3: two epochs above twice the first error, one below, two above again
    never make three in a row; a third in a row does."""
    from catnet.errors import TrainingDiverged
    from catnet.train import _DivergenceGuard

    guard = _DivergenceGuard(2.0, 3)
    for epoch, error in enumerate([1.0, 3.0, 3.0, 1.5, 3.0, 3.0], 1):
        guard.check(epoch, error)
    with pytest.raises(TrainingDiverged, match="since epoch 5"):
        guard.check(7, 3.0)


@pytest.mark.parametrize("errors, stops_at", [
    ([1.0, 5.0, 5.0, 1.0, 5.0, 5.0, 1.0, 0.5], None),  # spikes shorter than the patience: trains on
    ([1.0, 5.0, 5.0, 5.0, 1.0, 1.0, 1.0, 1.0], 4),     # three epochs in a row above 2x: stops there
])
def test_fit_stops_on_divergence_not_on_a_spike_that_recovers(monkeypatch, errors, stops_at):
    """Through fit: the training error of each epoch is scripted (the loss function replaced), the
    rest of the epoch runs as usual."""
    from catnet import train as catnet_train
    from catnet.errors import TrainingDiverged
    from catnet.network import init_network

    scripted = iter(errors)
    monkeypatch.setattr(catnet_train, "loss_value", lambda *args, **kwargs: next(scripted))
    rng = np.random.default_rng(0)
    net = init_network([6, 3, 1], rng)
    x, y = rng.normal(size=(10, 6)), np.arange(10) % 2
    seen = []
    run = lambda: catnet_train.fit(net, x, y, epochs=len(errors), lr=0.01, max_error_ratio=2.0, patience=3,  # noqa: E731
                                   on_epoch=lambda epoch, e: seen.append(epoch))
    if stops_at is None:
        assert list(run()["error"]) == errors and seen == list(range(1, len(errors) + 1))
    else:
        with pytest.raises(TrainingDiverged):
            run()
        assert seen == list(range(1, stops_at))


def test_h5images_take_returns_repeated_rows_in_the_order_asked(tmp_path):
    from catnet.hdf5 import H5Images

    x, y = make_images(9, np.random.default_rng(0), (2, 2, 3))
    path = write_h5(tmp_path / "t.h5", x, y)
    flat = x.reshape(9, -1)
    with H5Images(path, "train", (2, 2, 3)) as src:
        for idx in ([3, 3, 1], [8, 0, 8, 0], [2, 3, 4, 3], [5], [], [4, 5, 6]):
            np.testing.assert_array_equal(src.take(np.array(idx, dtype=int)), flat[np.array(idx, dtype=int)])
        with pytest.raises(IndexError):
            src.take(np.array([9]))


@pytest.mark.parametrize("dtype", [object, ">u2", "U3"])
def test_npy_of_object_or_foreign_dtype_is_refused(tmp_path, dtype):
    """An object array would be read as raw pointers (it crashed the process); a big-endian or
    string array as wrong numbers."""
    from catnet.npy import NpyRows, load_array

    path = tmp_path / "x.npy"
    arr = np.empty((3, 4), dtype=dtype)
    arr[...] = 1 if dtype != object else [[{"a": 1}] * 4] * 3
    np.save(path, arr, allow_pickle=True)
    with pytest.raises(DataError, match=r"x\.npy: holds .*expected numbers"):
        NpyRows(path)
    with pytest.raises(DataError, match=r"x\.npy: holds .*expected numbers"):
        load_array(path)
