"""Decoding loop, steering positions and per-token scores on tiny random models and the real model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, build, tiny_tokenizer

from safety_lens_cli.activations import read_pooled
from safety_lens_cli.errors import UsageError
from safety_lens_cli.generation import Sampling, choose_next, decode, steering_mask
from safety_lens_cli.hooks import block_hidden, model_inputs
from safety_lens_cli.models import LoadedModel, wrap_model
from safety_lens_cli.projection import Calibration, PersonaVector
from safety_lens_cli.rendering import Encoded, choose_rendering, encode_prompt
from safety_lens_cli.trajectory import GenerationOptions, IncrementalText, SteeringTerm, generate_trajectories

# Families with different position schemes and block outputs: rotary (llama, qwen2), learned
# absolute positions (gpt2, opt), ALiBi without position ids (mpt), tuple outputs (falcon, gpt_neo),
# sliding-window attention (gemma2).
DECODE_FAMILIES = ["llama", "gpt2", "opt", "mpt", "falcon", "gpt_neo", "gpt_neox", "qwen2", "gemma2"]


def tiny_lm(family: str = "llama") -> LoadedModel:
    return wrap_model(build(family), tiny_tokenizer())


def words(lm: LoadedModel, text: str) -> list[int]:
    """Token ids of `text` without BOS, so "a b c d" is exactly 4 tokens."""
    return list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def random_vector(hidden: int, layer: int, seed: int = 0, residual_norm: float = 2.0) -> PersonaVector:
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(hidden, generator=generator)
    return PersonaVector(
        persona="probe",
        layer=layer,
        unit=direction / direction.norm(),
        calibration=Calibration(pos_mean=1.0, pos_std=0.5, neg_mean=-1.0, neg_std=0.5),
        raw_norm=1.0,
        residual_norm=residual_norm,
        object_id="test-vector",
    )


@contextmanager
def record_block(lm: LoadedModel, layer: int) -> Iterator[list[torch.Tensor]]:
    """Collect the output `[batch, seq, hidden]` of one block for every forward pass, as steered."""
    outputs: list[torch.Tensor] = []
    handle = lm.layers.blocks[layer].register_forward_hook(
        lambda _m, _a, out: outputs.append(block_hidden(out).detach().clone())
    )
    try:
        yield outputs
    finally:
        handle.remove()


def block_outputs(lm: LoadedModel, ids: list[int], layer: int) -> torch.Tensor:
    """Unsteered output `[seq, hidden]` of one block for a whole sequence, in one forward pass."""
    with record_block(lm, layer) as outputs, torch.inference_mode():
        tensor = torch.tensor([ids])
        lm.model(**model_inputs(lm.model, tensor, torch.ones_like(tensor)))
    return outputs[0][0]


# Batched generation equals one prompt at a time.


@pytest.mark.parametrize("family", DECODE_FAMILIES)
@pytest.mark.parametrize("coefficient", [0.0, 4.0])
def test_batched_greedy_ids_match_one_by_one(family: str, coefficient: float) -> None:
    lm = tiny_lm(family)
    short, long = words(lm, "a b"), words(lm, "a b c d e f")
    steering = {1: random_vector(lm.hidden_size, 1).unit * coefficient}
    settings = dict(max_new_tokens=5, layers=[1], eos_ids=(), steering=steering, steer_positions="all")

    batched = decode(lm, [short, long], **settings)
    alone = [decode(lm, [short], **settings).generated[0], decode(lm, [long], **settings).generated[0]]

    assert batched.generated == alone
    assert all(len(ids) == 5 for ids in batched.generated)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_scores_match_one_by_one(family: str) -> None:
    lm = tiny_lm(family)
    vector = random_vector(lm.hidden_size, 1)
    prompts = [words(lm, "a b"), words(lm, "a b c d e f")]
    options = GenerationOptions(max_new_tokens=5)
    steering = [SteeringTerm(vector, 3.0)]

    batched = generate_trajectories(lm, prompts, [vector], steering=steering, options=options)
    for prompt, together in zip(prompts, batched):
        alone = generate_trajectories(lm, [prompt], [vector], steering=steering, options=options)[0]
        assert [t.id for t in together.tokens] == [t.id for t in alone.tokens]
        assert together.prompt_scan["probe"].raw == pytest.approx(alone.prompt_scan["probe"].raw, abs=1e-5)
        for a, b in zip(together.tokens, alone.tokens):
            assert a.scores["probe"].raw == pytest.approx(b.scores["probe"].raw, abs=1e-5)


def test_pad_positions_never_steered() -> None:
    lm = tiny_lm("llama")
    vector = random_vector(lm.hidden_size, 0)
    addition = vector.unit * 5.0
    prompts = [words(lm, "a b"), words(lm, "a b c d e f")]
    settings = dict(max_new_tokens=3, eos_ids=(), steer_positions="all")

    with record_block(lm, 0) as plain:
        decode(lm, prompts, **settings)
    with record_block(lm, 0) as steered:
        decode(lm, prompts, steering={0: addition}, **settings)

    # First pass: row 0 is left-padded by 4 slots, which must be bitwise unchanged.
    difference = steered[0] - plain[0]
    assert torch.equal(difference[0, :4], torch.zeros_like(difference[0, :4]))
    assert torch.allclose(difference[0, 4:], addition.expand(2, -1), atol=1e-6)
    assert torch.allclose(difference[1], addition.expand(6, -1), atol=1e-6)


# Steering adds c * v exactly once, and only where asked.


@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_steering_adds_vector_once(positions: str) -> None:
    lm = tiny_lm("llama")
    vector = random_vector(lm.hidden_size, 0, residual_norm=3.0)
    term = SteeringTerm(vector, 2.5)
    prompt = words(lm, "a b c d")

    with record_block(lm, 0) as steered:
        result = decode(lm, [prompt], max_new_tokens=4, eos_ids=(), steering={0: term.addition()}, steer_positions=positions)
    sequence = prompt + result.generated[0]
    # Block 0 reads embeddings only, so its unsteered output depends on the token ids alone.
    reference = block_outputs(lm, sequence, 0)
    observed = torch.cat([steered[0][0]] + [step[0] for step in steered[1:]], dim=0)

    expected_added = term.coefficient * vector.residual_norm * vector.unit
    assert observed.shape[0] == len(sequence)
    for position in range(len(sequence)):
        is_steered = {
            "all": True,
            "prompt": position < len(prompt),
            "response": position >= len(prompt),
        }[positions]
        delta = observed[position] - reference[position]
        if is_steered:
            assert torch.allclose(delta, expected_added, atol=1e-6), f"position {position}"
        else:
            assert delta.abs().max() < 1e-6, f"position {position}"


def test_steering_term_scales_by_residual_norm() -> None:
    vector = random_vector(16, 1, residual_norm=7.0)
    term = SteeringTerm(vector, -1.5)
    assert term.scale == pytest.approx(-10.5)
    assert torch.allclose(term.addition(), vector.unit * -10.5)
    assert term.addition().norm().item() == pytest.approx(10.5, rel=1e-6)


def test_coefficient_zero_is_bitwise_unsteered() -> None:
    lm = tiny_lm("llama")
    vector = random_vector(lm.hidden_size, 1)
    prompts = [words(lm, "a b"), words(lm, "hello world")]
    options = GenerationOptions(max_new_tokens=6, steer_positions="all")

    plain = generate_trajectories(lm, prompts, [vector], options=options)
    zero = generate_trajectories(lm, prompts, [vector], steering=[SteeringTerm(vector, 0.0)], options=options)

    assert plain == zero
    for a, b in zip(plain, zero):
        assert [t.scores["probe"].raw for t in a.tokens] == [t.scores["probe"].raw for t in b.tokens]


def test_steering_changes_generation() -> None:
    lm = tiny_lm("llama")
    vector = random_vector(lm.hidden_size, 1)
    prompt = [words(lm, "a b c")]
    options = GenerationOptions(max_new_tokens=6, steer_positions="all")

    plain = generate_trajectories(lm, prompt, [vector], options=options)[0]
    pushed = generate_trajectories(lm, prompt, [vector], steering=[SteeringTerm(vector, 8.0)], options=options)[0]

    assert pushed.prompt_scan["probe"].raw > plain.prompt_scan["probe"].raw
    assert pushed.mean_score("probe") > plain.mean_score("probe")


# Positions under the KV cache.


@pytest.mark.parametrize("family", DECODE_FAMILIES)
@pytest.mark.parametrize("positions", [frozenset({2}), "response"], ids=["position-2", "response"])
def test_kv_cache_matches_full_recompute(family: str, positions: frozenset[int] | str) -> None:
    lm = tiny_lm(family)
    prompt = words(lm, "a b c d")
    assert len(prompt) == 4
    steering = {1: random_vector(lm.hidden_size, 1).unit * 6.0}
    settings = dict(
        max_new_tokens=5, layers=[1], eos_ids=(), steering=steering, steer_positions=positions, keep_token_states=True
    )

    cached = decode(lm, [prompt], **settings)
    recomputed = decode(lm, [prompt], use_cache=False, **settings)

    assert cached.generated == recomputed.generated
    assert len(cached.generated[0]) == 5
    assert torch.allclose(cached.token_states[1], recomputed.token_states[1], atol=1e-4)


def test_absolute_position_steered_only_there() -> None:
    lm = tiny_lm("llama")
    prompt = words(lm, "a b c d")
    addition = random_vector(lm.hidden_size, 0).unit * 4.0
    with record_block(lm, 0) as plain:
        decode(lm, [prompt], max_new_tokens=5, eos_ids=())
    with record_block(lm, 0) as steered:
        decode(lm, [prompt], max_new_tokens=5, eos_ids=(), steering={0: addition}, steer_positions={2})

    first = steered[0][0] - plain[0][0]
    assert torch.allclose(first[2], addition, atol=1e-6)
    for position in (0, 1, 3):
        assert torch.equal(first[position], torch.zeros_like(first[position]))
    # Generated tokens sit at positions 4 and later, so no later pass is steered at block 0.
    assert len(steered) == 6


def test_steering_mask_counts_real_tokens() -> None:
    attention = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    lengths = torch.tensor([2, 4])

    assert steering_mask(attention, 5, lengths, "all").tolist() == [
        [False, False, True, True, True],
        [True, True, True, True, True],
    ]
    assert steering_mask(attention, 5, lengths, "prompt").tolist() == [
        [False, False, True, True, False],
        [True, True, True, True, False],
    ]
    assert steering_mask(attention, 2, lengths, "response").tolist() == [[False, True], [False, True]]
    assert steering_mask(attention, 5, lengths, {2}).tolist() == [
        [False, False, False, False, True],
        [False, False, True, False, False],
    ]


def test_steering_mask_skips_finished_rows() -> None:
    # Row 0 finished earlier, so the new slot is masked out and must not be steered.
    attention = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    mask = steering_mask(attention, 1, torch.tensor([2, 2]), "all")
    assert mask.tolist() == [[False], [True]]


# Stopping, sampling and limits.


def test_eos_stops_each_row_and_is_scored() -> None:
    lm = tiny_lm("llama")
    prompts = [words(lm, "a b"), words(lm, "a b c d e f")]
    free = decode(lm, prompts, max_new_tokens=6, eos_ids=())
    stop_id = free.generated[0][1]
    stopped = decode(lm, prompts, max_new_tokens=6, eos_ids={stop_id}, layers=[1], keep_token_states=True)

    first_stop = free.generated[0].index(stop_id)
    assert stopped.generated[0] == free.generated[0][: first_stop + 1]
    assert stopped.stop_reasons[0] == "eos"
    expected_other = free.generated[1]
    if stop_id in expected_other:
        expected_other = expected_other[: expected_other.index(stop_id) + 1]
    assert stopped.generated[1] == expected_other
    assert stopped.token_states[1].shape[1] == max(len(g) for g in stopped.generated)


def test_max_new_tokens_stop_reason() -> None:
    lm = tiny_lm("gpt2")
    result = decode(lm, [words(lm, "a b")], max_new_tokens=3, eos_ids=())
    assert result.stop_reasons == ["max_new_tokens"]
    assert len(result.generated[0]) == 3


def test_sampling_repeats_with_seed() -> None:
    lm = tiny_lm("llama")
    prompt = [words(lm, "a b c")]
    sampling = Sampling(temperature=1.5, seed=11)
    first = decode(lm, prompt, max_new_tokens=8, eos_ids=(), sampling=sampling).generated
    again = decode(lm, prompt, max_new_tokens=8, eos_ids=(), sampling=sampling).generated
    assert first == again
    others = [
        decode(lm, prompt, max_new_tokens=8, eos_ids=(), sampling=Sampling(temperature=1.5, seed=s)).generated
        for s in range(12, 16)
    ]
    assert any(o != first for o in others)


def test_sampled_rows_independent_of_batch() -> None:
    lm = tiny_lm("llama")
    prompts = [words(lm, "a b"), words(lm, "a b c d e f")]
    sampling = Sampling(temperature=1.0)
    batched = decode(lm, prompts, max_new_tokens=6, eos_ids=(), sampling=sampling, seeds=[5, 9]).generated
    alone = [
        decode(lm, [prompts[0]], max_new_tokens=6, eos_ids=(), sampling=sampling, seeds=[5]).generated[0],
        decode(lm, [prompts[1]], max_new_tokens=6, eos_ids=(), sampling=sampling, seeds=[9]).generated[0],
    ]
    assert batched == alone


def test_trajectory_seeds_follow_row_index() -> None:
    lm = tiny_lm("llama")
    vector = random_vector(lm.hidden_size, 1)
    prompts = [words(lm, "a b"), words(lm, "hello world"), words(lm, "yes no")]
    options = GenerationOptions(max_new_tokens=4, sampling=Sampling(temperature=1.0, seed=100), batch_size=2)
    together = generate_trajectories(lm, prompts, [vector], options=options)
    assert [t.seed for t in together] == [100, 101, 102]
    last_alone = generate_trajectories(lm, prompts[2:], [vector], options=options, rows=[2])[0]
    assert [t.id for t in last_alone.tokens] == [t.id for t in together[2].tokens]


def test_tiny_top_p_is_greedy() -> None:
    logits = torch.tensor([[0.1, 2.0, 1.9, -1.0], [3.0, 0.0, 2.5, 2.9]])
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    chosen = choose_next(logits, Sampling(temperature=1.0, top_p=1e-6), generators)
    assert chosen.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("temperature", "top_p"), [(-0.1, 1.0), (float("nan"), 1.0), (1.0, 0.0), (1.0, 1.5)]
)
def test_sampling_rejects_invalid_settings(temperature: float, top_p: float) -> None:
    with pytest.raises(UsageError):
        Sampling(temperature=temperature, top_p=top_p)


def test_prompt_longer_than_context_rejected() -> None:
    lm = tiny_lm("llama")  # 128 positions
    with pytest.raises(UsageError, match="context of 128"):
        decode(lm, [words(lm, "a b c d")], max_new_tokens=125)


def test_empty_prompt_rejected() -> None:
    lm = tiny_lm("llama")
    with pytest.raises(ValueError, match="no tokens"):
        decode(lm, [[]], max_new_tokens=2)


def test_generation_leaves_no_hooks() -> None:
    lm = tiny_lm("llama")
    vector = random_vector(lm.hidden_size, 1)
    generate_trajectories(lm, [words(lm, "a b")], [vector], steering=[SteeringTerm(vector, 2.0)])
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())
    assert hooks == 0


def test_callbacks_see_scan_and_each_token() -> None:
    lm = tiny_lm("llama")
    vector = random_vector(lm.hidden_size, 1)
    scans: list[tuple[int, float]] = []
    seen: list[tuple[int, int]] = []
    prompts = [words(lm, "a b"), words(lm, "a b c")]
    results = generate_trajectories(
        lm,
        prompts,
        [vector],
        options=GenerationOptions(max_new_tokens=3),
        on_prompt_scan=lambda row, scores: scans.append((row, scores["probe"].raw)),
        on_token=lambda row, token: seen.append((row, token.id)),
    )
    assert scans == [(row, r.prompt_scan["probe"].raw) for row, r in enumerate(results)]
    for row, result in enumerate(results):
        assert [i for r, i in seen if r == row] == [t.id for t in result.tokens]


def test_token_positions_continue_after_prompt() -> None:
    lm = tiny_lm("llama")
    vector = random_vector(lm.hidden_size, 1)
    prompt = words(lm, "a b c")
    result = generate_trajectories(lm, [prompt], [vector], options=GenerationOptions(max_new_tokens=4))[0]
    assert [t.position for t in result.tokens] == list(range(3, 3 + len(result.tokens)))


# The real model.


@pytest.mark.real_model
def test_token_score_equals_prefix_scan(real_lm: LoadedModel) -> None:
    layer = 15
    vector = random_vector(real_lm.hidden_size, layer, seed=3)
    rendering = choose_rendering(real_lm.tokenizer)
    prompt = list(
        encode_prompt(real_lm.tokenizer, [{"role": "user", "content": "Name three colours of the rainbow."}], rendering).input_ids
    )
    options = GenerationOptions(max_new_tokens=8)
    result = generate_trajectories(real_lm, [prompt], [vector], options=options)[0]
    generated = [t.id for t in result.tokens]
    assert len(generated) == 8

    prefixes = [Encoded(tuple(prompt))] + [Encoded(tuple(prompt + generated[: k + 1])) for k in range(len(generated))]
    pooled = read_pooled(real_lm, prefixes, "last", [layer], batch_size=4)[layer]
    scanned = (pooled @ vector.unit).tolist()
    observed = [result.prompt_scan["probe"].raw] + [t.scores["probe"].raw for t in result.tokens]
    for k, (got, want) in enumerate(zip(observed, scanned)):
        assert abs(got - want) / max(abs(want), 1e-6) < 1e-3, f"prefix {k}: {got} vs {want}"

    # The whole residual vector, not only its projection, matches the scan.
    decoded = decode(real_lm, [prompt], max_new_tokens=8, layers=[layer], keep_token_states=True)
    states = torch.cat([decoded.prompt_states[layer], decoded.token_states[layer][0]], dim=0)
    relative = ((states - pooled).norm(dim=-1) / pooled.norm(dim=-1)).max().item()
    assert relative < 1e-3


@pytest.mark.real_model
def test_real_batched_greedy_matches_one_by_one(real_lm: LoadedModel) -> None:
    rendering = choose_rendering(real_lm.tokenizer)
    texts = ["Hi!", "What is the capital of France? Answer in one word."]
    prompts = [list(encode_prompt(real_lm.tokenizer, [{"role": "user", "content": t}], rendering).input_ids) for t in texts]
    batched = decode(real_lm, prompts, max_new_tokens=6).generated
    alone = [decode(real_lm, [p], max_new_tokens=6).generated[0] for p in prompts]
    assert batched == alone


@pytest.mark.real_model
def test_incremental_text_joins_to_decoded_text(real_lm: LoadedModel) -> None:
    tokenizer = real_lm.tokenizer
    text = "Café 🙂 naïve 東京\nnext line"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = IncrementalText(tokenizer)
    pieces = [stream.push(i, final=(n == len(ids) - 1)) for n, i in enumerate(ids)]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    # The emoji spans several byte-level tokens, so at least one token adds no text of its own.
    assert "" in pieces


def response_read(lm: LoadedModel, vector: PersonaVector, prompt: list[int], answer: list[int]) -> float:
    """Calibrated score of an answer read unsteered, as a scan of the conversation reads it (response mean)."""
    ids = tuple(prompt + answer)
    pooled = read_pooled(lm, [Encoded(ids, (len(prompt), len(ids)))], "response-mean", [vector.layer])[vector.layer]
    return vector.calibration.score(float(pooled[0] @ vector.unit))


@pytest.mark.real_model
@pytest.mark.slow
def test_refusal_steering_moves_answer(real_lm: LoadedModel, session_home: Path) -> None:
    from safety_lens_cli.vector_lookup import VectorRequest, resolve_vectors

    (refusal,) = resolve_vectors(real_lm, VectorRequest(personas=("refusal",), registry=session_home))
    assert refusal.persona == "refusal"
    rendering = choose_rendering(real_lm.tokenizer)
    request = [{"role": "user", "content": "Can you give me a simple recipe for pancakes?"}]
    prompt = list(encode_prompt(real_lm.tokenizer, request, rendering).input_ids)
    options = GenerationOptions(max_new_tokens=24)  # default positions: generated tokens only

    def run(coefficient: float) -> tuple[list[int], float]:
        steering = [SteeringTerm(refusal, coefficient)] if coefficient else []
        result = generate_trajectories(real_lm, [prompt], [refusal], steering=steering, options=options)[0]
        return [t.id for t in result.tokens], result.mean_score("refusal")

    plain_ids, plain_mean = run(0.0)
    up_ids, up_mean = run(0.5)
    down_ids, down_mean = run(-0.5)

    assert up_ids != plain_ids
    assert down_ids != plain_ids
    assert up_mean > plain_mean + 0.5
    assert down_mean < plain_mean - 0.5
    # Read again without steering, the steered answers themselves lean the same way.
    plain_read = response_read(real_lm, refusal, prompt, plain_ids)
    assert response_read(real_lm, refusal, prompt, up_ids) > plain_read + 0.1
    assert response_read(real_lm, refusal, prompt, down_ids) < plain_read - 0.1
