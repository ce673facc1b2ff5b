"""Throughput and memory of `safety-lens scan` on CPU.

Measures, in one run:

(a) scan throughput over a bare batched forward pass of the same model cut
    after the scanned layer, on the same prompts and batch size;
(b) scan throughput over scoring one prompt and one persona per full forward
    pass with `output_hidden_states`, measured on a subset and extrapolated;
(c) peak RSS of the `scan` command on a large input over a small one, each in
    its own subprocess.

The prompts are generated from a seeded random generator, so every run scans
the same text. The vectors are random unit directions with a fixed seed:
scoring cost does not depend on their values, and the benchmark then needs no
extraction run first.

Usage:
    python bench/scan_throughput.py                      # all three measurements
    python bench/scan_throughput.py --skip-rss           # (a) and (b) only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

WORDS = (
    "the a model user answer question plan essay code bug money job city river history science "
    "poem story friend doctor teacher school market price week year morning night idea help write "
    "explain list compare tell why how what when please honestly quickly carefully better worse "
    "risk safe unsafe true false opinion agree think believe know great bad simple hard new old"
).split()
OPENERS = ("Please", "Can you", "I wonder:", "Tell me", "Honestly,", "Quick question:", "Explain")
PERSONAS = ("sycophancy", "refusal", "deception")


def make_prompts(count: int, seed: int = 0) -> list[str]:
    """Prompts of 8 to 80 words, the same for a given seed."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 80))]
        prompts.append(f"{rng.choice(OPENERS)} {' '.join(words)}?")
    return prompts


def write_jsonl(path: Path, count: int, seed: int = 0) -> None:
    """Write `count` prompt lines with alternating labels, streaming, cycling 1,000 generated prompts."""
    prompts = make_prompts(min(count, 1000), seed)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(count):
            handle.write(json.dumps({"id": f"p{i}", "prompt": prompts[i % len(prompts)], "label": i % 2}) + "\n")


def random_vectors(hidden: int, layer: int, personas: Sequence[str] = PERSONAS) -> list[Any]:
    import torch

    from safety_lens_cli.projection import Calibration, PersonaVector

    vectors = []
    for seed, persona in enumerate(personas):
        direction = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
        calibration = Calibration(pos_mean=1.0, pos_std=1.0, neg_mean=-1.0, neg_std=1.0)
        vectors.append(PersonaVector(persona, layer, direction / direction.norm(), calibration, 1.0, 1.0))
    return vectors


def load_default_model() -> Any:
    from safety_lens_cli.models import ModelRequest, load_model

    return load_model(ModelRequest(device="cpu", dtype="float32"))


# --- (a) and (b) ---------------------------------------------------------------


def time_scan(lm: Any, vectors: Sequence[Any], path: Path, batch_size: int) -> float:
    """Seconds for the scan pipeline: read JSONL, template, tokenize, forward, score, write JSON."""
    from safety_lens_cli.gating import Thresholds
    from safety_lens_cli.inputs import read_records
    from safety_lens_cli.scan_output import JsonlWriter, result_record
    from safety_lens_cli.scanning import ScanOptions, ScoredLine, scan_records, score_columns

    columns = score_columns(lm, vectors)
    thresholds = Thresholds()
    with open(os.devnull, "w", encoding="utf-8") as sink:
        writer = JsonlWriter(sink)
        start = time.perf_counter()
        for result in scan_records(lm, columns, read_records(path), ScanOptions(batch_size=batch_size)):
            assert isinstance(result, ScoredLine), result
            writer.write(result_record(result, thresholds, columns))
        return time.perf_counter() - start


def encode_all(lm: Any, path: Path) -> list[tuple[int, ...]]:
    from safety_lens_cli.inputs import InputRecord, read_records
    from safety_lens_cli.scanning import EncodedRecord, RecordEncoder, ScanOptions

    encoder = RecordEncoder(lm, ScanOptions())
    out = []
    for record in read_records(path):
        assert isinstance(record, InputRecord)
        encoded = encoder.encode(record)
        assert isinstance(encoded, EncodedRecord)
        out.append(encoded.encoded.input_ids)
    return out


def time_bare_forward(lm: Any, sequences: Sequence[Sequence[int]], layer: int, batch_size: int) -> float:
    """Seconds for batched forward passes of the base model with its blocks cut after `layer`.

    Batches are length-sorted over the whole set (the least padding possible),
    tokenization is done beforehand, and nothing is read from the output.
    """
    import torch
    from torch import nn

    from safety_lens_cli.activations import length_sorted_batches, pad_batch
    from safety_lens_cli.hooks import model_inputs

    parent_path, _, attribute = lm.layers.path.rpartition(".")
    parent = lm.model.get_submodule(parent_path)
    blocks = getattr(parent, attribute)
    setattr(parent, attribute, nn.ModuleList(list(blocks)[: layer + 1]))
    try:
        batches = list(length_sorted_batches([len(s) for s in sequences], batch_size))
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in batches:
                ids, mask = pad_batch([sequences[i] for i in batch], lm.pad_token_id, "right", lm.device)
                parent(**model_inputs(parent, ids, mask))
        return time.perf_counter() - start
    finally:
        setattr(parent, attribute, blocks)


def time_one_by_one(lm: Any, vectors: Sequence[Any], sequences: Sequence[Sequence[int]]) -> float:
    """Seconds to score each prompt on each persona with its own full forward pass."""
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        for ids in sequences:
            for vector in vectors:
                out = lm.model(torch.tensor([list(ids)]), output_hidden_states=True)
                float(out.hidden_states[vector.layer + 1][0, -1].float() @ vector.unit)
    return time.perf_counter() - start


# --- (c) peak RSS -----------------------------------------------------------------


def rss_child(args: argparse.Namespace) -> None:
    """Run `safety-lens scan` in this process on `args.rss_input` and print the peak RSS as JSON."""
    import torch

    from safety_lens_cli.cli.app import app
    from safety_lens_cli.models import wrap_model

    torch.set_num_threads(args.threads)
    if args.rss_model == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import tiny_models

        lm = wrap_model(tiny_models.build("llama"), tiny_models.tiny_tokenizer())
        layer = 1
    else:
        lm = load_default_model()
        layer = args.layer
    vectors = random_vectors(lm.hidden_size, layer)

    import safety_lens_cli.models
    import safety_lens_cli.vector_lookup

    safety_lens_cli.models.load_model = lambda request=None: lm  # type: ignore[assignment]
    safety_lens_cli.vector_lookup.resolve_vectors = lambda lm_, request, notify=None: vectors  # type: ignore[assignment]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    command = ["scan", "--input", args.rss_input, "--output", args.rss_output, "--batch-size", str(args.batch_size)]
    for persona in PERSONAS:
        command += ["--persona", persona]
    hwm_before = _vm_hwm_kib()
    start = time.perf_counter()
    try:
        app(command)
    except SystemExit as exit:
        if exit.code not in (0, None):
            raise
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(
        json.dumps(
            {
                "maxrss_kib_before_scan": before,
                "maxrss_kib": peak,
                "vm_hwm_kib_before_scan": hwm_before,
                "vm_hwm_kib": _vm_hwm_kib(),
                "seconds": seconds,
            }
        )
    )


def _vm_hwm_kib() -> int | None:
    """Peak resident set size of this process image from /proc (Linux), in KiB.

    Unlike `getrusage`'s ru_maxrss, which Linux carries over from the parent
    across fork and exec, VmHWM starts afresh in the new process image.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def measure_rss_pair(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    small = measure_rss(args.rss_small, args, folder)
    large = measure_rss(args.rss_large, args, folder)
    small_kib = small["vm_hwm_kib"] or small["maxrss_kib"]
    large_kib = large["vm_hwm_kib"] or large["maxrss_kib"]
    return {
        "model": args.rss_model,
        "small_lines": args.rss_small,
        "large_lines": args.rss_large,
        "small": small,
        "large": large,
        "small_mb": small_kib / 1024,
        "large_mb": large_kib / 1024,
        "difference_mb": (large_kib - small_kib) / 1024,
        "maxrss_difference_mb": (large["maxrss_kib"] - small["maxrss_kib"]) / 1024,
    }


def measure_rss(lines: int, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    source = folder / f"rss-{lines}.jsonl"
    write_jsonl(source, lines)
    command = [
        sys.executable,
        __file__,
        "--rss-child",
        "--rss-input",
        str(source),
        "--rss-output",
        str(folder / f"rss-{lines}.out.jsonl"),
        "--rss-model",
        args.rss_model,
        "--layer",
        str(args.layer),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.rss_threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"RSS child for {lines} lines failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    with open(folder / f"rss-{lines}.out.jsonl", "rb") as handle:
        result["output_lines"] = sum(1 for _ in handle)
    return result


# --- main -----------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=1000, help="Prompts for (a) and (b).")
    parser.add_argument("--layer", type=int, default=15, help="Block index scanned.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="Repeats of (a) and (b); each runs all three methods, and the medians of the ratios are reported.")
    parser.add_argument("--subset", type=int, default=50, help="Prompts timed one by one for (b).")
    parser.add_argument("--threads", type=int, default=torch_threads_default(), help="torch CPU threads.")
    parser.add_argument("--skip-rss", action="store_true", help="Skip (c).")
    parser.add_argument("--rss-model", choices=("tiny", "default"), default="tiny", help="Model for (c).")
    parser.add_argument("--rss-small", type=int, default=1_000)
    parser.add_argument("--rss-large", type=int, default=100_000)
    parser.add_argument(
        "--rss-threads", type=int, default=1, help="torch CPU threads for (c); one avoids thread contention on tiny ops."
    )
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rss-input", help=argparse.SUPPRESS)
    parser.add_argument("--rss-output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args)
        return

    import torch

    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {_memory_gib():.0f} GiB, "
        f"torch {torch.__version__}, {args.threads} threads",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_average_start": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # (c) runs first, while this process is still small: Linux carries a
        # parent's peak RSS over into a child's ru_maxrss across fork and exec.
        if not args.skip_rss:
            report["rss"] = measure_rss_pair(args, folder)
        if args.prompts:
            report.update(measure_speed(args, folder))
    if "rss" in report:
        rss = report["rss"]
        print(
            f"(c) peak RSS of scan ({args.rss_model} model), VmHWM: {rss['small_mb']:.1f} MB for {args.rss_small:,} lines, "
            f"{rss['large_mb']:.1f} MB for {args.rss_large:,} lines: difference {rss['difference_mb']:+.1f} MB "
            f"(target within 100 MB); ru_maxrss difference {rss['maxrss_difference_mb']:+.1f} MB"
        )
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


def _memory_gib() -> float:
    """Total memory from /proc/meminfo, in GiB; 0 where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            return int(meminfo.readline().split()[1]) / 1024**2
    except (OSError, ValueError, IndexError):
        return 0.0


def torch_threads_default() -> int:
    return os.cpu_count() or 1


def measure_speed(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Time (a) and (b); each repeat runs all three methods back to back, so load changes hit them alike."""
    path = folder / "prompts.jsonl"
    write_jsonl(path, args.prompts)
    lm = load_default_model()
    vectors = random_vectors(lm.hidden_size, args.layer)
    sequences = encode_all(lm, path)
    tokens = sum(len(s) for s in sequences)
    step = max(1, len(sequences) // args.subset)
    subset = sequences[::step][: args.subset]

    # Warm-up: one small run of each, so one-time allocations are not timed.
    time_bare_forward(lm, sequences[: args.batch_size * 2], args.layer, args.batch_size)
    warm = folder / "warm.jsonl"
    write_jsonl(warm, args.batch_size * 2)
    time_scan(lm, vectors, warm, args.batch_size)
    time_one_by_one(lm, vectors[:1], subset[:1])

    runs = []
    for repeat in range(args.repeats):
        bare = time_bare_forward(lm, sequences, args.layer, args.batch_size)
        scanned = time_scan(lm, vectors, path, args.batch_size)
        one_by_one = time_one_by_one(lm, vectors, subset) * len(sequences) / len(subset)
        runs.append({"bare": bare, "scan": scanned, "one_by_one_extrapolated": one_by_one})
        print(
            f"repeat {repeat + 1}: scan {scanned:.1f} s, bare truncated pass {bare:.1f} s, "
            f"one prompt x persona {one_by_one:.1f} s (extrapolated); load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    ratio_bare = statistics.median(run["bare"] / run["scan"] for run in runs)
    ratio_one = statistics.median(run["one_by_one_extrapolated"] / run["scan"] for run in runs)
    scan_median = statistics.median(run["scan"] for run in runs)

    print(f"{args.prompts} prompts, {tokens} tokens, {len(vectors)} personas at layer {args.layer}, batch size {args.batch_size}")
    print(f"scan median {scan_median:.1f} s ({args.prompts / scan_median:.1f} prompts/s)")
    print(f"(a) scan / bare truncated forward throughput: {ratio_bare:.2f}x, median of {args.repeats} paired runs (target >= 0.9x)")
    print(
        f"(b) scan / one prompt and persona per pass:   {ratio_one:.1f}x, median of {args.repeats} paired runs, "
        f"one-by-one timed on {len(subset)} of {len(sequences)} prompts and extrapolated (target >= 10x)"
    )
    return {
        "prompts": args.prompts,
        "tokens": tokens,
        "layer": args.layer,
        "batch_size": args.batch_size,
        "one_by_one_subset": len(subset),
        "runs": runs,
        "ratio_vs_bare": ratio_bare,
        "ratio_vs_one_by_one": ratio_one,
    }


if __name__ == "__main__":
    main()
