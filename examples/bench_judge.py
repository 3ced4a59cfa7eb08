"""Judgments per second of the `--annotator hf:DIR` judge (pointwise: one forward per response and
question; with an instruction hf: asks two, the instruction's and "good?", and this times the
first), with and without what makes it cheaper, on the same pairs, configurations alternating:

    plain   every input whole, in the order given, left-padded to its batch's longest (the judge
            before issue 16's item 3, verbatim)
    cached  oaif.LocalJudgeAnnotator: the head every response shares (chat template,
            "Conversation:") run once and its KV cache copied into each batch; batches of
            neighbours in length, right-padded

each in float32 (what the judge ran in under the default --dtype float32) and in bf16 (what
oaif.judge_dtype picks where bf16 matmuls are fast). The model file is bf16, so casting
float32 <-> bf16 loses nothing: one model serves all four. Reports seconds, judgments per second,
and the largest |difference| of verdicts P(first better) and of log-odds between configurations:
plain vs cached in one dtype is what caching and batching change; float32 vs bf16 in one path is
what bf16 changes.

    OMP_NUM_THREADS=1 python examples/bench_judge.py \
        --judge /path/to/Qwen2.5-1.5B-Instruct --pairs 8
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import torch  # noqa: E402

import oaif  # noqa: E402


class Plain(oaif.LocalJudgeAnnotator):
    @torch.inference_mode()
    def scores(self, prompts, responses):
        def tok(t):
            return self.tokenizer(t, add_special_tokens=False).input_ids

        # each whole input's own tokens, after the BOS the judge starts with (if any)
        seqs = [self.bos + tok("".join(self.ask(p, r))) for p, r in zip(prompts, responses)]
        W = self.model.get_output_embeddings().weight[self.words].float()
        out = []
        for i in range(0, len(seqs), self.batch_size):
            ids, mask = oaif.left_pad(seqs[i : i + self.batch_size], 0, self.model.device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            h = (
                self.model.base_model(
                    input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False
                )
                .last_hidden_state[:, -1]
                .float()
            )
            s = h @ W.T / oaif.head_temperature(self.model.config)
            out += (s[:, 0] - s[:, 1]).tolist()
            self.stats["annotator_requests"] += len(ids)
            self.stats["input_tokens"] += int(mask.sum())
        return out


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--judge", required=True)
    p.add_argument(
        "--pairs",
        type=int,
        default=8,
        help="pairs from examples/judge_check.jsonl, kinds interleaved",
    )
    p.add_argument(
        "--repeats", type=int, default=2, help="rounds of the four configurations, alternating"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--instruction", default="Prefer the more concise response.")
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
    model, tok = oaif.load_model(a.judge, torch.device("cpu"))
    model.requires_grad_(False)
    print(
        f"judge {os.path.basename(a.judge.rstrip('/'))}: "
        f"{len(rows)} pairs ({2 * len(rows)} responses), "
        f"batch {a.batch_size}, {torch.get_num_threads()} thread(s); oaif.judge_dtype picks "
        f"{oaif.judge_dtype(torch.device('cpu'))}"
    )
    configs = [
        (path, dtype) for dtype in (torch.float32, torch.bfloat16) for path in ("plain", "cached")
    ]
    seconds, verdicts, scores = {c: [] for c in configs}, {}, {}
    for rep in range(a.repeats):
        # alternate, and reverse every other round
        for path, dtype in configs if rep % 2 == 0 else configs[::-1]:
            model.to(dtype)
            cls = Plain if path == "plain" else oaif.LocalJudgeAnnotator
            judge = cls(model, tok, instruction=a.instruction, batch_size=a.batch_size, debias=0)
            t = time.perf_counter()
            s = judge.scores(prompts + prompts, first + second)
            seconds[path, dtype].append(time.perf_counter() - t)
            scores[path, dtype] = s
            verdicts[path, dtype] = torch.sigmoid(
                torch.tensor(s[: len(rows)]) - torch.tensor(s[len(rows) :])
            )
            took = seconds[path, dtype][-1]
            print(f"  round {rep + 1}: {path:6s} {str(dtype)[6:]:8s} {took:7.1f} s", flush=True)
    base = min(seconds["plain", torch.float32])
    print(
        "\n| path | judge dtype | best s | judgments / s | speed-up vs plain float32 |"
        "\n|---|---|---|---|---|"
    )
    for c in configs:
        best = min(seconds[c])
        print(
            f"| {c[0]} | {str(c[1])[6:]} | {best:.1f} | {len(rows) / best:.3f} "
            f"| {base / best:.2f}x |"
        )
    print(
        "\n| compared | what differs | max \\|Δ verdict\\| | max \\|Δ log-odds\\| |"
        "\n|---|---|---|---|"
    )
    f32, b16 = torch.float32, torch.bfloat16
    for x, y, what in (
        (("plain", f32), ("cached", f32), "caching + batching, float32"),
        (("plain", b16), ("cached", b16), "caching + batching, bf16"),
        (("plain", f32), ("plain", b16), "bf16 vs float32, plain"),
        (("plain", f32), ("cached", b16), "all of it (before vs now)"),
    ):
        dv = float((verdicts[x] - verdicts[y]).abs().max())
        ds = max(abs(u - v) for u, v in zip(scores[x], scores[y]))
        print(
            f"| {x[0]} {str(x[1])[6:]} vs {y[0]} {str(y[1])[6:]} | {what} | {dv:.2e} | {ds:.2e} |"
        )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(
                dict(
                    seconds={f"{c[0]} {c[1]}": seconds[c] for c in configs},
                    verdicts={f"{c[0]} {c[1]}": verdicts[c].tolist() for c in configs},
                ),
                f,
            )


if __name__ == "__main__":
    main()
