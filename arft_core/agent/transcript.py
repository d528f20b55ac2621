"""The one transcript renderer: how an episode so far becomes the model's next input, for each protocol
(`agent.protocol`) and transcript form (`agent.transcript`). Evaluation, serving, agentic GRPO rollouts and the
step rows of step-mode training all read their prompts from here, so a model is trained on the turns it is
evaluated and served on.

- `messages(item, turns, protocol, form)`: the conversational prompt (chat messages and their images) after the
  given turns; what step rows hand to TRL.
- `Transcript`: the same, as token ids, turn after turn. In the chat form each turn's input is the previous input,
  the model's tokens as generated, and the observation's tokens (a user turn, with the new image): token in,
  token out. In the single-message form (the paper's) each input is rendered afresh: one user message with the
  transcript appended and only the current image.

What each turn appends to the single-message transcript (its `context`: ours, or the authors' bytes under
`paper`) is written by the environment's step, which knows the protocol's harness; this module only assembles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from arft_core import protocol as protocols

FORMS = ("chat", "single_message")
IMAGE_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"  # one image placeholder, expanded by the processor


def form_of(protocol: str, transcript: str) -> str:
    """The transcript form a protocol runs in: the paper's harness always re-sends one user message."""
    if transcript not in FORMS:
        raise ValueError(f"agent.transcript {transcript!r}: resolve `auto` first (AgentConfig.for_training_mode)")
    return "single_message" if protocol == "paper" else transcript


def current_image(item, turns: Sequence[dict]) -> Path | None:
    """The image the model works on after `turns`: the newest one a tool brought back, else the item's."""
    for t in reversed(turns):
        if (t.get("observation") or {}).get("image"):
            return Path(t["observation"]["image"])
    return item.image


def messages(item, turns: Sequence[dict], protocol: str, form: str) -> tuple[list[dict], list[Path]]:
    """(chat messages, images in the order their placeholders appear) for the model call after `turns` (an
    environment's turn records; failed turns, which have no output, are skipped)."""
    first = protocols.query_text(item.task, item.question, protocol)
    done = [t for t in turns if t.get("output") is not None]
    if form_of(protocol, form) == "single_message":
        text = first + "".join(t["context"] for t in done)
        image = current_image(item, done)
        content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
        return [{"role": "user", "content": content}], [image] if image else []
    out = [{"role": "user", "content": ([{"type": "image"}] if item.image else []) + [{"type": "text", "text": first}]}]
    images = [item.image] if item.image else []
    for t in done:
        out.append({"role": "assistant", "content": [{"type": "text", "text": t["output"]}]})
        obs = t.get("observation") or {}
        content = ([{"type": "image"}] if obs.get("image") else []) + (
            [{"type": "text", "text": obs["text"]}] if obs.get("text") else [])
        out.append({"role": "user", "content": content or [{"type": "text", "text": ""}]})
        if obs.get("image"):
            images.append(Path(obs["image"]))
    return out, images


def open_image(path: Path):
    """An image as every model call sees it: decoded to RGB (the processor then applies its pixel budget)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


@dataclass
class Context:
    """One model call's input: token ids (image placeholders expanded) and the images they hold, in order."""

    ids: list[int]
    images: list[Path] = field(default_factory=list)


class Transcript:
    """Token-level rendering for one protocol and form, with the model's processor (its chat template, tokenizer
    and pixel budget). `open_image` decodes an image path for the processor (training may resize, train.image_size);
    every caller of the loop uses the same one for prompts and for the engine."""

    def __init__(self, processor, protocol: str, form: str, open_image: Callable[[Path], Any] = open_image):
        self.processor, self.protocol, self.form = processor, protocol, form_of(protocol, form)
        self.open_image = open_image
        tok = processor.tokenizer
        self.im_end = tok.convert_tokens_to_ids("<|im_end|>")

    def encode(self, messages_: list[dict], images: Sequence[Path]) -> list[int]:
        """The ids of a conversational prompt, with the generation prompt (`<|im_start|>assistant\\n`) at the end."""
        text = self.processor.apply_chat_template(messages_, tokenize=False, add_generation_prompt=True)
        return self._ids(text, images)

    def first(self, env) -> Context:
        """The input of turn 1 (after `env.reset()`)."""
        return self.render(env.item, env.turns)

    def render(self, item, turns: Sequence[dict]) -> Context:
        """The input after `turns`, rendered from the messages (what step rows and the single-message form use)."""
        msgs, images = messages(item, turns, self.protocol, self.form)
        return Context(self.encode(msgs, images), list(images))

    def next(self, env, previous: Context, generated: list[int]) -> tuple[Context, int]:
        """The input of the next turn after the model wrote `generated` on `previous` and `env` stepped, and how
        many of its tokens follow `generated` in the chat form (the observation; 0 in the single-message form, whose
        input is rendered afresh)."""
        if self.form == "single_message":
            return self.render(env.item, env.turns), 0
        obs = env.turns[-1].get("observation") or {}
        image = Path(obs["image"]) if obs.get("image") else None
        # The model's turn is closed as the chat template closes it (a turn stopped at an action tag or cut at the
        # token cap has no <|im_end|> of its own), then the observation is a user turn.
        close = "" if generated and generated[-1] == self.im_end else "<|im_end|>"
        text = (close + "\n<|im_start|>user\n" + (IMAGE_TOKENS if image else "") + (obs.get("text") or "")
                + "<|im_end|>\n<|im_start|>assistant\n")
        suffix = self._ids(text, [image] if image else [])
        return Context(previous.ids + list(generated) + suffix, previous.images + ([image] if image else [])), \
            len(suffix)

    def tokens(self, text: str) -> list[int]:
        """A model turn written as text (a scripted turn), as the model's tokens."""
        return self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text(self, ids: Sequence[int]) -> str:
        """A model turn's text, as the environment reads it (special tokens dropped)."""
        return self.processor.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _ids(self, text: str, images: Sequence[Path]) -> list[int]:
        opened = [self.open_image(p) for p in images]
        enc = self.processor(text=[text], images=opened or None, return_tensors=None)
        ids = enc["input_ids"][0]
        return list(ids.tolist() if hasattr(ids, "tolist") else ids)
