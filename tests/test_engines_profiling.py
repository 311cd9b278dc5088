"""Handlers (atomic saving, training state, progress bar, log transform) and the profiling helpers."""

from __future__ import annotations

import io
import os

import pytest
import torch
import torch.nn as nn
from conftest import step_trainer
from ignite.engine import Engine, Events

from medkd.engines import AtomicCheckpointSaver, ProgressBar, TrainingState, loss_scalars
from medkd.engines.handlers import _AtomicFileSaver
from medkd.io import atomic_torch_save, load_state_dict_file
from medkd.profiling import count_flops, count_parameters, peak_memory


def test_atomic_write_keeps_the_old_file_when_saving_fails(tmp_path):
    path = tmp_path / "model.pt"
    atomic_torch_save({"w": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"w": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"], "no temporary file left behind"
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_fixed_name_saver_never_removes_the_best_model(tmp_path):
    saver = _AtomicFileSaver(tmp_path, "model.pt")
    saver({"a": torch.zeros(1)}, "ignored_name.pt")
    saver.remove("model.pt")  # ignite removes the previous best before saving the next one
    assert (tmp_path / "model.pt").is_file()
    rotating = _AtomicFileSaver(tmp_path)
    rotating({"a": torch.zeros(1)}, "ckpt_1.pt")
    rotating.remove("ckpt_1.pt")
    assert not (tmp_path / "ckpt_1.pt").exists()


def test_atomic_checkpoint_saver_keeps_the_best_and_resumes_its_score(tmp_path):
    net = nn.Linear(2, 1)
    scores = iter([0.5, 0.9, 0.7])

    def run_epoch(engine):
        engine.state.metrics = {"val_mean_dice": next(scores)}
        with torch.no_grad():
            net.weight.fill_(engine.state.metrics["val_mean_dice"])

    evaluator = Engine(lambda e, b: None)
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, run_epoch)
    saver = AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_key_metric=True, key_metric_name="val_mean_dice",
                                  key_metric_filename="model.pt")
    saver.attach(evaluator)
    evaluator.run([0], max_epochs=2)
    best = load_state_dict_file(tmp_path / "model.pt")
    assert best["weight"].flatten().tolist() == pytest.approx([0.9, 0.9])
    state = saver.state_dict()

    resumed = AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_key_metric=True, key_metric_name="val_mean_dice",
                                    key_metric_filename="model.pt")
    resumed.load_state_dict(state)
    evaluator2 = Engine(lambda e, b: None)
    evaluator2.add_event_handler(Events.EPOCH_COMPLETED, run_epoch)
    resumed.attach(evaluator2)
    evaluator2.run([0], max_epochs=1)  # scores 0.7 < 0.9: the saved best must stay
    assert load_state_dict_file(tmp_path / "model.pt")["weight"].flatten().tolist() == pytest.approx([0.9, 0.9])


def test_training_state_round_trip(tmp_path):
    net = nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    trainer = step_trainer(net, opt)
    TrainingState(tmp_path / "state.pt", {"network": net, "optimizer": opt}).attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: e.terminate())  # "crash" after epoch 1
    trainer.run([0, 1], max_epochs=3)
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    assert saved["trainer"]["iteration"] == 2 and saved["optimizer"]["state"][0]["step"] == 2
    weight_after_epoch1 = net.weight.detach().clone()

    net2 = nn.Linear(3, 2)
    opt2 = torch.optim.Adam(net2.parameters(), lr=0.1)
    trainer2 = step_trainer(net2, opt2)
    resumed = []
    trainer2.add_event_handler(Events.STARTED, lambda e: resumed.append(e.state.epoch))
    TrainingState(tmp_path / "state.pt", {"network": net2, "optimizer": opt2}).attach(trainer2)
    trainer2.run([0, 1], max_epochs=3)
    assert trainer2.state.epoch == 3 and trainer2.state.iteration == 6
    assert opt2.state_dict()["state"][0]["step"] == 6
    assert not torch.equal(net2.weight, weight_after_epoch1)

    net3 = nn.Linear(3, 2)
    opt3 = torch.optim.Adam(net3.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="lacks \\['extra'\\]"):
        trainer3 = Engine(lambda e, b: None)
        TrainingState(tmp_path / "state.pt", {"network": net3, "optimizer": opt3, "extra": nn.Linear(1, 1)}).attach(trainer3)
        trainer3.run([0, 1], max_epochs=3)


@pytest.mark.parametrize("data, max_epochs, match", [([0, 1], 5, "epochs: stored run has 3, this run 5"),
                                                       ([0, 1, 2], 3, "iterations per epoch: stored 2, now 3")])
def test_training_state_refuses_a_run_it_does_not_fit(tmp_path, data, max_epochs, match):
    net = nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    trainer = step_trainer(net, opt)
    TrainingState(tmp_path / "state.pt", {"network": net, "optimizer": opt}).attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: e.terminate())
    trainer.run([0, 1], max_epochs=3)
    before = (tmp_path / "state.pt").read_bytes()
    other = step_trainer(net, opt)
    TrainingState(tmp_path / "state.pt", {"network": net, "optimizer": opt}).attach(other)
    with pytest.raises(ValueError, match=match):
        other.run(data, max_epochs=max_epochs)
    assert (tmp_path / "state.pt").read_bytes() == before
    fresh = step_trainer(net, opt)
    TrainingState(tmp_path / "state.pt", {"network": net, "optimizer": opt}, resume=False).attach(fresh)
    fresh.run(data, max_epochs=max_epochs)
    assert torch.load(tmp_path / "state.pt", weights_only=True)["trainer"]["iteration"] == len(data) * max_epochs


def test_loss_scalars_and_progress_bar(monkeypatch):
    out = [{"loss": torch.tensor(1.5), "loss_pmd": torch.tensor(0.25), "raw_pmd": 2.5, "pred": torch.zeros(3), "label": 1}]
    assert loss_scalars(out) == {"loss": 1.5, "loss_pmd": 0.25, "raw_pmd": 2.5}
    assert loss_scalars(out[0]) == loss_scalars(out)

    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    engine = Engine(lambda e, b: {"loss": torch.tensor(0.5)})
    ProgressBar(desc="train", keys=["loss"], only_tty=False).attach(engine)
    engine.run([0, 1, 2], max_epochs=1)
    assert "train" in stream.getvalue() and "loss=0.5" in stream.getvalue()
    quiet = Engine(lambda e, b: None)
    ProgressBar(desc="evaluate").attach(quiet)  # stderr is not a terminal here: no bar
    assert len(quiet._event_handlers[Events.ITERATION_COMPLETED]) == 0


def test_flops_match_a_hand_count():
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1), nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    x = torch.randn(2, 2, 8, 8)
    macs = 2 * (8 * 8 * 4 * 2 * 9) + 2 * (8 * 8 * 3 * 4) + 2 * (3 * 8 * 8 * 5)
    assert count_flops(net, x) == 2 * macs
    assert count_parameters(net) == (4 * 2 * 9 + 4) + (3 * 4 + 3) + (3 * 64 * 5 + 5)


def test_peak_memory_sees_the_largest_live_allocation():
    def fn():
        a = torch.ones(1024 * 1024)  # 4 MB
        b = torch.ones(2 * 1024 * 1024)  # 8 MB, a still alive: 12 MB
        del a
        c = torch.ones(1024 * 1024)  # back to 12 MB
        return float(b[0] + c[0])

    mb = peak_memory(fn) / 2**20
    assert 12.0 <= mb < 12.5
