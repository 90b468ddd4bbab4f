"""results.json → results.csv, report.md and pareto.png.

The input is the results dict described in ``bench/run.py`` (``RESULTS_SCHEMA``); every
function here is pure apart from writing its file, so the report can be regenerated from
a saved results.json (``write_report(json.load(...), out_dir)``).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from bench.recommend import pareto_front

CSV_COLUMNS = [
    "artifact", "status", "format", "precision", "bytes", "mode", "level", "users", "rate",
    "requests", "failures", "failure_rate", "rps", "rps_min", "rps_max", "p50_ms", "p90_ms",
    "p95_ms", "p99_ms", "max_ms", "mean_ms", "p95_min_ms", "p95_max_ms", "ttft_p50_ms",
    "ttft_p95_ms", "itl_p50_ms", "itl_p95_ms", "tokens_per_s", "schedule_p95_ms",
    "profile", "max_tokens", "output_tokens_per_s", "tokens_per_request", "ttft_p99_ms",
    "itl_p99_ms", "failures_503", "failures_other", "peak_rss_bytes", "accuracy_metric",
    "accuracy", "accuracy_ci_lo", "accuracy_ci_hi",
    "accuracy_drop", "manifest_sha256",
]


def _get(d: dict | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per artifact × load level, eval levels then decode-bound ones (one row
    for an artifact that did not run)."""
    out = []
    for art in results["artifacts"]:
        acc = art.get("accuracy") or {}
        base = {"artifact": art["name"], "status": art["status"], "format": art.get("format"),
                "precision": art.get("precision"), "bytes": art.get("bytes"),
                "peak_rss_bytes": art.get("peak_rss_bytes"),
                "accuracy_metric": acc.get("metric"), "accuracy": acc.get("value"),
                "accuracy_ci_lo": (acc.get("ci95") or [None, None])[0],
                "accuracy_ci_hi": (acc.get("ci95") or [None, None])[1],
                "accuracy_drop": acc.get("drop"), "manifest_sha256": art.get("manifest_sha256")}
        for level in [*(art.get("loads") or []), *(art.get("decode") or [])] or [None]:
            row = dict(base)
            if level:
                lat = level.get("latency_ms") or {}
                row.update({
                    "mode": level["mode"], "level": level["label"], "users": level["users"],
                    "rate": level.get("rate"), "requests": level["requests"],
                    "failures": level["failures"], "failure_rate": level["failure_rate"],
                    "rps": level["rps"], "rps_min": _get(level, "spread", "rps", "min"),
                    "rps_max": _get(level, "spread", "rps", "max"),
                    **{f"{k}_ms": lat.get(k) for k in ("p50", "p90", "p95", "p99", "max",
                                                       "mean")},
                    "p95_min_ms": _get(level, "spread", "p95_ms", "min"),
                    "p95_max_ms": _get(level, "spread", "p95_ms", "max"),
                    "ttft_p50_ms": _get(level, "ttft_ms", "p50"),
                    "ttft_p95_ms": _get(level, "ttft_ms", "p95"),
                    "itl_p50_ms": _get(level, "itl_ms", "p50"),
                    "itl_p95_ms": _get(level, "itl_ms", "p95"),
                    "tokens_per_s": level.get("tokens_per_s"),
                    "schedule_p95_ms": _get(level, "schedule_latency_ms", "p95"),
                    "profile": level.get("profile", "eval"),
                    "max_tokens": level.get("max_tokens"),
                    "output_tokens_per_s": level.get("output_tokens_per_s"),
                    "tokens_per_request": level.get("tokens_per_request"),
                    "ttft_p99_ms": _get(level, "ttft_ms", "p99"),
                    "itl_p99_ms": _get(level, "itl_ms", "p99"),
                    "failures_503": level.get("failures_503"),
                    "failures_other": level.get("failures_other")})
            out.append(row)
    return out


def write_csv(results: dict[str, Any], path: Path) -> None:
    """Write ``results.csv``: the flat rows of :func:`rows`."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows(results))


def _num(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _mb(n: int | None) -> str:
    return "–" if n is None else f"{n / 1e6:.1f} MB"


def _spread(level: dict, key: str, digits: int = 1) -> str:
    s = _get(level, "spread", key)
    if not s or s.get("min") is None or s.get("n", 1) < 2:
        return ""
    return f" ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def markdown(results: dict[str, Any]) -> str:
    """The text of ``report.md``: config, per-variant tables and the recommendation."""
    cfg, rec = results["config"], results["recommendation"]
    lines = ["# modelpress bench report", "",
             f"Created {results['created_at']}; SLO `{cfg.get('slo') or 'none'}`, max accuracy "
             f"drop {_num(cfg.get('max_accuracy_drop'), 4)}, reference "
             f"`{cfg.get('reference') or '–'}`; {cfg['duration_s']:.0f} s per load level × "
             f"{cfg['repeats']} repeats after {cfg['warmup_s']:.0f} s warm-up.", "",
             "## Recommendation", ""]
    if rec["recommended"]:
        lines.append(f"**Deploy `{rec['recommended']}`** — {rec['reason']}.")
    else:
        lines.append(f"**No variant qualifies** — {rec['reason']}.")
    lines.append("")
    for name, why in rec["rejected"].items():
        lines.append(f"- `{name}` not chosen: {why}")
    lines += ["", "## Variants", "",
              "| artifact | status | format / precision | size | peak RSS | accuracy (95% CI) "
              "| drop vs ref |", "|---|---|---|---|---|---|---|"]
    for art in results["artifacts"]:
        acc = art.get("accuracy") or {}
        ci = acc.get("ci95") or [None, None]
        acc_text = (f"{acc['metric']} {acc['value']:.4f} [{_num(ci[0], 4)}, {_num(ci[1], 4)}]"
                    if acc.get("value") is not None else "not measured")
        status = art["status"] + (f": {art['error']}" if art.get("error") else "")
        lines.append(f"| {art['name']} | {status} | {art.get('format')} / "
                     f"{art.get('precision')} | {_mb(art.get('bytes'))} | "
                     f"{_mb(art.get('peak_rss_bytes'))} | {acc_text} | "
                     f"{_num(acc.get('drop'), 4)} |")
    lines += ["", "## Load levels", "",
              "Latency in ms (Locust histogram, exact over all repeats; range over repeats in "
              "brackets). `closed` = N users back to back; `open` = fixed arrival rate.", "",
              "| artifact | level | requests | failures | req/s | p50 | p95 | p99 | max "
              "| TTFT p95 | ITL p95 | tok/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for art in results["artifacts"]:
        for level in art.get("loads", []):
            lat = level.get("latency_ms") or {}
            lines.append(
                f"| {art['name']} | {level['label']} | {level['requests']} | "
                f"{level['failures']} | {_num(level.get('rps'))}{_spread(level, 'rps')} | "
                f"{_num(lat.get('p50'), 0)} | {_num(lat.get('p95'), 0)}"
                f"{_spread(level, 'p95_ms', 0)} | {_num(lat.get('p99'), 0)} | "
                f"{_num(lat.get('max'), 0)} | {_num(_get(level, 'ttft_ms', 'p95'), 0)} | "
                f"{_num(_get(level, 'itl_ms', 'p95'), 0)} | {_num(level.get('tokens_per_s'))} |")
    lines += decode_table(results["artifacts"])
    lines += ["", "![p95 latency vs accuracy](pareto.png)", ""]
    return "\n".join(lines)


def _pcts(summary: dict | None, digits: int = 0) -> str:
    return " / ".join(_num((summary or {}).get(k), digits) for k in ("p50", "p95", "p99"))


def decode_table(artifacts: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of the decode-bound chat levels (none if no artifact has any)."""
    if not any(art.get("decode") for art in artifacts):
        return []
    first = next(lv for art in artifacts for lv in art.get("decode") or [])
    lines = ["", "## Decode-bound chat load (what a chat user sees)", "",
             f"Streaming `POST /v1/chat/completions`, prompts that ask for long answers, "
             f"`max_tokens` {first.get('max_tokens')}, closed loop. Output tok/s counts the "
             f"tokens that arrived inside the {_num(first.get('window_s'), 0)} s window, over "
             "all streams; TTFT and ITL (gap between streamed chunks) in ms as p50 / p95 / "
             "p99. Failures: deliberate 503s / others.", "",
             "| artifact | streams | done | tok/stream | output tok/s | per stream | TTFT ms "
             "| ITL ms | failures 503 / other |", "|---|---|---|---|---|---|---|---|---|"]
    for art in artifacts:
        for level in art.get("decode") or []:
            done = (level.get("outcomes") or {}).get("200 done")
            total = level.get("output_tokens_per_s")
            lines.append(
                f"| {art['name']} | {level['users']} | {_num(done)} | "
                f"{_num(level.get('tokens_per_request'))} | {_num(total)} | "
                f"{_num(total / level['users'] if total is not None else None)} | "
                f"{_pcts(level.get('ttft_ms'))} | {_pcts(level.get('itl_ms'))} | "
                f"{_num(level.get('failures_503'))} / {_num(level.get('failures_other'))} |")
    return lines


def _labels(points: list[tuple[float, float]], names: list[str]
            ) -> list[tuple[tuple[float, float], str, tuple[int, int]]]:
    """One label per distinct point (names of coincident variants joined), with label
    offsets that alternate above/below when points crowd each other."""
    merged: dict[tuple[float, float], list[str]] = {}
    for point, name in zip(points, names, strict=True):
        merged.setdefault(point, []).append(name)
    xs = [x for x, _ in merged] or [0.0]
    ys = [y for _, y in merged] or [0.0]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    # A label is ~a quarter of a panel wide: labels closer than that on the same side clash.
    placed: list[tuple[float, float, tuple[int, int]]] = []
    out = []
    for (x, y), group in sorted(merged.items()):
        offset = next((o for o in ((6, 6), (6, -12)) if not any(
            po == o and abs(x - px) < 0.25 * span_x and abs(y - py) < 0.06 * span_y
            for px, py, po in placed)), (6, 6))
        placed.append((x, y, offset))
        out.append(((x, y), ", ".join(group), offset))
    return out


def plot_pareto(results: dict[str, Any], path: Path) -> None:
    """Write ``pareto.png``: p95 latency vs accuracy per load level, bubble = bytes.

    One panel per load level; the Pareto front (no other variant both faster and more
    accurate) is drawn as a step line. Variants without measured accuracy sit at y=0.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = []
    for art in results["artifacts"]:
        for level in art.get("loads", []):
            if level["label"] not in labels:
                labels.append(level["label"])
    labels = labels or ["no load levels"]
    fig, axes = plt.subplots(1, len(labels), figsize=(4.5 * len(labels), 4), squeeze=False)
    sizes = [a.get("bytes") or 0 for a in results["artifacts"]] or [1]
    biggest = max(max(sizes), 1)
    for ax, label in zip(axes[0], labels, strict=True):
        points, names, bubble = [], [], []
        for art in results["artifacts"]:
            level = next((lv for lv in art.get("loads", []) if lv["label"] == label), None)
            p95 = _get(level, "latency_ms", "p95")
            acc = _get(art, "accuracy", "value")
            if p95 is None:
                continue
            points.append((float(p95), float(acc) if acc is not None else 0.0))
            names.append(art["name"])
            bubble.append(60 + 1400 * (art.get("bytes") or 0) / biggest)
        if points:
            xs, ys = zip(*points, strict=True)
            ax.scatter(xs, ys, s=bubble, alpha=0.5, edgecolors="black")
            for (x, y), name, offset in _labels(points, names):
                ax.annotate(name, (x, y), textcoords="offset points", xytext=offset, fontsize=8)
            front = [points[i] for i in pareto_front(points)]
            fx, fy = zip(*front, strict=True)
            ax.step(fx, fy, where="post", color="tab:red", marker="x", label="Pareto front")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_title(label)
        ax.set_xlabel("p95 latency (ms)")
        ax.set_ylabel(_accuracy_axis(results))
        ax.grid(alpha=0.3)
    fig.suptitle("p95 latency vs accuracy (bubble area ∝ artifact bytes)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _accuracy_axis(results: dict[str, Any]) -> str:
    metric = next((a["accuracy"]["metric"] for a in results["artifacts"] if a.get("accuracy")),
                  None)
    return metric or "accuracy (not measured)"


def write_report(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write all four outputs into ``out_dir`` and return their paths by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("results.json", "results.csv", "report.md",
                                                "pareto.png")}
    paths["results.json"].write_text(json.dumps(results, indent=2, default=str))
    write_csv(results, paths["results.csv"])
    paths["report.md"].write_text(markdown(results))
    plot_pareto(results, paths["pareto.png"])
    return paths
