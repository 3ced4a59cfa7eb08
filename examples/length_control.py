"""The paper's controllability result: the same run twice, the annotator told two different things ("prefer the
more detailed response" / "prefer the more concise response"), the mean response length per step side by side,
then each run's win rate against the initial policy judged under its own instruction.

The annotator: --judge (hf:MODEL a local LLM judge, claude, rm:MODEL); else Claude when ANTHROPIC_API_KEY is
set; else the rule annotators `longer` and `shorter` stand in for the two instructions (the script says which).
Flags it does not know go to oaif.py unchanged (--temperature 0.9, --dtype bfloat16, ...).

    python examples/length_control.py --tiny                            # offline, rule annotators
    python examples/length_control.py --model gpt2 --steps 200          # Claude, with a key
    python examples/length_control.py --model HuggingFaceTB/SmolLM2-135M-Instruct --judge hf:Qwen/Qwen2.5-Coder-1.5B-Instruct \
        --steps 40 --batch-size 4 --max-new-tokens 256 --lr 1e-5 --parallel --png control.png
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
import oaif  # noqa: E402
from tiny_model import resolve  # noqa: E402

INSTRUCTIONS = {"detailed": ("Prefer the more detailed response.", "longer"),
                "concise": ("Prefer the more concise response.", "shorter")}


def finished(arg: list) -> bool:
    """An arm already run in --out with these very flags (its oaif_config.json says so): read, not run again."""
    path = os.path.join(arg[arg.index("--output-dir") + 1], "oaif_config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        saved = json.load(f)
    cfg = dataclasses.asdict(oaif.parse_args(arg))
    cfg["beta"] = oaif.DEFAULT_BETA[cfg["loss"]] if cfg["beta"] is None else cfg["beta"]  # as the run saved it
    return all(saved.get(k) == v for k, v in cfg.items() if k not in ("sample_every", "resume", "overwrite"))


def main(argv=None):
    p = argparse.ArgumentParser(description="Two instructions, two runs: response length per step.")
    p.add_argument("--model", default="", help="hub id or folder (or --tiny)")
    p.add_argument("--tiny", action="store_true", help="build the tests' tiny random GPT-2 offline and use it")
    p.add_argument("--judge", default="", help="the annotator of both runs: hf:MODEL, claude or rm:MODEL")
    p.add_argument("--out", default="", help="output folder (default: a temporary one)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--lr", type=float, default=None, help="default: 3e-3 with --tiny, else 1e-5")
    p.add_argument("--eval-prompts", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=0, help="win rate every N steps (default: at the end only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parallel", action="store_true", help="both runs at once, each in its own process and "
                   "half the cores; their consoles go to OUT/NAME.log")
    p.add_argument("--png", default="", help="plot the two length curves here (needs matplotlib)")
    a, passthrough = p.parse_known_args(argv)
    a.model, out, lr = resolve(p, a, "oaif-length-")
    judge = a.judge or ("claude" if os.environ.get("ANTHROPIC_API_KEY") else "")
    print(f"annotator: {judge or 'rule annotators longer / shorter (no ANTHROPIC_API_KEY, no --judge)'}")
    args = {name: ["--model", a.model, "--output-dir", os.path.join(out, name), "--steps", str(a.steps),
                   "--batch-size", str(a.batch_size), "--max-new-tokens", str(a.max_new_tokens), "--lr", str(lr),
                   "--annotator", judge or rule, "--seed", str(a.seed),
                   *(["--instruction", instruction] if judge else []),  # a rule reads no instruction
                   "--eval-every", str(a.eval_every or a.steps), "--eval-prompts", str(a.eval_prompts),
                   "--sample-every", "5" if a.parallel else "0", *passthrough]
            for name, (instruction, rule) in INSTRUCTIONS.items()}
    args = {k: v for k, v in args.items() if not finished(v)}  # other flags: run again (--overwrite to replace it)
    if a.parallel:  # one process each, half the cores each: both curves grow side by side
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2)))
        os.makedirs(out, exist_ok=True)
        logs = {name: open(os.path.join(out, f"{name}.log"), "w") for name in args}
        procs = {name: subprocess.Popen([sys.executable, os.path.join(HERE, "..", "oaif.py"), *arg], env=env,
                                        stdout=logs[name], stderr=subprocess.STDOUT) for name, arg in args.items()}
        if any(proc.wait() for proc in procs.values()):
            raise SystemExit(f"a run failed: see {out}/*.log")
    else:
        for name, arg in args.items():
            print(f"--- {name}: {INSTRUCTIONS[name][0]!r} ---", flush=True)
            oaif.main(arg)
    runs = {}
    for name in INSTRUCTIONS:
        with open(os.path.join(out, name, "metrics.jsonl")) as f:
            runs[name] = [json.loads(line) for line in f]
    train = {k: [r for r in v if not r.get("eval")] for k, v in runs.items()}
    print(f"\nmean response tokens per step (cap {a.max_new_tokens})\n{'step':>5} {'detailed':>9} {'concise':>9}")
    for d, c in zip(train["detailed"], train["concise"]):
        print(f"{d['step']:>5} {d['response_tokens']:>9.1f} {c['response_tokens']:>9.1f}")
    wins = {}
    for name, rows in runs.items():
        e = [r for r in rows if r.get("eval")][-1]
        wins[name] = e["win_rate"]
        print(f"{name}: win rate vs the initial policy under its own instruction {e['win_rate']:.3f} "
              f"({e['n']} judged, {e['no_verdict']} no verdict); mean answer {e['policy_chars']:.0f} chars "
              f"vs the initial policy's {e['reference_chars']:.0f}")
    if a.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, rows in train.items():  # thin: each step (its prompts set the level); thick: 5-step mean
            steps, tokens = [r["step"] for r in rows], [r["response_tokens"] for r in rows]
            line = ax.plot(steps, tokens, lw=0.7, alpha=0.5)[0]
            mean = [sum(tokens[max(0, i - 4):i + 1]) / len(tokens[max(0, i - 4):i + 1]) for i in range(len(tokens))]
            ax.plot(steps, mean, color=line.get_color(), lw=2, label=f"{INSTRUCTIONS[name][0]} (win rate "
                    f"{wins[name]:.2f})")
        ax.axhline(a.max_new_tokens, color="grey", lw=0.5, ls="--")
        ax.set(xlabel="step", ylabel="mean response tokens", title=f"{os.path.basename(a.model.rstrip('/'))}, "
               f"annotator {os.path.basename(judge.rstrip('/')) if judge else 'rules'}, lr {lr}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.png, dpi=120)
        print(f"plot: {a.png}")
    return runs


if __name__ == "__main__":
    main()
