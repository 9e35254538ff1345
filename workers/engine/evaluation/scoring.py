"""Log-likelihood of (context, continuation) requests, batched, with shared contexts run once.

All choices of one question go into one packed row holding the token trie of their inputs: the
shared context once, then every continuation (minus its last token, which is only a target)
branching off it. A tree attention mask lets each token see only its trie ancestors and position
ids are depths in the trie, so every choice is scored exactly as if it were run alone — with
shared prefixes encoded once instead of once per choice, and logits computed only at the
positions that predict continuation tokens. Rows are sorted by length and
packed into batches under a token budget to keep padding small.

Tokenisation follows lm-evaluation-harness: encode(context + continuation) and take the tokens
after len(encode(context)) as the continuation; trailing context spaces move to the continuation.

Sliding-window layers get their own windowed copy of the tree mask (HF accepts a mask per layer
kind). Models whose attention ignores custom 4-D masks would silently give wrong numbers, so the
longest row is checked once per model against a plain full-model forward; on mismatch (or for
attention kinds we do not know) scoring falls back to every request as its own padded sequence.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from workers.engine.evaluation.modelio import max_positions, model_device, split_model

log = logging.getLogger(__name__)

Request = tuple[str, str]


@dataclass
class _Row:
    """One packed sequence: the token trie of a question's requests (shared prefixes stored once)."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # trie parent of each token, -1 for roots
    # (row index of the predicting token, target token id, request index within the group)
    targets: list[tuple[int, int, int]] = field(default_factory=list)
    n_requests: int = 0


class Tokenized:
    """Context and continuation token ids of a list of requests, encoded the lm-eval way."""

    def __init__(self, tokenizer, requests: Sequence[Request], add_bos: bool) -> None:
        contexts, wholes = [], []
        for context, continuation in requests:
            n_spaces = len(context) - len(context.rstrip(" "))
            if n_spaces:
                context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
            contexts.append(context)
            wholes.append(context + continuation)
        encode = _batch_encoder(tokenizer)
        context_ids, whole_ids = encode(contexts), encode(wholes)
        bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
        empty = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0]
        self.pairs: list[tuple[list[int], list[int]]] = []
        for ctx, whole in zip(context_ids, whole_ids, strict=True):
            cont = whole[len(ctx) :]
            if not cont:
                raise ValueError("a continuation encoded to zero tokens")
            self.pairs.append((bos + ctx if (bos or ctx) else empty, cont))


def _batch_encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    def encode(texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return list(tokenizer(texts, add_special_tokens=False)["input_ids"])

    return encode


def wants_bos(model: torch.nn.Module) -> bool:
    # lm-eval prepends BOS for Gemma models, which degrade badly without it.
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    return model_type.startswith("gemma")


def _build_row(pairs: list[tuple[list[int], list[int]]], max_len: int | None) -> _Row:
    """Insert every request's input tokens (context + continuation minus its last token) in a trie.

    Choices sharing a context, and common prefixes beyond it (WinoGrande's sentence start, endings
    opening with the same word), then cost one token each; a token sees exactly its trie ancestors.
    """
    row = _Row(n_requests=len(pairs))
    children: dict[tuple[int, int], int] = {}
    for index, (ctx, cont) in enumerate(pairs):
        sequence = ctx + cont
        if max_len is not None and len(sequence) - 1 > max_len:
            sequence = sequence[len(sequence) - 1 - max_len :]  # left-truncate the context, as lm-eval does
        first_target = len(sequence) - len(cont)
        node = -1
        path = []
        for depth, token in enumerate(sequence[:-1]):
            key = (node, token)
            if key not in children:
                children[key] = len(row.tokens)
                row.tokens.append(token)
                row.positions.append(depth)
                row.parents.append(node)
            node = children[key]
            path.append(node)
        for j in range(first_target, len(sequence)):
            row.targets.append((path[j - 1], sequence[j], index))
    return row


def _tree_inputs(rows: list[_Row], length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded token ids, position ids and the boolean [B, L, L] "may attend" matrix of a batch."""
    batch = len(rows)
    tokens = torch.zeros(batch, length, dtype=torch.long)
    positions = torch.zeros(batch, length, dtype=torch.long)
    # Padding attends only to itself, so no attention row is fully masked.
    allowed = torch.eye(length, dtype=torch.bool).repeat(batch, 1, 1)
    for b, row in enumerate(rows):
        n = len(row.tokens)
        tokens[b, :n] = torch.tensor(row.tokens)
        positions[b, :n] = torch.tensor(row.positions)
        visible = allowed[b]
        for node, parent in enumerate(row.parents):  # parents precede children in the trie order
            if parent >= 0:
                visible[node, :node] = visible[parent, :node]
    return tokens, positions, allowed


def _layer_kinds(model: torch.nn.Module) -> tuple[set[str], int | None]:
    """Attention kinds of the model's layers ("full_attention", "sliding_attention") and the window."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return set(layer_types), window
    if window and getattr(config, "use_sliding_window", True) is not False:
        return {"sliding_attention"}, window  # Mistral style: every layer slides
    return {"full_attention"}, None


def packing_supported(model: torch.nn.Module) -> bool:
    return _layer_kinds(model)[0] <= {"full_attention", "sliding_attention"}


def _attention_mask(model: torch.nn.Module, allowed: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """Additive 4-D mask(s) for the tree; per layer kind when sliding layers would see a difference."""

    def additive(mask: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(mask.shape[0], 1, *mask.shape[1:], dtype=dtype)
        return out.masked_fill_(~mask[:, None], torch.finfo(dtype).min)

    kinds, window = _layer_kinds(model)
    full = additive(allowed)
    if "sliding_attention" not in kinds or window is None or int(positions.max()) < window:
        return full
    # A key is inside the window when query position - key position < window (HF's convention).
    near = (positions[:, :, None] - positions[:, None, :]) < window
    sliding = additive(allowed & near)
    if kinds == {"sliding_attention"}:
        return sliding
    return {"full_attention": full, "sliding_attention": sliding}


@torch.no_grad()
def _score_packed(model: torch.nn.Module, rows: list[_Row]) -> list[list[float]]:
    split = split_model(model)
    device = model_device(model)
    dtype = next(model.parameters()).dtype
    length = max(len(r.tokens) for r in rows)
    tokens, positions, allowed = _tree_inputs(rows, length)
    mask = _attention_mask(model, allowed, positions, dtype)
    if isinstance(mask, dict):
        mask = {kind: m.to(device) for kind, m in mask.items()}
    else:
        mask = mask.to(device)
    tokens, positions = tokens.to(device), positions.to(device)
    if split is not None:
        hidden = split.decoder(
            input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=False
        ).last_hidden_state
    else:
        hidden = None
        full_logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=False).logits
    flat_b = torch.tensor([b for b, r in enumerate(rows) for _ in r.targets], device=device)
    flat_p = torch.tensor([t[0] for r in rows for t in r.targets], device=device)
    flat_t = torch.tensor([t[1] for r in rows for t in r.targets], device=device)
    logits = split.head(hidden[flat_b, flat_p]) if split is not None else full_logits[flat_b, flat_p]
    token_ll = torch.log_softmax(logits.float(), dim=-1).gather(1, flat_t[:, None]).squeeze(1).double().cpu()
    out: list[list[float]] = []
    cursor = 0
    for row in rows:
        sums = torch.zeros(row.n_requests, dtype=torch.float64)
        index = torch.tensor([t[2] for t in row.targets])
        sums.index_add_(0, index, token_ll[cursor : cursor + len(row.targets)])
        cursor += len(row.targets)
        out.append(sums.tolist())
    return out


@torch.no_grad()
def _score_plain(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    """Reference path: each request alone, right-padded, standard causal attention, full logits."""
    device = model_device(model)
    max_len = max_positions(model)
    seqs = []
    for ctx, cont in pairs:
        seq = (ctx + cont)[:-1]
        if max_len is not None and len(seq) > max_len:
            seq = seq[-max_len:]
        seqs.append((seq, cont))
    length = max(len(s) for s, _ in seqs)
    tokens = torch.zeros(len(seqs), length, dtype=torch.long)
    attention = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, (seq, _) in enumerate(seqs):
        tokens[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
    logits = model(input_ids=tokens.to(device), attention_mask=attention.to(device), use_cache=False).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for i, (seq, cont) in enumerate(seqs):
        start = len(seq) - len(cont)
        picked = logprobs[i, start : len(seq)].gather(1, torch.tensor(cont, device=device)[:, None])
        out.append(float(picked.double().sum()))
    return out


def _batches(rows: list[_Row], order: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    batches, current, current_len = [], [], 0
    for index in order:
        length = len(rows[index].tokens)
        new_len = max(current_len, length)
        if current and (len(current) >= max_rows or new_len * (len(current) + 1) > max_tokens):
            batches.append(current)
            current, new_len = [], length
        current.append(index)
        current_len = new_len
    if current:
        batches.append(current)
    return batches


def _packed_agrees(model: torch.nn.Module, row: _Row, pairs: list[tuple[list[int], list[int]]]) -> bool:
    try:
        packed = _score_packed(model, [row])[0]
    except (TypeError, ValueError, RuntimeError) as exc:  # a forward that rejects custom masks/positions
        log.warning("packed scoring failed on this model (%s)", exc)
        return False
    plain = _score_plain(model, pairs)
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    return all(abs(a - b) <= tol * max(1.0, abs(b)) for a, b in zip(packed, plain, strict=True))


def _signature(model: torch.nn.Module) -> tuple:
    config = getattr(model, "config", None)
    kinds = sorted({type(m).__name__ for m in model.modules()})
    return (type(model).__name__, getattr(config, "_attn_implementation", None), tuple(kinds))


def loglikelihoods(
    model: torch.nn.Module,
    tokenizer,
    groups: Sequence[Sequence[Request]],
    *,
    max_rows: int = 32,
    max_tokens: int = 4096,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """Summed log-probability of every continuation given its context.

    `groups` is one list of requests per question (choices sharing a context are encoded once).
    `on_batch(n_groups_done_in_batch)` is called after every forward pass.
    """
    flat = [request for group in groups for request in group]
    tokenized = Tokenized(tokenizer, flat, wants_bos(model)).pairs
    group_pairs, cursor = [], 0
    for group in groups:
        group_pairs.append(tokenized[cursor : cursor + len(group)])
        cursor += len(group)
    max_len = max_positions(model)
    rows = [_build_row(pairs, max_len) for pairs in group_pairs]
    results: list[list[float] | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))
    was_training = model.training
    model.eval()
    try:
        # The check's verdict is remembered per model instance and module make-up, so a model
        # whose modules are swapped (e.g. by a pruning method) is checked again.
        signature = _signature(model)
        remembered = getattr(model, "_slimforge_packed_ok", None)
        packed_ok = remembered[1] if isinstance(remembered, tuple) and remembered[0] == signature else None
        if not packing_supported(model):
            packed_ok = False
        elif packed_ok is None and rows:
            # Check on the longest row: it is the one most likely to hit windows and truncation.
            packed_ok = _packed_agrees(model, rows[order[0]], group_pairs[order[0]])
            if not packed_ok:
                log.warning("packed tree-attention scoring disagrees with a plain forward; using the slow path")
            try:
                model._slimforge_packed_ok = (signature, packed_ok)
            except AttributeError:
                pass
        if packed_ok:
            for batch in _batches(rows, order, max_rows, max_tokens):
                for index, scores in zip(batch, _score_packed(model, [rows[i] for i in batch]), strict=True):
                    results[index] = scores
                if on_batch:
                    on_batch(len(batch))
        else:
            for index in order:
                results[index] = _score_plain(model, group_pairs[index])
                if on_batch:
                    on_batch(1)
    finally:
        model.train(was_training)
    return [r if r is not None else [] for r in results]
