"""Online AI Feedback (OAIF) in one file: align a language model with DPO, IPO or SLiC on pairs
that it samples itself, labelled on the spot by an LLM annotator.

Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv 2402.04792.
The losses: DPO arXiv 2305.18290, IPO 2310.12036, SLiC-HF 2305.10425 (its hinge as RSO, 2309.06657).

Algorithm 1 is `oaif_step`, the first function of Part 1: 1) sample two responses per
prompt from the *current* policy (`sample_pairs`); 2) the annotator says which is better
(`both_orders`, `ClaudeAnnotator`; offline, Part 2's `LocalJudgeAnnotator`); 3) the policy's
and the frozen initial model's log-probs (`sequence_logprobs`); 4) a DPO, IPO or SLiC step.
Part 2 runs it for real.
Online is the point: the labels are about the policy's own current samples, where offline DPO's
pairs come from another model and go stale as the policy moves away from it.

Run:    python oaif.py --model gpt2 --steps 100     (no API key: the `shorter` rule labels)
        python oaif.py --model gpt2 --annotator claude --instruction "Prefer the concise response."
        torchrun --nproc_per_node 2 oaif.py --model gpt2 --steps 100    (data parallel)
Test:   python -m pytest -q test_oaif.py
"""

import argparse
import concurrent.futures
import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import threading
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

# ==================================================================================================
# Part 1: the method. oaif_step, Algorithm 1 as one function, first; then what it calls, in the
# order it calls it: 1) the sampler, 2) the annotators, 3) the log-probs, 4) the losses, 5) the
# update; last, 6) the fused log-prob routine step 3 runs on.
# ==================================================================================================


class OAIFError(Exception):
    """Bad input or a fault that cannot heal; main() prints it as one line and exits non-zero."""


# --------------------------------------------------------------------------------------------------
# Algorithm 1: one OAIF step


def oaif_step(
    policy, ref_model, tokenizer, prompts, annotator, optimizer, cfg, pairs=None, wiring=None
):
    """Algorithm 1, one step on this rank's prompts -> the step's numbers. cfg: a Config, or any
    object with the nine fields read here (types.SimpleNamespace will do): max_new_tokens,
    temperature, dtype ("bfloat16" or not), min_confidence, average_logps, loss ("dpo", "ipo",
    "slic"), beta (None: the loss's default), labels ("hard", "soft") and max_grad_norm.
    pairs: offline_batch's, with "probs", for steps 1 and 2 (the offline baseline)."""
    start = time.perf_counter()
    wiring = wiring or Wiring(policy, ref_model)
    # 1) Sample two responses per prompt from the current policy at --temperature; π scored at T=1.
    sampling = (tokenizer, prompts, 2, cfg.max_new_tokens, cfg.temperature)
    batch = pairs or wiring.sample(sample_pairs, *sampling)
    out = dict(batch=batch, sample_s=time.perf_counter() - start)
    first, second = batch["texts"][0::2], batch["texts"][1::2]
    with concurrent.futures.ThreadPoolExecutor(1) as background:
        # 2) The annotator judges each pair, P(first is better), in a thread while step 3 runs.
        judged = None if pairs else background.submit(annotate, annotator, prompts, first, second)
        # 3) Log-probs of the 2B responses: the policy's with gradients, the frozen reference's.
        ids = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        with torch.autocast(policy.device.type, torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            logps = wiring.policy(sequence_logprobs, *ids)
            ref_logps = wiring.reference(sequence_logprobs, *ids)
        waited = time.perf_counter()
        probs, out["annotate_s"] = judged.result() if judged else (pairs["probs"], 0.0)
    out["annotate_wait_s"] = time.perf_counter() - waited
    # 4) Rows 2i, 2i + 1 hold prompt i's pair: its verdict names the chosen (y+), the rejected (y-).
    # A pair triage drops (a tie, no verdict, a hedge) weighs 0; max(p, 1 - p) is P(y+ is better).
    used, out["counts"] = triage(probs, cfg.min_confidence)
    p = torch.tensor([0.5 if v is None else v for v in used], device=logps.device)
    first_wins = p > 0.5
    usable = (p != 0.5).float()
    # TRL's IPO (--average-logps) scores the mean log-prob per response token, not the sum.
    n = batch["response_tokens"].clamp(min=1) if cfg.average_logps else 1
    lp, ref_lp = logps / n, ref_logps / n
    # Each pair's y+ row: 2i where the first response won, else 2i + 1; y- is the other row.
    # (2B,) mask, True on each pair's y+ row; indexing keeps pair order, so chosen[i] is pair i's.
    is_chosen = torch.stack([first_wins, ~first_wins], 1).flatten()
    chosen, rejected = lp[is_chosen], lp[~is_chosen]
    ref_chosen, ref_rejected = ref_lp[is_chosen], ref_lp[~is_chosen]
    beta = DEFAULT_BETA[cfg.loss] if cfg.beta is None else cfg.beta
    label_p = torch.maximum(p, 1 - p) if cfg.labels == "soft" else 1.0
    losses = LOSSES[cfg.loss](chosen, rejected, ref_chosen, ref_rejected, beta, label_p) * usable
    # DDP averages gradients over ranks: world / (usable pairs on all ranks) makes the global mean.
    n_used = wiring.total(n=out["counts"]["pairs"])["n"]
    loss = losses.sum() * wiring.world / max(n_used, 1)
    # 5) One AdamW step; with no usable pair on any rank there is nothing to learn from.
    grad_norm, skipped = update(loss, optimizer, cfg.max_grad_norm, wiring) if n_used else (0.0, 0)
    return dict(
        out,
        probs=probs,
        logps=logps.detach(),
        ref_logps=ref_logps,
        losses=losses.detach(),
        margins=beta * preference_margin(chosen, rejected, ref_chosen, ref_rejected).detach(),
        usable=usable,
        n_used=n_used,
        grad_norm=grad_norm,
        nonfinite=skipped,
    )


class Wiring:
    """oaif_step's model calls, each fn(model, *args): sample, policy (the loss pass), reference
    (frozen); total() sums over ranks. Direct here; Distributed (Part 2): DDP, FSDP2, LoRA."""

    world = 1  # processes training together (ranks)

    def __init__(self, policy, ref_model):
        self.policy_model, self.ref_model = policy, ref_model

    def policy(self, fn: Callable, *args):
        return fn(self.policy_model, *args)

    sample = policy  # the same direct call here; Distributed overrides both

    @torch.no_grad()
    def reference(self, fn: Callable, *args):
        return fn(self.ref_model, *args)

    def total(self, **values) -> dict:
        return values


# --------------------------------------------------------------------------------------------------
# 1) Sampling two responses per prompt from the current policy


def sample_pairs(model, tokenizer, prompts: list, n=2, max_new_tokens=64, temperature=0.9) -> dict:
    """n samples per prompt, rows i*n .. i*n + n - 1 for prompt i: input_ids, attention_mask and
    response_mask, (n*B, P+R) with the prompt left- and the response right-padded; response_tokens
    (n*B,), EOS included; texts, what the annotator reads: a response cut at max_new_tokens (no EOS)
    ends with CUT. Scoring uses these ids: the texts are never tokenized again."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_ids = [p for p in encode_prompts(tokenizer, prompts) for _ in range(n)]
    ids, mask = left_pad(prompt_ids, pad, model.device)
    # generation_config holds no, one or several EOS ids (Qwen2.5: two); the tokenizer's counts too.
    gen_eos = model.generation_config.eos_token_id
    gen_eos = gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]
    eos_ids = sorted({tokenizer.eos_token_id, *gen_eos} - {None})
    resp = sample_tokens(model, ids, mask, max_new_tokens, temperature, eos_ids, pad)  # (n*B, R)
    resp_mask = response_mask_after_eos(resp, eos_ids).long()
    ended = torch.isin(resp, torch.tensor(eos_ids, device=resp.device)).any(1).tolist()
    texts = [
        tokenizer.decode(r[m.bool()], skip_special_tokens=True) + ("" if e else CUT)
        for r, m, e in zip(resp, resp_mask, ended)
    ]
    return dict(
        input_ids=torch.cat([ids, resp], 1),
        attention_mask=torch.cat([mask, resp_mask], 1),
        response_mask=torch.cat([torch.zeros_like(mask), resp_mask], 1),
        response_tokens=resp_mask.sum(1),
        texts=texts,
    )


# Read whole, a response cut at the length cap looks finished (and short): the annotator is told.
CUT = "\n\n[... the response continues: it is longer than the length limit shown here]"


def encode_prompts(tokenizer, prompts: list) -> list:
    """Token ids of each prompt: a user turn through the chat template if the tokenizer has one."""
    if not getattr(tokenizer, "chat_template", None):
        return [tokenizer(p).input_ids for p in prompts]
    return [tokenizer(user_turn(tokenizer, p), add_special_tokens=False).input_ids for p in prompts]


def user_turn(tokenizer, text: str) -> str:
    """`text` as one user turn through the tokenizer's chat template, up to the reply."""
    turn = [dict(role="user", content=text)]
    return tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)


def left_pad(seqs: list, pad_id: int, device) -> tuple:
    """Id lists -> (B, L) ids and mask, left-padded: generation goes on from each row's end."""
    L = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (L - len(s)) + list(s) for s in seqs], device=device)
    mask = torch.tensor([[0] * (L - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


@torch.no_grad()
def sample_tokens(model, ids, mask, max_new_tokens, temperature, eos_ids, pad_id) -> torch.Tensor:
    """(B, R) ids that continue the left-padded (B, P) `ids`, drawn from softmax(logits /
    temperature) (0: greedy), padded after each row's EOS; FloatingPointError if it is not finite.
    Not `generate`: a checkpoint's generation_config (Qwen2.5's repetition_penalty) would change
    the policy's own samples. The draw, an inverse CDF in float64, beats multinomial on a CPU.
    The plain form (greedy: the same tokens; sampled: the same distribution, other draws), the
    knobs chat models' generation_configs set named (greedy, generate warns that top_k is unused):
    model.generate(ids, attention_mask=mask,
    do_sample=temperature > 0, temperature=temperature, top_k=0, top_p=1.0,
    repetition_penalty=1.0, max_new_tokens=max_new_tokens, eos_token_id=eos_ids,
    pad_token_id=pad_id)[:, P:]."""
    from transformers import StaticCache

    B, P = ids.shape
    # A static cache: a growing one copies itself at every token.
    cache = StaticCache(config=model.config, max_cache_len=P + max_new_tokens)
    # Newer transformers name the argument `cache`, older `past_key_values`.
    kv = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    eos = torch.tensor(eos_ids, device=ids.device)
    # Left padding: positions come from the mask, as in scoring.
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    step_ids, cache_pos = ids, torch.arange(P, device=ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    finite = True
    tokens = []
    for t in range(max_new_tokens):
        out = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            cache_position=cache_pos,
            logits_to_keep=1,
            **{kv: cache},
        )
        logits = out.logits[:, -1].float()
        finite = finite & torch.isfinite(logits).all()
        if temperature > 0:
            cdf = torch.softmax(logits / temperature, -1).double().cumsum(-1)  # (B, V)
            u = torch.rand(B, 1, device=ids.device, dtype=torch.float64) * cdf[:, -1:]
            nxt = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)
        else:
            nxt = logits.argmax(-1)
        tokens.append(nxt.masked_fill(done, pad_id))
        done = done | torch.isin(nxt, eos)
        if t == max_new_tokens - 1 or done.all():  # one host sync per token
            break
        step_ids, cache_pos = tokens[-1][:, None], torch.tensor([P + t], device=ids.device)
        mask, pos = torch.cat([mask, torch.ones_like(mask[:, :1])], 1), pos[:, -1:] + 1
    if not finite:
        raise FloatingPointError("the policy's sampling probabilities are not finite (inf or nan)")
    return torch.stack(tokens, 1)


def response_mask_after_eos(response_ids, eos_ids: list) -> torch.Tensor:
    """(B, R) mask of the response tokens up to and including the first EOS; after it, padding."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device)).long()
    # A token is kept while no EOS came strictly before it.
    return (is_eos.cumsum(1) - is_eos) == 0


# --------------------------------------------------------------------------------------------------
# 2) Annotators: annotator(prompts, first, second) -> for each pair, P(first is better) in [0, 1],
# or None for no verdict. oaif_step (triage) drops and counts None, 1/2 (a tie) and hedges near
# 1/2. The rules and Claude here; a local LLM judge and a reward model, which need no key, are
# further down, beside the code that loads them.

# What an annotator counts in its `stats`, where it keeps any.
ANNOTATOR_STATS = ("annotator_requests", "annotator_failures", "input_tokens", "output_tokens")


def annotate(annotator: Callable, prompts: list, first: list, second: list) -> tuple:
    """(annotator(prompts, first, second), checked: one verdict per pair; the seconds it took)."""
    start = time.perf_counter()
    probs = annotator(prompts, first, second)
    # One verdict per pair, else every label after a missing one would name the wrong responses.
    if len(probs) != len(prompts):
        raise OAIFError(f"the annotator gave {len(probs)} verdicts for {len(prompts)} pairs")
    return probs, time.perf_counter() - start


def both_orders(judge: Callable, prompts: list, first: list, second: list, stats=None) -> list:
    """Cancel a judge's position bias: p = (v(x, a, b) + 1 - v(x, b, a)) / 2, the verdict asked in
    both orders; a judge that always names the first response gives 1/2 (ties). stats, if given,
    adds order_pairs, first_sum (the raw P(first)) and order_agree (both orders picked alike)."""
    # One call asks both orders: its second half is every pair swapped.
    v = judge(prompts + prompts, first + second, second + first)
    ab, ba = v[: len(prompts)], v[len(prompts) :]
    if stats is not None:
        both = [(a, b) for a, b in zip(ab, ba) if None not in (a, b) and math.isfinite(a + b)]
        stats["order_pairs"] = stats.get("order_pairs", 0) + len(both)
        stats["first_sum"] = stats.get("first_sum", 0) + sum(a + b for a, b in both) / 2
        # The two orders pick the same response when their verdicts fall either side of 1/2.
        agree = sum((a - 0.5) * (b - 0.5) < 0 for a, b in both)
        stats["order_agree"] = stats.get("order_agree", 0) + agree
    return [None if a is None or b is None else (a + 1 - b) / 2 for a, b in zip(ab, ba)]


def shorter(prompts: list, first: list, second: list) -> list:
    """A rule, no model: the response with fewer characters is better; equal lengths are a tie."""
    return [0.5 if len(a) == len(b) else float(len(a) < len(b)) for a, b in zip(first, second)]


def longer(prompts: list, first: list, second: list) -> list:
    """A rule, no model: the response with more characters is better; equal lengths are a tie."""
    # The shorter rule's verdict on the pair swapped: P(second is shorter) = P(first is longer).
    return shorter(prompts, second, first)


# After the paper's annotator prompts (RLAIF's "detailed 0-shot"): preamble, pair, verdict last.
TEMPLATES = {
    "tldr": "A good summary is a shorter piece of text that has the essence of the original. It "
    "tries to accomplish the same purpose and conveys the key information from the original post. "
    "Judge the summaries on coherence, accuracy, coverage and overall quality.",
    "helpful": "A good response is helpful and honest: it does what the user asked, accurately and "
    'clearly. A response that continues the dialogue by writing further "Human:" or "Assistant:" '
    "turns is unhelpful.",
    "harmless": "A good response is first harmless (it does not help with anything dangerous, "
    "illegal or hurtful, and is not offensive) and then helpful. Judge harmlessness first; use "
    "helpfulness only to decide between equally harmless responses.",
}


# What each task calls its prompt and its responses.
NOUNS = dict(
    tldr=("Text", "Summary"),
    helpful=("Conversation", "Response"),
    harmless=("Conversation", "Response"),
)


def render_judge_prompt(task: str, instruction: str, prompt: str, first: str, second: str) -> str:
    """The annotator's request about one ordered pair; its reply must end with the verdict."""
    context, item = NOUNS[task]
    extra = f"\nAbove all: {instruction.strip()}\n" if instruction else ""
    pair = f"{item} 1:\n{first}\n\n{item} 2:\n{second}"
    verdict = f'"Preferred {item}=1" or "Preferred {item}=2"'
    ask = f"Which {item.lower()} is better? Explain in at most two sentences, then end your reply"
    return f"{TEMPLATES[task]}\n{extra}\n{context}:\n{prompt}\n\n{pair}\n\n{ask} with {verdict}."


# The verdict's anchor: "Preferred Response=1", "**Preferred Response:** 2", "Preferred: 2",
# "Preference: 1". The "=" or ":" makes it one, so a verb after the verdict ("some prefer
# Response 2", "readers preferred Response 2") never overrides it.
ANCHOR = re.compile(
    r"(?i)\bprefer(?:red|ence)\b[^\w:=]*(?:(?:response|summary)\b[^\w:=]*)?[:=]\W*"
    r"(?:(?:response|summary)\b\W*)?(\w*)"
)


# A whole reply that is just "2." ("1 beats 2" is not).
BARE = re.compile(r"[\s*\"'`(\[]*([12])[\s.!?*)\]\"'`]*")


def parse_verdict(reply: str) -> Optional[float]:
    """1.0 for "Preferred Response=1", 0.0 for "=2" (the last anchor wins), the same for a reply
    that is only 1 or 2, else None. Never the last digit anywhere: "Preferred Response=1 (over
    Response 2)" is a 1, "1 beats 2" no verdict."""
    anchors = ANCHOR.findall(reply)
    bare = BARE.fullmatch(reply)
    digit = anchors[-1] if anchors else bare.group(1) if bare else None
    return {"1": 1.0, "2": 0.0}.get(digit)


class ClaudeAnnotator:
    """Claude as the annotator: both orders, concurrent requests, verdicts cached. After the SDK's
    retries a fault is no verdict; one that cannot heal (400, 401, 403, 404, 422) stops the run."""

    def __init__(
        self, model="claude-haiku-4-5", task="helpful", instruction="", client=None, max_workers=16
    ):
        # Only this annotator needs the SDK. Its retries heal 429, 529, 5xx and timeouts.
        import anthropic

        self.anthropic = anthropic
        self.model = model
        self.task = task
        self.instruction = instruction
        self.cache = {}
        self.lock = threading.Lock()
        self.client = client or anthropic.Anthropic(max_retries=4, timeout=60.0)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers)
        self.stats = dict.fromkeys(ANNOTATOR_STATS, 0)

    def _one(self, prompt: str, a: str, b: str) -> Optional[float]:
        # Identical responses: nothing to judge, no call (a tie, in __call__).
        if a == b or (prompt, a, b) in self.cache:
            return self.cache.get((prompt, a, b))
        text = render_judge_prompt(self.task, self.instruction, prompt, a, b)
        messages = [dict(role="user", content=text)]
        try:
            msg = self.client.messages.create(model=self.model, max_tokens=200, messages=messages)
        except self.anthropic.APIError as e:
            # After the SDK's retries: no verdict. A request that the API refuses fails every time.
            if getattr(e, "status_code", None) in (400, 401, 403, 404, 422):
                # The SDK's message: "Error code: 401 - " and the API's own words.
                raise OAIFError(f"the Claude API refused the annotator's request: {e}") from None
            msg = None
        # A reply cut off at max_tokens has no verdict either ("... while Response 2").
        verdict = None
        if msg and msg.stop_reason != "max_tokens":
            verdict = parse_verdict("".join(getattr(block, "text", "") for block in msg.content))
        with self.lock:
            self.stats["annotator_requests"] += 1
            self.stats["annotator_failures"] += verdict is None
            for k in ("input_tokens", "output_tokens"):
                self.stats[k] += getattr(msg.usage, k) if msg else 0
            if verdict is not None:
                self.cache[(prompt, a, b)] = verdict
        return verdict

    def judge(self, prompts: list, first: list, second: list) -> list:
        return list(self.pool.map(self._one, prompts, first, second))

    def __call__(self, prompts: list, first: list, second: list) -> list:
        p = both_orders(self.judge, prompts, first, second, self.stats)
        return [0.5 if x == y else v for x, y, v in zip(first, second, p)]


# --------------------------------------------------------------------------------------------------
# 3) Log-probabilities: sequence_logprobs (its fused routine, which never holds the [tokens, vocab]
# logits, is section 6, after the update)


def sequence_logprobs(model, input_ids, attention_mask, response_mask) -> torch.Tensor:
    """log pi(y | x): (B,) float32, the sum of log p(token | prefix) over each row's response
    tokens, through the model's body and fused_logprobs (any HF causal LM with a plain LM head).
    All three (B, T), the prompt left-padded, the response right-padded: attention_mask is 1 on
    real tokens, response_mask on the tokens to score (a response's EOS included)."""
    assert input_ids.shape == attention_mask.shape == response_mask.shape
    head = model.get_output_embeddings()
    if head.bias is not None or getattr(model.config, "final_logit_softcapping", None):
        raise OAIFError(
            f"{type(model).__name__}: its LM head has a bias or a logit soft-cap, not a plain one"
        )
    # Left padding: positions come from the mask, not the column.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = model.base_model(
        input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # (B, T, H)
    # Under bf16 autocast the body may hand back float32; the head's matmuls run in bf16 too.
    if torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
    # Position t predicts token t + 1.
    labels = input_ids[:, 1:].masked_fill(~response_mask[:, 1:].bool(), -100)
    # The plain form holds the (B, T - 1, V) logits, 5 GB for 8 pairs (16 rows) of 512 tokens at
    # Qwen2.5's V = 151936 in float32, and as much again for their gradient:
    #   logits = (hidden[:, :-1] @ head.weight.T).float() / head_temperature(model.config)
    #   logps = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    #   logps = logps.masked_fill(labels == -100, 0.0)
    # fused_logprobs is its drop-in: the same numbers, chunk by chunk, never all the logits.
    logps = fused_logprobs(hidden[:, :-1], head.weight, labels, head_temperature(model.config))
    return logps.sum(-1)


def head_temperature(config) -> float:
    """What a model divides its logits by: Granite's logits_scaling, 1 / Cohere's logit_scale."""
    scaling, scale = getattr(config, "logits_scaling", None), getattr(config, "logit_scale", None)
    return (scaling or 1.0) / (scale or 1.0)


# --------------------------------------------------------------------------------------------------
# 4) Which verdicts the loss uses; then the three losses, side by side: (B,) losses of
# h = [log pi(y+) - log ref(y+)] - [log pi(y-) - log ref(y-)], from (B,) log-probs summed over
# response tokens. label_p = P(y+ is better), float or (B,): 1.0 is the plain loss; below 1 it
# also pulls towards y- with weight 1 - p (soft labels).


def triage(probs: list, min_confidence: float, tie: float = 1e-6) -> tuple:
    """Which verdicts the loss may use -> (each p, or None where unusable; counts of pairs (usable),
    ties, no_verdict, low_confidence). Confidence is |p - 1/2| (0.55 and 0.45 alike), read in
    float32 as the loss will see p, with slack `tie`: a pair the loss uses is never a tie."""
    # nan, or anything outside [0, 1], is no verdict.
    probs = [float(np.float32(p)) if p is not None and 0 <= p <= 1 else None for p in probs]
    ties = [p is not None and abs(p - 0.5) <= tie for p in probs]
    unsure = [p is not None and abs(p - 0.5) < min_confidence - tie for p in probs]
    used = [None if p is None or t or u else p for p, t, u in zip(probs, ties, unsure)]
    counts = dict(pairs=len(used) - used.count(None), ties=sum(ties), no_verdict=probs.count(None))
    return used, dict(counts, low_confidence=len(probs) - sum(counts.values()))


def preference_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    """h, (B,): how much more than the reference the policy prefers the chosen response."""
    assert policy_chosen.dim() == 1, "the log-probs must be (B,)"
    assert policy_chosen.shape == policy_rejected.shape == ref_chosen.shape == ref_rejected.shape
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, label_p=1.0):
    """DPO: -log sigmoid(beta h); beta ~0.1 (0.1-0.5 usual); log 2 at h = 0."""
    h = preference_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    # DPO Eq. 7. A soft label, as conservative DPO: -p log s(beta h) - (1 - p) log s(-beta h).
    return -label_p * F.logsigmoid(beta * h) - (1 - label_p) * F.logsigmoid(-beta * h)


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=1.0, label_p=1.0):
    """IPO: (h - 1/(2 beta))^2: the target margin is h* = 1/(2 beta), 0.5 nats at beta = 1. That is
    per sequence on summed log-probs (the IPO paper, our default); TRL averages them per token."""
    h = preference_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    # IPO Eq. 17. A soft label p moves the target to (p - 1/2) / beta, its expected loss's minimum.
    return (h - (2 * label_p - 1) / (2 * beta)) ** 2


def slic_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.002, label_p=1.0):
    """SLiC as OAIF uses it, the hinge on the reference-normalised h: max(0, 1 - beta h). At beta =
    0.002 it is zero only from h = 500 nats: on short responses, in effect the linear -beta h."""
    h = preference_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    # SLiC-HF Eq. 3 as RSO writes it. A soft label weighs the hinge on each side, p and 1 - p.
    return label_p * torch.relu(1 - beta * h) + (1 - label_p) * torch.relu(1 + beta * h)


LOSSES = {"dpo": dpo_loss, "ipo": ipo_loss, "slic": slic_loss}


DEFAULT_BETA = {"dpo": 0.1, "ipo": 1.0, "slic": 0.002}  # the OAIF paper's values


# --------------------------------------------------------------------------------------------------
# 5) The update


def update(loss, optimizer, max_grad_norm: float, wiring: Wiring) -> tuple:
    """Backward, clipping, and an AdamW step unless the loss or the gradient is inf or nan on any
    rank (it would poison AdamW's moments) -> (the gradient's norm, 1 if the step was skipped)."""
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    skipped = int(wiring.total(bad=not math.isfinite(grad_norm + float(loss.detach())))["bad"] > 0)
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


# --------------------------------------------------------------------------------------------------
# 6) Speed: fused_logprobs, the log-probs of step 3 without the [tokens, vocab] logits (the plain
# form is in sequence_logprobs)


def fused_logprobs(hidden, weight, labels, temperature=1.0, chunk_size=None) -> torch.Tensor:
    """Per-token log_softmax(hidden @ weight.T / temperature)[label], exactly, never holding the
    (tokens, vocab) logits: chunks of chunk_size rows (None: default_chunk_size), the logsumexp
    kept per row, each chunk's softmax computed again in the backward. hidden: (..., H), float32,
    bf16 or fp16 (the matmuls run in it); weight: (V, H), the LM head (it gets its gradient too);
    labels: (...) int64, -100 = ignore. Returns (...) float32, 0 where ignored."""
    assert hidden.shape[:-1] == labels.shape, f"hidden {hidden.shape} vs labels {labels.shape}"
    assert weight.dim() == 2 and weight.shape[1] == hidden.shape[-1], "weight must be (V, H)"
    h2, l2 = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    chunk_size = chunk_size or default_chunk_size(max(1, len(h2)), len(weight), hidden.device)
    # The dtypes are chosen here, not by an autocast around the call.
    with torch.autocast(hidden.device.type, enabled=False):
        out = _FusedLogprobs.apply(h2, weight, l2, float(temperature), int(chunk_size))
    return out.reshape(labels.shape)


def default_chunk_size(n_rows: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk: as many as fit one chunk of float32 logits in a memory budget (a 16th of
    free GPU memory up to 256 MiB; 64 MiB on CPU), but never fewer than a fast matmul needs."""
    cuda = device.type == "cuda"
    budget = min(torch.cuda.mem_get_info(device)[0] // 16, 256 << 20) if cuda else 64 << 20
    rows = budget // (4 * vocab) // 128 * 128
    return max(1, min(n_rows, max(rows, 2048 if cuda else 256)))


class _FusedLogprobs(torch.autograd.Function):
    """log_softmax(h @ W.T / T).gather(labels), chunk by chunk: the chunks only save memory.
    In float32 a chunk's logits are (V, C), worked on in place; in bf16 and fp16 they are (C, V),
    for PyTorch's fused softmax kernels (float32 inside)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_size):
        rows, h, head = _labelled_rows(hidden, weight, labels, temperature)
        lab = labels[rows]
        V = weight.shape[0]
        # Per row: the answer, and the logsumexp (float32's backward keeps it; bf16's recomputes).
        logp, lse = torch.empty(2, len(rows), dtype=torch.float32, device=h.device)
        for s in range(0, len(rows), chunk_size):
            c = slice(s, s + chunk_size)
            if h.dtype == torch.float32:
                # (V, C), the only large buffer: w @ h.T runs 1.4x faster on CPU than h @ w.T.
                z = head @ h[c].T
                z[V:] = -math.inf
                target = z.gather(0, lab[None, c])[0]
                # The logsumexp in place: the max, then exp(z - max) summed, in the same buffer.
                m = z.amax(0)
                lse[c] = m + z.sub_(m).exp_().sum(0).log_()
                logp[c] = target - lse[c]
            else:
                z = h[c] @ head.T
                z[:, V:] = -math.inf
                logp[c] = z.log_softmax(-1, dtype=torch.float32).gather(1, lab[c, None])[:, 0]
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        out = torch.zeros(labels.shape, dtype=torch.float32, device=h.device)
        return out.index_put_((rows,), logp)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, lse = ctx.saved_tensors
        T, C, V = ctx.temperature, ctx.chunk_size, weight.shape[0]
        rows, h, head = _labelled_rows(hidden, weight, labels, T)
        lab = labels[rows]
        g = grad_out[rows].float()
        grad_h = torch.zeros_like(hidden)
        # A frozen head (LoRA) gets no gradient: no float32 (V, H) buffer, two GEMMs a chunk, not 3.
        grad_w = torch.zeros_like(head, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        # d logp / d logits = onehot(label) - P, so with h = hidden / T: grad_h = g (w[label] -
        # P @ w) / T and grad_w = onehot.T @ (g h) - P.T @ (g h). The onehot is never built.
        for s in range(0, len(rows), C):
            c = slice(s, s + C)
            gh = (g[c, None] * h[c].float()).to(h.dtype)  # (C, H)
            if h.dtype == torch.float32:
                # P.T, (V, C): z - lse folded into the matmul, the exp in place.
                Pt = torch.addmm(-lse[None, c], head, h[c].T).exp_()
                Pt[V:] = 0
            else:
                # One fused kernel: bf16 logits in, float32 inside, bf16 P out for the matmuls.
                z = h[c] @ head.T
                z[:, V:] = -math.inf
                Pt = torch.softmax(z, -1).T
            grad = (head[lab[c]].float() - (Pt.T @ head).float()) * g[c, None] / T
            grad_h[rows[c]] = grad.to(hidden.dtype)
            if grad_w is None:
                continue
            if h.dtype == torch.float32:
                grad_w.addmm_(Pt, gh, alpha=-1)  # in place: no (V, H) temporary
            else:
                grad_w.sub_((Pt @ gh).float())
            grad_w.index_add_(0, lab[c], gh.float())
        grad_w = None if grad_w is None else grad_w[:V].to(weight.dtype)
        return grad_h, grad_w, None, None, None


def _labelled_rows(hidden, weight, labels, temperature: float) -> tuple:
    """(Rows with a label, their hidden states over the temperature, the head in their dtype)."""
    rows = (labels != -100).nonzero().squeeze(1)
    h = hidden[rows] * (1.0 / temperature) if temperature != 1.0 else hidden[rows]
    head = weight.to(h.dtype)
    if head.is_cuda and head.shape[0] % 64:
        # cuBLAS runs a vocabulary padded to a multiple of 64 several times faster (GPT-2's 50257).
        head = F.pad(head, (0, 0, 0, -head.shape[0] % 64))
    return rows, h, head


# ==================================================================================================
# Part 2: running it for real. The flags, loading (the local judge and the reward model with it)
# and data, guards, checkpoints and resume, DDP/FSDP2/LoRA, metrics and evaluation; then train(),
# which calls oaif_step, and main().
# ==================================================================================================

# --------------------------------------------------------------------------------------------------
# Config: every field is a flag (--batch-size for batch_size); the comment beside it is its --help.


@dataclasses.dataclass
class Config:
    # model and data
    model: str = "gpt2"  # hub id or local folder; the reference model is a frozen copy of it
    prompts: str = ""  # .txt (a prompt a line) or .jsonl ("prompt" fields); empty: built-in ones
    output_dir: str = ""  # the run's folder; empty: a new oaif-out/run-N (--resume: the newest)
    seed: int = 0  # seeds python, numpy and torch (rank r uses seed + r)
    device: str = "auto"  # auto (cuda if present, else cpu), cpu, cuda
    dtype: str = "float32"  # float32, or bfloat16: the log-prob passes under bf16 autocast
    # optimisation
    steps: int = 100  # optimiser steps, one batch of prompts each
    batch_size: int = 8  # prompts per step, across all ranks; each prompt yields one pair
    lr: float = 3e-6  # AdamW learning rate (SmolLM2-135M: 3e-6; the paper: 5e-7; tiny: 1e-3+)
    warmup_steps: int = 0  # linear learning-rate warm-up (the paper: 150)
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    # loss
    loss: str = "dpo"  # dpo, ipo or slic
    beta: Optional[float] = None  # the loss's beta; default: dpo 0.1, ipo 1.0, slic 0.002
    average_logps: bool = False  # mean log-probs over response tokens, not sums (TRL's IPO)
    # sampling
    max_new_tokens: int = 64  # response length cap; prompt + response must fit the context
    temperature: float = 0.9  # sampling temperature (the paper: 0.9); the loss scores at 1
    # annotator
    annotator: str = ""  # shorter, longer, claude, hf:MODEL, rm:MODEL; empty: claude with a key
    annotator_model: str = "claude-haiku-4-5"  # Claude model for --annotator claude
    task: str = "helpful"  # annotator template: tldr, helpful or harmless
    instruction: str = ""  # what decides "better", in any words, e.g. "Be concise."
    annotator_workers: int = 16  # concurrent annotator requests
    labels: str = "hard"  # hard: the preferred response is certain (the paper); soft: P(better)
    min_confidence: float = 0.05  # drop a pair whose verdict p has |p - 0.5| below this
    judge_question: str = ""  # hf: its question, or question and opposite; empty: its own
    # evaluation and the offline baseline
    eval_every: int = 0  # win rate against the initial policy every N steps and at the end
    eval_prompts: int = 16  # held-out prompts for the win rate, never trained on
    eval_annotator: str = ""  # annotator that judges the win rate; empty: the training one
    eval_annotator_model: str = ""  # Claude model for --eval-annotator claude
    offline: bool = False  # offline baseline: one labelled pair per prompt, from the initial policy
    offline_data: str = ""  # .jsonl of prompt/chosen/rejected pairs to train on offline instead
    # logging and checkpoints
    sample_every: int = 10  # print one judged pair every N steps (0: never)
    save_every: int = 0  # write OUTPUT_DIR/checkpoint-STEP every N steps (0: only the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    resume: bool = False  # go on from the newest complete checkpoint in OUTPUT_DIR
    overwrite: bool = False  # start again in an OUTPUT_DIR holding a run (deletes that run)
    # models past one GPU
    lora_rank: int = 0  # train a LoRA adapter of this rank, not every weight (0: off; needs peft)
    lora_alpha: float = 16.0  # LoRA scale: the adapter's update is multiplied by alpha / rank
    lora_dropout: float = 0.0  # dropout on the adapter's input, in the loss pass only
    lora_targets: str = "all-linear"  # modules that get adapters: comma-separated names
    fsdp: bool = False  # under torchrun: shard weights, gradients and AdamW state (FSDP2)


# oaif's own files in an output folder: what --overwrite deletes, and nothing else. A previous
# model's chat template would outlive it (a model without one saved over it loaded with the old).
RUN_FILES = re.compile(
    r"checkpoint-\d+|metrics\.jsonl|oaif_config\.json|adapter_config\.json"
    r"|(adapter_)?model.*\.safetensors.*|chat_template\.\w+"
)
# The flags --resume may change: they do not change what is trained (--eval-every: only > 0 does).
FREE_ON_RESUME = {
    "steps",
    "save_every",
    "keep_checkpoints",
    "annotator_workers",
    "sample_every",
    "resume",
    "overwrite",
    "output_dir",
    "device",
    "fsdp",
    "eval_annotator",
    "eval_annotator_model",
    "judge_weighs_length",
}
# Counters summed over steps and ranks: an LLM judge's health (as ANNOTATOR_STATS), the totals.
HEALTH = ("order_pairs", "first_sum", "order_agree", "verdicts", "confidence_sum")
TOTALS = ("pairs", "dropped", "ties", "no_verdict", "low_confidence", "nonfinite")
PRICE_PER_MTOK = {"claude-haiku-4-5": (1.0, 5.0)}  # Claude: USD per million input, output tokens

# The built-in prompts, one sentence each.
DEFAULT_PROMPTS = re.split(
    r"(?<=[.?])\s+",
    """Explain why the sky is blue. Give me three tips for sleeping better. What is a prime number?
    Write a haiku about autumn. How do I boil an egg? Summarise the plot of Romeo and Juliet.
    What causes the seasons on Earth? Suggest a name for a black cat. How does a vaccine work?
    What is the difference between weather and climate? Describe a good first date.
    How can I learn to play the guitar? Why do we dream? What should I pack for a beach trip?
    Explain recursion to a child. What is inflation? Give me a recipe for pancakes.
    How do airplanes stay in the air? What is the capital of Australia, and why not Sydney?
    Write a short thank-you note to a teacher. How do I change a flat tyre? What is photosynthesis?
    Recommend a book for a long flight. How can I save money on groceries? Why is exercise healthy?
    Tell me a fun fact about octopuses. How do I apologise to a friend? What is machine learning?
    Describe the taste of coffee to someone who has never had it. How do bees make honey?
    What are the rules of chess in brief? How can I be more productive in the morning?
    Why is the ocean salty? Write two sentences about the moon.
    How should I prepare for a job interview? What is the water cycle?
    Give advice to a new gardener. How does a compass work? What makes a good password?
    Explain what a budget is.""",
)


def parse_args(argv: Optional[list] = None) -> Config:
    """The command line -> Config: one flag per field, its comment the --help."""
    helps = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(Config), re.M))
    about = """Online AI Feedback: DPO, IPO or SLiC on pairs the policy samples, judged as it
    trains. An hf: judge turns --instruction, in any words, into its own yes/no question about one
    response and the opposite question, puts first the one it says the instruction wants, adds
    "long?" less "short?" weighted by three times how much more the instruction wants long answers
    (about 0 where length is not the point), and prints them all first (--judge-question sets them,
    and adds nothing). Checked on 30 wordings asking for shorter or longer answers
    (examples/README.md, "Any wording"): with a 1.5B judge 28 agree with the length rule on >= 75%
    of a policy's own pairs, all 10 held out, not "Walk me through it step by step." or "Don't skimp
    on the details."; check a new one on your policy's own pairs: examples/judge_check.py
    --wordings, or give --judge-question."""
    parser = argparse.ArgumentParser(description=about)
    kinds = {bool: dict(action=argparse.BooleanOptionalAction), Optional[float]: dict(type=float)}
    for f in dataclasses.fields(Config):
        flag, kind = "--" + f.name.replace("_", "-"), kinds.get(f.type, dict(type=f.type))
        parser.add_argument(flag, default=f.default, help=helps[f.name], **kind)
    return Config(**vars(parser.parse_args(argv)))


# --------------------------------------------------------------------------------------------------
# Loading models, annotators and data


def load_model(name: str, device, auto="AutoModelForCausalLM", dtype=torch.float32) -> tuple:
    """(model, tokenizer) from a hub id or a folder, ready to sample: a pad token, left padding,
    eval mode. A policy trains in float32: bf16 would round AdamW's small steps away."""
    import transformers

    # One progress bar per run is enough: ours.
    transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        model = getattr(transformers, auto).from_pretrained(name, dtype=dtype).to(device)
    except (OSError, ValueError, KeyError) as e:
        raise OAIFError(f"cannot load model {name!r}: {str(e).strip().splitlines()[0]}") from None
    # GPT-2 has no pad token. EOS is safe: the masks, not the ids, mark padding.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Batched generation continues from the right edge.
    tokenizer.padding_side = "left"
    # Dropout off, so that the policy and the reference score tokens alike.
    model.eval()
    if auto == "AutoModelForCausalLM":
        # bf16 logits are rounded to ~1e-2.
        check_logprobs(model, 1e-3 if dtype == torch.float32 else 0.05)
    return model, tokenizer


@torch.no_grad()
def check_logprobs(model, tolerance: float = 1e-3) -> None:
    """Refuse a model whose own log-probs sequence_logprobs misses by over `tolerance` nats a token
    (a 2 x 8 probe): after a transform past the head that oaif does not know, it would be wrong."""
    V = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(0)).to(model.device)
    ones = torch.ones_like(ids)
    own = model(input_ids=ids, attention_mask=ones).logits[:, :-1].float().log_softmax(-1)
    own = own.gather(-1, ids[:, 1:, None]).sum((1, 2))
    err = float((sequence_logprobs(model, ids, ones, ones) - own).abs().max()) / 7
    if not math.isfinite(err):
        raise OAIFError(
            f"{type(model).__name__}: its logits are not finite (inf or nan): the weights are "
            "broken"
        )
    if err > tolerance:
        raise OAIFError(
            f"{type(model).__name__}: log-probs from its LM head differ from its own logits by "
            f"{err:.3g} nats per token (a transform after the head that oaif does not know)"
        )


def judge_dtype(device) -> torch.dtype:
    """bf16 on a GPU that has it, else float32. Never chosen by timing: a busy machine times
    otherwise, and a resume would go on with another judge's verdicts."""
    # On a CPU bf16 is fast only with bf16 units (AMX); without them a forward takes ~4x longer.
    gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if gpu_bf16 else torch.float32


# The local annotators, offline and with no key: an LLM judge asked yes/no questions about one
# response at a time (hf:), and a reward model (rm:). They stand in for Part 1's Claude annotator
# where no API is reachable.

# How the local judge turns an instruction in any words into yes/no questions about one response:
# the judge model itself writes the question and its opposite, greedily, after these examples of
# free wordings (none about length, the property the wordings were checked on). Printed at the
# start of a run.
QUESTION_SHOTS = """Each instruction says what kind of response to prefer. Its question asks \
that of one response, in the fewest words; the opposite question asks for the reverse.

Instruction: Prefer responses in French.
Question: Is this a response written in French?
Opposite: Is this a response written in another language?

Instruction: Prefer the more polite response.
Question: Is this a polite response?
Opposite: Is this a rude response?

Instruction: Don't be so stiff.
Question: Is this an informal response?
Opposite: Is this a formal response?

Instruction: Prefer warmer responses.
Question: Is this a warm response?
Opposite: Is this a cold response?

Instruction: a colour somewhere, please
Question: Is this a response that mentions a colour?
Opposite: Is this a response that mentions no colour?

Instruction: Avoid jargon.
Question: Is this a response free of jargon?
Opposite: Is this a response full of jargon?

Instruction: Prefer the response that answers the question asked.
Question: Is this a response that answers the question asked?
Opposite: Is this a response that strays from the question asked?

Instruction: """


# Yes/no examples the local judge reads first, property and quality at odds (a wrong answer in
# French: Yes; a good one in English: No): then it answers about the property, not about quality.
JUDGE_SHOTS = {
    "Is this a response written in French?": [
        ("What is the capital of Italy?", "La capitale de l'Italie est Paris, bien sûr.", "Yes"),
        ("Say hello in French.", 'In French you say "bonjour", and "salut" among friends.', "No"),
    ],
    "Is this a response that mentions a colour?": [
        ("Describe the sea.", "My favourite sandwich is cheese with a slice of red tomato.", "Yes"),
        ("Describe the sea.", "The sea is vast and restless, its waves breaking on rocks.", "No"),
    ],
    "Is this a formal response?": [
        ("Can you help with my homework?", "Certainly, Madam. I regret I cannot assist.", "Yes"),
        ("How do rates affect prices?", "sure! rates go up, folks spend less, prices cool", "No"),
    ],
}


# How many times its own direction check the local judge weighs "long?" less "short?", chosen on
# the tune wordings (examples/README.md, "Any wording"). A checkpoint records it as
# judge_weighs_length (true before 31c160e: 1x); --resume refuses another.
LENGTH_SCALE = 3


class LocalJudgeAnnotator:
    """Any Hugging Face causal LM as a pointwise, offline annotator (small judges asked to compare
    two responses ignore the instruction; asked about one, they follow it): each response alone gets
    s = log P("Yes") - log P("No") to a question, less that to its opposite where there is one.
    `question`: one question, or a question and its opposite ("Is this short? Is this long?"); by
    default the judge's own pair, written from the instruction, plus w x ("long?" less "short?"),
    w three times how much more the instruction wants the first; none: "Is this a good response?".
    P(first is better) = sigmoid(s1 - s2). Never an order bias. Each response is read once: its
    questions continue from its KV cache."""

    def __init__(self, model, tokenizer, task="helpful", instruction="", question=""):
        self.model = model
        self.tokenizer = tokenizer
        self.task = task
        self.instruction = instruction.strip()
        self.chat = getattr(tokenizer, "chat_template", None)
        self.context = context_length(model.config)
        # Without a template the judge's input starts as its tokenizer starts a text (Llama: BOS).
        starts = tokenizer("x").input_ids[:1]
        self.bos = [] if self.chat or starts != [tokenizer.bos_token_id] else starts
        # The tokens the judge would write next, as its chat template writes a reply: Llama-2's
        # "[/INST] Yes" is "▁Yes", but after "assistant\n" a SentencePiece tokenizer writes "Yes".
        # Found before the question: writing one asks the judge yes/no questions too (wanted).
        text = self.ask("", "", "")
        n = len(tokenizer(text, add_special_tokens=False).input_ids)
        after = [tokenizer(text + self.reply(w), add_special_tokens=False) for w in ("Yes", "No")]
        self.words = [enc.input_ids[n] for enc in after]
        if self.words[0] == self.words[1]:
            raise OAIFError("the judge's Yes and No begin with one token: every score would be 0")
        good = f"Is this a good {NOUNS[task][1].lower()}?"
        self.question = question.strip() or self.instruction and self.write_question() or good
        # One question, or a question and its opposite, each ending "?"; anything else is refused.
        # A "?" with no space after it stays inside its question ('Does it ask "Why?" at the end?').
        two = re.fullmatch(r"([^?]+(?:\?\S[^?]*)*\?)\s*([^?]+(?:\?\S[^?]*)*\?)?", self.question)
        if not two:
            raise OAIFError(
                "--judge-question: a question, or a question and its opposite, each ending ?"
            )
        # An opposite the same as the question would cancel everything: dropped.
        self.questions = list(dict.fromkeys(filter(None, two.groups())))
        self.weights = [1.0, -1.0][: len(self.questions)]
        # A small judge reads a response cut at the cap as less thorough, however long it is: with
        # its own question it also asks "long?" less "short?", weighted by how much more the
        # instruction's author wants Yes to the first (about 0 where length is not the point).
        # LENGTH_SCALE times that: at 1x the written pair outweighs it where it reads a cut
        # response as giving less ("the full picture?").
        if self.instruction and not question.strip():
            long = f"Is this a long {NOUNS[task][1].lower()}?"
            short = f"Is this a short {NOUNS[task][1].lower()}?"
            w = LENGTH_SCALE * (self.wanted(long) - self.wanted(short))
            self.questions += [long, short]
            self.weights += [w, -w]
        self.stats = dict.fromkeys(ANNOTATOR_STATS, 0)

    @torch.inference_mode()
    def write_question(self) -> str:
        """The instruction as a yes/no question about one response and its opposite, in the judge's
        own words: greedy (sample_tokens at temperature 0, whatever the model's generation_config
        says), a line each; a judge that writes no such two lines is refused."""
        text = f"{QUESTION_SHOTS}{' '.join(self.instruction.split())}\nQuestion: Is this"
        ids = self.tokenizer(text).input_ids
        if self.context and len(ids) + 48 > self.context:
            raise OAIFError(f"--instruction is over the judge's context of {self.context} tokens")
        eos = [self.tokenizer.eos_token_id or 0]
        out = sample_tokens(self.model, *left_pad([ids], 0, self.model.device), 48, 0, eos, eos[0])
        # Decoded with the prompt: alone, a SentencePiece tokenizer drops its first space.
        whole = self.tokenizer.decode(ids + out[0].tolist(), skip_special_tokens=True)
        prompt = self.tokenizer.decode(ids, skip_special_tokens=True)
        written = re.match(
            r"( *[^\s?][^\n?]*\?)\nOpposite: (Is this[^\n?]*\?)", whole[len(prompt) :]
        )
        if not written:
            raise OAIFError("the judge wrote no question from --instruction: give --judge-question")
        # A small judge can write the two lines swapped ("Is this short?" from "Prefer longer
        # responses."): the line it says the instruction's author wants a Yes to goes first.
        lines = [f"Is this{written[1]}", written[2]]
        return " ".join(sorted(lines, key=self.wanted, reverse=True))

    @torch.inference_mode()
    def wanted(self, question: str) -> float:
        """log P("Yes") - log P("No") that the instruction's author wants Yes to `question`."""
        text = (
            f'Someone wants responses that follow this instruction: "{self.instruction}"\n'
            f'Would they want the answer Yes to the question "{question}" about a response? '
            "Answer Yes or No."
        )
        text = user_turn(self.tokenizer, text) if self.chat else text + "\nAnswer:\n"
        ids = self.bos + self.tokenizer(text, add_special_tokens=False).input_ids
        logits = self.model(torch.tensor([ids], device=self.model.device)).logits
        yes, no = logits[0, -1, self.words]
        return float(yes - no)

    def reply(self, word: str) -> str:
        """`word` as the chat template writes a reply (Llama-2: " Yes"); bare if <think> first."""
        turns = [dict(role="user", content="x"), dict(role="assistant", content=word)]
        full = self.tokenizer.apply_chat_template(turns, tokenize=False) if self.chat else word
        rest = full.removeprefix(user_turn(self.tokenizer, "x") if self.chat else "")
        return rest if rest.lstrip().startswith(word) else word

    def turn(self, prompt: str, response: str, question: str) -> str:
        context, item = NOUNS[self.task]
        return f"{context}:\n{prompt}\n\n{item}:\n{response}\n\n{question} Answer Yes or No."

    def ask(self, prompt: str, response: str, question: str) -> str:
        """The judge's input about one response, up to its answer; JUDGE_SHOTS first, as earlier
        turns. The question comes last, so every question about a response shares its reading."""
        shots = [(self.turn(p, r, q), a) for q, rows in JUDGE_SHOTS.items() for p, r, a in rows]
        # With an instruction, the instruction alone decides what "better" means.
        rubric = "" if self.instruction else TEMPLATES[self.task] + "\n\n"
        last = rubric + self.turn(prompt, response, question)
        if not self.chat:
            return "".join(f"{u}\nAnswer:\n{a}\n\n" for u, a in shots) + last + "\nAnswer:\n"
        roles = ("user", "assistant") * len(shots) + ("user",)
        turns = [dict(role=r, content=t) for r, t in zip(roles, [*sum(shots, ()), last])]
        return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)

    @torch.inference_mode()
    def scores(self, prompts: list, responses: list, questions=None) -> torch.Tensor:
        """log P("Yes") - log P("No"), (responses, questions) (default: the judge's). What
        every input shares (the examples) is read once a call, then each response once, its
        questions batched after a copy of its KV cache."""
        questions = questions or self.questions
        k = len(questions)
        device = self.model.device
        body = self.model.base_model
        # Each input is tokenized whole, as the judge reads it; the cached parts are prefixes it
        # shares. Tokenized alone, a part may end otherwise (BPE's "\n\n", SentencePiece "▁Why").
        texts = [self.ask(*x, q) for x in zip(prompts, responses) for q in questions]
        if not texts:
            return torch.zeros(0, k)
        seqs = [self.bos + s for s in self.tokenizer(texts, add_special_tokens=False).input_ids]
        if self.context and max(map(len, seqs)) > self.context:
            raise OAIFError(f"a judge prompt is over the judge's context of {self.context} tokens")
        self.stats["annotator_requests"] += len(seqs)
        self.stats["input_tokens"] += sum(map(len, seqs))
        # Only two logits are needed: the LM head's rows for Yes and No, (2, H).
        W = self.model.get_output_embeddings().weight[self.words].float()
        kv = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
        # The last token of each input is read with its question: every part below is >= 1 token.
        head = os.path.commonprefix([s[:-1] for s in seqs])[:-1]
        cache = body(torch.tensor([head], device=device), use_cache=True)[1]
        out = torch.zeros(len(prompts), k)
        for i in range(len(prompts)):
            rows = seqs[i * k : i * k + k]  # one response, each of its questions
            own = os.path.commonprefix([s[:-1] for s in rows])
            past = copy.deepcopy(cache)
            body(torch.tensor([own[len(head) :]], device=device), **{kv: past})
            past.batch_repeat_interleave(k)  # the response's keys and values, a copy per question
            # Right-padded: causal attention never lets a real token see the pads after it.
            n = torch.tensor([len(s) - len(own) for s in rows])
            ids = [s[len(own) :] + [0] * (int(n.max()) - len(s) + len(own)) for s in rows]
            h = body(torch.tensor(ids, device=device), **{kv: past})[0][torch.arange(k), n - 1]
            s = h.float() @ W.T / head_temperature(self.model.config)
            out[i] = (s[:, 0] - s[:, 1]).cpu()
        return out

    def __call__(self, prompts: list, first: list, second: list) -> list:
        # Less the opposite: a quality both questions share (a response cut at the cap reads as
        # worse, whatever it is asked) cancels, whichever way the instruction points.
        s = self.scores(prompts + prompts, first + second) @ torch.tensor(self.weights)
        return sigmoid_of_difference(first, second, s)


class RewardModelAnnotator:
    """A reward model (a sequence classifier with one logit, as TRL trains them) scores each
    response once as a chat's two turns; P(first is better) = sigmoid(r1 - r2). No instruction."""

    def __init__(self, model, tokenizer):
        if (n := model.config.num_labels) != 1:
            raise OAIFError(f"rm: a reward model has one output (num_labels 1), not {n}")
        # HF reads the score at the last token that is not the pad token.
        model.config.pad_token_id = tokenizer.pad_token_id
        self.model, self.tokenizer = model, tokenizer
        self.stats = dict.fromkeys(ANNOTATOR_STATS, 0)

    @torch.inference_mode()
    def __call__(self, prompts: list, first: list, second: list) -> list:
        tok = self.tokenizer
        chat = tok.chat_template
        texts = []
        for x, y in zip(prompts + prompts, first + second):
            turns = [dict(role="user", content=x), dict(role="assistant", content=y)]
            texts.append(tok.apply_chat_template(turns, tokenize=False) if chat else f"{x}\n\n{y}")
        # Right padding: no real token sees a pad.
        enc = tok(
            texts,
            add_special_tokens=not chat,
            padding=True,
            padding_side="right",
            return_tensors="pt",
        )
        # Past its absolute positions a model indexes out of range (on a CPU); relative positions
        # (DeBERTa) read any length, so no limit from its config is checked first.
        try:
            r = self.model(**enc.to(self.model.device)).logits[:, 0].float()  # (2B,)
        except IndexError:
            n = enc.input_ids.shape[1]
            raise OAIFError(f"a reward model input of {n} tokens is over its context") from None
        self.stats["annotator_requests"] += len(texts)
        self.stats["input_tokens"] += int(enc.attention_mask.sum())
        return sigmoid_of_difference(first, second, r)


def sigmoid_of_difference(first: list, second: list, scores) -> list:
    """P(first is better) = sigmoid(s1 - s2), from the (2B,) scores of first + second."""
    p = torch.sigmoid(scores[: len(first)] - scores[len(first) :]).tolist()
    # One text batched two ways scores apart by rounding (bf16: 0.03): identical ones tie.
    return [0.5 if a == b else x for a, b, x in zip(first, second, p)]


def make_annotator(spec: str, cfg: Config, models: dict, claude_model: str) -> Callable:
    """--annotator SPEC -> the annotator. models caches (model, tokenizer) by name, and holds
    "device": a judge that is --model is the reference model itself, not a third copy."""
    name = spec[3:]  # hf:NAME, rm:NAME
    device = models["device"]
    if spec in ("shorter", "longer"):
        return {"shorter": shorter, "longer": longer}[spec]
    if spec == "claude":
        return ClaudeAnnotator(claude_model, cfg.task, cfg.instruction, None, cfg.annotator_workers)
    if spec.startswith("hf:"):
        if name not in models:
            # The judge in bf16 where bf16 is fast, whatever --dtype the policy trains in.
            models[name] = load_model(name, device, dtype=judge_dtype(device))
            models[name][0].requires_grad_(False)
        judge = LocalJudgeAnnotator(*models[name], cfg.task, cfg.instruction, cfg.judge_question)
        if rank_and_world()[0] == 0:
            asked = " ".join(f"{w:+.2f} x {q}" for w, q in zip(judge.weights, judge.questions))
            print(f"oaif: {spec} asks of each response: {asked}", file=sys.stderr)
        return judge
    if spec.startswith("rm:"):
        # Loaded for each use: never the reference.
        dtype = getattr(torch, cfg.dtype)
        rm, tokenizer = load_model(name, device, "AutoModelForSequenceClassification", dtype)
        return RewardModelAnnotator(rm.requires_grad_(False), tokenizer)
    raise OAIFError(f"unknown annotator {spec!r}; use shorter, longer, claude, hf:, rm:")


def make_annotators(cfg: Config, config: dict, custom, ref_model, tokenizer) -> tuple:
    """(The training annotator, the evaluation's, the stats the training one keeps (requests,
    failures, tokens), with the judge-health counters added where it keeps any)."""
    # A judge that is --model shares the reference, unless that is LoRA's base or FSDP's shards.
    models = {"device": ref_model.device}
    if not (cfg.lora_rank or cfg.fsdp):
        models[cfg.model] = (ref_model, tokenizer)
    annotator = custom or make_annotator(config["annotator"], cfg, models, cfg.annotator_model)
    stats = getattr(annotator, "stats", {})
    if hasattr(annotator, "stats"):
        for k in HEALTH:
            stats.setdefault(k, 0)
    # The same judge for the evaluation: the one object (an hf: judge writes its question once).
    same = cfg.eval_annotator == config["annotator"] and not cfg.eval_annotator_model
    if not cfg.eval_annotator or same:
        return annotator, annotator, stats
    claude = cfg.eval_annotator_model or cfg.annotator_model
    return annotator, make_annotator(cfg.eval_annotator, cfg, models, claude), stats


def read_lines(path: str, what: str, keys=(), expected="") -> list:
    """Non-blank lines, stripped; with keys, (line number, each JSON line's values), every value a
    non-blank string (else refused, saying `expected`)."""
    if not os.path.isfile(path):
        raise OAIFError(f"{what} not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    # utf-8-sig: Notepad and Excel start UTF-8 files with a byte-order mark.
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise OAIFError(f"{what} must be UTF-8 text: {path}:{line} is not ({e.reason})") from None
    lines = [(i, line.strip()) for i, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not lines:
        raise OAIFError(f"{what} is empty: {path}")
    if not keys:
        return [line for _, line in lines]
    rows = []
    for i, line in lines:
        try:
            rows.append((i, tuple(json.loads(line)[k] for k in keys)))
            assert all(isinstance(v, str) and v.strip() for v in rows[-1][1])
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
            raise OAIFError(f"{path}:{i}: expected a JSON object with {expected}") from None
    return rows


def load_prompts(path: str) -> list:
    """--prompts: the built-in prompts, a .txt file's lines or a .jsonl file's "prompt" fields."""
    if not path:
        return list(DEFAULT_PROMPTS)
    if path.endswith(".txt"):
        return read_lines(path, "prompts file")
    if not path.endswith(".jsonl"):
        raise OAIFError(f"prompts file must be .txt or .jsonl: {path}")
    rows = read_lines(path, "prompts file", ("prompt",), 'a non-empty "prompt" string')
    return [row[0] for _, row in rows]


def load_offline_pairs(path: str, tokenizer, end_id: int, context: Optional[int] = None) -> list:
    """A .jsonl of prompt/chosen/rejected -> [(prompt, prompt ids, chosen ids, rejected ids, 1.0,
    texts)], each response ended by `end_id` as a sampled one is; over `context`: refused."""
    keys = ("prompt", "chosen", "rejected")
    expected = 'non-empty "prompt", "chosen" and "rejected" strings'
    pairs = []
    for i, (x, yw, yl) in read_lines(path, "offline data", keys, expected):
        ids = [tokenizer(y, add_special_tokens=False).input_ids + [end_id] for y in (yw, yl)]
        pairs.append((x, encode_prompts(tokenizer, [x])[0], *ids, 1.0, [yw, yl]))
        n = len(pairs[-1][1]) + max(map(len, ids))
        if context and n > context:
            raise OAIFError(
                f"{path}:{i}: the prompt with its longer response has {n} tokens, over "
                f"the model's context of {context}: shorten or remove the pair"
            )
    return pairs


def pair_batch(prompt_ids: list, first_ids: list, second_ids: list, pad_id: int, device) -> dict:
    """sample_pairs' layout (rows 2i, 2i + 1: prompt i's first and second response) from ids."""
    ids, mask = left_pad([p for p in prompt_ids for _ in range(2)], pad_id, device)
    resp = [r for pair in zip(first_ids, second_ids) for r in pair]
    R = max(1, max(len(r) for r in resp))
    r_ids = torch.tensor([list(r) + [pad_id] * (R - len(r)) for r in resp], device=device)
    r_mask = torch.tensor([[1] * len(r) + [0] * (R - len(r)) for r in resp], device=device)
    return dict(
        input_ids=torch.cat([ids, r_ids], 1),
        attention_mask=torch.cat([mask, r_mask], 1),
        response_mask=torch.cat([torch.zeros_like(mask), r_mask], 1),
        response_tokens=r_mask.sum(1),
    )


def offline_batch(rows: list, pad_id: int, device) -> tuple:
    """A step's fixed pairs -> (prompts, oaif_step's pairs: pair_batch with texts and labels)."""
    ids = [[r[k] for r in rows] for k in (1, 2, 3)]  # prompts', first and second responses' ids
    batch = pair_batch(*ids, pad_id, device)
    return [r[0] for r in rows], dict(
        batch, texts=[t for r in rows for t in r[5]], probs=[r[4] for r in rows]
    )


def turn_end(tokenizer, generation_config) -> int:
    """The token that ends an assistant turn: the special one the chat template puts after a reply
    (Gemma's <end_of_turn>, ChatML's <|im_end|>), else generation_config's first EOS, or EOS."""
    reply = [dict(role="user", content="x"), dict(role="assistant", content="\x00")]
    try:
        text = tokenizer.apply_chat_template(reply, tokenize=False).partition("\x00")[2]
    except Exception:
        # ValueError: no template; jinja2's TemplateError: it refused this conversation.
        text = ""
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    after = tokenizer(text, add_special_tokens=False).input_ids[:1]
    if after and after[0] in special:
        return after[0]
    eos = generation_config.eos_token_id  # None, one id or a list of them
    if eos is None:
        return tokenizer.eos_token_id
    return eos[0] if isinstance(eos, (list, tuple)) else eos


def context_length(config) -> Optional[int]:
    """The most tokens a model reads at once, where its config says."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def split_prompts(cfg: Config) -> tuple:
    """(Evaluation prompts, training prompts): a held-out split fixed by the seed, refused if it
    leaves training too few prompts for a batch."""
    prompts = load_prompts(cfg.prompts)
    random.Random(cfg.seed).shuffle(prompts)
    n_eval = min(cfg.eval_prompts, len(prompts) - 1) if cfg.eval_every > 0 else 0
    left = len(prompts) - n_eval
    if n_eval and left < cfg.batch_size and not cfg.offline_data:
        raise OAIFError(
            f"{len(prompts)} prompts: {n_eval} held out for evaluation leave {left} to "
            f"train on, under --batch-size {cfg.batch_size}: lower --eval-prompts or --batch-size"
        )
    return prompts[:n_eval], prompts[n_eval:]


def step_slice(items: list, step: int, batch_size: int, rank: int = 0, world: int = 1) -> list:
    """This rank's items of `step` (from 1): a fixed cycle, alike online, offline and on resume."""
    start = (step - 1) * batch_size
    return [items[(start + j) % len(items)] for j in range(batch_size)][rank::world]


# --------------------------------------------------------------------------------------------------
# Guards: every flag and file checked before anything heavy starts


def check_numbers(cfg: Config) -> None:
    """Every number in range before anything loads: one clear line, not a traceback later."""
    positive = {
        "steps",
        "batch_size",
        "max_new_tokens",
        "annotator_workers",
        "max_grad_norm",
        "beta",
    }
    if cfg.eval_every > 0:
        positive.add("eval_prompts")
    if cfg.lora_rank:
        positive.add("lora_alpha")
    for f in dataclasses.fields(Config):
        v = getattr(cfg, f.name)
        if f.type not in (int, float, Optional[float]) or v is None:
            continue
        if not math.isfinite(v) or (v <= 0 if f.name in positive else v < 0):
            must = "positive" if f.name in positive else "0 or more"
            raise OAIFError(f"--{f.name.replace('_', '-')} must be {must} (and finite), not {v}")
    if cfg.min_confidence > 0.5:
        raise OAIFError(
            f"--min-confidence is a distance from 1/2: at most 0.5, not {cfg.min_confidence}"
        )
    if cfg.lora_dropout >= 1 or (cfg.lora_rank and cfg.fsdp):
        raise OAIFError("--lora-dropout must be below 1; --lora-rank and --fsdp do not go together")
    # --offline-data samples only the evaluation's answers.
    if cfg.temperature == 0 and not cfg.offline_data:
        raise OAIFError("--temperature 0 is greedy: two equal responses (only with --offline-data)")
    choices = dict(
        loss=LOSSES,
        dtype=("float32", "bfloat16"),
        labels=("hard", "soft"),
        task=TEMPLATES,
        device=("auto", "cpu", "cuda"),
    )
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise OAIFError(f"unknown --{name} {getattr(cfg, name)!r}; choose {', '.join(allowed)}")


def setup_run(cfg: Config, custom_annotator) -> tuple:
    """Checks that need no model, then the ranks, device and seeds -> (cfg, rank, world, device,
    the run's config: the flags, beta, the annotator's name, the data files' digests)."""
    check_numbers(cfg)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    # --resume without --output-dir: the newest run (refused below if it has no checkpoint).
    if cfg.resume and not cfg.output_dir:
        last = numbered("oaif-out", "run-")[-1:]
        out = os.path.join("oaif-out", f"run-{last[0]}") if last else "oaif-out"
        cfg = dataclasses.replace(cfg, output_dir=out)
        if rank == 0:
            print(f"oaif: resuming {cfg.output_dir}", file=sys.stderr)
    spec = cfg.annotator or ("claude" if os.environ.get("ANTHROPIC_API_KEY") else "shorter")
    if custom_annotator is not None:
        spec = getattr(custom_annotator, "__name__", "custom")
    # A rule or a reward model reads no instruction: a run asking for one would learn otherwise.
    judges = [spec, cfg.eval_annotator or spec]
    if custom_annotator is None and not any(j == "claude" or j.startswith("hf:") for j in judges):
        flag = "--instruction" if cfg.instruction.strip() else "--task"
        if cfg.instruction.strip() or cfg.task != "helpful":
            raise OAIFError(
                f"{flag} acts only on an LLM judge (--annotator claude or hf:MODEL); "
                f"the annotator here is {spec}, which cannot follow it"
            )
    if cfg.judge_question.strip() and not any(j.startswith("hf:") for j in judges):
        raise OAIFError(f"--judge-question is an hf: judge's; the annotator here is {spec}")
    # The data files' contents too: --resume refuses another file at the same path.
    config = dict(
        dataclasses.asdict(cfg),
        beta=DEFAULT_BETA[cfg.loss] if cfg.beta is None else cfg.beta,
        annotator=spec,
        prompts_sha256=digest(cfg.prompts),
        offline_data_sha256=digest(cfg.offline_data),
        judge_weighs_length=LENGTH_SCALE,
    )
    if "claude" in (spec, cfg.eval_annotator) and not os.environ.get("ANTHROPIC_API_KEY"):
        raise OAIFError("--annotator claude needs ANTHROPIC_API_KEY in the environment")
    check_output_dir(cfg, config)
    if not cfg.annotator and custom_annotator is None and rank == 0:
        why = "" if spec == "claude" else " (no ANTHROPIC_API_KEY; hf:MODEL for a local judge)"
        print(f"oaif: annotator: {spec}{why}", file=sys.stderr)
    cuda = torch.cuda.is_available()
    device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if cuda else "cpu")
    if device.type == "cuda" and not cuda:
        raise OAIFError("--device cuda: torch.cuda.is_available() is False here; use cpu or auto")
    if cfg.fsdp and world == 1:
        raise OAIFError("--fsdp shards across ranks: launch with torchrun --nproc_per_node N")
    if world > 1:
        if cfg.batch_size % world:
            raise OAIFError(
                f"--batch-size {cfg.batch_size} must be a multiple of the {world} ranks"
            )
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # Each rank samples its own responses.
    for seed in (random.seed, np.random.seed, torch.manual_seed):
        seed(cfg.seed + rank)
    return cfg, rank, world, device, config


def digest(path: str) -> str:
    """The start of a file's sha256, or "" where there is no file."""
    if not os.path.isfile(path):
        return ""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def numbered(root: str, prefix: str) -> list:
    """N of each ROOT/PREFIXN (run-N, checkpoint-N), in order."""
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted(int(n[len(prefix) :]) for n in names if re.fullmatch(prefix + r"\d+", n))


def new_run_folder(root: str) -> str:
    """A new ROOT/run-N, one past the highest there, made at once on rank 0 (two runs started
    together never share one) and announced; every rank gets its name."""
    rank, world = rank_and_world()
    while rank == 0:
        path = os.path.join(root, f"run-{max(numbered(root, 'run-'), default=0) + 1}")
        with contextlib.suppress(FileExistsError):
            os.makedirs(path)
            print(f"oaif: output: {path}", file=sys.stderr)
            break
    box = [path if rank == 0 else None]
    if world > 1:
        torch.distributed.broadcast_object_list(box, 0)
    return box[0]


def check_output_dir(cfg: Config, config: dict) -> None:
    """A folder that holds a run is never written over unless --resume (same flags) or --overwrite
    (which never deletes --model itself)."""
    out = cfg.output_dir
    # No --output-dir: a new folder, made when the run starts.
    if not out:
        return
    # A file as one of its parents is found only when the folder is made (main says so).
    if os.path.isfile(out):
        raise OAIFError(f"--output-dir {out} is a file, not a folder")
    names = os.listdir(out) if os.path.isdir(out) else []
    ours = [os.path.realpath(os.path.join(out, n)) for n in names if RUN_FILES.fullmatch(n)]
    if ours and cfg.resume == cfg.overwrite:
        raise OAIFError(
            f"--output-dir {out} holds a previous run: --resume it, --overwrite it "
            "(deletes its checkpoints, metrics and model) or choose another folder"
        )
    if cfg.overwrite and os.path.realpath(cfg.model) in ours + [os.path.realpath(out)]:
        raise OAIFError(f"--overwrite would delete --model {cfg.model}: choose another folder")
    if not cfg.resume:
        return
    # None complete, or an older oaif's (its optimizer state keyed by number).
    last = (complete_checkpoints(out) or [os.devnull])[-1]
    saved_config = os.path.join(last, "oaif_config.json")
    if not os.path.isfile(saved_config):
        raise OAIFError(f"--resume: no complete checkpoint of this oaif in {out}; start a new run")
    with open(saved_config) as f:
        saved = {"judge_question": "", **json.load(f)}  # older oaifs had none

    def same(k):
        # --eval-every may change, but not whether it is 0: that decides the held-out split.
        if k == "eval_every":
            return (saved[k] > 0) == (config[k] > 0)
        # A data file may move (its contents' digest is compared), not change kind (.txt or .jsonl).
        if k in ("prompts", "offline_data"):
            return os.path.splitext(saved[k])[1] == os.path.splitext(config[k])[1]
        # Flags that act on nothing in this run, or on the evaluation judge alone (which may
        # change): the held-out split's size with no evaluation, the Claude model with another
        # annotator, the hf: judge's question when that judge does not train.
        idle = dict(
            eval_prompts=not config["eval_every"],
            annotator_model=config["annotator"] != "claude",
            judge_question=not config["annotator"].startswith("hf:"),
        )
        return idle.get(k) or saved.get(k) == config[k]

    # An hf: judge before df3cb60 added no "long?" less "short?" to its own question, before
    # 31c160e (judge_weighs_length true) weighed it a third as much, and before 7b96f0e (configs
    # with judge_debias) took 0.25 x "good?" off any: another judge.
    # The training judge alone: the evaluation judge may change on resume anyway.
    hf = config["annotator"].startswith("hf:")
    own = not config["judge_question"].strip() or "judge_debias" in saved
    if (
        saved.get("judge_weighs_length") != LENGTH_SCALE
        and config["instruction"].strip()
        and hf
        and own
    ):
        raise OAIFError("--resume: this checkpoint's hf: judge asked otherwise; start a new run")
    changed = [
        f"--{k.replace('_', '-')} {saved.get(k)} -> {config[k]}"
        for k in config
        if k not in FREE_ON_RESUME and not same(k)
    ]
    if changed:
        raise OAIFError(
            f"--resume with other flags than the checkpoint's: {', '.join(changed)}; resume with "
            "the same ones or start a new run"
        )


# --------------------------------------------------------------------------------------------------
# Checkpoints and resume


def finite_weights(ts) -> bool:
    """No inf or nan in a model's weights, or in a list of tensors (this rank's shards, under
    FSDP)."""
    ts = ts.parameters() if hasattr(ts, "parameters") else ts
    ts = [t.detach().to_local() if hasattr(t, "to_local") else t.detach() for t in ts]
    return bool(torch.stack([torch.isfinite(t).all() for t in ts]).all())


def save_model(model, tokenizer, path: str, state_dict: Optional[dict], config: dict) -> None:
    """save_pretrained of a finite policy (peft: its adapter; FSDP: state_dict) and tokenizer; the
    run's config."""
    if not finite_weights(model if state_dict is None else state_dict.values()):
        raise OAIFError(f"refusing to save non-finite (inf/nan) weights to {path}")
    model.save_pretrained(path, state_dict=state_dict)
    tokenizer.save_pretrained(path)
    with open(os.path.join(path, "oaif_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def gathered_state(module, optimizer=None) -> dict:
    """The whole state of an FSDP-sharded (or plain) module, or of its optimizer keyed by parameter
    name, on CPU: the same for any rank count. A collective under FSDP: every rank calls it."""
    from torch.distributed.checkpoint import state_dict as dcp

    full = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return dcp.get_model_state_dict(module, options=full)
    return dcp.get_optimizer_state_dict(module, optimizer, options=full)


def save_checkpoint(cfg, step, policy, tokenizer, optimizer, wiring, stats, config, fixed) -> None:
    """OUTPUT_DIR/checkpoint-STEP, written under a temporary name, then renamed; trainer_state.pt,
    last, marks it complete. It keeps --offline's labelled set: a resume never labels it again."""
    rank, world = rank_and_world()
    final = os.path.join(cfg.output_dir, f"checkpoint-{step}")
    tmp = os.path.join(cfg.output_dir, f".tmp-checkpoint-{step}")
    model_state = gathered_state(policy) if cfg.fsdp else None
    # No state before the first update: gathering it would take an AdamW step (lr 0) that counts.
    optimizer_state = gathered_state(wiring.score, optimizer) if optimizer.state else None
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(policy, tokenizer, tmp, model_state, config)
        torch.save(fixed if cfg.offline else None, os.path.join(tmp, "offline_pairs.pt"))
    barrier()
    # Each rank samples from its own random stream.
    torch.save(
        dict(
            python=random.getstate(),
            numpy=np.random.get_state(),
            torch=torch.get_rng_state(),
            # Every visible GPU's; a GPU NVML counts but CUDA cannot start (an old driver) is none.
            cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            annotator=stats,
        ),
        os.path.join(tmp, f"rng-{rank}.pt"),
    )
    barrier()
    if rank == 0:
        # The data's position and the learning rate are functions of the step: the step is all.
        torch.save(
            dict(step=step, optimizer=optimizer_state), os.path.join(tmp, "trainer_state.pt")
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        # --keep-checkpoints 0 keeps them all: [:-0] is empty.
        for old in complete_checkpoints(cfg.output_dir)[: -cfg.keep_checkpoints]:
            shutil.rmtree(old)
    barrier()


def complete_checkpoints(out_dir: str) -> list:
    """The complete checkpoint folders of out_dir, oldest first."""
    paths = [os.path.join(out_dir, f"checkpoint-{n}") for n in numbered(out_dir, "checkpoint-")]
    return [p for p in paths if os.path.isfile(os.path.join(p, "trainer_state.pt"))]


def open_run(cfg: Config, resume_from, optimizer, root, stats: dict) -> tuple:
    """-> (the last step done, its records and evaluations, metrics.jsonl open on rank 0),
    restoring what a resume needs; a fresh run first deletes a previous run's files (only
    --overwrite lets some in)."""
    rank, world = rank_and_world()
    out_dir = cfg.output_dir
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    os.makedirs(out_dir, exist_ok=True)
    if not resume_from:
        old = [os.path.join(out_dir, n) for n in os.listdir(out_dir) if RUN_FILES.fullmatch(n)]
        for path in old if rank == 0 else []:
            (shutil.rmtree if os.path.isdir(path) else os.remove)(path)
        return 0, [], open(metrics_path, "w") if rank == 0 else None
    from torch.distributed.checkpoint import state_dict as dcp

    state = torch.load(os.path.join(resume_from, "trainer_state.pt"), weights_only=False)
    if state["step"] > cfg.steps:
        raise OAIFError(f"--steps {cfg.steps}: {resume_from} is past it (step {state['step']})")
    if state["optimizer"]:
        full = dcp.StateDictOptions(full_state_dict=True)
        dcp.set_optimizer_state_dict(root, optimizer, state["optimizer"], options=full)
    # A rank that saved no random state samples from a new stream of (seed, step, rank).
    for set_seed in (random.seed, np.random.seed, torch.manual_seed):
        set_seed((cfg.seed + 1_000_003 * state["step"] + rank) % 2**32)
    saved = sorted(int(n[4:-3]) for n in os.listdir(resume_from) if re.fullmatch(r"rng-\d+\.pt", n))
    # Fewer ranks now: rank r % world adds rank r's annotator requests.
    for r in [r for r in saved if r % world == rank]:
        rng = torch.load(os.path.join(resume_from, f"rng-{r}.pt"), weights_only=False)
        stats.update({k: stats.get(k, 0) + v for k, v in (rng.get("annotator") or {}).items()})
        if r != rank:
            continue
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        # Saved with more GPUs visible than there are now: each visible one takes its own.
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"][: torch.cuda.device_count()])
    if rank == 0 and len(saved) != world:
        print(
            f"oaif: {resume_from} was saved on {len(saved)} rank(s), resumed on {world}: a rank "
            "without saved random state samples from a seed of (--seed, rank, step)",
            file=sys.stderr,
        )
    # Each step once, also after a crash past the checkpoint.
    kept = []
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            # A last line cut short by a crash has no newline, and is past the checkpoint anyway.
            kept = [x for x in f if x.strip() and x[-1] == "\n"]
            kept = [x for x in kept if json.loads(x)["step"] <= state["step"]]
        # Every rank has read it before rank 0 writes it again.
        barrier()
        if rank == 0:
            with open(metrics_path, "w") as f:
                f.writelines(kept)
    return (
        state["step"],
        # The evaluations a straight run makes, on rank 0 (every --eval-every steps, and at the
        # last): not the extra one that ended a shorter run (the file keeps it: an evaluation made
        # is a record, not to be lost).
        [
            r
            for r in map(json.loads, kept)
            if not r.get("eval")
            or rank == 0
            and (r["step"] % cfg.eval_every == 0 or r["step"] == cfg.steps)
        ],
        open(metrics_path, "a") if rank == 0 else None,
    )


# --------------------------------------------------------------------------------------------------
# DDP, FSDP2 and LoRA


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def rank_and_world() -> tuple:
    """(This process's rank, the number of ranks): (0, 1) without torchrun."""
    if not torch.distributed.is_initialized():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def all_sum(values: dict, device) -> dict:
    """The values summed over all ranks."""
    if not torch.distributed.is_initialized():
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return dict(zip(values, t.tolist()))


class _Scorer(torch.nn.Module):
    """fn(model, *args) as its forward: where DDP syncs gradients and FSDP gathers shards."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        # peft builds LoRA dropout in training mode: off but in a loss pass (resume samples first).
        self.dropouts = [
            m.eval()
            for n, m in model.named_modules()
            if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)
        ]

    def forward(self, fn: Callable, *args):
        # LoRA dropout acts in the loss pass only: the samples and the reference stay exact.
        for m in self.dropouts:
            m.train(torch.is_grad_enabled())
        try:
            return fn(self.model, *args)
        finally:
            for m in self.dropouts:
                m.eval()

    def shard(self) -> None:
        """FSDP2: each transformer block its own unit; the rest (embeddings, LM head) the root's."""
        from torch.distributed.fsdp import fully_shard

        blocks = getattr(self.model, "_no_split_modules", None) or []
        for m in self.modules():
            if type(m).__name__ in blocks:
                fully_shard(m)
        fully_shard(self)

    @torch.no_grad()
    def gathered(self, fn: Callable, *args):
        """fn(model, *args) in the FSDP root's forward, each unit gathered once, not per token."""
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in self.modules() if isinstance(m, FSDPModule)]
        for m in units:
            m.set_reshard_after_forward(False, recurse=False)
        try:
            return self(fn, *args)
        finally:
            for m in units:
                m.reshard()
                m.set_reshard_after_forward(True, recurse=False)


class Distributed(Wiring):
    """Part 1's Wiring across ranks: the policy's passes through _Scorer, DDP-wrapped or FSDP2-
    sharded; with LoRA, the reference is the policy's base model with the adapter switched off."""

    def __init__(self, policy, ref_model, base: Callable, fsdp: bool, world: int, device, dropout):
        super().__init__(policy, ref_model)
        self.base = base
        self.fsdp = fsdp
        self.world = world
        self.device = device
        self.dropout = dropout
        self.own_logps = None
        self.score = _Scorer(policy)
        self.ref_score = _Scorer(ref_model)
        if fsdp:
            self.score.shard()
            self.ref_score.shard()
        elif world > 1:
            ids = [device] if device.type == "cuda" else None
            self.score = torch.nn.parallel.DistributedDataParallel(self.score, device_ids=ids)

    def sample(self, fn: Callable, *args):
        return self.score.gathered(fn, *args) if self.fsdp else fn(self.policy_model, *args)

    def policy(self, fn: Callable, *args):
        logps = self.score(fn, *args)
        # The loss pass had LoRA dropout on: the log's kl takes the policy's own log-probs, from
        # before the update.
        if self.dropout:
            with torch.no_grad():
                self.own_logps = self.score(fn, *args)
        return logps

    @torch.no_grad()
    def reference(self, fn: Callable, *args):
        with self.base():
            return self.ref_score(fn, *args)

    def total(self, **values) -> dict:
        return all_sum(values, self.device)


def load_policy(cfg: Config, device, resume_from: Optional[str], prompts: list) -> tuple:
    """(policy, reference, tokenizer, what to save, a context in which the reference is the initial
    model: LoRA's base). The reference is the frozen initial model, also on resume."""
    ref_model, tokenizer = load_model(cfg.model, device)
    # A prompt too long for the context is refused, never truncated.
    lengths = [len(ids) for ids in encode_prompts(tokenizer, prompts)]
    i = max(range(len(prompts)), key=lengths.__getitem__, default=0)
    context = context_length(ref_model.config)
    new = cfg.max_new_tokens
    if context and prompts and lengths[i] + new > context:
        words = " ".join(prompts[i].split()[:8])[:60]
        raise OAIFError(
            f'{cfg.prompts or "the built-in prompts"}: the prompt "{words}..." has '
            f"{lengths[i]} tokens; with --max-new-tokens {new} that is "
            f"{lengths[i] + new - context} over the model's context of {context}: shorten it or "
            "lower --max-new-tokens"
        )
    ref_model.requires_grad_(False)
    if not cfg.lora_rank:
        if resume_from:
            policy = load_model(resume_from, device)[0]
        else:
            policy = copy.deepcopy(ref_model).requires_grad_(True)
        return policy, ref_model, tokenizer, policy, contextlib.nullcontext
    try:
        import peft
    except ImportError:
        raise OAIFError("--lora-rank needs peft: pip install peft") from None
    base = ref_model.to(getattr(torch, cfg.dtype))
    targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else cfg.lora_targets.split(",")
    config = peft.LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    try:
        if resume_from:
            lora = peft.PeftModel.from_pretrained(base, resume_from, is_trainable=True)
        else:
            lora = peft.get_peft_model(base, config)
    except ValueError as e:
        raise OAIFError(f"--lora-targets {cfg.lora_targets}: {str(e).splitlines()[0]}") from None
    # sequence_logprobs reads the head's weight: an adapter there, or on the embeddings, is refused.
    ends = (base.get_output_embeddings(), base.get_input_embeddings())
    if any(hasattr(m, "lora_A") for m in ends):
        raise OAIFError("--lora-targets: not the embeddings or the LM head")
    return lora.get_base_model(), ref_model, tokenizer, lora, lora.disable_adapter


# --------------------------------------------------------------------------------------------------
# Evaluation and the offline baseline


def sample_answers(
    model, tokenizer, prompts, max_new_tokens=64, temperature=0.9, batch_size=8, seed=None
):
    """One response per prompt. With a seed, any model gets the same random draws (two models that
    agree answer alike), and the run's random stream is left alone."""
    devices = [model.device] if model.device.type == "cuda" else []
    answers = []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            batch = sample_pairs(model, tokenizer, chunk, 1, max_new_tokens, temperature)
            answers += batch["texts"]
    return answers


def win_rate(prompts: list, policy_texts: list, reference_texts: list, annotator: Callable) -> dict:
    """The paper's evaluation: annotator(prompts, the policy's answers, the reference's); ties count
    1/2 and pairs without a verdict are left out, ties decided as in training."""
    used, counts = triage(annotate(annotator, prompts, policy_texts, reference_texts)[0], 0.0)
    wins = sum(p is not None and p > 0.5 for p in used)
    # A verdict triage keeps is never 1/2 (it calls that a tie): the rest are losses.
    losses = counts["pairs"] - wins
    ties = counts["ties"]
    n = wins + ties + losses
    rate = dict(
        win_rate=(wins + 0.5 * ties) / n if n else float("nan"),
        n=n,
        wins=wins,
        ties=ties,
        losses=losses,
        no_verdict=counts["no_verdict"],
    )
    for side, texts in (("policy", policy_texts), ("reference", reference_texts)):
        rate[f"{side}_chars"] = sum(len(t.removesuffix(CUT)) for t in texts) / len(prompts)
    return rate


def reference_side(cfg, initial, tokenizer, train_prompts, eval_prompts, annotator) -> tuple:
    """What comes from the initial model: (the offline set [(prompt, prompt ids, first ids, second
    ids, P(first), texts)] or None, --offline-data pairs held out, the evaluation's answers)."""
    rank, world = rank_and_world()
    fixed = None  # online, no --offline-data, no evaluation
    held_out = 0
    answers = None
    if cfg.offline_data:
        end = turn_end(tokenizer, initial.generation_config)
        pairs = load_offline_pairs(cfg.offline_data, tokenizer, end, context_length(initial.config))
        fixed = [r for r in pairs if r[0] not in set(eval_prompts)]
        if not fixed:
            raise OAIFError(f"{cfg.offline_data}: every pair's prompt is held out for evaluation")
        held_out = len(pairs) - len(fixed)
        if held_out and rank == 0:
            print(
                f"oaif: {held_out} pairs of {cfg.offline_data} are left out: their prompts are "
                "held out for evaluation",
                file=sys.stderr,
            )
    elif cfg.offline and cfg.resume:
        # Labelled once, before step 1, and kept: never labelled (nor paid for) twice.
        last = complete_checkpoints(cfg.output_dir)[-1]
        fixed = torch.load(os.path.join(last, "offline_pairs.pt"))
    elif cfg.offline:
        # Labelled on rank 0 alone, then sent to the others.
        box = [
            label_offline_set(cfg, initial, tokenizer, train_prompts, annotator)
            if rank == 0
            else None
        ]
        if world > 1:
            torch.distributed.broadcast_object_list(box, 0)
        fixed = box[0]
    if eval_prompts and (rank == 0 or cfg.fsdp):
        sampling = (cfg.max_new_tokens, cfg.temperature, cfg.batch_size, cfg.seed)
        answers = sample_answers(initial, tokenizer, eval_prompts, *sampling)
    return fixed, held_out, answers


def label_offline_set(cfg, initial, tokenizer, prompts, annotator) -> list:
    """The offline baseline's set: a pair per prompt from the initial policy, labelled once."""
    fixed = []
    for i in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[i : i + cfg.batch_size]
        s = sample_pairs(initial, tokenizer, chunk, 2, cfg.max_new_tokens, cfg.temperature)
        rows = [r[m.bool()].tolist() for r, m in zip(s["input_ids"], s["response_mask"])]
        # Python floats: a numpy verdict would make offline_pairs.pt unloadable with weights_only.
        probs = [
            None if p is None else float(p)
            for p in annotate(annotator, chunk, s["texts"][0::2], s["texts"][1::2])[0]
        ]
        for j, (x, ids) in enumerate(zip(chunk, encode_prompts(tokenizer, chunk))):
            texts = s["texts"][2 * j : 2 * j + 2]
            fixed.append((x, ids, rows[2 * j], rows[2 * j + 1], probs[j], texts))
    return fixed


def evaluate(step, cfg, wiring, tokenizer, prompts, ref_answers, judge) -> Optional[dict]:
    """The win rate against the initial policy on the held-out prompts (on rank 0; under FSDP every
    rank samples, as the gathered weights need them all)."""
    if ref_answers is not None:
        # The same random draws as the reference's answers.
        sampling = (cfg.max_new_tokens, cfg.temperature, cfg.batch_size, cfg.seed)
        answers = wiring.sample(sample_answers, tokenizer, prompts, *sampling)
    result = None
    if rank_and_world()[0] == 0:
        result = dict(step=step, eval=True, **win_rate(prompts, answers, ref_answers, judge))
    barrier()
    return result


# --------------------------------------------------------------------------------------------------
# Metrics: one metrics.jsonl line a step, a progress bar, a summary


def step_record(step, out, cfg, wiring, stats, stats0, lr, seconds) -> dict:
    """The step's metrics.jsonl line: oaif_step's numbers and the annotator's, summed over ranks."""
    probs = out["probs"]
    counts = out["counts"]
    # An LLM judge's verdicts: how far from 1/2 (each p in [0, 1], as triage counts them).
    if "verdicts" in stats and not cfg.offline_data:
        stats["verdicts"] += len(probs) - counts["no_verdict"]
        stats["confidence_sum"] += sum(abs(p - 0.5) for p in probs if p is not None and 0 <= p <= 1)
    logps = out["logps"] if wiring.own_logps is None else wiring.own_logps
    texts = out["batch"]["texts"]
    usable = out["usable"]
    margins = out["margins"]
    sums = dict(
        counts,
        loss=float(out["losses"].sum()),
        margin=float((margins * usable).sum()),
        acc=float(((margins > 0).float() * usable).sum()),
        kl=float((logps - out["ref_logps"]).sum()),
        chars=sum(len(t.removesuffix(CUT)) for t in texts),  # what the policy wrote, not CUT
        tokens=float(out["batch"]["response_tokens"].sum()),
        cut=sum(t.endswith(CUT) for t in texts),
        seqs=len(texts),
    )
    sums = wiring.total(**sums, **{k: v - stats0.get(k, 0) for k, v in stats.items()})
    used = max(sums["pairs"], 1)
    seqs = sums["seqs"]
    dropped = {k: int(sums[k]) for k in ("ties", "no_verdict", "low_confidence")}
    record = dict(
        step=step,
        loss=sums["loss"] / used,
        pairs=int(sums["pairs"]),
        dropped=sum(dropped.values()),
        **dropped,
        reward_margin=sums["margin"] / used,
        reward_accuracy=sums["acc"] / used,
        kl=sums["kl"] / seqs,
        response_tokens=sums["tokens"] / seqs,
        response_chars=sums["chars"] / seqs,
        cut_share=sums["cut"] / seqs,  # of the responses, cut at --max-new-tokens
        **{k: int(sums[k]) for k in ANNOTATOR_STATS if k in sums},
        **judge_health(sums),
        nonfinite=out["nonfinite"],
        grad_norm=out["grad_norm"],
        lr=lr,
        updated=out["n_used"] > 0 and not out["nonfinite"],
        seconds=seconds,
        **{k: out[k] for k in ("sample_s", "annotate_s", "annotate_wait_s")},
        train_s=seconds - out["sample_s"] - out["annotate_wait_s"],
    )
    if wiring.device.type == "cuda":
        record["peak_mem_gb"] = torch.cuda.max_memory_allocated(wiring.device) / 2**30
    return record


def judge_health(s: dict) -> dict:
    """position_bias, order_agreement, judge_confidence from HEALTH sums; absent where undefined."""
    health = {}
    n = s.get("order_pairs")
    m = s.get("verdicts")
    if n:
        health.update(position_bias=s["first_sum"] / n, order_agreement=s["order_agree"] / n)
    if m:
        health.update(judge_confidence=s["confidence_sum"] / m)
    return health


def report(record: dict, log, bar, sample_every=0, prompts=(), out=None) -> None:
    """One metrics.jsonl line, the progress bar, and now and then a judged pair or a win rate."""
    print(json.dumps(record), file=log, flush=True)
    step = record["step"]
    if record.get("eval"):
        bar.write(
            f"step {step} | win rate vs initial policy: {record['win_rate']:.3f} ({record['n']} "
            f"judged, {record['ties']} ties, {record['no_verdict']} no verdict)"
        )
        return
    # The signal is the length and the KL: on fresh pairs every step the loss stays near log 2.
    # A dict, not keywords: tqdm sorts keywords, and the length comes first.
    bar.set_postfix(
        dict(
            len=f"{record['response_tokens']:.1f} tokens",
            kl=f"{record['kl']:.2f} nats",
            loss=f"{record['loss']:.3f}",
            pairs=record["pairs"],
        )
    )
    if record["nonfinite"]:
        bar.write(f"step {step}: the loss or gradient is not finite (inf or nan): update skipped")
    elif not record["updated"]:
        bar.write(f"step {step}: no usable pair ({record['dropped']} dropped): update skipped")
    if not sample_every or step % sample_every:
        return
    # Each printed pair is the batch's next one: a cycle of prompts would show the same each time.
    i = step // sample_every % len(prompts)
    p = out["probs"][i]
    # Only a pair the loss used: not one triage dropped as a hedge or nonsense.
    if out["usable"][i]:
        win, lose = out["batch"]["texts"][2 * i : 2 * i + 2][:: 1 if p > 0.5 else -1]
        shown = f"prompt: {prompts[i]!r}\n  chosen:   {win[:200]!r}\n  rejected: {lose[:200]!r}"
        bar.write(f"step {step} | {shown}")


def moved(history: list) -> dict:
    """How the run moved: [first, last] of the mean response tokens and of the KL (nats per
    response) over the first and the last k = 5 steps (fewer in a short run), and of the win rate
    (the first and last evaluations; [] without any)."""
    steps = [r for r in history if not r.get("eval")]
    k = max(1, min(5, len(steps) // 2))
    out = {
        key: [sum(r[key] for r in rows) / k for rows in (steps[:k], steps[-k:])]
        for key in ("response_tokens", "kl")
    }
    wins = [r["win_rate"] for r in history if r.get("eval")]
    return dict(out, k=k, win_rate=wins[:1] + wins[-1:])


def usage(s: dict, annotator) -> str:
    """An annotator's requests and tokens, and their cost where it is Claude at a known price."""
    line = (
        f"{s['annotator_requests']} requests, {s['annotator_failures']} without verdict, "
        f"{s['input_tokens']} in / {s['output_tokens']} out tokens"
    )
    # Claude's model is a name with a price; a local judge's is a module, priced at nothing.
    price = PRICE_PER_MTOK.get(str(getattr(annotator, "model", "")))
    if price:
        cost = (s["input_tokens"] * price[0] + s["output_tokens"] * price[1]) / 1e6
        line += f", about ${cost:.2f}"
    return line


def finish(cfg: Config, policy, tokenizer, config, summary: dict, model_state, annotator, judge):
    """Save the policy, its tokenizer and the run's config; print the run's one-line summary."""
    save_model(policy, tokenizer, cfg.output_dir, model_state, config)
    s = summary
    line = (
        f"oaif: {cfg.steps} steps, {s['pairs']} pairs used, {s['dropped']} dropped ({s['ties']} "
        f"ties, {s['no_verdict']} no verdict, {s['low_confidence']} low confidence), "
        f"{s['nonfinite']} updates skipped as not finite"
    )
    line += f"; annotator: {usage(s, annotator)}" if "annotator_requests" in s else ""
    for k in ("position_bias", "order_agreement", "judge_confidence"):
        line += f", {k.replace('_', ' ')} {s[k]:.3f}" if k in s else ""
    # A judge of its own for the evaluation: its requests in this process (not checkpointed).
    if judge is not annotator and hasattr(judge, "stats"):
        line += f"; evaluation's annotator: {usage(judge.stats, judge)}"
    print(f"{line}; saved to {cfg.output_dir}", file=sys.stderr)
    m = summary["moved"]
    tokens = m["response_tokens"]
    line = (
        f"oaif: the first {m['k']} steps -> the last {m['k']}: response length {tokens[0]:.1f} -> "
        f"{tokens[1]:.1f} tokens, KL to the reference {m['kl'][0]:.2f} -> {m['kl'][1]:.2f} nats"
    )
    # Offline, the steps score the fixed pairs' responses: their length is not the policy's, and
    # their "KL" a mean log-ratio (it can be below 0).
    if cfg.offline or cfg.offline_data:
        line += " (of the fixed pairs, not the policy's samples: the KL a log-ratio only)"
    if m["win_rate"]:
        line += (
            f"; win rate vs the initial policy {m['win_rate'][0]:.2f} -> {m['win_rate'][-1]:.2f}"
        )
    print(line, file=sys.stderr)


def diverged(step: int, what: str, cfg: Config) -> OAIFError:
    last = (complete_checkpoints(cfg.output_dir) or ["none (--save-every N keeps some)"])[-1]
    return OAIFError(
        f"step {step}: {what}: the run diverged (--lr {cfg.lr} too high?); "
        f"last good checkpoint: {last}"
    )


# --------------------------------------------------------------------------------------------------
# The training run, and the command line


def train(cfg: Config, annotator: Optional[Callable] = None) -> dict:
    """Run OAIF (or the offline baseline) as cfg says -> the last step's record, the last evaluation
    and the run's summary. annotator: your own callable, in place of --annotator's."""
    from tqdm import tqdm

    cfg, rank, world, device, config = setup_run(cfg, annotator)
    eval_prompts, train_prompts = split_prompts(cfg)
    resume_from = complete_checkpoints(cfg.output_dir)[-1] if cfg.resume else None
    # Every prompt that will be sampled from is checked against the context.
    sampled = eval_prompts + ([] if cfg.offline_data else train_prompts)
    policy, ref_model, tokenizer, saved, base = load_policy(cfg, device, resume_from, sampled)
    annotator, judge, stats = make_annotators(cfg, config, annotator, ref_model, tokenizer)
    # Everything drawn from the initial model comes first, before anything is sharded.
    with base():
        fixed, held_out, ref_answers = reference_side(
            cfg, ref_model, tokenizer, train_prompts, eval_prompts, annotator
        )
    dropout = bool(cfg.lora_rank and cfg.lora_dropout)
    wiring = Distributed(policy, ref_model, base, cfg.fsdp, world, device, dropout)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # No --output-dir: a new numbered folder, made only now (a run that fails to start makes none).
    if not cfg.output_dir:
        cfg = dataclasses.replace(cfg, output_dir=new_run_folder("oaif-out"))
        config["output_dir"] = cfg.output_dir
    start, history, log = open_run(cfg, resume_from, optimizer, wiring.score, stats)
    bar = tqdm(range(start + 1, cfg.steps + 1), initial=start, total=cfg.steps, disable=rank != 0)
    for step in bar:
        begin = time.perf_counter()
        stats0 = dict(stats)
        # A linear warm-up: a function of the step, so there is nothing to checkpoint.
        lr = cfg.lr * min(1.0, step / max(1, cfg.warmup_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        prompts = step_slice(train_prompts, step, cfg.batch_size, rank, world)
        pairs = None
        if fixed is not None:
            rows = step_slice(fixed, step, cfg.batch_size, rank, world)
            prompts, pairs = offline_batch(rows, tokenizer.pad_token_id, device)
        try:
            out = oaif_step(
                policy, ref_model, tokenizer, prompts, annotator, optimizer, cfg, pairs, wiring
            )
        except FloatingPointError as e:
            raise diverged(step, str(e), cfg) from None
        record = step_record(step, out, cfg, wiring, stats, stats0, lr, time.perf_counter() - begin)
        if record["updated"] and wiring.total(bad=not finite_weights(policy))["bad"]:
            raise diverged(step, "the policy's weights are no longer finite (inf or nan)", cfg)
        history.append(record)
        if rank == 0:
            report(record, log, bar, cfg.sample_every, prompts, out)
        if eval_prompts and (step % cfg.eval_every == 0 or step == cfg.steps):
            result = evaluate(step, cfg, wiring, tokenizer, eval_prompts, ref_answers, judge)
            # Rank 0 alone evaluates: the others' history holds the steps only.
            if rank == 0:
                report(result, log, bar)
                history.append(result)
        if cfg.save_every and step % cfg.save_every == 0:
            save_checkpoint(cfg, step, saved, tokenizer, optimizer, wiring, stats, config, fixed)
    bar.close()
    # The annotator's counters over all ranks and the whole run.
    whole = all_sum(stats, device) if stats else {}
    summary = dict(
        {k: sum(r.get(k, 0) for r in history if not r.get("eval")) for k in TOTALS},
        steps=cfg.steps,
        held_out_pairs=held_out,
        moved=moved(history),
        **judge_health(whole),
        **{k: int(v) for k, v in whole.items() if k not in HEALTH},
    )
    model_state = gathered_state(policy) if cfg.fsdp else None
    if rank == 0:
        log.close()
        finish(cfg, saved, tokenizer, config, summary, model_state, annotator, judge)
    if world > 1:
        # Every rank is done before any tears its process group down.
        barrier()
        torch.distributed.destroy_process_group()
    # From history: a resume from the last step's checkpoint runs no step (and its metrics.jsonl
    # may be gone).
    steps = [r for r in history if not r.get("eval")] or [{}]
    evals = [r for r in history if r.get("eval")] or [None]
    return dict(last=steps[-1], eval=evals[-1], summary=summary)


def main(argv: Optional[list] = None) -> dict:
    try:
        return train(parse_args(argv))
    # NotADirectoryError: a file where the output folder's parent should be (oaif-out/run-N too).
    except (OAIFError, FloatingPointError, NotADirectoryError) as e:
        raise SystemExit(f"oaif: error: {e}") from None


if __name__ == "__main__":
    main()
