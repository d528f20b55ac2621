"""The two protocols (`agent.protocol`): `paper` is the authors' evaluation harness byte for byte (checked against
their strings in paper_fixtures.py, through `arft prompt` and the environment), `arft` is ours."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import paper_fixtures as authors
from arft_core.agent.env import AgentEnv, EnvItem, Tools
from arft_core.agent.preview import FixedResults, preview_messages
from arft_core.agent.transcript import messages as prompt_of
from arft_core.config import AgentConfig
from conftest import arft, write_params

Q = "Who designed the building in the picture?"
IMAGE, TEXT = {"type": "image"}, "text"


def text_of(messages: list[dict]) -> str:
    assert len(messages) == 1 and messages[0]["role"] == "user"
    return messages[0]["content"][-1][TEXT]


def test_paper_first_turns_are_the_authors_bytes():
    search = preview_messages("mat-search", "agent", "paper", Q)
    assert search == [{"role": "user", "content": [
        IMAGE, {"type": "text", "text": authors.SEARCH_SYSTEM_PROMPT + "\n" + f"<query> {Q} </query>"}]}]
    multihop = preview_messages("multihop", "agent", "paper", Q)  # text only, the same image-referencing prompt
    assert multihop == [{"role": "user", "content": [
        {"type": "text", "text": authors.SEARCH_SYSTEM_PROMPT + "\n" + f"<query> {Q} </query>"}]}]
    coding = preview_messages("mat-coding", "agent", "paper", Q)  # no newline, malformed closing tag: theirs
    assert coding == [{"role": "user", "content": [
        IMAGE, {"type": "text", "text": authors.CODING_SYSTEM_PROMPT + f"<query> {Q} <query>"}]}]
    assert preview_messages("mat-search", "direct", "paper", Q) == [{"role": "user", "content": [
        IMAGE, {"type": "text", "text": Q + authors.DIRECT_MAT}]}]
    assert preview_messages("multihop", "direct", "paper", Q) == [{"role": "user", "content": [
        {"type": "text", "text": Q + authors.DIRECT_MULTIHOP}]}]


def test_paper_second_turns_append_what_the_authors_append():
    # A multi-label diagnosis: the tips list the labels sorted, keyed on the first sorted one, then a newline.
    step = "<think> Rotated and dark. </think>\n<problem> {'rotation90', 'dark'} </problem>"
    coding = text_of(preview_messages("mat-coding", "agent", "paper", Q, after_tool=True, output=step))
    assert coding == (authors.CODING_SYSTEM_PROMPT + f"<query> {Q} <query>" + "\n" + step + "\n"
                      + authors.TIPS_FIX.format(labels="['dark', 'rotation90']") + "\n")
    none = "<think> Clean. </think>\n<problem> {'none'} </problem>"  # their none branch adds no final newline
    assert text_of(preview_messages("mat-coding", "agent", "paper", Q, after_tool=True, output=none)).endswith(
        none + "\n" + authors.TIPS_NONE)
    crop = "<think> A region. </think>\n<problem> {'noise', 'crop'} </problem>"  # first sorted: crop
    assert text_of(preview_messages("mat-coding", "agent", "paper", Q, after_tool=True, output=crop)).endswith(
        crop + "\n" + authors.TIPS_CROP + "\n")
    # Search: the output, then the raw snippets numbered and joined with nothing, a space after the block.
    query = f"<think> Look it up. </think>\n<search> {Q} </search>"
    search = text_of(preview_messages("mat-search", "agent", "paper", Q, after_tool=True, output=query,
                                      snippets=["Gaudi  built it.", "In Barcelona."]))
    assert search == (authors.SEARCH_SYSTEM_PROMPT + "\n" + f"<query> {Q} </query>" + "\n" + query + "\n"
                      + "<information> 1. Content:Gaudi  built it.2. Content:In Barcelona. </information> ")
    empty = text_of(preview_messages("mat-search", "agent", "paper", Q, after_tool=True, output=query, snippets=[]))
    assert empty.endswith(query + "\n<information>  </information> ")


def test_arft_protocol_keeps_our_forms():
    first = text_of(preview_messages("mat-coding", "agent", "arft", Q))
    assert first == authors.CODING_SYSTEM_PROMPT + "\n" + f"<query> {Q} </query>"  # training's well-formed query
    step = "<think> x </think>\n<problem> {'rotation90', 'dark'} </problem>"
    messages = preview_messages("mat-coding", "agent", "arft", Q, after_tool=True, output=step)
    assert messages[-1]["content"] == [{"type": "text", "text": authors.TIPS_FIX.format(
        labels="['rotation90', 'dark']")}]  # our chat form: labels as the model wrote them, a user turn
    query = "<think> x </think>\n<search> who </search>"
    after = preview_messages("mat-search", "agent", "arft", Q, after_tool=True, output=query, snippets=[])
    assert after[-1]["content"] == [{"type": "text", "text": "<information> No results found. </information>"}]


def test_arft_prompt_prints_the_messages_and_the_rendered_text(tmp_path):
    write_params(tmp_path, {"agent": {"protocol": "paper"}})
    shown = arft("prompt", "--benchmark", "mat-search", "--question", Q, cwd=tmp_path)
    assert json.loads(shown.stdout) == preview_messages("mat-search", "agent", "paper", Q)  # agent.protocol
    rendered = arft("prompt", "--benchmark", "multihop", "--protocol", "arft", "--question", Q, "--rendered",
                    cwd=tmp_path).stdout
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert rendered.endswith(f"<query> {Q} </query><|im_end|>\n<|im_start|>assistant\n")
    bad = arft("prompt", "--benchmark", "mat-search", "--mode", "direct", "--after-tool", "--question", Q,
               cwd=tmp_path, check=False)
    assert bad.returncode == 1 and "the direct mode has no tools" in bad.stderr


class Failing:
    def search(self, query, k):
        from arft_core.search import SearchError

        raise SearchError("quota exceeded")


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "item.png"
    Image.fromarray(np.full((32, 48, 3), 90, np.uint8)).save(path)
    return path


def prompt(env: AgentEnv) -> tuple[list[dict], list]:
    """The next model input (the paper's protocol: always the single-message form)."""
    return prompt_of(env.item, env.turns, "paper", "single_message")


def paper_env(tmp_path, item: EnvItem, **tools) -> AgentEnv:
    env = AgentEnv(item, Tools(**tools), AgentConfig(protocol="paper"), tmp_path / "work")
    env.reset()
    return env


def test_paper_harness_reads_and_ends_items_as_theirs(tmp_path, image):
    item = EnvItem(1, "search", Q, ["Gaudi"], image=image)
    # A multi-line answer is not read by their regex: the item ends without an answer.
    env = paper_env(tmp_path, item, search=FixedResults(["a"]))
    result = env.step("<think> done </think>\n<answer> Antoni\nGaudi </answer>")
    assert result.done and env.record()["pred_answer"] is None and env.end == "answer"
    env = paper_env(tmp_path, item, search=FixedResults(["a"]))
    env.step("<think> done </think>\n<answer>  Gaudi </answer>")
    assert env.record()["pred_answer"] == "Gaudi"
    # A failed search ends the item unanswered (their harness catches the exception and records None).
    env = paper_env(tmp_path, item, search=Failing())
    result = env.step("<think> look </think>\n<search> architect </search>")
    assert result.done and env.end == "error" and env.record()["pred_answer"] is None
    # An output with no action appends nothing: the next prompt is the first one again.
    env = paper_env(tmp_path, item, search=FixedResults(["a"]))
    first = prompt(env)
    assert not env.step("I am not sure.").done and prompt(env) == first


def test_paper_code_steps_show_the_new_image_and_never_an_error(tmp_path, image):
    from arft_core.config import SandboxConfig
    from arft_core.sandbox import SandboxPool

    item = EnvItem(2, "coding", "What is written?", ["x"], image=image, labels=["rotation90"])
    problem = "<think> rotated </think>\n<problem> {'rotation90'} </problem>"
    broken = "<think> fix </think>\n<code>\n```python\nraise ValueError('boom')\n```\n</code>"
    fixed = ("<think> fix </think>\n<code>\n```python\nimport cv2\nimg = cv2.imread('path_to_input_image.jpg')\n"
             "cv2.imwrite('path_to_output_image.jpg', cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE))\n```\n</code>")
    with SandboxPool(SandboxConfig(workers=1)) as pool:
        env = paper_env(tmp_path, item, sandbox=pool)
        assert env.step(fixed).done and env.end == "error"  # code before any diagnosis: their harness crashes
        env = paper_env(tmp_path, item, sandbox=pool)
        env.step(problem)
        env.step(broken)
        messages, images = prompt(env)
        # The failed code is in the transcript once (the model's own step) and nothing else follows it.
        assert images == [image] and text_of(messages).count("boom") == 1 and "<error>" not in text_of(messages)
        assert text_of(messages).endswith(problem + "\n" + authors.TIPS_FIX.format(labels="['rotation90']")
                                          + "\n" + "\n" + broken)
        env.step(fixed)
        messages, images = prompt(env)
        assert images != [image] and Image.open(images[0]).size == (32, 48)  # only the new, rotated image
        assert text_of(messages).endswith("\n" + broken + "\n" + fixed)


def test_evaluation_uses_the_form_the_model_was_trained_in():
    auto = AgentConfig()
    assert auto.transcript == "auto"
    assert auto.for_training_mode("step").transcript == "single_message"  # step samples: one user message
    assert auto.for_training_mode("agentic").transcript == "chat"
    assert AgentConfig(transcript="chat").for_training_mode("step").transcript == "chat"  # an explicit choice wins
    from arft_core.protocol import STOP_SEQUENCES, stop_sequences

    assert stop_sequences("paper") == () and stop_sequences("arft") == STOP_SEQUENCES


def test_the_paper_protocol_decodes_with_the_checkpoints_generation_config(tmp_path):
    from arft_core.config import load_config
    from arft_core.evaluation import generation_eval

    write_params(tmp_path, {"agent": {"protocol": "paper"}, "eval": {"decoding": "explicit"}})
    cfg = load_config(tmp_path / "params.yaml")
    assert generation_eval(cfg).decoding == "checkpoint" and cfg.eval.decoding == "explicit"
    shown = arft("eval", "--show-config", cwd=tmp_path).stdout
    assert "generation:\n  source: checkpoint\n" in shown and "stop_sequences: []" in shown
    cfg.agent.protocol = "arft"
    assert generation_eval(cfg).decoding == "explicit"
