"""Which variant to deploy: SLO parsing, the accuracy gate, the Pareto front.

Works on the plain dicts of ``results.json`` (see ``bench/run.py``), so it is testable on
fixed result tables without a server.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

from serve.errors import ModelpressError


class SLOError(ModelpressError):
    """An ``--slo`` string that cannot be parsed."""


_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_STATS = ("p50", "p90", "p95", "p99", "max", "mean")
# metric name → (results key, stat inside it or None, kind of unit it takes)
_METRICS: dict[str, tuple[str, str | None, str]] = {
    **{s: ("latency_ms", s, "time") for s in _STATS},
    **{f"ttft_{s}": ("ttft_ms", s, "time") for s in _STATS},
    **{f"itl_{s}": ("itl_ms", s, "time") for s in _STATS},
    "failures": ("failure_rate", None, "fraction"),
    "rps": ("rps", None, "rate"),
    "tokens_per_s": ("tokens_per_s", None, "rate"),
}
_CLAUSE = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=|<|>)\s*([0-9]*\.?[0-9]+)\s*(ms|s|%)?\s*$")


@dataclass(frozen=True)
class Condition:
    """One SLO clause, e.g. ``p95<200ms``, in the units of results.json (ms, fraction, /s).

    Attributes:
        metric: The clause's metric name (``p95``, ``ttft_p99``, ``failures``, ``rps``...).
        op: Comparison operator as written.
        threshold: The bound, converted to ms (times) or a fraction (``%``).
        text: The clause as the user wrote it.
    """

    metric: str
    op: str
    threshold: float
    text: str

    def value(self, level: dict[str, Any]) -> float | None:
        """The level's value of this metric (None when the level did not measure it)."""
        key, stat, _ = _METRICS[self.metric]
        value = level.get(key)
        if stat is not None:
            value = value.get(stat) if isinstance(value, dict) else None
        return value

    def holds(self, level: dict[str, Any]) -> bool:
        """Whether the level meets this clause (a metric not measured does not)."""
        value = self.value(level)
        return value is not None and _OPS[self.op](value, self.threshold)


def parse_slo(text: str | None) -> list[Condition]:
    """Parse an SLO such as ``"p95<200ms"`` or ``"p99<=1s, failures<1%, ttft_p95<300ms"``.

    Args:
        text: Clauses separated by ``,`` or ``and``. Metrics: p50/p90/p95/p99/max/mean
            (request latency), ``ttft_*`` / ``itl_*`` of those (generation), ``failures``
            (``%`` or a fraction), ``rps`` and ``tokens_per_s``. Times take ``ms`` or ``s``
            (default ms).

    Returns:
        The conditions (empty for an empty or None SLO).

    Raises:
        SLOError: Naming the clause that cannot be parsed.
    """
    if not text or not text.strip():
        return []
    conditions = []
    for clause in re.split(r",|\band\b", text.lower()):
        match = _CLAUSE.match(clause)
        if not match:
            raise SLOError(f"--slo: cannot parse {clause.strip()!r}; expected e.g. 'p95<200ms'")
        metric, op, number, unit = match.groups()
        if metric not in _METRICS:
            raise SLOError(f"--slo: unknown metric {metric!r}; use one of {', '.join(_METRICS)}")
        kind, value = _METRICS[metric][2], float(number)
        if kind == "time" and unit in (None, "ms", "s"):
            value *= 1000 if unit == "s" else 1
        elif kind == "fraction" and unit in (None, "%"):
            value /= 100 if unit == "%" else 1
        elif not (kind == "rate" and unit is None):
            raise SLOError(f"--slo: unit {unit!r} does not fit {metric!r} in {clause.strip()!r}")
        conditions.append(Condition(metric, op, value, clause.strip()))
    return conditions


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower x (latency) and higher y (accuracy).

    A point is dominated when another is at least as good on both axes and strictly better
    on one. Returned sorted by x.
    """
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((ox <= x and oy >= y) and (ox < x or oy > y) for ox, oy in points)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def _fmt(condition: Condition, value: float | None) -> str:
    if value is None:
        return f"{condition.metric} not measured"
    kind = _METRICS[condition.metric][2]
    shown = f"{value * 100:.1f}%" if kind == "fraction" else (
        f"{value:.0f} ms" if kind == "time" else f"{value:.1f}/s")
    return f"{condition.metric} {shown} (needs {condition.text})"


def level_verdict(level: dict[str, Any], slo: list[Condition],
                  max_failure_rate: float) -> list[str]:
    """Why a load level misses the SLO (empty list: it meets it)."""
    misses = [_fmt(c, c.value(level)) for c in slo if not c.holds(level)]
    rate = level.get("failure_rate")
    if not level.get("requests"):
        misses.append("no requests completed")
    elif rate is not None and rate > max_failure_rate:
        misses.append(f"failures {rate * 100:.1f}% > {max_failure_rate * 100:.1f}%")
    return misses


def recommend(artifacts: list[dict[str, Any]], slo: list[Condition],
              max_accuracy_drop: float | None, max_failure_rate: float = 0.01,
              tie_margin: float = 0.05) -> dict[str, Any]:
    """Pick the variant to deploy and say why each other one was not picked.

    Eligible: the server ran, the accuracy drop vs the reference is within
    ``max_accuracy_drop`` (when accuracy was measured), and at least one load level meets
    every SLO clause with at most ``max_failure_rate`` failures. Among eligible variants the
    one with the highest throughput at a load level meeting the SLO wins; throughputs within
    ``tie_margin`` of the best count as a tie, broken by the smaller accuracy drop, then the
    fewer bytes.

    Args:
        artifacts: ``results.json["artifacts"]`` entries.
        slo: Parsed SLO conditions (empty: every level with few enough failures meets it).
        max_accuracy_drop: Largest allowed accuracy drop vs the reference (None: no gate).
        max_failure_rate: Largest failure fraction a level may have to count as meeting.
        tie_margin: Relative throughput difference treated as noise.

    Returns:
        ``{"recommended": name | None, "reason": str, "rejected": {name: reason},
        "eligible": [{"name", "rps", "level", "drop", "bytes"}]}``.
    """
    measured = any(a.get("accuracy") for a in artifacts)
    rejected: dict[str, str] = {}
    eligible = []
    for art in artifacts:
        name = art["name"]
        if art.get("status") != "ok":
            rejected[name] = f"server failed: {art.get('error') or art.get('status')}"
            continue
        drop = (art.get("accuracy") or {}).get("drop")
        if max_accuracy_drop is not None and measured:
            if not art.get("accuracy"):
                rejected[name] = "accuracy not measured"
                continue
            if drop is not None and drop > max_accuracy_drop:
                rejected[name] = (f"accuracy drop {drop:.4f} > allowed {max_accuracy_drop:.4f}")
                continue
        verdicts = [(level, level_verdict(level, slo, max_failure_rate))
                    for level in art.get("loads", [])]
        meeting = [level for level, misses in verdicts if not misses]
        if not meeting:
            detail = "; ".join(f"{lvl['label']}: {', '.join(m)}" for lvl, m in verdicts)
            rejected[name] = f"misses the SLO at every load level ({detail or 'no load levels'})"
            continue
        best = max(meeting, key=lambda lvl: lvl.get("rps") or 0.0)
        eligible.append({"name": name, "rps": best.get("rps") or 0.0, "level": best["label"],
                         "drop": drop, "bytes": art.get("bytes") or 0})
    if not eligible:
        return {"recommended": None, "reason": "no variant meets the SLO and the accuracy gate",
                "rejected": rejected, "eligible": []}
    # Throughputs within `tie_margin` of the best are a tie (run-to-run noise is that
    # large): among those the smaller accuracy drop, then the smaller artifact, wins.
    fastest = max(e["rps"] for e in eligible)
    eligible.sort(key=lambda e: (e["rps"] < fastest * (1 - tie_margin),
                                 e["drop"] if e["drop"] is not None else 0.0, e["bytes"],
                                 -e["rps"]))
    top = eligible[0]
    for other in eligible[1:]:
        if other["rps"] < fastest * (1 - tie_margin):
            why = (f"serves less: {other['rps']:.1f} req/s ({other['level']}) vs "
                   f"{top['rps']:.1f} req/s for {top['name']}")
        else:
            why = (f"throughput within {tie_margin:.0%} of {top['name']}, which ranks first "
                   "on accuracy drop, then size, then throughput")
        rejected[other["name"]] = f"meets the SLO and accuracy gate but {why}"
    drop_text = f", accuracy drop {top['drop']:.4f}" if top["drop"] is not None else ""
    reason = (f"highest throughput within the SLO (ties within {tie_margin:.0%} go to the "
              f"smaller drop, then size): {top['rps']:.1f} req/s at {top['level']}"
              f"{drop_text}, {top['bytes']} bytes")
    return {"recommended": top["name"], "reason": reason, "rejected": rejected,
            "eligible": eligible}
