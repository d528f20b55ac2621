"""`arft eval` end to end with scripted policies on real MAT-Coding demo items (real sandbox, real local search
index), and the Hugging Face back-end batching the tiny model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from arft_core.config import EvalConfig, load_config
from arft_core.evaluation import evaluate
from conftest import SHARED, write_params
from scripted import TextEngine, processor, user_text
from test_search import write_corpus

DEMO = SHARED / "mat-coding-demo"
COPY = ("<think> fix </think>\n<code>\n```python\nimport cv2\nimg = cv2.imread('path_to_input_image.jpg')\n"
        "cv2.imwrite('path_to_output_image.jpg', img)\n```\n</code>")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder with 6 MAT-Coding demo items, 2 MAT-Search items, 2 multi-hop questions, a tiny corpus."""
    items = json.loads((DEMO / "coding_case.json").read_text())
    (tmp_path / "mc" / "images").mkdir(parents=True)
    for item in items:
        for key in ("ori_image_path", "processed_image_path"):
            if (DEMO / item[key]).exists():
                shutil.copy(DEMO / item[key], tmp_path / "mc" / "images" / item[key])
            item[key] = f"images/{item[key]}"
    (tmp_path / "mc" / "test.json").write_text(json.dumps(items))
    (tmp_path / "ms" / "images").mkdir(parents=True)
    shutil.copy(DEMO / "23.jpg", tmp_path / "ms" / "images" / "23.jpg")
    search = [{"id": "s1", "question": "Where is the Mona Lisa kept?", "answers": ["Louvre"],
               "image_path": "images/23.jpg", "split": "simple"},
              {"id": "s2", "question": "Who discovered penicillin?", "answers": ["Alexander Fleming"],
               "image_path": "images/23.jpg", "split": "hard"}]
    (tmp_path / "ms" / "test.json").write_text(json.dumps(search))
    (tmp_path / "hop.jsonl").write_text(
        json.dumps({"id": "h1", "question": "Which river has the largest discharge?", "golden_answers": ["Amazon"]})
        + "\n" + json.dumps({"id": "h2", "question": "Sixth planet?", "golden_answers": ["Saturn"]}) + "\n")
    write_corpus(tmp_path / "corpus.jsonl")
    write_params(tmp_path, {"paths": {"mat_coding": "mc", "mat_search": "ms"},
                            "search": {"corpus_path": "corpus.jsonl", "index_dir": "index", "mode": "live",
                                       "cache_path": "cache.sqlite", "top_k": 2},
                            # the scripted turns are tokens now, capped like a model's: room for them
                            "eval": {"multihop_files": {"hop": "hop.jsonl"}, "max_new_tokens": 256},
                            "sandbox": {"workers": 1},
                            "agent": {"max_turns": 3}})
    return tmp_path


class Oracle:
    """A scripted policy that knows the gold answers (by question): problem -> code -> answer, search -> answer, or
    a direct answer; and one deliberately broken item (never answers). The turn is read from the prompt: what the
    oracle wrote before is in it (chat or single-message transcript alike)."""

    def __init__(self, golds: dict, broken: str | None = None):
        self.golds, self.broken = golds, broken

    def __call__(self, prompt: str, call: int) -> str:
        text = user_text(prompt)
        # the longest question in the text: one Chinese question starts another
        question = max((q for q in self.golds if q in text), key=len)
        gold = self.golds[question]
        if question == self.broken:
            return "I refuse to use tags"
        if text.endswith(("The answer should be very brief.", "Only Return the answer.")):  # the direct baselines
            return gold
        answer = f"<think> done </think>\n<answer> {gold} </answer>"
        if "<query>" in text and "image processing" in text:
            turn = 1 + ("<think> look </think>" in prompt) + ("<think> fix </think>" in prompt)
            return ["<think> look </think>\n<problem> {'none'} </problem>", COPY, answer][turn - 1]
        search = "<think> look it up </think>\n<search> " + text.split("<query>")[1][:40] + " </search>"
        return answer if "<think> look it up </think>" in prompt else search


def test_eval_with_an_oracle_policy_scores_full_marks_and_writes_the_report(project: Path):
    cfg = load_config(project / "params.yaml")
    golds = {i["question"]: i["answers"][0] for i in json.loads((project / "mc" / "test.json").read_text())}
    golds |= {"Where is the Mona Lisa kept?": "Louvre", "Who discovered penicillin?": "Alexander Fleming",
              "Which river has the largest discharge?": "Amazon", "Sixth planet?": "Saturn"}
    oracle = TextEngine(processor(), Oracle(golds, broken="Who discovered penicillin?"))
    scores, predictions, report = evaluate(None, cfg, engine=oracle)

    coding = scores["mat-coding"]["agent"]
    assert coding["avg"]["f1"] == 100.0 and coding["avg"]["n"] == 6 and coding["hard"]["n"] == 3
    assert coding["tool_calls"]["code"] == 1.0 and coding["tool_calls"]["code_failed"] == 0.0
    assert set(coding["by_type"]) == {"rotation180", "dark", "none", "rotation90+dark", "crop"}
    search = scores["mat-search"]["agent"]
    assert search["simple"]["f1"] == 100.0 and search["hard"]["f1"] == 0.0  # s2 never answers
    assert search["avg"]["no_answer_rate"] == 50.0 and search["end"] == {"answer": 1, "turns": 1}
    assert scores["multihop"]["agent"]["avg"]["f1"] == 100.0
    assert scores["multihop"]["direct"]["avg"]["em"] == 100.0
    assert oracle.batches[0] == 6  # all coding items in one batch on the first turn

    rows = predictions["mat-coding.agent"]
    assert {"id", "gt", "pred_answer"} <= set(rows[0]) and rows[0]["turns"][1]["observation"]["new_image"]
    broken = next(r for r in predictions["mat-search.agent"] if r["id"] == "s2")
    assert broken["pred_answer"] is None and broken["n_turns"] == cfg.agent.max_turns
    # The report: a summary link per benchmark and mode, every item, the images inline.
    assert report.count('href="#') == 6 and report.count("<details") == 2 * (6 + 2 + 2)
    assert report.count("data:image/jpeg;base64") >= 6 + 6 + 6 and "no action tag" in report

    out = project / "coding.json"
    out.write_text(json.dumps(rows))
    scored = subprocess.run([sys.executable, "-m", "arft_core.cli", "score", "--benchmark", "mat-coding", str(out)],
                            capture_output=True, text=True, check=True)
    assert json.loads(scored.stdout)["avg"]["f1"] == 100.0


def test_hf_engine_batches_mixed_prompts_deterministically(tmp_path: Path):
    from PIL import Image

    from arft_core.agent.generation import HFEngine, make_engine, resolve_decoding
    from arft_core.agent.transcript import Transcript, open_image
    from arft_core.config import ModelConfig, RolloutConfig
    from arft_core.model.embedded import prepare_base_model
    from arft_core.protocol import direct_prompt

    prepare_base_model(ModelConfig(embedded={"vocab_size": 1024}), tmp_path / "m")
    img = tmp_path / "i.png"
    Image.new("RGB", (56, 56), "red").save(img)
    cfg = EvalConfig(batch_size=2)

    def engine() -> HFEngine:
        return make_engine(tmp_path / "m", cfg, RolloutConfig(engine="hf"))

    one, two = engine(), engine()
    assert isinstance(one, HFEngine) and one.decoding == resolve_decoding(cfg, one.model.generation_config)
    transcript = Transcript(one.processor, "arft", "chat")
    prompts = [(direct_prompt("What colour?", "mat"), [img]),
               (direct_prompt("Capital of France?", "multihop", with_image=False), []),
               (direct_prompt("Shape?", "mat"), [img])]
    ids = [transcript.encode(m, imgs) for m, imgs in prompts]
    images = [[open_image(p) for p in imgs] for _, imgs in prompts]
    first = one.generate(ids, images, 6)
    again = two.generate(ids, images, 6)
    assert len(first) == 3 and first == again
    assert all(isinstance(t, list) and 0 < len(t) <= 6 and lp is None for t, lp in first)


def test_decoding_is_explicit_or_the_checkpoints_and_stops_can_be_turned_off(tmp_path):
    """The engine's decoding: eval's values, or (`decoding: checkpoint`) the model folder's generation_config.json,
    sampling values included (they are passed, never left to the model's hidden defaults); `stop_sequences=()`
    leaves the turn uncut; evaluation passes each benchmark's max_new_tokens to every call."""
    from PIL import Image
    from transformers import GenerationConfig

    from arft_core.agent import EnvItem
    from arft_core.agent.generation import (HFEngine, checkpoint_decoding, decoding_config, resolve_decoding,
                                            turn_end)
    from arft_core.config import Config
    from arft_core.evaluation import BenchItem

    stock = GenerationConfig(do_sample=True, temperature=0.1, top_p=0.001, top_k=1, repetition_penalty=1.05)
    assert resolve_decoding(EvalConfig(decoding="checkpoint"), stock) == {
        "do_sample": True, "temperature": 0.1, "top_p": 0.001, "top_k": 1, "repetition_penalty": 1.05}
    assert resolve_decoding(EvalConfig(), stock) == {
        "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.05}
    # unset values are those generate() would use
    assert checkpoint_decoding(GenerationConfig()) == {
        "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}
    tok = processor().tokenizer
    ids = tok("<answer> a </answer> more", add_special_tokens=False)["input_ids"]
    assert turn_end(ids, {tok.eos_token_id}, tok, ()) == len(ids)

    class Model:
        generation_config = stock

    config = decoding_config(Model(), resolve_decoding(EvalConfig(decoding="checkpoint"), stock))
    assert (config.do_sample, config.temperature, config.top_p, config.top_k, config.repetition_penalty) == (
        True, 0.1, 0.001, 1, 1.05)
    gen = HFEngine(Model(), processor(), config, stop_sequences=())
    assert gen.generation_config.repetition_penalty == 1.05 and gen.stop_sequences == ()

    recorder = TextEngine(processor(), lambda prompt, call: "<think> x </think> <answer> y </answer>")
    cfg = Config.from_dict({"eval": {"modes": ["direct"], "max_new_tokens": {"mat-coding": 5, "multihop": 9}}},
                           root=tmp_path)
    img = tmp_path / "i.png"
    Image.new("RGB", (56, 56), "red").save(img)
    plan = {"mat-coding": [BenchItem(EnvItem("c", "coding", "q?", ["y"], img), "simple", ["none"])],
            "mat-search": [BenchItem(EnvItem("s", "search", "q?", ["y"], img), "simple")],
            "multihop": [BenchItem(EnvItem("m", "search", "q?", ["y"]))]}
    evaluate(None, cfg, engine=recorder, plan=plan)
    assert recorder.caps == [5, 2048, 9]
