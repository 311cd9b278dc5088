"""Serving medkd bundles with MONAI Label (docs/monai_label.md, tools/monai_label/).

Two parts:

- ``tools/monai_label/prepare_app.py`` (the served copy of a bundle): config merging, the MONAI Label overrides, the
  2D squeeze, metadata, checkpoints, errors. These run everywhere (``make test``).
- A real MONAI Label server (the ``monaibundle`` sample app, MONAI Label 0.8.5 in its own environment) started on a
  free localhost port, serving the EMKD student trained here as a 3D recipe and as the 2D bundle: ``/info/``,
  ``/infer`` over HTTP on NIfTI uploads (compared with the bundle's own ``inference.json`` run in this process) and
  one epoch of ``/train`` (KD with the teacher, through ``BundleTrainTask``). These need the MONAI Label environment
  and run only where ``MEDKD_LABEL_VENV`` names it: ``make test-label`` (which builds ``.venv-label``) sets it; a
  plain ``make test`` skips them with that reason. A set variable whose environment is missing is a failure.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLES, ROOT, TINY_2D, TINY_3D, run_workflow, workflow
from monai.bundle import ConfigParser

_spec = importlib.util.spec_from_file_location("prepare_app", ROOT / "tools" / "monai_label" / "prepare_app.py")
prepare_app_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare_app_module)
prepare_app = prepare_app_module.prepare_app
merged_config = prepare_app_module.merged_config

BUNDLE = "emkd_segmentation"
CLASSES = {0, 1, 2}  # background, grey matter, white matter (metadata channel_def)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# ----------------------------------------------------------------------------------------------------------------------
# prepare_app: the served copy of a bundle (no MONAI Label needed)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def fake_sample_app(tmp_path) -> Path:
    app = tmp_path / "sample"
    (app / "lib").mkdir(parents=True)
    (app / "main.py").write_text("# sample app\n")
    (app / "lib" / "x.py").write_text("")
    (app / "__pycache__").mkdir()
    (app / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"")
    return app


@pytest.fixture()
def checkpoints(tmp_path) -> Path:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("model.pt", "paraphraser.pt", "train_state.pt", "paraphraser_state.pt"):
        (ckpt / name).write_bytes(name.encode())
    return ckpt


def test_merged_config_is_the_bundle_cli_merge():
    """A recipe replaces its top-level keys and its ``a#b`` ids; everything else is the bundle's config."""
    cdir = BUNDLES / "graph_flow_segmentation" / "configs"
    base, recipe = read_json(cdir / "train.json"), read_json(cdir / "recipes" / "demo_3d.json")
    overrides = {"val_interval": 7, "train#dataloader#shuffle": False}
    merged = merged_config(cdir / "train.json", ["recipes/demo_3d.json"], overrides)
    assert merged["spatial_dims"] == 3 and merged["roi_size"] == recipe["roi_size"] == [64, 64, 64]
    assert merged["dataset_dir"] == recipe["dataset_dir"] and merged["val_interval"] == 7
    assert merged["discriminator"]["conv_dim"] == 16
    assert {k: v for k, v in merged["discriminator"].items() if k != "conv_dim"} == \
        {k: v for k, v in base["discriminator"].items() if k != "conv_dim"}
    assert merged["train"]["dataloader"]["shuffle"] is False
    untouched = set(base) - {"spatial_dims", "roi_size", "dataset_dir", "batch_size", "val_batch_size", "val_interval",
                             "discriminator", "train"}
    assert {k: merged[k] for k in untouched} == {k: base[k] for k in untouched}
    assert {k: v for k, v in merged["train"].items() if k != "dataloader"} == \
        {k: v for k, v in base["train"].items() if k != "dataloader"}
    # the same merge as `monai.bundle run --config_file "['train.json', 'recipes/demo_3d.json']"`
    parser = ConfigParser()
    parser.read_config([str(cdir / "train.json"), str(cdir / "recipes" / "demo_3d.json")])
    cli = {k: v for k, v in json.loads(json.dumps(parser.get())).items() if k != "_meta_"}
    assert merged_config(cdir / "train.json", ["recipes/demo_3d.json"]) == cli


def test_prepare_app_2d(tmp_path, fake_sample_app, checkpoints):
    app = tmp_path / "app"
    teacher = tmp_path / "elsewhere" / "model.pt"
    teacher.parent.mkdir()
    teacher.write_bytes(b"teacher")
    out = prepare_app(BUNDLE, app, checkpoints=checkpoints, teacher=teacher, sample_app=fake_sample_app)
    assert out == app / "model" / BUNDLE
    assert (app / "main.py").is_file() and (app / "lib" / "x.py").is_file() and not (app / "__pycache__").exists()
    # stage outputs and the teacher; no resume state (*_state.pt)
    assert sorted(p.name for p in (out / "models").iterdir()) == ["model.pt", "paraphraser.pt", "teacher.pt"]
    assert (out / "models" / "model.pt").read_bytes() == b"model.pt"
    assert (out / "models" / "teacher.pt").read_bytes() == b"teacher"
    for name in ("LICENSE", "docs/README.md", "configs/logging.conf", "configs/multi_gpu_train.json"):
        assert (out / name).is_file(), name

    src = BUNDLES / BUNDLE / "configs"
    infer, infer_src = read_json(out / "configs" / "inference.json"), read_json(src / "inference.json")
    assert infer["postprocessing"]["transforms"][:-1] == infer_src["postprocessing"]["transforms"]
    assert infer["postprocessing"]["transforms"][-1] == {"_target_": "SqueezeDimd", "keys": "pred", "dim": 0}
    assert {k: v for k, v in infer.items() if k != "postprocessing"} == \
        {k: v for k, v in infer_src.items() if k != "postprocessing"}
    parser = ConfigParser(infer)
    parser["bundle_root"] = str(out)
    assert type(parser.get_parsed_content("postprocessing").transforms[-1]).__name__ == "SqueezeDimd"

    train, train_src = read_json(out / "configs" / "train.json"), read_json(src / "train.json")
    assert train["resume"] is False and train["val_interval"] == 1 and train_src["resume"] is True
    assert {k: v for k, v in train.items() if k not in ("resume", "val_interval")} == \
        {k: v for k, v in train_src.items() if k not in ("resume", "val_interval")}
    assert read_json(out / "configs" / "metadata.json") == read_json(src / "metadata.json")


def test_prepare_app_3d_recipe_and_refresh(tmp_path, fake_sample_app, checkpoints):
    app = tmp_path / "app"
    prepare_app(BUNDLE, app, checkpoints=checkpoints, sample_app=fake_sample_app)
    (app / "main.py").write_text("# kept\n")
    out = prepare_app(BUNDLE, app, checkpoints=checkpoints, name="emkd_3d", recipes=["recipes/demo_3d.json"],
                      overrides={"roi_size": [32, 32, 32]}, sample_app=fake_sample_app)
    assert (app / "main.py").read_text() == "# kept\n"  # an existing app is not overwritten
    assert sorted(p.name for p in (app / "model").iterdir()) == sorted([BUNDLE, "emkd_3d"])
    infer = read_json(out / "configs" / "inference.json")
    assert infer["spatial_dims"] == 3 and infer["roi_size"] == [32, 32, 32]
    assert infer["postprocessing"] == read_json(BUNDLES / BUNDLE / "configs" / "inference.json")["postprocessing"]
    train = read_json(out / "configs" / "train.json")
    got = (train["spatial_dims"], train["roi_size"], train["resume"], train["val_interval"])
    assert got == (3, [32, 32, 32], False, 1)
    fmt = read_json(out / "configs" / "metadata.json")["network_data_format"]
    src_fmt = read_json(BUNDLES / BUNDLE / "configs" / "metadata.json")["network_data_format"]
    for group in ("inputs", "outputs"):
        for key, tensor in fmt[group].items():
            assert tensor["spatial_shape"] == [src_fmt[group][key]["spatial_shape"][0]] * 3
            assert {k: v for k, v in tensor.items() if k != "spatial_shape"} == \
                {k: v for k, v in src_fmt[group][key].items() if k != "spatial_shape"}
    # a second run replaces the served folder (nothing stale is left)
    (out / "models" / "stale.pt").write_bytes(b"")
    prepare_app(BUNDLE, app, checkpoints=checkpoints, name="emkd_3d", sample_app=fake_sample_app)
    assert not (out / "models" / "stale.pt").exists()
    assert read_json(out / "configs" / "inference.json")["spatial_dims"] == 2


def test_prepare_app_errors(tmp_path, fake_sample_app, checkpoints):
    app = tmp_path / "app"
    with pytest.raises(FileNotFoundError, match="no trained student .*model.pt"):
        prepare_app(BUNDLE, app, checkpoints=tmp_path, sample_app=fake_sample_app)
    with pytest.raises(FileNotFoundError, match="recipe 'recipes/nope.json' not found"):
        prepare_app(BUNDLE, app, checkpoints=checkpoints, recipes=["recipes/nope.json"], sample_app=fake_sample_app)
    with pytest.raises(FileNotFoundError, match="'no_such_bundle' is not a bundle folder.*emkd_segmentation"):
        prepare_app("no_such_bundle", app, checkpoints=checkpoints, sample_app=fake_sample_app)
    with pytest.raises(ValueError, match="plain folder name"):
        prepare_app(BUNDLE, app, checkpoints=checkpoints, name="a,b", sample_app=fake_sample_app)
    with pytest.raises(ValueError, match=r"\['deepedit'\]"):
        prepare_app(BUNDLE, app, checkpoints=checkpoints, name="my_deepedit", sample_app=fake_sample_app)
    with pytest.raises(FileNotFoundError, match="teacher checkpoint .*nope.pt not found"):
        prepare_app(BUNDLE, app, checkpoints=checkpoints, teacher=tmp_path / "nope.pt", sample_app=fake_sample_app)
    with pytest.raises(ValueError, match="acw_skd_segmentation has no teacher_ckpt"):
        prepare_app("acw_skd_segmentation", app, checkpoints=checkpoints, teacher=checkpoints / "model.pt",
                    sample_app=fake_sample_app)
    with pytest.raises(FileNotFoundError, match="make label-env"):
        prepare_app(BUNDLE, app, checkpoints=checkpoints, label_venv=tmp_path / "no_venv")
    assert not app.exists()  # nothing written on bad input


# ----------------------------------------------------------------------------------------------------------------------
# A real MONAI Label server (needs the MONAI Label environment: make test-label)
# ----------------------------------------------------------------------------------------------------------------------

LABEL_VENV = os.environ.get("MEDKD_LABEL_VENV")
needs_label_env = pytest.mark.skipif(
    not LABEL_VENV,
    reason="MONAI Label server test: needs the MONAI Label environment; run `make test-label` (builds .venv-label "
           "and sets MEDKD_LABEL_VENV)",
)
SERVER_START_TIMEOUT = 300  # s; the first start after an install also compiles the environment's .pyc files
TRAIN_TIMEOUT = 600  # s


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body and its content type (the stdlib has no encoder)."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    for key, (filename, data) in files.items():
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n")
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class Server:
    """A MONAI Label server process (its own process group) and its log."""

    def __init__(self, python: Path, app: Path, studies: Path, models: list[str], workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "server.log"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        env.update(MONAI_LABEL_SESSION_PATH=str(workdir / "sessions"), BUNDLE_DOWNLOAD_SRC="github",
                   PYTHONUNBUFFERED="1")
        cmd = [str(python), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
               "--host", "127.0.0.1", "--port", str(self.port), "--conf", "models", ",".join(models),
               "--conf", "zoo_source", "github", "--conf", "sam2", "false"]
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def log(self, tail: int = 80) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.is_file() else []
        return "\n".join(lines[-tail:])

    def fail(self, message: str):
        pytest.fail(f"{message}\n--- MONAI Label server log (last lines) ---\n{self.log()}")

    def wait_ready(self, timeout: float = SERVER_START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.fail(f"the server exited with code {self.proc.returncode} before answering")
            try:
                with urllib.request.urlopen(f"{self.url}/info/", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.fail(f"the server did not answer GET /info/ within {timeout} s")

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                timeout: float = 300) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            self.fail(f"{method} {path} answered {e.code}: {e.read()[:2000]!r}")

    def get_json(self, path: str):
        return json.loads(self.request("GET", path))

    def infer(self, model: str, image: Path, workdir: Path) -> nib.Nifti1Image:
        """``POST /infer/<model>?output=image`` with ``image`` uploaded; the returned label as NIfTI."""
        params = {"params": json.dumps({"result_dtype": "uint8"})}
        body, ctype = multipart(params, {"file": (image.name, image.read_bytes())})
        data = self.request("POST", f"/infer/{model}?output=image", body, ctype)
        out = workdir / f"{model}_{image.name}"
        out.write_bytes(data)
        nifti1_header_size = (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c")  # 348, either byte order
        assert gzip.decompress(data)[:4] in nifti1_header_size, "the answer is not a gzipped NIfTI-1 file"
        return nib.load(str(out))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its training subprocess, if any
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


def train_student(data: Path, out: Path, configs: list[str], tiny: dict, epochs: int) -> tuple[Path, Path]:
    """A short supervised teacher, then the EMKD student (``epochs`` epochs) distilled from it: the student's
    checkpoint folder and the teacher's model.pt."""
    short = {**tiny, "epochs": epochs, "val_interval": epochs}
    run_workflow("supervised_segmentation", configs, dataset_dir=str(data), ckpt_dir=str(out / "teacher"),
                 output_dir=str(out / "teacher" / "eval"), **{**tiny, "epochs": 2, "val_interval": 2})
    run_workflow(BUNDLE, configs, dataset_dir=str(data), ckpt_dir=str(out / "student"),
                 output_dir=str(out / "student" / "eval"), teacher_ckpt=str(out / "teacher" / "model.pt"), **short)
    return out / "student", out / "teacher" / "model.pt"


def reference_labels(data: Path, ckpt: Path, configs: list[str], tiny: dict, out: Path) -> dict[str, np.ndarray]:
    """The bundle's own inference.json (this environment, no MONAI Label) on the test split: image name -> label."""
    wf = workflow(BUNDLE, configs, "infer", dataset_dir=str(data), ckpt_dir=str(ckpt), output_dir=str(out),
                  roi_size=tiny["roi_size"])
    wf.run()
    wf.finalize()
    return {p.name.replace("_seg.nii.gz", ".nii.gz"): np.asarray(nib.load(str(p)).dataobj)
            for p in out.glob("*_seg.nii.gz")}


@pytest.fixture(scope="module")
def label_python() -> Path:
    python = Path(LABEL_VENV) / "bin" / "python"
    if not python.is_file():
        pytest.fail(f"MEDKD_LABEL_VENV={LABEL_VENV} has no bin/python: build it with `make label-env`")
    return python


@pytest.fixture(scope="module")
def served(label_python, tiny2d, tiny3d, tmp_path_factory):
    """EMKD students (3D recipe and 2D) trained here, served by one MONAI Label server; stopped at the end."""
    work = tmp_path_factory.mktemp("monai_label")
    cfg3d, cfg2d = ["train.json", "recipes/demo_3d.json"], ["train.json"]
    ckpt3d, teacher3d = train_student(tiny3d, work / "train3d", cfg3d, TINY_3D, epochs=20)
    ckpt2d, teacher2d = train_student(tiny2d, work / "train2d", cfg2d, TINY_2D, epochs=20)
    refs = {
        "3d": reference_labels(tiny3d, ckpt3d, ["inference.json", "recipes/demo_3d.json"], TINY_3D, work / "ref3d"),
        "2d": reference_labels(tiny2d, ckpt2d, ["inference.json"], TINY_2D, work / "ref2d"),
    }
    app = work / "app"
    sample = Path(LABEL_VENV) / "monailabel" / "sample-apps" / "monaibundle"
    names = {"3d": "emkd_3d_segmentation", "2d": BUNDLE}
    prepare_app(BUNDLE, app, checkpoints=ckpt3d, teacher=teacher3d, name=names["3d"], recipes=["recipes/demo_3d.json"],
                overrides={"roi_size": TINY_3D["roi_size"], "batch_size": 1, "val_batch_size": 1}, sample_app=sample)
    prepare_app(BUNDLE, app, checkpoints=ckpt2d, teacher=teacher2d, name=names["2d"],
                overrides={"roi_size": TINY_2D["roi_size"]}, sample_app=sample)

    # the datastore: the 3D training and validation subjects with final labels (MONAI Label trains on those)
    studies = work / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    datalist = read_json(tiny3d / "datalist.json")
    for item in datalist["training"] + datalist["validation"]:
        name = Path(item["image"]).name
        (studies / name).write_bytes((tiny3d / item["image"]).read_bytes())
        (studies / "labels" / "final" / name).write_bytes((tiny3d / item["label"]).read_bytes())
    tests = {dims: [ds / d["image"] for d in read_json(ds / "datalist.json")["test"]]
             for dims, ds in (("3d", tiny3d), ("2d", tiny2d))}

    server = Server(label_python, app, studies, list(names.values()), work)
    try:
        server.wait_ready()
        yield {"server": server, "app": app, "names": names, "refs": refs, "tests": tests, "work": work}
    finally:
        server.stop()


@needs_label_env
def test_server_lists_the_served_bundles(served):
    server, names = served["server"], served["names"]
    info = server.get_json("/info/")
    for dims, name in names.items():
        model = info["models"][name]
        assert model["type"] == "segmentation" and model["dimension"] == int(dims[0])
        assert model["labels"] == {"grey matter": 1, "white matter": 2}
        assert "model.pt" in model["config"]["model_filename"]
        assert name in info["trainers"]
    log = server.log_path.read_text(errors="replace")
    for name in names.values():
        assert f"Adding Bundle from Local: {name}" in log
    assert "Downloading" not in log and "from NGC" not in log and "sam_2d" not in info["models"]


@needs_label_env
@pytest.mark.parametrize("dims", ["3d", "2d"])
def test_infer_over_http(served, dims):
    """The label of an uploaded NIfTI has the image's shape (and affine in 3D), the bundle's classes, foreground, and
    matches the bundle's own inference.json run without MONAI Label."""
    server, name = served["server"], served["names"][dims]
    for image_path in served["tests"][dims][:2]:
        image = nib.load(str(image_path))
        label = server.infer(name, image_path, served["work"])
        values = np.asarray(label.dataobj)
        assert values.shape == image.shape, f"{name}: label {values.shape} vs image {image.shape}"
        if dims == "3d":
            np.testing.assert_allclose(label.affine, image.affine, atol=1e-4)
        assert set(np.unique(values).tolist()) <= CLASSES
        assert (values > 0).mean() > 0.01, f"{name}: (nearly) all background for {image_path.name}"
        ref = served["refs"][dims][image_path.name]
        assert ref.shape == values.shape
        agreement = (ref == values).mean()
        print(f"{name} {image_path.name}: foreground {(values > 0).mean():.3f}, "
              f"agreement with inference.json {agreement:.5f}")
        assert agreement > 0.999, f"{name}: MONAI Label and the bundle's inference.json agree on only {agreement:.4f}"


@needs_label_env
def test_train_one_epoch_writes_a_new_model(served):
    """``POST /train/<name>``: one epoch of EMKD (teacher loaded from the served bundle) on the datastore's labelled
    volumes through MONAI Label's BundleTrainTask; the student's model.pt is rewritten and served next."""
    server, name = served["server"], served["names"]["3d"]
    model_pt = served["app"] / "model" / name / "models" / "model.pt"
    before = hashlib.sha256(model_pt.read_bytes()).hexdigest()
    keys_before = set(torch.load(model_pt, weights_only=True))
    request = {"max_epochs": 1, "val_split": 0.5, "multi_gpu": False, "device": "cpu"}
    task = json.loads(server.request("POST", f"/train/{name}", json.dumps(request).encode(), "application/json"))
    assert task["status"] in ("SUBMITTED", "RUNNING", "DONE"), task
    deadline = time.monotonic() + TRAIN_TIMEOUT
    while True:
        task = server.get_json("/train/")
        if task["status"] not in ("SUBMITTED", "RUNNING"):
            break
        if time.monotonic() > deadline:
            server.fail(f"training did not finish within {TRAIN_TIMEOUT} s: {task}")
        time.sleep(1)
    if task["status"] != "DONE":
        server.fail(f"training ended with status {task['status']}:\n" + "\n".join(task.get("details", [])))
    log = server.log_path.read_text(errors="replace")  # the training subprocess logs into the server's output
    assert f"Restored all variables from {model_pt}" in log  # MONAI Label's loader of the served student
    assert "loss_pmd" in log and "val_mean_dice" in log and "Training Finished" in log  # KD terms, validation
    assert hashlib.sha256(model_pt.read_bytes()).hexdigest() != before, "training did not write a new model.pt"
    assert set(torch.load(model_pt, weights_only=True)) == keys_before  # still the student alone

    image_path = served["tests"]["3d"][0]
    label = server.infer(name, image_path, served["work"])
    assert np.asarray(label.dataobj).shape == nib.load(str(image_path)).shape
    assert "Reload model from cache" in server.log_path.read_text(errors="replace")
