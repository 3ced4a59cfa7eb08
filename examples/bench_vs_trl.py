"""Step time of oaif against its peer, TRL's experimental OnlineDPOTrainer, on the same model (a
random GPT-2 small, 124M, built offline), prompts per step, response length, steps and CPU, one run
after the other. TRL's LLM judges are gone, so both sides get the same rule as a plain function: the
shorter response wins (TRL: reward = -characters); `--latency S` makes that function sleep S seconds
per call, like an LLM judge.

TRL is never a requirement of oaif: install it in a separate virtualenv and point --trl-python at
it.

    python -m venv /tmp/trl && /tmp/trl/bin/pip install torch==2.13.0 trl
    python examples/bench_vs_trl.py --trl-python /tmp/trl/bin/python
    python examples/bench_vs_trl.py --trl-python /tmp/trl/bin/python --latency 1
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))


def shorter_rewards(latency):
    def reward(prompts, completions, **kwargs):  # TRL's reward-function signature
        time.sleep(latency)
        return [-float(len(c)) for c in completions]

    return reward


def run_trl(model, prompts, a):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    tok = AutoTokenizer.from_pretrained(model)
    tok.pad_token = tok.eos_token
    # TRL's config defaults to bf16; both sides run float32 here
    cfg = OnlineDPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=a.batch_size,
        max_new_tokens=a.max_new_tokens,
        temperature=0.9,
        learning_rate=1e-5,
        max_steps=a.steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        gradient_checkpointing=a.trl_gradient_checkpointing,
        seed=a.seed,
        bf16=False,
    )
    trainer = OnlineDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model),
        ref_model=AutoModelForCausalLM.from_pretrained(model),
        reward_funcs=shorter_rewards(a.latency),
        args=cfg,
        processing_class=tok,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        callbacks=[StepTimer()],
    )
    trainer.train()
    return times


def run_oaif(model, prompts, a):
    import oaif

    out = tempfile.mkdtemp()

    def slow(p, x, y):
        time.sleep(a.latency)
        return oaif.shorter(p, x, y)

    cfg = oaif.Config(
        model=model,
        output_dir=out,
        steps=a.steps,
        batch_size=a.batch_size,
        max_new_tokens=a.max_new_tokens,
        lr=1e-5,
        sample_every=0,
        seed=a.seed,
    )
    oaif.train(cfg, annotator=slow)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["seconds"] for line in f]


def main(argv=None):
    p = argparse.ArgumentParser(
        description="oaif vs TRL OnlineDPOTrainer: step time on the same CPU work."
    )
    p.add_argument(
        "--trl-python", default=sys.executable, help="a python with trl (and datasets) installed"
    )
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--latency", type=float, default=0.0, help="seconds the annotator takes per call"
    )
    p.add_argument(
        "--trl-gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="TRL's OnlineDPOConfig default is on",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impl", choices=["oaif", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--model", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    import oaif

    prompts = oaif.DEFAULT_PROMPTS
    if a.impl:  # one side, in this process
        print(json.dumps((run_trl if a.impl == "trl" else run_oaif)(a.model, prompts, a)))
        return
    probe = subprocess.run(
        [a.trl_python, "-c", "import trl.experimental.online_dpo, datasets"], capture_output=True
    )
    if probe.returncode:
        print(
            f"bench_vs_trl: TRL's OnlineDPOTrainer is not importable with {a.trl_python}; "
            "install trl in a separate virtualenv and pass --trl-python (see --help). "
            "Nothing measured."
        )
        return
    from tiny_model import build_gpt2_small

    model = build_gpt2_small(os.path.join(tempfile.mkdtemp(), "gpt2-small-random"))
    flags = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in [
            ("steps", a.steps),
            ("batch_size", a.batch_size),
            ("max_new_tokens", a.max_new_tokens),
            ("latency", a.latency),
            ("seed", a.seed),
        ]
    ]
    flags += [
        "--trl-gradient-checkpointing"
        if a.trl_gradient_checkpointing
        else "--no-trl-gradient-checkpointing"
    ]
    result = {}
    for impl, python in (("oaif", sys.executable), ("trl", a.trl_python)):
        r = subprocess.run(
            [python, os.path.abspath(__file__), "--impl", impl, "--model", model, *flags],
            capture_output=True,
            text=True,
        )
        if r.returncode:
            sys.exit(f"bench_vs_trl: {impl} failed:\n{r.stderr[-2000:]}")
        result[impl] = json.loads(r.stdout.strip().splitlines()[-1])
    med = {k: statistics.median(v[1:]) for k, v in result.items()}  # step 1 warms up
    checkpointing = "on" if a.trl_gradient_checkpointing else "off"
    print(
        f"random GPT-2 small (124M), {a.batch_size} prompts x 2 samples, "
        f"{a.max_new_tokens} new tokens, CPU, annotator latency {a.latency:g} s, "
        f"TRL gradient checkpointing {checkpointing}"
    )
    print(
        f"{'':>6} "
        + " ".join(f"step {i + 1:>2}" for i in range(a.steps))
        + "   median of steps 2.."
    )
    for k, v in result.items():
        print(f"{k:>6} " + " ".join(f"{t:>7.2f}" for t in v) + f"   {med[k]:.2f} s")
    print(f"oaif / TRL step time: {med['oaif'] / med['trl']:.3f}")
    return med


if __name__ == "__main__":
    main()
