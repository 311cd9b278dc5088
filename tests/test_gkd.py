"""GKD's stage objectives, the GKD distillation step and the batch views (the loss modules: test_gkd_parts.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from ignite.engine import Events
from monai.networks.nets import UNet

from medkd.data.views import BatchViews
from medkd.distill import (AlignmentConsistencyObjective, FeatureTaps, GKDDistiller, LossTerm, SemanticAutoEncoderObjective,
                           decode_replacing, output_of, tap_channels)
from medkd.engines import KDTrainer, ObjectiveTrainer
from medkd.losses import ContrastiveGraphDistillation, PredictionMapDistillation
from medkd.networks import AlignmentNetwork, MobileNetV2UNet, SemanticAutoEncoder, resolve_tap


class CE(nn.Module):
    def forward(self, logits, label):
        return F.cross_entropy(logits, label[:, 0].long())


def teacher_net(dims=2):
    return UNet(dims, 1, 3, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1, norm="batch")


def student_net(dims=2):
    return UNet(dims, 1, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=0, norm="batch")


def gkd_terms(which=("intra", "inter", "cross_teacher", "cross_student")):
    every = {
        "intra": LossTerm("intra", ContrastiveGraphDistillation("intra"), 1.0, ["s.vectors", "t.vectors"]),
        "inter": LossTerm("inter", ContrastiveGraphDistillation("inter"), 1.0, ["s.vectors", "t.vectors"]),
        "cross_teacher": LossTerm("cross_teacher", PredictionMapDistillation(1.0), 1.0, ["t.cross_logits", "t.logits"]),
        "cross_student": LossTerm("cross_student", PredictionMapDistillation(1.0), 1.0, ["s.cross_logits", "t.logits"]),
    }
    return [every[w] for w in which]


def save(module, path):
    torch.save(module.state_dict(), path)
    return str(path)


@pytest.fixture
def parts(tmp_path):
    """A trained-looking teacher (non-trivial BatchNorm statistics), MSANs saved as the ACT stage would."""
    torch.manual_seed(0)
    teacher = teacher_net()
    teacher.train()
    teacher(torch.randn(4, 1, 32, 32))
    size = (32, 32)
    t_msan = AlignmentNetwork(tap_channels(teacher, "bottleneck", size), vector_dim=16, grid=2, hidden=8)
    s_msan = AlignmentNetwork(tap_channels(student_net(), "bottleneck", size), vector_dim=16, grid=2, hidden=8)
    for m in (t_msan, s_msan):  # non-trivial running statistics
        m.train()
    t_msan(torch.randn(3, 64, 4, 4))
    s_msan(torch.randn(3, 16, 8, 8))
    msan_file = save(nn.ModuleDict({"teacher": t_msan, "student": s_msan}), tmp_path / "msan.pt")
    return {"teacher": teacher, "teacher_ckpt": save(teacher, tmp_path / "teacher.pt"), "t_msan": t_msan,
            "s_msan": s_msan, "msan_ckpt": msan_file}


def distiller(parts, terms=None, student=None, views=None):
    return GKDDistiller(student or student_net(), CE(), gkd_terms() if terms is None else terms, parts["teacher"],
                        parts["teacher_ckpt"], parts["t_msan"], parts["s_msan"], parts["msan_ckpt"],
                        views=views or BatchViews())


def test_tap_channels_and_output_of_agree_with_the_taps():
    net = teacher_net()
    assert tap_channels(net, "bottleneck", (32, 32)) == 64 and net.training  # the probe leaves the mode as it was
    x = torch.randn(2, 1, 32, 32)
    taps = FeatureTaps(net, {"b": "bottleneck"})
    net.eval()
    with taps.capture() as feats:
        net(x)
    torch.testing.assert_close(output_of(net, resolve_tap(net, "bottleneck"), x), feats["b"])


@pytest.mark.parametrize("make", [teacher_net, lambda: MobileNetV2UNet(in_channels=1, out_channels=3)])
def test_decode_replacing_keeps_the_skips_and_only_swaps_the_bottleneck(make):
    torch.manual_seed(1)
    net = make().eval()
    tap = "bottleneck"
    module = resolve_tap(net, tap)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        own = output_of(net, module, x)
        # the identity: decoding from the network's own bottleneck is the network's output
        torch.testing.assert_close(decode_replacing(net, module, x, own), net(x))
        other = torch.randn_like(own)
        swapped = decode_replacing(net, module, x, other)
        # the skips still come from x: the same bottleneck with another image gives another output
        x2 = torch.randn_like(x)
        torch.testing.assert_close(decode_replacing(net, module, x, other), swapped)
        assert not torch.allclose(decode_replacing(net, module, x2, other), swapped)
        assert not torch.allclose(swapped, net(x))
    z = other.clone().requires_grad_(True)
    decode_replacing(net, module, x, z).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="replacement of shape"):
        decode_replacing(net, module, x, torch.randn(1, 3, 2, 2))


@pytest.mark.parametrize("size", [(32, 32), (48, 64), (40, 56), (16, 24)])
def test_header_exchange_shapes_for_several_2d_sizes(parts, size):
    d = distiller(parts).train()
    x, y = torch.randn(3, 1, *size), torch.randint(0, 3, (3, 1, *size))
    feats = d.features(x, y)
    assert feats["s.cross_logits"].shape == feats["s.logits"].shape == (3, 3, *size)
    assert feats["t.cross_logits"].shape == feats["t.logits"].shape == (3, 3, *size)
    assert feats["s.vectors"].shape == feats["t.vectors"].shape == (3, 5, 16)  # anchor + 4 views, d = 16
    assert not feats["t.vectors"].requires_grad and feats["s.vectors"].requires_grad
    out = d(x, y)
    assert set(out) >= {"loss_intra", "loss_inter", "loss_cross_teacher", "loss_cross_student"}
    assert math.isfinite(float(out["loss"].detach()))


def test_features_match_a_direct_computation(parts):
    """Anchor vectors, view vectors (same views for both models) and both cross predictions, recomputed by hand."""
    torch.manual_seed(3)
    d = distiller(parts, views=BatchViews(["flip", "gamma"]))
    d.eval()  # per-sample computations (BatchNorm on running statistics), so views can be recomputed one by one
    x = torch.randn(2, 1, 32, 32)
    torch.manual_seed(7)
    feats = d.features(x)
    torch.manual_seed(7)  # the views draw the same random numbers again
    views = BatchViews(["flip", "gamma"])(x)
    student, teacher = d.student, d.teacher.network
    s_mod, t_mod = resolve_tap(student, "bottleneck"), resolve_tap(teacher, "bottleneck")
    e_s, e_t = d.msan["student"], d.msan["teacher"]
    with torch.no_grad():
        f_s, f_t = output_of(student, s_mod, x), output_of(teacher, t_mod, x)
        expect_s = torch.stack([e_s.encode(f_s)] + [e_s.encode(output_of(student, s_mod, v)) for v in views], dim=1)
        expect_t = torch.stack([e_t.encode(f_t)] + [e_t.encode(output_of(teacher, t_mod, v)) for v in views], dim=1)
        torch.testing.assert_close(feats["s.vectors"], expect_s, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(feats["t.vectors"], expect_t, rtol=1e-4, atol=1e-5)
        v_s, v_t = expect_s[:, 0], expect_t[:, 0]
        cross_t = decode_replacing(teacher, t_mod, x, e_t.header(v_s, f_t.shape[2:]))
        torch.testing.assert_close(feats["t.cross_logits"], cross_t, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(feats["t.logits"], teacher(x))
        # the student decoder runs on the teacher's vector with its own skips
        cross_s = decode_replacing(student, s_mod, x, e_s.header(v_t, f_s.shape[2:]))
        torch.testing.assert_close(feats["s.cross_logits"], cross_s, rtol=1e-4, atol=1e-5)


def test_only_what_the_terms_read_is_computed(parts):
    d = distiller(parts, terms=gkd_terms(["cross_student"]))
    feats = d.features(torch.randn(2, 1, 32, 32))
    assert "s.cross_logits" in feats and "s.vectors" not in feats
    d = distiller(parts, terms=gkd_terms(["intra"]))
    feats = d.features(torch.randn(2, 1, 32, 32))
    assert "s.vectors" in feats and "s.cross_logits" not in feats


def test_gradients_reach_the_student_through_the_frozen_parts(parts):
    """DCGD trains the student encoder through E_S; the teacher-decoder cross term trains it through the frozen
    teacher decoder and H_T; the student-decoder cross term trains the student decoder."""
    for which in (["intra"], ["cross_teacher"], ["cross_student"]):
        student = student_net()
        d = distiller(parts, terms=gkd_terms(which), student=student).train()
        x = torch.randn(2, 1, 32, 32)
        raw = d.terms[0](d.features(x))  # the term alone, without the task loss
        student.zero_grad()
        raw.backward()
        encoder_first = resolve_tap(student, "low")  # the first encoder block
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder_first.parameters()), which
        for frozen in (parts["teacher"], parts["t_msan"], parts["s_msan"]):
            assert all(p.grad is None for p in frozen.parameters())


def test_frozen_parts_stay_bit_identical_through_distillation(parts):
    teacher, t_msan, s_msan = parts["teacher"], parts["t_msan"], parts["s_msan"]
    student = student_net()
    d = distiller(parts, student=student)
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in
              (("teacher", teacher), ("t_msan", t_msan), ("s_msan", s_msan))}
    student_before = [p.clone() for p in student.parameters()]
    batches = [{"image": torch.randn(2, 1, 32, 32), "label": torch.randint(0, 3, (2, 1, 32, 32))} for _ in range(3)]
    optimizer = torch.optim.Adam(d.trainable_parameters(), lr=1e-2)
    KDTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=batches, distiller=d, optimizer=optimizer,
              decollate=False).run()
    for name, m in (("teacher", teacher), ("t_msan", t_msan), ("s_msan", s_msan)):
        after = m.state_dict()
        for k, v in before[name].items():
            assert torch.equal(v, after[k]), f"{name} {k} changed"
        assert not m.training
    assert any(not torch.equal(a, b) for a, b in zip(student_before, student.parameters()))
    # what the optimiser trains: the student only (the MSANs and the teacher are not parameters of the Distiller)
    assert {id(p) for p in d.trainable_parameters()} == {id(p) for p in student.parameters()}


def test_missing_stage_files_name_the_stage(parts, tmp_path):
    with pytest.raises(FileNotFoundError, match="train_msan.json"):
        GKDDistiller(student_net(), CE(), gkd_terms(), parts["teacher"], parts["teacher_ckpt"], parts["t_msan"],
                     parts["s_msan"], str(tmp_path / "missing.pt"))
    wrong = save(nn.ModuleDict({"teacher": parts["s_msan"], "student": parts["s_msan"]}), tmp_path / "wrong.pt")
    with pytest.raises(RuntimeError, match="does not match"):
        GKDDistiller(student_net(), CE(), gkd_terms(), parts["teacher"], parts["teacher_ckpt"], parts["t_msan"],
                     parts["s_msan"], wrong)


def act_parts(parts, tmp_path):
    torch.manual_seed(5)
    student = student_net()
    student.train()
    student(torch.randn(4, 1, 32, 32))
    psae = SemanticAutoEncoder(3, vector_dim=16, channels=(4, 8), grid=2, hidden=8)
    return student, save(student, tmp_path / "student0.pt"), psae, save(psae, tmp_path / "psae.pt")


def test_act_objective_equals_its_formula(parts, tmp_path):
    student, student_ckpt, psae, psae_ckpt = act_parts(parts, tmp_path)
    t_msan = AlignmentNetwork(64, vector_dim=16, grid=2, hidden=8)
    s_msan = AlignmentNetwork(16, vector_dim=16, grid=2, hidden=8)
    weights = {"rec_weight": 0.5, "align_weight": 2.0, "psae_weight": 3.0, "task_weight": 0.25}
    act = AlignmentConsistencyObjective(parts["teacher"], parts["teacher_ckpt"], student, student_ckpt, psae, psae_ckpt,
                                        t_msan, s_msan, CE(), **weights).train()
    x, y = torch.randn(3, 1, 32, 32), torch.randint(0, 3, (3, 1, 32, 32))
    out = act(x, y)
    teacher = parts["teacher"].eval()
    t_mod, s_mod = resolve_tap(teacher, "bottleneck"), resolve_tap(student, "bottleneck")
    with torch.no_grad():
        f_t, f_s = output_of(teacher, t_mod, x), output_of(student.eval(), s_mod, x)
        z = psae.eval().encode(F.one_hot(y[:, 0], 3).movedim(-1, 1).float())
        v_t, v_s = t_msan.encode(f_t), s_msan.encode(f_s)

        def unit_dist(a, b):  # ‖a/|a| − b/|b|‖², averaged over the batch, by explicit loops
            total = 0.0
            for i in range(a.shape[0]):
                na, nb = math.sqrt(float((a[i] ** 2).sum())), math.sqrt(float((b[i] ** 2).sum()))
                total += sum((float(a[i, j]) / na - float(b[i, j]) / nb) ** 2 for j in range(a.shape[1]))
            return total / a.shape[0]

        rec = float(((t_msan.header(v_t, f_t.shape[2:]) - f_t) ** 2).mean() + ((s_msan.header(v_s, f_s.shape[2:]) - f_s) ** 2).mean())
        align = unit_dist(v_t, v_s)
        reg = unit_dist(v_t, z) + unit_dist(v_s, z)
        task = float(CE()(decode_replacing(teacher, t_mod, x, t_msan.header(v_s, f_t.shape[2:])), y)
                     + CE()(decode_replacing(student, s_mod, x, s_msan.header(v_t, f_s.shape[2:])), y))
    assert float(out["raw_rec"]) == pytest.approx(rec, rel=1e-5)
    assert float(out["raw_align"]) == pytest.approx(align, rel=1e-4, abs=1e-7)
    assert float(out["raw_psae"]) == pytest.approx(reg, rel=1e-4)
    assert float(out["raw_task"]) == pytest.approx(task, rel=1e-5)
    expected = 0.5 * rec + 2.0 * align + 3.0 * reg + 0.25 * task
    assert float(out["loss"].detach()) == pytest.approx(expected, rel=1e-5)
    # the frozen parts are not parameters of the objective: the optimiser sees the MSANs only
    assert {id(p) for p in act.parameters()} == {id(p) for p in [*t_msan.parameters(), *s_msan.parameters()]}


def test_act_trains_the_msans_only_and_refuses_missing_stage_files(parts, tmp_path):
    student, student_ckpt, psae, psae_ckpt = act_parts(parts, tmp_path)
    t_msan, s_msan = AlignmentNetwork(64, vector_dim=16, grid=2, hidden=8), AlignmentNetwork(16, vector_dim=16, grid=2, hidden=8)
    act = AlignmentConsistencyObjective(parts["teacher"], parts["teacher_ckpt"], student, student_ckpt, psae, psae_ckpt,
                                        t_msan, s_msan, CE())
    frozen = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in
              (("teacher", parts["teacher"]), ("student", student), ("psae", psae))}
    msan_before = [p.clone() for p in act.msan.parameters()]
    batches = [{"image": torch.randn(2, 1, 32, 32), "label": torch.randint(0, 3, (2, 1, 32, 32))} for _ in range(3)]
    losses = []
    trainer = ObjectiveTrainer(objective=act, optimizer=torch.optim.Adam(act.parameters(), lr=1e-2),
                               device=torch.device("cpu"), max_epochs=1, train_data_loader=batches, decollate=False)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(set(e.state.output)))
    trainer.run()
    assert losses[-1] >= {"loss", "loss_rec", "loss_align", "loss_psae", "loss_task"}
    for n, m in (("teacher", parts["teacher"]), ("student", student), ("psae", psae)):
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in frozen[n].items()), n
    assert any(not torch.equal(a, b) for a, b in zip(msan_before, act.msan.parameters()))
    with pytest.raises(FileNotFoundError, match="pretrain_psae.json"):
        AlignmentConsistencyObjective(parts["teacher"], parts["teacher_ckpt"], student, student_ckpt, psae,
                                      str(tmp_path / "none.pt"), t_msan, s_msan, CE())
    with pytest.raises(RuntimeError, match="student checkpoint .*psae.pt does not match network_def UNet"):
        AlignmentConsistencyObjective(parts["teacher"], parts["teacher_ckpt"], student_net(), psae_ckpt, psae,
                                      psae_ckpt, t_msan, s_msan, CE())
    with pytest.raises(FileNotFoundError, match="train_baseline.json"):
        AlignmentConsistencyObjective(parts["teacher"], parts["teacher_ckpt"], student, str(tmp_path / "none.pt"), psae,
                                      psae_ckpt, t_msan, s_msan, CE())


def test_psae_objective_is_the_reconstruction_cross_entropy():
    torch.manual_seed(2)
    psae = SemanticAutoEncoder(3, vector_dim=16, channels=(4, 8), grid=2, hidden=8)
    objective = SemanticAutoEncoderObjective(psae)
    y = torch.randint(0, 3, (2, 1, 16, 16))
    out = objective(torch.randn(2, 1, 16, 16), y)
    logits = psae(F.one_hot(y[:, 0], 3).movedim(-1, 1).float())
    log_p = torch.log_softmax(logits, dim=1)
    naive = -sum(float(log_p[b, y[b, 0, i, j], i, j]) for b in range(2) for i in range(16) for j in range(16)) / (2 * 256)
    assert float(out["loss"]) == pytest.approx(naive, rel=1e-5)
    with pytest.raises(ValueError, match="outside 0..2"):
        objective(torch.randn(1, 1, 16, 16), torch.full((1, 1, 16, 16), 3))


@pytest.mark.parametrize("dims", [2, 3])
def test_batch_views(dims):
    torch.manual_seed(0)
    x = torch.randn(2, 1, *([12] * dims))
    views = BatchViews()(x)
    assert len(views) == 4 and all(v.shape == x.shape for v in views)
    torch.testing.assert_close(views[0], torch.flip(x, dims=(2,)))
    # identity settings of each kind
    still = BatchViews(["rotate", "gamma", "noise_blur"], max_angle=0.0, gamma_range=(1.0, 1.0), blur_sigma=0.0, noise_std=0.0)
    for v in still(x):
        torch.testing.assert_close(v, x, atol=1e-5, rtol=1e-5)
    # a rotation by 90° (max_angle 90 with the draw pinned at +1) maps the first two spatial axes onto each other
    ninety = BatchViews(["rotate"], max_angle=90.0)
    ninety_draw = torch.ones(2)
    orig_rand = torch.rand
    try:
        torch.rand = lambda *a, **k: ninety_draw
        rotated = ninety(x)[0]
    finally:
        torch.rand = orig_rand
    candidates = [torch.rot90(x, k, dims=(2, 3)) for k in (1, 3)]
    assert min(float((rotated - c).abs().max()) for c in candidates) < 1e-4
    # gamma keeps each sample's intensity range
    g = BatchViews(["gamma"])(x)[0]
    torch.testing.assert_close(g.flatten(1).min(1).values, x.flatten(1).min(1).values)
    torch.testing.assert_close(g.flatten(1).max(1).values, x.flatten(1).max(1).values)
    # reproducible from the global seed
    torch.manual_seed(4)
    a = BatchViews()(x)
    torch.manual_seed(4)
    b = BatchViews()(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    with pytest.raises(ValueError, match="unknown view kinds"):
        BatchViews(["zoom"])


def test_fsd_saver_pairs_teacher_student_and_source_target(parts, tmp_path):
    from ignite.engine import Engine

    from medkd.engines import FSDSaver
    from medkd.metrics import frechet_semantic_distance

    torch.manual_seed(6)
    student = student_net().eval()
    msan = nn.ModuleDict({"teacher": AlignmentNetwork(64, vector_dim=16, grid=2, hidden=8),
                          "student": AlignmentNetwork(16, vector_dim=16, grid=2, hidden=8)})
    saver = FSDSaver(student, msan, parts["msan_ckpt"], tmp_path, teacher=teacher_net(), teacher_ckpt=parts["teacher_ckpt"])
    images = {"clean": torch.randn(5, 1, 32, 32), "shift": torch.randn(5, 1, 32, 32) * 2 + 1}
    # MONAI evaluators leave a decollated list of items in engine.state.batch; mixed domains within a batch
    items = [{"image": images[d][i], "domain": d} for i in range(5) for d in ("clean", "shift")]
    batches = [items[i:i + 3] for i in range(0, len(items), 3)]
    engine = Engine(lambda e, b: None)
    saver.attach(engine)
    engine.run(batches)
    rows = {(r["pairing"], r["group_a"], r["group_b"]): r for r in saver.results()}
    assert set(rows) == {("teacher_student", "clean", "clean"), ("teacher_student", "shift", "shift"),
                         ("source_target", "clean", "shift")}
    e_s, e_t = saver.msan["student"], saver.msan["teacher"]
    t_mod, s_mod = resolve_tap(saver.teacher, "bottleneck"), resolve_tap(student, "bottleneck")
    with torch.no_grad():
        vs = {d: e_s.encode(output_of(student, s_mod, x)) for d, x in images.items()}
        vt = {d: e_t.encode(output_of(saver.teacher, t_mod, x)) for d, x in images.items()}
    for d in images:
        assert rows[("teacher_student", d, d)]["fsd"] == pytest.approx(float(frechet_semantic_distance(vt[d], vs[d])), rel=1e-6)
    assert rows[("source_target", "clean", "shift")]["fsd"] == pytest.approx(
        float(frechet_semantic_distance(vs["clean"], vs["shift"])), rel=1e-6)
    assert rows[("source_target", "clean", "shift")]["dim"] == 4  # PCA to min(n) - 1 for 5 images per domain
    lines = (tmp_path / "fsd.csv").read_text().splitlines()
    assert lines[0] == "pairing,group_a,group_b,fsd,dim,n_a,n_b" and len(lines) == 4


def test_gkd_bundle_evaluates_a_baseline_recipe_without_msans(tiny2d, teacher_2d, tmp_path):
    """A baseline recipe trains no MSANs: its evaluation scores both protocols and skips the FSD (no msan.pt)."""
    from conftest import TINY_2D, run_workflow, workflow

    common = dict(dataset_dir=str(tiny2d), ckpt_dir=str(tmp_path), teacher_ckpt=str(teacher_2d), **TINY_2D)
    wf = workflow("gkd_segmentation", ["train.json", "recipes/kd_cwd.json"], output_dir=str(tmp_path / "train"), **common)
    wf.run()  # no stage runs before it: the recipe needs none
    wf.finalize()
    assert not (tmp_path / "msan.pt").exists() and (tmp_path / "model.pt").is_file()
    run_workflow("gkd_segmentation", ["train.json", "recipes/kd_cwd.json", "evaluate.json"],
                 output_dir=str(tmp_path / "eval"), eval_domains={"a": str(tiny2d), "b": str(tiny2d)}, **common)
    pooled = (tmp_path / "eval" / "gkd_pooled.csv").read_text().splitlines()
    assert pooled[0].startswith("domain,") and {line.split(",")[0] for line in pooled[1:]} == {"a", "b"}
    assert not (tmp_path / "eval" / "fsd.csv").exists()
