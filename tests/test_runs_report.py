"""`denoiselab report RUN RUN …`: one HTML page overlaying several runs' curves; the plotted
numbers are embedded as JSON and compared here with the runs' own metrics.jsonl."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from PIL import Image

from denoiselab.cli import main
from denoiselab.train.loop import train
from denoiselab.train.run import read_metrics
from tests.test_train import tiny


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    runs = []
    for parent, lr in (("a", 1e-3), ("b", 3e-4)):
        run = train(
            tiny(**{"optim.lr": lr, "sample_every_nimg": 32}), root / parent / "run", quiet=True
        )
        with open(
            run / "metrics.jsonl", "a"
        ) as f:  # periodic-evaluation rows, as the loop writes them
            for step, fd in (
                (4, 9.0 if parent == "a" else 7.0),
                (8, 5.0 if parent == "a" else 6.5),
            ):
                f.write(
                    json.dumps(
                        {
                            "step": step,
                            "nimg": step * 8,
                            "kimg": step * 8 / 1000,
                            "eval/fd_probe": fd,
                        }
                    )
                    + "\n"
                )
        runs.append(run)
    (runs[1] / "eval.json").write_text(json.dumps({"metrics": {"fid": 12.5}}))
    return runs


def _curves(page: str) -> dict:
    data = re.search(r'<script type="application/json" id="curves">(.*?)</script>', page, re.S)
    return json.loads(data.group(1))["runs"]


def test_two_runs_overlaid_in_one_page(two_runs, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", *map(str, two_runs), "--out", str(out)]) == 0
    page = out.read_text()
    curves = _curves(page)
    assert sorted(curves) == ["a/run", "b/run"]  # same folder name: parents tell them apart
    for name, run in zip(("a/run", "b/run"), two_runs):
        rows = read_metrics(run / "metrics.jsonl")
        assert curves[name]["loss"] == [[r["kimg"], r["loss"]] for r in rows if "loss" in r]
        assert len(curves[name]["loss"]) == 8
        assert curves[name]["eval/fd_probe"] == [
            [r["kimg"], r["eval/fd_probe"]] for r in rows if "eval/fd_probe" in r
        ]
        assert curves[name]["path"] == str(run.resolve())
    assert curves["a/run"]["loss"] != curves["b/run"]["loss"]  # two different runs
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4  # loss, eval/fd_probe, two sample grids
    for data in images:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    assert "eval.json fid ↓" in page and "12.5" in page and "eval/fd_probe ↓" in page


def test_report_refuses_mixtures_and_non_runs(two_runs, tmp_path, capsys):
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "suite.json").write_text("{}")
    assert main(["report", str(tmp_path / "suite"), str(two_runs[0])]) == 2
    assert "give one suite folder alone, or run folders only" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(two_runs[0]), str(tmp_path / "empty")]) == 2
    assert "is neither a suite folder (suite.json) nor a run folder" in capsys.readouterr().err
    assert main(["report", str(two_runs[0]), str(two_runs[0])]) == 2
    assert "the same run folder is given twice" in capsys.readouterr().err
