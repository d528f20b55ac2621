"""The agent loop driven by scripted policies (TRL's style: fixed outputs instead of a model), with the real
sandbox and a real local search index: search -> answer, problem -> code -> answer, crashing code, turn
exhaustion, bad output, item isolation, and both transcript forms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arft_core.agent import AgentEnv, EnvItem, Tools, run_episodes
from arft_core.agent.transcript import messages as prompt_of
from arft_core.config import AgentConfig, SandboxConfig
from arft_core.protocol import tips
from arft_core.sandbox import SandboxPool
from arft_core.search.cache import CachedSearch, SearchCache
from arft_core.search.local import LocalSearch, build_index
from scripted import processor, scripted, transcript
from test_search import write_corpus

ROTATE = ("<think> The image is upside down. </think>\n<code>\n```python\nimport cv2\n"
          "img = cv2.imread('path_to_input_image.jpg')\nimg = cv2.rotate(img, cv2.ROTATE_180)\n"
          "cv2.imwrite('path_to_output_image.jpg', img)\n```\n</code>")
CRASH = "<think> Try. </think>\n<code>\n```python\nraise ValueError('boom at line 1')\n```\n</code>"


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    build_index(write_corpus(root / "corpus.jsonl"), root / "index")
    search = CachedSearch(LocalSearch(root / "index"), SearchCache(root / "cache.sqlite"), "live")
    with SandboxPool(SandboxConfig(workers=2, wall_time_s=5.0, cpu_time_s=3, memory_mb=512)) as pool:
        yield Tools(sandbox=pool, search=search, top_k=2)


@pytest.fixture
def upside_down(tmp_path: Path) -> tuple[Path, np.ndarray]:
    clean = np.zeros((40, 60, 3), np.uint8)
    clean[:10, :, 0] = 255  # a red band at the top
    path = tmp_path / "proc.png"
    Image.fromarray(clean[::-1, ::-1]).save(path)
    return path, clean


def same_picture(path: Path, expected: np.ndarray) -> bool:
    """Equal up to JPEG loss (mean error) (the paper's protocol writes path_to_output_image.jpg)."""
    got = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return got.shape == expected.shape and float(np.abs(got - expected).mean()) < 6


def make_env(item: EnvItem, tools: Tools, tmp_path: Path, **cfg) -> AgentEnv:
    return AgentEnv(item, tools, AgentConfig(**cfg), tmp_path / f"ep-{item.id}")


def prompt(env: AgentEnv, form: str = "chat") -> tuple[list[dict], list[Path]]:
    """The next model input's messages and images (transcript `auto` taken as chat, as env.prompt() did)."""
    return prompt_of(env.item, env.turns, env.cfg.protocol, form)


def run(envs: list[AgentEnv], engine) -> list[dict]:
    """Every env through the loop (chat transcript, the embedded tokenizer); their records."""
    return [e.record for e in run_episodes(envs, engine, transcript(), max_new_tokens=512)]


def test_search_then_answer(tools, tmp_path):
    item = EnvItem("s1", "search", "Where is the Mona Lisa kept?", ["the Louvre"])
    env = make_env(item, tools, tmp_path)
    first = env.reset()
    assert first.text.endswith("<query> Where is the Mona Lisa kept? </query>") and first.image is None

    step = env.step("<think> I should look it up. </think>\n<search> Mona Lisa painting </search>")
    assert not step.done and step.info["action"] == "search" and step.reward == {"format": 1.0}
    assert step.observation.text.startswith("<information> 1. Content:The Mona Lisa is a half-length portrait")
    assert "Louvre" in step.observation.text and step.observation.image is None
    # Chat transcript: the tool result comes back as its own user turn after the model's turn.
    messages, images = prompt(env)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"] and images == []
    assert messages[2]["content"][0]["text"] == step.observation.text

    step = env.step("<think> It says the Louvre. </think>\n<answer> Louvre </answer>")
    assert step.done and step.observation is None
    assert step.reward == {"format": 1.0, "answer_f1": 1.0}
    record = env.record()
    assert record["pred_answer"] == "Louvre" and record["end"] == "answer"
    assert record["tool_calls"] == {"search": 1, "code": 0, "code_failed": 0, "invalid": 0}


def test_search_step_scores_query_similarity_against_annotated_queries(tools, tmp_path):
    item = EnvItem("s3", "search", "Q?", ["x"], gold_queries=["Eiffel Tower height", "Louvre location"])
    env = make_env(item, tools, tmp_path)
    env.reset()
    close = env.step("<think> a </think>\n<search> how tall is the Eiffel Tower </search>").reward
    assert close["format"] == 1.0 and 0.8 < close["query_similarity"] <= 1.0
    far = env.step("<think> a </think>\n<search> banana bread recipe </search>").reward
    assert far["query_similarity"] == 0.0  # below the paper's 0.5 floor


def test_problem_code_answer_returns_the_fixed_image(tools, tmp_path, upside_down):
    path, clean = upside_down
    item = EnvItem("c1", "coding", "What colour is the band?", ["red"], image=path, labels=["rotation180"])
    env = make_env(item, tools, tmp_path)
    assert env.reset().image == path

    step = env.step("<think> Upside down. </think>\n<problem> {'rotation180'} </problem>")
    assert step.reward == {"format": 1.0, "problem": 1.0}
    assert step.observation.text == tips(["rotation180"]) and step.observation.image is None

    step = env.step(ROTATE)
    assert step.info["code_ok"] and step.reward == {"format": 1.0, "code_ran": 1.0}
    assert same_picture(step.observation.image, clean)
    assert step.observation.image.is_relative_to(tmp_path / "ep-c1")  # per-item folder, no shared cache.jpg
    messages, images = prompt(env)
    assert images == [path, step.observation.image]
    assert messages[-1]["content"] == [{"type": "image"}]

    step = env.step("<think> The band is red. </think>\n<answer> Red </answer>")
    assert step.done and step.reward == {"format": 1.0, "answer_f1": 1.0}


def test_crashing_code_keeps_the_image_and_shows_the_error(tools, tmp_path, upside_down):
    path, _ = upside_down
    env = make_env(EnvItem("c2", "coding", "Colour?", ["red"], image=path), tools, tmp_path)
    env.reset()
    step = env.step(CRASH)
    assert not step.done and step.info["code_ok"] is False and step.reward == {"format": 1.0, "code_ran": 0.0}
    assert "ValueError" in step.observation.text and "boom" in step.observation.text
    assert step.observation.image is None and env.image == path
    step = env.step("<think> x </think>\n<code>\n```python\nx = 1\n```\n</code>")  # runs, writes nothing
    assert step.info["code_ok"] is False and "no output image" in step.observation.text
    assert env.record()["tool_calls"]["code_failed"] == 2


def test_turn_exhaustion_and_bad_outputs_end_unanswered(tools, tmp_path):
    item = EnvItem("s2", "search", "Q?", ["x"])
    env = make_env(item, tools, tmp_path, max_turns=3)
    env.reset()
    step = env.step("no tags at all")
    assert step.reward == {"format": 0.0} and step.info["error"] == "no action tag"
    assert step.observation.text.startswith("<error> no action tag")
    step = env.step("<think> a </think>\n<search>   </search>")
    assert step.info["error"] == "empty <search>" and not step.done
    step = env.step("<think> a </think>\n<answer> never closed")
    assert step.done and step.info["error"] == "unclosed <answer> tag"
    record = env.record()
    assert record["end"] == "turns" and record["pred_answer"] is None and record["n_turns"] == 3
    assert record["tool_calls"]["invalid"] == 3
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step("<think> a </think><answer> x </answer>")


def test_batched_rollout_isolates_items_and_failures(tools, tmp_path, upside_down):
    path, clean = upside_down
    items = [EnvItem("a", "coding", "Colour?", ["red"], image=path, labels=["rotation180"]),
             EnvItem("b", "coding", "Colour?", ["red"], image=path),
             EnvItem("c", "search", "Kangaroo home?", ["Australia"])]
    # a and b ask the same question of the same image: the script tells them apart by what each wrote so far
    script = [("Colour?", ["<think> x </think>\n<problem> {'rotation180'} </problem>", ROTATE,
                           "<think> x </think>\n<answer> red </answer>"]),
              ("Colour?", [CRASH, "<think> x </think>\n<answer> blue </answer>"]),
              ("Kangaroo home?", ["<think> x </think>\n<search> kangaroo marsupial </search>",
                                  "<think> x </think>\n<answer> Australia </answer>"])]
    policy = scripted(processor(), script)
    envs = [make_env(i, tools, tmp_path) for i in items]
    records = run(envs, policy)
    assert policy.batches == [3, 3, 1]  # all live items generate together at each turn
    assert [r["pred_answer"] for r in records] == ["red", "blue", "Australia"]
    # Item b's failed code never touched item a's image, and a's fix is in a's own folder.
    a_img = records[0]["turns"][1]["observation"]["image"]
    assert same_picture(a_img, clean) and envs[1].image == path


def test_a_broken_tool_fails_one_item_not_the_run(tmp_path, upside_down):
    class BrokenSandbox:
        def run(self, *a, **k):
            raise OSError("sandbox exploded")

    path, _ = upside_down
    items = [EnvItem("x", "coding", "Q", ["r"], image=path), EnvItem("y", "coding", "Q", ["r"], image=path)]
    policy = scripted(processor(), [("Q", [ROTATE]), ("Q", ["<think> a </think><answer> r </answer>"])])
    records = run([make_env(i, Tools(sandbox=BrokenSandbox()), tmp_path) for i in items], policy)
    assert records[0]["end"] == "error" and "sandbox exploded" in records[0]["turns"][-1]["error"]
    assert records[1]["end"] == "answer" and records[1]["pred_answer"] == "r"


def test_single_message_transcript_is_the_papers_form(tools, tmp_path, upside_down):
    path, _ = upside_down
    env = make_env(EnvItem("p", "coding", "Colour?", ["red"], image=path), tools, tmp_path,
                   transcript="single_message")
    env.reset()
    env.step("<think> x </think>\n<problem> {'rotation180'} </problem>")
    step = env.step(ROTATE)
    messages, images = prompt(env, "single_message")
    assert len(messages) == 1 and messages[0]["role"] == "user"
    assert images == [step.observation.image]  # only the current image
    text = messages[0]["content"][1]["text"]
    assert text.index("<query> Colour? </query>") < text.rindex("<problem>") < text.index(tips(["rotation180"]))
    assert text.rstrip().endswith("</code>")


def test_crop_teacher_forcing_switch(tools, tmp_path):
    img = np.zeros((100, 200, 3), np.uint8)
    img[50:100, 100:200] = 255
    path = tmp_path / "crop.png"
    Image.fromarray(img).save(path)
    question = "Read the text within the [500, 500, 1000, 1000] of the image."
    code = ("<think> crop </think>\n<code>\n```python\nimport cv2\nimg = cv2.imread('path_to_input_image.jpg')\n"
            "cv2.imwrite('path_to_output_image.jpg', img[0:10, 0:10])\n```\n</code>")
    # Fired as in the paper's harness: by the model's own diagnosis (first sorted label crop), not the item's labels.
    cases = ((False, "crop", (10, 10)), (True, "crop", (100, 50)), (True, "blur", (10, 10)))
    for forcing, diagnosed, expected in cases:
        env = make_env(EnvItem(f"k{forcing}{diagnosed}", "coding", question, ["x"], image=path, labels=["crop"]),
                       tools, tmp_path, crop_teacher_forcing=forcing)
        env.reset()
        env.step(f"<think> look </think>\n<problem> {{'{diagnosed}'}} </problem>")
        step = env.step(code)
        assert Image.open(step.observation.image).size == expected, (forcing, diagnosed)


def test_turn_end_cuts_after_the_first_stop_or_end_of_sequence():
    from arft_core.agent.generation import turn_end
    from arft_core.protocol import STOP_SEQUENCES

    tok = processor().tokenizer
    ids = tok("<think> a </think><search> q </search>\n<information> fake", add_special_tokens=False)["input_ids"]
    n = turn_end(ids, {tok.eos_token_id}, tok, STOP_SEQUENCES)
    # the fewest tokens whose text holds the stop: here the last one is ">\n" (a token is never split)
    assert tok.decode(ids[:n]) == "<think> a </think><search> q </search>\n"
    assert "</search>" not in tok.decode(ids[:n - 1])
    plain = tok("no stop", add_special_tokens=False)["input_ids"]
    assert turn_end(plain, {tok.eos_token_id}, tok, STOP_SEQUENCES) == len(plain)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert turn_end(plain + [im_end] + plain, {im_end}, tok, STOP_SEQUENCES) == len(plain) + 1  # the eos is kept
    assert turn_end(ids, {im_end}, tok, ()) == len(ids)  # no stop strings: as generated


def test_corrected_code_reward_pays_only_code_that_ran_and_wrote_an_image(tools, upside_down):
    from arft_core import rewards
    from arft_core.agent.env import code_runner

    path, _ = upside_down
    completions = [ROTATE, CRASH, "<think> x </think>\n<code>\n```python\nx = 1\n```\n</code>", "just text"]
    columns = {"solution": ["<think> s </think><code>```python\nx```</code>"] * 4, "image_path": [str(path)] * 4}
    _, paper = rewards.make_reward_funcs("coding", "paper")
    assert paper(completions, **columns) == [0.9, 0.9, 0.9, 0.9]  # the paper pays any code step, even plain text
    _, corrected = rewards.make_reward_funcs("coding", "corrected", code_runner=code_runner(tools.sandbox))
    assert corrected(completions, **columns) == [1.0, 0.0, 0.0, 0.0]
