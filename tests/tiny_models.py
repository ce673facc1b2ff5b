"""Tiny randomly initialised models for every supported family, built from config classes.

Nothing here touches the Hugging Face Hub. Each builder seeds torch, so the
same family always gives the same weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as tf

VOCAB = 64
HIDDEN = 16


def _llama_like(cls: type, **extra: object) -> object:
    return cls(
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        **extra,
    )


def _gemma3_multimodal() -> object:
    text = dict(
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=VOCAB,
        sliding_window=4,
        max_position_embeddings=128,
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    return tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)


# family -> (config factory, expected block path)
CONFIGS: dict[str, tuple[Callable[[], object], str]] = {
    "gpt2": (
        lambda: tf.GPT2Config(
            n_layer=3, n_head=2, n_embd=HIDDEN, n_positions=128, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2
        ),
        "transformer.h",
    ),
    "gptj": (
        lambda: tf.GPTJConfig(n_layer=3, n_head=2, n_embd=HIDDEN, rotary_dim=4, n_positions=128, vocab_size=VOCAB),
        "transformer.h",
    ),
    "gpt_neo": (
        lambda: tf.GPTNeoConfig(
            num_layers=3,
            attention_types=[[["global", "local"], 1], [["global"], 1]],
            num_heads=2,
            hidden_size=HIDDEN,
            max_position_embeddings=128,
            vocab_size=VOCAB,
            window_size=4,
        ),
        "transformer.h",
    ),
    "gpt_neox": (
        lambda: tf.GPTNeoXConfig(
            num_hidden_layers=3,
            num_attention_heads=2,
            hidden_size=HIDDEN,
            intermediate_size=32,
            vocab_size=VOCAB,
            max_position_embeddings=128,
        ),
        "gpt_neox.layers",
    ),
    "opt": (
        lambda: tf.OPTConfig(
            num_hidden_layers=3,
            num_attention_heads=2,
            hidden_size=HIDDEN,
            ffn_dim=32,
            word_embed_proj_dim=HIDDEN,
            vocab_size=VOCAB,
            max_position_embeddings=128,
        ),
        "model.decoder.layers",
    ),
    "mpt": (
        lambda: tf.MptConfig(n_layers=3, n_heads=2, d_model=HIDDEN, vocab_size=VOCAB, max_seq_len=128),
        "transformer.blocks",
    ),
    "bloom": (lambda: tf.BloomConfig(n_layer=3, n_head=2, hidden_size=HIDDEN, vocab_size=VOCAB), "transformer.h"),
    "falcon": (
        lambda: tf.FalconConfig(
            num_hidden_layers=3, num_attention_heads=2, hidden_size=HIDDEN, vocab_size=VOCAB, new_decoder_architecture=False
        ),
        "transformer.h",
    ),
    "llama": (lambda: _llama_like(tf.LlamaConfig), "model.layers"),
    "mistral": (lambda: _llama_like(tf.MistralConfig), "model.layers"),
    "qwen2": (lambda: _llama_like(tf.Qwen2Config), "model.layers"),
    "qwen3": (lambda: _llama_like(tf.Qwen3Config, head_dim=8), "model.layers"),
    "phi3": (lambda: _llama_like(tf.Phi3Config, pad_token_id=0, bos_token_id=1, eos_token_id=2), "model.layers"),
    "gemma": (lambda: _llama_like(tf.GemmaConfig, head_dim=8), "model.layers"),
    "gemma2": (lambda: _llama_like(tf.Gemma2Config, head_dim=8, sliding_window=4), "model.layers"),
    "gemma3_text": (lambda: _llama_like(tf.Gemma3TextConfig, head_dim=8, sliding_window=4), "model.layers"),
    "gemma3": (_gemma3_multimodal, "model.language_model.layers"),
}

# Final norm applied after the last block, so hidden_states[-1] = norm(last block output).
FINAL_NORMS: dict[str, str] = {
    "gpt2": "transformer.ln_f",
    "gptj": "transformer.ln_f",
    "gpt_neo": "transformer.ln_f",
    "gpt_neox": "gpt_neox.final_layer_norm",
    "opt": "model.decoder.final_layer_norm",
    "mpt": "transformer.norm_f",
    "bloom": "transformer.ln_f",
    "falcon": "transformer.ln_f",
    "gemma3": "model.language_model.norm",
}

FAMILIES = sorted(CONFIGS)


def build(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of `family` in float32 eval mode."""
    factory, _ = CONFIGS[family]
    config = factory()
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model


def expected_path(family: str) -> str:
    return CONFIGS[family][1]


def final_norm(model: torch.nn.Module, family: str) -> torch.nn.Module:
    return model.get_submodule(FINAL_NORMS.get(family, "model.norm"))


WORDS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [
    "hello", "world", "yes", "no", "sure", "sorry", "agree", "wrong", "right", "great", "idea", "help",
    "cannot", "will", "the", "is", "you", "i", "it", "not", ".", ",", "?", "!",
]
# A template that starts with the BOS token, as Llama-3 and Gemma templates do.
BOS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_tokenizer(chat_template: bool = True, pad_token: bool = False) -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer with ids below VOCAB, built without any download.

    Ids: 0 unk, 1 bos, 2 eos, 3 pad, 4-7 role markers, then `WORDS`.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    assert len(vocab) <= VOCAB
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=specials[4:],
    )
    if pad_token:
        tokenizer.pad_token = "<pad>"
    if chat_template:
        tokenizer.chat_template = BOS_TEMPLATE
    return tokenizer
