"""Chat-template rendering: one BOS, response spans, plain fallback."""

from __future__ import annotations

from tiny_models import tiny_tokenizer

from safety_lens_cli.rendering import choose_rendering, encode_conversation, encode_prompt

MESSAGES = [{"role": "user", "content": "hello world"}]
CONVERSATION = [*MESSAGES, {"role": "assistant", "content": "yes i agree"}]


def test_template_starting_with_bos_gives_one_bos() -> None:
    tokenizer = tiny_tokenizer()
    rendering = choose_rendering(tokenizer)
    assert rendering.kind == "chat-template"
    encoded = encode_prompt(tokenizer, MESSAGES, rendering)
    expected = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert list(encoded.input_ids) == list(expected)
    assert encoded.input_ids.count(tokenizer.bos_token_id) == 1
    # The fault being guarded against: rendered text tokenized with special tokens.
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert tokenizer(text)["input_ids"][:2] == [tokenizer.bos_token_id] * 2


def test_response_span_covers_assistant_content() -> None:
    tokenizer = tiny_tokenizer()
    encoded = encode_conversation(tokenizer, CONVERSATION, choose_rendering(tokenizer))
    assert encoded.response_span is not None
    start, end = encoded.response_span
    assert tokenizer.convert_ids_to_tokens(list(encoded.input_ids[start:end])) == ["yes", "i", "agree"]
    expected = tokenizer.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    assert list(encoded.input_ids) == list(expected)


def test_plain_layout_without_template() -> None:
    tokenizer = tiny_tokenizer(chat_template=False)
    rendering = choose_rendering(tokenizer)
    assert rendering.kind == "plain"
    assert rendering.template_sha256 is None
    encoded = encode_conversation(tokenizer, CONVERSATION, rendering)
    start, end = encoded.response_span  # type: ignore[misc]
    assert tokenizer.convert_ids_to_tokens(list(encoded.input_ids[start:end])) == ["yes", "i", "agree"]
    assert encoded.input_ids[0] == tokenizer.bos_token_id
    assert encoded.input_ids.count(tokenizer.bos_token_id) == 1


def test_template_hash_changes_with_template() -> None:
    first = tiny_tokenizer()
    second = tiny_tokenizer()
    second.chat_template = first.chat_template + " "
    assert choose_rendering(first).template_sha256 != choose_rendering(second).template_sha256


def test_real_model_prompt_matches_apply_chat_template(real_lm) -> None:  # type: ignore[no-untyped-def]
    tokenizer = real_lm.tokenizer
    rendering = choose_rendering(tokenizer)
    encoded = encode_prompt(tokenizer, MESSAGES, rendering)
    expected = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert list(encoded.input_ids) == list(expected)
    conversation = encode_conversation(tokenizer, CONVERSATION, rendering)
    start, end = conversation.response_span  # type: ignore[misc]
    assert tokenizer.decode(list(conversation.input_ids[start:end])).strip() == "yes i agree"
