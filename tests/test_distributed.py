"""Multi-process behaviour on CPU (gloo): rank-averaged loss logging and what DistributedDataParallel wraps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from test_taps_distiller import CE, emkd_terms, save_teacher, small_unet  # noqa: E402

from medkd.distill import Distiller  # noqa: E402
from medkd.engines import mean_across_ranks  # noqa: E402

WORLD = 2


def _worker(rank: int, store: str, out_dir: str, teacher_ckpt: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        # distinct values per rank: the mean must come back on every rank, keys in any order
        local = {"loss": torch.tensor(1.0 + rank), "raw_b": torch.tensor(10.0 * rank), "loss_a": torch.tensor(-2.0 * rank)}
        averaged = {k: float(v) for k, v in mean_across_ranks(local).items()}

        torch.manual_seed(0)
        teacher = small_unet(channels=(8, 16, 32, 64), norm="batch")
        teacher.load_state_dict(torch.load(teacher_ckpt, weights_only=True))
        before = {k: v.clone() for k, v in teacher.state_dict().items()}
        distiller = Distiller(small_unet(), CE(), emkd_terms(), teacher, teacher_ckpt)
        ddp = torch.nn.parallel.DistributedDataParallel(distiller)
        wrapped = set(ddp.module.state_dict())
        g = torch.Generator().manual_seed(rank)
        x, y = torch.randn(2, 1, 16, 16, generator=g), torch.randint(0, 3, (2, 1, 16, 16), generator=g)
        ddp(x, y)["loss"].backward()
        grads = torch.cat([p.grad.flatten() for p in distiller.student.parameters()])
        teacher_unchanged = all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
        result = {"averaged": averaged, "wrapped": sorted(wrapped), "grad_sum": float(grads.double().sum()),
                  "teacher_unchanged": teacher_unchanged, "teacher_training": teacher.training}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_average_logged_scalars_and_ddp_never_wraps_the_teacher(tmp_path):
    teacher = small_unet(channels=(8, 16, 32, 64), norm="batch")
    teacher.train()
    teacher(torch.randn(2, 1, 16, 16))  # non-trivial BatchNorm statistics: a broadcast or update would show
    ckpt = save_teacher(tmp_path, teacher)
    mp.start_processes(_worker, args=(str(tmp_path / "store"), str(tmp_path), ckpt), nprocs=WORLD, join=True,
                       start_method="spawn")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    expected = {"loss": 1.5, "raw_b": 5.0, "loss_a": -1.0}  # means of (1, 2), (0, 10), (0, -2)
    for res in results:
        assert res["averaged"] == expected
        assert res["wrapped"] and not any(k.startswith("teacher") or ".teacher." in k for k in res["wrapped"])
        assert any(k.startswith("student.") for k in res["wrapped"])
        assert res["teacher_unchanged"] and not res["teacher_training"]
    # DDP averaged the student's gradients although each rank saw different data
    assert abs(results[0]["grad_sum"] - results[1]["grad_sum"]) <= 1e-6 * max(1.0, abs(results[0]["grad_sum"]))


def test_mean_across_ranks_is_the_identity_without_a_process_group():
    values = {"loss": torch.tensor(3.0), "raw_x": torch.tensor(-1.0)}
    assert mean_across_ranks(values) is values
