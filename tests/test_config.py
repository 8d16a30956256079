"""Every config in conf/ composes; bad values are refused before any work, naming the knob."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException

from catnet.errors import ConfigError
from pipeline.common import ROOT
from pipeline.config import flatten, prepare

GROUPS = sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir() and p.name != "hparams_search")


def test_default_is_the_seed_network(compose_cfg):
    cfg = prepare(compose_cfg())
    assert cfg.model.activation == "sigmoid" and cfg.model.bias is False
    assert len(cfg.model.hidden_sizes) == 2
    assert cfg.train.loss == "sse" and cfg.normalize.method == "scale" and cfg.normalize.divisor == 255
    assert cfg.train.dtype == "float32"


@pytest.mark.parametrize(
    "override",
    [f"{g}={p.stem}" for g in GROUPS for p in sorted((ROOT / "conf" / g).glob("*.yaml"))],
)
def test_every_config_composes_and_validates(compose_cfg, override):
    prepare(compose_cfg(override))


def test_the_search_preset_composes():
    from hydra import compose, initialize_config_dir

    from pipeline.common import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["hparams_search=optuna"], return_hydra_config=True)
    assert cfg.hydra.sweeper.seed is not None and "train.lr" in cfg.hydra.sweeper.params
    assert cfg.data.cv_folds >= 2 and cfg.sweep.objective.startswith("cv/")


def test_public_overrides_reach_the_config(compose_cfg):
    cfg = compose_cfg("seed=3", "model.hidden_sizes=[64,16,4]", "model.activation=tanh", "model.bias=true",
                      "train.epochs=7", "train.lr=0.01", "train.dtype=float64", "data.train_path=/a.h5",
                      "data.test_path=b.h5", "tracking.uri=sqlite:///x.db", "tracking.experiment=e",
                      "tracking.enabled=false")
    cfg = prepare(cfg)
    flat = flatten(cfg)
    assert flat["model.hidden_sizes"] == "[64, 16, 4]" and flat["train.lr"] == "0.01"
    assert flat["seed"] == "3" and flat["model.bias"] == "True" and flat["tracking.enabled"] == "False"


def test_configs_prepared_in_one_process_share_nothing(compose_cfg):
    """prepare's schema is built once per process (a sweep's jobs): what one job's config
    holds or is changed to reaches no other job's."""
    first = prepare(compose_cfg("seed=3", "model.hidden_sizes=[64,16,4]"))
    first.model.hidden_sizes.append(9)
    first.train.lr = 0.5
    second = prepare(compose_cfg())
    assert list(second.model.hidden_sizes) == [20, 7] and second.seed == 0 and second.train.lr == 0.005
    assert list(first.model.hidden_sizes) == [64, 16, 4, 9]


@pytest.mark.parametrize("override, knob", [
    ("train.lr=-0.1", "train.lr"), ("train.lr=0", "train.lr"), ("train.lr=nan", "train.lr"),
    ("train.lr=inf", "train.lr"), ("train.epochs=0", "train.epochs"),
    ("model.hidden_sizes=[]", "model.hidden_sizes"), ("model.hidden_sizes=[4,0]", "model.hidden_sizes"),
    ("model.activation=softmax", "model.activation"), ("model.init=zeros", "model.init"),
    ("train.dtype=float16", "train.dtype"), ("train.loss=hinge", "train.loss"),
    ("normalize.method=minmax", "normalize.method"), ("seed=-1", "seed"),
    ("data.image_shape=[]", "data.image_shape"), ("tracking.experiment=''", "tracking.experiment"),
    ("train.augment=vflip", "train.augment"), ("train.class_weight=auto", "train.class_weight"),
])
def test_bad_values_name_the_knob(compose_cfg, override, knob):
    with pytest.raises(ConfigError) as e:
        prepare(compose_cfg(override))
    assert str(e.value).startswith(knob)


@pytest.mark.parametrize("override, knob", [("train.lr=abc", "train.lr"), ("train.epochs=1.5", "train.epochs"),
                                            ("model.bias=maybe", "model.bias"), ("seed=x", "seed"),
                                            ("model.hidden_sizes=[a]", "model.hidden_sizes")])
def test_wrong_types_fail_before_any_work(compose_cfg, override, knob):
    with pytest.raises(ConfigError) as e:
        prepare(compose_cfg(override))
    assert str(e.value).startswith(knob) and "\n" not in str(e.value)


def test_unknown_keys_fail_at_composition(compose_cfg):
    with pytest.raises(ConfigCompositionException):
        compose_cfg("train.lrr=1")


def test_committed_params_yaml_is_the_composition_of_conf():
    from pipeline.params import composed_yaml

    assert (ROOT / "params.yaml").read_text() == composed_yaml(), "run: python -m pipeline.params"


def test_repeated_cross_validation_trains_k_times_r_networks(compose_cfg, monkeypatch):
    """data.cv_folds=3 x data.cv_repeats=2: six networks, each trained on 2/3 of the set and
    scored on the rest; a repeat draws other folds and other initial weights."""
    import numpy as np

    from catnet.hdf5 import Split
    from pipeline import train as stage

    cfg = prepare(compose_cfg("data.cv_folds=3", "data.cv_repeats=2", "train.epochs=5", "model.hidden_sizes=[3]",
                              "train.check_learned=false",
                              "data.image_shape=[2,2,3]"), ROOT)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(30, 12), dtype=np.uint8)
    y = np.array([0, 1] * 15, dtype=np.uint8)
    seen = []
    real_fit = stage.catnet_train.fit

    def spy(net, xs, ys, **kw):
        seen.append((net.weights[0].copy(), frozenset(map(bytes, xs))))
        return real_fit(net, xs, ys, **kw)

    monkeypatch.setattr(stage.catnet_train, "fit", spy)
    result = stage.cross_validate(cfg, Split(x, y))
    assert len(seen) == 6 and all(len(rows) == 20 for _, rows in seen)
    first, second = seen[:3], seen[3:]
    assert all(np.array_equal(w, first[0][0]) for w, _ in first)  # one seed within a repeat
    assert not np.array_equal(first[0][0], second[0][0])  # the next repeat: seed + 1
    assert len({rows for _, rows in first}) == 3 and {rows for _, rows in first} != {rows for _, rows in second}
    assert set(result) == {"cv/accuracy", "cv/balanced_accuracy", "cv/error"}
    assert 0 <= result["cv/accuracy"] <= 1 and result["cv/error"] > 0
    with pytest.raises(ConfigError, match="data.cv_repeats=0: must be >= 1"):
        prepare(compose_cfg("data.cv_repeats=0"), ROOT)


def test_cross_validation_trains_mini_batch_when_the_run_does(compose_cfg, monkeypatch):
    """A sweep over train.batch_size ranks what it runs: each fold trains by the run's own path."""
    import numpy as np

    from catnet.hdf5 import Split
    from pipeline import train as stage

    cfg = prepare(compose_cfg("data.cv_folds=3", "train.batch_size=8", "train.epochs=2", "model.hidden_sizes=[3]",
                              "train.check_learned=false", "data.image_shape=[2,2,3]"), ROOT)
    x = np.random.default_rng(0).integers(0, 256, size=(30, 12), dtype=np.uint8)
    y = np.array([0, 1] * 15, dtype=np.uint8)
    calls = []
    real = stage.catnet_train.fit_minibatch
    monkeypatch.setattr(stage.catnet_train, "fit", lambda *a, **kw: calls.append("full") or pytest.fail("full batch"))
    monkeypatch.setattr(stage.catnet_train, "fit_minibatch",
                        lambda net, take, ys, **kw: calls.append(kw["batch_size"]) or real(net, take, ys, **kw))
    stage.cross_validate(cfg, Split(x, y))
    assert calls == [8, 8, 8]


def test_train_stage_reruns_on_every_training_knob():
    """`dvc exp run -S train.<anything>=...` must re-run the train stage: DVC re-runs a stage
    only for the params it lists, so it lists whole groups, not a hand-kept subset."""
    import yaml

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]
    assert {"seed", "model", "train", "data.cv_folds", "data.cv_repeats"} <= set(stage["params"])
    assert "conf/train" in stage["deps"] and "conf/model" in stage["deps"]


def _sweep_config(*overrides: str):
    """The config a sweep's callback gets for ``python -m pipeline -m <overrides>``: composed with
    the group choices among them, the command line as Hydra records it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from pipeline.common import CONF_DIR

    groups = [o for o in overrides if o.startswith("hparams_search=")]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=groups, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.overrides.task = [o for o in overrides if not o.startswith("hydra")]
        cfg.hydra.overrides.hydra = ["hydra.mode=MULTIRUN", *(o for o in overrides if o.startswith("hydra"))]
        for o in overrides:
            if o.startswith("hydra.sweeper."):
                key, value = o[len("hydra.sweeper."):].split("=", 1)
                cfg.hydra.sweeper[key] = int(value) if value.isdigit() else value
    return cfg


def test_names_keep_numbers_short():
    from pipeline.provenance import short_name, short_value

    assert short_value("2.0876396919207562e-05") == "2.09e-05" and short_value("0.000214") == "0.000214"
    assert short_value("0.005") == "0.005" and short_value("1000") == "1000" and short_value("[64,16]") == "[64,16]"
    assert short_value("123456789") == "123456789" and short_value("xavier_uniform") == "xavier_uniform"
    assert (short_name(["train.lr=0.0009829739828307684", "model.hidden_sizes=[64,16]", "train.epochs=3000"])
            == "lr=0.000983 hidden=[64,16] epochs=3000")


@pytest.mark.parametrize("overrides, name", [
    (["train.lr=0.001,0.005", "model.hidden_sizes=[20,7],[64,16]", "seed=7"], "grid lr×hidden seed=7 (4)"),
    (["seed=range(0,20)", "preset=best"], "grid seed preset=best (20)"),
    (["train.lr=0.001,0.005", "tracking.experiment=x", "hydra/launcher=joblib"], "grid lr joblib (2)"),
    (["hparams_search=optuna"], "optuna (20)"),
    (["hparams_search=optuna", "hydra.sweeper.n_trials=200", "train.epochs=500"], "optuna epochs=500 (200)"),
    (["hparams_search=optuna", "hydra.sweeper.study_name=wide", "hydra.sweeper.n_trials=40"], "optuna wide (40)"),
])
def test_a_sweep_parent_is_named_by_what_sets_it_apart(overrides, name):
    from pipeline.sweep import sweep_name

    got, description = sweep_name(_sweep_config(*overrides))
    assert got == name
    in_order = [o for o in overrides if not o.startswith("hydra")] + [o for o in overrides if o.startswith("hydra")]
    assert description.endswith("python -m pipeline -m " + " ".join(in_order))
