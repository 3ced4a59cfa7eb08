"""Time the online step, and what a slow annotator adds to it: the same run (seed, model, prompts)
once with the zero-latency `shorter` rule and once with Claude's annotator talking to the stand-in
Messages API that answers each request after --latency seconds. oaif sends the annotation requests
as soon as the responses are decoded and computes the policy and reference log-probs while they are
in flight, so the slow judge should cost little. Reports the median step time (the first step, a
warm-up, left out) and its split.

    python examples/bench_step.py    # random GPT-2 small (124M), 8 prompts, 64 new tokens, CPU
    python examples/bench_step.py --model tiny
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
from standin_messages_api import StandInMessagesAPI  # noqa: E402
from tiny_model import build_gpt2_small, build_tiny_model  # noqa: E402

import oaif  # noqa: E402

KEYS = ("seconds", "sample_s", "train_s", "annotate_s", "annotate_wait_s")


def run(model, out, annotator, a, env):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        args = ["--model", model, "--output-dir", out, "--annotator", annotator]
        args += ["--steps", str(a.steps), "--batch-size", str(a.batch_size)]
        args += ["--max-new-tokens", str(a.max_new_tokens), "--lr", str(a.lr)]
        args += ["--sample-every", "0", "--seed", str(a.seed), "--dtype", a.dtype]
        oaif.main(args)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f][1:]  # step 1 warms up
    return {k: statistics.median(r[k] for r in rows) for k in KEYS}


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Online step time: zero-latency rule vs a slow stand-in Claude."
    )
    p.add_argument(
        "--model",
        default="gpt2-small",
        help="gpt2-small (random, built offline), tiny, or a folder",
    )
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--latency", type=float, default=1.0, help="seconds the stand-in API takes per answer"
    )
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = tempfile.mkdtemp(prefix="oaif-step-")
    builders = {"gpt2-small": build_gpt2_small, "tiny": build_tiny_model}
    model = builders.get(a.model, lambda path: a.model)(os.path.join(out, "model"))

    server = StandInMessagesAPI(delay=a.latency)
    try:
        rule = run(model, os.path.join(out, "rule"), "shorter", a, {})
        slow = run(
            model,
            os.path.join(out, "claude"),
            "claude",
            a,
            {"ANTHROPIC_API_KEY": "stand-in", "ANTHROPIC_BASE_URL": server.url},
        )
    finally:
        server.close()
    print(
        f"\nmodel {a.model}, {a.batch_size} prompts/step, {a.max_new_tokens} new tokens, "
        f"{a.dtype}, median of steps 2..{a.steps}"
    )
    print(f"{'annotator':>24} " + " ".join(f"{k:>16}" for k in KEYS))
    for name, r in (("shorter (0 s)", rule), (f"stand-in Claude ({a.latency:g} s)", slow)):
        print(f"{name:>24} " + " ".join(f"{r[k]:>16.3f}" for k in KEYS))
    print(f"slow annotator / rule: {slow['seconds'] / rule['seconds']:.3f}x step time")
    return rule, slow


if __name__ == "__main__":
    main()
