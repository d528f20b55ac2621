"""One agent (issue 27): the model is trained on exactly the turns it is evaluated and served on.

Each benchmark's teacher trajectories (MAT-Coding with two labels and with a crop, MAT-Search with two snippets and
with none, multi-hop QA) are replayed by a scripted engine through the evaluation (`Agent.run`), the served model
(`AgentModel.predict`) and an agentic GRPO rollout (`AgenticGRPOTrainer`, one real training step), for each protocol
x transcript form. The model's input at turn k must be the same token ids everywhere, and the step rows that
step-mode training hands to TRL must tokenize (TRL's own way) to the evaluation's input at turn k.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pandas as pd
import pytest

from arft_core.agent.runner import Agent, open_tools
from arft_core.agent.steps import step_rows, teacher_turns
from arft_core.agent.transcript import Transcript
from arft_core.config import AgentConfig, Config, DataConfig, ModelConfig, SandboxConfig, ServingConfig, TrainConfig
from arft_core.data.mat_coding import generate
from arft_core.io import load_manifest
from arft_core.model.embedded import prepare_base_model
from arft_core.model.processor import load_processor
from arft_core.search.base import SearchResult

MODEL = ModelConfig(embedded={"vocab_size": 1024})
CAPS = {"mat-coding": 512, "mat-search": 512, "multihop": 512}
# (protocol, transcript form): agentic training runs the chat form only (config refuses the others).
FORMS = [("arft", "chat"), ("arft", "single_message"), ("paper", "single_message")]
MULTIHOP = {"id": "m1", "question": "Who directed the film that won two awards in 1999?",
            "answers": ["Someone"], "gold": {"queries": ["two awards 1999 film", "film director"]}}


class Snippets:
    """A search backend whose results are fixed: two snippets for a query that says "two", none otherwise."""

    def search(self, query: str, k: int) -> list[SearchResult]:
        if "two" not in query:
            return []
        return [SearchResult(title="", snippet=s, source="") for s in ("First   fact.", "Second fact.")][:k]


class TeacherEngine:
    """Answers every input with the next teacher turn of the item whose question the input holds, and records
    each input's ids per question (turn order)."""

    def __init__(self, processor, scripts: dict[str, list[str]]):
        self.processor, self.scripts = processor, scripts
        self.seen: dict[str, list[list[int]]] = {}

    def generate(self, ids, images, max_new_tokens, deadline=None):
        out = []
        for seq in ids:
            text = self.processor.tokenizer.decode(seq)
            question = next(q for q in self.scripts if q in text)
            turns = self.seen.setdefault(question, [])
            turns.append(list(seq))
            reply = self.scripts[question][len(turns) - 1]
            out.append((self.processor.tokenizer(reply, add_special_tokens=False)["input_ids"], None))
        return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("one-loop")
    prepare_base_model(MODEL, root / "base")
    # Every train item hard: two with two labels (rotation90 + dark), two crops.
    generate(DataConfig(n_train=4, n_test=1, sources={"synthetic": 1}, synthetic_size=[256, 192], hard_fraction=1.0,
                        hard=[["rotation90", "dark"], ["crop"]]), root / "coding", root)
    coding = load_manifest(root / "coding", "train")
    assert sorted("+".join(i["type"]) for i in coding) == ["crop", "crop", "rotation90+dark", "rotation90+dark"]
    search_dir = root / "search"
    (search_dir / "images").mkdir(parents=True)
    shutil.copy(root / "coding" / coding[0]["ori_image_path"], search_dir / "images" / "s.png")
    search = [{"id": "s2", "question": "Which city hosts the two towers on the picture?", "answers": ["Paris"],
               "image_path": "images/s.png", "gold": {"queries": ["two towers city"], "answer": "Paris"}},
              {"id": "s0", "question": "What is the name of the statue on the picture?", "answers": ["Liberty"],
               "image_path": "images/s.png", "gold": {"queries": ["statue name"], "answer": "Liberty"}}]
    (search_dir / "train.json").write_text(json.dumps(search))
    return {"root": root, "coding": coding, "search": search, "processor": load_processor(root / "base")}


def scripts_of(world) -> dict[str, list[str]]:
    out = {r["question"]: teacher_turns(r, "coding") for r in world["coding"]}
    out.update({r["question"]: teacher_turns(r, "search") for r in world["search"]})
    out[MULTIHOP["question"]] = teacher_turns({**MULTIHOP, "answers": MULTIHOP["answers"]}, "search")
    return out


def trl_prompt_ids(processor, row) -> list[int]:
    """A step row's prompt tokenized as TRL's GRPOTrainer does it (`_tokenize_prompts`)."""
    from trl.data_utils import prepare_multimodal_messages

    from arft_core.training import build_step_dataset

    example = build_step_dataset([row], None)[0]
    messages = prepare_multimodal_messages(example["prompt"], images=example["images"])
    enc = processor.apply_chat_template(conversation=[messages], add_generation_prompt=True, tokenize=True,
                                        return_dict=True)
    return list(enc["input_ids"][0])


def evaluation_inputs(world, agent_cfg: AgentConfig, tmp: Path) -> dict[str, list[list[int]]]:
    from arft_core.agent.env import EnvItem

    engine = TeacherEngine(world["processor"], scripts_of(world))
    agent = Agent(engine, agent_cfg, CAPS, tool_threads=2)
    items = {"mat-coding": [EnvItem.from_manifest(r, "coding", world["root"] / "coding") for r in world["coding"]],
             "mat-search": [EnvItem.from_manifest(r, "search", world["root"] / "search") for r in world["search"]],
             "multihop": [EnvItem(MULTIHOP["id"], "search", MULTIHOP["question"], MULTIHOP["answers"])]}
    with open_tools(SandboxConfig(workers=1), code=True, search=Snippets(), top_k=4) as tools:
        for bench, group in items.items():
            episodes = agent.run(bench, group, tools, tmp / bench)
            assert all(e.record["end"] == "answer" for e in episodes), [e.record for e in episodes]
            for item, e in zip(group, episodes, strict=True):  # the loop's own record of each input
                assert e.inputs == engine.seen[item.question]
    return engine.seen


def served_inputs(world, cfg: Config, tmp: Path) -> dict[str, list[list[int]]]:
    from arft_core.evaluation import eval_agent
    from arft_core.registry import AgentModel

    engine = TeacherEngine(world["processor"], scripts_of(world))
    tmp.mkdir(parents=True)
    tmp.chmod(0o711)  # as the served process's scratch: the sandbox uid traverses it
    model = AgentModel()
    model.cfg, model.limits = cfg, ServingConfig()
    model.agent = eval_agent(engine, cfg)
    model._search, model._root, model._lock = Snippets(), tmp, threading.Lock()
    rows = [(r["question"], (world["root"] / "coding" / r[
        "ori_image_path" if r["type"] == ["crop"] else "processed_image_path"]).read_bytes(), "coding")
            for r in world["coding"]]
    rows += [(r["question"], (world["root"] / "search" / r["image_path"]).read_bytes(), "search")
             for r in world["search"]]
    rows += [(MULTIHOP["question"], None, "search")]
    out = model.predict(None, pd.DataFrame(rows, columns=["question", "image", "task"]))
    assert list(out["end"]) == ["answer"] * len(rows), list(out["trajectory"])
    return engine.seen


@pytest.mark.parametrize("protocol,form", FORMS)
def test_evaluation_serving_and_step_rows_see_the_same_turns(world, tmp_path, protocol, form):
    agent_cfg = AgentConfig(protocol=protocol, transcript=form)
    cfg = Config.from_dict({"agent": agent_cfg.model_dump(), "eval": {"max_new_tokens": CAPS}}, root=world["root"])
    evaluated = evaluation_inputs(world, agent_cfg, tmp_path / "eval")
    served = served_inputs(world, cfg, tmp_path / "serve")
    assert served == evaluated
    # Every benchmark's trajectory ran each teacher turn: 3 turns (problem, code, answer) per coding item, one per
    # search plus the answer for the others.
    assert sorted(len(v) for v in evaluated.values()) == [2, 2, 3, 3, 3, 3, 3]

    processor = world["processor"]
    transcript = Transcript(processor, protocol, form)
    for task in ("coding", "search"):
        with open_tools(SandboxConfig(workers=1), code=True, search=Snippets(), top_k=4) as tools:
            rows = step_rows(world[task], task, world["root"] / task, tools, agent_cfg, transcript,
                             tmp_path / f"rows-{task}")
        by_question = {}
        for row in rows:
            question = next(r["question"] for r in world[task] if str(r["id"]) == row["item_id"])
            k = by_question.setdefault(question, 0)
            assert row["solution"] == scripts_of(world)[question][k]
            assert trl_prompt_ids(processor, row) == evaluated[question][k], (task, question, k)
            by_question[question] = k + 1
        assert by_question == {q: len(evaluated[q]) for q in by_question}


@pytest.mark.parametrize("task", ["coding", "search"])
def test_an_agentic_rollout_sees_the_evaluation_turns(world, tmp_path, monkeypatch, task):
    """One real agentic GRPO step whose policy is the scripted teacher (at the trainer's generation seam): each
    item's turn-k input in the rollout is the evaluation's (arft protocol, chat transcript)."""
    from arft_core.agent.env import Tools
    from arft_core.agent.grpo import AgenticGRPOTrainer
    from arft_core.training import train

    world_root = world["root"]
    engine = TeacherEngine(world["processor"], scripts_of(world))
    seen_by_trainer: list[list[int]] = []

    def scripted_turn(self, seqs, imgs, cap):
        seen_by_trainer.extend(seqs)
        return [_nth_turn(engine, s) for s in seqs]

    monkeypatch.setattr(AgenticGRPOTrainer, "_generate_turn", scripted_turn)
    agent_cfg = AgentConfig(transcript="chat")
    cfg = TrainConfig(task=task, mode="agentic", max_steps=1, num_generations=2, prompts_per_device=len(world[task]),
                      max_completion_length=8192, turn_max_new_tokens=512, learning_rate=1e-3, reward_weights=[1.0],
                      sft={"enabled": False})
    with open_tools(SandboxConfig(workers=1), code=task == "coding", search=Snippets(), top_k=4) as tools:
        train(MODEL, cfg, world_root / "base", world_root / task, tmp_path / "out", tmp_path / "log.csv",
              tools=Tools(sandbox=tools.sandbox, search=tools.search, top_k=4), agent_cfg=agent_cfg,
              reward_funcs=[lambda completions, **_: [float(len(c[0]["content"])) for c in completions]])
    evaluated = evaluation_inputs(world, agent_cfg, tmp_path / "eval")
    for question in (r["question"] for r in world[task]):
        mine = [s for s in seen_by_trainer if question in engine.processor.tokenizer.decode(s)]
        expected = evaluated[question]
        # G=2 rollouts of the item, turn by turn: each turn's input is the evaluation's.
        assert sorted(mine) == sorted(expected * 2), question


def _nth_turn(engine: TeacherEngine, seq: list[int]):
    """The teacher's next turn for the item of `seq`, counted from the turns already in it (a trajectory holds
    its earlier turns, so G rollouts of one item each get their own next turn)."""
    text = engine.processor.tokenizer.decode(seq)
    question = next(q for q in engine.scripts if q in text)
    k = text.count("<|im_start|>assistant") - 1
    reply = engine.scripts[question][k]
    ids = engine.processor.tokenizer(reply, add_special_tokens=False)["input_ids"]
    return ids, [0.0] * len(ids)


@pytest.mark.parametrize("agent", [{"transcript": "single_message"}, {"protocol": "paper"}])
def test_agentic_training_in_a_single_message_transcript_is_refused_at_load(tmp_path, agent):
    """Agentic GRPO trains one token sequence per trajectory (the chat form): a config that would train in one form
    and evaluate in another fails when it loads, naming the keys."""
    from conftest import write_params

    from arft_core.config import ConfigError, load_config

    params = write_params(tmp_path, {"train": {"mode": "agentic"}, "agent": agent})
    with pytest.raises(ConfigError) as err:
        load_config(params)
    key, value = ("agent.protocol", "'paper'") if "protocol" in agent else ("agent.transcript", "'single_message'")
    assert f"  {key}: train.mode agentic trains on the chat transcript only" in str(err.value)
    assert f"(got {value})" in str(err.value)
    (tmp_path / "ok").mkdir()
    load_config(write_params(tmp_path / "ok", {"train": {"mode": "agentic"}, "agent": {"transcript": "auto"}}))
