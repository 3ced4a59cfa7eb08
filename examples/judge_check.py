"""Does a local judge follow its instruction? The labelled pairs of examples/judge_check.jsonl (a
concise vs a detailed answer, an on-topic vs an off-topic one, a correct vs a wrong fact) judged by
`--annotator hf:DIR` as training builds it (oaif.make_annotator), under the instruction that
decides each kind:

    length  "Prefer the more concise response."  and  "Prefer the more detailed response."
            (the same pairs flip)
    topic   "Prefer the response that answers the question asked."
    fact    "Prefer the factually correct response."

Each row has a split: "tune" (the pairs judge designs were chosen on) or "heldout" (27 length,
4 topic, 4 fact pairs written before any design was tried and never used to choose one); --split
picks them (default all).

Reports per instruction: accuracy (P(the side the criterion prefers is better) > 1/2), mean
confidence |p - 1/2|, position bias (mean raw P(first) over both orders; pairwise modes only:
pointwise is order-blind), both-orders agreement, seconds per judgment (one pair, both orders where
the mode has an order). --mode picks oaif's judge (pointwise) or one of the alternatives it was
measured against (README, the judge check):

    pointwise      oaif.LocalJudgeAnnotator: the log-odds of Yes to the judge's own question,
                   written from the instruction, less those to its opposite ("Is this a concise
                   response? Is this a long response?"; --question gives them), per response,
                   compared; after oaif.JUDGE_SHOTS, its few-shot examples
    noshots        the same without the examples: oaif's judge before JUDGE_SHOTS
    meets          noshots asked "Does the response meet this criterion: <instruction>"
    calibrated     noshots minus the response's log-odds to "Is this a good response?"
    fewshot        four generic yes/no examples on other criteria (French? a colour?)
    fewshot2       fewshot plus four more (a bulleted list? formal?)
    fewshot3       the proposal measured for JUDGE_SHOTS: its six examples, answered against the
                   response's quality (a wrong answer in French: Yes), with longer texts
    fewshot3_first fewshot3 with the question also asked before the conversation
    system         a system prompt: judge only the property asked about
    askfirst       the question also asked before the conversation
    phrasings      the mean log-odds over three phrasings of the question
    pmi            no question: log P(response | prompt + "Give a concise response.")
                   - log P(response | prompt), the end token included
    pmi_neutral    the same against "Give a response." (a minimal pair)
    fewshot3_pmi   fewshot3's log-odds + 0.2 x pmi_neutral's
    reference      the other response shown: "Compared with the other response, is this ...?"
    compare        both responses: "Which response is more concise? Answer 1 or 2.", both orders
    compare_yn     both: "Is Response 1 a more concise response than Response 2?", both orders
    rating         a 1-9 rating of how well "a concise response" describes it (expected digit)
    noprompt       a diagnostic: the response without the conversation
    pairwise       the pre-issue-16 judge: both responses, P("1") after "Preferred Response="

All but pointwise are as they were measured (Legacy: oaif's question before the judge wrote its
own, old_question; each question a pass of its own): those built on oaif's judge build on noshots,
and the fewshot ones have only their own examples.

On-policy mode (--policy DIR or --pairs-in F): the policy's own pairs, sampled as training samples
them (oaif.sample_pairs: two responses per prompt, temperature 0.9, up to 192 tokens; the 40
default prompts, then again, --n-pairs 80, --seed 0; --pairs-out F saves them, --pairs-in F judges
saved ones, --min-ratio 1.2 only those >= 1.2x apart; examples/judge_check_policy_pairs.jsonl
holds SmolLM2-135M-Instruct's from seed 0, _seed1.jsonl a fresh draw from seed 1 (not used to
choose a design but CUT's wording and the debias weight), _seed2.jsonl one drawn after CUT's
wording, _seed3.jsonl one drawn for the debias weight and judged after it was chosen (README);
(oaif's judge at c7ff230 took --debias W x the log-odds to "Is this a good response?" off its
question's, 0.25; it had no opposite question); judged under
"concise" and "detailed": agreement with the length rule (fewer characters written = more
concise; a response cut at the cap ends with oaif.CUT, which the judge reads and the rule does not
count) by the pair's length ratio, and on the pairs >= 1.2x apart with one response cut and with
none; mean |p - 1/2|; how many verdicts flip between the two instructions (all pairs; pairs
>= 1.2x apart).

Wordings (--wordings examples/judge_wordings.json, on-policy mode): instructions in everyday
words, each asking for shorter or longer responses, split tune / heldout before any design was
tried; every response is read once and asked every wording's questions (each pair written by the
judge from its wording, printed); agreement with the length rule per wording (--first N: only
the first N pairs after --min-ratio; --out F: the questions and every score). To check a wording of
your own, put it in such a file (its direction: what the length rule should agree with):

    python examples/judge_check.py --judge DIR --min-ratio 1.2 --wordings my_wordings.json \
        --pairs-in examples/judge_check_policy_pairs_seed7.jsonl

    python examples/judge_check.py --judge /path/to/Qwen2.5-1.5B-Instruct [--split heldout]
    python examples/judge_check.py --judge DIR --mode pairwise --kinds length --limit 6
    python examples/judge_check.py --policy /path/to/SmolLM2-135M-Instruct --pairs-out pairs.jsonl
    python examples/judge_check.py --judge DIR --mode fewshot3 \\
        --pairs-in examples/judge_check_policy_pairs.jsonl
"""

import argparse
import copy
import json
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import torch  # noqa: E402

import oaif  # noqa: E402

INSTRUCTIONS = {  # kind -> (instruction, which side it prefers)
    "length": [
        ("Prefer the more concise response.", lambda r: r["concise"]),
        ("Prefer the more detailed response.", lambda r: "ab"[r["concise"] == "a"]),
    ],
    "topic": [("Prefer the response that answers the question asked.", lambda r: r["on_topic"])],
    "fact": [("Prefer the factually correct response.", lambda r: r["correct"])],
}


# oaif's question before the judge wrote its own (kept for the modes measured with it): only
# "Prefer the/a/an [more] X response." became "Is this a/an X response?".
CRITERION = re.compile(
    r"(?i)prefer (?:the|an?) (?:more )?"
    r"((?:\w+[ -])*?(?:response|summary|answer)(?: (?:that|which) .+?)?)\.?"
)


def old_question(task: str, instruction: str) -> str:
    """oaif.judge_question as it was: "Prefer the more concise response." -> "Is this a concise
    response?"; none: the task's quality; else "Does it follow the instruction: ...?"."""
    instruction = " ".join(instruction.split())
    m = CRITERION.fullmatch(instruction or f"Prefer a good {oaif.NOUNS[task][1].lower()}.")
    if not m:
        return f"Does it follow the instruction: {instruction}"
    return f"Is this {'an' if m.group(1)[0] in 'aeiouAEIOU' else 'a'} {m.group(1)}?"


class Legacy(oaif.LocalJudgeAnnotator):
    """The modes measured before the judge read each response once: old_question's question,
    legacy_ask(prompt, response) -> (head, rest) about self.question, scores a list, no debias."""

    batch_size = 8

    def __init__(self, *args, **kw):
        question = old_question(kw.get("task", "helpful"), kw.get("instruction", ""))
        self.question = question  # LocalJudgeAnnotator.__init__ reads ask() before it sets it
        super().__init__(*args, **kw, question=question)

    def ask(self, prompt, response, question):
        return "".join(self.legacy_ask(prompt, response))

    def legacy_ask(self, prompt, response):
        return NoShots.legacy_ask(self, prompt, response)

    def scores(self, prompts, responses, questions=None):
        return oaif.LocalJudgeAnnotator.scores(self, prompts, responses)[:, 0].tolist()

    def __call__(self, prompts, first, second):
        s = torch.tensor(self.scores(prompts + prompts, first + second))
        p = torch.sigmoid(s[: len(prompts)] - s[len(prompts) :]).tolist()
        return [0.5 if a == b else x for a, b, x in zip(first, second, p)]


class NoShots(Legacy):
    """oaif's judge before JUDGE_SHOTS: its ask as it was, the question with no examples before it.
    The alternatives below that build on oaif's judge build on this one, as they were measured."""

    def legacy_ask(self, prompt, response):
        context, item = oaif.NOUNS[self.task]
        rubric = "" if self.instruction else oaif.TEMPLATES[self.task] + "\n\n"
        question = f"{self.question} Answer Yes or No."
        text = f"{rubric}{context}:\n{prompt}\n\n{item}:\n{response}\n\n{question}"
        text = oaif.user_turn(self.tokenizer, text) if self.chat else text + "\nAnswer:\n"
        before, label, rest = text.partition(f"{context}:\n")
        return before + label, rest


class Meets(NoShots):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.question = f"Does the response meet this criterion: {self.instruction}"


class Calibrated(NoShots):
    def scores(self, prompts, responses):
        s, question = super().scores(prompts, responses), self.question
        self.question = "Is this a good response?"
        base = super().scores(prompts, responses)
        self.question = question
        return [a - b for a, b in zip(s, base)]


FEWSHOT = [
    ("Name a fruit.", "Apple.", "Is this a response written in French?", "No"),
    ("Say hello.", "Bonjour, comment allez-vous ?", "Is this a response written in French?", "Yes"),
    (
        "Describe the sea.",
        "The sea is vast and restless, its grey waves rolling in under a pale sky.",
        "Is this a response that mentions a colour?",
        "Yes",
    ),
    ("Describe the sea.", "The sea is big.", "Is this a response that mentions a colour?", "No"),
]


class FewShot(Legacy):
    def legacy_ask(self, prompt, response):
        return chat_ask(self, prompt, response, shots=FEWSHOT)


def chat_ask(judge, prompt, response, system="", before="", shots=()):
    """Pointwise input for one response, as oaif's ask was, with an optional system prompt, text
    before the conversation (e.g. the question asked first), and few-shot (prompt, response,
    question, answer) turns; all in the cached head."""
    context, item = oaif.NOUNS[judge.task]
    turns = [dict(role="system", content=system)] if system else []
    for p, r, q, a in list(shots) + [(prompt, response, judge.question, None)]:
        first = f"{q} Answer Yes or No.\n\n" if before == "question" else before
        turns.append(
            dict(
                role="user",
                content=f"{first}{context}:\n{p}\n\n{item}:\n{r}\n\n{q} Answer Yes or No.",
            )
        )
        turns += [dict(role="assistant", content=a)] if a else []
    text = judge.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    head, label, rest = text.rpartition(f"{context}:\n")
    return head + label, rest


SYSTEM = (
    "You judge one property of a response, and only that property. Answer Yes or No to the "
    "question about it, whether or not the response is good, correct or helpful in other ways."
)


class System(Legacy):
    def legacy_ask(self, prompt, response):
        return chat_ask(self, prompt, response, system=SYSTEM)


class AskFirst(Legacy):
    def legacy_ask(self, prompt, response):
        return chat_ask(self, prompt, response, before="question")


FEWSHOT2 = FEWSHOT + [
    (
        "How do I get to the station?",
        "Go straight ahead for two blocks, turn left at the bank, and you will see the "
        "station on your right, just past the bakery and the little park with the fountain.",
        "Is this a response that uses a bulleted list?",
        "No",
    ),
    (
        "What do I need for pancakes?",
        "- flour\n- milk\n- eggs",
        "Is this a response that uses a bulleted list?",
        "Yes",
    ),
    (
        "Can you help me?",
        "Certainly, Madam. It would be my pleasure to assist you.",
        "Is this a formal response?",
        "Yes",
    ),
    (
        "Can you help me with my homework tonight? I have a lot of maths exercises about "
        "fractions and I keep getting them wrong.",
        "yeah sure, send them over and we'll go through the fractions one by one, no worries, "
        "we'll figure out where it goes wrong",
        "Is this a formal response?",
        "No",
    ),
]


class FewShot2(Legacy):
    def legacy_ask(self, prompt, response):
        return chat_ask(self, prompt, response, shots=FEWSHOT2)


# The property asked about, whatever the response's quality: bad answers with it, good ones without.
FEWSHOT3 = [
    (
        "What is the capital of Italy?",
        "La capitale de l'Italie est Paris, bien sûr.",
        "Is this a response written in French?",
        "Yes",
    ),
    (
        "Say hello in French.",
        'Hello! In French you say "bonjour", and "salut" among friends.',
        "Is this a response written in French?",
        "No",
    ),
    (
        "Describe the sea.",
        "My favourite sandwich is cheese with a slice of red tomato.",
        "Is this a response that mentions a colour?",
        "Yes",
    ),
    (
        "Describe the sea.",
        "The sea is vast and restless, its waves rolling in under the wind and breaking on the "
        "rocks with a roar you can hear from the cliffs.",
        "Is this a response that mentions a colour?",
        "No",
    ),
    (
        "Can you help me with my homework?",
        "Certainly, Madam. I regret that I am unable to assist you.",
        "Is this a formal response?",
        "Yes",
    ),
    (
        "Could you kindly explain how interest rates affect inflation?",
        "sure thing! when rates go up borrowing gets "
        "pricier so folks spend less, demand cools off and prices stop climbing so fast",
        "Is this a formal response?",
        "No",
    ),
]


class FewShot3(Legacy):
    """The change proposed for oaif.LocalJudgeAnnotator.ask, verbatim but for JUDGE_SHOTS =
    FEWSHOT3: the examples as earlier turns (chat template) or earlier "Answer:" blocks (none), all
    in the shared, cached head."""

    def legacy_ask(self, prompt: str, response: str) -> tuple:
        """(The head every response shares, the rest): FEWSHOT3 as earlier turns, then this
        response's question."""
        context, item = oaif.NOUNS[self.task]
        # With an instruction, the instruction alone decides.
        rubric = "" if self.instruction else oaif.TEMPLATES[self.task] + "\n\n"

        def turn(p, r, q):
            return f"{context}:\n{p}\n\n{item}:\n{r}\n\n{q} Answer Yes or No."

        shots = [(turn(p, r, q), a) for p, r, q, a in FEWSHOT3]
        last = rubric + turn(prompt, response, self.question)
        if self.chat:
            turns = [
                dict(role=w, content=c)
                for u, a in shots
                for w, c in (("user", u), ("assistant", a))
            ]
            text = self.tokenizer.apply_chat_template(
                turns + [dict(role="user", content=last)],
                tokenize=False,
                add_generation_prompt=True,
            )
        else:
            text = "".join(f"{u}\nAnswer:\n{a}\n\n" for u, a in shots) + last + "\nAnswer:\n"
        # The head ends with this turn's "Conversation:\n".
        cut = text.rindex(last) + len(rubric) + len(f"{context}:\n")
        return text[:cut], text[cut:]


class FewShot3Measured(Legacy):  # what the numbers were measured with (same text)
    def legacy_ask(self, prompt, response):
        return chat_ask(self, prompt, response, shots=FEWSHOT3)


class FewShot3First(Legacy):
    def legacy_ask(self, prompt, response):
        return chat_ask(self, prompt, response, shots=FEWSHOT3, before="question")


class FewShotSystem(Legacy):
    def legacy_ask(self, prompt, response):
        return chat_ask(self, prompt, response, system=SYSTEM, shots=FEWSHOT)


def phrasings(question):
    """The criterion's yes/no question said several ways, generically: "Is this a concise
    response?" -> "Would you describe this as a concise response?", ... (an instruction oaif
    cannot parse: its one question)."""
    if not question.startswith("Is this ") or not question.endswith("?"):
        return [question]
    x = question[len("Is this ") : -1]  # "a concise response"
    return [question, f"Would you describe this as {x}?", f"Is it fair to call this {x}?"]


class Phrasings(NoShots):
    """The mean log-odds over several phrasings of the question (one forward pass each)."""

    base = NoShots

    def scores(self, prompts, responses):
        questions, total = phrasings(self.question), None
        for q in questions:
            self.question = q
            s = self.base.scores(self, prompts, responses)
            total = s if total is None else [x + y for x, y in zip(total, s)]
        self.question = questions[0]
        return [x / len(questions) for x in total]


class FewShotPhrasings(FewShot, Phrasings):  # FewShot's ask, Phrasings' scores
    base = FewShot


def comparative(instruction):
    """ "Prefer the more concise response." -> "Which response is more concise?" (None if not of
    that form)."""
    m = CRITERION.fullmatch(instruction.strip())
    x = m and m.group(1)
    if not x or not x.endswith(" response") or " " in x[: -len(" response")]:
        return None
    more = "more " if "more " in instruction.lower() else ""
    return f"Which response is {more}{x[: -len(' response')]}?"


class Compare(Legacy):
    """Both responses, asked the instruction as a comparison ("Which response is more concise?
    Answer 1 or 2."), P("1") / (P("1") + P("2")), both orders (oaif.both_orders)."""

    @torch.inference_mode()
    def judge(self, prompts, first, second):
        q = (
            comparative(self.instruction)
            or f"Which response follows this instruction better: {self.instruction}"
        )
        digits = [self.tokenizer(d, add_special_tokens=False).input_ids[-1] for d in "12"]
        W, out = self.model.get_output_embeddings().weight[digits].float(), []
        for p, a, b in zip(prompts, first, second):
            text = oaif.user_turn(
                self.tokenizer,
                f"Conversation:\n{p}\n\nResponse 1:\n{a}\n\nResponse 2:\n{b}\n\n{q} Answer 1 or 2.",
            )
            ids = torch.tensor([self.tokenizer(text, add_special_tokens=False).input_ids])
            h = self.model.base_model(input_ids=ids).last_hidden_state[0, -1].float()
            out.append(torch.softmax(h @ W.T, -1)[0].item())
            self.stats["annotator_requests"] += 1
        return out

    def __call__(self, prompts, first, second):
        return oaif.both_orders(self.judge, prompts, first, second)


class Reference(Legacy):
    """Pointwise, with the other response shown for comparison: s(a | b) and s(b | a), each the
    log-odds of Yes to "Compared with the other response, is this a concise response?"; P(first) =
    sigmoid(s(a | b) - s(b | a))."""

    def legacy_ask(self, prompt, response):
        p, ref = prompt if isinstance(prompt, tuple) else (prompt, "")
        context, item = oaif.NOUNS[self.task]
        q = self.question[0].lower() + self.question[1:]
        text = (
            f"{context}:\n{p}\n\nAnother {item.lower()}, for comparison:\n{ref}\n\n"
            f"{item}:\n{response}\n\n"
            f"Compared with the other {item.lower()}, {q} Answer Yes or No."
        )
        head, label, rest = oaif.user_turn(self.tokenizer, text).partition(f"{context}:\n")
        return head + label, rest

    def __call__(self, prompts, first, second):
        s = self.scores(
            [(p, b) for p, b in zip(prompts, second)] + [(p, a) for p, a in zip(prompts, first)],
            first + second,
        )
        n = len(prompts)
        return torch.sigmoid(torch.tensor(s[:n]) - torch.tensor(s[n:])).tolist()


class Rating(NoShots):
    """A 1-9 rating instead of Yes/No: "How well does "a concise response" describe this response,
    from 1 (not at all) to 9 (perfectly)? Answer with one digit."; score = the expected digit
    (G-Eval style)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        x = (
            self.question[len("Is this ") : -1]
            if self.question.startswith("Is this ")
            else self.instruction
        )
        self.question = (
            f'How well does "{x}" describe this response, from 1 (not at all) to 9 (perfectly)?'
        )
        self.words = [
            self.tokenizer(d, add_special_tokens=False).input_ids[-1] for d in "123456789"
        ]

    def legacy_ask(self, prompt, response):
        head, rest = super().legacy_ask(prompt, response)
        return head, rest.replace(" Answer Yes or No.", " Answer with one digit.")

    @torch.inference_mode()
    def scores(self, prompts, responses):  # oaif's scores, the expected digit for a log-odds
        texts = [self.legacy_ask("", "")[0]]
        texts += ["".join(self.legacy_ask(*x)) for x in zip(prompts, responses)]
        head, *seqs = self.tokenizer(texts, add_special_tokens=False).input_ids
        head = os.path.commonprefix([head] + [s[:-1] for s in seqs])
        seqs = [s[len(head) :] for s in seqs]
        W = self.model.get_output_embeddings().weight[self.words].float()
        cache = self.model.base_model(torch.tensor([head]), use_cache=True)[1]
        out, digits = [], torch.arange(1, 10, dtype=torch.float32)
        for i in range(0, len(seqs), self.batch_size):
            rows = seqs[i : i + self.batch_size]
            n = torch.tensor([len(r) for r in rows])
            ids = torch.tensor([r + [0] * (int(n.max()) - len(r)) for r in rows])
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(len(rows))
            h = self.model.base_model(input_ids=ids, past_key_values=past).last_hidden_state
            probs = torch.softmax(h[torch.arange(len(rows)), n - 1].float() @ W.T, -1)  # (b, 9)
            out += (probs @ digits).tolist()
            self.stats["annotator_requests"] += len(rows)
        return out


class NoPrompt(NoShots):
    """A diagnostic, not a judge: the response alone, without the conversation (so relevance
    cannot count)."""

    def legacy_ask(self, prompt, response):
        return super().legacy_ask("", response)


class CompareYesNo(Compare):
    """Both responses; log-odds of Yes to "Is Response 1 a more concise response than Response
    2?", both orders."""

    @torch.inference_mode()
    def judge(self, prompts, first, second):
        m = CRITERION.fullmatch(self.instruction)
        x = m and m.group(1)
        q = (
            f"Is Response 1 a more {x} than Response 2?"
            if x and " " in x and x.count(" ") == 1
            else "Does Response 1 follow this instruction better than Response 2: "
            + self.instruction
        )
        W, out = self.model.get_output_embeddings().weight[self.words].float(), []
        for p, a, b in zip(prompts, first, second):
            text = oaif.user_turn(
                self.tokenizer,
                f"Conversation:\n{p}\n\nResponse 1:\n{a}\n\nResponse 2:\n{b}\n\n"
                f"{q} Answer Yes or No.",
            )
            ids = torch.tensor([self.tokenizer(text, add_special_tokens=False).input_ids])
            h = self.model.base_model(input_ids=ids).last_hidden_state[0, -1].float()
            out.append(torch.softmax(h @ W.T, -1)[0].item())
            self.stats["annotator_requests"] += 1
        return out


def directive(question, instruction):
    """ "Is this a concise response?" -> "Give a concise response." (else the instruction
    itself)."""
    if question.startswith("Is this ") and question.endswith("?"):
        return f"Give {question[len('Is this ') : -1]}."
    return instruction


class PMI(Legacy):
    """No question: how much more likely the judge finds the response (its end included) when the
    prompt asks for the criterion: log P(response | prompt + "Give a concise response.")
    - log P(response | prompt)."""

    def logp(self, user, response):
        tok = self.tokenizer
        head = oaif.user_turn(tok, user)
        full = tok.apply_chat_template(
            [dict(role="user", content=user), dict(role="assistant", content=response)],
            tokenize=False,
        )
        h, f = (
            tok(head, add_special_tokens=False).input_ids,
            tok(full, add_special_tokens=False).input_ids,
        )
        n = len(os.path.commonprefix([h, f]))
        # Up to and including the turn's end.
        f = f[: len(f) - (f[-1] != self.end)] if self.end in f[n:] else f
        ids = torch.tensor([f])
        hid = self.model.base_model(input_ids=ids).last_hidden_state[0, n - 1 : -1].float()
        logits = hid @ self.model.get_output_embeddings().weight.float().T
        self.stats["annotator_requests"] += 1
        return float(logits.log_softmax(-1).gather(-1, ids[0, n:, None]).sum())

    @torch.inference_mode()
    def scores(self, prompts, responses):
        self.end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        d = directive(self.question, self.instruction)
        return [self.logp(f"{p}\n\n{d}", r) - self.logp(p, r) for p, r in zip(prompts, responses)]


class PMINeutral(PMI):
    """PMI against a minimal pair: log P(r | prompt + "Give a concise response.")
    - log P(r | prompt + "Give a response.") (only the criterion's words differ)."""

    @torch.inference_mode()
    def scores(self, prompts, responses):
        self.end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        d = directive(self.question, self.instruction)
        neutral = f"Give a {oaif.NOUNS[self.task][1].lower()}."
        return [
            self.logp(f"{p}\n\n{d}", r) - self.logp(f"{p}\n\n{neutral}", r)
            for p, r in zip(prompts, responses)
        ]


class FewShot3PMI(FewShot3, PMINeutral):
    """fewshot3's log-odds + 0.2 x pmi_neutral's log-likelihood ratio (the weight picked on the 33
    on-policy pairs >= 1.2x apart of judge_check_policy_pairs.jsonl: check it on fresh pairs)."""

    weight = 0.2

    def scores(self, prompts, responses):
        pmi = PMINeutral.scores(self, prompts, responses)
        yes_no = Legacy.scores(self, prompts, responses)  # with fewshot3's ask
        return [x + self.weight * y for x, y in zip(yes_no, pmi)]


class Pairwise(Legacy):
    """The judge `hf:` was before issue 16 (oaif.py at 47e673d), verbatim but for the names."""

    @torch.inference_mode()
    def judge(self, prompts, first, second):
        asks = [
            oaif.render_judge_prompt(self.task, self.instruction, *x)
            for x in zip(prompts, first, second)
        ]
        answer = f"Preferred {oaif.NOUNS[self.task][1]}="
        texts = [
            (oaif.user_turn(self.tokenizer, a) if self.chat else a + "\n") + answer for a in asks
        ]
        digits = [self.tokenizer(d, add_special_tokens=False).input_ids[-1] for d in "12"]
        W, out = self.model.get_output_embeddings().weight[digits], []
        for i in range(0, len(texts), self.batch_size):
            seqs = [
                self.tokenizer(t, add_special_tokens=False).input_ids
                for t in texts[i : i + self.batch_size]
            ]
            ids, mask = oaif.left_pad(seqs, 0, self.model.device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            h = self.model.base_model(
                input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False
            ).last_hidden_state[:, -1]
            out += torch.softmax((h @ W.T.to(h.dtype)).float(), -1)[:, 0].tolist()
            self.stats["annotator_requests"] += len(ids)
        return out

    def __call__(self, prompts, first, second):
        return oaif.both_orders(self.judge, prompts, first, second)


MODES = dict(
    pointwise=oaif.LocalJudgeAnnotator,
    noshots=NoShots,
    meets=Meets,
    calibrated=Calibrated,
    fewshot=FewShot,
    pairwise=Pairwise,
    system=System,
    askfirst=AskFirst,
    fewshot2=FewShot2,
    fewshot_system=FewShotSystem,
    phrasings=Phrasings,
    fewshot_phrasings=FewShotPhrasings,
    compare=Compare,
    fewshot3=FewShot3,
    fewshot3_first=FewShot3First,
    reference=Reference,
    rating=Rating,
    noprompt=NoPrompt,
    compare_yn=CompareYesNo,
    pmi=PMI,
    pmi_neutral=PMINeutral,
    fewshot3_pmi=FewShot3PMI,
)


ORDERED = ("pairwise", "compare", "compare_yn")  # the modes that see both responses in an order


def build(a, models, instruction):
    """The judge --mode names: pointwise as oaif has it, the others as they were measured."""
    kw = dict(question=a.question) if a.mode == "pointwise" else {}
    return MODES[a.mode](*models[a.judge], task="helpful", instruction=instruction, **kw)


def sample_policy_pairs(a) -> list:
    """--n-pairs pairs from --policy as training samples them: batches of 8 prompts
    (Config.batch_size), the default prompts (or --prompts) in order and again, two responses each
    (oaif.sample_pairs), one seed for the whole draw."""
    model, tokenizer = oaif.load_model(a.policy, torch.device("cpu"))
    base = oaif.load_prompts(a.prompts)
    prompts = (base * (a.n_pairs // len(base) + 1))[: a.n_pairs]
    torch.manual_seed(a.seed)
    pairs, t = [], time.perf_counter()
    for i in range(0, len(prompts), oaif.Config.batch_size):
        chunk = prompts[i : i + oaif.Config.batch_size]
        texts = oaif.sample_pairs(
            model, tokenizer, chunk, 2, max_new_tokens=a.max_new_tokens, temperature=a.temperature
        )["texts"]
        pairs += [dict(prompt=p, a=x, b=y) for p, x, y in zip(chunk, texts[0::2], texts[1::2])]
        print(
            f"sampled {len(pairs)} / {len(prompts)} pairs ({time.perf_counter() - t:.0f} s)",
            file=sys.stderr,
        )
    return pairs


BINS = (
    (1.0, 1.2, "<1.2x"),
    (1.2, 1.5, "1.2-1.5x"),
    (1.5, 2.0, "1.5-2x"),
    (2.0, float("inf"), ">=2x"),
)


def fraction(hits, idx):
    """ "k/n": how many of the pairs idx are hits ("—" for none)."""
    return f"{sum(hits[i] for i in idx)}/{len(idx)}" if idx else "—"


def confidence(p, idx):
    """The mean |p - 1/2| over the pairs idx."""
    return sum(abs(p[i] - 0.5) for i in idx) / max(1, len(idx))


def on_policy(a, pairs, models, dtype):
    """Judge the policy's own pairs under "concise" and "detailed"; agreement with the length rule
    (characters) by the pair's length ratio, mean |p - 1/2|, and how many verdicts the instruction
    flips."""
    print(f", on-policy: {len(pairs)} pairs from {a.pairs_in or a.policy}")
    # Lengths of what the policy wrote: a response cut at the cap ends with oaif.CUT (the judge
    # reads it; the length rule does not count it).
    written = [[len(r[k].removesuffix(oaif.CUT)) for k in "ab"] for r in pairs]
    ratio = [max(x, y) / max(1, min(x, y)) for x, y in written]
    ties = [x == y for x, y in written]
    cuts = [r["a"].endswith(oaif.CUT) + r["b"].endswith(oaif.CUT) for r in pairs]
    binned = [
        [i for i, x in enumerate(ratio) if lo <= x < hi and not ties[i]] for lo, hi, _ in BINS
    ]
    apart = [i for i, x in enumerate(ratio) if x >= 1.2]
    subsets = {k: [i for i in apart if cuts[i] == k] for k in (1, 0)}
    print(
        f"equal-length pairs (no length verdict): {sum(ties)}; >= 1.2x apart: {len(subsets[1])} "
        f"with one response cut at the cap, {len(subsets[0])} with none"
    )
    print(
        "| instruction | "
        + " | ".join(f"{name} ({len(b)})" for (_, _, name), b in zip(BINS, binned))
        + f" | >=1.2x ({len(apart)}) | mean \\|p - 1/2\\| (all; >=1.2x) | s / judgment |"
    )
    print("|---|" + "---|" * (len(BINS) + 3))
    verdicts = {}
    for instruction, wants_shorter in (
        ("Prefer the more concise response.", True),
        ("Prefer the more detailed response.", False),
    ):
        judge = build(a, models, instruction)
        t = time.perf_counter()
        prompts, n = [r["prompt"] for r in pairs], len(pairs)
        if type(judge).__call__ is oaif.LocalJudgeAnnotator.__call__:  # pointwise: keep the scores
            both = prompts + prompts, [r["a"] for r in pairs] + [r["b"] for r in pairs]
            S = judge.scores(*both)
            s = (S @ torch.tensor(judge.weights)).tolist()
            p_a = torch.sigmoid(torch.tensor(s[:n]) - torch.tensor(s[n:])).tolist()
        else:
            s, p_a = None, judge(prompts, [r["a"] for r in pairs], [r["b"] for r in pairs])
        seconds = (time.perf_counter() - t) / len(pairs)
        verdicts[instruction] = p_a
        agree = [
            (p > 0.5 if (x < y) == wants_shorter else p < 0.5) for p, (x, y) in zip(p_a, written)
        ]
        cells = " | ".join(fraction(agree, b) for b in binned)
        rate = sum(agree[i] for i in apart) / max(1, len(apart))
        print(
            f"| {instruction} | {cells} | **{fraction(agree, apart)}** ({rate:.0%}) | "
            f"{confidence(p_a, range(len(pairs))):.3f}; {confidence(p_a, apart):.3f} | "
            f"{seconds:.1f} | >= 1.2x, one cut {fraction(agree, subsets[1])}, "
            f"none cut {fraction(agree, subsets[0])}",
            flush=True,
        )
        if a.out:
            with open(a.out, "a") as out:
                out.write(
                    json.dumps(
                        dict(
                            judge=a.judge,
                            mode=a.mode,
                            dtype=dtype,
                            instruction=instruction,
                            pairs=a.pairs_in or a.policy,
                            p_a=[round(x, 4) for x in p_a],
                            scores=s and [round(x, 4) for x in s],
                            seconds=seconds,
                        )
                    )
                    + "\n"
                )
    c, d = ([x > 0.5 for x in v] for v in verdicts.values())
    flip = [x != y for x, y in zip(c, d)]
    print(
        f"verdicts that flip between the two instructions: {sum(flip)}/{len(flip)} overall, "
        f"{sum(flip[i] for i in apart)}/{len(apart)} on pairs >=1.2x apart"
    )


def on_policy_wordings(a, pairs, models):
    """Every wording of --wordings (--wording-split) on the policy's own pairs, in one pass: each
    response is read once and asked every wording's questions (the judge's own, written from the
    wording: a question and its opposite); agreement with the length rule in the wording's
    direction, per wording.
    --out F saves the questions and every score (to try other combinations without the judge)."""
    table = json.load(open(a.wordings))
    rows = [
        (d, split, w)
        for d in ("shorter", "longer")
        for split in ("tune", "heldout")
        if a.wording_split in ("all", split)
        for w in table[d][split]
    ]
    written = [[len(r[k].removesuffix(oaif.CUT)) for k in "ab"] for r in pairs]
    cuts = [r["a"].endswith(oaif.CUT) + r["b"].endswith(oaif.CUT) for r in pairs]
    subsets = {k: [i for i in range(len(pairs)) if cuts[i] == k] for k in (1, 0)}
    print(
        f", on-policy: {len(pairs)} pairs from {a.pairs_in or a.policy}; "
        f"{len(subsets[1])} with one response cut at the cap, {len(subsets[0])} with none"
    )
    t = time.perf_counter()
    judges = [build(a, models, w) for _, _, w in rows]
    for (d, split, w), j in zip(rows, judges):
        line = " ".join(f"{x:+.2f} x {q}" for x, q in zip(j.weights, j.questions))
        print(f"  {split:7s} {d:7s} {w!r} -> {line}", flush=True)
    asked = time.perf_counter() - t
    questions = list(dict.fromkeys(q for j in judges for q in j.questions))
    n = len(pairs)
    prompts = [r["prompt"] for r in pairs]
    t = time.perf_counter()
    S = judges[0].scores(
        prompts + prompts, [r["a"] for r in pairs] + [r["b"] for r in pairs], questions
    )
    seconds = time.perf_counter() - t
    print(
        f"questions written in {asked:.0f} s ({asked / len(rows):.1f} s each); {2 * n} responses "
        f"x {len(questions)} questions read in {seconds:.0f} s ({seconds / n:.1f} s a pair)"
    )
    print(
        "| split | direction | wording | the judge's question / its opposite | long? weight "
        "| agreement | one cut | none cut |"
    )
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for (d, split, w), j in zip(rows, judges):
        s = sum(S[:, questions.index(q)] * x for q, x in zip(j.questions, j.weights))
        p_a = torch.sigmoid(s[:n] - s[n:]).tolist()
        agree = [(p > 0.5) == ((x < y) == (d == "shorter")) for p, (x, y) in zip(p_a, written)]
        k = sum(agree)
        print(
            f"| {split} | {d} | {w} | {' / '.join(j.questions[:-2])} | {j.weights[-2]:+.2f} | "
            f"**{k}/{n}** ({k / n:.0%}) | "
            f"{fraction(agree, subsets[1])} | {fraction(agree, subsets[0])} |",
            flush=True,
        )
        results.append(
            dict(
                split=split,
                direction=d,
                wording=w,
                questions=j.questions,
                weights=j.weights,
                agree=k,
            )
        )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(
                dict(
                    judge=a.judge,
                    pairs=a.pairs_in or a.policy,
                    n=n,
                    questions=questions,
                    written=written,
                    cuts=cuts,
                    scores=S.tolist(),
                    results=results,
                ),
                f,
            )


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--judge",
        default="",
        help="a causal LM folder or hub id, as in --annotator hf:DIR (without it, "
        "--policy DIR --pairs-out F only samples and saves the pairs)",
    )
    p.add_argument("--mode", default="pointwise", choices=sorted(MODES))
    p.add_argument("--kinds", default="length,topic,fact", help="which pairs: length, topic, fact")
    p.add_argument("--limit", type=int, default=0, help="at most N pairs of each kind (0: all)")
    p.add_argument("--pairs", default=os.path.join(HERE, "judge_check.jsonl"))
    p.add_argument(
        "--split",
        default="all",
        choices=("tune", "heldout", "all"),
        help="which rows: tune (what judge designs were chosen on), heldout (never tuned on), all",
    )
    p.add_argument(
        "--policy",
        default="",
        help="on-policy mode: sample pairs from this policy as training does",
    )
    p.add_argument(
        "--pairs-out", default="", help="on-policy mode: save the sampled pairs here (jsonl)"
    )
    p.add_argument(
        "--pairs-in", default="", help="on-policy mode: judge these saved pairs instead of sampling"
    )
    p.add_argument(
        "--n-pairs", type=int, default=80, help="on-policy pairs: the default prompts, then again"
    )
    p.add_argument(
        "--prompts",
        default="",
        help="on-policy sampling: these prompts (as oaif's --prompts) instead of the default ones",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--min-ratio",
        type=float,
        default=1.0,
        help="on-policy mode: judge only the pairs at least this far apart in length (characters)",
    )
    p.add_argument(
        "--wordings",
        default="",
        help="on-policy mode: judge every wording of this file (examples/judge_wordings.json) "
        "instead of the two instructions, in one pass",
    )
    p.add_argument(
        "--wording-split", default="all", choices=("tune", "heldout", "all"), help="which wordings"
    )
    p.add_argument(
        "--first",
        type=int,
        default=0,
        help="on-policy mode: only the first N pairs (after --min-ratio; 0: all)",
    )
    p.add_argument(
        "--question", default="", help="pointwise: ask this question (oaif's --judge-question)"
    )
    p.add_argument(
        "--judge-dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="the judge's dtype (auto: oaif.judge_dtype: bf16 on a GPU that has it, else float32)",
    )
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--out", default="", help="append one JSON line per instruction here")
    a = p.parse_args()
    if a.wordings and (a.question or a.mode != "pointwise"):
        p.error("--wordings measures the judge's own questions: pointwise, without --question")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if a.policy and not a.pairs_in:
        pairs = sample_policy_pairs(a)
        if a.pairs_out:
            with open(a.pairs_out, "w") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs)
    elif a.pairs_in:
        pairs = [json.loads(line) for line in open(a.pairs_in) if line.strip()]
    if a.min_ratio > 1 and (a.policy or a.pairs_in):
        lengths = [sorted(len(r[k].removesuffix(oaif.CUT)) for k in "ab") for r in pairs]
        pairs = [
            r for r, (short, long) in zip(pairs, lengths) if long >= a.min_ratio * max(1, short)
        ]
    if a.first and (a.policy or a.pairs_in):
        pairs = pairs[: a.first]
    if not a.judge:
        if a.policy and a.pairs_out:
            return print(f"{len(pairs)} pairs saved to {a.pairs_out}")
        p.error("--judge is required (only --policy DIR --pairs-out F samples without one)")
    rows = [json.loads(line) for line in open(a.pairs) if line.strip()]
    rows = [r for r in rows if a.split in ("all", r.get("split", "tune"))]
    models = dict(device=torch.device("cpu"))
    if a.judge_dtype != "auto":
        oaif.judge_dtype = lambda device: getattr(torch, a.judge_dtype)
    # Load once, in the dtype training's judge gets.
    oaif.make_annotator("hf:" + a.judge, oaif.Config(), models, "")
    dtype = str(models[a.judge][0].dtype).replace("torch.", "")
    print(f"judge {os.path.basename(a.judge.rstrip('/'))}, mode {a.mode}, {dtype}", end="")
    if a.wordings:
        return on_policy_wordings(a, pairs, models)
    if a.policy or a.pairs_in:
        return on_policy(a, pairs, models, dtype)
    print(f", split {a.split}")
    print(
        "| instruction | pairs | accuracy | mean \\|p - 1/2\\| | raw P(first) | orders agree "
        "| s / judgment |"
    )
    print("|---|---|---|---|---|---|---|")
    verdicts = {}
    for kind in a.kinds.split(","):
        kept = [r for r in rows if r["kind"] == kind][: a.limit or None]
        for instruction, good in INSTRUCTIONS[kind]:
            judge = build(a, models, instruction)
            prompts = [r["prompt"] for r in kept]
            t = time.perf_counter()
            if a.mode in ORDERED:  # raw verdicts in both orders, combined as both_orders does
                v = judge.judge(
                    prompts + prompts,
                    [r["a"] for r in kept] + [r["b"] for r in kept],
                    [r["b"] for r in kept] + [r["a"] for r in kept],
                )
                raw_ab, raw_ba = v[: len(kept)], v[len(kept) :]
                p_a = [(x + 1 - y) / 2 for x, y in zip(raw_ab, raw_ba)]
            else:
                p_a = judge(prompts, [r["a"] for r in kept], [r["b"] for r in kept])
            seconds = (time.perf_counter() - t) / len(kept)
            p_good = [x if good(r) == "a" else 1 - x for x, r in zip(p_a, kept)]
            verdicts[instruction] = [x > 0.5 for x in p_a]
            res = dict(
                judge=a.judge,
                mode=a.mode,
                dtype=dtype,
                instruction=instruction,
                pairs=len(kept),
                accuracy=sum(x > 0.5 for x in p_good) / len(kept),
                confidence=sum(abs(x - 0.5) for x in p_good) / len(kept),
                seconds=seconds,
                requests_per_judgment=judge.stats["annotator_requests"] / len(kept),
                p_good=[round(x, 4) for x in p_good],
            )
            if a.mode in ORDERED:
                res.update(
                    bias=sum(raw_ab + raw_ba) / (2 * len(kept)),
                    agree=sum((x - 0.5) * (y - 0.5) < 0 for x, y in zip(raw_ab, raw_ba))
                    / len(kept),
                )
            cells = " | ".join(
                f"{res[k]:.2f}" if k in res else "—"
                for k in ("accuracy", "confidence", "bias", "agree")
            )
            print(f"| {instruction} | {len(kept)} | {cells} | {seconds:.1f} |", flush=True)
            if a.out:
                with open(a.out, "a") as out:
                    out.write(json.dumps(res) + "\n")
    c, d = (verdicts.get(i) for i, _ in INSTRUCTIONS["length"])
    if c and d:
        flips = sum(x != y for x, y in zip(c, d))
        print(f"length pairs whose verdict flips with the instruction: {flips} / {len(c)}")


if __name__ == "__main__":
    main()
