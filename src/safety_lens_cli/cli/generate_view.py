"""The terminal view of `safety-lens generate`: streamed tokens coloured by score, and sparklines.

Tokens are coloured by their calibrated score on the first persona, on the
same scale as the HTML report (blue at 0, white at 0.5, red at 1). A flagged
token (score at or above the threshold) is followed by a glyph, so the flag
stays visible when colour is off (NO_COLOR or a dumb terminal).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from rich.color import Color
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.segment import Segment
from rich.style import Style
from rich.text import Text

from safety_lens_cli.report import score_rgb

if TYPE_CHECKING:
    from safety_lens_cli.projection import PersonaScore
    from safety_lens_cli.trajectory import GeneratedToken, Trajectory

FLAG_GLYPH = "\u25b2"  # ▲
SPARK_LEVELS = "\u2581\u2582\u2583\u2584\u2585\u2586\u2587\u2588"  # ▁ to █
FLAG_STYLE = Style(color="red", bold=True)
# Lines kept below the streamed text while the view is live, so its end stays on screen.
RESERVED_LINES = 4


def score_style(score: float, color_system: str | None = "truecolor") -> Style:
    """Background for a token with this score.

    On 8- and 16-colour terminals the report's pale colours would all round
    to white, so scores fall into three bands there: blue below 1/3, no
    background in between, red from 2/3.
    """
    if color_system in ("truecolor", "256"):
        red, green, blue = score_rgb(score)
        return Style(color="black", bgcolor=Color.from_rgb(red, green, blue))
    if not math.isfinite(score) or 1 / 3 <= score < 2 / 3:
        return Style()
    return Style(color="white", bgcolor="blue" if score < 1 / 3 else "red")


def spark_char(score: float) -> str:
    """Pick the sparkline cell for a score clipped to [0, 1], on eight levels, or a space when it is not finite."""
    if not math.isfinite(score):
        return " "
    clipped = min(max(score, 0.0), 1.0)
    return SPARK_LEVELS[round(clipped * (len(SPARK_LEVELS) - 1))]


def sparkline(scores: Sequence[float], width: int, threshold: float) -> Text:
    """Scores as a sparkline at most `width` cells wide; each cell shows the max of the tokens it covers."""
    if width < 1 or not scores:
        return Text()
    per_cell = max(1, math.ceil(len(scores) / width))
    text = Text()
    for start in range(0, len(scores), per_cell):
        chunk = [s for s in scores[start : start + per_cell] if math.isfinite(s)]
        value = max(chunk) if chunk else math.nan
        style = FLAG_STYLE if math.isfinite(value) and value >= threshold else Style(color="grey62")
        text.append(spark_char(value), style=style)
    return text


def _format_score(score: PersonaScore, threshold: float) -> Text:
    text = Text(f"{score.score:.2f}")
    if math.isfinite(score.score) and score.score >= threshold:
        text.append(f" {FLAG_GLYPH}", style=FLAG_STYLE)
    text.append(f" (raw {score.raw:.2f}, layer {score.layer})", style="dim")
    return text


class GenerationView:
    """Rich renderable for one generation: prompt scan, coloured token stream, one sparkline per column."""

    def __init__(self, keys: Sequence[str], threshold: float) -> None:
        self.keys = list(keys)
        self.threshold = threshold
        self.prompt_scan: Mapping[str, PersonaScore] = {}
        self.tokens: list[GeneratedToken] = []
        self.finished: Trajectory | None = None

    def add(self, token: GeneratedToken) -> None:
        self.tokens.append(token)

    def stream(self, color_system: str | None) -> Text:
        """Build the generated text with each token on its score colour and the glyph after flagged ones."""
        text = Text()
        for token in self.tokens:
            score = token.scores[self.keys[0]].score
            style = score_style(score, color_system)
            if token.special:
                style = style + Style(italic=True, dim=True)
            text.append(token.text, style=style)
            if math.isfinite(score) and score >= self.threshold:
                text.append(FLAG_GLYPH, style=FLAG_STYLE)
        return text

    def finish(self, trajectory: Trajectory) -> None:
        self.finished = trajectory

    def scores(self, key: str) -> list[float]:
        return [token.scores[key].score for token in self.tokens]

    def _scan_lines(self) -> Iterable[Text]:
        yield Text("Prompt scan (last prompt token)", style="bold")
        for key in self.keys:
            score = self.prompt_scan.get(key)
            line = Text(f"  {key}: ")
            line.append_text(_format_score(score, self.threshold) if score is not None else Text("…", style="dim"))
            yield line

    def _sparklines(self, width: int) -> Iterable[Text]:
        label_width = max(len(k) for k in self.keys)
        stats_width = 34
        cells = max(8, width - label_width - stats_width - 3)
        for key in self.keys:
            values = [s for s in self.scores(key) if math.isfinite(s)]
            flagged = sum(1 for s in values if s >= self.threshold)
            line = Text(f"{key:<{label_width}} ")
            line.append_text(sparkline(self.scores(key), cells, self.threshold))
            if values:
                mean = sum(values) / len(values)
                stats = f"  mean {mean:.2f} max {max(values):.2f} {FLAG_GLYPH}{flagged}/{len(self.tokens)}"
                line.append(stats, style="dim")
            yield line

    def _legend(self, color_system: str | None) -> Text:
        legend = Text(f"Colour: score on {self.keys[0]}, ")
        for value in (0.0, 0.5, 1.0):
            legend.append(f" {value:g} ", style=score_style(value, color_system))
        legend.append(f"  {FLAG_GLYPH} score ≥ {self.threshold:g}")
        if self.finished is not None:
            reason = "end of sequence" if self.finished.stop_reason == "eos" else "max new tokens"
            legend.append(f"  · {len(self.tokens)} tokens, stopped at {reason}", style="dim")
        return legend

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self._scan_lines()
        yield Text("")
        stream = self.stream(console.color_system)
        if self.finished is None and console.is_terminal:
            yield from self._stream_tail(stream, console, options)
        else:
            yield stream
        yield Text("")
        yield Group(*self._sparklines(options.max_width), self._legend(console.color_system))

    def _stream_tail(self, stream: Text, console: Console, options: ConsoleOptions) -> RenderResult:
        """Yield the last lines of the stream that fit, so a long generation scrolls instead of losing its end."""
        room = max(1, console.size.height - len(self.keys) * 2 - RESERVED_LINES)
        lines = console.render_lines(stream, options.update(height=None), pad=False)
        for line in lines[-room:]:
            yield from line
            yield Segment.line()
