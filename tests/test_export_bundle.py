"""`python -m medkd export-bundle`: the exported bundles pass the model-zoo checks and run outside the repository
with their vendored code only (the repository's `medkd` blocked), plus the exporter's parts on hand-made inputs."""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest
import torch
import yaml
from conftest import BUNDLES, ROOT, SCHEMA, TINY_2D, run_workflow, workflow
from monai.bundle import download_large_files, verify_metadata

import medkd
from medkd.export import (config_references, export_bundle, package_pins, release_version, render_model_card,
                          required_modules, rewrite_config, rewrite_python_imports, vendored_package_name)

EXPORTED = ["supervised_segmentation", "emkd_segmentation"]
VERSION = "0.2.0"
SOURCE_DIR = Path(medkd.__file__).resolve().parent

# Runs a module (like `python -m`) with the repository's medkd made unimportable, and records at exit every loaded
# module whose name mentions medkd, with its file.
BLOCKED_RUN = """
import atexit, importlib.abc, json, os, runpy, sys

class BlockRepositoryMedkd(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "medkd" or name.startswith("medkd."):
            raise ModuleNotFoundError(f"blocked import of {name}: the exported bundle must use its vendored copy", name=name)
        return None

sys.meta_path.insert(0, BlockRepositoryMedkd())
report, module = sys.argv[1], sys.argv[2]
sys.argv = [module, *sys.argv[3:]]
sys.path[0] = os.getcwd()

def dump():
    with open(report, "w") as f:
        json.dump({n: getattr(m, "__file__", None) for n, m in list(sys.modules.items()) if "medkd" in n}, f)

atexit.register(dump)
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""

# The zoo's CI checks of one bundle, run (blocked, outside the repository) as `zoo_checks BUNDLE DATA OUT`.
ZOO_CHECKS = """
import json, sys
from pathlib import Path

import torch
from monai.bundle import ConfigWorkflow, ckpt_export, verify_net_in_out

root, data, out = (Path(a) for a in sys.argv[1:4])
cfg = root / "configs"
try:
    import medkd
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the repository's medkd is importable")
missing = {}
for name, files, kind in (("train", ["train.json"], "train"), ("evaluate", ["train.json", "evaluate.json"], "train"),
                          ("infer", ["inference.json"], "infer")):
    wf = ConfigWorkflow(config_file=[str(cfg / f) for f in files], meta_file=str(cfg / "metadata.json"),
                        logging_file=str(cfg / "logging.conf"), workflow_type=kind, bundle_root=str(root),
                        dataset_dir=str(data), output_dir=str(out / name), ckpt_dir=str(out / name))
    wf.initialize()
    missing[name] = wf.check_properties() or []
verify_net_in_out(net_id="network_def", meta_file=str(cfg / "metadata.json"), config_file=str(cfg / "inference.json"))
ckpt_export(net_id="network_def", filepath=str(out / "model.ts"), ckpt_file=str(root / "models" / "model.pt"),
            meta_file=str(cfg / "metadata.json"), config_file=str(cfg / "inference.json"), bundle_root=str(root))
scripted = torch.jit.load(str(out / "model.ts"))
with torch.no_grad():
    torch.save(scripted(torch.load(out / "x.pt")), out / "y.pt")
(out / "properties.json").write_text(json.dumps(missing))
"""


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def students(tiny2d, teacher_2d, tmp_path_factory) -> dict[str, Path]:
    """Each bundle's student trained for an epoch on the tiny data: the supervised bundle's network_def is the
    one-epoch teacher fixture itself; EMKD's student is distilled from it."""
    ckpt = tmp_path_factory.mktemp("emkd_student")
    run_workflow("emkd_segmentation", ["train.json"], dataset_dir=str(tiny2d), ckpt_dir=str(ckpt),
                 output_dir=str(ckpt / "eval"), teacher_ckpt=str(teacher_2d), **TINY_2D)
    return {"supervised_segmentation": teacher_2d, "emkd_segmentation": ckpt / "model.pt"}


@pytest.fixture(scope="module")
def exported(students, teacher_2d, tmp_path_factory) -> dict[str, Path]:
    """Both bundles exported to a temporary folder: the supervised one with the command line, EMKD (with its
    teacher) with the Python API."""
    out = tmp_path_factory.mktemp("zoo")
    done = subprocess.run([sys.executable, "-m", "medkd", "export-bundle", str(BUNDLES / "supervised_segmentation"),
                           "--out", str(out / "supervised_segmentation"), "--ckpt", str(students["supervised_segmentation"]),
                           "--version", VERSION], cwd=out, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "wrote" in done.stdout and "supervised_segmentation_medkd" in done.stdout
    report = export_bundle(BUNDLES / "emkd_segmentation", out / "emkd_segmentation", version=VERSION,
                           ckpt=students["emkd_segmentation"], teacher=teacher_2d)
    assert report.package == "emkd_segmentation_medkd" and not report.whole_package and not report.large_files
    return {b: out / b for b in EXPORTED}


def text_files(root: Path):
    for path in root.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".py", ".md", ".yml", ".conf", ""):
            yield path, path.read_text()


@pytest.mark.parametrize("bundle", EXPORTED)
def test_export_passes_the_zoo_file_metadata_and_format_checks(bundle, exported, students):
    root, src = exported[bundle], BUNDLES / bundle
    for name in ("LICENSE", "large_files.yml", "docs/README.md", "configs/metadata.json", "configs/train.json",
                 "configs/evaluate.json", "configs/inference.json", "configs/multi_gpu_train.json",
                 "configs/logging.conf", "models/model.pt"):
        assert (root / name).is_file(), f"export of {bundle} lacks {name}"
    assert (root / "LICENSE").read_bytes() == (src / "LICENSE").read_bytes()
    assert yaml.safe_load((root / "large_files.yml").read_text()) == {"large_files": []}  # nothing over 25 MB

    meta_file = root / "configs" / "metadata.json"
    verify_metadata(meta_file=str(meta_file), filepath=str(SCHEMA))
    meta = json.loads(meta_file.read_text())
    assert meta["version"] == VERSION and VERSION in meta["changelog"]
    assert list(meta["changelog"])[0] == VERSION  # newest first, the bundle's history kept
    assert set(json.loads((src / "configs" / "metadata.json").read_text())["changelog"]) < set(meta["changelog"])
    assert meta["required_packages_version"] == meta["optional_packages_version"]
    installed = {"monai_version": "monai", "pytorch_version": "torch", "numpy_version": "numpy",
                 **{k: k for k in meta["required_packages_version"]}}
    pinned = {**meta["required_packages_version"], **{k: meta[k] for k in ("monai_version", "pytorch_version", "numpy_version")}}
    for key, dist in installed.items():  # the installed release, without a local build label
        assert pinned[key] == importlib.metadata.version(dist).split("+")[0], key
        assert re.fullmatch(r"\d+(\.\d+)+", pinned[key]), (key, pinned[key])
    assert {"nibabel", "pytorch-ignite", "scipy"} <= set(meta["required_packages_version"])
    assert "medkd" not in meta["required_packages_version"]

    formatted = load_tool("format_json").formatted
    for path in (root / "configs").rglob("*.json"):
        assert path.read_text() == formatted(path), f"{path.relative_to(root)} is not zoo-formatted"
    train = json.loads((root / "configs" / "train.json").read_text())
    assert all(isinstance(h, dict) and "_target_" in h for h in train["train"]["handlers"])

    # no reference to the repository's medkd, its data folder or its location survives
    package = vendored_package_name(bundle)
    for path in (root / "configs").rglob("*.json"):
        text = path.read_text()
        assert "../" not in text, path
        if path.name != "metadata.json":
            assert not re.search(r"(?<![\w./-])medkd(?![\w-])", text), f"{path.name} still names medkd"
    assert package in (root / "configs" / "train.json").read_text()
    for path, text in text_files(root):
        assert str(ROOT) not in text, f"{path} holds the repository path"
    assert train["dataset_dir"] == "$@bundle_root + '/data/demo2d'"
    assert "`$@bundle_root + '/data/demo2d'`" in (root / "docs" / "README.md").read_text()

    # the student weights, exactly
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    trained = torch.load(students[bundle], weights_only=True)
    assert state.keys() == trained.keys() and all(torch.equal(state[k], trained[k]) for k in state)


@pytest.mark.parametrize("bundle", EXPORTED)
def test_vendored_package_is_the_source_with_renamed_imports(bundle, exported):
    root = exported[bundle]
    package = vendored_package_name(bundle)
    files = {p.relative_to(root / package) for p in (root / package).rglob("*.py")}
    assert Path("__init__.py") in files and Path("losses/logits.py") in files and Path("data/datalist.py") in files
    # the closure leaves out what no config needs: the CLI, profiling, the dataset converters
    for unused in ("cli.py", "__main__.py", "profiling.py", "export.py", "demo.py", "data/convert.py", "data/datasets.py"):
        assert Path(unused) not in files, unused
    for rel in files:
        text = (root / package / rel).read_text()
        for node in ast.walk(ast.parse(text)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not any(n.split(".")[0] == "medkd" for n in names), (rel, names)
        source = (SOURCE_DIR / rel).read_text()
        if rel == Path("__init__.py"):
            assert text == source + f'\n__vendored_from__ = "medkd {medkd.__version__}"\n'
        else:  # identical but for the import lines
            assert text.replace(f"from {package}", "from medkd") == source, rel


@pytest.mark.parametrize("bundle", EXPORTED)
def test_model_card_is_rendered_from_the_template(bundle, exported):
    card = (exported[bundle] / "docs" / "README.md").read_text()
    package = vendored_package_name(bundle)
    meta = json.loads((exported[bundle] / "configs" / "metadata.json").read_text())
    assert "{{" not in card and card.startswith(f"# {meta['name']}\n")
    assert f"Version {VERSION}" in card and "export PYTHONPATH=$BUNDLE" in card
    assert f"monai=={meta['monai_version']} torch=={meta['pytorch_version']}" in card
    assert all(f"{k}=={v}" in card for k, v in meta["required_packages_version"].items())
    own = (BUNDLES / bundle / "docs" / "README.md").read_text().splitlines()
    sections = [line for line in own[1:] if line.startswith("## ")]
    assert sections and all(f"#{line}\n" in card for line in sections)  # its sections, one level down
    assert "../../../docs" not in card
    if bundle == "emkd_segmentation":
        assert f"`{package}.losses`" in card and (exported[bundle] / "docs" / "demo_figure.png").is_file()
        assert "`models/teacher.pt`" in card


@pytest.mark.parametrize("bundle", EXPORTED)
def test_zoo_ci_checks_pass_outside_the_repository(bundle, exported, students, tiny2d, tmp_path):
    """check_properties (train, evaluate, infer), verify_net_in_out and ckpt_export, with PYTHONPATH = the bundle,
    a working directory outside the repository and the repository's medkd blocked; TorchScript = the student."""
    root = exported[bundle]
    cwd = tmp_path / "user"
    cwd.mkdir()
    (cwd / "zoo_checks.py").write_text(ZOO_CHECKS)
    (tmp_path / "blocked_run.py").write_text(BLOCKED_RUN)
    x = torch.randn(1, 1, 48, 64, generator=torch.Generator().manual_seed(0))
    torch.save(x, cwd / "x.pt")
    done = blocked_run(tmp_path, cwd, root, "zoo_checks", [str(root), str(tiny2d), str(cwd)])
    assert json.loads((cwd / "properties.json").read_text()) == {"train": [], "evaluate": [], "infer": []}
    net = workflow(bundle, ["inference.json"], workflow_type="infer").parser.get_parsed_content("network_def").eval()
    net.load_state_dict(torch.load(students[bundle], weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(torch.load(cwd / "y.pt"), net(x), atol=1e-5, rtol=1e-4)
    assert_vendored_only(done, root, bundle)


def blocked_run(tmp_path: Path, cwd: Path, root: Path, module: str, args: list[str]) -> dict:
    """Run ``python -m module args`` from ``cwd`` with ``PYTHONPATH=root`` and medkd blocked; returns the loaded
    medkd-like modules and their files."""
    assert ROOT not in cwd.resolve().parents and ROOT not in root.resolve().parents
    report = cwd / f"modules_{len(list(cwd.glob('modules_*')))}.json"
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(tmp_path / "blocked_run.py"), str(report), module, *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(report.read_text())


def assert_vendored_only(modules: dict, root: Path, bundle: str) -> None:
    package = vendored_package_name(bundle)
    assert modules, "the run loaded no vendored module"
    assert modules[package] == str(root / package / "__init__.py")
    for name, file in modules.items():
        assert name == package or name.startswith(package + "."), f"{name} ({file}) was loaded"
        assert file is None or Path(file).resolve().is_relative_to(root.resolve()), (name, file)


@pytest.mark.slow  # three `monai.bundle run` processes per bundle: 35-50 s each on 2 busy cores
@pytest.mark.parametrize("bundle", EXPORTED)
def test_exported_bundle_trains_evaluates_and_infers_outside_the_repository(bundle, exported, tiny2d, tmp_path):
    """`python -m monai.bundle run` of train, train+evaluate and inference, as a zoo user runs them."""
    root = exported[bundle]
    cwd = tmp_path / "user"
    cwd.mkdir()
    (tmp_path / "blocked_run.py").write_text(BLOCKED_RUN)
    configs = root / "configs"
    tiny = ["--dataset_dir", str(tiny2d), "--bundle_root", str(root)]
    for key, value in TINY_2D.items():
        tiny += [f"--{key}", json.dumps(value)]
    run = tmp_path / "run"
    modules = blocked_run(tmp_path, cwd, root, "monai.bundle",
                          ["run", "--config_file", str(configs / "train.json"), *tiny, "--ckpt_dir", str(run),
                           "--output_dir", str(run / "eval")])
    assert_vendored_only(modules, root, bundle)
    student = workflow(bundle, ["inference.json"], workflow_type="infer").parser.get_parsed_content("network_def")
    assert set(torch.load(run / "model.pt", weights_only=True)) == set(student.state_dict())

    test_items = json.loads((tiny2d / "datalist.json").read_text())["test"]
    evaluation = tmp_path / "evaluate"  # the shipped models/model.pt
    assert_vendored_only(blocked_run(tmp_path, cwd, root, "monai.bundle",
                                     ["run", "--config_file", str([str(configs / "train.json"), str(configs / "evaluate.json")]),
                                      *tiny, "--output_dir", str(evaluation)]), root, bundle)
    assert len((evaluation / "val_mean_dice_raw.csv").read_text().splitlines()) == 1 + len(test_items)

    inference = tmp_path / "inference"
    assert_vendored_only(blocked_run(tmp_path, cwd, root, "monai.bundle",
                                     ["run", "--config_file", str(configs / "inference.json"), "--dataset_dir", str(tiny2d),
                                      "--bundle_root", str(root), "--roi_size", json.dumps(TINY_2D["roi_size"]),
                                      "--output_dir", str(inference)]), root, bundle)
    segs = sorted(inference.glob("*_seg.nii.gz"))
    assert len(segs) == len(test_items)
    assert set(torch.as_tensor(nib.load(segs[0]).get_fdata()).unique().tolist()) <= {0.0, 1.0, 2.0}
    # the runs wrote only where they were told to: the shipped bundle is unchanged
    shipped = {"model.pt", "teacher.pt"} if bundle == "emkd_segmentation" else {"model.pt"}
    assert not (root / "eval").exists() and {p.name for p in (root / "models").iterdir()} == shipped


def test_missing_or_mismatching_student_is_a_clear_error_and_writes_nothing(teacher_2d, tmp_path):
    src = tmp_path / "emkd_segmentation"  # a copy without models/: a bundle nobody has trained
    shutil.copytree(BUNDLES / "emkd_segmentation", src, ignore=shutil.ignore_patterns("models", "eval"))
    out = tmp_path / "out" / "emkd_segmentation"
    with pytest.raises(FileNotFoundError, match=r"no trained student to export: .*models/model\.pt does not exist.*--ckpt"):
        export_bundle(src, out)
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        export_bundle(src, out, ckpt=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"does not match network_def \(UNet\)"):
        export_bundle(src, out, ckpt=teacher_2d)  # the teacher's weights are not the student's
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_second_export_refuses_and_overwrite_replaces_atomically(exported, students, tmp_path):
    out = tmp_path / "supervised_segmentation"
    shutil.copytree(exported["supervised_segmentation"], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_bundle(BUNDLES / "supervised_segmentation", out, ckpt=students["supervised_segmentation"])
    with pytest.raises(ValueError, match="not of the form X.Y.Z"):
        export_bundle(BUNDLES / "supervised_segmentation", out, ckpt=students["supervised_segmentation"], version="1.0",
                      overwrite=True)
    # an overwrite that fails while writing (here: the model card) keeps the old export as it was
    (tmp_path / "template.md").write_text("# {{ name }} {{ no_such_value }}\n")
    with pytest.raises(KeyError, match="no_such_value"):
        export_bundle(BUNDLES / "supervised_segmentation", out, ckpt=students["supervised_segmentation"],
                      overwrite=True, template=tmp_path / "template.md")
    (tmp_path / "template.md").unlink()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    export_bundle(BUNDLES / "supervised_segmentation", out, ckpt=students["supervised_segmentation"], version="0.3.0",
                  overwrite=True)
    assert json.loads((out / "configs" / "metadata.json").read_text())["version"] == "0.3.0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["supervised_segmentation"]  # no staging or old copies left
    with pytest.raises(ValueError, match="overlaps the source bundle"):
        export_bundle(BUNDLES / "supervised_segmentation", BUNDLES / "supervised_segmentation" / "zoo", overwrite=True)


def test_large_files_leave_the_bundle_with_their_hash_and_download_back(exported, students, teacher_2d, tmp_path):
    """With a 1 MB limit the 6.5 MB teacher goes to the upload folder and large_files.yml; MONAI's
    download_large_files (the zoo CI's first step) fetches it back from the URL and checks its hash."""
    out, upload = tmp_path / "emkd_segmentation", tmp_path / "upload"
    report = export_bundle(BUNDLES / "emkd_segmentation", out, ckpt=students["emkd_segmentation"], teacher=teacher_2d,
                           large_file_mb=1.0, large_files_dir=upload, large_files_url=upload.as_uri())
    assert report.large_files == {"models/teacher.pt": upload / "models" / "teacher.pt"}
    assert not (out / "models" / "teacher.pt").exists() and (out / "models" / "model.pt").is_file()
    moved = upload / "models" / "teacher.pt"
    entries = yaml.safe_load((out / "large_files.yml").read_text())["large_files"]
    assert entries == [{"path": "models/teacher.pt", "url": f"{upload.as_uri()}/models/teacher.pt",
                        "hash_val": hashlib.sha256(moved.read_bytes()).hexdigest(), "hash_type": "sha256"}]
    assert "models/teacher.pt` (sha256" in (out / "docs" / "README.md").read_text()
    download_large_files(bundle_path=str(out))
    assert (out / "models" / "teacher.pt").read_bytes() == moved.read_bytes()
    teacher = torch.load(out / "models" / "teacher.pt", weights_only=True)
    original = torch.load(teacher_2d, weights_only=True)
    assert all(torch.equal(teacher[k], original[k]) for k in original)


def test_release_version_refuses_dev_and_local_builds():
    assert release_version("torch", "2.13.0+cpu") == "2.13.0"
    assert release_version("torch", "2.8.0+cu128") == "2.8.0"
    assert release_version("monai", "1.6.1") == "1.6.1"
    assert release_version("monai", "1.6.0rc1") == "1.6.0rc1"
    assert release_version("numpy") == importlib.metadata.version("numpy").split("+")[0]
    with pytest.raises(ValueError, match=r"monai 1\.6\.0\.dev2510 is a development"):
        release_version("monai", "1.6.0.dev2510")
    with pytest.raises(ValueError, match=r"monai 1\.5\.0\+12\.gabc1234 is a local build"):
        release_version("monai", "1.5.0+12.gabc1234")
    with pytest.raises(ValueError, match="medkd main is a development or non-release"):
        release_version("medkd", "main")


def test_package_pins_map_imports_to_installed_distributions():
    pins = package_pins({"os", "json", "scipy", "PIL", "torch", "monai", "numpy"}, ["nibabel"])
    assert pins == {"nibabel": importlib.metadata.version("nibabel"), "scipy": importlib.metadata.version("scipy"),
                    "pillow": importlib.metadata.version("pillow")}
    with pytest.raises(ValueError, match="'no_such_module_xyz' is imported by the exported code"):
        package_pins({"no_such_module_xyz"})


def test_rewrite_python_imports_changes_only_import_statements():
    source = '''"""Uses medkd.losses; see `python -m medkd prepare`."""
import os, medkd.io
import medkd.losses as L
from medkd.data import (
    load_datalist,
    check_datalist,
)
from .sibling import thing
medkd_like = "medkd.losses"


def f():
    from medkd import io
    return io
'''
    expected = '''"""Uses medkd.losses; see `python -m medkd prepare`."""
import os, pkg_medkd.io
import pkg_medkd.losses as L
from pkg_medkd.data import (
    load_datalist,
    check_datalist,
)
from .sibling import thing
medkd_like = "medkd.losses"


def f():
    from pkg_medkd import io
    return io
'''
    assert rewrite_python_imports(source, "pkg_medkd") == expected


def test_rewrite_config_renames_references_and_the_data_folder():
    config = {
        "imports": ["$import os", "$import medkd", "$import medkd.data"],
        "dataset_dir": "$@bundle_root + '/../../data/demo2d'",
        "net": {"_target_": "medkd.networks.ENet", "_desc_": "made with medkd", "in_channels": 1},
        "data": "$medkd.data.check_datalist(medkd.data.load_datalist(@x), 3)",
        "other": ["UNet", "$torch.nn.Identity()", "medkd_not_a_reference", "$a/medkd.json"],
    }
    assert rewrite_config(config, "b_medkd") == {
        "imports": ["$import os", "$import b_medkd", "$import b_medkd.data"],
        "dataset_dir": "$@bundle_root + '/data/demo2d'",
        "net": {"_target_": "b_medkd.networks.ENet", "_desc_": "made with medkd", "in_channels": 1},
        "data": "$b_medkd.data.check_datalist(b_medkd.data.load_datalist(@x), 3)",
        "other": ["UNet", "$torch.nn.Identity()", "medkd_not_a_reference", "$a/medkd.json"],
    }
    assert config_references(config) == {"medkd", "medkd.data", "medkd.networks.ENet", "medkd.data.check_datalist",
                                         "medkd.data.load_datalist"}
    with pytest.raises(ValueError, match="still refer to medkd"):
        rewrite_config({"x": "$medkd"}, "b_medkd")
    with pytest.raises(ValueError, match="does not give a valid Python package name"):
        vendored_package_name("my-bundle")


def test_required_modules_is_the_import_closure(tmp_path):
    src = tmp_path / "medkd"
    files = {
        "__init__.py": '"""root"""\n',
        "a/__init__.py": "from medkd.a.x import Thing\n",
        "a/x.py": "import numpy\n\n\ndef make():\n    from medkd.b import y\n    return y\n\n\nclass Thing:\n    pass\n",
        "b/__init__.py": "",
        "b/y.py": "from . import z\n",
        "b/z.py": "",
        "c.py": "import medkd.b\n",
    }
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    assert required_modules(["medkd.a.Thing"], src) == ({"medkd", "medkd.a", "medkd.a.x", "medkd.b", "medkd.b.y",
                                                         "medkd.b.z"}, False)
    assert required_modules(["medkd"], src) == ({"medkd"}, False)
    assert required_modules(["medkd.__version__"], src) == ({"medkd"}, False)  # an attribute of the package
    with pytest.raises(ValueError, match="names no module of the medkd package"):
        required_modules(["medkd.a"], tmp_path / "no_package")
    (src / "c.py").write_text("from medkd.gone import f\n")
    with pytest.raises(ValueError, match=r"c\.py imports medkd\.gone, which is not a module"):
        required_modules(["medkd.c"], src)
    (src / "c.py").write_text(files["c.py"])
    (src / "b" / "z.py").write_text("import importlib\nimportlib.import_module('medkd.c')\n")
    modules, whole = required_modules(["medkd.a"], src)
    assert whole and modules == {"medkd", "medkd.a", "medkd.a.x", "medkd.b", "medkd.b.y", "medkd.b.z", "medkd.c"}


def test_model_card_template_needs_every_placeholder():
    assert render_model_card("# {{ name }} v{{version}}", {"name": "X", "version": "1.0.0"}) == "# X v1.0.0"
    with pytest.raises(KeyError, match=r"\['version'\]"):
        render_model_card("# {{ name }} v{{ version }}", {"name": "X"})
