"""The paper's controllability result: the same run once per arm, the annotator told different
things, the mean response length per step side by side, then each run's win rate against the
initial policy: under its own instruction (oaif's evaluation) and under a neutral judge (the same
judge with no instruction), with a 95% interval. --arms paper: the paper's three (no instruction,
"helpful and short", "helpful and very short"); --arms two (the default): "Prefer the more detailed
response." and "Prefer the more concise response.".

The annotator: --judge (hf:MODEL a local LLM judge, or claude; a reward model reads no
instruction, so it cannot steer the arms apart); else Claude when
ANTHROPIC_API_KEY is set; else (--arms two only) the rule annotators `longer` and `shorter` stand in
for the two instructions (the script says which). Flags it does not know go to oaif.py unchanged
(--temperature 0.9, --dtype bfloat16, ...).

    python examples/length_control.py --smoke     # CPU, a minute: --paper's code path, tiny model
    python examples/length_control.py --paper     # one GPU: the paper-sized run, both arms at once
    python examples/length_control.py --tiny      # offline, rule annotators
    python examples/length_control.py --model gpt2 --steps 200    # Claude, with a key

--paper: the paper's three arms, SmolLM2-135M-Instruct trained, Qwen2.5-Coder-1.5B-Instruct judging
(hf:, pointwise), 150 steps of 16 prompts, 512 new tokens (a cap the arms rarely reach: the share
cut is in the table), lr 1e-5, --dtype bfloat16, --min-confidence 0.01, 64 held-out prompts, the
arms side by side (--parallel); a flag given as well wins (--paper --steps 300). --cpu: the same
arms and models sized for 2 CPU cores (README: how). --smoke: --paper's code path on the tests'
tiny random GPT-2, its own judge, 2 steps of 2 prompts.
Each invocation writes a new oaif-out/length_control/run-N (or --out DIR): control.md (the result
table, markdown), control.png (with matplotlib), ARM.log (--parallel) and a folder per arm.
"""

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
from online_vs_offline import interval  # noqa: E402
from tiny_model import finished, resolve  # noqa: E402

import oaif  # noqa: E402

ARMS = {  # arm: its instruction, and the rule standing in for it (where lengths should go)
    "two": {
        "detailed": ("Prefer the more detailed response.", "longer"),
        "concise": ("Prefer the more concise response.", "shorter"),
    },
    # The paper's Figure 6 (about 120, 90 and 40 tokens); no rule stands in for "helpful".
    "paper": {
        "helpful": ("", None),
        "short": ("helpful and short", "shorter"),
        "very_short": ("helpful and very short", "shorter"),
    },
}
# The paper's arms, SmolLM2-135M-Instruct trained, Qwen2.5-Coder-1.5B-Instruct judging.
REAL = dict(
    model="HuggingFaceTB/SmolLM2-135M-Instruct",
    judge="hf:Qwen/Qwen2.5-Coder-1.5B-Instruct",
    arms="paper",
)
PRESETS = {  # what a flag left out means
    "paper": dict(
        REAL,
        steps=150,
        batch_size=16,
        max_new_tokens=512,
        lr=1e-5,
        eval_prompts=64,
        parallel=True,
    ),
    # 2 CPU cores, one arm at a time, about 1 h 40 min in all (README: the step times it was sized
    # from); lr 3e-5 to move in 16 steps (0.44x for "very short" over the last 10 at 0e6b61b; 12
    # steps left 0.68x, their last 10 still holding the long early steps).
    "cpu": dict(
        REAL,
        steps=16,
        batch_size=4,
        max_new_tokens=256,
        lr=3e-5,
        eval_prompts=16,
        parallel=False,
    ),
    "smoke": dict(
        steps=2, batch_size=2, max_new_tokens=8, eval_prompts=2, parallel=True, arms="paper"
    ),
    "none": dict(
        steps=60, batch_size=8, max_new_tokens=48, eval_prompts=8, parallel=False, arms="two"
    ),
}
# The judge's p sits near 1/2; bf16 on a GPU (a CPU without bf16 units runs it 4x slower).
# --paper holds out 64 prompts and trains on 16 a step: the 40 built-in ones and 120 more.
PRESET_OAIF = {
    "paper": [
        *("--dtype", "bfloat16", "--min-confidence", "0.01"),
        *("--prompts", os.path.join(HERE, "paper_prompts.txt")),
    ],
    "smoke": ["--dtype", "bfloat16", "--min-confidence", "0.01"],
    "cpu": ["--min-confidence", "0.01"],
    "none": [],
}
FIRST, LAST = 10, 10  # the table's windows: the first steps (before the last ones) and the last


def run_side_by_side(args: dict, out: str) -> None:
    """Each arm its own oaif.py process (half the CPU cores each; on a GPU they share it), console
    to OUT/ARM.log. When one fails the other is stopped, and one line says which and its log."""
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2)))
    logs = {name: os.path.join(out, f"{name}.log") for name in args}
    procs, t0, shown = {}, time.time(), time.time()
    total = {name: oaif.parse_args(arg).steps for name, arg in args.items()}
    try:
        for name, arg in args.items():
            with open(logs[name], "w") as log:
                cmd = [sys.executable, os.path.join(HERE, "..", "oaif.py"), *arg]
                procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        print(f"{' and '.join(procs)} side by side; logs: {', '.join(logs.values())}", flush=True)
        while procs:
            for name, proc in list(procs.items()):
                if proc.poll() is None:
                    continue
                del procs[name]
                if proc.returncode:
                    with open(logs[name], errors="replace") as f:
                        lines = [s for s in f.read().replace("\r", "\n").splitlines() if s.strip()]
                    why = lines[-1] if lines else "no output"
                    stopped = f"; stopped {' and '.join(procs)}" if procs else ""
                    raise SystemExit(
                        f"length_control: the {name} arm failed (exit "
                        f"{proc.returncode}: {why}); log: {logs[name]}{stopped}"
                    )
            if time.time() - shown > 60:  # a long run says how far it is, and how long to go
                shown = time.time()
                done = {k: sum(not r.get("eval") for r in metrics(arg)) for k, arg in args.items()}
                left = max((shown - t0) * (total[k] - n) / max(n, 1) for k, n in done.items())
                steps = ", ".join(f"{k} {n}/{total[k]}" for k, n in done.items())
                print(
                    f"{shown - t0:.0f} s: steps {steps}; about {left / 60:.0f} min to go",
                    flush=True,
                )
            time.sleep(0.2)
    finally:  # an arm failed, Ctrl-C, anything: no arm is left running
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def metrics(arg: list) -> list:
    """An arm's metrics.jsonl rows (training steps, then evaluations); none yet: []."""
    path = os.path.join(arg[arg.index("--output-dir") + 1], "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]  # not one being written


def neutral_win_rates(args: dict, judge: str, prompts=None) -> dict:
    """Each arm's final policy against the initial one, on oaif's held-out prompts (or `prompts`)
    and drawn as its evaluation draws them (the same seed), judged by `judge` with no instruction:
    the task's own criterion ("helpful") alone. (oaif.py's --eval-annotator gets the training
    --instruction.)"""
    cfg = oaif.parse_args(next(iter(args.values())))
    device = torch.device(
        cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    prompts = prompts or oaif.split_prompts(cfg)[0]
    initial, tokenizer = oaif.load_model(cfg.model, device)

    def answers(model):
        return oaif.sample_answers(
            model, tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, cfg.batch_size, cfg.seed
        )

    models = {"device": device, cfg.model: (initial, tokenizer)}  # a judge that is --model: shared
    neutral = dataclasses.replace(cfg, instruction="", judge_question="")
    annotator = oaif.make_annotator(judge, neutral, models, cfg.annotator_model)
    reference, wins = answers(initial), {}
    for name, arg in args.items():
        policy = oaif.load_model(oaif.parse_args(arg).output_dir, device)[0]
        wins[name] = oaif.win_rate(prompts, answers(policy), reference, annotator)
    return wins


def check_judge(parser, flag: str, spec: str, rules: bool) -> None:
    """Refuse, as one line, a judge that could not be built: unknown, claude without a key, a
    model folder or hub id with no config; rm: and (for the neutral judge) the rules read no
    instruction, so they cannot steer the arms."""
    if not spec:
        return
    if spec == "claude" and not os.environ.get("ANTHROPIC_API_KEY"):
        parser.error(f"{flag} claude needs ANTHROPIC_API_KEY in the environment")
    models = ("hf:", "rm:") if rules else ("hf:",)
    names = ("claude", "shorter", "longer") if rules else ("claude",)
    if spec not in names and not (spec.startswith(models) and spec[3:]):
        parser.error(
            f"{flag} {spec}: use {', '.join(m + 'MODEL' for m in models)} or {', '.join(names)}"
        )
    if spec.startswith(("hf:", "rm:")):
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(spec[3:])
        except (OSError, ValueError) as e:
            why = str(e).strip().splitlines()[0]
            parser.error(f"{flag} {spec}: not a model folder here, nor loadable by name: {why}")
        if spec.startswith("rm:") and config.num_labels != 1:
            parser.error(f"{flag} {spec}: a reward model has one output, not {config.num_labels}")


def mean(rows: list, key: str = "response_tokens") -> float:
    """The mean of key over rows (nan where a row lacks it: an arm run before oaif logged it)."""
    return sum(r.get(key, math.nan) for r in rows) / max(1, len(rows))


def table(train: dict, evals: dict, neutral: dict, judge: str, arms: dict) -> str:
    """The result, markdown: mean response tokens of the first and the last steps' samples and the
    share cut at the cap, each arm's length against the first arm's, how far each policy went (KL),
    the held-out answers' length and the win rates against the initial policy (95% interval)."""
    n = min(len(rows) for rows in train.values())
    last = min(LAST, n)
    first = min(FIRST, max(1, n - last))
    span = lambda a, b: f"step {a}" if a == b else f"steps {a}–{b}"  # noqa: E731

    def won(e):
        low, high = interval(e["win_rate"], e["n"])
        counts = f"{e['wins']} won, {e['ties']} tied of {e['n']}"
        return f"{e['win_rate']:.2f} [{low:.2f}, {high:.2f}] ({counts})"

    base = next(iter(train))
    lines = [
        f"| arm: instruction | mean response tokens, {span(1, first)} | {span(n - last + 1, n)} "
        f"| cut at the cap, {span(n - last + 1, n)} | vs {base} | KL to initial, nats/response "
        "| held-out answer chars, initial → final | win rate vs initial, neutral judge "
        "| win rate vs initial, own instruction |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ends = {name: mean(rows[n - last : n]) for name, rows in train.items()}
    for name, rows in train.items():
        instruction = arms[name][0] or "(none)"
        start, end, e = mean(rows[:first]), ends[name], evals[name]
        cut = mean(rows[n - last : n], "cut_share")
        kl = mean(rows[n - last : n], "kl")  # summed log-ratio of the samples: how far it went
        chars = f"{e['reference_chars']:.0f} → {e['policy_chars']:.0f}"
        fair = won(neutral[name]) if name in neutral else "–"
        lines.append(
            f"| {name}: {instruction} | {start:.1f} | {end:.1f} | {cut:.0%} | "
            f"{end / ends[base]:.2f}x | {kl:.1f} | {chars} | {fair} | {won(e)} |"
        )
    note = f"neutral judge: {judge or 'none (--neutral-judge none, or rule annotators)'}"
    if set(arms) == {"detailed", "concise"}:
        goal = f"detailed / concise {ends['detailed'] / ends['concise']:.2f}x (goal ≥ 2x)"
    else:
        order = ends["helpful"] > ends["short"] > ends["very_short"]
        goal = (
            f"lengths {'in' if order else 'NOT in'} the order asked; very short / helpful "
            f"{ends['very_short'] / ends['helpful']:.2f}x (goal ≤ 0.5x)"
        )
    return "\n".join(lines) + f"\n\n{goal}; {note}; a tie counts 1/2; [a, b] the 95% interval\n"


def plot(train, evals, neutral, path: str, title: str, cap: int, arms: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    # thin: each step (its prompts set the level); thick: the mean of 5 steps
    for name, rows in train.items():
        steps, tokens = [r["step"] for r in rows], [r["response_tokens"] for r in rows]
        line = ax.plot(steps, tokens, lw=0.7, alpha=0.5)[0]
        smooth = [sum(tokens[max(0, i - 4) : i + 1]) / min(i + 1, 5) for i in range(len(tokens))]
        fair = f", neutral {neutral[name]['win_rate']:.2f}" if name in neutral else ""
        label = (
            f"{arms[name][0] or 'no instruction'} (win rate {evals[name]['win_rate']:.2f}{fair})"
        )
        ax.plot(steps, smooth, color=line.get_color(), lw=2, label=label)
    ax.axhline(cap, color="grey", lw=0.5, ls="--")
    ax.set(xlabel="step", ylabel="mean response tokens", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description="One run per instruction: response length per step.")
    p.add_argument("--paper", action="store_true", help="the paper-sized run on one GPU (above)")
    p.add_argument("--cpu", action="store_true", help="--paper's arms and models, 2 CPU cores")
    p.add_argument(
        "--arms",
        default=None,
        choices=sorted(ARMS),
        help="two: detailed and concise (the default); paper: none, short, very short",
    )
    p.add_argument("--smoke", action="store_true", help="--paper's code path, tiny model, 2 steps")
    p.add_argument("--model", default=None, help="hub id or folder (or --tiny)")
    p.add_argument("--tiny", action="store_true", help="build the tests' tiny random GPT-2, use it")
    p.add_argument("--judge", default=None, help="both runs' annotator: hf:MODEL or claude")
    p.add_argument(
        "--neutral-judge",
        default=None,
        help="judges the win rates, no instruction: hf:MODEL, claude, rm:MODEL (default: --judge;"
        " none: skip)",
    )
    p.add_argument(
        "--out",
        default="",
        help="output folder (default: a new oaif-out/length_control/run-N); an arm finished "
        "there with the same flags is read, not run again",
    )
    p.add_argument("--steps", type=int, default=None, help="default 60 (--paper 150, --cpu 16)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8 (--paper 16, --cpu 4)")
    p.add_argument(
        "--max-new-tokens", type=int, default=None, help="default 48 (--paper 512, --cpu 256)"
    )
    p.add_argument(
        "--lr", type=float, default=None, help="default: 3e-3 with --tiny, --cpu 3e-5, else 1e-5"
    )
    p.add_argument(
        "--eval-prompts", type=int, default=None, help="default 8 (--paper 64, --cpu 16)"
    )
    p.add_argument("--eval-every", type=int, default=0, help="win rate every N steps (0: at end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--parallel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the arms at once, a process each (the cores shared), consoles to OUT/ARM.log",
    )
    p.add_argument("--png", default="", help="the plot's file (default: OUT/control.png)")
    a, passthrough = p.parse_known_args(argv)
    if a.paper + a.cpu + a.smoke > 1:
        p.error("--paper, --cpu and --smoke are presets: give one")
    preset = "paper" if a.paper else "cpu" if a.cpu else "smoke" if a.smoke else "none"
    for k, v in PRESETS[preset].items():
        setattr(a, k, v if getattr(a, k) is None else getattr(a, k))
    # The arms differ by --instruction: one --judge-question would ask them all the same.
    if any(x.split("=")[0] == "--judge-question" for x in passthrough):
        p.error("--judge-question would ask every arm one question; the arms differ by instruction")
    a.tiny = a.tiny or a.smoke
    passthrough = PRESET_OAIF[preset] + passthrough  # the user's come later
    if a.paper and not torch.cuda.is_available():
        print("--paper is sized for a GPU; on this CPU it will take many hours (--smoke: a minute)")
    # The judges are checked now, not after hours of training.
    check_judge(p, "--judge", a.judge, rules=False)
    check_judge(p, "--neutral-judge", a.neutral_judge if a.neutral_judge != "none" else "", True)
    if a.arms != "two" and not (a.judge or a.smoke or os.environ.get("ANTHROPIC_API_KEY")):
        p.error("no rule stands in for --arms paper's 'helpful': give --judge hf:MODEL or claude")
    a.model, out, lr = resolve(p, a, "length_control")
    judge = a.judge or ("claude" if os.environ.get("ANTHROPIC_API_KEY") else "")
    judge = f"hf:{a.model}" if a.smoke and not a.judge else judge  # the tiny model judges itself
    neutral_judge = "" if a.neutral_judge == "none" else a.neutral_judge or judge
    arms = ARMS[a.arms]
    print(f"annotator: {judge or 'rule annotators longer / shorter (no API key, no --judge)'}")
    args = {}
    for name, (instruction, rule) in arms.items():
        # a rule reads no instruction (oaif refuses one): the rule itself stands in for it
        annotator = ["--annotator", judge] if judge else ["--annotator", rule]
        annotator += ["--instruction", instruction] if judge and instruction else []
        if a.smoke and not a.judge and instruction:  # the random tiny judge writes no question
            annotator += ["--judge-question", f"Is this a {name} response?"]
        args[name] = [
            *("--model", a.model, "--output-dir", os.path.join(out, name), "--seed", str(a.seed)),
            *("--steps", str(a.steps), "--batch-size", str(a.batch_size), "--lr", str(lr)),
            *("--max-new-tokens", str(a.max_new_tokens), "--eval-prompts", str(a.eval_prompts)),
            *("--eval-every", str(a.eval_every or a.steps), "--sample-every", str(5 * a.parallel)),
            *annotator,
            *passthrough,
        ]
    todo = {k: v for k, v in args.items() if not finished(v)}  # other flags: run (--overwrite)
    for name in args.keys() - todo.keys():
        print(f"{name}: finished with these flags, read from {out}")
    t0 = time.time()
    if a.parallel and todo:
        run_side_by_side(todo, out)
    elif todo:
        for name, arg in todo.items():
            print(f"--- {name}: {arms[name][0]!r} ---", flush=True)
            oaif.main(arg)
    t1 = time.time()
    runs = {name: metrics(arg) for name, arg in args.items()}
    train = {k: [r for r in v if not r.get("eval")] for k, v in runs.items()}
    evals = {k: [r for r in v if r.get("eval")][-1] for k, v in runs.items()}
    print(f"\nmean response tokens per step (cap {a.max_new_tokens})")
    print(f"{'step':>5}" + "".join(f" {name:>10}" for name in arms))
    every = max(1, a.steps // 15)  # about 15 lines
    for rows in zip(*train.values(), strict=True):
        if rows[0]["step"] % every == 0 or rows[0]["step"] in (1, a.steps):
            print(
                f"{rows[0]['step']:>5}" + "".join(f" {r['response_tokens']:>10.1f}" for r in rows)
            )
    neutral = neutral_win_rates(args, neutral_judge) if neutral_judge else {}
    result = table(train, evals, neutral, neutral_judge, arms)
    with open(os.path.join(out, "control.md"), "w") as f:
        f.write(result)
    print(f"\n{result}")
    png, short = a.png or os.path.join(out, "control.png"), os.path.basename
    title = f"{short(a.model.rstrip('/'))}, annotator {short(judge) or 'rules'}, lr {lr}, "
    title += f"{a.steps} steps x {a.batch_size} prompts"
    try:
        plot(train, evals, neutral, png, title, a.max_new_tokens, arms)
        print(f"plot: {png}")
    except ImportError:
        if a.png:
            raise
        print("(pip install matplotlib for the plot)")
    print(f"training {t1 - t0:.0f} s, neutral judge and table {time.time() - t1:.0f} s; out: {out}")
    return runs


if __name__ == "__main__":
    main()
