"""Seconds per judgment of the `--annotator hf:DIR` judge, one question a response against the
instruction's question and the debias's "Is this a good response?", now and (--before F, an older
oaif.py, e.g. `git show main:oaif.py > F`) before, on the same pairs, configurations alternating:

    now          oaif.LocalJudgeAnnotator: the examples read once a call, each response once, each
                 question after a copy of the response's KV cache
    before       F's LocalJudgeAnnotator (before one pass per response: each question re-read the
                 response, batches of 8 by length)

each with --debias 0 (one question) and the default 0.25 (two), in the judge's dtype (--dtype;
auto: oaif.judge_dtype). Both judges are asked the same question (the old one's, so that the new
one writes none). Then the exactness check: the new judge's log-odds against every whole input
read alone, uncached and unpadded (the plain forward), both questions.

    OMP_NUM_THREADS=2 python examples/bench_judge.py --judge /path/to/Qwen2.5-1.5B-Instruct \\
        --before /tmp/oaif_main.py --pairs 4
"""

import argparse
import importlib.util
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
    old = getattr(versions.get("before"), "judge_question", None)
    question = old("helpful", a.instruction) if old else ""
    judges = {}
    for name, module in versions.items():
        for debias in (0.0, 0.25):
            kw = dict(question=question) if name == "now" else {}
            judges[name, debias] = module.LocalJudgeAnnotator(
                model, tok, instruction=a.instruction, debias=debias, **kw
            )
    print(f"question: {judges['now', 0.0].question!r}", flush=True)
    seconds = {c: [] for c in judges}
    for rep in range(a.repeats):
        for c in list(judges) if rep % 2 == 0 else list(judges)[::-1]:
            t = time.perf_counter()
            judges[c](prompts, first, second)
            seconds[c].append(time.perf_counter() - t)
            print(
                f"  round {rep + 1}: {c[0]:6s} debias {c[1]:.2f}: {seconds[c][-1]:6.1f} s",
                flush=True,
            )
    print("\n| judge | questions a response | best s | s / judgment | vs one question |")
    print("|---|---|---|---|---|")
    for name in versions:
        one = min(seconds[name, 0.0])
        for debias in (0.0, 0.25):
            best = min(seconds[name, debias])
            what = "2 (+ the debias)" if debias else "1"
            print(f"| {name} | {what} | {best:.1f} | {best / len(rows):.2f} | {best / one:.2f}x |")
    judge, n = judges["now", 0.25], a.exact_pairs
    questions = [judge.question, judge.good]
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
