r"""Score open-ended QA and VCGBench answers with a chat model as the paper does (GPT judge).

    # open-ended QA (MSVD / MSRVTT / ActivityNet): yes/no accuracy and average score
    python eval.py --checkpoint DIR --benchmark openqa --data MSVD-QA/new_test_qa.json \
        --out runs/eval/msvd.json
    export OPENAI_API_KEY=...
    python -m ppllava_jax.judge --input runs/eval/msvd.json --model gpt-3.5-turbo
    # VCGBench: the five criteria (correctness, detail, context, temporal, consistency)
    python -m ppllava_jax.judge --input runs/eval/vcg.json --model gpt-3.5-turbo
    # an open model behind a local OpenAI-compatible server (vLLM: `vllm serve MODEL`)
    python -m ppllava_jax.judge --input runs/eval/msvd.json --base_url http://localhost:8000/v1 \
        --model Qwen/Qwen2.5-72B-Instruct --api_key_env=''

``--input``: eval.py's results file (``--out``; its summary names the judge inputs beside it)
or one judge input (``OUT_pred.json``; ``OUT_general.json`` / ``_temporal.json`` /
``_consist.json``; also the original's ``MSVD.json``, ``general.json``, ...).

What is sent: for each question, the system and user messages of the original's scripts
(``ppllava/test/gpt_evaluation/evaluate_activitynet_qa.py`` for QA,
``evaluate_benchmark_{1..5}_*.py`` for VCGBench), character for character, and only ``model``
and ``messages`` (``--temperature`` adds one). The original used ``gpt-3.5-turbo-0613``, which
OpenAI has retired: scores from another judge model are not the paper's. VCGBench consistency
sends the record's ``Q1`` as both questions, as the original does
(``--consistency_question2 Q2`` sends each question). The reply is read with
``ast.literal_eval``; the summaries and the printed lines are the original's ("Yes count",
"No count", "Accuracy", "Average score"; "Average score for correctness", ...).

Resume: each verdict is stored as it arrives (``OUTPUT_DIR/<criterion>/<key>.json``, the
original's per-question files), so a rerun of the same command asks only what has no verdict.
Timeouts, HTTP 429 / 5xx and malformed replies are retried with backoff; a reply that does not
parse is asked again (``--parse_retries``). Questions still without a verdict are named in
``OUTPUT_DIR/results.json`` and the command exits with status 1 (rerun it). Results:
``OUTPUT_DIR/results.json`` (per criterion: the summary, the printed lines, counts, the
unparsable and failed questions) and ``OUTPUT_DIR/<criterion>.json`` (the original's combined
file).
"""

from __future__ import annotations

import os
import sys

from ppllava_jax import command_line
from ppllava_jax.judge.client import ChatClient, check_base_url
from ppllava_jax.judge.inputs import all_criteria
from ppllava_jax.judge.run import Settings, judge

PROG = "python -m ppllava_jax.judge"


def parse_args(argv: list[str] | None = None):
    p = command_line.argument_parser(__doc__, PROG)
    p.add_argument("--input", required=True, help="eval.py's results file or a judge input")
    p.add_argument("--model", required=True, help="the judge model the endpoint serves")
    p.add_argument(
        "--base_url",
        default="https://api.openai.com/v1",
        help="root of the OpenAI-compatible API (POST <base_url>/chat/completions)",
    )
    p.add_argument(
        "--api_key_env",
        default="OPENAI_API_KEY",
        help="environment variable holding the API key ('' for a server that needs none)",
    )
    p.add_argument(
        "--output_dir", default="", help="where the verdicts go (default: <input>_judge/)"
    )
    p.add_argument(
        "--criteria",
        default="",
        help=f"comma-separated, of {', '.join(all_criteria())} (default: all the input gives)",
    )
    p.add_argument("--workers", type=int, default=4, help="requests in flight")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one reply")
    p.add_argument("--retries", type=int, default=6, help="further tries of a failed request")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay, doubled each try")
    p.add_argument(
        "--parse_retries", type=int, default=2, help="asks again after an unparsable reply"
    )
    p.add_argument("--temperature", type=float, default=None, help="sent only when given")
    p.add_argument(
        "--consistency_question2",
        choices=("Q1", "Q2"),
        default="Q1",
        help="the field sent as VCGBench consistency's Question 2 (Q1: the original's)",
    )
    p.add_argument("--no_progress", action="store_true", help="print no progress lines")
    args = p.parse_args(argv)
    names = [c.strip() for c in args.criteria.split(",") if c.strip()]
    unknown = [c for c in names if c not in all_criteria()]
    if unknown:
        p.error(f"--criteria: unknown {unknown}; use {', '.join(all_criteria())}")
    args.criteria = names
    for flag in ("workers", "retries", "parse_retries"):
        if getattr(args, flag) < 0 or (flag == "workers" and args.workers < 1):
            p.error(f"--{flag} {getattr(args, flag)} is out of range")
    if args.timeout <= 0:
        p.error(f"--timeout {args.timeout:g} must be positive")
    return args


def api_key(env_name: str) -> str:
    """The key in ``env_name`` ("" when no variable is named); ValueError when it is unset."""
    if not env_name:
        return ""
    key = os.environ.get(env_name, "").strip()
    if not key:
        raise ValueError(
            f"no API key: the environment variable {env_name} is not set; export it, name "
            "another with --api_key_env, or --api_key_env='' for a server that needs none"
        )
    return key


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    base_url = check_base_url(args.base_url)
    if not os.path.isfile(args.input):
        raise FileNotFoundError(
            f"--input {args.input}: no such file (eval.py --benchmark openqa / vcgbench "
            "--out OUT.json writes OUT.json and the judge inputs beside it)"
        )
    client = ChatClient(
        base_url,
        args.model,
        api_key=api_key(args.api_key_env),
        timeout=args.timeout,
        retries=args.retries,
        backoff=args.backoff,
        temperature=args.temperature,
    )
    output_dir = args.output_dir or os.path.splitext(args.input)[0] + "_judge"
    settings = Settings(
        output_dir=output_dir,
        workers=args.workers,
        parse_retries=args.parse_retries,
        consistency_question2=args.consistency_question2,
        progress=not args.no_progress,
    )
    return judge(args.input, client, args.criteria, settings)


if __name__ == "__main__":
    command_line.report_user_errors(main)
    sys.exit(0)
