"""``python -m pipeline.params``: write params.yaml, the configuration composed from conf/.

params.yaml is what ``dvc params diff`` and ``dvc exp show`` display, and what DVC itself
rewrites (same composition, plus the ``-S`` overrides) on every ``dvc exp run`` since
``hydra.enabled`` is set in .dvc/config. conf/ stays the source: ``make run`` regenerates
this file before ``dvc repro``, and a test fails when the committed copy has drifted.
"""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.common import CONF_DIR, ROOT


def composed_yaml() -> str:
    """The text DVC writes for ``dvc exp run`` without overrides (dvc.utils.hydra); also from
    inside a Hydra app (a stage naming its run), which has Hydra set up already."""
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        cfg = compose(config_name="config")
    else:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            cfg = compose(config_name="config")
    OmegaConf.resolve(cfg)
    return OmegaConf.to_yaml(cfg)


def main() -> None:
    path = ROOT / "params.yaml"
    text = composed_yaml()
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
        print("params.yaml: rewritten from conf/")


if __name__ == "__main__":
    main()
