"""vLLM as the rollout engine, run for real on CPU in the vLLM environment (`make vllm-env`; the main suite runs
this folder there, tests/test_engine_vllm.py): evaluation equals the HF back-end's float32 greedy outputs, and GRPO
in step and agentic mode trains with vLLM rollouts whose log-probs are the policy's, the engine following the
trained weights."""

import os
import sys
from pathlib import Path

import pytest
import torch

from arft_core.agent.engine import collapse_image_pads, trainer_vllm_class, use_vllm
from arft_core.config import Config, DataConfig, ModelConfig, RolloutConfig, TrainConfig
from arft_core.data.mat_coding import generate
from arft_core.evaluation import evaluate
from arft_core.model.embedded import load_model, prepare_base_model
from arft_core.training import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agentic_job import ROTATE_90  # noqa: E402

MODEL = ModelConfig(embedded={"vocab_size": 1024})
VLLM = RolloutConfig(engine="vllm")
NO_SFT = {"enabled": False}
TOLERANCE = 1e-3  # vLLM-vs-policy log-prob difference allowed in float32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    prepare_base_model(MODEL, root / "base")
    generate(DataConfig(n_train=4, n_test=4, sources={"synthetic": 0, "easy_vqa": 1}, hard=[["rotation90", "dark"]]),
             root / "data", root)
    return root


def length_reward(completions, **_):
    """Variance inside each group, so that advantages and gradients are non-zero."""
    return [float(len(c[0]["content"])) for c in completions]


@pytest.fixture
def engines(monkeypatch):
    """Every TrainerVLLM a trainer builds, to look at it after training."""
    cls, built = trainer_vllm_class(), []
    init = cls.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(cls, "__init__", spy)
    return built


def check_training(logged: list[dict]) -> None:
    steps = [m for m in logged if "grad_norm" in m]
    assert len(steps) == 2 and all(m["grad_norm"] > 0 for m in steps), logged
    diffs = [m["sampling/sampling_logp_difference/max"] for m in logged if "sampling/sampling_logp_difference/max" in m]
    assert len(diffs) == 2 and max(diffs) < TOLERANCE, diffs  # step 2 sampled from the weights synced after step 1


def greedy(llm, ids, image, n=12):
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": image}}],
                       SamplingParams(max_tokens=n, temperature=0.0, logprobs=0), use_tqdm=False)[0].outputs[0]
    return list(out.token_ids), [lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs)]


def hf_logprobs(model, enc, tokens):
    """The HF model's log-probs of `tokens` after the prompt (teacher-forced) and its own greedy tokens."""
    with torch.no_grad():
        full = torch.cat([enc["input_ids"], torch.tensor([tokens])], 1)
        extra = {"input_ids": full, "attention_mask": torch.ones_like(full)}
        if "mm_token_type_ids" in enc:  # image tokens for the 3-D positions: none among the new ones
            extra["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros(1, len(tokens)).long()], 1)
        logits = model(**{**enc, **extra}).logits[0]
        start = enc["input_ids"].shape[1]
        lp = logits[start - 1:-1].float().log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
        own = model.generate(**enc, max_new_tokens=len(tokens), do_sample=False)[0, start:].tolist()
    return lp.tolist(), own


def test_auto_picks_vllm_here_and_names_what_stands_in_its_way(tiny, tmp_path):
    assert use_vllm(RolloutConfig(), tiny / "base") and not use_vllm(RolloutConfig(engine="hf"), tiny / "base")
    odd = ModelConfig(embedded={"vocab_size": 1024, "num_attention_heads": 4, "num_key_value_heads": 2,
                                "mrope_section": [2, 3, 3]})  # head size 16
    prepare_base_model(odd, tmp_path / "odd")
    assert not use_vllm(RolloutConfig(), tmp_path / "odd")  # auto falls back to HF
    with pytest.raises(RuntimeError, match="rollout.engine is vllm, but vLLM's CPU attention supports head sizes "
                                           r"\[32, .*the model's is 16"):
        use_vllm(VLLM, tmp_path / "odd")


def test_step_grpo_trains_on_vllm_rollouts_and_the_engine_follows_the_weights(tiny, tmp_path, engines):
    out = tmp_path / "trained"
    cfg = TrainConfig(max_steps=2, num_generations=2, max_completion_length=8, learning_rate=1e-2,
                      reward_weights=[1.0], sft=NO_SFT)
    logged = []
    from arft_core.agent.runner import open_tools
    from arft_core.config import SandboxConfig

    with open_tools(SandboxConfig(workers=1), code=True) as tools:  # the teacher's replay into step rows
        summary = train(MODEL, cfg, tiny / "base", tiny / "data", out, tmp_path / "log.csv",
                        sink=lambda m, s: logged.append(m), reward_funcs=[length_reward], rollout=VLLM, tools=tools)
    assert summary["rollout_engine"] == "vllm" and summary["steps"] == 2
    check_training(logged)

    # After the update the engine generates what the trained weights generate, not what the base weights do.
    (engine,) = engines
    engine.sync_weights()
    trained, processor = load_model(out)
    base, _ = load_model(tiny / "base")
    from PIL import Image

    image = Image.open(next((tiny / "data" / "images").glob("*"))).convert("RGB")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What does it say?"}]}]
    enc = processor(text=[processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)],
                    images=[image], return_tensors="pt")
    ids = collapse_image_pads(enc["input_ids"][0].tolist(), engine.pad_id)
    tokens, logps = greedy(engine.llm, ids, image)
    trained_lp, trained_own = hf_logprobs(trained, enc, tokens)
    base_lp, _ = hf_logprobs(base, enc, tokens)
    assert tokens == trained_own
    assert max(abs(a - b) for a, b in zip(logps, trained_lp)) < TOLERANCE
    assert max(abs(a - b) for a, b in zip(logps, base_lp)) > 100 * TOLERANCE


def test_agentic_grpo_generates_each_turn_through_vllm(tiny, tmp_path, engines):
    from arft_core.agent import Tools
    from arft_core.agent.grpo import AgenticGRPOTrainer
    from arft_core.config import AgentConfig, SandboxConfig
    from arft_core.sandbox import SandboxPool

    turns = []
    original = AgenticGRPOTrainer._generate_turn

    def spy(self, seqs, imgs, max_new):
        turns.append([len(x) for x in imgs])
        return original(self, seqs, imgs, max_new)

    AgenticGRPOTrainer._generate_turn = spy
    try:
        cfg = TrainConfig(mode="agentic", max_steps=2, num_generations=2, max_completion_length=400,
                          turn_max_new_tokens=8, learning_rate=1e-2, reward_weights=[1.0], sft=NO_SFT)
        logged = []
        with SandboxPool(SandboxConfig(workers=1)) as pool:
            summary = train(MODEL, cfg, tiny / "base", tiny / "data", tmp_path / "out", tmp_path / "log.csv",
                            sink=lambda m, s: logged.append(m), tools=Tools(sandbox=pool),
                            agent_cfg=AgentConfig(max_turns=2), forced_first_turn=lambda i: ROTATE_90,
                            reward_funcs=[length_reward], rollout=VLLM)
    finally:
        AgenticGRPOTrainer._generate_turn = original
    assert summary["rollout_engine"] == "vllm" and len(engines) == 1
    # The scripted code turn ran in the sandbox; the generated second turn saw the item's and the tool's image.
    assert turns and all(n == 2 for t in turns for n in t)
    assert any(m.get("tools/call_rate") == 1.0 for m in logged)
    check_training(logged)


def test_evaluation_through_vllm_equals_hf_greedy(tiny):
    outputs = {}
    for engine in ("hf", "vllm"):
        cfg = Config.from_dict({"model": MODEL.model_dump(), "paths": {"mat_coding": "data"},
                                "eval": {"benchmarks": ["mat-coding"], "modes": ["agent", "direct"], "max_new_tokens": 24,
                                         "teacher_forced": False},
                                "rollout": {"engine": engine}, "agent": {"max_turns": 2},
                                "sandbox": {"workers": 1}}, root=tiny)
        scores, predictions, _ = evaluate(tiny / "base", cfg)
        outputs[engine] = {mode: [[t["output"] for t in p["turns"]] for p in predictions[f"mat-coding.{mode}"]]
                           for mode in ("agent", "direct")}
    assert len(outputs["hf"]["agent"]) == len(outputs["hf"]["direct"]) == 4 and all(outputs["hf"]["agent"])
    assert outputs["vllm"] == outputs["hf"]


if __name__ == "__main__":  # vLLM may spawn: the guard keeps a child from rerunning the module
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
