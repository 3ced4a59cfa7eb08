"""Does a local judge follow its instruction? The labelled pairs of examples/judge_check.jsonl (a concise vs a
detailed answer, an on-topic vs an off-topic one, a correct vs a wrong fact) judged by `--annotator hf:DIR` as
training builds it (oaif.make_annotator), under the instruction that decides each kind:

    length  "Prefer the more concise response."  and  "Prefer the more detailed response."  (the same pairs flip)
    topic   "Prefer the response that answers the question asked."
    fact    "Prefer the factually correct response."

Reports per instruction: accuracy (P(the side the criterion prefers is better) > 1/2), mean confidence
|p - 1/2|, position bias (mean raw P(first) over both orders; pairwise modes only: pointwise is order-blind),
both-orders agreement, seconds per judgment (one pair, both orders where the mode has an order). --mode picks
oaif's judge (pointwise) or one of the alternatives it was measured against (README, the judge check):

    pointwise      oaif.LocalJudgeAnnotator: P(Yes) to "Is this a concise response?" per response, compared
    meets          the same, asked "Does the response meet this criterion: <instruction>"
    calibrated     pointwise minus the response's log-odds to "Is this a good response?" (its base rate)
    fewshot        pointwise after four generic yes/no examples on other criteria (French? mentions a colour?)
    pairwise       the pre-issue-16 judge: both responses, P("1") / (P("1") + P("2")) after "Preferred Response="

    python examples/judge_check.py --judge /path/to/Qwen2.5-1.5B-Instruct
    python examples/judge_check.py --judge DIR --mode pairwise --kinds length --limit 6
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import oaif  # noqa: E402
import torch  # noqa: E402

INSTRUCTIONS = {  # kind -> (instruction, which side it prefers)
    "length": [("Prefer the more concise response.", lambda r: r["concise"]),
               ("Prefer the more detailed response.", lambda r: "ab"[r["concise"] == "a"])],
    "topic": [("Prefer the response that answers the question asked.", lambda r: r["on_topic"])],
    "fact": [("Prefer the factually correct response.", lambda r: r["correct"])],
}


class Meets(oaif.LocalJudgeAnnotator):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.question = f"Does the response meet this criterion: {self.instruction}"


class Calibrated(oaif.LocalJudgeAnnotator):
    def scores(self, prompts, responses):
        s, question = super().scores(prompts, responses), self.question
        self.question = "Is this a good response?"
        base = super().scores(prompts, responses)
        self.question = question
        return [a - b for a, b in zip(s, base)]


FEWSHOT = [("Name a fruit.", "Apple.", "Is this a response written in French?", "No"),
           ("Say hello.", "Bonjour, comment allez-vous ?", "Is this a response written in French?", "Yes"),
           ("Describe the sea.", "The sea is vast and restless, its grey waves rolling in under a pale sky.",
            "Is this a response that mentions a colour?", "Yes"),
           ("Describe the sea.", "The sea is big.", "Is this a response that mentions a colour?", "No")]


class FewShot(oaif.LocalJudgeAnnotator):
    def ask(self, prompt, response):
        turns = []
        for p, r, q, a in FEWSHOT + [(prompt, response, self.question, None)]:
            turns.append(dict(role="user", content=f"Conversation:\n{p}\n\nResponse:\n{r}\n\n{q} Answer Yes or No."))
            turns += [dict(role="assistant", content=a)] if a else []
        text = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        before, label, rest = text.rpartition("Conversation:\n")  # the examples are part of the shared head
        return before + label, rest


class Pairwise(oaif.LocalJudgeAnnotator):
    """The judge `hf:` was before issue 16 (oaif.py at 47e673d), verbatim but for the names."""

    @torch.inference_mode()
    def judge(self, prompts, first, second):
        asks = [oaif.render_judge_prompt(self.task, self.instruction, *x) for x in zip(prompts, first, second)]
        answer = f"Preferred {oaif.QUESTION[self.task][1]}="
        texts = [(oaif.user_turn(self.tokenizer, a) if self.chat else a + "\n") + answer for a in asks]
        digits = [self.tokenizer(d, add_special_tokens=False).input_ids[-1] for d in "12"]
        W, out = self.model.get_output_embeddings().weight[digits], []
        for i in range(0, len(texts), self.batch_size):
            seqs = [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts[i:i + self.batch_size]]
            ids, mask = oaif.left_pad(seqs, 0, self.model.device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            h = self.model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                      use_cache=False).last_hidden_state[:, -1]
            out += torch.softmax((h @ W.T.to(h.dtype)).float(), -1)[:, 0].tolist()
            self.stats["annotator_requests"] += len(ids)
        return out

    def __call__(self, prompts, first, second):
        return oaif.both_orders(self.judge, prompts, first, second)


MODES = dict(pointwise=oaif.LocalJudgeAnnotator, meets=Meets, calibrated=Calibrated, fewshot=FewShot,
             pairwise=Pairwise)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--judge", required=True, help="a causal LM folder or hub id, as in --annotator hf:DIR")
    p.add_argument("--mode", default="pointwise", choices=sorted(MODES))
    p.add_argument("--kinds", default="length,topic,fact", help="which pairs: length, topic, fact")
    p.add_argument("--limit", type=int, default=0, help="at most N pairs of each kind (0: all)")
    p.add_argument("--pairs", default=os.path.join(HERE, "judge_check.jsonl"))
    p.add_argument("--out", default="", help="append one JSON line per instruction here")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    rows = [json.loads(line) for line in open(a.pairs) if line.strip()]
    models = dict(device=torch.device("cpu"))
    oaif.make_annotator("hf:" + a.judge, oaif.Config(), models, "")  # load once, in the dtype training's judge gets
    dtype = str(models[a.judge][0].dtype).replace("torch.", "")
    print(f"judge {os.path.basename(a.judge.rstrip('/'))}, mode {a.mode}, {dtype}")
    print("| instruction | pairs | accuracy | mean \\|p - 1/2\\| | raw P(first) | orders agree | s / judgment |")
    print("|---|---|---|---|---|---|---|")
    verdicts = {}
    for kind in a.kinds.split(","):
        kept = [r for r in rows if r["kind"] == kind][:a.limit or None]
        for instruction, good in INSTRUCTIONS[kind]:
            judge = MODES[a.mode](*models[a.judge], task="helpful", instruction=instruction)
            prompts = [r["prompt"] for r in kept]
            t = time.perf_counter()
            if a.mode == "pairwise":  # raw verdicts in both orders, combined as both_orders does
                v = judge.judge(prompts + prompts, [r["a"] for r in kept] + [r["b"] for r in kept],
                                [r["b"] for r in kept] + [r["a"] for r in kept])
                raw_ab, raw_ba = v[:len(kept)], v[len(kept):]
                p_a = [(x + 1 - y) / 2 for x, y in zip(raw_ab, raw_ba)]
            else:
                p_a = judge(prompts, [r["a"] for r in kept], [r["b"] for r in kept])
            seconds = (time.perf_counter() - t) / len(kept)
            p_good = [x if good(r) == "a" else 1 - x for x, r in zip(p_a, kept)]
            verdicts[instruction] = [x > 0.5 for x in p_a]
            res = dict(judge=a.judge, mode=a.mode, dtype=dtype, instruction=instruction, pairs=len(kept),
                       accuracy=sum(x > 0.5 for x in p_good) / len(kept),
                       confidence=sum(abs(x - 0.5) for x in p_good) / len(kept), seconds=seconds,
                       requests_per_judgment=judge.stats["annotator_requests"] / len(kept),
                       p_good=[round(x, 4) for x in p_good])
            if a.mode == "pairwise":
                res.update(bias=sum(raw_ab + raw_ba) / (2 * len(kept)),
                           agree=sum((x - 0.5) * (y - 0.5) < 0 for x, y in zip(raw_ab, raw_ba)) / len(kept))
            f = lambda k: f"{res[k]:.2f}" if k in res else "—"  # noqa: E731
            print(f"| {instruction} | {len(kept)} | {f('accuracy')} | {f('confidence')} | {f('bias')} | {f('agree')} "
                  f"| {seconds:.1f} |", flush=True)
            if a.out:
                with open(a.out, "a") as out:
                    out.write(json.dumps(res) + "\n")
    c, d = (verdicts.get(i) for i, _ in INSTRUCTIONS["length"])
    if c and d:
        print(f"length pairs whose verdict flips with the instruction: {sum(x != y for x, y in zip(c, d))} / {len(c)}")


if __name__ == "__main__":
    main()
