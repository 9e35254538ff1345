"""Write a pruned model as a self-describing Hugging Face directory (DESIGN.md §4).

Contents: config + safetensors (via `save_pretrained`, or the method's own `save_model`),
tokenizer files, `generation_config.json`, a model card `README.md`, `slimforge_report.json`
and `SHA256SUMS` over every other file. Never a pickle.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from workers.engine.types import PruneOutcome

REPORT_NAME = "slimforge_report.json"
SUMS_NAME = "SHA256SUMS"


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def write_artifact(outcome: PruneOutcome, tokenizer: Any, out_dir: Path, *, model_id: str) -> list[dict[str, Any]]:
    """Write the artifact into `out_dir` (created if needed); return its files with size and sha256."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if outcome.save_model is not None:
        outcome.save_model(out_dir)
    else:
        outcome.model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    report = {"source_model": model_id, **outcome.report}
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    (out_dir / "README.md").write_text(model_card(model_id, report))
    return write_checksums(out_dir)


def write_checksums(out_dir: Path) -> list[dict[str, Any]]:
    files = []
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != SUMS_NAME):
        rel = path.relative_to(out_dir).as_posix()
        files.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    (out_dir / SUMS_NAME).write_text("".join(f"{f['sha256']}  {f['path']}\n" for f in files))
    sums = out_dir / SUMS_NAME
    files.append({"path": SUMS_NAME, "size": sums.stat().st_size, "sha256": sha256_file(sums)})
    return files


def verify_checksums(out_dir: Path) -> list[str]:
    """Return the files whose sha256 does not match SHA256SUMS (empty when all match)."""
    bad = []
    for line in (out_dir / SUMS_NAME).read_text().splitlines():
        digest, rel = line.split("  ", 1)
        path = out_dir / rel
        if not path.is_file() or sha256_file(path) != digest:
            bad.append(rel)
    return bad


def model_card(model_id: str, report: dict[str, Any]) -> str:
    before = report.get("parameters_before", {}).get("total")
    after = report.get("parameters_after", {}).get("total")
    lines = [
        "---",
        "library_name: transformers",
        "tags: [slimforge, pruned]",
        "---",
        f"# Pruned {model_id}",
        "",
        f"Produced by Slimforge with method `{report.get('method')}` at target sparsity "
        f"{report.get('target_sparsity')} ({report.get('sparsity_basis')} basis).",
        "",
    ]
    if before and after:
        lines.append(f"- Parameters: {before:,} → {after:,} ({1 - after / before:.1%} removed)")
    if "removed_layers" in report:
        lines.append(f"- Removed decoder layers (original indices): {report['removed_layers']}")
    if "evaluation" in report:
        lines.append("- Evaluation before/after: see `slimforge_report.json` → `evaluation`")
    loader = report.get("loading", "AutoModelForCausalLM.from_pretrained(path)")
    lines += [
        "",
        "## Load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = {loader}",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "```",
        "",
        "Every file's sha256 is listed in `SHA256SUMS`; the full report is `slimforge_report.json`.",
        "",
    ]
    return "\n".join(lines)
