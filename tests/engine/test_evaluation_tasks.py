"""Readers of the zero-shot formats: hand-made fixtures, and counts of the real shared sets."""

from __future__ import annotations

import bz2
import json

import pytest

from tests.conftest import SHARED_DATA
from workers.engine.evaluation import TASKS, builtin_text, load_task
from workers.engine.evaluation.tasks import hellaswag_preprocess
from workers.engine.types import EngineError


def write_fixture_tasks(root):
    """One or two items per task, in the formats of /work/shared/data/eval (see SOURCES.md)."""
    (root / "piqa").mkdir(parents=True)
    (root / "piqa" / "dev.jsonl").write_text(
        json.dumps({"id": "a", "goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid"}) + "\n"
    )
    (root / "piqa" / "dev-labels.lst").write_text("0\n")
    (root / "hellaswag").mkdir()
    lines = ["Cooking: A man [title] cuts  bread. he", "2", "sings.", "runs.", "eats it.", "sleeps."]
    with bz2.open(root / "hellaswag" / "hellaswag_val_full.txt.bz2", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    for task, name in (("arc_easy", "ARC-Easy-Test.jsonl"), ("arc_challenge", "ARC-Challenge-Test.jsonl")):
        (root / task).mkdir()
        doc = {
            "id": "x",
            "question": {
                "stem": "What is 2+2?",
                "choices": [{"text": t, "label": str(i + 1)} for i, t in enumerate("345")],
            },
            "answerKey": "2",
        }
        (root / task / name).write_text(json.dumps(doc) + "\n")
    (root / "boolq").mkdir()
    rows = [
        {"question": "is the sky blue", "passage": "Sky -- It is blue.", "idx": 0, "label": "true"},
        {"question": "is grass red", "passage": "Grass -- It is green.", "idx": 1, "label": False},
    ]
    (root / "boolq" / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "winogrande").mkdir()
    instruction = (
        "Please choose the correct answer to fill in the blank to complete the given sentence: "
        "Tom thanked Bob because _ helped him.\n\nOption1: Tom Option2: Bob Answer format: option1/option2"
    )
    (root / "winogrande" / "test.json").write_text(json.dumps([{"instruction": instruction, "answer": "option2"}]))
    (root / "winogrande" / "dev-labels.lst").write_text("2\n")
    (root / "openbookqa").mkdir()
    header = "ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key\n"
    row = "1\tFog is likely near:\t(A) a marsh (B) a desert (C) the moon (D) a fire\tFog ...\tA\n"
    (root / "openbookqa" / "test.tsv").write_text(header + row)


def test_readers_build_lm_eval_prompts(tmp_path):
    write_fixture_tasks(tmp_path)
    piqa = load_task("piqa", tmp_path)[0]
    assert piqa.requests[0] == ("Question: Open a jar\nAnswer:", " twist the lid") and piqa.gold == 0
    hella = load_task("hellaswag", tmp_path)[0]
    assert hella.requests[2] == ("Cooking: A man. cuts bread. he", " eats it.") and hella.gold == 2
    arc = load_task("arc_easy", tmp_path)[0]
    assert arc.requests[1] == ("Question: What is 2+2?\nAnswer:", " 4") and arc.gold == 1  # numeric labels
    boolq = load_task("boolq", tmp_path)
    assert boolq[0].requests == (
        ("Sky -- It is blue.\nQuestion: is the sky blue?\nAnswer:", " no"),
        ("Sky -- It is blue.\nQuestion: is the sky blue?\nAnswer:", " yes"),
    )
    assert [b.gold for b in boolq] == [1, 0]  # string and JSON-boolean labels
    wino = load_task("winogrande", tmp_path)[0]
    assert wino.requests == (
        ("Tom thanked Bob because Tom", " helped him."),
        ("Tom thanked Bob because Bob", " helped him."),
    )
    assert wino.gold == 1
    obqa = load_task("openbookqa", tmp_path)[0]
    assert obqa.requests[0] == ("Fog is likely near:", " a marsh") and obqa.requests[3][1] == " a fire"
    assert obqa.gold == 0 and obqa.norm_lengths == (7, 8, 8, 6)


def test_hellaswag_preprocess_matches_lm_eval_rules():
    assert hellaswag_preprocess(" How to relax [title] Breathe [step] slowly.  ") == "How to relax. Breathe slowly."


def test_limit_is_a_fixed_seed_sample_in_file_order():
    a = load_task("arc_easy", SHARED_DATA / "eval", limit=50, seed=3)
    b = load_task("arc_easy", SHARED_DATA / "eval", limit=50, seed=3)
    c = load_task("arc_easy", SHARED_DATA / "eval", limit=50, seed=4)
    full = load_task("arc_easy", SHARED_DATA / "eval")
    assert a == b and a != c and len(a) == 50
    positions = [full.index(item) for item in a]
    assert positions == sorted(positions)


def test_unknown_task_and_missing_data_are_readable_errors(tmp_path):
    with pytest.raises(EngineError, match="Known tasks"):
        load_task("mmlu", tmp_path)
    with pytest.raises(EngineError) as err:
        load_task("piqa", tmp_path)
    assert err.value.code == "eval_data_missing"


# Counts and gold-label histograms from SOURCES.md: a reader that drops or shifts items fails here.
EXPECTED = {
    "piqa": (1838, None),
    "hellaswag": (10042, {0: 2515, 1: 2485, 2: 2584, 3: 2458}),
    "arc_easy": (2376, None),
    "arc_challenge": (1172, None),
    "boolq": (3270, {1: 2033, 0: 1237}),
    "winogrande": (1267, None),
    "openbookqa": (500, {0: 138, 1: 126, 2: 132, 3: 104}),
}


@pytest.mark.parametrize("task", TASKS)
def test_real_sets_parse_completely(task):
    items = load_task(task, SHARED_DATA)  # the data root works as well as its eval/ folder
    count, golds = EXPECTED[task]
    assert len(items) == count
    if golds:
        histogram = {}
        for item in items:
            histogram[item.gold] = histogram.get(item.gold, 0) + 1
        assert histogram == golds
    assert all(0 <= item.gold < len(item.requests) for item in items)


def test_builtin_texts():
    assert builtin_text("wikitext2", SHARED_DATA).startswith(" \n = Homarus gammarus")
    assert builtin_text("ptb", SHARED_DATA).count("\n") == 3761
    with pytest.raises(EngineError):
        builtin_text("c4", SHARED_DATA)
