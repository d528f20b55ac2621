"""Training on the tiny model through TRL (real code paths, tiny sizes): step rows (the teacher replayed through the
agent loop), SFT cold start, GRPO with the task's rewards, LoRA, the paper preset, and evaluation of the result."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from arft_core.agent import Tools
from arft_core.config import AgentConfig, Config, DataConfig, ModelConfig, SandboxConfig, TrainConfig
from arft_core.data.mat_coding import generate
from arft_core.evaluation import evaluate
from arft_core.model.embedded import load_model, prepare_base_model
from arft_core.model.processor import load_processor
from arft_core.protocol import query_text
from arft_core.sandbox import SandboxPool
from arft_core.training import build_step_dataset, step_rows, train
from agentic_job import ROTATE_90
from conftest import ROOT

MODEL = ModelConfig(embedded={"vocab_size": 1024})
# Small easy-vqa images keep the tiny model's prompts short.
DATA = dict(sources={"synthetic": 0, "easy_vqa": 1}, hard=[["rotation90", "dark"]])
NO_SFT = {"enabled": False}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    prepare_base_model(MODEL, root / "base")
    generate(DataConfig(n_train=4, n_test=3, **DATA), root / "data", root)
    return root


@pytest.fixture(scope="module")
def tools():
    """The sandbox that replays the teacher's code turns into step rows (and runs agentic rollouts' code)."""
    with SandboxPool(SandboxConfig(workers=1)) as pool:
        yield Tools(sandbox=pool)


def rows_of(tiny: Path, tools: Tools, scratch: Path, image_size: int | None = None) -> list[dict]:
    """The step rows training builds from the tiny data set (default agent settings, step mode)."""
    return step_rows(tiny / "data", "coding", tools, AgentConfig().for_training_mode("step"),
                     load_processor(tiny / "base"), image_size, scratch)


def length_reward(completions, **_):
    """A reward with variance inside each group, so that advantages (and so gradients) are non-zero."""
    return [float(len(c[0]["content"])) for c in completions]


def changed_weights(a: Path, b: Path) -> list[str]:
    before, _ = load_model(a)
    after, _ = load_model(b)
    return [k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])]


def test_step_rows_are_the_loops_single_message_turns(tiny, tools, tmp_path):
    """Step rows come from replaying each teacher trajectory through the agent loop: under the default step mode a
    row's prompt is the paper's single user message (the current image, then system prompt + query + the transcript
    so far), exactly what the loop renders for that turn."""
    rows = rows_of(tiny, tools, tmp_path, image_size=72)
    assert {r["type"] for r in rows} == {"problem", "code", "answer"}
    code_row = next(r for r in rows if r["type"] == "code")
    assert len(code_row["prompt"]) == 1 and code_row["prompt"][0]["role"] == "user"
    content = code_row["prompt"][0]["content"]
    assert content[0] == {"type": "image"} and len(content) == 2 and len(code_row["images"]) == 1
    text = content[1]["text"]
    question = next(i["question"] for i in json.loads((tiny / "data" / "train.json").read_text())
                    if str(i["id"]) == code_row["item_id"])
    # The system prompt (its chain header last) and the query, then the chain so far: the item's problem turn and
    # the tips the environment answered it with.
    first = query_text("coding", question)
    assert text.startswith(first) and first.index("# Current reasoning chain:") < first.index("<query>")
    problem_row = rows[rows.index(code_row) - 1]  # the same item's previous turn
    assert problem_row["type"] == "problem" and problem_row["item_id"] == code_row["item_id"]
    chain = text[len(first):]
    assert chain.startswith(f"\n{problem_row['solution']}\n<tips>") and chain.count("<tips>") == 1
    assert "<code>" in code_row["solution"]
    # The answer turn works on the image the teacher's code produced (a tool image in the replay's folder).
    answer_row = rows[rows.index(code_row) + 1]
    assert answer_row["type"] == "answer" and Path(answer_row["image_path"]).is_relative_to(tmp_path)
    assert answer_row["images"] == [answer_row["image_path"]]
    ds = build_step_dataset(rows, image_size=72)
    assert ds[0]["images"][0].size == (72, 72) and "<problem>" in ds[0]["solution"]


def test_paper_rewards_give_zero_advantage_to_a_tagless_policy(tiny, tools, tmp_path):
    cfg = TrainConfig(max_steps=1, num_generations=2, max_completion_length=4, sft=NO_SFT, reward_variant="paper")
    logged = []
    train(MODEL, cfg, tiny / "base", tiny / "data", tmp_path / "out", tmp_path / "log.csv",
          sink=lambda m, s: logged.append(m), tools=tools)
    step = next(m for m in logged if "reward" in m)
    # The random policy never writes tags: format is 0, logged per component (the paper's code-step 0.9 may pay).
    assert step["rewards/format_reward/mean"] == 0.0 and "rewards/accuracy_reward/mean" in step


def test_sft_cold_start_teaches_the_tags_then_grpo_runs(tiny, tools, tmp_path):
    cfg = TrainConfig(max_steps=1, num_generations=2, max_completion_length=24, reward_weights=[1.0],
                      sft={"max_steps": 60, "learning_rate": 1e-2, "batch_size": 6})
    logged = []
    summary = train(MODEL, cfg, tiny / "base", tiny / "data", tmp_path / "out", tmp_path / "log.csv",
                    sink=lambda m, s: logged.append(m), reward_funcs=[length_reward], tools=tools)
    sft_losses = [m["sft/loss"] for m in logged if "sft/loss" in m]
    assert summary["sft_steps"] == 60 and sft_losses[-1] < sft_losses[0] / 2, sft_losses
    from PIL import Image

    row = next(r for r in rows_of(tiny, tools, tmp_path / "rows") if r["type"] == "problem")

    def greedy(model_dir: Path) -> str:
        model, processor = load_model(model_dir)
        text = processor.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=[Image.open(p).convert("RGB") for p in row["images"]],
                           return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
        return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    assert not greedy(tiny / "base").startswith("<think")
    completion = greedy(tmp_path / "out")
    # The random model's first tokens are noise; after SFT it opens with the protocol's tag.
    assert completion.startswith("<think"), completion


def test_grpo_updates_weights_and_logs_rewards(tiny, tools, tmp_path):
    out = tmp_path / "trained"
    cfg = TrainConfig(max_steps=2, num_generations=2, max_completion_length=6, learning_rate=1e-2,
                      reward_weights=[1.0], sft=NO_SFT)
    logged = []
    summary = train(MODEL, cfg, tiny / "base", tiny / "data", out, tmp_path / "log.csv",
                    sink=lambda m, s: logged.append((s, m)), reward_funcs=[length_reward], tools=tools)
    assert summary["steps"] == 2 and summary["train_items"] == len(rows_of(tiny, tools, tmp_path / "rows"))
    assert changed_weights(tiny / "base", out), "two GRPO steps at lr 1e-2 must move some weights"
    _, processor = load_model(out)
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == 1024 + 12
    assert {s for s, m in logged if "reward" in m} == {1, 2}
    assert any("rewards/length_reward/mean" in m for _, m in logged)
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2"] and "rewards_length_reward_mean" in rows[0]

    # The trained weights go through the evaluation harness: both modes, the real sandbox for the agent.
    cfg = Config.from_dict({"model": MODEL.model_dump(), "paths": {"mat_coding": "data"},
                            "eval": {"benchmarks": ["mat-coding"], "max_new_tokens": 4},
                            "agent": {"max_turns": 2}, "sandbox": {"workers": 1}}, root=tiny)
    scores, predictions, report = evaluate(out, cfg)
    assert scores["mat-coding"]["agent"]["avg"]["n"] == 3 and scores["mat-coding"]["direct"]["avg"]["n"] == 3
    rows = predictions["mat-coding.agent"]
    assert len(rows) == 3 and set(rows[0]) >= {"id", "gt", "pred_answer", "turns"}
    assert report.count("<details") == 6


def test_lora_trains_adapters_and_saves_a_merged_model(tiny, tools, tmp_path):
    cfg = TrainConfig(max_steps=1, num_generations=2, max_completion_length=4, learning_rate=1e-1,
                      reward_weights=[1.0], sft=NO_SFT, lora={"enabled": True, "r": 4, "alpha": 8})
    train(MODEL, cfg, tiny / "base", tiny / "data", tmp_path / "out", tmp_path / "log.csv",
          reward_funcs=[length_reward], tools=tools)
    changed = changed_weights(tiny / "base", tmp_path / "out")
    assert changed and all("self_attn" in k for k in changed)  # only the adapted projections moved
    assert not list((tmp_path / "out").glob("adapter_*"))  # merged: a plain model folder


def test_paper_preset_pins_every_value_and_show_config_prints_them(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["preset"] = "paper"
    cfg = Config.model_validate(params)
    paper = params["train_presets"]["paper"]
    for section in ("train", "eval", "agent"):  # its one definition, params.yaml, wins over the sections
        for key, value in paper[section].items():
            got = getattr(getattr(cfg, section), key)
            got = got.model_dump() if hasattr(got, "model_dump") else got
            assert (got | value == got) if isinstance(value, dict) else got == value, (section, key)
    for key, value in paper["by_task"]["coding"]["train"].items():  # train.task coding: the coding run's length
        assert getattr(cfg.train, key) == value, key
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = subprocess.run([sys.executable, "-m", "arft_core.cli", "train", "--show-config", "-p",
                          str(tmp_path / "params.yaml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)["train"]
    assert shown["preset"] == "paper" and shown["num_generations"] == 8 and shown["learning_rate"] == 1e-6
    assert shown["beta"] == 0.04 and shown["loss_type"] == "grpo" and shown["max_completion_length"] == 256
    assert (shown["image_size"], shown["max_pixels"], shown["min_pixels"]) == (720, 401408, 3136)
    assert shown["prompts_per_device"] == 1 and shown["gradient_accumulation_steps"] == 2
    assert shown["reward_variant"] == "paper" and shown["sft"]["enabled"] is False
    assert (shown["lr_scheduler_type"], shown["warmup_steps"], shown["weight_decay"], shown["temperature"]) == (
        "linear", 0, 0.0, 1.0)
    assert shown["gradient_checkpointing"] is True and shown["reward_weights"] == [1.0, 1.0]
    assert (shown["max_steps"], shown["num_train_epochs"], shown["checkpoint_step"], shown["save_steps"]) == (
        None, 10.0, 1400, 100)
    assert out.stdout.startswith("# training length: learning-rate schedule over 10 epochs, stopping at step 1400")


def resume_job_args(tiny: Path, work: Path, max_steps: int, save_steps: int, kill_at: int | None = None,
                    sft_steps: int = 0) -> list[str]:
    """tests/resume_job.py and its arguments (see there)."""
    job = Path(__file__).with_name("resume_job.py")
    return [str(job), str(tiny / "base"), str(tiny / "data"), str(work / "out"), str(work / "ckpt"),
            str(work / "batches.jsonl"), "--max-steps", str(max_steps), "--save-steps", str(save_steps),
            *(["--kill-at", str(kill_at)] if kill_at else []), "--sft-steps", str(sft_steps)]


def run_job(tiny: Path, work: Path, *args: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *resume_job_args(tiny, work, *args)], capture_output=True, text=True,
                          cwd=work)


def batches_by_step(log: Path) -> dict[int, list]:
    seen: dict[int, list] = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        seen[entry["step"]] = entry  # a step redone after the resume overwrites the killed run's
    return seen


def test_killed_training_resumes_from_the_last_checkpoint(tiny, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    done = run_job(tiny, straight, 5, 2)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["steps"] == 5

    dead = run_job(tiny, killed, 5, 2, 3)
    assert dead.returncode == -9  # SIGKILL at the end of step 3: checkpoint-2 is the last one written
    assert sorted(p.name for p in (killed / "ckpt").glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (killed / "out").exists()
    resumed = run_job(tiny, killed, 5, 2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] == "checkpoint-2" and summary["steps"] == 5

    # The same batches at the same steps: nothing repeated or skipped across the kill and the resume.
    expected, got = batches_by_step(straight / "batches.jsonl"), batches_by_step(killed / "batches.jsonl")
    assert sorted(got) == [1, 2, 3, 4, 5]
    assert {s: b["ids"] for s, b in got.items()} == {s: b["ids"] for s, b in expected.items()}
    assert got == expected  # the same sampled completions too: the RNG state was restored
    # Optimizer, scheduler and RNG state came back too: the resumed run ends with the same weights.
    a, _ = load_model(straight / "out")
    b, _ = load_model(killed / "out")
    assert all(torch.allclose(v, b.state_dict()[k], atol=1e-6) for k, v in a.state_dict().items())




def test_agentic_mode_feeds_the_tool_image_back_and_masks_tool_tokens(tiny, tmp_path, monkeypatch):
    from arft_core.agent.grpo import AgenticGRPOTrainer

    seen = {"turn_inputs": [], "loss_inputs": []}
    original_turn, original_loss = AgenticGRPOTrainer._generate_turn, AgenticGRPOTrainer._compute_loss

    def spy_turn(self, seqs, imgs, max_new):  # what the model is given at each generated turn
        seen["turn_inputs"].append({"n_images": [len(x) for x in imgs],
                                    "image_tokens": [s.count(self.image_pad_id) for s in seqs]})
        return original_turn(self, seqs, imgs, max_new)

    def spy_loss(self, model, inputs):
        seen["loss_inputs"].append({k: inputs[k].clone() for k in ("tool_mask", "completion_mask", "completion_ids")})
        seen["pad_id"] = self.image_pad_id
        return original_loss(self, model, inputs)

    monkeypatch.setattr(AgenticGRPOTrainer, "_generate_turn", spy_turn)
    monkeypatch.setattr(AgenticGRPOTrainer, "_compute_loss", spy_loss)
    cfg = TrainConfig(mode="agentic", max_steps=2, num_generations=2, max_completion_length=400,
                      turn_max_new_tokens=8, learning_rate=1e-2, reward_weights=[1.0], sft=NO_SFT)
    logged, artifacts = [], {}
    with SandboxPool(SandboxConfig(workers=1)) as pool:
        summary = train(MODEL, cfg, tiny / "base", tiny / "data", tmp_path / "out", tmp_path / "log.csv",
                        sink=lambda m, s: logged.append(m), tools=Tools(sandbox=pool),
                        agent_cfg=AgentConfig(max_turns=2), forced_first_turn=lambda i: ROTATE_90,
                        reward_funcs=[length_reward], artifact_sink=artifacts.__setitem__)
    assert summary["steps"] == 2 and summary["train_items"] == 4
    # The first turn was scripted, so every generated turn is the second one: it sees the item's image and the
    # image the sandbox produced, with one <|image_pad|> run each.
    assert seen["turn_inputs"] and all(n == 2 for t in seen["turn_inputs"] for n in t["n_images"])
    assert all(k >= 2 for t in seen["turn_inputs"] for k in t["image_tokens"])
    for batch in seen["loss_inputs"]:
        rows = zip(batch["completion_ids"], batch["tool_mask"], batch["completion_mask"], strict=True)
        for ids, tool_mask, valid in rows:
            ids, tool_mask = ids[valid.bool()], tool_mask[valid.bool()]
            image_tokens = ids == seen["pad_id"]
            assert image_tokens.any() and (tool_mask[image_tokens] == 0).all()  # tool image: loss mask 0
            assert tool_mask.sum() > 0 and (tool_mask == 0).sum() > image_tokens.sum()  # user-turn text too
    assert any(m.get("tools/call_rate") == 1.0 for m in logged)  # the scripted code call, once per rollout
    assert any("tools/error_rate" in m for m in logged)
    assert changed_weights(tiny / "base", tmp_path / "out"), "two agentic GRPO steps at lr 1e-2 must move weights"
    # Step 1's trajectories as an artifact: the scripted code turn and the sandbox's image, inline.
    page = artifacts["rollouts/step_000001.html"]
    assert list(artifacts) == ["rollouts/step_000001.html"] and "cv2.ROTATE_90_COUNTERCLOCKWISE" in page
    assert page.count("data:image/jpeg;base64") >= 2 * 2  # per trajectory: the item image and the tool's image



def test_epochs_set_the_schedule_and_checkpoint_step_ends_the_run_there(tiny, tools, tmp_path):
    """train.max_steps null: num_train_epochs decides the length (GRPOConfig); checkpoint_step stops at that step
    with the whole run's linear schedule, as the paper's checkpoint-1400 of 10 epochs."""
    rows = len(rows_of(tiny, tools, tmp_path / "rows"))  # one prompt per step: an epoch is `rows` steps
    cfg = TrainConfig(max_steps=None, num_train_epochs=3, checkpoint_step=2, num_generations=2,
                      max_completion_length=4, learning_rate=1e-2, reward_weights=[1.0], sft=NO_SFT)
    logged = []
    summary = train(MODEL, cfg, tiny / "base", tiny / "data", tmp_path / "out", tmp_path / "log.csv",
                    sink=lambda m, s: logged.append((s, m)), reward_funcs=[length_reward], tools=tools)
    assert summary["steps"] == 2 and (tmp_path / "out" / "config.json").is_file()
    lr = {s: m["learning_rate"] for s, m in logged if "learning_rate" in m}
    # The rate step 2 used: linear decay over 3 epochs (3 * rows steps), not over the 2 steps run.
    assert lr[2] == pytest.approx(1e-2 * (1 - 1 / (3 * rows))) and 3 * rows > 2
