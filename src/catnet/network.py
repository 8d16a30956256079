"""A fully connected network: forward pass, loss, backward pass by the chain rule, update.

Shapes: X is (N, D) with one image per row; W_l is (n_{l-1}, n_l), so layer l computes
A_l = f(A_{l-1} @ W_l [+ b_l]). The output layer is one sigmoid neuron: A_L is (N, 1), the
probability of "cat". Hidden layers use ``activation``. Each activation keeps its derivative
next to it, written in terms of its output; each loss keeps its value next to its output delta.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from catnet.errors import check_choice


# --- activations: f(z) and f'(z) expressed through a = f(z) -------------------------------

def sigmoid(z: np.ndarray) -> np.ndarray:
    # 1 / (1 + exp(-z)) written through tanh: the same value, no overflow for large |z|
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def sigmoid_grad(a: np.ndarray) -> np.ndarray:
    return a * (1.0 - a)


def tanh_grad(a: np.ndarray) -> np.ndarray:
    return 1.0 - a * a


def relu(z: np.ndarray) -> np.ndarray:
    return np.maximum(z, 0.0, out=z)


def relu_grad(a: np.ndarray) -> np.ndarray:
    return (a > 0).astype(a.dtype)


ACTIVATIONS = {
    "sigmoid": (sigmoid, sigmoid_grad),
    "tanh": (np.tanh, tanh_grad),
    "relu": (relu, relu_grad),
}


# --- losses over the whole set: value and dE/dz at the (sigmoid) output --------------------
# h, y: (N, 1). w: None, or (N, 1) weights of the examples (class weighting): E = sum_i w_i E_i.

def sse(h: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> float:
    """E = 1/2 * sum((y - h)^2), the seed's error."""
    d = y - h
    return 0.5 * float(np.vdot(d, d if w is None else w * d))


def sse_delta(h: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    delta = (h - y) * h * (1.0 - h)  # dE/dh * sigmoid'(z)
    if w is not None:
        delta *= w
    return delta


def cross_entropy(h: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> float:
    """E = -sum(y log h + (1 - y) log(1 - h))."""
    tiny = np.finfo(h.dtype).tiny
    per_example = y * np.log(h + tiny) + (1.0 - y) * np.log(1.0 - h + tiny)
    return -float(np.sum(per_example if w is None else w * per_example))


def cross_entropy_delta(h: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    delta = h - y  # the sigmoid's derivative cancels
    if w is not None:
        delta *= w
    return delta


LOSSES = {
    "sse": (sse, sse_delta),
    "cross_entropy": (cross_entropy, cross_entropy_delta),
}

INITS = ("xavier", "he", "lecun")


@dataclass
class Network:
    weights: list[np.ndarray]  # W_l: (n_{l-1}, n_l)
    biases: list[np.ndarray] | None  # b_l: (n_l,), or None for a network without bias
    activation: str = "sigmoid"  # hidden layers; the output neuron is always a sigmoid

    @property
    def layer_sizes(self) -> list[int]:
        return [self.weights[0].shape[0]] + [w.shape[1] for w in self.weights]

    def arrays(self) -> dict[str, np.ndarray]:
        """W1..WL (and b1..bL), as saved in weights.npz."""
        out = {f"W{i}": w for i, w in enumerate(self.weights, 1)}
        if self.biases is not None:
            out.update({f"b{i}": b for i, b in enumerate(self.biases, 1)})
        return out

    def file_arrays(self) -> dict[str, np.ndarray]:
        """What weights.npz holds: the arrays and the hidden activation (a string array, loadable
        without pickle), so the file alone rebuilds the network."""
        return {**self.arrays(), "activation": np.array(self.activation)}

    @classmethod
    def from_arrays(cls, arrays, activation: str | None = None) -> "Network":
        """The network of ``arrays`` (W1..WL, b1..bL); its activation is the one the arrays
        record (``file_arrays``), else ``activation``, else sigmoid."""
        n = sum(1 for k in arrays if k.startswith("W"))
        weights = [np.asarray(arrays[f"W{i}"]) for i in range(1, n + 1)]
        biases = [np.asarray(arrays[f"b{i}"]) for i in range(1, n + 1)] if "b1" in arrays else None
        if "activation" in arrays:
            activation = str(np.asarray(arrays["activation"]))
        activation = activation or "sigmoid"
        check_choice("activation", activation, ACTIVATIONS)
        return cls(weights, biases, activation)


def init_network(
    layer_sizes: list[int],
    rng: np.random.Generator,
    activation: str = "sigmoid",
    bias: bool = False,
    init: str = "xavier",
    dtype: str | np.dtype = np.float32,
) -> Network:
    """Random normal weights scaled by the fan: xavier sqrt(2/(in+out)), he sqrt(2/in),
    lecun sqrt(1/in). Biases start at zero. Draws in float64, then casts, so float32 and
    float64 networks of one seed start from the same weights (up to rounding)."""
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("init", init, INITS)
    weights = []
    for n_in, n_out in zip(layer_sizes[:-1], layer_sizes[1:]):
        std = {"xavier": np.sqrt(2.0 / (n_in + n_out)), "he": np.sqrt(2.0 / n_in),
               "lecun": np.sqrt(1.0 / n_in)}[init]
        w = (rng.standard_normal((n_in, n_out)) * std).astype(dtype)
        # column-major: each unit's incoming weights are contiguous, so the first layer's
        # gradient comes out of BLAS in the layout of W and the update W -= step is one pass
        weights.append(np.asfortranarray(w))
    biases = [np.zeros(n, dtype=dtype) for n in layer_sizes[1:]] if bias else None
    return Network(weights, biases, activation)


def forward(net: Network, x: np.ndarray, z1: np.ndarray | None = None) -> list[np.ndarray]:
    """Activations [A_1, ..., A_L] of every layer for inputs x (N, D); A_L is (N, 1).

    ``z1``: the first layer's product x @ W_1 (N, n_1) when the caller already has it
    (catnet.train's dual form); it is used in place, so pass an array that may be overwritten.
    """
    f_hidden = ACTIVATIONS[net.activation][0]
    last = len(net.weights) - 1
    acts = []
    a = x
    for l, w in enumerate(net.weights):
        z = z1 if l == 0 and z1 is not None else a @ w  # (N, n_{l-1}) @ (n_{l-1}, n_l) -> (N, n_l)
        if net.biases is not None:
            z += net.biases[l]
        a = sigmoid(z) if l == last else f_hidden(z)
        acts.append(a)
    return acts


def backward(
    net: Network, x: np.ndarray, acts: list[np.ndarray], y: np.ndarray, loss: str = "sse",
    scale: float = 1.0, first_delta: bool = False, weights: np.ndarray | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """dE/dW_l (and dE/db_l) for every layer, by the chain rule, from the output back.

    delta_L = dE/dz_L from the loss; delta_{l-1} = (delta_l @ W_l^T) * f'(A_{l-1});
    dE/dW_l = A_{l-1}^T @ delta_l. No delta is formed for the inputs (it is not needed and
    would cost a third (N, D) product). Every gradient is linear in delta_L, so ``scale``
    (the learning rate, for an update) is applied there, on N numbers, instead of on the
    D x n_1 gradient of the first layer.

    ``first_delta``: put delta_1 = dE/dZ_1 (N, n_1) in place of dE/dW_1 = X^T delta_1, for a
    caller that keeps W_1 as W_1(0) + X^T A and so only needs delta_1 (catnet.train's dual form).
    ``weights``: (N, 1) example weights of the loss (see the losses above), or None.
    """
    f_grad = ACTIVATIONS[net.activation][1]
    delta = LOSSES[loss][1](acts[-1], y, weights)  # (N, 1)
    if scale != 1.0:
        delta *= scale
    n = len(net.weights)
    grads_w: list[np.ndarray] = [None] * n  # type: ignore[list-item]
    grads_b: list[np.ndarray] | None = [None] * n if net.biases is not None else None  # type: ignore[list-item]
    for l in range(n - 1, -1, -1):
        a_prev = x if l == 0 else acts[l - 1]
        # dE/dW_l = A_{l-1}^T @ delta_l, computed as (delta_l^T @ A_{l-1})^T:
        # (n_l, N) @ (N, n_{l-1}) -> (n_l, n_{l-1}), returned as its (n_{l-1}, n_l) transpose,
        # the column-major layout the weights are kept in (see init_network)
        grads_w[l] = delta if l == 0 and first_delta else (delta.T @ a_prev).T
        if grads_b is not None:
            grads_b[l] = delta.sum(axis=0)
        if l > 0:
            delta = (delta @ net.weights[l].T) * f_grad(acts[l - 1])  # (N, n_l) @ (n_l, n_{l-1})
    return grads_w, grads_b


def loss_value(h: np.ndarray, y: np.ndarray, loss: str = "sse", weights: np.ndarray | None = None) -> float:
    return LOSSES[loss][0](h, y, weights)


def class_weights(y: np.ndarray, scheme: str | None) -> tuple[float, float] | None:
    """Weights of (non-cat, cat) examples in the loss. ``balanced``: N / (2 N_class), so each
    class weighs half of the loss whatever its share of the set (minimizing it aims at balanced
    accuracy, not at accuracy on the training set's class mix); None: every example weighs 1."""
    if scheme is None:
        return None
    check_choice("class_weight", scheme, ("balanced",))
    y = np.asarray(y).ravel()
    counts = np.array([np.sum(y == 0), np.sum(y == 1)], dtype=float)
    return tuple(float(len(y) / (2 * c)) if c else 0.0 for c in counts)  # type: ignore[return-value]


def example_weights(y: np.ndarray, weights: tuple[float, float] | None, dtype) -> np.ndarray | None:
    """(N, 1) weight of each example from its label, or None."""
    if weights is None:
        return None
    return np.where(np.asarray(y).reshape(-1, 1) == 1, weights[1], weights[0]).astype(dtype)


def predict_proba(net: Network, x: np.ndarray) -> np.ndarray:
    """(N, D) inputs -> (N,) probability of cat."""
    return forward(net, x)[-1][:, 0]
