"""Expected times as people read them: "Turbo ~6 s · Fast ~25 s · Balanced ~2 min · Quality ~6 min",
from a family's estimate (`Family.estimate`: {tiers: {tier: {seconds, source, ...}}, chosen})."""

from __future__ import annotations

from typing import Any


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe(estimate: dict[str, Any]) -> str:
    """Each tier that has a figure, fastest first as the estimate lists them."""
    return " · ".join(
        f"{tier.capitalize()} ~{duration(value['seconds'])}"
        for tier, value in estimate["tiers"].items()
        if value.get("seconds") is not None
    )


def sources(estimate: dict[str, Any]) -> str:
    """Where each figure comes from, a line per tier."""
    return "\n".join(
        f"{tier}: {value['source']}" + (f" ({value['steps']} steps, {value['model']})" if value.get("steps") else "")
        for tier, value in estimate["tiers"].items()
    )
