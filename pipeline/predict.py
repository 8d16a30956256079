"""``python -m pipeline.predict``: classify image files with any MLflow model URI.

    python -m pipeline.predict model_uri=models:/catnet@champion images=[a.png,b.jpg]
    python -m pipeline.predict model_uri=runs:/<run id>/model images=[photos/] csv=predictions.csv
    python -m pipeline.predict model_uri=null images=[a.png] json=input.json   # input for `mlflow models predict`
    catnet-predict images=[a.png]                                          # the same, installed as a command

Image paths, and the csv= and json= files, are relative to the directory it runs from;
``images=cat.png`` (one path, no brackets) is the list of that path.

Each image is converted to RGB and resized to 64x64 (Pillow), as the training images are.
Prints one line per image: path, label (cat / non-cat), probability of cat, and what the model
saw of it (``64x64 RGB`` as it was, or ``resized from 451x300 RGBA``). An image that cannot be
read gets one line on stderr and the others are still predicted (exit status 1).
"""

from __future__ import annotations

import csv as csv_module
import json as json_module
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from catnet.errors import ConfigError
from pipeline.common import CONF_DIR, atomic_write, run_cli, run_main
from pipeline.config import TrackingConfig

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class PredictConfig:
    model_uri: Optional[str] = "models:/catnet@champion"  # any MLflow model URI (null: only write json=)
    images: Any = field(default_factory=list)  # files or folders: a list, or one path
    size: list[int] = field(default_factory=lambda: [64, 64])
    csv: Optional[str] = None  # also write path,label,probability here
    json: Optional[str] = None  # also write the images as `mlflow models predict` JSON input
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


ConfigStore.instance().store(name="predict_schema", node=PredictConfig)


def here(path: str) -> Path:
    """A path the user typed: relative to the directory the command runs from."""
    return Path(path).expanduser().absolute()


def image_paths(items: Any) -> list[Path]:
    """The files named, and the image files inside the folders named, in order; one path
    (``images=photos/``) is the list of that path."""
    paths: list[Path] = []
    for item in [items] if isinstance(items, (str, Path)) else items:
        p = here(item)
        if p.is_dir():
            paths += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(p)
    return paths


def read_image(path: Path, size: tuple[int, int]) -> tuple[np.ndarray, str]:
    """(H, W, 3) uint8 RGB, resized like the training images, and what was done to it:
    ``64x64 RGB`` (nothing), ``resized from 451x300 RGBA``, ``converted from 64x64 L``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            original = f"{im.width}x{im.height} {im.mode}"
            x = np.asarray(im.convert("RGB").resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)
            if (im.width, im.height) != size:
                return x, f"resized from {original}"
            return x, original if im.mode == "RGB" else f"converted from {original}"
    except FileNotFoundError:
        raise ValueError("file not found") from None
    except UnidentifiedImageError:
        raise ValueError("not an image (or a format Pillow cannot read)") from None
    except OSError as e:
        raise ValueError(f"unreadable image: {e}") from None


def predict(cfg: DictConfig) -> int:
    if not cfg.images:
        raise ConfigError("images: name at least one image file or folder, e.g. images=[cat.png]")
    size = (int(cfg.size[1]), int(cfg.size[0]))  # Pillow wants (width, height)
    good, arrays, seen, failed = [], [], [], 0
    for path in image_paths(cfg.images):
        try:
            x, how = read_image(path, size)
            arrays.append(x)
            seen.append(how)
            good.append(path)
        except ValueError as e:
            print(f"{path}: error: {e}", file=sys.stderr)
            failed += 1
    if not good:
        raise ConfigError("images: no readable image among those given")
    x = np.stack(arrays)  # (N, 64, 64, 3) uint8
    if cfg.json:
        atomic_write(here(cfg.json), lambda f: json_module.dump({"inputs": x.tolist()}, f), mode="w")
    if cfg.model_uri:
        out = load_model(cfg).predict(x)
        rows = [(str(p), "cat" if lab == 1 else "non-cat", float(pr), how)
                for p, lab, pr, how in zip(good, out["label"], out["probability"], seen)]
        for path, label, proba, how in rows:
            print(f"{path}\t{label}\t{proba:.4f}\t{how}")
        if cfg.csv:
            def write(f):
                w = csv_module.writer(f)
                w.writerow(["path", "label", "probability", "seen_as"])
                w.writerows(rows)
            atomic_write(here(cfg.csv), write, mode="w")
    return 1 if failed else 0


def load_model(cfg: DictConfig):
    from pipeline.tracking import model, query, store

    client = store.client(cfg)  # models:/ and runs:/ URIs resolve through the configured store
    uri = str(cfg.model_uri)
    if uri.startswith("runs:/") and len(given := uri[6:].split("/", 1)[0]) < 32:  # a run id's prefix
        uri = uri.replace(given, query.run_of(client, given, "model_uri").info.run_id, 1)
    return model.load(uri)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    sys.exit(run_cli(predict, cfg, validate=False))


def cli() -> None:
    """The ``catnet-predict`` command (pyproject.toml)."""
    main()


if __name__ == "__main__":
    run_main(main)
