"""`WhiteBoxWrapper`: generate an answer and scan the prompt on persona vectors in one call.

Decoding is `trajectory.generate_trajectories` (the KV-cache loop of
`generation.decode`), which is what `safety-lens generate` runs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from safety_lens_cli.api_inputs import check_layer, eval_mode
from safety_lens_cli.api_lens import SafetyLens
from safety_lens_cli.errors import UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class WhiteBoxWrapper:
    """A model that answers prompts and reports how its activations score on persona vectors."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        layer_idx: int | None = None,
        *,
        registry: str | os.PathLike[str] | None = None,
        batch_size: int = 16,
        layers_path: str | None = None,
    ) -> None:
        """Wrap a model and tokenizer. With `layer_idx=None`, each persona is read at its auto layer.

        The other options are those of `SafetyLens`.
        """
        lens = SafetyLens(model, tokenizer, registry=registry, batch_size=batch_size, layers_path=layers_path)
        self._setup(lens, layer_idx)

    @classmethod
    def from_lens(cls, lens: SafetyLens, layer_idx: int | None = None) -> WhiteBoxWrapper:
        """Wrap the model of an existing `SafetyLens`, sharing its resolved vectors."""
        wrapper = cls.__new__(cls)
        wrapper._setup(lens, layer_idx)
        return wrapper

    def _setup(self, lens: SafetyLens, layer_idx: int | None) -> None:
        self.lens = lens
        self.layer_idx = None if layer_idx is None else check_layer(layer_idx, lens.num_layers)

    def scan_and_generate(
        self,
        prompt: str,
        persona_names: Sequence[str] | None = None,
        max_new_tokens: int = 50,
    ) -> dict[str, Any]:
        """Generate a greedy answer to `prompt` and scan the prompt on persona vectors.

        The prompt is one user turn rendered with the chat template. Returns
        a dict of plain values:

        - `text`: the generated answer, without special tokens;
        - `scan`: `{persona: calibrated score}` at the last prompt token, the
          same value `SafetyLens.quick_scan(prompt)` gives;
        - `raw`: `{persona: raw projection}` at the same token;
        - `layers`: `{persona: layer read}`;
        - `token_scores`: `{persona: [calibrated score per generated token]}`;
        - `stop_reason`: "eos" or "max_new_tokens".

        `persona_names` defaults to sycophancy, deception and refusal.
        """
        from safety_lens_cli.rendering import choose_rendering, encode_prompt
        from safety_lens_cli.trajectory import GenerationOptions, generate_trajectories

        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError("prompt must be a non-empty string.")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise UsageError(f"Invalid max_new_tokens {max_new_tokens!r}: use a positive int.")
        lm = self.lens._lm
        vectors = self.lens._persona_vectors(persona_names, self.layer_idx)
        messages = [{"role": "user", "content": prompt}]
        ids = list(encode_prompt(lm.tokenizer, messages, choose_rendering(lm.tokenizer)).input_ids)
        with eval_mode(lm.model):
            trajectory = generate_trajectories(lm, [ids], vectors, options=GenerationOptions(max_new_tokens=max_new_tokens))[0]

        keys = list(trajectory.prompt_scan)
        return {
            "text": trajectory.text,
            "scan": {key: float(trajectory.prompt_scan[key].score) for key in keys},
            "raw": {key: float(trajectory.prompt_scan[key].raw) for key in keys},
            "layers": {key: int(trajectory.prompt_scan[key].layer) for key in keys},
            "token_scores": {key: [float(token.scores[key].score) for token in trajectory.tokens] for key in keys},
            "stop_reason": str(trajectory.stop_reason),
        }
