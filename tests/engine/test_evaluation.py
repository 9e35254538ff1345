"""Fast tests of the evaluation suite: hand-computed cases, packed scoring vs plain forwards."""

from __future__ import annotations

import math

import pytest
import torch

from workers.engine.evaluation import perplexity
from workers.engine.evaluation.scoring import Tokenized, _build_row, _score_plain, _signature, loglikelihoods, wants_bos
from workers.engine.evaluation.tasks import MCItem, winogrande_item
from workers.engine.evaluation.zero_shot import score_items


class CharTokenizer:
    """One token per character (code point mod vocab); enough for tiny random models."""

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 0

    def __init__(self, vocab: int = 128) -> None:
        self.vocab = vocab

    def __len__(self) -> int:
        return self.vocab

    def encode(self, text: str) -> list[int]:
        return [3 + ord(c) % (self.vocab - 3) for c in text]

    def __call__(self, texts, add_special_tokens=False, return_attention_mask=True):
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts)}
        return {"input_ids": [self.encode(t) for t in texts]}


class BigramLM(torch.nn.Module):
    """Logits depend only on the current token: log-likelihoods are sums of table entries."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table)
        self.config = type("Config", (), {"vocab_size": table.shape[0], "max_position_embeddings": 64})()

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_score_items_acc_and_acc_norm_hand_computed():
    # Choice 0 has the higher total log-likelihood, choice 1 the higher per-character one.
    item_a = MCItem(requests=(("q", " x"), ("q", " yyyy")), gold=0, norm_lengths=(1, 4))
    item_b = MCItem(requests=(("q", " x"), ("q", " yyyy")), gold=1, norm_lengths=(1, 4))
    lls = [[-5.0, -8.0], [-5.0, -8.0]]
    result = score_items([item_a, item_b], lls)
    assert result["n"] == 2
    assert result["acc"] == 0.5 and result["acc_norm"] == 0.5
    only_a = score_items([item_a], lls[:1])
    assert (only_a["acc"], only_a["acc_norm"]) == (1.0, 0.0)
    only_b = score_items([item_b], lls[1:])
    assert (only_b["acc"], only_b["acc_norm"]) == (0.0, 1.0)


def test_ties_pick_first_choice_like_numpy_argmax():
    item = MCItem(requests=(("q", " a"), ("q", " b")), gold=0, norm_lengths=(1, 1))
    assert score_items([item], [[-1.0, -1.0]])["acc"] == 1.0


def test_loglikelihood_of_stub_model_matches_table_sums():
    torch.manual_seed(0)
    table = torch.randn(128, 128)
    model, tok = BigramLM(table).eval(), CharTokenizer()
    logp = torch.log_softmax(table, dim=-1)
    groups = [[("ab", " c"), ("ab", " dd")], [("xyz", " w")]]
    got = loglikelihoods(model, tok, groups)
    for group, scores in zip(groups, got, strict=True):
        for (context, continuation), score in zip(group, scores, strict=True):
            ids = tok.encode(context + continuation)
            start = len(context)
            expected = sum(logp[ids[i - 1], ids[i]].item() for i in range(start, len(ids)))
            assert score == pytest.approx(expected, abs=1e-5)


def _plain_loop_loglik(model, tok, context, continuation):
    """Independent reference: one unpadded forward per request."""
    bos = [tok.bos_token_id] if wants_bos(model) else []
    ids = bos + tok.encode(context + continuation)
    n_ctx = len(bos) + len(tok.encode(context))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    return sum(logp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids)))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_packed_tree_scoring_equals_separate_forwards(fixture, request):
    model = request.getfixturevalue(fixture)
    tok = CharTokenizer()
    groups = [
        # shared context, continuations sharing a first word, different lengths
        [("The cat sat on the", " mat."), ("The cat sat on the", " mat, purring"), ("The cat sat on the", " x")],
        # WinoGrande style: two contexts, one shared continuation
        [("Anna helped Maria because Anna", " was kind."), ("Anna helped Maria because Maria", " was kind.")],
        # a long context (beyond tiny_gemma3's sliding window of 8) with one-token continuations
        [("Passage: " + "lorem ipsum dolor " * 4 + "\nQuestion: is it?\nAnswer:", c) for c in (" no", " yes")],
    ]
    if hasattr(model, "_slimforge_packed_ok"):
        del model._slimforge_packed_ok
    got = loglikelihoods(model, tok, groups, max_rows=2)
    assert model._slimforge_packed_ok[1] is True  # the packed path was used, not the fallback
    for group, scores in zip(groups, got, strict=True):
        for (context, continuation), score in zip(group, scores, strict=True):
            assert score == pytest.approx(_plain_loop_loglik(model, tok, context, continuation), abs=2e-4)


def test_trie_stores_shared_prefixes_once():
    tok = CharTokenizer()
    pairs = Tokenized(tok, [("abc", " de"), ("abc", " df"), ("abx", " de")], add_bos=False).pairs
    row = _build_row(pairs, max_len=None)
    # inputs: "abc d", "abc d", "abx d" -> shared "ab", then "c d" and "x d": 2 + 3 + 3 tokens
    assert len(row.tokens) == 8
    assert len(row.targets) == 9  # three targets per request


def test_context_is_left_truncated_to_model_length():
    tok = CharTokenizer()
    pairs = Tokenized(tok, [("a" * 100, " bc")], add_bos=False).pairs
    row = _build_row(pairs, max_len=16)
    assert len(row.tokens) == 16 and max(row.positions) == 15
    assert [t[1] for t in row.targets] == tok.encode(" bc")


def test_winogrande_partial_scoring_builds_shared_suffix():
    item = winogrande_item("Sarah beat Maria so _ got the prize.", "Sarah", "Maria", gold=0)
    assert item.requests == (
        ("Sarah beat Maria so Sarah", " got the prize."),
        ("Sarah beat Maria so Maria", " got the prize."),
    )
    assert item.norm_lengths[0] == item.norm_lengths[1]


def test_fallback_path_when_packing_disagrees(tiny_llama):
    tok = CharTokenizer()
    tiny_llama._slimforge_packed_ok = (_signature(tiny_llama), False)  # as if the self-check had failed
    groups = [[("hello there", " friend"), ("hello there", " foe")]]
    got = loglikelihoods(tiny_llama, tok, groups)
    pairs = Tokenized(tok, groups[0], add_bos=False).pairs
    assert got[0] == pytest.approx(_score_plain(tiny_llama, pairs), abs=1e-6)
    assert got[0][0] == pytest.approx(_plain_loop_loglik(tiny_llama, tok, "hello there", " friend"), abs=2e-4)


def test_perplexity_equals_exp_mean_nll_of_plain_loop(tiny_llama):
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (16 * 5 + 7,))  # 5 full segments + a dropped tail
    result = perplexity(tiny_llama, ids, seq_len=16, batch_size=2)
    total, count = 0.0, 0
    per_segment = []
    with torch.no_grad():
        for s in range(5):
            segment = ids[s * 16 : (s + 1) * 16]
            logp = torch.log_softmax(tiny_llama(input_ids=segment[None]).logits[0].double(), dim=-1)
            nll = [-logp[i - 1, segment[i]].item() for i in range(1, 16)]
            per_segment.append(sum(nll) / 15)
            total += sum(nll)
            count += 15
    assert result["n_segments"] == 5 and result["n_tokens"] == count == 75
    assert result["nll"] == pytest.approx(total / count, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # Standard error over segments (sample std / sqrt(n)), delta method for the perplexity.
    mean = sum(per_segment) / 5
    stderr = math.sqrt(sum((v - mean) ** 2 for v in per_segment) / 4 / 5)
    assert result["segment_nll"] == pytest.approx(per_segment, abs=1e-5)
    assert result["nll_stderr"] == pytest.approx(stderr, rel=1e-4)
    assert result["ppl_stderr"] == pytest.approx(result["ppl"] * stderr, rel=1e-4)


def test_perplexity_reports_progress_and_rejects_short_text(tiny_llama):
    from workers.engine.types import EngineError

    calls = []
    perplexity(tiny_llama, torch.arange(64) % 128, seq_len=16, batch_size=3, progress=lambda *a: calls.append(a))
    assert [round(c[1], 2) for c in calls] == [0.75, 1.0] and calls[0][0] == "evaluating"
    with pytest.raises(EngineError):
        perplexity(tiny_llama, torch.arange(10), seq_len=16)


def test_packing_verdict_is_rechecked_when_modules_change(tiny_llama):
    tiny_llama._slimforge_packed_ok = (("SomeOtherModel",), False)  # stale verdict of another make-up
    loglikelihoods(tiny_llama, CharTokenizer(), [[("abc", " d"), ("abc", " e")]])
    assert tiny_llama._slimforge_packed_ok == (_signature(tiny_llama), True)


def test_batched_packing_equals_one_item_at_a_time_within_1e4(tiny_llama):
    """Many groups of mixed lengths, shared contexts and shared continuation prefixes, scored in
    length-sorted padded batches, give the log-likelihoods of scoring every request alone."""
    tok = CharTokenizer()
    g = torch.Generator().manual_seed(5)
    words = ["red", "blue", "green", "a cat", "the dog ran", "x", "yes", "no", "maybe later"]
    groups = []
    for i in range(14):
        context = f"Q{i}: " + " ".join(words[j] for j in torch.randint(0, 9, (1 + i % 6,), generator=g).tolist())
        n_choices = 2 + i % 3
        groups.append([(context, " " + words[(i + c) % 9] + ("s" * c)) for c in range(n_choices)])
    groups.append([("", " lone continuation")])  # empty context
    if hasattr(tiny_llama, "_slimforge_packed_ok"):
        del tiny_llama._slimforge_packed_ok
    got = loglikelihoods(tiny_llama, tok, groups, max_rows=3, max_tokens=96)  # several padded batches
    assert tiny_llama._slimforge_packed_ok[1] is True
    pairs = Tokenized(tok, [r for group in groups for r in group], add_bos=False).pairs
    naive = [_score_plain(tiny_llama, [pair])[0] for pair in pairs]
    flat = [s for scores in got for s in scores]
    assert len(flat) == len(naive)
    assert max(abs(a - b) for a, b in zip(flat, naive, strict=True)) < 1e-4


def test_per_item_outcomes_agree_with_the_accuracies():
    items = [
        MCItem(requests=(("q", " x"), ("q", " yyyy")), gold=0, norm_lengths=(1, 4)),
        MCItem(requests=(("q", " x"), ("q", " yyyy")), gold=1, norm_lengths=(1, 4)),
    ]
    result = score_items(items, [[-5.0, -8.0], [-5.0, -8.0]], per_item=True)
    assert result["hits"] == [1, 0] and result["hits_norm"] == [0, 1]
    assert sum(result["hits"]) / 2 == result["acc"] and sum(result["hits_norm"]) / 2 == result["acc_norm"]
    assert "hits" not in score_items(items, [[-5.0, -8.0], [-5.0, -8.0]])
