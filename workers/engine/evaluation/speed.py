"""Throughput on the model's own device: batched forward tokens/s and greedy generation tokens/s."""

from __future__ import annotations

import time

import torch

from workers.engine.evaluation.modelio import model_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, min_seconds: float, max_repeats: int) -> float:
    """Mean seconds per call after one warm-up call; repeats until `min_seconds` have passed."""
    fn()
    _sync(device)
    repeats, started = 0, time.perf_counter()
    while repeats < max_repeats:
        fn()
        _sync(device)
        repeats += 1
        if time.perf_counter() - started >= min_seconds:
            break
    return (time.perf_counter() - started) / repeats


@torch.no_grad()
def speed(
    model: torch.nn.Module,
    tokenizer=None,
    *,
    batch_size: int = 4,
    seq_len: int = 128,
    prompt_len: int = 16,
    new_tokens: int = 32,
    min_seconds: float = 1.0,
    max_repeats: int = 10,
    seed: int = 0,
) -> dict:
    """Forward tokens/s on a [batch_size, seq_len] batch and generation tokens/s (batch 1, greedy,
    KV cache, exactly `new_tokens` new tokens). Inputs are fixed-seed random ids, so the numbers
    depend only on the model's shapes and the device."""
    device = model_device(model)
    vocab = int(getattr(model.config, "vocab_size", 0) or len(tokenizer))
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, vocab, (batch_size, seq_len), generator=generator).to(device)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=generator).to(device)
    was_training = model.training
    model.eval()
    try:
        forward_s = _timed(lambda: model(input_ids=batch, use_cache=False), device, min_seconds, max_repeats)
        pad_id = getattr(tokenizer, "pad_token_id", None) or getattr(tokenizer, "eos_token_id", None) or 0
        generate_s = _timed(
            lambda: model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            ),
            device,
            min_seconds,
            max(1, max_repeats // 3),
        )
    finally:
        model.train(was_training)
    return {
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "forward_tokens_per_s": round(batch_size * seq_len / forward_s, 1),
        "forward_shape": [batch_size, seq_len],
        "generate_tokens_per_s": round(new_tokens / generate_s, 2),
        "generate_new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
    }
