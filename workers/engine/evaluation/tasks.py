"""Readers for the seven zero-shot sets, turning each file format into multiple-choice items.

Prompts follow lm-evaluation-harness's task definitions (zero-shot, target delimiter " "):
- piqa:        "Question: {goal}\\nAnswer:"                    -> " {sol}"
- hellaswag:   "{activity_label}: {ctx}" (wikihow tags removed) -> " {ending}"
- arc_*:       "Question: {stem}\\nAnswer:"                    -> " {choice text}"
- boolq:       "{passage}\\nQuestion: {question}?\\nAnswer:"     -> " no" / " yes"
- winogrande:  "{sentence up to _}{option}" (one context per option) -> " {rest of sentence}"
- openbookqa:  "{question_stem}"                               -> " {choice text}"

`acc_norm` divides each choice's log-likelihood by the character length of the choice string
(without the delimiter), as lm-eval does. WinoGrande's choices share one continuation, so there
acc_norm equals acc (lm-eval reports only acc for it).
"""

from __future__ import annotations

import bz2
import csv
import functools
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from workers.engine.types import EngineError

TASKS: tuple[str, ...] = ("piqa", "hellaswag", "arc_easy", "arc_challenge", "boolq", "winogrande", "openbookqa")


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question: a (context, continuation) request per choice."""

    requests: tuple[tuple[str, str], ...]
    gold: int
    norm_lengths: tuple[int, ...]  # divisor of each choice's log-likelihood for acc_norm


def _item(context: str, choices: list[str], gold: int) -> MCItem:
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} out of range for {len(choices)} choices")
    return MCItem(
        requests=tuple((context, " " + choice) for choice in choices),
        gold=gold,
        norm_lengths=tuple(max(len(choice), 1) for choice in choices),
    )


def _jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _labels(path: Path) -> list[int]:
    return [int(line) for line in path.read_text(encoding="utf-8").split()]


def read_piqa(task_dir: Path) -> list[MCItem]:
    docs = _jsonl(task_dir / "piqa" / "dev.jsonl")
    labels = _labels(task_dir / "piqa" / "dev-labels.lst")
    if len(docs) != len(labels):
        raise ValueError(f"piqa: {len(docs)} questions but {len(labels)} labels")
    return [
        _item(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], g) for d, g in zip(docs, labels, strict=True)
    ]


def hellaswag_preprocess(text: str) -> str:
    # WikiHow contexts carry bracketed tags; lm-eval turns " [title]" into ". " and drops the rest.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(task_dir: Path) -> list[MCItem]:
    # Derived text format: 6 lines per item (context, gold label, 4 endings). The context here is
    # `ctx`, i.e. ctx_b is not capitalised as lm-eval does (see SOURCES.md), so scores differ slightly.
    with bz2.open(task_dir / "hellaswag" / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"hellaswag: {len(lines)} lines is not a multiple of 6")
    items = []
    for i in range(0, len(lines), 6):
        context, label, *endings = lines[i : i + 6]
        items.append(_item(hellaswag_preprocess(context), [hellaswag_preprocess(e) for e in endings], int(label)))
    return items


def _read_arc(path: Path) -> list[MCItem]:
    items = []
    for doc in _jsonl(path):
        choices = doc["question"]["choices"]
        labels = [c["label"] for c in choices]
        context = f"Question: {doc['question']['stem']}\nAnswer:"
        items.append(_item(context, [c["text"] for c in choices], labels.index(doc["answerKey"].strip())))
    return items


def read_arc_easy(task_dir: Path) -> list[MCItem]:
    return _read_arc(task_dir / "arc_easy" / "ARC-Easy-Test.jsonl")


def read_arc_challenge(task_dir: Path) -> list[MCItem]:
    return _read_arc(task_dir / "arc_challenge" / "ARC-Challenge-Test.jsonl")


def _bool_label(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"boolq: unreadable label {value!r}")


def read_boolq(task_dir: Path) -> list[MCItem]:
    return [
        _item(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"], int(_bool_label(d["label"])))
        for d in _jsonl(task_dir / "boolq" / "val.jsonl")
    ]


_WINOGRANDE = re.compile(
    r"^Please choose the correct answer to fill in the blank to complete the given sentence: (.*)\n\n"
    r"Option1: (.*) Option2: (.*) Answer format: option1/option2$",
    re.DOTALL,
)


def winogrande_item(sentence: str, option1: str, option2: str, gold: int) -> MCItem:
    # Partial scoring (Trinh & Le): the option fills the blank in the context, and the shared
    # rest of the sentence is the continuation scored under each context.
    blank = sentence.index("_")
    target = " " + sentence[blank + 1 :].strip()
    prefixes = [sentence[:blank] + option for option in (option1, option2)]
    return MCItem(
        requests=tuple((prefix, target) for prefix in prefixes), gold=gold, norm_lengths=(len(target), len(target))
    )


def read_winogrande(task_dir: Path) -> list[MCItem]:
    records = json.loads((task_dir / "winogrande" / "test.json").read_text(encoding="utf-8"))
    labels = _labels(task_dir / "winogrande" / "dev-labels.lst")
    if len(records) != len(labels):
        raise ValueError(f"winogrande: {len(records)} sentences but {len(labels)} labels")
    items = []
    for record, label in zip(records, labels, strict=True):
        match = _WINOGRANDE.match(record["instruction"])
        if match is None:
            raise ValueError(f"winogrande: unrecognised record {record['instruction'][:80]!r}")
        sentence, option1, option2 = match.groups()
        items.append(winogrande_item(sentence, option1, option2, label - 1))
    return items


def read_openbookqa(task_dir: Path) -> list[MCItem]:
    items = []
    with (task_dir / "openbookqa" / "test.tsv").open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            parts = re.split(r"\((A|B|C|D)\) ", row["Choices"].strip())
            # re.split with a group gives ["", "A", text, "B", text, ...]
            letters, texts = parts[1::2], [t.strip() for t in parts[2::2]]
            items.append(_item(row["Question Stem"], texts, letters.index(row["Answer Key"].strip())))
    return items


READERS: dict[str, Callable[[Path], list[MCItem]]] = {
    "piqa": read_piqa,
    "hellaswag": read_hellaswag,
    "arc_easy": read_arc_easy,
    "arc_challenge": read_arc_challenge,
    "boolq": read_boolq,
    "winogrande": read_winogrande,
    "openbookqa": read_openbookqa,
}


def check_tasks(tasks: list[str]) -> list[str]:
    unknown = [t for t in tasks if t not in READERS]
    if unknown:
        raise EngineError(
            "unknown_task", f"Unknown evaluation task(s): {', '.join(unknown)}. Known tasks: {', '.join(TASKS)}."
        )
    return list(tasks)


def resolve_task_dir(data_dir: Path) -> Path:
    """Accept either the eval directory itself or the shared data root holding `eval/`."""
    data_dir = Path(data_dir).expanduser()
    if not any((data_dir / t).is_dir() for t in TASKS) and (data_dir / "eval").is_dir():
        return data_dir / "eval"
    return data_dir


@functools.lru_cache(maxsize=16)
def _read_cached(task: str, task_dir: Path, stamp: tuple[float, ...]) -> tuple[MCItem, ...]:
    # `stamp` (file mtimes) invalidates the cache when the operator replaces a data file.
    return tuple(READERS[task](task_dir))


def load_task(task: str, data_dir: Path, limit: int | None = None, seed: int = 0) -> list[MCItem]:
    """Items of one task; with `limit`, a fixed-seed random sample kept in file order."""
    check_tasks([task])
    task_dir = resolve_task_dir(data_dir).resolve()
    folder = task_dir / task
    stamp = tuple(sorted(p.stat().st_mtime for p in folder.iterdir())) if folder.is_dir() else ()
    try:
        items = list(_read_cached(task, task_dir, stamp))
    except FileNotFoundError as exc:
        raise EngineError(
            "eval_data_missing", f"Data for task {task!r} not found under {task_dir}: {exc.filename}"
        ) from exc
    if limit is not None and limit < len(items):
        keep = sorted(random.Random(seed).sample(range(len(items)), limit))
        items = [items[i] for i in keep]
    return items
