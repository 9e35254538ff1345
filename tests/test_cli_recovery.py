"""`slimforge prune --recovery …` and `--max-perplexity-ratio …` on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.cli import main
from tests.tiny_models import SAMPLE_TEXT, make_tiny_llama_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("cli") / "tiny")


def base(tiny_dir: Path, calib: Path) -> list[str]:
    return ["prune", "--model", str(tiny_dir), "--calibration", str(calib), "--n-samples", "2", "--seq-len", "32"]


def test_recovery_flag_adds_the_recovering_stage(tiny_dir: Path, tmp_path: Path) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_text(SAMPLE_TEXT)
    out = tmp_path / "out"
    options = '{"n_samples": 4, "seq_len": 24, "batch_size": 2, "micro_batch_size": 1}'
    args = [*base(tiny_dir, calib), "--sparsity", "0.34", "--recovery", "distill", "--recovery-steps", "2"]
    assert main([*args, "--recovery-options", options, "--out", str(out)]) == 0
    recovery = json.loads((out / "slimforge_report.json").read_text())["recovery"]
    assert recovery["method"] == "distill" and recovery["data"] == "self_generated"
    assert recovery["steps_run"] == 2 and len(recovery["loss_curve"]) == 2


def test_quality_target_refuses_overlapping_text_and_reports_the_curve(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_text(SAMPLE_TEXT)
    args = [*base(tiny_dir, calib), "--max-perplexity-ratio", "1000", "--max-search-sparsity", "0.34"]
    assert main([*args, "--target-text", str(calib), "--out", str(tmp_path / "o1")]) == 2
    assert "evaluation_overlap" in capsys.readouterr().err
    held_out = tmp_path / "held.txt"
    held_out.write_text("A different text about other things, long enough to be a line of its own.\n" * 30)
    assert main([*args, "--target-text", str(held_out), "--out", str(tmp_path / "o2")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["quality_target"]["chosen_size"] == 2  # a random model stays within 1000x for k=1..2
    assert len(summary["removed_layers"]) == 2
