import json

import pytest

from arft_core import metrics
from arft_core.protocol import coding_prompt, extract_answer, is_answer_step
from arft_core.rewards import answer_f1_reward, format_reward
from conftest import SHARED


def test_set_based_f1_and_em():
    assert metrics.score("the Eiffel Tower", ["Eiffel Tower"]) == {"f1": 1.0, "em": 1.0}
    # Set-based: repeated tokens count once (SQuAD's multiset F1 would give 0.8 here).
    assert metrics.f1("paris paris france", "paris france") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert metrics.score("blue", ["red", "blue square"])["f1"] == pytest.approx(2 / 3)
    assert metrics.score(None, ["x"]) == {"f1": 0.0, "em": 0.0}
    # The paper's quirk: "a" is an article, so it normalises to empty and matches gold "A".
    assert metrics.score("a", ["A"])["em"] == 1.0


def test_cjk_character_level():
    assert metrics.f1("发票号码", "发票代码", cjk=True) == pytest.approx(0.75)
    assert metrics.f1("发票号码", "发票代码", cjk=False) == 0.0
    assert metrics.normalize("发票 号码，", cjk=True) == "发票号码"


def test_released_mat_search_predictions_reproduce_table1():
    rows = json.loads((SHARED / "released-predictions" / "MAT-Search_7b_step200_mat_search_web_n4.json").read_text())
    scored = []
    for i, r in enumerate(rows):
        golds = r["gt"] if isinstance(r["gt"], list) else [r["gt"]]
        scored.append({**metrics.score(r["pred_answer"], golds), "split": "simple" if i < 75 else "hard",
                       "answered": r["pred_answer"] is not None})
    agg = metrics.aggregate(scored)
    assert (agg["simple"]["f1"], agg["simple"]["em"]) == (71.78, 66.67)
    assert (agg["hard"]["f1"], agg["hard"]["em"]) == (55.77, 44.0)
    assert (agg["avg"]["f1"], agg["avg"]["em"]) == (63.77, 55.33)
    assert agg["avg"]["no_answer_rate"] == pytest.approx(100 * 5 / 150, abs=0.01)


def test_answer_parsing_handles_multiline():
    assert extract_answer("<think>x</think>\n<answer> line one\nline two </answer>") == "line one\nline two"
    assert extract_answer("<think>x</think> no tag") is None


def test_format_reward():
    good = "<think> the image is dark </think>\n<answer> red </answer>"
    assert is_answer_step(good)
    assert format_reward([[{"role": "assistant", "content": good}]]) == [1.0]
    for bad in ("<answer> red </answer>", good + " trailing", good + "<answer> x </answer>",
                "<think> a </think><code>x</code>"):
        assert format_reward([bad]) == [0.0], bad


def test_answer_f1_reward_has_no_whole_completion_fallback():
    completions = ["<think>.</think><answer> red circle </answer>", "red circle", "<answer>blue</answer>"]
    assert answer_f1_reward(completions, answers=[["red circle"]] * 3) == [1.0, 0.0, 0.0]


def test_coding_prompt_puts_image_first():
    msg = coding_prompt("What colour?")[0]
    assert msg["content"][0] == {"type": "image"}
    assert msg["content"][1]["text"].endswith("# Current reasoning chain:\n<query> What colour? </query>")
