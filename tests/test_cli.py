"""`slimforge prune` writes the same artifact a job writes; option flags map onto method options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.cli import main
from tests.tiny_models import SAMPLE_TEXT, make_tiny_llama_dir
from workers.engine.artifact import verify_checksums


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("cli") / "tiny")


@pytest.fixture
def calibration_file(tmp_path: Path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(SAMPLE_TEXT)
    return path


def test_prune_writes_a_verified_artifact(
    tiny_dir: Path, calibration_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main(
        [
            "prune",
            "--model",
            str(tiny_dir),
            "--method",
            "shortgpt",
            "--sparsity",
            "0.34",
            "--basis",
            "layers",
            "--calibration",
            str(calibration_file),
            "--n-samples",
            "2",
            "--seq-len",
            "32",
            "--out",
            str(out),
            "--compensation",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    report = json.loads((out / "slimforge_report.json").read_text())
    assert report["method"] == "shortgpt" and report["options"]["compensation"] is True
    assert summary["removed_layers"] == report["removed_layers"] and len(report["removed_layers"]) == 2
    assert all(0 <= i < 6 for i in report["removed_layers"])  # original indices
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    assert verify_checksums(out) == []


def test_no_compensation_flag_and_foreign_options(tiny_dir: Path, calibration_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    base = [
        "prune",
        "--model",
        str(tiny_dir),
        "--sparsity",
        "0.34",
        "--calibration",
        str(calibration_file),
        "--n-samples",
        "2",
        "--seq-len",
        "32",
    ]
    assert main([*base, "--method", "last_k", "--no-compensation", "--out", str(out)]) == 0
    assert json.loads((out / "slimforge_report.json").read_text())["options"]["compensation"] is False
    with pytest.raises(SystemExit, match="not an option of method 'last_k'"):
        main([*base, "--method", "last_k", "--importance", "element1", "--out", str(tmp_path / "o2")])
    # A non-empty output directory is never overwritten.
    assert main([*base, "--method", "last_k", "--out", str(out)]) == 2


def test_invalid_sparsity_is_reported_not_raised(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "prune",
            "--model",
            str(tiny_dir),
            "--method",
            "last_k",
            "--sparsity",
            "1.5",
            "--n-samples",
            "1",
            "--seq-len",
            "8",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "target_sparsity must be strictly between 0 and 1" in capsys.readouterr().err
