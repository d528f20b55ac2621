"""Metrics and rewards: the paper's set-based F1/EM with its CJK handling (Table 1 reproduced from the authors'
released predictions), SQuAD F1, `arft score`, and each reward function of spec §3 in both variants."""

import json
import subprocess
import sys

import pytest

from arft_core import metrics, rewards
from arft_core.agent import AgentEnv, EnvItem, Tools
from arft_core.config import AgentConfig, load_config
from arft_core.evaluation import load_benchmark
from arft_core.protocol import (CODING_SYSTEM_PROMPT, PHOTOMETRIC, PROBLEM_LABELS, ROTATIONS, coding_prompt,
                                extract_answer, has_cjk, is_answer_step, parse_step, problem_labels, tips)
from conftest import SHARED, write_params

RELEASED = SHARED / "released-predictions"


def test_set_based_f1_and_em():
    assert metrics.score("the Eiffel Tower", ["Eiffel Tower"]) == {"f1": 1.0, "em": 1.0, "squad_f1": 1.0}
    # Set-based: repeated tokens count once; SQuAD's multiset F1 counts them.
    assert metrics.f1("paris paris france", "paris france") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert metrics.squad_f1("paris paris france", "paris france") == pytest.approx(0.8)
    assert metrics.score("blue", ["red", "blue square"])["f1"] == pytest.approx(2 / 3)
    assert metrics.score(None, ["x"]) == {"f1": 0.0, "em": 0.0, "squad_f1": 0.0}
    # The paper's quirk: "a" is an article, so it normalises to empty and matches gold "A".
    assert metrics.score("a", ["A"])["em"] == 1.0


def test_cjk_character_level():
    assert metrics.f1("发票号码", "发票代码", cjk=True) == pytest.approx(0.75)
    assert metrics.f1("发票号码", "发票代码", cjk=False) == 0.0
    assert metrics.normalize("发票 号码，", cjk=True) == "发票号码"
    # Chinese text keeps its articles; only ASCII spaces go.
    assert metrics.normalize("The 发票", cjk=True) == "the发票"
    # Either side Chinese -> both compared by characters; the English side keeps its spaces as a token.
    assert metrics.f1("ab 中", "ab c", cjk=True) == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))


def test_one_cjk_predicate_with_the_notebooks_range():
    # The authors' range, U+4E00-U+9FFF, for scoring and data labelling alike (protocol.has_cjk).
    assert has_cjk("ab 中") and has_cjk("\u4e00") and has_cjk("\u9fff")
    assert not has_cjk("abc") and not has_cjk("\u3400") and not has_cjk("\uf900") and not has_cjk("，")
    # Extension A alone is not Chinese to the scorer: word-level, spaces kept.
    assert metrics.normalize("\u3400 \u3401", cjk=True) == "\u3400 \u3401"


def test_one_label_vocabulary_in_the_prompts_order():
    labels = "{" + ", ".join(f"'{label}'" for label in PROBLEM_LABELS) + "}"
    assert f"Describe the image issue from {labels} </problem>" in CODING_SYSTEM_PROMPT
    assert set(PROBLEM_LABELS) == {*ROTATIONS, *PHOTOMETRIC, "crop", "none"}


@pytest.mark.parametrize("name, benchmark, expected", [
    ("7b_mat_coding_grpo_step1400.json", "mat-coding",
     {"avg": (50.67, 34.5), "simple": (60.1, 51.43), "hard": (45.6, 25.38), "none": 0}),
    ("MAT-Search_7b_step200_mat_search_web_n4.json", "mat-search",
     {"avg": (63.77, 55.33), "simple": (71.78, 66.67), "hard": (55.77, 44.0), "none": 5}),
])
def test_released_predictions_reproduce_table1(name, benchmark, expected):
    out = metrics.score_predictions(json.loads((RELEASED / name).read_text()), benchmark)
    for split in ("avg", "simple", "hard"):
        assert (out[split]["f1"], out[split]["em"]) == expected[split], split
    assert out["none"] == expected["none"]


def test_arft_score_cli_prints_table1_json():
    out = subprocess.run([sys.executable, "-m", "arft_core.cli", "score", "--benchmark", "mat-coding",
                          str(RELEASED / "7b_mat_coding_grpo_step1400.json")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["n"] == 200 and result["none"] == 0
    assert result["avg"]["f1"] == 50.67 and result["avg"]["em"] == 34.5
    assert (result["simple"]["f1"], result["hard"]["f1"]) == (60.1, 45.6)


def test_score_uses_split_field_and_rejects_bad_rows(tmp_path):
    rows = [{"gt": ["a b"], "pred_answer": "a b", "split": "hard"}, {"gt": "x", "pred_answer": None, "split": "simple"}]
    out = metrics.score_predictions(rows, "mat-search")
    assert out["hard"]["f1"] == 100.0 and out["simple"]["f1"] == 0.0 and out["none"] == 1
    assert "simple" not in metrics.score_predictions(rows, "multihop")
    with pytest.raises(ValueError, match="prediction 7: missing field\\(s\\) pred_answer"):
        metrics.score_predictions([{"id": 7, "gt": "x"}], "multihop")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": 3, "gt": "x", "pred_answer": 5}]))
    out = subprocess.run([sys.executable, "-m", "arft_core.cli", "score", "--benchmark", "multihop", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "prediction 3: field pred_answer must be a string or null" in out.stderr


# ---- protocol
def test_answer_parsing_handles_multiline():
    assert extract_answer("<think>x</think>\n<answer> line one\nline two </answer>") == "line one\nline two"
    assert extract_answer("<think>x</think> no tag") is None
    assert parse_step("<think>\nplan\n</think>\n<search>\nmulti\nline\n</search>", "search").content == "multi\nline"


def test_format_reward_answer_step():
    good = "<think> the image is dark </think>\n<answer> red </answer>"
    assert is_answer_step(good)
    for bad in ("<answer> red </answer>", good + " trailing", good + "<answer> x </answer>",
                "<think> a </think><code>x</code>"):
        assert not is_answer_step(bad), bad


def test_tips_and_labels():
    assert problem_labels("{'rotation90', 'dark'}") == ["dark", "rotation90"]
    assert problem_labels("{'rotation90', 'dark'}", sort=False) == ["rotation90", "dark"]
    assert tips(["crop"]).startswith("<tips> We now need to crop the image.")
    assert tips(["none"]).startswith("<tips> The image has no issues")
    assert tips(["dark", "noise"]) == ("<tips> Now that we have identified the issue in the image: ['dark', "
                                       "'noise'], please proceed to address it by outputting the python code. </tips>")


def test_coding_prompt_puts_image_first():
    msg = coding_prompt("What colour?")[0]
    assert msg["content"][0] == {"type": "image"}
    assert msg["content"][1]["text"].endswith("# Current reasoning chain:\n\n<query> What colour? </query>")


# ---- rewards (spec §3)
def test_search_format():
    assert rewards.search_format("<think> a </think>\n<search> q </search>") == 1.0
    assert rewards.search_format("<think> a </think> <answer> x </answer>") == 1.0
    assert rewards.search_format("<think> a </think><search> q </search><answer> x </answer>") == 0.0
    assert rewards.search_format("<think> a </think><think> b </think><answer> x </answer>") == 0.0
    assert rewards.search_format("lead <think> a </think><answer> x </answer>") == 0.0
    assert rewards.search_format("<think> a </think>") == 0.0


def test_coding_format_follows_the_solution_step_type():
    code = "<think> fix </think>\n<code>\n```python\nx = 1\n```\n</code>"
    assert rewards.coding_format(code, "<code>```python\ny```</code>") == 1.0
    assert rewards.coding_format(code, "<answer> a </answer>") == 0.0
    assert rewards.coding_format("<think> a </think>\n<code> x = 1 </code>", "<code></code>") == 0.0  # no fence
    problem = "<think> dark </think>\n<problem> {'dark', 'noise'} </problem>"
    assert rewards.coding_format(problem, "<problem> {'dark'} </problem>") == 1.0
    assert rewards.coding_format("<think> d </think><problem> dark </problem>", "<problem></problem>") == 0.0


def test_answer_f1_paper_falls_back_corrected_does_not():
    assert rewards.answer_f1("red circle", "red circle", "paper") == 1.0  # whole completion when untagged
    assert rewards.answer_f1("red circle", ["red circle"], "corrected") == 0.0
    assert rewards.answer_f1("<answer>发票号码</answer>", "发票代码", "paper") == 0.0  # no CJK in training
    assert rewards.answer_f1("<answer>发票号码</answer>", ["x", "发票代码"], "corrected") == pytest.approx(0.75)


@pytest.mark.parametrize("pred, gold, expected", [
    ("{'rotation90', 'dark'}", ["dark", "rotation90"], 1.0),
    ("{'rotation90'}", ["rotation90", "dark"], 0.5),
    ("{'rotation180'}", ["noise", "rotation180"], 0.5),
    ("{'dark'}", ["rotation90", "dark"], 0.0),  # partial credit only for the rotation
    ("{'rotation90'}", ["rotation90", "dark", "noise"], 0.0),  # only two-label golds
    ("{'rotation90'}", ["rotation180", "dark"], 0.0),
])
def test_problem_label_reward(pred, gold, expected):
    assert rewards.problem_label_reward(f"<think> x </think><problem> {pred} </problem>", gold) == expected


def test_coding_accuracy_code_step_paper_vs_corrected():
    sol = "<think> s </think><code>```python\nx```</code>"
    assert rewards.coding_accuracy("anything at all", sol, "paper") == 0.9  # the paper's hole (spec §8.2)
    assert rewards.coding_accuracy("<problem> x </problem>", sol, "paper") == 0.0
    assert rewards.coding_accuracy("anything at all", sol, "corrected", code_ran=False) == 0.0
    assert rewards.coding_accuracy("<think> a </think><code>x</code>", sol, "corrected", code_ran=True) == 1.0
    assert rewards.coding_accuracy("<think>a</think><code>c</code>", "<answer> red </answer>") == 0.0
    assert rewards.coding_accuracy("<think>a</think><answer> Red </answer>", "<answer> red </answer>") == 1.0


class FixedEmbedder:
    """Scripted sentence encoder: each query maps to a fixed unit vector."""

    def __init__(self, vectors):
        self.vectors = vectors

    def encode(self, texts, convert_to_tensor, normalize_embeddings):
        import torch

        return torch.nn.functional.normalize(torch.tensor([self.vectors[t] for t in texts], dtype=torch.float), dim=1)


def test_search_accuracy_similarity_floor_and_wrong_action():
    emb = FixedEmbedder({"q close": [1.0, 0.2], "q far": [0.0, 1.0], "gold": [1.0, 0.0]})
    sol = "<think> s </think>\n<search> gold </search>"
    close = rewards.search_accuracy("<think>a</think><search> q close </search>", sol, "corrected", embedder=emb)
    assert close == pytest.approx(1 / (1 + 0.04) ** 0.5)
    assert rewards.search_accuracy("<think>a</think><search> q far </search>", sol, embedder=emb) == 0.0  # < 0.5
    assert rewards.search_accuracy("<think>a</think><answer> gold </answer>", sol, embedder=emb) == 0.0
    ans = "<think> s </think>\n<answer> Paris </answer>"
    assert rewards.search_accuracy("<think>a</think><search> q </search>", ans, embedder=emb) == 0.0
    assert rewards.search_accuracy("<think>a</think><answer> paris </answer>", ans, "corrected") == 1.0


def test_search_similarity_uses_the_offline_minilm():
    sim = rewards.query_similarity("how tall is the Eiffel Tower", "Eiffel Tower height")
    assert 0.8 < sim <= 1.0
    assert rewards.query_similarity("banana bread recipe", "Eiffel Tower height") == 0.0  # under the 0.5 floor


def test_make_reward_funcs_in_trl_form():
    fmt, acc = rewards.make_reward_funcs("coding", "paper")
    completions = [[{"role": "assistant", "content": "<think> a </think>\n<answer> red </answer>"}],
                   [{"role": "assistant", "content": "free text"}]]
    solution = ["<answer> red </answer>", "<code>```python\nx```</code>"]
    assert fmt(completions, solution=solution) == [1.0, 0.0]
    assert acc(completions, solution=solution) == [1.0, 0.9]
    ran = []
    _, acc = rewards.make_reward_funcs("coding", "corrected", code_runner=lambda c, i, **kw: ran.append(i) or False)
    assert acc(completions, solution=solution, answers=[["red"], ["x"]]) == [1.0, 0.0] and ran == [1]
    with pytest.raises(ValueError, match="unknown reward variant"):
        rewards.make_reward_funcs("coding", "strict")


def test_paper_math_verify_shortcut_bypasses_the_tags():
    sol = "<think> s </think>\n<answer> 42 </answer>"
    # The paper pays 1.0 when math-verify equates the completion with the solution, even for a search step.
    assert rewards.search_accuracy("<think>a</think><search> 42 </search>", sol, "paper") == 1.0
    assert rewards.search_accuracy("<think>a</think><search> 42 </search>", sol, "corrected") == 0.0
    assert rewards.search_accuracy("The answer is $42$", sol, "corrected") == 0.0


# ---- the paper variant, literally as the authors' reward code (spec §3.2-3.3)
def test_paper_reads_tag_contents_without_dotall():
    sol = "<think> s </think>\n<answer> red circle </answer>"
    multi = "<think> red disc </think>\n<answer> red\ncircle </answer>"
    # No match across the newline, so the whole completion is scored: 8 tokens, 2 shared -> P 1/4, R 1, F1 0.4.
    assert rewards.coding_accuracy(multi, sol, "paper") == pytest.approx(0.4)
    assert rewards.search_accuracy(multi, sol, "paper") == pytest.approx(0.4)
    assert rewards.coding_accuracy(multi, sol, "corrected", answers=["red circle"]) == 1.0
    # The format regexes do have DOTALL.
    assert rewards.coding_format(multi, sol, "paper") == 1.0 and rewards.search_format(multi, "paper") == 1.0
    # A multi-line teacher answer is not read either: gold = the whole solution, "answer red answer" -> F1 0.5.
    one_line = "<think> a </think>\n<answer> red </answer>"
    assert rewards.coding_accuracy(one_line, "<answer> red\n </answer>", "paper") == pytest.approx(0.5)


def test_paper_search_query_without_dotall_uses_the_whole_completion():
    multi = "<think> a </think>\n<search> q\nclose </search>"
    emb = FixedEmbedder({multi: [1.0, 0.2], "q\nclose": [0.0, 1.0], "gold": [1.0, 0.0]})
    sol = "<think> s </think>\n<search> gold </search>"
    assert rewards.search_accuracy(multi, sol, "paper", embedder=emb) == pytest.approx(1 / 1.04 ** 0.5)
    assert rewards.search_accuracy(multi, sol, "corrected", embedder=emb) == 0.0  # reads "q\nclose": below 0.5


@pytest.mark.parametrize("pred, gold, paper, corrected", [
    ("rotation180", "'rotation90', 'rotation180'", 0.0, 0.5),  # the authors test rotation90 first
    ("rotation90", "'rotation90', 'rotation180'", 0.5, 0.5),
    ("rotation180", "'dark', 'rotation180'", 0.5, 0.5),
    ("dark", "'dark', 'rotation180'", 0.0, 0.0),
])
def test_paper_rotation_partial_credit_follows_the_authors_branches(pred, gold, paper, corrected):
    completion = f"<think> a </think><problem> {{'{pred}'}} </problem>"
    sol = f"<think> s </think>\n<problem> {{{gold}}} </problem>"
    assert rewards.coding_accuracy(completion, sol, "paper") == paper
    assert rewards.coding_accuracy(completion, sol, "corrected") == corrected


def test_paper_empty_gold_answer_scores_zero():
    # The authors' regex matches "<answer></answer>", so the gold is "" (F1 0), not the whole solution, which
    # ("think s think answeranswer") would give this completion 2/3.
    sol = "<think> s </think>\n<answer></answer>"
    completion = "<think> a </think>\n<answer> think s </answer>"
    assert rewards.coding_accuracy(completion, sol, "paper") == 0.0
    assert rewards.search_accuracy(completion, sol, "paper") == 0.0


def test_paper_solution_without_a_tag_scores_zero():
    completion = "<think> a </think>\n<answer> x </answer>"
    for sol in ("free text", "<search> q </search>"):  # the coding reward knows answer, code and problem only
        assert rewards.coding_accuracy(completion, sol, "paper") == 0.0
        assert rewards.coding_format(completion, sol, "paper") == 0.0
    assert rewards.search_accuracy(completion, "free text", "paper") == 0.0
    fmt, acc = rewards.make_reward_funcs("coding", "paper")
    rows = [[{"role": "assistant", "content": completion}]]
    assert fmt(rows, solution=["free text"]) == [0.0] and acc(rows, solution=["free text"]) == [0.0]
    with pytest.raises(ValueError, match="no action tag"):  # corrected: a malformed training row is an error
        rewards.coding_accuracy(completion, "free text", "corrected")


def test_gold_queries_reach_the_query_similarity_reward(tmp_path):
    from PIL import Image

    (tmp_path / "ms" / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "ms" / "images" / "a.png")
    items = [{"id": "q1", "question": "How tall is it?", "answers": ["330 m"], "image_path": "images/a.png",
              "split": "simple", "gold": {"queries": ["gold"], "answer": "330 m"}},
             {"id": "q2", "question": "Who built it?", "answers": ["Eiffel"], "image_path": "images/a.png",
              "split": "hard", "gold": None}]
    (tmp_path / "ms" / "test.json").write_text(json.dumps(items))
    # Training (agentic environments) and evaluation read items the one way: EnvItem.from_manifest.
    assert [EnvItem.from_manifest(i, "search", tmp_path / "ms").gold_queries for i in items] == [["gold"], []]
    write_params(tmp_path, {"paths": {"mat_search": "ms"}})
    bench = load_benchmark("mat-search", load_config(tmp_path / "params.yaml"))
    assert [b.env.gold_queries for b in bench] == [["gold"], []]
    emb = FixedEmbedder({"q close": [1.0, 0.2], "gold": [1.0, 0.0]})
    env = AgentEnv(bench[0].env, Tools(embedder=emb), AgentConfig(), tmp_path / "ep")
    env.reset()
    step = env.step("<think> a </think>\n<search> q close </search>")
    assert step.reward["query_similarity"] == pytest.approx(1 / 1.04 ** 0.5)


def test_paper_search_format_takes_the_answer_branch_on_both_tags_anywhere():
    # The authors test for "<answer>" and "</answer>" as substrings; a stray "</answer>" before "<answer>" then
    # fails the answer pattern, where our reading falls through to the (valid) search pattern.
    odd = "<think> </answer> <answer> </think>\n<search> q </search>"
    assert rewards.search_format(odd, "paper") == 0.0
    assert rewards.search_format(odd, "corrected") == 1.0


def test_concurrent_tool_threads_load_the_embedder_once_one_at_a_time(tmp_path, monkeypatch):
    """Tool threads score search turns at once: on a cold cache they must not load the encoder concurrently (two
    concurrent transformers loads can leave `PreTrainedModel.tie_weights` a no-op for the rest of the process: the
    next policy load then keeps `lm_head` on the meta device)."""
    import threading
    import time

    import sentence_transformers

    running, seen = [], []

    class Loader:
        def __init__(self, name, device):
            running.append(name)
            seen.append(len(running))
            time.sleep(0.2)
            running.remove(name)

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", Loader)
    rewards._load_embedder.cache_clear()
    try:
        barrier = threading.Barrier(4)
        got = []

        def tool_thread():
            barrier.wait()
            got.append(rewards.load_embedder(str(tmp_path)))

        threads = [threading.Thread(target=tool_thread) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        rewards._load_embedder.cache_clear()
    assert seen == [1]  # loaded once, by one thread
    assert len(got) == 4 and all(g is got[0] for g in got)
