"""Online vs offline DAP, the paper's main comparison in miniature: the same loss, beta, optimiser,
prompts, steps and seed; the only difference is where the pairs come from. Online (OAIF): two fresh
samples of the current policy per prompt, labelled every step. Offline: two samples per prompt from
the initial policy, labelled once before training, then reused. Both are evaluated by win rate
against the initial policy on held-out prompts. Flags it does not know go to oaif.py unchanged.

    python examples/online_vs_offline.py --tiny      # tiny offline GPT-2, ~15 s on 2 idle cores
    python examples/online_vs_offline.py --model gpt2 --annotator claude --steps 500 --eval-every 50
    python examples/online_vs_offline.py --cpu --seed 1    # the real judge, 2 CPU cores (README)
    python examples/online_vs_offline.py --paper           # the real judge, one GPU

--cpu and --paper: SmolLM2-135M-Instruct trained, Qwen2.5-Coder-1.5B-Instruct as the hf: judge with
no instruction (the task's "Is this a good response?"), DPO; --cpu 20 steps of 4 prompts, 256 new
tokens, 32 held-out prompts every 10 steps, both arms about 2 hours (sized from measured step
times: README); --paper 200
steps of 16 prompts, 512 new tokens, 64 held-out prompts every 20 steps. A flag given as well wins.

Each invocation writes a new oaif-out/online_vs_offline/run-N (printed); with --out DIR, an arm
already finished there with the same flags is read, not run again.
"""

import argparse
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
from tiny_model import finished, resolve  # noqa: E402

import oaif  # noqa: E402


def interval(rate: float, n: int, z: float = 1.96) -> tuple:
    """A 95% Wilson interval for a win rate over n judged pairs (a tie counts 1/2)."""
    if not n:
        return float("nan"), float("nan")
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


REAL = dict(
    model="HuggingFaceTB/SmolLM2-135M-Instruct", annotator="hf:Qwen/Qwen2.5-Coder-1.5B-Instruct"
)
PRESETS = {  # what a flag left out means
    "none": dict(steps=40, eval_every=10, eval_prompts=16, batch_size=8, max_new_tokens=32),
    "cpu": dict(REAL, steps=20, eval_every=10, eval_prompts=32, batch_size=4, max_new_tokens=256),
    # 64 held out and 16 a step: the 40 built-in prompts and 120 more.
    "paper": dict(
        REAL,
        steps=200,
        eval_every=20,
        eval_prompts=64,
        batch_size=16,
        max_new_tokens=512,
        prompts=os.path.join(HERE, "paper_prompts.txt"),
    ),
}
PRESETS["none"]["annotator"] = "shorter"


def read(path, every, steps):
    """An arm's (training steps, evaluations): those every `every` steps and at the end; a resumed
    arm's file also holds the evaluation that ended its first run, which the other arm lacks."""
    with open(os.path.join(path, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    evals = [r for r in rows if r.get("eval") and (r["step"] % every == 0 or r["step"] == steps)]
    return [r for r in rows if not r.get("eval")], evals


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Online vs offline DAP with the same budget; win rate vs step."
    )
    p.add_argument("--model", default=None, help="hub id or folder (or --tiny)")
    p.add_argument(
        "--tiny", action="store_true", help="build the tests' tiny random GPT-2 offline and use it"
    )
    p.add_argument(
        "--out", default="", help="output folder (default: oaif-out/online_vs_offline/run-N)"
    )
    p.add_argument("--cpu", action="store_true", help="the real judge, sized for 2 CPU cores")
    p.add_argument("--paper", action="store_true", help="the real judge, sized for one GPU")
    p.add_argument("--steps", type=int, default=None, help="default 40")
    p.add_argument("--eval-every", type=int, default=None, help="default 10")
    p.add_argument("--eval-prompts", type=int, default=None, help="default 16")
    p.add_argument("--batch-size", type=int, default=None, help="default 8")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 32")
    p.add_argument("--lr", type=float, default=None, help="default: 3e-3 with --tiny, else 1e-5")
    p.add_argument("--loss", default="dpo")
    p.add_argument("--annotator", default=None, help="default: shorter")
    p.add_argument("--eval-annotator", default="")
    p.add_argument("--prompts", default=None, help="default: oaif's (--paper: paper_prompts.txt)")
    p.add_argument("--seed", type=int, default=0)
    a, passthrough = p.parse_known_args(argv)
    preset = PRESETS["paper" if a.paper else "cpu" if a.cpu else "none"]
    for k, v in preset.items():
        setattr(a, k, v if getattr(a, k) is None else getattr(a, k))
    a.prompts = a.prompts or ""
    if a.eval_every <= 0:
        p.error("--eval-every must be > 0: the comparison is the win rate over the steps")
    a.model, out, lr = resolve(p, a, "online_vs_offline")
    common = [
        *("--model", a.model, "--steps", str(a.steps), "--eval-every", str(a.eval_every)),
        *("--eval-prompts", str(a.eval_prompts), "--batch-size", str(a.batch_size)),
        *("--max-new-tokens", str(a.max_new_tokens), "--lr", str(lr), "--loss", a.loss),
        *("--annotator", a.annotator, "--seed", str(a.seed), "--sample-every", "0"),
        *("--eval-annotator", a.eval_annotator, "--prompts", a.prompts, *passthrough),
    ]
    arms = {}
    for arm in ("online", "offline"):
        arg = common + ["--output-dir", os.path.join(out, arm)] + ["--offline"] * (arm == "offline")
        if finished(arg):  # --out DIR, the same flags: read, not run again
            print(f"--- {arm}: finished with these flags, read from {out} ---", flush=True)
        else:
            print(f"--- {arm} ---", flush=True)
            oaif.main(arg)
        arms[arm] = read(os.path.join(out, arm), a.eval_every, a.steps)
    print(
        f"\nwin rate against the initial policy ({a.eval_prompts} held-out prompts, judge: "
        f"{a.eval_annotator or a.annotator}), and the mean length (characters) of the evaluated "
        f"responses; [a, b] the 95% interval\n{'step':>5} {'online':>20} {'offline':>20} "
        f"{'online len':>11} {'offline len':>12} {'initial len':>12}"
    )
    for on, off in zip(arms["online"][1], arms["offline"][1], strict=True):
        chars = on["policy_chars"], off["policy_chars"], on["reference_chars"]
        won = [
            f"{e['win_rate']:.3f} [{{:.2f}}, {{:.2f}}]".format(*interval(e["win_rate"], e["n"]))
            for e in (on, off)
        ]
        print(
            f"{on['step']:>5} {won[0]:>20} {won[1]:>20} "
            f"{chars[0]:>11.1f} {chars[1]:>12.1f} {chars[2]:>12.1f}"
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(install matplotlib for a plot) output: {out}")
        return arms
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for arm, style in (("online", "-o"), ("offline", "--s")):
        evals = arms[arm][1]
        ax[0].plot([e["step"] for e in evals], [e["win_rate"] for e in evals], style, label=arm)
        low, high = zip(*(interval(e["win_rate"], e["n"]) for e in evals))
        ax[0].fill_between([e["step"] for e in evals], low, high, alpha=0.2)
        ax[1].plot([e["step"] for e in evals], [e["policy_chars"] for e in evals], style, label=arm)
    ax[0].set(xlabel="step", ylabel="win rate vs initial policy", ylim=(0, 1))
    ax[1].set(xlabel="step", ylabel="response characters (evaluation)")
    for x in ax:
        x.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "online_vs_offline.png"), dpi=100)
    print(f"plot: {os.path.join(out, 'online_vs_offline.png')}\noutput: {out}")
    return arms


if __name__ == "__main__":
    main()
