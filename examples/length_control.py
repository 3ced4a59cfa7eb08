"""The paper's controllability result in miniature: the same short run twice, the annotator told two
different things ("prefer the more detailed response" / "prefer the more concise response"), and the mean
response length per step side by side, then each run's win rate against the initial policy judged under its
own instruction.

The annotator: Claude when ANTHROPIC_API_KEY is set; else a local LLM judge with --judge hf:MODEL; else
the rule annotators `longer` and `shorter` stand in for the two instructions (the script says which).

    python examples/length_control.py --tiny                            # offline, rule annotators
    python examples/length_control.py --model gpt2 --steps 200          # Claude, with a key
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
import oaif  # noqa: E402
from tiny_model import resolve  # noqa: E402

INSTRUCTIONS = {"detailed": ("Prefer the more detailed response.", "longer"),
                "concise": ("Prefer the more concise response.", "shorter")}


def main(argv=None):
    p = argparse.ArgumentParser(description="Two instructions, two runs: response length per step.")
    p.add_argument("--model", default="", help="hub id or folder (or --tiny)")
    p.add_argument("--tiny", action="store_true", help="build the tests' tiny random GPT-2 offline and use it")
    p.add_argument("--judge", default="", help="hf:MODEL, a local LLM judge, when no ANTHROPIC_API_KEY is set")
    p.add_argument("--out", default="", help="output folder (default: a temporary one)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--lr", type=float, default=None, help="default: 3e-3 with --tiny, else 1e-5")
    p.add_argument("--eval-prompts", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.model, out, lr = resolve(p, a, "oaif-length-")
    judge = "claude" if os.environ.get("ANTHROPIC_API_KEY") else a.judge
    print(f"annotator: {judge or 'rule annotators longer / shorter (no ANTHROPIC_API_KEY, no --judge)'}")
    runs = {}
    for name, (instruction, rule) in INSTRUCTIONS.items():
        print(f"--- {name}: {instruction!r} ---", flush=True)
        oaif.main(["--model", a.model, "--output-dir", os.path.join(out, name), "--steps", str(a.steps),
                   "--batch-size", str(a.batch_size), "--max-new-tokens", str(a.max_new_tokens), "--lr", str(lr),
                   "--annotator", judge or rule, "--instruction", instruction, "--seed", str(a.seed),
                   "--eval-every", str(a.steps), "--eval-prompts", str(a.eval_prompts), "--sample-every", "0"])
        with open(os.path.join(out, name, "metrics.jsonl")) as f:
            runs[name] = [json.loads(line) for line in f]
    train = {k: [r for r in v if not r.get("eval")] for k, v in runs.items()}
    print(f"\nmean response tokens per step (cap {a.max_new_tokens})\n{'step':>5} {'detailed':>9} {'concise':>9}")
    for d, c in zip(train["detailed"], train["concise"]):
        print(f"{d['step']:>5} {d['response_tokens']:>9.1f} {c['response_tokens']:>9.1f}")
    for name, rows in runs.items():
        e = [r for r in rows if r.get("eval")][-1]
        print(f"{name}: win rate vs the initial policy under its own instruction {e['win_rate']:.3f} "
              f"({e['n']} judged, {e['no_verdict']} no verdict)")
    return runs


if __name__ == "__main__":
    main()
