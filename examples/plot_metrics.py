"""Any run's metrics.jsonl -> loss, reward margin, KL, response length and win-rate curves: a PNG
when matplotlib is installed, a text table otherwise.

    python examples/plot_metrics.py oaif-out/metrics.jsonl [--png curves.png]
"""

import argparse
import json
import os

CURVES = [
    ("loss", "loss"),
    ("reward_margin", "reward margin (beta h)"),
    ("kl", "KL to reference (nats/seq)"),
    ("response_tokens", "response tokens"),
    ("reward_accuracy", "reward accuracy"),
]


def main(argv=None):
    p = argparse.ArgumentParser(description="Plot or tabulate an oaif metrics.jsonl.")
    p.add_argument("metrics", help="path to metrics.jsonl")
    p.add_argument("--png", default="", help="output image (default: beside the metrics file)")
    p.add_argument(
        "--every", type=int, default=0, help="table: one row every N steps (default: ~20 rows)"
    )
    a = p.parse_args(argv)
    with open(a.metrics) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    steps, evals = [r for r in rows if not r.get("eval")], [r for r in rows if r.get("eval")]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        every = a.every or max(1, len(steps) // 20)
        print(f"{'step':>5} " + " ".join(f"{k:>15}" for k, _ in CURVES))
        for r in steps[::every] + ([steps[-1]] if (len(steps) - 1) % every else []):
            print(f"{r['step']:>5} " + " ".join(f"{r[k]:>15.4f}" for k, _ in CURVES))
        for e in evals:
            print(
                f"eval step {e['step']}: win rate {e['win_rate']:.3f} "
                f"({e['n']} judged, {e['no_verdict']} no verdict)"
            )
        return
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, label) in zip(axes.flat, CURVES):
        ax.plot([r["step"] for r in steps], [r[key] for r in steps])
        ax.set(xlabel="step", title=label)
    ax = axes.flat[-1]
    ax.plot([e["step"] for e in evals], [e["win_rate"] for e in evals], "-o")
    ax.set(xlabel="step", title="win rate vs initial policy", ylim=(0, 1))
    fig.tight_layout()
    png = a.png or os.path.join(os.path.dirname(os.path.abspath(a.metrics)), "curves.png")
    fig.savefig(png, dpi=100)
    print(png)


if __name__ == "__main__":
    main()
