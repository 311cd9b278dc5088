"""Offline KD: the teacher cache serves exactly what a live teacher computes on exactly the student's view, and
refuses every cache that does not belong to the run."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUNDLES, TINY_2D, TINY_3D, error_chain, run_workflow, workflow
from ignite.engine import Events
from monai.data import Dataset
from monai.networks.nets import UNet
from monai.transforms import Compose, RandFlipd, RandScaleIntensityd

from medkd.distill import CachedTeacher, Distiller, LossTerm, ParaphrasedTeacher, TeacherCache, TeacherViews
from medkd.distill import build_teacher_cache
from medkd.distill import cache as cache_module
from medkd.losses import PredictionMapDistillation
from medkd.networks import Paraphraser

EMKD = "emkd_segmentation"


def random_teacher(configs: list[str], path: Path, seed: int = 0, **overrides) -> Path:
    """A teacher checkpoint with random weights for ``configs`` of the EMKD bundle (exactness needs no training)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLES / EMKD / "configs" / c) for c in configs])
    parser.update(overrides)
    torch.manual_seed(seed)
    torch.save(parser.get_parsed_content("teacher_def").state_dict(), path)
    return path


def build(tmp: Path, data: Path, configs: list[str], tiny: dict, views: int = 2, teacher: Path | None = None,
          **overrides) -> tuple[Path, Path]:
    teacher = teacher or random_teacher(configs, tmp / "teacher.pt", **tiny)
    cache = tmp / "cache"
    run_workflow(EMKD, [*configs, "cache_teacher.json"], check=False, dataset_dir=str(data), ckpt_dir=str(tmp / "kd"),
                 teacher_ckpt=str(teacher), cache_dir=str(cache), cache_views=views, **tiny, **overrides)
    return cache, teacher


def offline(tmp: Path, data: Path, configs: list[str], tiny: dict, cache: Path, teacher: Path, **overrides):
    """An initialised training workflow of ``configs`` reading ``cache``."""
    return workflow(EMKD, configs, dataset_dir=str(data), ckpt_dir=str(tmp / "kd"), output_dir=str(tmp / "kd" / "eval"),
                    teacher_ckpt=str(teacher), teacher_cache=str(cache), **tiny, **overrides)


@pytest.mark.parametrize("dims", [2, 3])
def test_served_outputs_equal_a_live_teacher_on_the_same_view(dims, tiny2d, tiny3d, tmp_path):
    data, tiny = (tiny2d, TINY_2D) if dims == 2 else (tiny3d, TINY_3D)
    configs = ["train.json"] if dims == 2 else ["train.json", "recipes/demo_3d.json"]
    cache, teacher = build(tmp_path, data, configs, tiny, views=2)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["views"] == 2 and manifest["dtype"] == "float16"
    assert set(manifest["taps"]) == {"low", "high"} and manifest["keys"] == ["t.logits", "t.high", "t.low"]

    wf = offline(tmp_path, data, configs, tiny, cache, teacher)
    dataset = wf.parser.get_parsed_content("train#dataloader").dataset
    trainer = wf.parser.get_parsed_content("train#trainer")
    served_by = trainer.distiller.teacher
    assert isinstance(dataset, TeacherViews) and isinstance(served_by, CachedTeacher)
    live = served_by.live
    changed = 0
    for view in range(2):
        dataset.set_epoch(view + 2)  # epoch e uses view e mod K
        for index in range(len(dataset)):
            item = dataset[index]
            again = dataset.make(index, view)
            assert torch.equal(item["image"], again["image"]) and torch.equal(item["label"], again["label"])
            reference = live(item["image"].as_subclass(torch.Tensor)[None])
            for key, value in reference.items():
                assert item[key].dtype == torch.float16
                ref = value[0]
                assert torch.allclose(item[key].float(), ref, rtol=2e-3, atol=2e-3 * float(ref.abs().max())), key
            if view == 1:
                first = dataset.make(index, 0)
                changed += not torch.equal(first["image"], item["image"])
    assert changed > 0, "the two recorded views should differ for some item (random crop/flip/intensity)"


def captured_batches(wf) -> list[tuple[torch.Tensor, torch.Tensor]]:
    trainer = wf.parser.get_parsed_content("train#trainer")
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    trainer.add_event_handler(Events.ITERATION_STARTED,
                              lambda e: seen.append((e.state.batch["image"].clone(), e.state.batch["label"].clone())))
    wf.run()
    wf.finalize()
    return seen


def test_offline_batches_are_those_of_the_online_run_with_the_same_views(tiny2d, tmp_path):
    cache, teacher = build(tmp_path, tiny2d, ["train.json"], TINY_2D, views=2)
    run = {**TINY_2D, "epochs": 3, "seed": 5, "resume": False}
    online = workflow(EMKD, ["train.json"], dataset_dir=str(tiny2d), ckpt_dir=str(tmp_path / "on"),
                      output_dir=str(tmp_path / "on" / "eval"), teacher_ckpt=str(teacher), replay_views=2, **run)
    on = captured_batches(online)
    off = captured_batches(offline(tmp_path, tiny2d, ["train.json"], {**run}, cache, teacher))
    assert len(on) == len(off) == 3 * 1  # one batch per epoch on the tiny data
    for (img_a, lab_a), (img_b, lab_b) in zip(on, off):
        assert torch.equal(img_a, img_b) and torch.equal(lab_a, lab_b)
    assert not torch.equal(on[0][0], on[1][0])  # epochs 1 and 2 train on different views


def refusal(tmp_path, data, cache, teacher, configs=("train.json",), **overrides) -> str:
    with pytest.raises(Exception) as info:
        wf = offline(tmp_path, data, list(configs), {**TINY_2D, **overrides}, cache, teacher)
        wf.parser.get_parsed_content("train#trainer")
    return error_chain(info.value)


def test_a_cache_for_anything_else_is_refused_naming_the_difference(tiny2d, tmp_path):
    cache, teacher = build(tmp_path, tiny2d, ["train.json"], TINY_2D, views=2)
    other = random_teacher(["train.json"], tmp_path / "other_teacher.pt", seed=1, **TINY_2D)
    assert "another teacher checkpoint" in refusal(tmp_path, tiny2d, cache, other)
    assert "transform chain" in refusal(tmp_path, tiny2d, cache, teacher, roi_size=[32, 48])
    assert "lacks the teacher taps ['mid']" in refusal(tmp_path, tiny2d, cache, teacher,
                                                       teacher_taps={"low": "low", "high": "high", "mid": "enc2"},
                                                       **{"kd_terms#1#inputs": ["s.low", "t.mid"]})
    assert "at other places: high was 'high', is now 'enc2'" in refusal(
        tmp_path, tiny2d, cache, teacher, teacher_taps={"low": "low", "high": "enc2"})
    assert "views=3" in refusal(tmp_path, tiny2d, cache, teacher, replay_views=3)
    fewer = tmp_path / "fewer"
    shutil.copytree(tiny2d, fewer)
    datalist = json.loads((fewer / "datalist.json").read_text())
    datalist["training"] = datalist["training"][1:]
    (fewer / "datalist.json").write_text(json.dumps(datalist))
    assert "another datalist" in refusal(tmp_path, fewer, cache, teacher)
    next(iter((cache / "views" / "v001").iterdir())).unlink()
    assert "incomplete: 1 of 8 item views missing" in refusal(tmp_path, tiny2d, cache, teacher)


class Killed(Exception):
    pass


def test_an_interrupted_build_resumes_and_equals_an_uninterrupted_one(tiny2d, tmp_path, monkeypatch):
    teacher = random_teacher(["train.json"], tmp_path / "teacher.pt", **TINY_2D)
    full, _ = build(tmp_path / "full", tiny2d, ["train.json"], TINY_2D, views=3, teacher=teacher)
    real_save, calls = cache_module.atomic_torch_save, []

    def dying_save(obj, path):
        calls.append(path)
        if len(calls) == 5:
            raise Killed("killed between two item files")
        real_save(obj, path)

    monkeypatch.setattr(cache_module, "atomic_torch_save", dying_save)
    with pytest.raises(Exception) as info:
        build(tmp_path / "cut", tiny2d, ["train.json"], TINY_2D, views=3, teacher=teacher, cache_batch_size=1)
    assert "killed between two item files" in error_chain(info.value)
    cut = tmp_path / "cut" / "cache"
    assert not json.loads((cut / "manifest.json").read_text())["complete"]
    assert "incomplete" in refusal(tmp_path / "cut", tiny2d, cut, teacher)
    monkeypatch.setattr(cache_module, "atomic_torch_save", real_save)
    build(tmp_path / "cut", tiny2d, ["train.json"], TINY_2D, views=3, teacher=teacher)
    assert json.loads((cut / "manifest.json").read_text())["complete"]
    files = sorted(p.relative_to(full) for p in full.rglob("*.pt"))
    assert files == sorted(p.relative_to(cut) for p in cut.rglob("*.pt")) and len(files) == 12
    for rel in files:
        a, b = torch.load(full / rel, weights_only=True), torch.load(cut / rel, weights_only=True)
        assert torch.equal(a["fingerprint"], b["fingerprint"])  # the same views
        for key in a["outputs"]:  # batch composition differs (1 vs 16 samples): fp16 rounding at most
            x, y = a["outputs"][key].float(), b["outputs"][key].float()
            assert torch.allclose(x, y, rtol=2e-3, atol=2e-3 * float(x.abs().max())), (rel, key)
    assert not list(cut.rglob("*.tmp"))
    with pytest.raises(Exception) as info:  # same folder, other settings: refused
        build(tmp_path / "cut", tiny2d, ["train.json"], TINY_2D, views=2, teacher=teacher)
    assert "holds a teacher cache built for another views" in error_chain(info.value)


def small_teacher(path: Path) -> UNet:
    net = UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2), num_res_units=0)
    torch.save(net.state_dict(), path)
    return net


def tiny_dataset(n: int = 3) -> Dataset:
    rng = np.random.default_rng(0)
    data = [{"image": rng.standard_normal((1, 16, 16)).astype(np.float32),
             "label": rng.integers(0, 3, (1, 16, 16)).astype(np.int64)} for _ in range(n)]
    flips = Compose([RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
                     RandScaleIntensityd(keys="image", factors=0.5, prob=1.0)])
    return Dataset(data, transform=flips)


def test_paraphrased_taps_are_encoded_from_the_raw_cached_taps(tmp_path):
    torch.manual_seed(0)
    net = small_teacher(tmp_path / "t.pt")
    paraphraser = Paraphraser(in_channels=4, factor_channels=2, spatial_dims=2)
    torch.save(paraphraser.state_dict(), tmp_path / "paraphraser_low.pt")
    live = ParaphrasedTeacher(net, tmp_path / "t.pt", {"low": "model.0"}, {"low": paraphraser}, tmp_path)
    distiller = Distiller(UNet(2, 1, 3, (4, 8), (2,)), lambda p, y: p.mean(),
                          [LossTerm("kd", PredictionMapDistillation(), inputs=["s.logits", "t.logits"])], live)
    dataset = tiny_dataset()
    build_teacher_cache(distiller, dataset, tmp_path / "cache", views=2)
    views = TeacherViews(dataset, cache=tmp_path / "cache")
    served = CachedTeacher(views.cache, live)
    views.set_epoch(1)
    for index in range(len(views)):
        item = views[index]
        image = torch.as_tensor(item["image"])[None]
        got = served(image, {k: v[None] for k, v in item.items() if k.startswith("t.")})
        want = live(image)
        assert got["t.low"].shape[1] == 2  # the paraphraser's factor, not the raw 4-channel tap
        for key in want:
            assert torch.allclose(got[key], want[key], rtol=2e-3, atol=2e-3 * float(want[key].abs().max())), key


def test_teacher_free_and_view_based_distillers_refuse_a_cache(tmp_path):
    net = small_teacher(tmp_path / "t.pt")
    dataset = tiny_dataset()
    teacher_run = Distiller(UNet(2, 1, 3, (4, 8), (2,)), lambda p, y: p.mean(),
                            [LossTerm("kd", PredictionMapDistillation(), inputs=["s.logits", "t.logits"])], net,
                            tmp_path / "t.pt")
    build_teacher_cache(teacher_run, dataset, tmp_path / "cache", views=1)
    self_distillation = Distiller(UNet(2, 1, 3, (4, 8), (2,)), lambda p, y: p.mean())
    with pytest.raises(ValueError, match="reads no teacher output"):
        self_distillation.use_teacher_cache(tmp_path / "cache")
    with pytest.raises(ValueError, match="no live teacher"):
        build_teacher_cache(self_distillation, dataset, tmp_path / "cache2")
    with pytest.raises(RuntimeError, match="serves teacher outputs through the training batches"):
        teacher_run.use_teacher_cache(tmp_path / "cache")
        teacher_run(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16, dtype=torch.long))
    from medkd.distill import GKDDistiller

    assert not GKDDistiller.supports_teacher_cache and "views" in GKDDistiller.teacher_cache_refusal
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        TeacherCache(tmp_path / "nowhere")


def test_gkd_default_recipe_refuses_a_cache_at_start(tiny2d, teacher_2d, tmp_path):
    from conftest import STAGES, stages_of

    run = dict(dataset_dir=str(tiny2d), ckpt_dir=str(tmp_path), output_dir=str(tmp_path / "eval"),
               teacher_ckpt=str(teacher_2d), **TINY_2D)
    for stage in stages_of("gkd_segmentation"):  # the stages GKD's train.json needs (its MSANs)
        run_workflow("gkd_segmentation", ["train.json", stage], check=False, **run, **STAGES[stage])
    with pytest.raises(Exception) as info:
        workflow("gkd_segmentation", ["train.json", "cache_teacher.json"], cache_dir=str(tmp_path / "cache"),
                 **run).run()
    assert "GKD cannot use a teacher cache" in error_chain(info.value)
    assert not (tmp_path / "cache").exists()


def test_compile_falls_back_to_eager_with_a_warning(tiny2d, tmp_path):
    teacher = random_teacher(["train.json"], tmp_path / "teacher.pt", **TINY_2D)
    run = dict(dataset_dir=str(tiny2d), teacher_ckpt=str(teacher), **{**TINY_2D, "epochs": 1, "resume": False})
    eager = workflow(EMKD, ["train.json"], ckpt_dir=str(tmp_path / "a"), output_dir=str(tmp_path / "a" / "e"), **run)
    eager.parser.get_parsed_content("train#trainer").run()  # the trainer alone: the run list's checks call the student
    broken = workflow(EMKD, ["train.json"], ckpt_dir=str(tmp_path / "b"), output_dir=str(tmp_path / "b" / "e"),
                      compile=True, **run)
    trainer = broken.parser.get_parsed_content("train#trainer")
    student = trainer.distiller.student

    def failing_compiled_forward(*args, **kwargs):
        raise RuntimeError("BackendCompilerFailed: simulated inductor failure")

    assert student._compiled_call_impl is not None  # nn.Module.compile() was applied
    student._compiled_call_impl = failing_compiled_forward
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.run()
    assert any("torch.compile failed" in str(w.message) and "eager mode" in str(w.message) for w in caught)
    assert student._compiled_call_impl is None
    a = eager.parser.get_parsed_content("network").state_dict()
    b = broken.parser.get_parsed_content("network").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the eager fallback is the eager run


def test_the_cache_never_enters_an_exported_bundle(tiny2d, teacher_2d, tmp_path):
    from medkd.export import export_bundle

    student = tmp_path / "student"
    run_workflow(EMKD, ["train.json"], dataset_dir=str(tiny2d), ckpt_dir=str(student), output_dir=str(student / "e"),
                 teacher_ckpt=str(teacher_2d), **TINY_2D)
    default_cache = BUNDLES / EMKD / "teacher_cache"
    created = not default_cache.exists()
    try:
        run_workflow(EMKD, ["train.json", "cache_teacher.json"], check=False, dataset_dir=str(tiny2d),
                     ckpt_dir=str(student), teacher_ckpt=str(teacher_2d), cache_views=1, cache_overwrite=True, **TINY_2D)
        assert (default_cache / "manifest.json").is_file()
        out = tmp_path / "zoo" / EMKD
        export_bundle(BUNDLES / EMKD, out, ckpt=student / "model.pt", teacher=teacher_2d, version="0.1.0")
    finally:
        if created:
            shutil.rmtree(default_cache, ignore_errors=True)
    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    assert not [f for f in files if "teacher_cache" in f or f.endswith("manifest.json") or "/views/" in f]
    assert sorted(f for f in files if f.endswith(".pt")) == ["models/model.pt", "models/teacher.pt"]
    assert json.loads((out / "configs" / "train.json").read_text())["teacher_cache"] is None


def test_cli_builds_a_cache_that_serves_several_recipes(tiny2d, tmp_path, capsys):
    from medkd.cli import cache_teacher

    teacher = random_teacher(["train.json"], tmp_path / "teacher.pt", **TINY_2D)
    out = tmp_path / "shared_cache"
    cache_teacher(str(BUNDLES / EMKD), out=str(out), recipe="recipes/kd_logits.json", views=1, taps="low,high",
                  dataset_dir=str(tiny2d), teacher_ckpt=str(teacher), ckpt_dir=str(tmp_path / "kd"), **TINY_2D)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["views"] == 1 and set(manifest["taps"]) == {"low", "high"}
    assert "4 items x 1 views" in capsys.readouterr().out
    for configs in (["train.json"], ["train.json", "recipes/kd_logits.json"]):  # EMKD's taps and logits-only KD
        wf = offline(tmp_path, tiny2d, configs, TINY_2D, out, teacher)
        assert isinstance(wf.parser.get_parsed_content("train#trainer").distiller.teacher, CachedTeacher)
    with pytest.raises(FileNotFoundError, match="recipe not found"):
        cache_teacher(str(BUNDLES / EMKD), out=str(out), recipe="recipes/nope.json")


# one recipe per KD bundle whose distiller reads a teacher: the bundle default where it has one (Graph Flow's
# paraphrased taps included), else the plain-Distiller baseline recipe
CACHEABLE = [("emkd_segmentation", []), ("graph_flow_segmentation", []), ("mtms_ckd_segmentation", []),
             ("gkd_segmentation", ["recipes/kd_logits.json"]), ("acw_skd_segmentation", ["recipes/kd_logits.json"])]


@pytest.mark.parametrize("bundle,recipe", CACHEABLE, ids=[b for b, _ in CACHEABLE])
def test_every_kd_bundle_trains_from_a_cache(bundle, recipe, tiny2d, teacher_2d, tmp_path):
    from conftest import STAGES, stages_of

    configs = ["train.json", *recipe]
    run = dict(dataset_dir=str(tiny2d), ckpt_dir=str(tmp_path), output_dir=str(tmp_path / "eval"), **TINY_2D)
    if not (BUNDLES / bundle / "configs" / "train_teacher.json").is_file():  # MTMS-CKD trains its own teacher
        run["teacher_ckpt"] = str(teacher_2d)
    for stage in stages_of(bundle):  # e.g. the paraphraser, MTMS-CKD's own teacher
        run_workflow(bundle, [*configs, stage], check=False, **run, **STAGES[stage])
    workflow(bundle, [*configs, "cache_teacher.json"], cache_dir=str(tmp_path / "cache"), cache_views=2, **run).run()
    wf = workflow(bundle, configs, teacher_cache=str(tmp_path / "cache"), **{**run, "epochs": 2})
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert isinstance(trainer.distiller.teacher, CachedTeacher)
    wf.run()
    assert trainer.state.epoch == 2 and (tmp_path / "model.pt").is_file()
