"""Write a pruned model as a self-describing Hugging Face directory (DESIGN.md §4).

Contents: config + safetensors (via `save_pretrained`, or the method's own `save_model`),
tokenizer files, `generation_config.json`, a model card `README.md`, `slimforge_report.json`
and `SHA256SUMS` over every other file. Never a pickle.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import torch

from workers.engine.types import EngineError, PruneOutcome

REPORT_NAME = "slimforge_report.json"
SUMS_NAME = "SHA256SUMS"

ArtifactDtype = Literal["auto", "bfloat16", "float16", "float32"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# The built-ins were released in bf16; their cached copy is a float32 dequantisation of a GGUF,
# so its own config says float32 and cannot be trusted for this.
BUILTIN_DTYPE = torch.bfloat16


def checkpoint_dtype(model_id: str, source: str | Path | None) -> torch.dtype | None:
    """The dtype a checkpoint was published in (config.json `dtype`/`torch_dtype`); None if unknown."""
    if model_id.startswith("builtin:"):
        return BUILTIN_DTYPE
    if source is None:
        return None
    try:
        if Path(source).is_dir():
            config = json.loads((Path(source) / "config.json").read_text())
        else:  # a hub id: its config is in the local Hugging Face cache once the model was loaded
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(source)).to_dict()
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype")
    return DTYPES.get(str(name).removeprefix("torch.")) if name else None


def resolve_artifact_dtype(requested: str, source_dtype: torch.dtype | None, model_dtype: torch.dtype) -> torch.dtype:
    """`auto`: the source checkpoint's dtype (the model's own when unknown); else the one asked for."""
    if requested == "auto":
        return source_dtype or model_dtype
    if requested not in DTYPES:
        raise EngineError(
            "invalid_artifact_dtype", f"artifact_dtype must be one of auto, {', '.join(DTYPES)}; got {requested!r}."
        )
    return DTYPES[requested]


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def write_artifact(
    outcome: PruneOutcome, tokenizer: Any, out_dir: Path, *, model_id: str, dtype: torch.dtype | None = None
) -> list[dict[str, Any]]:
    """Write the artifact into `out_dir` (created if needed); return its files with size and sha256.

    With `dtype`, the weights are cast to it first (in place: the model is not used afterwards);
    the report records the dtype and the size of the weight files.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        outcome.model.to(dtype)
    saved_dtype = next(outcome.model.parameters()).dtype
    if outcome.save_model is not None:
        outcome.save_model(out_dir)
    else:
        outcome.model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    weights = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
    outcome.report["artifact"] = {"dtype": str(saved_dtype).removeprefix("torch."), "weights_bytes": weights}
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
    lines += heldout_lines(report.get("heldout"))
    if "evaluation" in report:
        lines.append("- Evaluation before/after: see `slimforge_report.json` → `evaluation`")
    if "artifact" in report:
        art = report["artifact"]
        lines.append(f"- Weights: {art['dtype']}, {art['weights_bytes'] / 2**20:.1f} MiB")
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


def heldout_lines(heldout: dict[str, Any] | None) -> list[str]:
    """Model-card lines for the held-out calibration loss at each measured point."""
    if not heldout:
        return []
    points = ", ".join(
        f"{name} {heldout[name]['loss']:.3f} (ppl {heldout[name]['perplexity']:.2f})"
        for name in ("dense", "pruned", "compensated", "recovered")
        if name in heldout
    )
    return [
        f"- Held-out calibration loss ({heldout['samples']}x{heldout['seq_len']} {heldout['source']} tokens "
        f"never used for pruning): {points}"
    ]
