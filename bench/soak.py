"""`make bench-soak`: `modelpress serve` held at saturation, open loop above capacity.

1. Start the server for the artifact, sampling the RSS of its whole process tree.
2. Warm up, then measure capacity: ``--streams`` closed-loop chat streams for
   ``--calibrate`` seconds (output tok/s in the window ÷ tokens per stream).
3. Open loop at ``--overload`` × that capacity for ``--duration`` seconds: requests leave on
   a schedule whether or not earlier ones returned, so the server must shed the excess.
4. Let every stream in flight finish, stop the server by PID, and judge:

   * no request that got a 200 is lost: every 200 stream ended with ``[DONE]`` and none
     was still open when the load generator stopped;
   * the excess is answered 503 (some 503s, no other failure);
   * RSS grows < ``--max-rss-growth`` from the settle mark (minute 2 of 10, i.e. 20% of
     the run, at most 120 s) to the end of the run (median of 30 s windows at each end).

    python -m bench.soak build/bench/artifacts-smollm2/genai-int4 --duration 600
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from bench.decode import DECODE_MAX_TOKENS, DRAIN_S, run_decode, served_model, write_prompts
from bench.loadgen import LoadSpec, level_result, run_locust
from bench.server import RssSampler, ServerProcess
from serve.errors import ModelpressError

log = logging.getLogger(__name__)
# The HTTP in-flight cap (--max-concurrency, 429) is raised above what the open loop can
# pile up, so the excess meets the engine's admission queue (503 + Retry-After on its
# deadline or when the queue is full): that is the shedding this soak checks.
DEFAULT_SERVE_OPTIONS = ["--max-concurrency=1024"]


def rss_growth(samples: list[tuple[float, int]], start: float, end: float,
               settle_s: float, span_s: float = 30.0) -> dict[str, Any]:
    """RSS growth from the settle mark to the end of a run.

    Args:
        samples: ``(monotonic time, bytes)`` of the server tree.
        start: Monotonic time the open loop started.
        end: Monotonic time the open loop's window ended.
        settle_s: Seconds after ``start`` where the comparison begins (minute 2).
        span_s: Length of the two windows whose medians are compared.

    Returns:
        ``{"settled_bytes", "end_bytes", "growth"}`` (None values without samples).
    """
    span = min(span_s, max(1.0, (end - start - settle_s) / 4))
    early = [b for t, b in samples if start + settle_s <= t <= start + settle_s + span]
    late = [b for t, b in samples if end - span <= t <= end]
    if not early or not late:
        return {"settled_bytes": None, "end_bytes": None, "growth": None}
    a, b = statistics.median(early), statistics.median(late)
    return {"settled_bytes": a, "end_bytes": b, "growth": b / a - 1}


def verdicts(level: dict[str, Any], rss: dict[str, Any], max_growth: float) -> dict[str, Any]:
    """Each soak criterion → ``{"ok": bool, "detail": str}``."""
    out = level.get("outcomes") or {}
    lost, cut = out.get("200 lost", 0), out.get("200 cut off", 0)
    unknown, unanswered = out.get("open at stop", 0), out.get("no answer", 0)
    growth = rss.get("growth")
    return {
        "no 200 lost": {"ok": lost == 0 and cut == 0 and unknown == 0,
                        "detail": f"{out.get('200 done', 0)} streams ended with [DONE], "
                                  f"{lost} broke off, {cut} still streaming at the stop "
                                  f"timeout, {unknown} unaccounted"},
        "excess answered 503": {"ok": out.get("503", 0) > 0 and out.get("error", 0) == 0
                                and unanswered == 0,
                                "detail": f"{out.get('503', 0)} × 503, "
                                          f"{out.get('error', 0)} other errors "
                                          f"{level.get('errors') or ''}, {unanswered} never "
                                          "answered by the stop timeout"},
        "RSS growth": {"ok": growth is not None and growth < max_growth,
                       "detail": "not measured" if growth is None else
                       f"{growth * 100:+.2f}% ({rss['settled_bytes'] / 1e6:.0f} → "
                       f"{rss['end_bytes'] / 1e6:.0f} MB), limit {max_growth * 100:.0f}%"},
    }


def soak(args: argparse.Namespace) -> dict[str, Any]:
    """Run the soak (see the module docstring) and return its results."""
    work = args.out
    server = ServerProcess(args.artifact, work / "server.log", args.serve_option)
    sampler = RssSampler(server.pid, interval_s=1.0, keep_samples=True)
    sampler.start()
    results: dict[str, Any] = {"config": {k: str(v) if isinstance(v, Path) else v
                                          for k, v in vars(args).items()},
                               "command": " ".join(server.command)}
    try:
        results["ready_s"] = server.wait_ready(args.ready_timeout)
        [calib] = run_decode(server.url, [args.streams], args.calibrate, work / "calibrate",
                             args.max_tokens, warmup_s=args.warmup)
        # Streams per second inside the window: its tokens over tokens per stream (counting
        # completed streams would add the ones drained after the window).
        tokens, per_stream = calib.get("output_tokens_per_s"), calib.get("tokens_per_request")
        capacity = tokens / per_stream if tokens and per_stream else 0.0
        if capacity <= 0:
            raise ModelpressError(f"calibration completed no stream in {args.calibrate:g} s")
        rate = args.rate or args.overload * capacity
        results["calibration"] = {"streams_per_s": capacity, "rate": rate, "level": calib}
        log.info("capacity %.2f streams/s; open loop at %.2f req/s for %.0f s",
                 capacity, rate, args.duration)
        spec = LoadSpec("open", 1, args.duration, rate=rate, profile="chat",
                        stop_timeout_s=DRAIN_S, model=served_model(server.url),
                        connections=args.connections)
        start = time.monotonic()
        entries = run_locust(spec, server.url, write_prompts(work / "prompts.jsonl"),
                             "text-generation", work / "soak", args.max_tokens)
        level = level_result(spec, [entries])
        end = start + (level.get("window_s") or args.duration)
        results["soak"] = level
        results["rss"] = rss_growth(sampler.samples, start, end,
                                    min(120.0, 0.2 * args.duration))
        results["server_alive"] = server.alive()
    finally:
        server.stop()
        results["peak_rss_bytes"] = sampler.stop()
        results["rss_samples"] = [(round(t - sampler.samples[0][0], 1), b)
                                  for t, b in sampler.samples] if sampler.samples else []
    results["verdicts"] = verdicts(results["soak"], results["rss"], args.max_rss_growth)
    return results


def markdown(results: dict[str, Any]) -> str:
    """The soak's summary: load, outcomes, latencies and each verdict."""
    cfg, lv = results["config"], results["soak"]
    ttft = lv.get("ttft_ms") or {}
    lines = [f"# soak: {cfg['artifact']}", "",
             f"Capacity {results['calibration']['streams_per_s']:.2f} streams/s "
             f"({cfg['streams']} closed-loop streams, {cfg['calibrate']:g} s); open loop at "
             f"{results['calibration']['rate']:.2f} req/s ("
             f"{results['calibration']['rate'] / results['calibration']['streams_per_s']:.1f}×) "
             f"for "
             f"{lv.get('window_s') or 0:.0f} s, `max_tokens` {cfg['max_tokens']}.", "",
             f"Outcomes: {lv.get('outcomes')}; output {lv.get('output_tokens_per_s') or 0:.1f}"
             f" tok/s; TTFT p50/p95/p99 {ttft.get('p50')}/{ttft.get('p95')}/{ttft.get('p99')}"
             f" ms; peak RSS {results['peak_rss_bytes'] / 1e6:.0f} MB.", ""]
    for name, verdict in results["verdicts"].items():
        lines.append(f"- {'PASS' if verdict['ok'] else 'FAIL'} {name}: {verdict['detail']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the soak, write soak.json and soak.md; exit 1 if a criterion failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--duration", type=float, default=600.0, help="open-loop seconds")
    parser.add_argument("--streams", type=int, default=32, help="calibration streams")
    parser.add_argument("--calibrate", type=float, default=30.0, help="calibration seconds")
    parser.add_argument("--overload", type=float, default=2.0, help="rate ÷ capacity")
    parser.add_argument("--rate", type=float, default=None,
                        help="open-loop req/s (default: --overload × measured capacity)")
    parser.add_argument("--max-tokens", type=int, default=DECODE_MAX_TOKENS)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--max-rss-growth", type=float, default=0.05)
    parser.add_argument("--connections", type=int, default=2048,
                        help="client connections (above what the server holds: it sheds)")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--serve-option", action="append", default=None,
                        help="extra `modelpress serve` option (repeatable; default "
                             f"{' '.join(DEFAULT_SERVE_OPTIONS)})")
    parser.add_argument("--out", type=Path, default=Path("build/bench/soak"))
    args = parser.parse_args(argv)
    args.serve_option = args.serve_option or DEFAULT_SERVE_OPTIONS
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not args.artifact.is_dir():
        parser.error(f"{args.artifact}: no such artifact folder")
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        results = soak(args)
    except ModelpressError as exc:
        print(f"soak failed: {str(exc).splitlines()[0]}")
        return 1
    (args.out / "soak.json").write_text(json.dumps(results, indent=2, default=str))
    text = markdown(results)
    (args.out / "soak.md").write_text(text)
    print(text)
    return 0 if all(v["ok"] for v in results["verdicts"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
