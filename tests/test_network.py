"""The learning math: gradients against finite differences, training, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest

from catnet import network
from catnet.network import Network, backward, forward, init_network, loss_value
from catnet.train import fit


def numeric_gradient(net: Network, x, y, loss: str, param: np.ndarray, eps: float = 1e-6, weights=None) -> np.ndarray:
    """Central differences of the loss with respect to every entry of ``param``."""
    grad = np.zeros_like(param)
    for i in np.ndindex(param.shape):
        old = param[i]
        param[i] = old + eps
        plus = loss_value(forward(net, x)[-1], y, loss, weights)
        param[i] = old - eps
        minus = loss_value(forward(net, x)[-1], y, loss, weights)
        param[i] = old
        grad[i] = (plus - minus) / (2 * eps)
    return grad


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-300))


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "class-weighted"])
@pytest.mark.parametrize("loss", ["sse", "cross_entropy"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_backward_matches_finite_differences(activation, bias, loss, weighted):
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, size=(7, 6))
    y = (rng.uniform(size=(7, 1)) > 0.5).astype(np.float64)
    weights = network.example_weights(y, network.class_weights(y, "balanced"), np.float64) if weighted else None
    net = init_network([6, 5, 4, 1], rng, activation=activation, bias=bias, init="he", dtype=np.float64)
    if bias:  # non-zero biases, so their gradients are exercised away from the start point
        for b in net.biases:
            b[:] = rng.normal(scale=0.3, size=b.shape)
    grads_w, grads_b = backward(net, x, forward(net, x), y, loss, weights=weights)
    for l, w in enumerate(net.weights):
        num = numeric_gradient(net, x, y, loss, w, weights=weights)
        assert grads_w[l].shape == w.shape
        assert rel_error(grads_w[l], num) < 1e-6, f"W{l + 1}"
    for l, b in enumerate(net.biases or []):
        assert rel_error(grads_b[l], numeric_gradient(net, x, y, loss, b, weights=weights)) < 1e-6, f"b{l + 1}"


def test_sse_matches_the_definition():
    h = np.array([[0.2], [0.9], [0.5]])
    y = np.array([[0.0], [1.0], [1.0]])
    assert loss_value(h, y, "sse") == pytest.approx(0.5 * (0.04 + 0.01 + 0.25))


def test_forward_shapes_and_sigmoid_output():
    rng = np.random.default_rng(0)
    net = init_network([12, 5, 3, 1], rng)
    acts = forward(net, rng.uniform(size=(4, 12)).astype(np.float32))
    assert [a.shape for a in acts] == [(4, 5), (4, 3), (4, 1)]
    assert all(a.dtype == np.float32 for a in acts)
    assert ((acts[-1] > 0) & (acts[-1] < 1)).all()
    assert network.sigmoid(np.array([-1000.0, 0.0, 1000.0])).tolist() == [0.0, 0.5, 1.0]


def separable_problem(n=60, d=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, size=(n, d))
    y = (x[:, :d // 2].sum(1) > x[:, d // 2:].sum(1)).astype(np.uint8)
    return x, y


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_training_lowers_the_error_and_learns(activation):
    x, y = separable_problem()
    net = init_network([10, 8, 4, 1], np.random.default_rng(0), activation=activation, dtype=np.float64)
    history = fit(net, x, y, epochs=800, lr=0.05)["error"]
    assert history.shape == (800,)
    assert history[-1] < 0.3 * history[0]
    assert history[-1] < history[-100]  # still going down at the end
    pred = forward(net, x)[-1][:, 0] > 0.5
    assert (pred == y).mean() >= 0.9


def test_validation_error_is_measured_on_the_same_weights():
    x, y = separable_problem(80)
    net = init_network([10, 4, 1], np.random.default_rng(0), dtype=np.float64)
    seen = []
    history = fit(net, x[:60], y[:60], epochs=30, lr=0.05, val=(x[60:], y[60:]),
                  on_epoch=lambda e, errs: seen.append((e, errs)))
    assert [e for e, _ in seen] == list(range(1, 31))
    assert history["val_error"][-1] == seen[-1][1]["val_error"] < history["val_error"][0]
    assert loss_value(forward(net, x[60:])[-1], y[60:].reshape(-1, 1).astype(float)) < history["val_error"][-1]


def test_each_epoch_is_one_gradient_step():
    x, y = separable_problem()
    net = init_network([10, 3, 1], np.random.default_rng(0), dtype=np.float64)
    before = [w.copy() for w in net.weights]
    grads, _ = backward(net, x, forward(net, x), y.reshape(-1, 1).astype(np.float64))
    fit(net, x, y, epochs=1, lr=0.1)
    for w0, g, w1 in zip(before, grads, net.weights):
        np.testing.assert_allclose(w1, w0 - 0.1 * g, rtol=0, atol=1e-15)


def test_same_seed_same_weights_and_float32_follows_float64():
    x, y = separable_problem()
    runs = {}
    for dtype in ("float32", "float64", "float64"):
        net = init_network([10, 6, 1], np.random.default_rng(42), dtype=dtype)
        fit(net, x, y, epochs=20, lr=0.05)
        runs.setdefault(dtype, []).append(net)
    a, b = runs["float64"]
    assert all(np.array_equal(wa, wb) for wa, wb in zip(a.weights, b.weights))
    for w32, w64 in zip(runs["float32"][0].weights, a.weights):
        assert w32.dtype == np.float32
        np.testing.assert_allclose(w32, w64, rtol=1e-4, atol=1e-5)


def test_divergence_is_reported_with_its_epoch():
    from catnet.errors import TrainingDiverged

    x, y = separable_problem()
    x[3, 2] = np.nan  # one bad input poisons the error of the first epoch
    net = init_network([10, 6, 1], np.random.default_rng(0), dtype=np.float64)
    with pytest.raises(TrainingDiverged) as e:
        fit(net, x, y, epochs=50, lr=0.1)
    assert e.value.epoch == 1
    assert "epoch 1" in str(e.value)


def test_weights_round_trip_through_arrays():
    net = init_network([5, 3, 2, 1], np.random.default_rng(0), bias=True)
    back = Network.from_arrays(net.arrays())
    assert list(net.arrays()) == ["W1", "W2", "W3", "b1", "b2", "b3"]
    assert back.layer_sizes == [5, 3, 2, 1]
    assert all(np.array_equal(a, b) for a, b in zip(back.biases, net.biases))


def test_a_spike_that_recovers_is_not_divergence_but_a_plateau_is():
    from catnet.errors import TrainingDiverged

    x, y = separable_problem()
    net = init_network([10, 6, 1], np.random.default_rng(0), dtype=np.float64)
    fit(net, x, y, epochs=50, lr=0.05, max_error_ratio=1.4, patience=5)  # ordinary training
    net = init_network([10, 6, 1], np.random.default_rng(0), dtype=np.float64)
    with pytest.raises(TrainingDiverged, match="since epoch 2") as e:
        fit(net, x, y, epochs=50, lr=1e10, max_error_ratio=1.01, patience=5)
    assert e.value.epoch == 6


def test_minibatch_with_the_whole_set_as_one_batch_is_full_batch():
    from catnet.train import fit_minibatch

    x, y = separable_problem()
    a = init_network([10, 6, 1], np.random.default_rng(3), dtype=np.float64)
    b = init_network([10, 6, 1], np.random.default_rng(3), dtype=np.float64)
    ha = fit(a, x, y, epochs=30, lr=0.05)["error"]
    hb = fit_minibatch(b, lambda idx: x[idx], y, epochs=30, lr=0.05, batch_size=len(y),
                       rng=np.random.default_rng(0))["error"]
    np.testing.assert_allclose(hb, ha, rtol=1e-10)
    for wa, wb in zip(a.weights, b.weights):
        np.testing.assert_allclose(wb, wa, rtol=1e-9, atol=1e-12)


def test_minibatches_learn_and_are_reproducible():
    from catnet.train import fit_minibatch

    x, y = separable_problem(200)
    runs = []
    for _ in range(2):
        net = init_network([10, 8, 1], np.random.default_rng(1), dtype=np.float64)
        h = fit_minibatch(net, lambda idx: x[idx], y, epochs=60, lr=0.05, batch_size=16,
                          rng=np.random.default_rng(7))["error"]
        runs.append((net, h))
    assert runs[0][1][-1] < 0.3 * runs[0][1][0]
    assert all(np.array_equal(p, q) for p, q in zip(runs[0][0].weights, runs[1][0].weights))


def wide_problem(n=40, d=300, seed=0):
    """Fewer examples than inputs, like the cat images (209 x 12288): where the dual form pays."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, d)) * 3 / np.sqrt(d)
    y = (x[:, :d // 2].sum(1) > x[:, d // 2:].sum(1)).astype(np.uint8)
    return x, y


@pytest.mark.parametrize("activation,bias,loss,lr", [
    ("sigmoid", False, "sse", 0.5), ("tanh", True, "sse", 0.05), ("relu", True, "cross_entropy", 0.05),
    ("sigmoid", True, "cross_entropy", 0.2),
])
def test_dual_solver_follows_the_primal_descent(activation, bias, loss, lr):
    """W1 = W1(0) + X^T A is the same descent: weights and per-epoch errors (train and
    validation) agree with the direct update to float64 rounding."""
    x, y = wide_problem(50)
    nets, hists = {}, {}
    for solver in ("primal", "dual"):
        nets[solver] = init_network([300, 8, 4, 1], np.random.default_rng(5), activation=activation, bias=bias,
                                    dtype=np.float64)
        hists[solver] = fit(nets[solver], x[:40], y[:40], epochs=60, lr=lr, loss=loss, solver=solver,
                            val=(x[40:], y[40:]))
    for k in ("error", "val_error"):
        np.testing.assert_allclose(hists["dual"][k], hists["primal"][k], rtol=1e-10)
    assert hists["dual"]["error"][-1] < 0.5 * hists["dual"]["error"][0]  # it trained
    for wp, wd in zip(nets["primal"].arrays().values(), nets["dual"].arrays().values()):
        np.testing.assert_allclose(wd, wp, rtol=1e-9, atol=1e-12)
    assert nets["dual"].weights[0].flags.f_contiguous  # W1 written back in its layout


def test_dual_solver_writes_w1_back_when_training_stops_early():
    x, y = wide_problem()
    nets = {}
    for solver in ("primal", "dual"):
        nets[solver] = init_network([300, 6, 1], np.random.default_rng(2), dtype=np.float64)

        def stop(epoch, errors):
            if epoch == 7:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            fit(nets[solver], x, y, epochs=100, lr=0.5, solver=solver, on_epoch=stop)
    np.testing.assert_allclose(nets["dual"].weights[0], nets["primal"].weights[0], rtol=1e-10, atol=1e-13)


def test_auto_solver_picks_dual_only_where_it_costs_less():
    from catnet.errors import ConfigError
    from catnet.train import use_dual

    assert use_dual("auto", 209, 12288, 20, 1000)  # the default network and data
    assert not use_dual("auto", 209, 12288, 20, 2)  # too few epochs to repay X X^T
    assert not use_dual("auto", 5000, 3000, 20, 1000)  # more images than inputs
    assert use_dual("dual", 5000, 3000, 20, 1) and not use_dual("primal", 209, 12288, 20, 1000)
    with pytest.raises(ConfigError, match="solver='kernel': must be one of auto, primal, dual"):
        use_dual("kernel", 209, 12288, 20, 1000)


def test_dual_solver_in_float32_follows_float64():
    x, y = wide_problem()
    nets = {}
    for dtype in ("float32", "float64"):
        nets[dtype] = init_network([300, 6, 1], np.random.default_rng(4), dtype=dtype)
        fit(nets[dtype], x, y, epochs=30, lr=0.5, solver="dual")
    for w32, w64 in zip(nets["float32"].weights, nets["float64"].weights):
        assert w32.dtype == np.float32
        np.testing.assert_allclose(w32, w64, rtol=1e-4, atol=1e-5)


def test_balanced_class_weights_give_each_class_half_of_the_loss():
    y = np.array([0, 0, 0, 1])
    w0, w1 = network.class_weights(y, "balanced")
    assert (w0, w1) == (4 / 6, 2.0) and 3 * w0 == 1 * w1 == 2.0
    assert network.class_weights(y, None) is None
    h = np.full((4, 1), 0.5)
    weighted = loss_value(h, y.reshape(-1, 1).astype(float), "sse", network.example_weights(y, (w0, w1), np.float64))
    assert weighted == pytest.approx(0.5 * (3 * w0 * 0.25 + w1 * 0.25))
    with pytest.raises(Exception, match="class_weight='auto': must be one of balanced"):
        network.class_weights(y, "auto")


def test_dual_solver_with_class_weights_follows_the_primal_descent():
    x, y = wide_problem(40)
    y[:28] = 0  # a 30:10 class mix
    nets = {}
    for solver in ("primal", "dual"):
        nets[solver] = init_network([300, 6, 1], np.random.default_rng(1), dtype=np.float64)
        fit(nets[solver], x, y, epochs=40, lr=0.5, solver=solver, class_weight=network.class_weights(y, "balanced"))
    np.testing.assert_allclose(nets["dual"].weights[0], nets["primal"].weights[0], rtol=1e-9, atol=1e-12)


def test_read_only_inputs_share_their_gram_matrix_and_others_get_their_own():
    """catnet.train keeps X X^T of read-only inputs (a sweep's shared inputs) for the next
    network: the same product object for the same arrays, a fresh one for any other pair, and
    a writable array is never kept (it could change)."""
    from catnet.train import _gram

    rng = np.random.default_rng(0)
    a, b, c = (rng.normal(size=(5, 7)) for _ in range(3))
    for m in (a, b):
        m.flags.writeable = False
    k = _gram(a, a)
    assert _gram(a, a) is k and not k.flags.writeable
    np.testing.assert_array_equal(k, a @ a.T)
    np.testing.assert_array_equal(_gram(a, b), a @ b.T)  # the same a, another b
    np.testing.assert_array_equal(_gram(b, a), b @ a.T)
    assert _gram(a, a) is k  # kept beside them
    before = _gram(c, c)
    c *= 2  # a writable input changed in place: its product is made anew
    np.testing.assert_array_equal(_gram(c, c), c @ c.T)
    assert before is not _gram(c, c)
    from catnet import train

    d = rng.normal(size=(5, 7))
    d.flags.writeable = False
    _gram(d, d)  # new inputs: what was kept of the others goes (one sweep's inputs at a time)
    assert [(x is d, y is d) for x, y, _ in train._GRAMS] == [(True, True)]
