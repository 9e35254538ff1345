"""EvaluationConfig, evaluate() (progress, cancel, clipping), the dense-baseline cache and the CLI."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from pydantic import ValidationError

from tests.engine.test_evaluation import CharTokenizer
from tests.engine.test_evaluation_tasks import write_fixture_tasks
from workers.engine.evaluation import EvaluationConfig, cached_evaluate, evaluate
from workers.engine.types import EngineError, JobCancelled

TEXT = "The quick brown fox jumps over the lazy dog. " * 20


def test_config_validates_with_readable_errors():
    config = EvaluationConfig(perplexity=["wikitext2", "dataset:ds_123"], seq_lens=[2048, 128], tasks=["piqa"])
    assert config.seq_lens == [128, 2048]
    with pytest.raises(ValidationError, match="known tasks: piqa, hellaswag"):
        EvaluationConfig(tasks=["mmlu"])
    with pytest.raises(ValidationError, match="outside 16..8192"):
        EvaluationConfig(seq_lens=[8])
    with pytest.raises(ValidationError, match="unknown perplexity text"):
        EvaluationConfig(perplexity=["file:/etc/passwd"])
    with pytest.raises(ValidationError):
        EvaluationConfig(tasks=["piqa"], batch=4)  # extra keys are an error


def test_evaluate_runs_every_part_with_monotonic_progress(tiny_llama, tmp_path):
    write_fixture_tasks(tmp_path)
    calls = []
    config = EvaluationConfig(perplexity=["wikitext2"], seq_lens=[16, 1024], tasks=["arc_easy", "boolq"], limit=None)
    result = evaluate(
        tiny_llama,
        CharTokenizer(),
        config,
        texts={"wikitext2": TEXT},
        data_dir=tmp_path,
        progress=lambda *a: calls.append(a),
    )
    # 1024 is clipped to the model's 256 positions
    assert set(result["perplexity"]["wikitext2"]) == {"16", "256"}
    assert result["perplexity"]["wikitext2"]["16"]["n_segments"] == len(TEXT) // 16
    assert result["tasks"]["boolq"]["n"] == 2 and result["tasks"]["arc_easy"]["n"] == 1
    assert result["parameters"]["total"] > result["parameters"]["without_embeddings"] > 0
    assert result["speed"]["forward_tokens_per_s"] > 0 and result["speed"]["generate_tokens_per_s"] > 0
    assert result["config"]["tasks"] == ["arc_easy", "boolq"]
    fractions = [c[1] for c in calls]
    assert {c[0] for c in calls} == {"evaluating"}
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    json.dumps(result)  # JSON-serialisable


def test_evaluate_cancels_between_batches(tiny_llama):
    checks = iter([False, False, True])
    config = EvaluationConfig(perplexity=["wikitext2"], seq_lens=[16], speed=False)
    with pytest.raises(JobCancelled):
        evaluate(
            tiny_llama,
            CharTokenizer(),
            config,
            texts={"wikitext2": TEXT},
            data_dir=None,
            should_cancel=lambda: next(checks, True),
            batch_size=1,
        )


def test_evaluate_requires_texts_and_data_dir(tiny_llama):
    with pytest.raises(EngineError, match="No text given"):
        evaluate(tiny_llama, CharTokenizer(), EvaluationConfig(perplexity=["ptb"]), texts={}, data_dir=None)
    with pytest.raises(EngineError, match="data directory"):
        evaluate(tiny_llama, CharTokenizer(), EvaluationConfig(tasks=["piqa"]), texts={}, data_dir=None)


def test_cached_evaluate_stores_json_per_model_and_config(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"tasks": {"piqa": {"acc": 0.5}}, "n": len(calls)}

    config = EvaluationConfig(tasks=["piqa"], limit=10)
    first = cached_evaluate(tmp_path, "builtin:smollm2-135m", config, compute)
    again = cached_evaluate(tmp_path, "builtin:smollm2-135m", config, compute)
    assert (first["cached"], again["cached"]) == (False, True) and again["n"] == 1 and len(calls) == 1
    cached_evaluate(tmp_path, "builtin:smollm2-135m", EvaluationConfig(tasks=["piqa"], limit=20), compute)
    cached_evaluate(tmp_path, "builtin:gemma3-270m", config, compute)
    assert len(calls) == 3
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 3 and all(f.endswith(".json") and not f.startswith(".") for f in files)
    # A corrupt entry is recomputed, not trusted.
    (tmp_path / files[0]).write_text("{not json")
    for key in ("builtin:smollm2-135m", "builtin:gemma3-270m"):
        cached_evaluate(tmp_path, key, config, compute)
    assert len(calls) == 4


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A tiny LLaMA + byte-level BPE tokenizer saved as a normal HF checkpoint directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([TEXT, "Question: Answer: yes no"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", bos_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )
    out = tmp_path / "model"
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _parser():
    from workers.engine.cli_eval import add_eval_parser

    parser = argparse.ArgumentParser(prog="slimforge")
    add_eval_parser(parser.add_subparsers(dest="command"))
    return parser


def test_cli_json_prints_exactly_one_object(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    write_fixture_tasks(data)
    text_file = tmp_path / "notes.txt"
    text_file.write_text(TEXT)
    monkeypatch.chdir(tmp_path)  # a relative local directory is accepted as the model
    args = _parser().parse_args(
        ["eval", "--model", "model", "--tasks", "arc_easy,piqa", "--tasks", "boolq", "--limit", "5"]
        + ["--data-dir", str(data), "--perplexity", str(text_file), "--seq-len", "16,32", "--json", "--no-speed"]
    )
    assert args.handler(args) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert captured.out.count("\n") == 1
    assert set(result["tasks"]) == {"arc_easy", "piqa", "boolq"}
    assert result["tasks"]["boolq"]["n"] == 2 and 0.0 <= result["tasks"]["boolq"]["acc"] <= 1.0
    assert set(result["perplexity"][str(text_file)]) == {"16", "32"}
    assert result["parameters"]["total"] > 0 and "speed" not in result


def test_cli_rejects_unknown_task_with_exit_code_2(capsys):
    args = _parser().parse_args(["eval", "--model", "builtin:smollm2-135m", "--tasks", "mmlu", "--data-dir", "."])
    assert args.handler(args) == 2
    captured = capsys.readouterr()
    assert "unknown task(s) mmlu" in captured.err and captured.out == ""


def test_cli_reports_missing_local_model(tmp_path, capsys):
    args = _parser().parse_args(["eval", "--model", str(tmp_path / "nope"), "--json"])
    assert args.handler(args) == 1
    assert "error (" in capsys.readouterr().err
