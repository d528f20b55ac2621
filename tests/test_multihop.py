"""Multi-hop QA over several FlashRAG files in one evaluation (`eval.multihop_files`): each dataset its own F1/EM
and no-answer rate, `avg` their mean (the paper's Table 2), per-dataset MLflow metric names and report rows, config
errors that name the key and the file, and the bundled FanOutQA dev set as the default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arft_core.config import Config, ConfigError, load_config
from arft_core.data.multihop import load_datasets, load_fanoutqa_dev
from arft_core.evaluation import evaluate, load_benchmark
from arft_core.stages.evaluate import flat_scores
from arft_core.stages.release import score_tags
from conftest import write_params
from scripted import TextEngine, processor, user_text
from test_search import write_corpus

# question -> (gold answers, direct-mode output, agent-mode answer; None: the agent never writes a tag).
# FlashRAG ids restart in every file, so both use "0", "1", ...
ALPHA = {"Capital of France?": (["Paris"], "Paris", "Paris"),                         # F1 1, EM 1
         "Largest US city?": (["New York City"], "York", "York")}                     # F1 0.5 (1/1 vs 1/3)
BETA = {"Moon landing year?": ([1969], "1969", "1969"),                               # numeric gold: F1 1, EM 1
        "Sixth planet?": (["Saturn"], "Jupiter", None),                               # F1 0; agent: no answer
        "Largest animal?": (["blue whale"], "whale shark", "whale shark"),            # F1 0.5 (1/2 vs 1/2)
        "Longest river's mouth?": (["the Nile delta region"], "Nile", "Nile")}        # F1 0.5 (article dropped)
QUESTIONS = {**ALPHA, **BETA}


def write_flashrag(path: Path, items: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": str(k), "question": q, "golden_answers": gold, "metadata": {}}) + "\n"
                            for k, (q, (gold, _, _)) in enumerate(items.items())))
    return path


def scripted(prompt: str, call: int) -> str:
    """Answers by question: the direct output, or in the agent loop `<answer>` on the first turn (or never)."""
    text = user_text(prompt)
    (_, direct, agent), = [v for q, v in QUESTIONS.items() if q in text]
    if "Only Return the answer" in text:
        return direct
    return f"<think> known </think>\n<answer> {agent} </answer>" if agent else "no tags from me"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    write_flashrag(tmp_path / "flashrag" / "alpha" / "dev.jsonl", ALPHA)
    write_flashrag(tmp_path / "flashrag" / "beta" / "test.jsonl", BETA)
    write_corpus(tmp_path / "corpus.jsonl")
    # max_new_tokens: the scripted turns are tokens now, capped like a model's
    write_params(tmp_path, {"eval": {"benchmarks": ["multihop"], "multihop_limit": None, "max_new_tokens": 64,
                                     "multihop_files": {"alpha": "flashrag/alpha/dev.jsonl",
                                                        "beta": "flashrag/beta/test.jsonl"}},
                            "search": {"corpus_path": "corpus.jsonl", "index_dir": "index", "mode": "live",
                                       "cache_path": "cache.sqlite"},
                            "tracking": {"promotion_metrics": ["eval.multihop.agent.avg.f1"]},
                            "agent": {"max_turns": 2}})
    return tmp_path


def test_two_flashrag_files_in_one_run_each_with_its_own_metrics(project: Path):
    cfg = load_config(project / "params.yaml")
    items = load_benchmark("multihop", cfg)
    assert [(b.split, b.env.id) for b in items] == [("alpha", "0"), ("alpha", "1"), ("beta", "0"), ("beta", "1"),
                                                   ("beta", "2"), ("beta", "3")]
    assert items[2].env.answers == ["1969"]

    scores, predictions, report = evaluate(None, cfg, engine=TextEngine(processor(), scripted))

    direct, agent = scores["multihop"]["direct"], scores["multihop"]["agent"]
    summary = {k: v for k, v in direct.items() if k in ("avg", "alpha", "beta")}
    assert list(summary) == ["avg", "alpha", "beta"]
    assert direct["alpha"] == {"n": 2, "f1": 75.0, "em": 50.0, "squad_f1": 75.0, "no_answer_rate": 0.0}
    assert direct["beta"] == {"n": 4, "f1": 50.0, "em": 25.0, "squad_f1": 50.0, "no_answer_rate": 0.0}
    # avg: the datasets' mean, as Table 2's Avg column (pooled over the 6 items F1 would be 58.33)
    assert direct["avg"] == {"n": 6, "f1": 62.5, "em": 37.5, "squad_f1": 62.5, "no_answer_rate": 0.0}
    # agent mode also scores the share of well-formed actions (beta's unanswered item wrote none in its turns)
    assert agent["beta"] == {"n": 4, "f1": 50.0, "em": 25.0, "squad_f1": 50.0, "no_answer_rate": 25.0,
                             "valid_action_rate": 75.0}
    assert agent["avg"] == {"n": 6, "f1": 62.5, "em": 37.5, "squad_f1": 62.5, "no_answer_rate": 12.5,
                            "valid_action_rate": 87.5}
    assert agent["end"] == {"answer": 5, "turns": 1}

    rows = predictions["multihop.agent"]
    assert [(r["split"], r["id"], r["pred_answer"]) for r in rows][2:4] == [("beta", "0", "1969"), ("beta", "1", None)]

    # MLflow metrics per dataset, under the evaluate stage's `<bench>.<mode>.<split>.<metric>` names; the version
    # tags (and so the promotion metrics) keep only avg.
    flat = flat_scores(scores)
    assert flat["multihop.agent.alpha.f1"] == 75.0 and flat["multihop.direct.beta.em"] == 25.0
    assert flat["multihop.agent.beta.no_answer_rate"] == 25.0 and flat["multihop.agent.avg.f1"] == 62.5
    assert sorted(k for k in score_tags(scores)) == ["eval.multihop.agent.avg.em", "eval.multihop.agent.avg.f1",
                                                     "eval.multihop.direct.avg.em", "eval.multihop.direct.avg.f1"]

    # The report: one row per dataset and the mean, in each mode's table; the datasets under the summary line.
    assert report.count("<tr><td>alpha</td><td>2</td><td>75.0</td><td>50.0</td><td>75.0</td><td>0.0</td></tr>") == 2
    assert "<tr><td>beta</td><td>4</td><td>50.0</td><td>25.0</td><td>50.0</td><td>25.0</td></tr>" in report
    assert "<tr><td>avg</td><td>6</td><td>62.5</td><td>37.5</td><td>62.5</td><td>12.5</td></tr>" in report
    assert "<li>beta: F1 50.0, EM 25.0, no answer 0.0% (n=4)</li>" in report
    assert report.count("<details") == 2 * 6 and report.count("<summary>beta #") == 2 * 4


def test_a_missing_file_is_a_config_error_naming_the_key_and_the_path(tmp_path: Path):
    write_flashrag(tmp_path / "alpha.jsonl", ALPHA)
    write_params(tmp_path, {"eval": {"multihop_files": {"alpha": "alpha.jsonl", "hotpotqa": "flashrag/dev.jsonl"}}})
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "params.yaml")
    assert str(exc.value).splitlines()[1:] == [
        f"  eval.multihop_files.hotpotqa: no such file: {tmp_path / 'flashrag/dev.jsonl'} (got 'flashrag/dev.jsonl')"]

    # A config built in code skips that check: loading the benchmark names the key and the file instead.
    cfg = Config.from_dict({"eval": {"multihop_files": {"hotpotqa": "flashrag/dev.jsonl"}}}, root=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^eval\.multihop_files\.hotpotqa: file not found: .*flashrag/dev"):
        load_benchmark("multihop", cfg)
    (tmp_path / "bad.jsonl").write_text('{"id": "0", "question": "q?", "golden_answers": ["a"]}\nnot json\n')
    with pytest.raises(ValueError, match=r"^eval\.multihop_files\.bad: .*bad\.jsonl:2: not valid JSON"):
        load_datasets({"bad": "bad.jsonl"}, root=tmp_path)


@pytest.mark.parametrize("eval_section, line", [
    ({"multihop_path": "hop.jsonl"}, "eval.multihop_path: replaced by eval.multihop_files"),
    ({"multihop_files": {"hotpot.qa": "x.jsonl"}}, "eval.multihop_files.hotpot.qa: a dataset name is letters"),
    ({"multihop_files": {"avg": "x.jsonl"}}, "eval.multihop_files.avg: reserved for other scores"),
    ({"multihop_files": {"fanoutqa": "x.jsonl"}, "multihop_fanoutqa": True},
     "eval.multihop_files.fanoutqa: the name of the bundled FanOutQA dev set"),
    ({"multihop_fanoutqa": False}, "eval.multihop_fanoutqa: false with an empty eval.multihop_files"),
])
def test_bad_multihop_settings_name_their_key(tmp_path: Path, eval_section: dict, line: str):
    write_params(tmp_path, {"eval": eval_section})
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "params.yaml")
    assert str(exc.value).splitlines()[1].startswith(f"  {line}")


def test_the_default_is_the_bundled_fanoutqa_dev_set_cut_to_the_limit(tmp_path: Path):
    cfg = load_config(write_params(tmp_path))  # the tiny params: multihop_limit 2
    dev = load_fanoutqa_dev()
    items = load_benchmark("multihop", cfg)
    assert [(b.split, b.env.id, b.env.answers) for b in items] == [("fanoutqa", i["id"], i["answers"]) for i in dev[:2]]

    # FanOutQA beside the files when asked, and all of it with no limit.
    write_flashrag(tmp_path / "alpha.jsonl", ALPHA)
    every = load_datasets({"alpha": "alpha.jsonl"}, fanoutqa=True, limit=None, root=tmp_path)
    assert {k: len(v) for k, v in every.items()} == {"alpha": 2, "fanoutqa": 310}
    assert list(load_datasets({"alpha": "alpha.jsonl"}, limit=1, root=tmp_path)) == ["alpha"]
