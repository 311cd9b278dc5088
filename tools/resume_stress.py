"""Kill/resume stress test of a bundle's training: N trials of random ``kill -9`` then the same command again.

    python tools/resume_stress.py --n 20 [--bundle supervised_segmentation] [--epochs 4] [--kills 2] [--seed 0]
                                  [--workdir DIR] [--keep]

Each trial trains the bundle on tiny demo data (prepared under ``--workdir``) with ``python -m monai.bundle run``,
kills the process group with SIGKILL at ``--kills`` random moments, runs the same command again after each kill and
once more to the end. It checks, and counts violations of:

- every restart continues: it resumes at the stored epoch (the log's "Resumed training ... at epoch k") whenever a
  training state exists, and the epoch counter never goes back;
- the finished run's weights (``train_state.pt`` network and ``model.pt``) are bit-identical to an uninterrupted run;
- no temporary (``.*.tmp``) or staged (``.*.pending``) checkpoint file is left once the run has finished;
- after every kill, ``model.pt`` scores exactly the best validation Dice that the training state records (it is never
  worse than the stored best, nor a model the state does not know).

Prints one line per trial and a summary (the figures quoted in the README's reliability paragraph).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire
import torch

ROOT = Path(__file__).resolve().parents[1]


def _command(bundle: str, data: Path, out: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(ROOT / "bundles" / bundle / "configs" / "train.json"),
            "--bundle_root", str(ROOT / "bundles" / bundle), "--dataset_dir", str(data), "--ckpt_dir", str(out),
            "--output_dir", str(out / "eval"), "--roi_size", "[48,64]", "--epochs", str(epochs), "--batch_size", "2",
            "--val_interval", "1", "--num_workers", "0"]


def _stored_epoch(state_path: Path) -> int:
    if not state_path.is_file():
        return 0
    trainer = torch.load(state_path, weights_only=True)["trainer"]
    return trainer["iteration"] // trainer["epoch_length"]


def _model_score(bundle: str, data: Path, out: Path) -> float:
    """Validation mean Dice of ``out/model.pt``, with the bundle's own validation pipeline."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / bundle / "configs" / "train.json"))
    parser.update({"bundle_root": str(ROOT / "bundles" / bundle), "dataset_dir": str(data), "ckpt_dir": str(out),
                   "output_dir": str(out / "eval_check"), "roi_size": [48, 64], "validate#handlers": []})
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    evaluator = parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    shutil.rmtree(out / "eval_check", ignore_errors=True)
    return float(evaluator.state.metrics["val_mean_dice"])


def main(n: int = 20, bundle: str = "supervised_segmentation", epochs: int = 4, kills: int = 2, seed: int = 0,
         workdir: str | None = None, keep: bool = False) -> None:
    """Run the stress test and print the per-trial results and the summary (JSON); ``workdir`` defaults to a new
    temporary folder."""
    from medkd.data.demo import prepare_demo

    rng = random.Random(seed)
    work = Path(workdir or tempfile.mkdtemp(prefix="medkd_resume_stress_")).resolve()
    data = work / "data"
    if not (data / "datalist.json").is_file():
        prepare_demo(data, subjects=3, seed=1, dims=2, spacing=4.0, slices_per_subject=4)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    ref = work / "reference"
    shutil.rmtree(ref, ignore_errors=True)
    start = time.time()
    subprocess.run(_command(bundle, data, ref, epochs), env=env, check=True, capture_output=True)
    ref_seconds = time.time() - start
    ref_net = torch.load(ref / "train_state.pt", weights_only=True)["network"]
    ref_model = (ref / "model.pt").read_bytes()
    print(f"uninterrupted run: {ref_seconds:.1f} s; kills at uniform random times in [0, {ref_seconds:.1f}] s")

    totals = {"trials": n, "kills": 0, "kills_with_state": 0, "resumes_not_continuing": 0, "final_not_identical": 0,
              "stray_temp_files": 0, "model_not_the_stored_best": 0, "model_checks": 0}
    for trial in range(n):
        out = work / f"trial{trial:02d}"
        shutil.rmtree(out, ignore_errors=True)
        last_epoch, problems = 0, []
        for attempt in range(kills + 1):
            cmd = _command(bundle, data, out, epochs)
            stored = _stored_epoch(out / "train_state.pt")
            log = out.parent / f"{out.name}.log"
            with open(log, "w") as f:
                proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
                if attempt < kills:
                    try:
                        proc.wait(timeout=rng.uniform(0, ref_seconds))
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                        totals["kills"] += 1
                else:
                    proc.wait()
            text = log.read_text()
            if stored and f"at epoch {stored} of {epochs}" not in text and "Resumed training" in text:
                problems.append(f"resumed at another epoch than the stored {stored}")
            if stored and proc.returncode == 0 and "Resumed training" not in text and stored < epochs:
                problems.append("did not resume")
            now = _stored_epoch(out / "train_state.pt")
            if now < last_epoch:
                problems.append(f"epoch went back from {last_epoch} to {now}")
            last_epoch = now
            if attempt < kills and (out / "train_state.pt").is_file() and (out / "model.pt").is_file():
                totals["kills_with_state"] += 1
                best = torch.load(out / "train_state.pt", weights_only=True)["best_model_saver"]["best_metric"]
                score = _model_score(bundle, data, out)
                totals["model_checks"] += 1
                if abs(score - best) > 1e-6:
                    problems.append(f"model.pt scores {score:.6f}, the state's best is {best:.6f}")
                    totals["model_not_the_stored_best"] += 1
        if any("resume" in p or "epoch went back" in p for p in problems):
            totals["resumes_not_continuing"] += 1
        final = torch.load(out / "train_state.pt", weights_only=True)["network"]
        identical = all(torch.equal(ref_net[k], final[k]) for k in ref_net) and (out / "model.pt").read_bytes() == ref_model
        if not identical:
            totals["final_not_identical"] += 1
            problems.append("final weights differ from the uninterrupted run")
        stray = [p.name for p in out.iterdir() if re.match(r"^\..*\.(tmp|pending)$", p.name)]
        if stray:
            totals["stray_temp_files"] += 1
            problems.append(f"stray files {stray}")
        print(f"trial {trial:2d}: {'ok' if not problems else '; '.join(problems)}", flush=True)
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
            (out.parent / f"{out.name}.log").unlink(missing_ok=True)
    print(json.dumps(totals))


if __name__ == "__main__":
    fire.Fire(main)
