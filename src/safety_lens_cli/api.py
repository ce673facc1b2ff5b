"""The Python API, with the surface of the earlier `safety_lens` library.

    from safety_lens_cli import SafetyLens, LensHooks, WhiteBoxWrapper, white_box_metric

Every class here is a thin layer over the core the CLI uses; see
`docs/api.md` for the scales of the values they return.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from safety_lens_cli.api_generate import WhiteBoxWrapper
from safety_lens_cli.api_hooks import LensHooks
from safety_lens_cli.api_inputs import check_scores, check_threshold
from safety_lens_cli.api_lens import DEFAULT_PERSONAS, SafetyLens


def white_box_metric(scan: Mapping[str, float], threshold: float = 0.5) -> dict[str, Any]:
    """Flag the personas whose calibrated score is at or above `threshold`.

    `scan` is `{persona: calibrated score}`, as `SafetyLens.quick_scan` and
    `scan_and_generate(...)["scan"]` return it. The threshold applies to that
    calibrated scale, where 0 is the mean of a persona's negative stimuli and
    1 the mean of its positive ones, so 0.5 lies halfway between them. This is
    the rule of `safety-lens scan --threshold`. Returns `scores` (the scores
    as floats), `flagged` (whether any persona is flagged), `flagged_personas`
    (in the order of `scan`) and `threshold`.
    """
    limit = check_threshold(threshold)
    scores = check_scores(scan)
    flagged = [persona for persona, score in scores.items() if score >= limit]
    return {"scores": scores, "flagged": bool(flagged), "flagged_personas": flagged, "threshold": limit}


__all__ = ["DEFAULT_PERSONAS", "LensHooks", "SafetyLens", "WhiteBoxWrapper", "white_box_metric"]
