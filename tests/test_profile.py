"""`python -m medkd profile`: network specs, bundle targets, the table and its ratios."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from monai.networks.nets import UNet

from medkd.cli import profile
from medkd.profiling import count_parameters, parse_network_spec

SMALL = "UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,))"
BIG = "UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(16, 32, 64), strides=(2, 2))"


def test_network_spec_reads_literals_only():
    cls, kwargs = parse_network_spec(SMALL)
    assert cls is UNet and kwargs == {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": (4, 8), "strides": (2,)}
    assert parse_network_spec("monai.networks.nets.UNet")[0] is UNet
    with pytest.raises(ValueError, match="by keyword"):
        parse_network_spec("UNet(2, 1, 2)")
    with pytest.raises(ValueError, match="literals"):
        parse_network_spec("UNet(channels=__import__('os').getcwd())")
    with pytest.raises(ValueError, match="unknown network 'NoSuchNet'"):
        parse_network_spec("NoSuchNet(in_channels=1)")


def test_profile_writes_table_json_and_ratios(tmp_path, capsys):
    out = tmp_path / "cost.md"
    profile(f"big={BIG}", f"small={SMALL}", size=(32, 48), pairs="big/small", repeats=2, warmup=1, out=str(out))
    figures = json.loads(out.with_suffix(".json").read_text())
    rows = {r["name"]: r for r in figures["rows"]}
    big, small = UNet(2, 1, 2, (16, 32, 64), (2, 2)), UNet(2, 1, 2, (4, 8), (2,))
    assert rows["big"]["params"] == count_parameters(big) and rows["small"]["params"] == count_parameters(small)
    assert rows["big"]["input"] == [1, 1, 32, 48]
    ratio = figures["ratios"][0]
    assert ratio["params"] == pytest.approx(count_parameters(big) / count_parameters(small))
    assert ratio["latency"] == pytest.approx(rows["big"]["latency_ms"] / rows["small"]["latency_ms"])
    text = out.read_text()
    assert text in capsys.readouterr().out  # printed as written
    assert f"| big | 1x1x32x48 | {count_parameters(big) / 1e6:.3f} |" in text
    assert "| big | small |" in text


def test_profile_a_bundle_names_teacher_and_student(tmp_path):
    out = tmp_path / "bundle.md"
    done = subprocess.run([sys.executable, "-m", "medkd", "profile", "emkd_segmentation", "--repeats", "2", "--warmup", "1",
                           "--memory", "False", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(out.with_suffix(".json").read_text())
    names = [r["name"] for r in figures["rows"]]
    assert names == ["emkd_segmentation teacher (UNet)", "emkd_segmentation student (UNet)"]
    assert all(r["input"] == [1, 1, 96, 112] for r in figures["rows"])  # the bundle's roi_size and in_channels
    assert figures["ratios"][0]["teacher"] == names[0] and figures["ratios"][0]["params"] > 10


def test_profile_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no profiled network named"):
        profile(f"a={SMALL}", pairs="a/b", repeats=1, warmup=0, memory=False, out=str(tmp_path / "x.md"))
    with pytest.raises(ValueError, match="in_channels"):
        profile("UNet(spatial_dims=2, out_channels=2, channels=(4, 8), strides=(2,))", repeats=1, out=str(tmp_path / "y.md"))
