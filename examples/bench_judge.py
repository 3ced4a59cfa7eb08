"""Seconds per judgment of the `--annotator hf:DIR` judge, one question a response against two
(now: the question and its opposite; before: the question and the debias's "Is this a good
response?"), now and (--before F, an older oaif.py, e.g. `git show c7ff230:oaif.py > F`) before,
on the same pairs, configurations alternating:

    now          oaif.LocalJudgeAnnotator: the examples read once a call, each response once, each
                 question after a copy of the response's KV cache
    before       F's LocalJudgeAnnotator (before one pass per response: each question re-read the
                 response, batches of 8 by length)

in the judge's dtype (--dtype; auto: oaif.judge_dtype). Both judges are asked the same question
(--question; the new one also --opposite), so that neither writes its own. Then the exactness
check: the new judge's log-odds against every whole input read alone, uncached and unpadded (the
plain forward), both questions.

    OMP_NUM_THREADS=2 python examples/bench_judge.py --judge /path/to/Qwen2.5-1.5B-Instruct \\
        --before /tmp/oaif_main.py --pairs 4
"""

import argparse
import importlib.util
import inspect
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import torch  # noqa: E402

import oaif  # noqa: E402


def plain_scores(judge, prompts, responses, questions):
    """Every whole input alone, uncached, unpadded: the model's own last hidden state."""
    W = judge.model.get_output_embeddings().weight[judge.words].float()
    out = []
    with torch.inference_mode():
        for p, r in zip(prompts, responses):
            for q in questions:
                ids = (
                    judge.bos
                    + judge.tokenizer(judge.ask(p, r, q), add_special_tokens=False).input_ids
                )
                h = judge.model.base_model(torch.tensor([ids])).last_hidden_state[0, -1].float()
                s = h @ W.T / oaif.head_temperature(judge.model.config)
                out.append(float(s[0] - s[1]))
    return out


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--judge", required=True)
    p.add_argument("--before", default="", help="an older oaif.py to time too")
    p.add_argument(
        "--pairs", type=int, default=4, help="pairs from examples/judge_check.jsonl, kinds mixed"
    )
    p.add_argument("--repeats", type=int, default=1, help="rounds, alternating the order")
    p.add_argument("--exact-pairs", type=int, default=2, help="pairs for the exactness check")
    p.add_argument("--instruction", default="Prefer the more concise response.")
    p.add_argument("--question", default="Is this a concise response?")
    p.add_argument("--opposite", default="Is this a long response?")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--out", default="")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    rows = [
        json.loads(line) for line in open(os.path.join(HERE, "judge_check.jsonl")) if line.strip()
    ]
    kinds = [[r for r in rows if r["kind"] == k] for k in ("length", "topic", "fact")]
    # long and short answers mixed, as a policy's are
    rows = [r for group in zip(*kinds) for r in group][: a.pairs]
    prompts, first, second = ([r[k] for r in rows] for k in ("prompt", "a", "b"))
    dtype = oaif.judge_dtype(torch.device("cpu")) if a.dtype == "auto" else getattr(torch, a.dtype)
    model, tok = oaif.load_model(a.judge, torch.device("cpu"), dtype=dtype)
    model.requires_grad_(False)
    print(
        f"judge {os.path.basename(a.judge.rstrip('/'))} in {str(dtype)[6:]}: {len(rows)} pairs "
        f"({2 * len(rows)} responses), {torch.get_num_threads()} thread(s)",
        flush=True,
    )
    versions = {"now": oaif}
    if a.before:
        spec = importlib.util.spec_from_file_location("oaif_before", a.before)
        versions["before"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(versions["before"])
    judges = {}
    for name, module in versions.items():
        takes = inspect.signature(module.LocalJudgeAnnotator).parameters
        for two in (1, 2):
            if name == "now":
                kw = dict(question=f"{a.question} {a.opposite}" if two == 2 else a.question)
            elif "debias" in takes:  # the debias asked "good?"; c39a564's wrote its question itself
                kw = dict(debias=0.25 * (two - 1))
                kw.update(dict(question=a.question) if "question" in takes else {})
            else:  # an oaif with the opposite question
                kw = dict(question=f"{a.question} {a.opposite}" if two == 2 else a.question)
            judges[name, two] = module.LocalJudgeAnnotator(
                model, tok, instruction=a.instruction, **kw
            )
    print(f"questions: {judges['now', 2].questions}", flush=True)
    seconds = {c: [] for c in judges}
    for rep in range(a.repeats):
        for c in list(judges) if rep % 2 == 0 else list(judges)[::-1]:
            t = time.perf_counter()
            judges[c](prompts, first, second)
            seconds[c].append(time.perf_counter() - t)
            print(
                f"  round {rep + 1}: {c[0]:6s} {c[1]} question(s): {seconds[c][-1]:6.1f} s",
                flush=True,
            )
    print("\n| judge | questions a response | best s | s / judgment | vs one question |")
    print("|---|---|---|---|---|")
    for name in versions:
        one = min(seconds[name, 1])
        for two in (1, 2):
            best = min(seconds[name, two])
            what = (
                "1" if two == 1 else "2 (+ the opposite)" if name == "now" else "2 (+ the debias)"
            )
            print(f"| {name} | {what} | {best:.1f} | {best / len(rows):.2f} | {best / one:.2f}x |")
    judge, n = judges["now", 2], a.exact_pairs
    questions = judge.questions
    both = prompts[:n] * 2, first[:n] + second[:n]
    cached = judge.scores(*both, questions).flatten().tolist()
    whole = plain_scores(judge, *both, questions)
    diff = max(abs(x - y) for x, y in zip(cached, whole))
    print(
        f"\nnow vs every whole input read alone: max |Δ log-odds| {diff:.2e} ({len(whole)} scores)"
    )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(seconds={f"{c[0]} {c[1]}": s for c, s in seconds.items()}, diff=diff), f)


if __name__ == "__main__":
    main()
