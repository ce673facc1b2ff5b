"""Turn prompts and conversations into token ids, the way the model sees them.

With a chat template the conversation is rendered to text by the template and
tokenized without adding special tokens, because the rendered text already
holds the BOS and role markers; adding them again would double the BOS. The
ids equal `apply_chat_template(..., tokenize=True)`. Without a template, a
plain `User:` / `Assistant:` layout is tokenized with the tokenizer's usual
special tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from safety_lens_cli.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

RenderingKind = Literal["chat-template", "plain", "raw"]
Message = Mapping[str, str]
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Rendering:
    """Layout of stimuli before tokenization, recorded with each vector."""

    kind: RenderingKind
    template_sha256: str | None = None

    def as_metadata(self) -> dict[str, str | None]:
        return {"kind": self.kind, "template_sha256": self.template_sha256}


@dataclass(frozen=True)
class Encoded:
    """Token ids of one text, with the token span of the assistant response if any.

    `response_span` is `(start, end)`, end excluded, over `input_ids`.
    """

    input_ids: tuple[int, ...]
    response_span: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def choose_rendering(tokenizer: PreTrainedTokenizerBase, raw: bool = False) -> Rendering:
    """Chat template when the tokenizer has one (unless `raw`), else the plain layout."""
    if raw:
        return Rendering("raw")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: "default" is what apply_chat_template uses
        template = template.get("default")
    if isinstance(template, str) and template.strip():
        return Rendering("chat-template", hashlib.sha256(template.encode()).hexdigest())
    return Rendering("plain")


def validate_messages(messages: Sequence[Message], where: str = "messages") -> list[dict[str, str]]:
    """Check chat turns (`role`, `content`) and return plain dicts."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise InputError(f"{where}: expected a non-empty list of {{'role', 'content'}} objects.")
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(f"{where}[{i}]: expected an object with 'role' and 'content'.")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InputError(f"{where}[{i}].role: expected one of {', '.join(ROLES)}, got {role!r}.")
        if not isinstance(content, str):
            raise InputError(f"{where}[{i}].content: expected a string, got {type(content).__name__}.")
        out.append({"role": str(role), "content": content})
    return out


def _plain_layout(messages: Sequence[Message], add_generation_prompt: bool) -> str:
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    text = "\n".join(f"{names[m['role']]}: {m['content']}" for m in messages)
    if add_generation_prompt:
        text += "\nAssistant:"
    return text


def render_text(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    rendering: Rendering,
    *,
    add_generation_prompt: bool,
) -> str:
    if rendering.kind == "chat-template":
        return str(
            tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
            )
        )
    if rendering.kind == "raw":
        return "\n".join(m["content"] for m in messages)
    return _plain_layout(messages, add_generation_prompt)


def _tokenize(tokenizer: PreTrainedTokenizerBase, text: str, rendering: Rendering) -> list[int]:
    add_special = rendering.kind != "chat-template"
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> Encoded:
    """Encode plain text with the tokenizer's usual special tokens, without template or response span."""
    return Encoded(tuple(tokenizer(text, add_special_tokens=True)["input_ids"]))


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], rendering: Rendering
) -> Encoded:
    """Messages followed by the generation prompt: what the model sees before it answers."""
    if rendering.kind == "raw":
        return encode_text(tokenizer, "\n".join(m["content"] for m in messages))
    text = render_text(tokenizer, messages, rendering, add_generation_prompt=True)
    return Encoded(tuple(_tokenize(tokenizer, text, rendering)))


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], rendering: Rendering
) -> Encoded:
    """Messages ending with an assistant turn, with the token span of that turn's content."""
    if not messages or messages[-1]["role"] != "assistant":
        raise InputError("A conversation to read at its response must end with an assistant turn.")
    response = messages[-1]["content"]
    if rendering.kind == "raw":
        context = "\n".join(m["content"] for m in messages[:-1])
        prefix = context + "\n" if context else ""
        full = prefix + response
        return _encode_with_span(tokenizer, full, len(prefix), len(full), Rendering("plain"))

    full = render_text(tokenizer, messages, rendering, add_generation_prompt=False)
    prefix = render_text(tokenizer, messages[:-1], rendering, add_generation_prompt=True)
    # Templates may strip the content, so search for the stripped text after the prefix.
    needle = response.strip()
    start_search = len(prefix) if full.startswith(prefix) else 0
    start = full.find(needle, start_search) if needle else -1
    if start < 0:
        raise InputError(
            "The chat template dropped or rewrote the assistant response, so its tokens cannot be "
            "located: pass --raw or --position last."
        )
    return _encode_with_span(tokenizer, full, start, start + len(needle), rendering)


def _encode_with_span(
    tokenizer: PreTrainedTokenizerBase, text: str, char_start: int, char_end: int, rendering: Rendering
) -> Encoded:
    add_special = rendering.kind != "chat-template"
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        token_indices = [
            i
            for i, (a, b) in enumerate(enc["offset_mapping"])
            if b > a and a < char_end and b > char_start
        ]
        if token_indices:
            return Encoded(tuple(ids), (token_indices[0], token_indices[-1] + 1))
    # Slow tokenizers have no offsets: count the tokens of the text up to each end.
    ids = _tokenize(tokenizer, text, rendering)
    start = len(_tokenize(tokenizer, text[:char_start], rendering))
    end = len(_tokenize(tokenizer, text[:char_end], rendering))
    if end <= start:
        raise InputError("The assistant response is empty after tokenization.")
    return Encoded(tuple(ids), (min(start, len(ids) - 1), min(end, len(ids))))
