"""The three arms' final policies against the initial one on prompts no arm trained on (the first N
of examples/fresh_prompts_5.txt; the arms trained on the 40 built-in prompts), judged by the neutral
judge (no instruction: "Is this a good response?"), as length_control.py's neutral win rate is, with
more prompts than its 16 held-out ones. Answers drawn as oaif's evaluation draws them (seed 0, the
arms' temperature and cap), every model the same random draws.

    python examples/control_cpu/neutral_fresh.py SMOLLM2 hf:QWEN1.5B ARMS_FOLDER [N]
"""

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, ".."))
from online_vs_offline import interval  # noqa: E402

import oaif  # noqa: E402

initial_name, judge, arms_folder = sys.argv[1:4]
n = int(sys.argv[4]) if len(sys.argv) > 4 else 40
with open(os.path.join(HERE, "..", "fresh_prompts_5.txt")) as f:
    prompts = [line.strip() for line in f if line.strip()][:n]
arms = ("helpful", "short", "very_short")
with open(os.path.join(arms_folder, arms[0], "oaif_config.json")) as f:
    cfg = oaif.parse_args(["--model", initial_name])
    saved = json.load(f)
device = oaif.torch.device("cpu")
initial, tokenizer = oaif.load_model(initial_name, device)
t0 = time.time()


def answers(model):
    return oaif.sample_answers(
        model, tokenizer, prompts, saved["max_new_tokens"], saved["temperature"], 4, saved["seed"]
    )


reference = answers(initial)
models = {"device": device, initial_name: (initial, tokenizer)}
annotator = oaif.make_annotator(judge, cfg, models, cfg.annotator_model)
rows = {}
for arm in arms:
    policy = oaif.load_model(os.path.join(arms_folder, arm), device)[0]
    r = oaif.win_rate(prompts, answers(policy), reference, annotator)
    low, high = interval(r["win_rate"], r["n"])
    rows[arm] = dict(r, low=low, high=high)
    print(
        f"{arm}: win rate vs initial {r['win_rate']:.2f} [{low:.2f}, {high:.2f}] "
        f"({r['wins']} won, {r['ties']} tied of {r['n']}); answers {r['policy_chars']:.0f} chars "
        f"(initial {r['reference_chars']:.0f}); {time.time() - t0:.0f} s",
        flush=True,
    )
print(json.dumps(rows))
