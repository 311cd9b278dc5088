"""Lay out a MONAI Label ``monaibundle`` app that serves one (or more) medkd bundles.

    python tools/monai_label/prepare_app.py --bundle emkd_segmentation --app apps/medkd \\
        [--checkpoints bundles/emkd_segmentation/models] [--teacher bundles/supervised_segmentation/models/model.pt] \\
        [--name emkd_segmentation] \\
        [--recipes recipes/demo_3d.json] [--overrides '{"roi_size": [64, 64, 64]}'] [--label_venv .venv-label]

What it writes (see docs/monai_label.md):

- ``<app>/``: a copy of the ``monaibundle`` sample app that ships inside the monailabel package
  (``<label venv>/monailabel/sample-apps/monaibundle``), unless ``<app>/main.py`` already exists;
- ``<app>/model/<name>/``: the served copy of the bundle. MONAI Label reads exactly one ``configs/inference.json``
  and one ``configs/train.json`` and cannot merge recipe files, so each is written as the bundle's config with the
  recipes and overrides already merged (the same merge as ``--config_file "['train.json', 'recipes/X.json']"``).
  ``train.json`` also gets :data:`LABEL_TRAIN_OVERRIDES`; a 2D ``inference.json`` gets :data:`SQUEEZE_2D` at the end
  of its postprocessing. ``metadata.json`` is copied, with its
  ``spatial_shape`` entries resized to the served ``spatial_dims`` (MONAI Label reports the model's dimension from
  their length). ``models/`` receives every ``*.pt`` of ``checkpoints`` except resume states (``*_state.pt``):
  ``model.pt`` (the student, required) and the stage outputs ``train.json`` loads (``teacher.pt``,
  ``paraphraser.pt``); ``--teacher`` copies a teacher checkpoint kept elsewhere to ``models/teacher.pt``, where the
  KD bundles' ``teacher_ckpt`` points by default (MONAI Label training distils from it).

The served folder is replaced when it exists, so running the script again after a new training refreshes it.
It runs with any Python that has MONAI (the project's ``.venv`` or the MONAI Label environment).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUNDLES = ROOT / "bundles"
SAMPLE_APP = Path("monailabel") / "sample-apps" / "monaibundle"

# MONAI Label trains with the bundle's train.json plus its own overrides (bundle_root, device, max_epochs, datalists,
# a CheckpointLoader of models/model.pt). Two settings of the medkd bundles do not fit that:
# - resume: a models/train_state.pt left by an earlier run would be restored over the pretrained student, and a
#   request with another max_epochs or another number of labelled images would be refused;
# - val_interval: model.pt is written by the best-metric saver of the validation, which runs every val_interval
#   epochs; a short MONAI Label round (e.g. max_epochs 1) must validate to update the served model.
LABEL_TRAIN_OVERRIDES = {"resume": False, "val_interval": 1}
# MONAI Label's ``Restored`` (appended to every bundle's postprocessing) only drops the channel of 3D labels, so a 2D
# label would come back as a (1, H, W) volume carrying the slice's affine, i.e. along the wrong axes. The served 2D
# inference config ends its postprocessing with this squeeze instead, giving an (H, W) label.
SQUEEZE_2D = {"_target_": "SqueezeDimd", "keys": "pred", "dim": 0}
# Words MONAI Label reads from the model's folder name to choose another task type than segmentation.
OTHER_TASK_WORDS = ("deepedit", "deepgrow", "detection", "classification")


def sample_app_dir(label_venv: str | Path = ROOT / ".venv-label") -> Path:
    """The ``monaibundle`` sample app inside the MONAI Label environment ``label_venv``."""
    path = Path(label_venv) / SAMPLE_APP
    if not (path / "main.py").is_file():
        raise FileNotFoundError(
            f"no monaibundle sample app at {path}: build the MONAI Label environment first "
            f"(make label-env, or tools/monai_label/install_env.sh {label_venv})"
        )
    return path


def bundle_dir(bundle: str | Path) -> Path:
    """``bundle`` as a folder: a path, or the name of a bundle under ``bundles/``."""
    path = Path(bundle)
    if not path.is_dir():
        path = BUNDLES / str(bundle)
    if not (path / "configs" / "metadata.json").is_file():
        names = sorted(p.parent.parent.name for p in BUNDLES.glob("*/configs/metadata.json"))
        raise FileNotFoundError(f"{bundle!r} is not a bundle folder (no configs/metadata.json); bundles here: {names}")
    return path


def merged_config(config: Path, recipes: Sequence[str | Path] = (), overrides: Mapping | None = None) -> dict:
    """``config`` with ``recipes`` merged in order, then ``overrides`` (ids as in ``parser["a#b"] = value``).

    Recipe paths are relative to the folder of ``config`` or absolute. The result is the raw (unresolved) config.
    """
    from monai.bundle import ConfigParser

    files = [Path(config)]
    for recipe in recipes:
        path = Path(recipe) if Path(recipe).is_absolute() else Path(config).parent / recipe
        if not path.is_file():
            raise FileNotFoundError(f"recipe {recipe!r} not found (looked for {path})")
        files.append(path)
    parser = ConfigParser(ConfigParser.load_config_files([str(f) for f in files]))
    for key, value in (overrides or {}).items():
        parser[key] = value
    return json.loads(json.dumps(parser.get()))


def served_metadata(metadata: dict, spatial_dims) -> dict:
    """``metadata`` whose input/output ``spatial_shape`` lists have ``spatial_dims`` entries (when an int)."""
    if not isinstance(spatial_dims, int):
        return metadata
    out = json.loads(json.dumps(metadata))
    for group in ("inputs", "outputs"):
        for tensor in out.get("network_data_format", {}).get(group, {}).values():
            shape = tensor.get("spatial_shape")
            if isinstance(shape, list) and shape and len(shape) != spatial_dims:
                tensor["spatial_shape"] = (shape * spatial_dims)[:spatial_dims]
    return out


def served_inference(config: dict) -> dict:
    """The inference config as served: for ``spatial_dims`` 2, :data:`SQUEEZE_2D` ends the postprocessing."""
    if config.get("spatial_dims") != 2:
        return config
    post = config.get("postprocessing")
    transforms = post.get("transforms") if isinstance(post, dict) else None
    if not isinstance(transforms, list):
        raise ValueError(f"cannot serve this 2D inference config: 'postprocessing' is not a Compose with a list of "
                         f"transforms (got {post!r}), so the channel squeeze for 2D labels cannot be appended")
    out = json.loads(json.dumps(config))
    out["postprocessing"]["transforms"].append(dict(SQUEEZE_2D))
    return out


def _check_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"model name {name!r} must be a plain folder name (letters, digits, '_', '-', '.')")
    hits = [w for w in OTHER_TASK_WORDS if w in name.lower()]
    if hits:
        raise ValueError(f"model name {name!r} contains {hits}: MONAI Label would not serve it as a segmentation model")


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4, ensure_ascii=False) + "\n")


def prepare_app(
    bundle: str | Path,
    app: str | Path,
    checkpoints: str | Path | None = None,
    teacher: str | Path | None = None,
    name: str | None = None,
    recipes: Sequence[str | Path] = (),
    overrides: Mapping | None = None,
    sample_app: str | Path | None = None,
    label_venv: str | Path = ROOT / ".venv-label",
) -> Path:
    """Write the served copy of ``bundle`` to ``<app>/model/<name>`` (and the sample app to ``app`` if missing).

    Args:
        bundle: bundle folder or name under ``bundles/``.
        app: the MONAI Label app folder (``--app`` of ``monailabel start_server``).
        checkpoints: folder holding the trained ``model.pt`` (and the stage outputs train.json loads);
            default ``<bundle>/models``.
        teacher: a teacher checkpoint to serve as ``models/teacher.pt`` (KD bundles whose teacher was trained
            elsewhere, e.g. by the supervised bundle); default: whatever ``checkpoints`` holds.
        name: served model name (the folder under ``<app>/model``, ``--conf models <name>``, ``/infer/<name>``);
            default the bundle's folder name.
        recipes: recipe files merged into inference.json and train.json, in order (relative to ``configs/``).
        overrides: config ids -> values applied to both configs after the recipes (e.g. ``{"roi_size": [...]}``).
        sample_app: the ``monaibundle`` app to copy; default the one in ``label_venv``.
        label_venv: the MONAI Label environment (only used to find the sample app).

    Returns:
        The served bundle folder ``<app>/model/<name>``.
    """
    src = bundle_dir(bundle)
    name = name or src.name
    _check_name(name)
    ckpt = Path(checkpoints) if checkpoints is not None else src / "models"
    if not (ckpt / "model.pt").is_file():
        raise FileNotFoundError(f"no trained student {ckpt / 'model.pt'}: train the bundle first or pass --checkpoints")
    if teacher is not None and not Path(teacher).is_file():
        raise FileNotFoundError(f"teacher checkpoint {teacher} not found")
    if isinstance(recipes, (str, Path)):
        recipes = [r for r in str(recipes).split(",") if r]

    configs = src / "configs"
    # everything is computed before anything is written, so bad input changes nothing on disk
    infer = merged_config(configs / "inference.json", recipes, overrides)
    served = {"inference.json": served_inference(infer)}
    if (configs / "train.json").is_file():
        served["train.json"] = merged_config(configs / "train.json", recipes, {**(overrides or {}), **LABEL_TRAIN_OVERRIDES})
    if teacher is not None and "teacher_ckpt" not in served.get("train.json", {}):
        raise ValueError(f"{src.name} has no teacher_ckpt in train.json: it takes no --teacher")
    served["metadata.json"] = served_metadata(json.loads((configs / "metadata.json").read_text()), infer.get("spatial_dims"))

    app = Path(app)
    template = None
    if not (app / "main.py").is_file():
        template = Path(sample_app) if sample_app is not None else sample_app_dir(label_venv)
        if not (template / "main.py").is_file():
            raise FileNotFoundError(f"{template} is not a MONAI Label app (no main.py)")

    if template is not None:
        shutil.copytree(template, app, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    out = app / "model" / name
    if out.exists():
        shutil.rmtree(out)
    (out / "models").mkdir(parents=True)
    for filename, config in served.items():
        _write_json(out / "configs" / filename, config)
    for extra in ("logging.conf", "multi_gpu_train.json"):
        if (configs / extra).is_file():
            shutil.copy2(configs / extra, out / "configs" / extra)
    for extra in ("LICENSE", "large_files.yml"):
        if (src / extra).is_file():
            shutil.copy2(src / extra, out / extra)
    if (src / "docs").is_dir():
        shutil.copytree(src / "docs", out / "docs")
    for pt in sorted(ckpt.glob("*.pt")):
        if not pt.name.endswith("_state.pt"):
            shutil.copy2(pt, out / "models" / pt.name)
    if teacher is not None:
        shutil.copy2(teacher, out / "models" / "teacher.pt")
    return out


def main(bundle: str, app: str, checkpoints: str | None = None, teacher: str | None = None, name: str | None = None,
         recipes=(), overrides: str | dict | None = None, sample_app: str | None = None,
         label_venv: str = str(ROOT / ".venv-label")):
    """Command-line entry (fire): ``--overrides`` is a JSON object (or a dict from fire)."""
    if isinstance(overrides, str):
        overrides = json.loads(overrides)
    out = prepare_app(bundle, app, checkpoints, teacher, name, recipes, overrides, sample_app, label_venv)
    print(f"served bundle: {out}\nstart: monailabel start_server --app {app} --studies <images> "
          f"--conf models {out.name} --conf zoo_source github --conf sam2 false --host 127.0.0.1 --port 8000")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
