"""lm-eval-harness through `modelpress serve` against lm-eval's own ``hf`` backend.

Runs the two shipped tasks of ``bench/lm_eval_tasks`` (``mp_mc``: loglikelihood multiple
choice; ``mp_gen``: greedy generate_until, exact match) twice with lm-eval from its own
venv (``make lm-eval-venv``): once with its ``hf`` backend on the merged HF folder, once
with ``local-completions`` against ``modelpress serve`` on an artifact (started and
stopped here by PID, 127.0.0.1 only). Scores must be identical; per item it also compares
every loglikelihood, the greedy flags and the generated texts.

    python -m bench.lm_eval_parity --hf-model build/bench/smollm2-135m-instruct \\
        --artifact build/bench/artifacts-smollm2/merge --out build/bench/lm-eval-parity
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.server import ServerError, ServerProcess

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
LM_EVAL = Path(".venv-lmeval/bin/lm_eval")
TASKS = "mp_mc,mp_gen"


def run_lm_eval(lm_eval: Path, model: str, model_args: str, out: Path,
                limit: int | None) -> float:
    """One lm-eval run (batch size 1, samples logged under ``out``); its seconds.

    Raises:
        RuntimeError: lm-eval failed (the tail of its log in the message).
    """
    cmd = [str(lm_eval), "--model", model, "--model_args", model_args, "--tasks", TASKS,
           "--include_path", "bench/lm_eval_tasks", "--batch_size", "1",
           "--output_path", str(out), "--log_samples", "--seed", "1234"]
    if model == "hf":
        cmd += ["--device", "cpu"]
    if limit:
        cmd += ["--limit", str(limit)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(out / "lm_eval.log", "wb") as sink:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                              check=False).returncode
    if code != 0:
        tail = (out / "lm_eval.log").read_text(errors="replace").splitlines()[-5:]
        raise RuntimeError(f"lm-eval --model {model} exited with {code}: {' | '.join(tail)}")
    return time.monotonic() - start


def read_run(out: Path) -> dict[str, Any]:
    """Scores and per-item answers of one run: ``{task: {"score", "items"}}``."""
    [results] = sorted(out.rglob("results_*.json"))[-1:]
    scores = json.loads(results.read_text())["results"]
    runs: dict[str, Any] = {}
    for task, metric in (("mp_mc", "acc,none"), ("mp_gen", "exact_match,none")):
        [samples] = sorted(out.rglob(f"samples_{task}_*.jsonl"))[-1:]
        items = {}
        for line in samples.read_text().splitlines():
            doc = json.loads(line)
            items[doc["doc_id"]] = doc["filtered_resps"]
        runs[task] = {"score": scores[task][metric], "items": items}
    return runs


def compare(hf: dict[str, Any], served: dict[str, Any]) -> dict[str, Any]:
    """Scores side by side and how far apart each item's answers are."""
    mc_hf, mc_sv = hf["mp_mc"]["items"], served["mp_mc"]["items"]
    diffs, greedy_same, choice_same = [], 0, 0
    for doc, rows in mc_hf.items():
        theirs = mc_sv[doc]
        diffs += [abs(float(a[0]) - float(b[0])) for a, b in zip(rows, theirs, strict=True)]
        greedy_same += all(a[1] == b[1] for a, b in zip(rows, theirs, strict=True))
        pick = [max(range(len(r)), key=lambda i, r=r: float(r[i][0])) for r in (rows, theirs)]
        choice_same += pick[0] == pick[1]
    gen_hf, gen_sv = hf["mp_gen"]["items"], served["mp_gen"]["items"]
    same_text = sum(gen_hf[d] == gen_sv[d] for d in gen_hf)
    return {
        "mp_mc": {"acc_hf": hf["mp_mc"]["score"], "acc_served": served["mp_mc"]["score"],
                  "items": len(mc_hf), "same_choice": choice_same,
                  "same_greedy_flags": greedy_same, "max_abs_loglik_diff": max(diffs)},
        "mp_gen": {"exact_match_hf": hf["mp_gen"]["score"],
                   "exact_match_served": served["mp_gen"]["score"], "items": len(gen_hf),
                   "same_text": same_text}}


def main(argv: list[str] | None = None) -> int:
    """Run both backends, write parity.json; 1 if a run failed or a score differs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-model", type=Path, required=True, help="merged HF folder")
    parser.add_argument("--artifact", type=Path, required=True, help="modelpress artifact")
    parser.add_argument("--lm-eval", type=Path, default=LM_EVAL,
                        help="lm_eval of its own venv (make lm-eval-venv)")
    parser.add_argument("--limit", type=int, default=None, help="items per task")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=Path("build/bench/lm-eval-parity"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for path in (args.hf_model, args.artifact):
        if not path.is_dir():
            parser.error(f"{path}: no such folder (make bench-offline builds it)")
    if not args.lm_eval.exists():
        parser.error(f"{args.lm_eval}: no lm-eval venv; run `make lm-eval-venv`")
    hf_model, artifact = args.hf_model.resolve(), args.artifact.resolve()
    try:
        log.info("lm-eval hf backend on %s", hf_model)
        hf_s = run_lm_eval(args.lm_eval, "hf", f"pretrained={hf_model},dtype=float32",
                           args.out / "hf", args.limit)
        server = ServerProcess(artifact, args.out / "server.log")
        try:
            server.wait_ready(args.ready_timeout)
            log.info("lm-eval local-completions against modelpress serve %s", artifact)
            # lm-eval's hf backend tokenizes as the tokenizer does by default (SmolLM2's
            # adds a BOS); its API models add none unless add_bos_token=True: the same
            # token ids go to both only with it.
            served_s = run_lm_eval(
                args.lm_eval, "local-completions",
                f"model={artifact.name},base_url={server.url}/v1/completions,"
                f"tokenizer={hf_model},tokenizer_backend=huggingface,add_bos_token=True,"
                "num_concurrent=1,max_retries=1", args.out / "served", args.limit)
        finally:
            server.stop()
    except (RuntimeError, ServerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "hf_model": str(args.hf_model), "artifact": str(args.artifact),
              "seconds": {"hf": round(hf_s, 1), "served": round(served_s, 1)},
              **compare(read_run(args.out / "hf"), read_run(args.out / "served"))}
    (args.out / "parity.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    same = (report["mp_mc"]["acc_hf"] == report["mp_mc"]["acc_served"]
            and report["mp_gen"]["exact_match_hf"] == report["mp_gen"]["exact_match_served"])
    if not same:
        print("error: lm-eval scores differ between the hf backend and modelpress serve",
              file=sys.stderr)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
