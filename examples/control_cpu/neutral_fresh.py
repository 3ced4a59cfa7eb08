"""The three arms' final policies against the initial one on prompts no arm trained on (the first N
of examples/fresh_prompts_5.txt; the arms trained on the 40 built-in prompts), judged by the neutral
judge (no instruction: "Is this a good response?"): length_control.py's neutral win rate, with more
prompts than its 16 held-out ones. Answers drawn as oaif's evaluation draws them (the arms' seed,
temperature, cap and batch size), every model the same random draws.

    python examples/control_cpu/neutral_fresh.py SMOLLM2 hf:QWEN1.5B ARMS_FOLDER [N]
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
from length_control import neutral_win_rates  # noqa: E402
from online_vs_offline import interval  # noqa: E402

initial, judge, arms_folder = sys.argv[1:4]
n = int(sys.argv[4]) if len(sys.argv) > 4 else 40
with open(os.path.join(HERE, "..", "fresh_prompts_5.txt")) as f:
    prompts = [line.strip() for line in f if line.strip()][:n]
args = {}
for arm in ("helpful", "short", "very_short"):
    with open(os.path.join(arms_folder, arm, "oaif_config.json")) as f:
        saved = json.load(f)
    draws = ("seed", "temperature", "max_new_tokens", "batch_size")
    args[arm] = ["--model", initial, "--output-dir", os.path.join(arms_folder, arm)]
    args[arm] += [x for k in draws for x in (f"--{k.replace('_', '-')}", str(saved[k]))]
rows = neutral_win_rates(args, judge, prompts)
for arm, r in rows.items():
    low, high = interval(r["win_rate"], r["n"])
    r.update(low=low, high=high)
    print(
        f"{arm}: win rate vs initial {r['win_rate']:.2f} [{low:.2f}, {high:.2f}] "
        f"({r['wins']} won, {r['ties']} tied of {r['n']}); answers {r['policy_chars']:.0f} chars "
        f"(initial {r['reference_chars']:.0f})"
    )
print(json.dumps(rows))
