import pytest

from arft_core.model.tokenizer import FULL_VOCAB_SIZE, PRETOKENIZE_REGEX, SPECIAL_TOKENS, build_qwen_tokenizer, qwen_ranks

SAMPLES = [
    "Hello world!", "从图中提取: 发票号码, 发票代码", "  leading spaces\n\nand\ttabs  ",
    "What is the serving size of the beverage? 1 Can (473ml)", "<think> x </think>\n<answer> A </answer>",
    "naïve café — “quotes” 😀 日本語テキスト", "def f(x):\n    return x**2  # comment\n", "I'LL we've 12345 3.14159",
    "Recognize the text within the [366, 723, 506, 851] of the image.", "\r\n\r\n   \u00a0 x",
]


@pytest.fixture(scope="module")
def full():
    return build_qwen_tokenizer()


def test_matches_tiktoken_reference(full):
    tiktoken = pytest.importorskip("tiktoken")
    ref = tiktoken.Encoding("qwen", pat_str=PRETOKENIZE_REGEX, mergeable_ranks=qwen_ranks(), special_tokens={})
    for text in SAMPLES:
        ours = full.encode(text, add_special_tokens=False)
        assert ours == ref.encode_ordinary(text), text
        assert full.decode(ours) == text


def test_special_tokens_have_real_ids(full):
    assert len(full) == FULL_VOCAB_SIZE + len(SPECIAL_TOKENS)
    assert full.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert full.convert_tokens_to_ids("<|im_end|>") == 151645
    assert full.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert full.encode("<|vision_start|><|image_pad|><|vision_end|>", add_special_tokens=False) == [151652, 151655, 151653]


def test_truncated_vocabulary_is_a_valid_prefix(full):
    small = build_qwen_tokenizer(1024)
    assert len(small) == 1024 + len(SPECIAL_TOKENS)
    for text in SAMPLES:
        ids = small.encode(text, add_special_tokens=False)
        assert max(ids) < 1024 and small.decode(ids) == text
        # Kept tokens keep their real ids.
        assert small.convert_ids_to_tokens(ids) == full.convert_ids_to_tokens(ids)


def test_chat_template_places_image_before_text(full):
    text = full.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                    tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def test_rejects_bad_vocab_size():
    with pytest.raises(ValueError, match="vocab_size"):
        build_qwen_tokenizer(10)
