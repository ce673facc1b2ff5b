"""The HTML report: escaping, colour scale, charts, and the page as headless Chromium renders it."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import build, tiny_tokenizer

from safety_lens_cli.errors import UsageError
from safety_lens_cli.models import wrap_model
from safety_lens_cli.projection import Calibration, PersonaVector
from safety_lens_cli.report import COLOR_STOPS, line_chart, render_report, score_rgb, write_report
from safety_lens_cli.scanning import score_columns
from safety_lens_cli.trajectory import GenerationOptions, SteeringTerm, generate_trajectories, trajectory_document

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class ElementCounter(HTMLParser):
    """Counts elements by tag and by `tag.class`, and collects `title` attributes of token spans."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.token_titles: list[str] = []
        self.tokens_per_heatmap: list[int] = []
        self.external: list[str] = []
        self._in_heatmap = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.counts[tag] += 1
        for name in (attributes.get("class") or "").split():
            self.counts[f"{tag}.{name}"] += 1
        for name in ("src", "href"):
            if attributes.get(name):
                self.external.append(f"{tag} {name}={attributes[name]}")
        if tag == "div" and "heatmap" in (attributes.get("class") or ""):
            self.tokens_per_heatmap.append(0)
        if tag == "span" and "tok" in (attributes.get("class") or "").split():
            self.tokens_per_heatmap[-1] += 1
            self.token_titles.append(attributes.get("title") or "")


def parse(page: str) -> ElementCounter:
    counter = ElementCounter()
    counter.feed(page)
    return counter


def token(text: str, scores: dict[str, tuple[float | None, float | None]], special: bool = False) -> dict[str, Any]:
    return {
        "token": text,
        "id": 7,
        "position": 3,
        "special": special,
        "scores": {key: {"raw": raw, "score": score} for key, (raw, score) in scores.items()},
    }


def sample_document() -> dict[str, Any]:
    """A generation object as `safety-lens generate --json` prints it, with text that needs escaping."""
    tokens = [
        token("<script>alert(1)</script>", {"refusal": (1.0, 0.1), "sycophancy": (-2.0, -0.3)}),
        token(" & \"quoted\" 'single'", {"refusal": (4.0, 0.9), "sycophancy": (0.5, 0.55)}),
        token("\n", {"refusal": (2.0, 0.5), "sycophancy": (None, None)}),
        token("", {"refusal": (3.0, 1.7), "sycophancy": (0.1, 0.2)}),
        token("<|im_end|>", {"refusal": (0.0, 0.0), "sycophancy": (0.2, 0.3)}, special=True),
    ]
    return {
        "prompt": {
            "messages": [
                {"role": "system", "content": "Be <b>brief</b>."},
                {"role": "user", "content": "Is 2 < 3 & 5 > 4?"},
            ],
            "text": "<|im_start|>user\nIs 2 < 3 & 5 > 4?<|im_end|>",
            "tokens": 12,
        },
        "text": "<script>alert(1)</script> & \"quoted\" 'single'\n",
        "stop_reason": "eos",
        "prompt_scan": {
            "refusal": {"raw": 1.5, "score": 0.2, "layer": 3},
            "sycophancy": {"raw": 9.0, "score": 0.8, "layer": 2},
        },
        "tokens": tokens,
        "threshold": 0.5,
        "model": {
            "model_id": "tiny <model>",
            "fingerprint": "sha256:abc",
            "architecture": "Llama",
            "dtype": "float32",
            "device": "cpu",
        },
        "vectors": [
            {"key": "refusal", "persona": "refusal", "layer": 3, "object_id": "obj-refusal"},
            {"key": "sycophancy", "persona": "sycophancy", "layer": 2, "object_id": None},
        ],
        "steering": [
            {"persona": "refusal", "coefficient": 0.4, "layer": 3, "scale": 12.0, "residual_norm": 30.0,
             "object_id": "obj-refusal", "positions": "response"}
        ],
        "sampling": {"temperature": 0.0, "top_p": 1.0, "seed": None, "max_new_tokens": 5},
    }


def test_report_escapes_all_text() -> None:
    page = render_report([sample_document()])
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>brief</b>" not in page
    assert "Be &lt;b&gt;brief&lt;/b&gt;." in page
    assert "tiny &lt;model&gt;" in page
    assert "&amp; &quot;quoted&quot; &#x27;single&#x27;" in page


def test_report_is_self_contained() -> None:
    page = render_report([sample_document()])
    counter = parse(page)
    assert counter.counts["script"] == 0
    assert counter.counts["link"] == 0
    assert counter.counts["img"] == 0
    assert counter.external == []
    assert "@import" not in page
    assert "url(" not in page
    # The only URL is the SVG namespace, which browsers never fetch.
    assert page.count("http") == page.count("http://www.w3.org/2000/svg")


def test_report_has_heatmap_and_chart_per_persona() -> None:
    document = sample_document()
    counter = parse(render_report([document]))
    assert counter.tokens_per_heatmap == [5, 5]
    assert counter.counts["svg.chart"] == 2
    assert counter.counts["line.threshold"] == 2
    assert counter.counts["line.ref"] == 4
    # sycophancy has a null score, which is left out of its chart.
    assert counter.counts["circle.point"] == 5 + 4
    assert counter.counts["span.flag"] == 3 + 1


def test_token_titles_show_raw_and_score() -> None:
    counter = parse(render_report([sample_document()]))
    first = counter.token_titles[0]
    assert "raw 1.000" in first
    assert "score 0.100" in first
    assert "flagged" in counter.token_titles[1]
    assert "raw n/a" in counter.token_titles[5 + 2]


def test_report_shows_run_details() -> None:
    page = render_report([sample_document()])
    for text in ("sha256:abc", "obj-refusal", "response", "12.00", "0.40", "eos", "greedy"):
        assert text in page, text


def test_report_numbers_several_generations() -> None:
    first = sample_document()
    second = {**sample_document(), "id": "line-7"}
    page = render_report([first, second])
    assert 'id="generation-1"' in page
    assert 'id="generation-2"' in page
    assert "Generation 2 (id line-7)" in page


def test_report_without_documents_rejected() -> None:
    with pytest.raises(UsageError):
        render_report([])


@pytest.mark.parametrize(
    ("score", "expected"),
    [
        (0.0, COLOR_STOPS[0][1]),
        (-4.0, COLOR_STOPS[0][1]),
        (0.5, COLOR_STOPS[1][1]),
        (1.0, COLOR_STOPS[2][1]),
        (9.0, COLOR_STOPS[2][1]),
        (float("nan"), (200, 200, 200)),
    ],
)
def test_color_scale_anchored_at_zero_and_one(score: float, expected: tuple[int, int, int]) -> None:
    assert score_rgb(score) == expected


def test_color_scale_warms_as_score_rises() -> None:
    warmth = [score_rgb(i / 20)[0] - score_rgb(i / 20)[2] for i in range(21)]
    assert warmth == sorted(warmth)
    assert warmth[0] < 0 < warmth[-1]


def test_chart_keeps_reference_lines_in_range() -> None:
    svg = line_chart([5.0, 6.0, -3.0], threshold=0.5, key="x")
    assert svg.count('class="ref"') == 2
    assert svg.count('class="threshold"') == 1
    assert svg.count('class="point"') == 3


def test_chart_breaks_line_at_missing_scores() -> None:
    svg = line_chart([0.1, 0.2, float("nan"), 0.3, 0.4], threshold=0.5, key="x")
    assert svg.count("<polyline") == 2


def test_write_report_replaces_file_atomically(tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    target.write_text("old")
    write_report(target, [sample_document()])
    assert target.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_write_report_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        write_report(tmp_path / "missing" / "report.html", [sample_document()])


def tiny_generation_documents() -> list[dict[str, Any]]:
    """Two real generations from a tiny model, scored on two vectors, one of them steered."""
    lm = wrap_model(build("llama"), tiny_tokenizer())
    generator = torch.Generator().manual_seed(0)
    vectors = []
    for name, layer in (("refusal", 1), ("sycophancy", 2)):
        direction = torch.randn(lm.hidden_size, generator=generator)
        vectors.append(
            PersonaVector(name, layer, direction / direction.norm(), Calibration(0.5, 0.2, -0.5, 0.2), 1.0, 2.0, f"id-{name}")
        )
    columns = score_columns(lm, vectors)
    steering = [SteeringTerm(vectors[0], 0.5)]
    options = GenerationOptions(max_new_tokens=24)
    prompts = [list(lm.tokenizer("hello world ?")["input_ids"]), list(lm.tokenizer("you agree !")["input_ids"])]
    trajectories = generate_trajectories(lm, prompts, columns, steering=steering, options=options)
    model = {"model_id": "tiny-llama", "fingerprint": lm.fingerprint, "architecture": "LlamaForCausalLM"}
    return [
        trajectory_document(
            t,
            columns=columns,
            steering=steering,
            options=options,
            model=model,
            messages=[{"role": "user", "content": "hello world ?"}],
            threshold=0.5,
            record_id=i,
        )
        for i, t in enumerate(trajectories)
    ]


def run_chromium(args: list[str], user_data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={user_data}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="headless Chromium is not installed at /usr/bin/chromium (apt-get install -y chromium)"
)
def test_report_renders_in_chromium(tmp_path: Path) -> None:
    documents = tiny_generation_documents()
    report = tmp_path / "report.html"
    write_report(report, documents)

    with tempfile.TemporaryDirectory() as profile:
        dom = run_chromium(["--dump-dom", report.as_uri()], Path(profile))
    assert dom.returncode == 0, dom.stderr[-2000:]
    counter = parse(dom.stdout)
    token_counts = [len(d["tokens"]) for d in documents for _ in d["vectors"]]
    assert counter.tokens_per_heatmap == token_counts
    assert counter.counts["svg.chart"] == 4
    assert counter.counts["polyline.series"] >= 4
    assert counter.counts["circle.point"] == sum(token_counts)
    assert counter.counts["line.threshold"] == 4

    screenshot = tmp_path / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        shot = run_chromium([f"--screenshot={screenshot}", "--window-size=1100,1600", report.as_uri()], Path(profile))
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.stat().st_size > 10_000
    saved = Path(tempfile.gettempdir()) / "safety-lens-report-test.png"
    shutil.copy(screenshot, saved)
