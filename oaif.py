"""Online AI Feedback (OAIF) in one file: align a language model with DPO, IPO or SLiC on pairs that it samples
itself, labelled on the spot by an LLM annotator. Guo et al. 2024, "Direct Language Model Alignment from Online
AI Feedback", arXiv 2402.04792; DPO arXiv 2305.18290, IPO 2310.12036, SLiC-HF 2305.10425 (hinge as in RSO, 2309.06657).

Algorithm 1, each step: sample two responses per prompt from the *current* policy; the annotator says which
is better; take one gradient step of a direct-alignment loss against the frozen initial model (reference).

Run:    python oaif.py --model gpt2 --steps 100                       (annotator: claude if a key is set)
        python oaif.py --model gpt2 --annotator claude --instruction "Prefer the more concise response."
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
import timeit
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F


class OAIFError(Exception):
    """Bad input or an unrecoverable fault; main() prints it as one line and exits non-zero."""


# ----------------------------------------------------------------------------------------------------------
# Config: every field is a flag (--batch-size for batch_size); the comment beside it is its --help.


@dataclasses.dataclass
class Config:
    # model and data
    model: str = "gpt2"  # hub id or local folder; the reference model is a frozen copy of it
    prompts: str = ""  # .txt (one prompt a line) or .jsonl (a "prompt" field); empty: the built-in prompts
    output_dir: str = "oaif-out"  # metrics.jsonl, checkpoints and the final policy go here
    seed: int = 0  # seeds python, numpy and torch (rank r uses seed + r)
    device: str = "auto"  # auto (cuda if present, else cpu), cpu, cuda
    dtype: str = "float32"  # float32 or bfloat16 (the log-prob passes under bf16 autocast; weights stay float32)
    # optimisation
    steps: int = 100  # optimiser steps, one batch of prompts each
    batch_size: int = 8  # prompts per step, across all ranks; each prompt yields one pair
    lr: float = 3e-6  # AdamW learning rate (measured on SmolLM2-135M; the paper: 5e-7, Adafactor, PaLM 2; tiny: 1e-3+)
    warmup_steps: int = 0  # linear learning-rate warm-up (the paper: 150)
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    # loss
    loss: str = "dpo"  # dpo, ipo or slic
    beta: Optional[float] = None  # loss temperature; default per loss: dpo 0.1, ipo 1.0, slic 0.002
    average_logps: bool = False  # average log-probs over response tokens instead of summing (TRL's IPO)
    # sampling
    max_new_tokens: int = 64  # response length cap; prompt + response must fit the model's context
    temperature: float = 0.9  # sampling temperature (the paper: 0.9); the loss scores at temperature 1
    # annotator
    annotator: str = ""  # shorter, longer, claude, hf:MODEL; empty: claude if ANTHROPIC_API_KEY is set, else shorter
    annotator_model: str = "claude-haiku-4-5"  # Claude model for --annotator claude
    task: str = "helpful"  # annotator template: tldr, helpful or harmless
    instruction: str = ""  # extra criterion that decides "better", e.g. "Prefer the more concise response."
    annotator_workers: int = 16  # concurrent annotator requests
    labels: str = "hard"  # hard: the loss takes the preferred response as certain (the paper); soft: P(it is better)
    min_confidence: float = 0.05  # drop a pair whose verdict p has |p - 0.5| below this (a judge that hedges)
    # evaluation and the offline baseline
    eval_every: int = 0  # win rate against the reference every N steps and at the end (0: off)
    eval_prompts: int = 16  # held-out prompts for the win rate, never trained on
    eval_annotator: str = ""  # annotator that judges the win rate; empty: the training annotator
    eval_annotator_model: str = ""  # Claude model for --eval-annotator claude; empty: --annotator-model
    offline: bool = False  # offline DAP baseline: one labelled pair per prompt from the initial policy, reused
    offline_data: str = ""  # .jsonl of prompt/chosen/rejected pairs to train on offline instead
    # logging and checkpoints
    sample_every: int = 10  # print one judged pair every N steps (0: never)
    save_every: int = 0  # write OUTPUT_DIR/checkpoint-STEP every N steps (0: only the final model)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    resume: bool = False  # continue from the newest complete checkpoint in OUTPUT_DIR (with the same flags)
    overwrite: bool = False  # start again in an OUTPUT_DIR holding a run: delete its checkpoints, metrics and model
    # models past one GPU
    lora_rank: int = 0  # train a LoRA adapter of this rank instead of every weight (0: off); pip install peft
    lora_alpha: float = 16.0  # LoRA scale: the adapter's update is multiplied by alpha / rank
    lora_dropout: float = 0.0  # dropout on the adapter's input, in the loss pass only
    lora_targets: str = "all-linear"  # modules that get adapters: comma-separated names, or every linear layer
    fsdp: bool = False  # under torchrun: shard weights, gradients and AdamW state across ranks (FSDP2)


DEFAULT_BETA = {"dpo": 0.1, "ipo": 1.0, "slic": 0.002}  # the OAIF paper's values
RUN_FILES = (r"checkpoint-\d+|metrics\.jsonl|oaif_config\.json|adapter_config\.json|(adapter_)?model.*\.safetensors.*"
             r"|chat_template\.\w+")  # a previous model's template would outlive it (a model without one saved over it)
FREE_ON_RESUME = {"steps", "save_every", "keep_checkpoints", "annotator_workers", "sample_every", "resume", "overwrite",
                  "output_dir", "device", "fsdp", "eval_annotator", "eval_annotator_model"}  # they train alike
# and --eval-every's value: only its > 0 shapes training (the held-out split)
ANNOTATOR_STATS = ("annotator_requests", "annotator_failures", "input_tokens", "output_tokens")
# an LLM judge's health, summed like those (train adds the keys to its stats: one key order on every rank)
HEALTH = ("order_pairs", "first_sum", "order_agree", "verdicts", "confidence_sum")
TOTALS = ("pairs", "dropped", "ties", "no_verdict", "low_confidence", "nonfinite")  # summed over the run

DEFAULT_PROMPTS = [
    "Explain why the sky is blue.", "Give me three tips for sleeping better.", "What is a prime number?",
    "Write a haiku about autumn.", "How do I boil an egg?", "Summarise the plot of Romeo and Juliet.",
    "What causes the seasons on Earth?", "Suggest a name for a black cat.", "How does a vaccine work?",
    "What is the difference between weather and climate?", "Describe a good first date.",
    "How can I learn to play the guitar?", "Why do we dream?", "What should I pack for a beach trip?",
    "Explain recursion to a child.", "What is inflation?", "Give me a recipe for pancakes.",
    "How do airplanes stay in the air?", "What is the capital of Australia, and why not Sydney?",
    "Write a short thank-you note to a teacher.", "How do I change a flat tyre?", "What is photosynthesis?",
    "Recommend a book for a long flight.", "How can I save money on groceries?", "Why is exercise healthy?",
    "Tell me a fun fact about octopuses.", "How do I apologise to a friend?", "What is machine learning?",
    "Describe the taste of coffee to someone who has never had it.", "How do bees make honey?",
    "What are the rules of chess in brief?", "How can I be more productive in the morning?", "Why is the ocean salty?",
    "Write two sentences about the moon.", "How should I prepare for a job interview?", "What is the water cycle?",
    "Give advice to a new gardener.", "How does a compass work?", "What makes a good password?",
    "Explain what a budget is.",
]


# ----------------------------------------------------------------------------------------------------------
# Log-probabilities without the [tokens, vocab] logits tensor


def _rows_and_head(hidden, weight, labels, temperature: float) -> tuple:
    """Labelled rows (one host sync) over the temperature, their labels, the head in their dtype (on CUDA padded to a
    multiple of 64 rows, llm.c: GPT-2's 50257 ran 5-7x slower on an H200 than 50304; CPU: 10%), the vocabulary V."""
    rows = (labels != -100).nonzero().squeeze(1)
    h = hidden[rows] * (1.0 / temperature) if temperature != 1.0 else hidden[rows]  # (n, H)
    w = weight.to(h.dtype)
    return rows, h, labels[rows], F.pad(w, (0, 0, 0, -w.shape[0] % 64)) if w.is_cuda else w, weight.shape[0]


class _FusedLogprobs(torch.autograd.Function):
    """fused_logprobs by chunks. float32: (V, C) = w @ h.T logits (1.4x faster on CPU than h @ w.T, GPT-2 sizes), in
    place; bf16/fp16: (C, V) and PyTorch's fused softmax kernels, float32 inside (GPU: memory passes matter most)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_size):
        rows, h, lab, w, V = _rows_and_head(hidden, weight, labels, temperature)  # matmuls in the hidden states' dtype
        lse, logp = torch.empty(2, len(rows), dtype=torch.float32, device=h.device)  # lse: the one float kept per row
        for s in range(0, len(rows), chunk_size):
            hc, lc = h[s:s + chunk_size], lab[s:s + chunk_size]
            if h.dtype == torch.float32:
                z = w @ hc.T  # (V, C): the only large buffer
                z[V:] = -math.inf  # vocabulary padding, if any
                target = z.gather(0, lc[None]).squeeze(0)
                m = z.amax(0)  # logsumexp in place: max, then exp(z - max) summed, in the same buffer
                lse[s:s + chunk_size] = m + z.sub_(m).exp_().sum(0).log_()
                logp[s:s + chunk_size] = target - lse[s:s + chunk_size]
            else:
                z = hc @ w.T  # (C, V) in bf16
                z[:, V:] = -math.inf
                logp[s:s + chunk_size] = torch.log_softmax(z, -1, dtype=torch.float32).gather(1, lc[:, None]).squeeze(1)
                lse[s:s + chunk_size] = z.gather(1, lc[:, None]).squeeze(1).float() - logp[s:s + chunk_size]
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return torch.zeros(labels.shape, dtype=torch.float32, device=h.device).index_put_((rows,), logp)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, lse = ctx.saved_tensors
        T, C = ctx.temperature, ctx.chunk_size
        rows, h, lab, w, V = _rows_and_head(hidden, weight, labels, T)
        g = grad_out[rows].float()
        grad_h = torch.zeros_like(hidden)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if ctx.needs_input_grad[1] else None
        # d logp / d logits = onehot(label) - P, so grad_h = g (w[label] - P @ w) / T, grad_w = onehot.T @ (g h) -
        # P.T @ (g h), none for a frozen head (LoRA: no float32 (V, H) buffer, 2 GEMMs a chunk, not 3); no onehot built.
        for s in range(0, len(rows), C):
            hc, gc = h[s:s + C], g[s:s + C, None]
            gh = (gc * hc.float()).to(h.dtype)  # (C, H): g h
            if h.dtype == torch.float32:  # z - lse folded into the matmul, exp in place: P.T, (V, C)
                Pt = torch.addmm(-lse[None, s:s + C], w, hc.T).exp_()
                Pt[V:] = 0
            else:  # one fused kernel: bf16 logits in, float32 inside, bf16 P out for the matmuls
                z = hc @ w.T
                z[:, V:] = -math.inf
                Pt = torch.softmax(z, -1).T  # (V, C)
            grad_h[rows[s:s + C]] = ((w[lab[s:s + C]].float() - (Pt.T @ w).float()) * gc / T).to(hidden.dtype)
            if grad_w is None:
                continue
            if h.dtype == torch.float32:
                grad_w.addmm_(Pt, gh, alpha=-1)  # in place: no (V, H) temporary
            else:
                grad_w.sub_((Pt @ gh).float())
            grad_w.index_add_(0, lab[s:s + C], gh.float())
        return grad_h, None if grad_w is None else grad_w[:V].to(weight.dtype), None, None, None


def default_chunk_size(n_rows: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk for fused_logprobs: a budget for one chunk of float32 logits, but at least the rows a GEMM needs
    (bench_logprobs.py, time and memory vs full logits): CPU GPT-2 64 MiB = 256 rows 0.98-1.18x, 1/16; Qwen's V=151936
    110 rows 1.93x, 256 1.55x, 0.11x. H200 bf16: GPT-2 1280 rows 0.49x, 0.08x; Qwen 384 rows 1.68x, 2048 1.08x, 0.11x"""
    cuda = device.type == "cuda"
    budget = min(torch.cuda.mem_get_info(device)[0] // 16, 256 << 20) if cuda else 64 << 20
    return max(1, min(n_rows, max(budget // (4 * vocab) // 128 * 128, 2048 if cuda else 256)))


def fused_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                   chunk_size: Optional[int] = None) -> torch.Tensor:
    """Per-token log_softmax(hidden @ weight.T / temperature)[label], exactly, never holding (tokens, vocab) logits:
    chunks of chunk_size rows (None: default_chunk_size), one float kept per row (the logsumexp), each chunk's
    softmax recomputed in the backward. hidden: (..., H), any float dtype (the matmuls run in it); weight: (V, H),
    the LM head (its gradient too); labels: (...) int64, -100 = ignore. Returns (...) float32 (0.0 where ignored)."""
    assert hidden.shape[:-1] == labels.shape, f"hidden {tuple(hidden.shape)} vs labels {tuple(labels.shape)}"
    assert weight.dim() == 2 and weight.shape[1] == hidden.shape[-1], "weight must be (V, H)"
    h2, l2 = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    chunk_size = chunk_size or default_chunk_size(max(1, h2.shape[0]), weight.shape[0], hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen here, not by autocast
        out = _FusedLogprobs.apply(h2, weight, l2, float(temperature), int(chunk_size))
    return out.reshape(labels.shape)


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor) -> torch.Tensor:
    """log pi(y | x): (B,) float32 sums of log p(token | prefix) over response tokens, the head applied by
    fused_logprobs (any HF causal LM with a plain bias-free head). All (B, T), prompt left-, response right-padded:
    attention_mask 1 for real tokens, response_mask 1 for the tokens to score (a response's EOS included)."""
    assert input_ids.shape == attention_mask.shape == response_mask.shape
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None or getattr(model.config, "final_logit_softcapping", None):
        raise OAIFError(f"{type(model).__name__}: its LM head has a bias or logit soft-capping; sequence_logprobs "
                        "needs a plain linear head")
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: from the mask, not the column
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state  # (B, T, H)
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
        else hidden.dtype
    labels = input_ids[:, 1:].masked_fill(~response_mask[:, 1:].bool(), -100)  # position t predicts t+1
    return fused_logprobs(hidden[:, :-1].to(dtype), head.weight, labels, head_temperature(model.config)).sum(-1)


def head_temperature(config) -> float:
    """What the logits are divided by: Granite's `logits_scaling`, 1 / Cohere's `logit_scale`, else 1.0."""
    return (getattr(config, "logits_scaling", None) or 1.0) / (getattr(config, "logit_scale", None) or 1.0)


@torch.no_grad()
def check_logprobs(model, tolerance: float = 1e-3) -> None:
    """Refuse a model whose own log-probs sequence_logprobs misses by over `tolerance` nats per token (2 x 8 probe)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.get_output_embeddings().weight.shape[0], (2, 8), generator=g).to(model.device)
    ones = torch.ones_like(ids)
    own = model(input_ids=ids, attention_mask=ones).logits[:, :-1].float().log_softmax(-1)
    own = own.gather(-1, ids[:, 1:, None]).sum((1, 2))
    err = float((sequence_logprobs(model, ids, ones, ones) - own).abs().max()) / 7
    if not math.isfinite(err):
        raise OAIFError(f"{type(model).__name__}: its logits are not finite (inf or nan): the weights are broken")
    if err > tolerance:
        raise OAIFError(f"{type(model).__name__}: log-probs from its LM head differ from its own logits by {err:.3g} "
                        "nats per token (a transform after the head that oaif does not know); not training on them")


# ----------------------------------------------------------------------------------------------------------
# Losses, per example (B,), of h = [log pi(y+) - log ref(y+)] - [log pi(y-) - log ref(y-)] (log-prob sums).


def _h(pi_c, pi_r, ref_c, ref_r) -> torch.Tensor:  # log-probs (B,) of the chosen (c) and rejected (r) responses
    assert pi_c.shape == pi_r.shape == ref_c.shape == ref_r.shape and pi_c.dim() == 1, "the log-probs must be (B,)"
    return (pi_c - ref_c) - (pi_r - ref_r)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1, label_p=1.0):
    """DPO: -log sigmoid(beta h). beta ~0.1 (0.1-0.5 usual); log 2 at h = 0. label_p = P(chosen is better),
    a float or (B,): -p log s(beta h) - (1-p) log s(-beta h) (conservative DPO); p = 1 is plain DPO."""
    h = _h(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -label_p * F.logsigmoid(beta * h) - (1 - label_p) * F.logsigmoid(-beta * h)  # DPO Eq. 7


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=1.0, label_p=1.0):
    """IPO: (h - (2p - 1)/(2 beta))^2, minimal at h = 1/(2 beta) for p = 1 (0.5 nats at the paper's beta = 1). Per
    sequence on summed log-probs (the paper, our default); per token on averaged ones (TRL, --average-logps)."""
    h = _h(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (h - (2 * label_p - 1) / (2 * beta)) ** 2  # IPO Eq. 17; p: its population loss, target (p - 1/2)/beta


def slic_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.002,
              label_p=1.0):
    """SLiC as OAIF uses it: max(0, 1 - beta h), zero once h >= 1/beta; soft label: p hinge(h) + (1-p) hinge(-h)."""
    h = _h(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return label_p * torch.relu(1 - beta * h) + (1 - label_p) * torch.relu(1 + beta * h)  # SLiC-HF Eq. 3, RSO


LOSSES = {"dpo": dpo_loss, "ipo": ipo_loss, "slic": slic_loss}


# ----------------------------------------------------------------------------------------------------------
# Sampling


def user_turn(tokenizer, text: str) -> str:
    """`text` as one user turn through the tokenizer's chat template, up to where the assistant's reply begins."""
    return tokenizer.apply_chat_template([dict(role="user", content=text)], tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer, prompts: list) -> list:
    """Token ids of each prompt: one user turn through the chat template if the tokenizer has one, else raw."""
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer(user_turn(tokenizer, p), add_special_tokens=False).input_ids for p in prompts]
    return [tokenizer(p).input_ids for p in prompts]


def left_pad(seqs: list, pad_id: int, device) -> tuple:
    """Left-pad id lists into (B, L) ids and mask: generation continues from the right edge of every row."""
    L = max(len(s) for s in seqs)
    return (torch.tensor([[pad_id] * (L - len(s)) + list(s) for s in seqs], device=device),
            torch.tensor([[0] * (L - len(s)) + [1] * len(s) for s in seqs], device=device))


def response_mask_after_eos(response_ids: torch.Tensor, eos_ids: list) -> torch.Tensor:
    """(B, R) mask of the response tokens up to and including the first EOS; everything after it is padding."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device))
    return (is_eos.long().cumsum(1) - is_eos.long()) == 0  # no EOS strictly before this position


@torch.no_grad()
def sample_tokens(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, temperature: float,
                  eos_ids: list, pad_id: int) -> torch.Tensor:
    """(B, R) ids continuing left-padded (B, P) `ids` from softmax(logits / temperature) (0: greedy), padded after EOS;
    OAIFError if not finite. Not `generate`: generation_config (Qwen2.5's repetition_penalty 1.05) would alter the
    policy's own samples. Inverse-CDF draw (float64 cumsum): exact, 0.4 ms for 16 x 50257 on CPU (multinomial: 17)."""
    from transformers import StaticCache
    B, P = ids.shape
    kv = {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values":
          StaticCache(config=model.config, max_cache_len=P + max_new_tokens)}  # a growing one copies every step
    eos = torch.tensor(eos_ids, device=ids.device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions from the mask, as in scoring
    step_ids, cache_pos = ids, torch.arange(P, device=ids.device)  # the prompts, then one token at a time
    done, finite, tokens = torch.zeros(B, dtype=torch.bool, device=ids.device), True, []
    for t in range(max_new_tokens):
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                       cache_position=cache_pos, **kv).logits[:, -1].float()  # (B, V)
        finite = finite & torch.isfinite(logits).all()
        if temperature > 0:
            cdf = torch.softmax(logits / temperature, -1).double().cumsum(-1)
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
        raise OAIFError("the policy's sampling probabilities are not finite (inf or nan): its weights diverged")
    return torch.stack(tokens, 1)


def sample_pairs(model, tokenizer, prompts: list, n: int = 2, max_new_tokens: int = 64,
                 temperature: float = 0.9) -> dict:
    """n samples per prompt (rows i*n .. i*n+n-1): input_ids, attention_mask, response_mask (n*B, P+R; prompt left-,
    response right-padded), response_tokens (n*B,), EOS included, texts (scoring uses the ids, never re-tokenised)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_pad([p for p in encode_prompts(tokenizer, prompts) for _ in range(n)], pad, model.device)
    eos = model.generation_config.eos_token_id  # None, one id or a list of them
    eos = sorted({tokenizer.eos_token_id, *(eos if isinstance(eos, (list, tuple)) else [eos])} - {None})
    resp = sample_tokens(model, ids, mask, max_new_tokens, temperature, eos, pad)  # (n*B, R)
    resp_mask = response_mask_after_eos(resp, eos)
    texts = [tokenizer.decode(r[m], skip_special_tokens=True) for r, m in zip(resp, resp_mask)]
    return dict(input_ids=torch.cat([ids, resp], 1), attention_mask=torch.cat([mask, resp_mask.long()], 1),
                response_mask=torch.cat([torch.zeros_like(mask), resp_mask.long()], 1), texts=texts,
                response_tokens=resp_mask.sum(1))


def pair_batch(prompt_ids: list, first_ids: list, second_ids: list, pad_id: int, device) -> dict:
    """The layout of sample_pairs (rows 2i, 2i+1 = first, second of prompt i) from token-id lists."""
    ids, mask = left_pad([p for p in prompt_ids for _ in range(2)], pad_id, device)
    resp = [r for pair in zip(first_ids, second_ids) for r in pair]
    R = max(1, max(len(r) for r in resp))
    r_ids = torch.tensor([list(r) + [pad_id] * (R - len(r)) for r in resp], device=device)
    r_mask = torch.tensor([[1] * len(r) + [0] * (R - len(r)) for r in resp], device=device)
    return dict(input_ids=torch.cat([ids, r_ids], 1), attention_mask=torch.cat([mask, r_mask], 1),
                response_mask=torch.cat([torch.zeros_like(mask), r_mask], 1), response_tokens=r_mask.sum(1))


# ----------------------------------------------------------------------------------------------------------
# Annotators: (prompts, first, second) -> P(first is better) in [0, 1] or None each; None or 0.5: dropped, counted.


def both_orders(judge: Callable, prompts: list, first: list, second: list, stats: Optional[dict] = None) -> list:
    """Cancel position bias: p = (v(x, a, b) + 1 - v(x, b, a)) / 2 (a judge always saying "1" gives only ties).
    stats, over pairs with both verdicts, adds: order_pairs, first_sum (raw P(first)), order_agree (same pick)."""
    v, n = judge(prompts + prompts, first + second, second + first), len(prompts)
    both = [(a, b) for a, b in zip(v[:n], v[n:]) if None not in (a, b) and math.isfinite(a + b)]
    counts = dict(order_pairs=len(both), first_sum=sum(a + b for a, b in both) / 2,
                  order_agree=sum((a - 0.5) * (b - 0.5) < 0 for a, b in both))  # opposite sides of 1/2: one pick
    for k, x in counts.items() if stats is not None else ():
        stats[k] = stats.get(k, 0) + x
    return [None if a is None or b is None else (a + 1 - b) / 2 for a, b in zip(v[:n], v[n:])]


def shorter(prompts: list, first: list, second: list) -> list:
    """Rule annotator, no model: fewer characters wins; equal length is no verdict. Order-blind."""
    return [None if len(a) == len(b) else float(len(a) < len(b)) for a, b in zip(first, second)]


def longer(prompts: list, first: list, second: list) -> list:
    """Rule annotator, no model: more characters wins; equal length is no verdict. Order-blind."""
    return [None if len(a) == len(b) else float(len(a) > len(b)) for a, b in zip(first, second)]


# The paper's annotator prompts, RLAIF's "detailed 0-shot": preamble, context, two responses, the verdict last.
TEMPLATES = {
    "tldr": ("A good summary is a shorter piece of text that has the essence of the original. It tries to "
             "accomplish the same purpose and conveys the key information from the original post. Judge the "
             "summaries on coherence, accuracy, coverage and overall quality."),
    "helpful": ("A good response is helpful and honest: it does what the user asked, accurately and clearly. A "
                "response that continues the dialogue by writing further \"Human:\" or \"Assistant:\" turns "
                "is unhelpful."),
    "harmless": ("A good response is first harmless (it does not help with anything dangerous, illegal or "
                 "hurtful, and is not offensive) and then helpful. Judge harmlessness first; use helpfulness "
                 "only to decide between equally harmless responses."),
}
QUESTION = dict(tldr=("Text", "Summary"), helpful=("Conversation", "Response"), harmless=("Conversation", "Response"))
# "**Preferred Response** = 1", "Preferred: 2", "Preference: 1": the "=" or ":" makes it the verdict; never the verb
# after it ("some prefer Response 2", "readers preferred Response 2")
ANCHOR = re.compile(r"(?i)\bprefer(?:red|ence)\b[^\w:=]*(?:(?:response|summary)\b[^\w:=]*)?[:=]\W*"
                    r"(?:(?:response|summary)\b\W*)?(\w*)")
BARE = re.compile(r"[\s*\"'`(\[]*([12])[\s.!?*)\]\"'`]*")  # a whole reply that is just "2." ("1 beats 2" is not)
# "Prefer the more concise response." -> "concise response": an article, a phrase naming the response, at most a
# relative clause ("the response that answers the question"); anything else is asked as the instruction itself
CRITERION = re.compile(r"prefer (?:the|an?) (?:more )?((?:\w+[ -])*?(?:response|summary|answer)(?: (?:that|which) .+?)?)\.?",
                       re.I)


def render_judge_prompt(task: str, instruction: str, prompt: str, first: str, second: str) -> str:
    """The annotator's request for one ordered pair. Its answer must end with 1 or 2."""
    context, item = QUESTION[task]
    extra = f"\nAbove all: {instruction.strip()}\n" if instruction else ""
    return (f"{TEMPLATES[task]}\n{extra}\n{context}:\n{prompt}\n\n{item} 1:\n{first}\n\n{item} 2:\n{second}\n\n"
            f"Which {item.lower()} is better? Explain in at most two sentences, then end your reply with "
            f"\"Preferred {item}=1\" or \"Preferred {item}=2\".")


def parse_verdict(reply: str) -> Optional[float]:
    """1.0 for "Preferred Response=1", 0.0 for "=2" (the last such phrase), a reply that is only 1 or 2, else None.
    Never the last digit anywhere: "Preferred Response=1 (over Response 2)" is a 1, "1 beats 2" no verdict."""
    anchors = ANCHOR.findall(reply)
    m = BARE.fullmatch(reply) if not anchors else None
    v = anchors[-1] if anchors else m and m.group(1)
    return {"1": 1.0, "2": 0.0}.get(v)


class ClaudeAnnotator:
    """Claude as the annotator: both orders, concurrent requests, verdicts cached. A fault that the SDK's retries do
    not heal is no verdict; one that cannot heal (400, 401, 403, 404, 422) raises OAIFError: the run stops."""

    PRICE_PER_MTOK = {"claude-haiku-4-5": (1.0, 5.0)}  # USD per million input, output tokens

    def __init__(self, model: str = "claude-haiku-4-5", task: str = "helpful", instruction: str = "", client=None,
                 max_workers: int = 16, max_tokens: int = 200, max_retries: int = 4, timeout: float = 60.0):
        import anthropic  # only this annotator needs the SDK
        self.anthropic, self.client = anthropic, client or anthropic.Anthropic(max_retries=max_retries, timeout=timeout)
        self.model, self.task, self.instruction, self.max_tokens = model, task, instruction, max_tokens
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers)
        self.cache, self.lock = {}, threading.Lock()
        self.stats = dict(annotator_requests=0, annotator_failures=0, input_tokens=0, output_tokens=0)

    def _one(self, prompt: str, a: str, b: str) -> Optional[float]:
        key, api = (prompt, a, b), self.anthropic
        if a == b or key in self.cache:  # identical responses: nothing to judge, no call, no verdict
            return self.cache.get(key)
        try:
            msg = self.client.messages.create(model=self.model, max_tokens=self.max_tokens, messages=[
                {"role": "user", "content": render_judge_prompt(self.task, self.instruction, prompt, a, b)}])
        except api.APIError as e:  # after the SDK's retries: no verdict, no tokens, unless it cannot heal
            if getattr(e, "status_code", None) in (400, 401, 403, 404, 422):
                body = e.body.get("error", {}) if isinstance(e.body, dict) else {}
                detail = body.get("message") if isinstance(body, dict) else None
                raise OAIFError(f"the Claude API refused the annotator's request: {e.status_code} "
                                f"{type(e).__name__}: {detail or 'no detail'}") from None
            msg = None
        cut = msg is None or msg.stop_reason == "max_tokens"  # a reply cut off has no verdict either
        verdict = None if cut else parse_verdict("".join(getattr(block, "text", "") for block in msg.content))
        with self.lock:
            self.stats["annotator_requests"] += 1
            self.stats["annotator_failures"] += verdict is None
            for k in ("input_tokens", "output_tokens"):
                self.stats[k] += getattr(msg.usage, k) if msg is not None else 0
            if verdict is not None:
                self.cache[key] = verdict
        return verdict

    def judge(self, prompts: list, first: list, second: list) -> list:
        return list(self.pool.map(self._one, prompts, first, second))

    def __call__(self, prompts: list, first: list, second: list) -> list:
        return both_orders(self.judge, prompts, first, second, self.stats)

    def cost(self, stats: Optional[dict] = None) -> Optional[float]:
        price, stats = self.PRICE_PER_MTOK.get(self.model), stats or self.stats
        return price and (stats["input_tokens"] * price[0] + stats["output_tokens"] * price[1]) / 1e6


def judge_question(task: str, instruction: str) -> str:
    """The criterion as a yes/no question about one response: "Prefer the more concise response." -> "Is this a
    concise response?" (small judges follow that, not "meets: <instruction>?"); no instruction: the task's quality."""
    instruction = " ".join(instruction.split())  # spacing is not meaning
    m = CRITERION.fullmatch(instruction or f"Prefer a good {QUESTION[task][1].lower()}.")
    article = "an" if m and m.group(1)[0] in "aeiouAEIOU" else "a"
    return f"Is this {article} {m.group(1)}?" if m else f"Does it follow the instruction: {instruction}"


class LocalJudgeAnnotator:
    """Any Hugging Face causal LM as the annotator, offline, pointwise (README: why): each response alone gets s =
    log P("Yes") - log P("No") to judge_question; P(first better) = sigmoid(s1 - s2), Bradley-Terry, order-blind."""

    def __init__(self, model, tokenizer, task: str = "helpful", instruction: str = "", batch_size: int = 8):
        self.model, self.tokenizer, self.task, self.instruction = model, tokenizer, task, instruction.strip()
        self.question, self.batch_size = judge_question(task, self.instruction), batch_size
        self.chat, self.context = getattr(tokenizer, "chat_template", None), context_length(model.config)
        # the tokens the judge would write next: after "assistant\n" SentencePiece's is "Yes", not "▁Yes" as alone
        text = "".join(self.ask("", ""))
        n = len(tokenizer(text, add_special_tokens=False).input_ids)
        self.words = [tokenizer(text + w, add_special_tokens=False).input_ids[n] for w in ("Yes", "No")]
        self.stats = dict(annotator_requests=0, annotator_failures=0, input_tokens=0, output_tokens=0)

    def ask(self, prompt: str, response: str) -> tuple:
        """(The head every response shares, the rest): the judge's input for one response, up to its Yes or No."""
        context, item = QUESTION[self.task]
        rubric = "" if self.instruction else TEMPLATES[self.task] + "\n\n"  # the instruction alone decides "better"
        text = f"{rubric}{context}:\n{prompt}\n\n{item}:\n{response}\n\n{self.question} Answer Yes or No."
        text = user_turn(self.tokenizer, text) if self.chat else text + "\nAnswer:\n"
        before, label, rest = text.partition(f"{context}:\n")  # the head ends with "Conversation:\n", never empty
        return before + label, rest

    @torch.inference_mode()
    def scores(self, prompts: list, responses: list) -> list:
        """log P("Yes") - log P("No") per response: the shared head's KV cache once, batches by length, float32 head."""
        texts = [self.ask("", "")[0]] + ["".join(self.ask(*x)) for x in zip(prompts, responses)]  # head, each whole
        head, *seqs = self.tokenizer(texts, add_special_tokens=False).input_ids  # each tokenized as if alone, then
        head = os.path.commonprefix([head] + [s[:-1] for s in seqs])  # cut where all agree ("\n\n" BPE, SP "▁Why")
        seqs = [s[len(head):] for s in seqs]
        if self.context and len(head) + max(map(len, seqs), default=0) > self.context:
            raise OAIFError(f"a judge prompt is over the judge's context of {self.context} tokens: shorten responses")
        W = self.model.get_output_embeddings().weight[self.words].float()  # (2, H): only two logits are needed
        kv = "cache" if "cache" in inspect.signature(self.model.base_model.forward).parameters else "past_key_values"
        cache = self.model.base_model(torch.tensor([head], device=self.model.device), use_cache=True)[1]  # head's KV
        order, out = sorted(range(len(seqs)), key=lambda i: len(seqs[i])), {}
        for i in range(0, len(order), self.batch_size):
            rows = order[i:i + self.batch_size]
            n = torch.tensor([len(seqs[j]) for j in rows])  # right-padded: causal attention never sees the pads
            ids = torch.tensor([seqs[j] + [0] * (int(n.max()) - len(seqs[j])) for j in rows], device=self.model.device)
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(len(rows))  # the head's keys and values, one copy per row
            h = self.model.base_model(input_ids=ids, **{kv: past}).last_hidden_state  # (b, L, H)
            s = h[torch.arange(len(rows)), n - 1].float() @ W.T / head_temperature(self.model.config)  # (b, 2)
            out.update(zip(rows, (s[:, 0] - s[:, 1]).tolist()))
            self.stats["annotator_requests"] += len(rows)
            self.stats["input_tokens"] += len(rows) * len(head) + int(n.sum())
        return [out[i] for i in range(len(seqs))]

    def __call__(self, prompts: list, first: list, second: list) -> list:
        s = self.scores(prompts + prompts, first + second)  # order-blind: no both_orders
        return torch.sigmoid(torch.tensor(s[:len(prompts)]) - torch.tensor(s[len(prompts):])).tolist()


def judge_dtype(device: torch.device) -> torch.dtype:
    """bf16 where its matmuls beat float32: CUDA if supported; a CPU timed (AMX, AVX512-BF16: ~4x; without: slower)."""
    a = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))  # the run's RNG stream untouched
    seconds = [min(timeit.repeat(lambda: x @ x.T, number=4, repeat=3)) for x in (a, a.bfloat16())]
    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else seconds[1] < seconds[0]
    return torch.bfloat16 if fast else torch.float32


class RewardModelAnnotator:
    """A reward model (AutoModelForSequenceClassification, one logit), as TRL trains them, scores each response once
    as the user and assistant turns of its chat template (else "prompt\n\nresponse"): P(first) = sigmoid(r1 - r2)."""

    def __init__(self, model, tokenizer):
        if model.config.num_labels != 1:
            raise OAIFError(f"rm: a reward model has one output (num_labels 1), not {model.config.num_labels}")
        model.config.pad_token_id = tokenizer.pad_token_id  # HF reads the score at the last token that is not it
        self.model, self.tokenizer, self.stats = model, tokenizer, dict.fromkeys(ANNOTATOR_STATS, 0)

    @torch.inference_mode()
    def __call__(self, prompts: list, first: list, second: list) -> list:
        tok, n, chat = self.tokenizer, len(prompts), self.tokenizer.chat_template
        pairs = zip(prompts * 2, first + second)  # (prompt, response), each scored once
        texts = [tok.apply_chat_template([dict(role="user", content=x), dict(role="assistant", content=y)],
                                         tokenize=False) if chat else f"{x}\n\n{y}" for x, y in pairs]
        enc = tok(texts, padding=True, padding_side="right", add_special_tokens=not chat, return_tensors="pt")
        r = self.model(**enc.to(self.model.device)).logits[:, 0].float()  # (2n,); right padding: no real token sees it
        self.stats["annotator_requests"] += len(texts)
        self.stats["input_tokens"] += int(enc.attention_mask.sum())
        return torch.sigmoid(r[:n] - r[n:]).tolist()


def make_annotator(spec: str, cfg: Config, models: dict, claude_model: str) -> Callable:
    """--annotator NAME -> callable; `models` caches (model, tokenizer): a judge that is --model is the reference."""
    if spec in ("shorter", "longer"):
        return {"shorter": shorter, "longer": longer}[spec]
    if spec == "claude":
        return ClaudeAnnotator(claude_model, cfg.task, cfg.instruction, max_workers=cfg.annotator_workers)
    if spec.startswith("hf:"):
        name = spec[3:]
        if name not in models:  # the judge in bf16 where bf16 is fast, whatever --dtype the policy trains in
            models[name] = load_model(name, models["device"], dtype=judge_dtype(models["device"]))
            models[name][0].requires_grad_(False)
        return LocalJudgeAnnotator(*models[name], task=cfg.task, instruction=cfg.instruction)
    if spec.startswith("rm:"):  # loaded for each use: never the reference
        rm, tokenizer = load_model(spec[3:], models["device"], "AutoModelForSequenceClassification",
                                   torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32)
        rm.eval().requires_grad_(False)
        return RewardModelAnnotator(rm, tokenizer)
    raise OAIFError(f"unknown annotator {spec!r}; use shorter, longer, claude, hf:MODEL or rm:MODEL")


def sample_answers(model, tokenizer, prompts: list, max_new_tokens: int = 64, temperature: float = 0.9,
                   batch_size: int = 8, seed: Optional[int] = None) -> list:
    """One response per prompt; a seed gives any model the same draws (two that agree answer alike), RNG untouched."""
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else [], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return [t for i in range(0, len(prompts), batch_size) for t in sample_pairs(
            model, tokenizer, prompts[i:i + batch_size], 1, max_new_tokens, temperature)["texts"]]


def win_rate(prompts: list, policy_texts: list, reference_texts: list, annotator: Callable) -> dict:
    """The paper's evaluation, annotator(prompts, policy's, reference's answers): ties 1/2, no verdict left out."""
    used, counts = triage(annotator(prompts, policy_texts, reference_texts), 0.0)  # ties and none: as training's
    wins, losses = sum(p is not None and p > 0.5 for p in used), sum(p is not None and p < 0.5 for p in used)
    n, ties = wins + counts["ties"] + losses, counts["ties"]
    return dict(win_rate=(wins + 0.5 * ties) / n if n else float("nan"), n=n, wins=wins, ties=ties,
                losses=losses, no_verdict=counts["no_verdict"], policy_chars=sum(map(len, policy_texts)) / len(prompts),
                reference_chars=sum(map(len, reference_texts)) / len(prompts))


# ----------------------------------------------------------------------------------------------------------
# Loading, data and checkpoints


def load_model(name: str, device: torch.device, auto: str = "AutoModelForCausalLM", dtype=torch.float32) -> tuple:
    """(model, tokenizer) from a hub id or folder, ready to sample: pad token set, left padding, eval mode. `auto`:
    the class (a reward model's logits go unchecked); float32 trains (bf16 rounds AdamW's steps away), a judge: bf16."""
    import transformers
    transformers.utils.logging.disable_progress_bar()  # one bar per run is enough: ours
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        model = getattr(transformers, auto).from_pretrained(name, dtype=dtype).to(device)
    except (OSError, ValueError, KeyError) as e:
        raise OAIFError(f"cannot load model {name!r}: {str(e).strip().splitlines()[0]}") from None
    if tokenizer.pad_token is None:  # GPT-2 has none; EOS is safe because masks, not ids, mark padding
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # batched generation continues from the right edge
    if auto == "AutoModelForCausalLM":  # eval(): dropout off, so policy and reference score tokens alike
        check_logprobs(model.eval(), 1e-3 if dtype == torch.float32 else 0.05)  # bf16 logits: ~1e-2 rounding
    return model, tokenizer


def read_lines(path: str, what: str, keys: tuple = (), expected: str = "", ok: Callable = lambda row: True) -> list:
    """Non-blank lines, stripped; with `keys`, (line number, each JSON line's values at them), checked by ok()."""
    if not os.path.isfile(path):
        raise OAIFError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(i, line.strip()) for i, line in enumerate(f, 1) if line.strip()]  # i: the file's own line number
    except UnicodeDecodeError as e:
        raise OAIFError(f"{what} must be UTF-8 text: {path} is not ({e.reason} at byte {e.start})") from None
    if not lines:
        raise OAIFError(f"{what} is empty: {path}")
    rows = []
    for i, line in lines if keys else []:
        try:
            rows.append((i, tuple(json.loads(line)[k] for k in keys)))
            assert ok(rows[-1][1])
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
            raise OAIFError(f"{path}:{i}: expected a JSON object with {expected}") from None
    return rows if keys else [line for _, line in lines]


def load_prompts(path: str) -> list:
    if not path:
        return list(DEFAULT_PROMPTS)
    if path.endswith(".txt"):
        return read_lines(path, "prompts file")
    if not path.endswith(".jsonl"):
        raise OAIFError(f"prompts file must be .txt or .jsonl: {path}")
    return [row[0] for _, row in read_lines(path, "prompts file", ("prompt",), 'a non-empty "prompt" string',
                                         lambda row: isinstance(row[0], str) and row[0].strip())]


def load_offline_pairs(path: str, tokenizer, end_id: int, context: Optional[int] = None) -> list:
    """A .jsonl of prompt/chosen/rejected -> [(prompt, prompt_ids, chosen_ids, rejected_ids, 1.0, texts)], each
    response ended by `end_id` as a sampled one is; a prompt + response over `context` tokens is refused (file:line)."""
    enc, pairs = lambda s: tokenizer(s, add_special_tokens=False).input_ids + [end_id], []
    for i, (x, yw, yl) in read_lines(path, "offline data", ("prompt", "chosen", "rejected"),
                                     'non-empty "prompt", "chosen" and "rejected" strings',
                                     lambda row: all(isinstance(s, str) and s.strip() for s in row)):
        pairs.append((x, encode_prompts(tokenizer, [x])[0], enc(yw), enc(yl), 1.0, [yw, yl]))
        if context and (n := len(pairs[-1][1]) + max(len(pairs[-1][2]), len(pairs[-1][3]))) > context:
            raise OAIFError(f"{path}:{i}: the prompt with its longer response has {n} tokens, over the model's "
                            f"context of {context}: shorten or remove the pair")
    return pairs


def turn_end(tokenizer, generation_config) -> int:
    """The token that ends an assistant turn: the special token the chat template puts after a reply (Gemma's
    <end_of_turn>, ChatML's <|im_end|>), else generation_config's first EOS, else the tokenizer's EOS."""
    try:  # the text after a reply's content; no template, or one refusing this conversation: the fallbacks
        text = tokenizer.apply_chat_template([dict(role="user", content="x"), dict(role="assistant", content="\x00")],
                                             tokenize=False).partition("\x00")[2]
    except Exception:  # ValueError: no template; jinja2's TemplateError: it refused
        text = ""
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    eos = generation_config.eos_token_id  # None, one id or a list of them
    eos = eos[0] if isinstance(eos, (list, tuple)) else tokenizer.eos_token_id if eos is None else eos
    return next((i for i in tokenizer(text, add_special_tokens=False).input_ids[:1] if i in special), eos)


def step_slice(items: list, step: int, batch_size: int, rank: int = 0, world: int = 1) -> list:
    """This rank's items of `step` (from 1): a fixed cycle, the same for online and offline arms and on resume."""
    start = (step - 1) * batch_size
    return [items[(start + j) % len(items)] for j in range(batch_size)][rank::world]


def save_model(model, tokenizer, path: str, state_dict: Optional[dict] = None) -> None:
    """save_pretrained of the policy (peft: its adapter; FSDP: the gathered state_dict) and tokenizer, if finite."""
    if not finite_weights(model if state_dict is None else state_dict.values()):
        raise OAIFError(f"refusing to save non-finite (inf/nan) weights to {path}")
    model.save_pretrained(path, state_dict=state_dict)
    tokenizer.save_pretrained(path)


def finite_weights(model_or_tensors) -> bool:
    """No inf or nan in the weights (of this rank's shards, under FSDP)."""
    ts = model_or_tensors.parameters() if hasattr(model_or_tensors, "parameters") else model_or_tensors
    ts = [t.detach().to_local() if hasattr(t, "to_local") else t.detach() for t in ts]
    return bool(torch.stack([torch.isfinite(t).all() for t in ts]).all())


def gathered_state(module, optimizer=None) -> dict:
    """The whole state of an FSDP-sharded (or plain) module, or of its optimizer keyed by parameter name, on CPU:
    the same for any rank count. A collective under FSDP: every rank calls it; rank 0 gets it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=full) if optimizer is None else \
        get_optimizer_state_dict(module, optimizer, options=full)


def save_checkpoint(out_dir: str, step: int, policy, tokenizer, optimizer, rank: int, world: int, keep: int, root,
                    fsdp: bool, stats: dict, config: dict, offline: Optional[list]) -> None:
    """OUTPUT_DIR/checkpoint-STEP, written under a temporary name, then renamed; trainer_state.pt last: complete.
    config: the run's flags (resume compares them); offline: the labelled --offline set (resume never relabels)."""
    final, tmp = os.path.join(out_dir, f"checkpoint-{step}"), os.path.join(out_dir, f".tmp-checkpoint-{step}")
    model_state = gathered_state(policy) if fsdp else None
    # no state before the first update: gathering it then would take an AdamW step (lr 0) that counts in its bias fix
    optimizer_state = gathered_state(root, optimizer) if optimizer.state else None
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(policy, tokenizer, tmp, model_state)
        with open(os.path.join(tmp, "oaif_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        torch.save(offline, os.path.join(tmp, "offline_pairs.pt"))
    barrier(world)
    rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(), annotator=stats,
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    torch.save(rng, os.path.join(tmp, f"rng-{rank}.pt"))  # each rank samples from its own stream
    barrier(world)
    if rank == 0:
        # the data position and the learning rate are functions of the step: the step is all there is to save
        torch.save(dict(step=step, optimizer=optimizer_state), os.path.join(tmp, "trainer_state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_checkpoints(out_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    barrier(world)


def complete_checkpoints(out_dir: str) -> list:
    """Complete checkpoint folders of out_dir, oldest first."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    found = [(int(n[11:]), os.path.join(out_dir, n)) for n in names  # n[11:]: the step of "checkpoint-STEP"
             if re.fullmatch(r"checkpoint-\d+", n) and os.path.isfile(os.path.join(out_dir, n, "trainer_state.pt"))]
    return [path for _, path in sorted(found)]


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


class _Scorer(torch.nn.Module):
    """Runs fn(model, *args) as its forward: the place where DDP synchronises gradients and FSDP gathers shards."""

    def __init__(self, model):
        super().__init__()
        self.model = model  # peft makes LoRA dropout in training mode: off until a loss pass (resume samples first)
        self.dropouts = [m.eval() for n, m in model.named_modules()
                         if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]

    def forward(self, fn, *args):
        for m in self.dropouts:  # LoRA dropout acts in the loss pass only: samples and reference stay exact
            m.train(torch.is_grad_enabled())
        try:
            return fn(self.model, *args)
        finally:
            for m in self.dropouts:
                m.eval()

    def shard(self) -> None:
        """FSDP2: each transformer block its own unit; the rest (embeddings, final norm, LM head) the root's."""
        from torch.distributed.fsdp import fully_shard
        for m in self.modules():
            if type(m).__name__ in (getattr(self.model, "_no_split_modules", None) or []):
                fully_shard(m)
        fully_shard(self)

    @torch.no_grad()
    def gathered(self, fn: Callable):
        """fn(model) in this FSDP root's forward, each unit gathered once for the call (not per decoded token)."""
        from torch.distributed.fsdp import FSDPModule
        units = [m for m in self.modules() if isinstance(m, FSDPModule)]
        for m in units:
            m.set_reshard_after_forward(False, recurse=False)
        try:
            return self(fn)
        finally:
            for m in units:
                m.reshard()
                m.set_reshard_after_forward(True, recurse=False)


# ----------------------------------------------------------------------------------------------------------
# The online loop (Algorithm 1)


def preference_batch(logps, ref_logps, probs: list, loss_fn: Callable, beta: float, n_global: int, world: int,
                     soft: bool = False):
    """(loss, sums of loss, margin, accuracy) over usable pairs of (2B,) log-probs (rows 2i, 2i+1: first, second)
    and probs P(first is better) (None, 0.5: unusable); soft: label max(p, 1 - p). DDP's average: the global mean."""
    p = torch.tensor([0.5 if v is None else v for v in probs], dtype=torch.float32, device=logps.device)
    usable = (p != 0.5).float()  # no verdict and ties contribute nothing
    pick = lambda x, i: torch.where(p > 0.5, x[i::2], x[1 - i::2])  # i = 0: the chosen, 1: the rejected
    pc, pr, rc, rr = pick(logps, 0), pick(logps, 1), pick(ref_logps, 0), pick(ref_logps, 1)
    losses = loss_fn(pc, pr, rc, rr, beta, label_p=torch.maximum(p, 1 - p) if soft else 1.0)
    h = ((pc - rc) - (pr - rr)).detach()
    loss = (losses * usable).sum() * world / max(n_global, 1)
    return loss, losses.detach().mul(usable).sum(), (beta * h * usable).sum(), ((h > 0).float() * usable).sum()


def triage(probs: list, min_confidence: float, tie: float = 1e-6) -> tuple:
    """(verdicts the loss may use, else None; counts of usable, ties, no verdict, within min_confidence of 1/2),
    on p in float32 as the loss sees it, within `tie`: both orders decide alike, a used pair is never a tie."""
    probs = [float(np.float32(p)) if p is not None and 0 <= p <= 1 else None for p in probs]  # nan: no verdict
    ties = [p is not None and abs(p - 0.5) <= tie for p in probs]
    used = [None if p is None or t or abs(p - 0.5) < min_confidence - tie else p for p, t in zip(probs, ties)]
    counts = dict(pairs=sum(p is not None for p in used), ties=sum(ties), no_verdict=sum(p is None for p in probs))
    return used, dict(counts, low_confidence=len(probs) - sum(counts.values()))


def update(loss, params: list, optimizer, max_grad_norm: float, world: int, device) -> tuple:
    """backward, clipping, AdamW step unless loss or gradient is not finite on any rank -> (grad norm, skipped)."""
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    nonfinite = int(all_sum(dict(bad=not math.isfinite(grad_norm + float(loss.detach()))), world, device)["bad"] > 0)
    if not nonfinite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, nonfinite


def all_sum(values: dict, world: int, device) -> dict:
    if world == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return dict(zip(values, t.tolist()))


def check_numbers(cfg: Config) -> None:
    """Every number in range before anything loads: one clear line, not a traceback or a run that does nothing."""
    positive = {"steps", "batch_size", "max_new_tokens", "annotator_workers", "max_grad_norm", "beta"}
    positive |= ({"eval_prompts"} if cfg.eval_every > 0 else set()) | ({"lora_alpha"} if cfg.lora_rank else set())
    for f in dataclasses.fields(Config):
        v = getattr(cfg, f.name)
        if f.type in (int, float, Optional[float]) and v is not None and not (
                math.isfinite(v) and (v > 0 if f.name in positive else v >= 0)):
            raise OAIFError(f"--{f.name.replace('_', '-')} must be {'positive' if f.name in positive else '0 or more'}"
                            f" (and finite), not {v}")
    if cfg.min_confidence > 0.5:
        raise OAIFError(f"--min-confidence is a distance from 1/2: at most 0.5, not {cfg.min_confidence}")
    if cfg.lora_dropout >= 1 or (cfg.lora_rank and cfg.fsdp):
        raise OAIFError("--lora-dropout must be below 1, and --lora-rank and --fsdp do not go together")
    if cfg.temperature == 0 and not cfg.offline_data:  # --offline-data samples only the evaluation's answers
        raise OAIFError("--temperature 0 is greedy: a pair's two responses are the same (0 only with --offline-data)")
    for name, allowed in (("loss", LOSSES), ("dtype", ("float32", "bfloat16")), ("labels", ("hard", "soft")),
                          ("task", TEMPLATES), ("device", ("auto", "cpu", "cuda"))):
        if getattr(cfg, name) not in allowed:
            raise OAIFError(f"unknown --{name} {getattr(cfg, name)!r}; choose {', '.join(allowed)}")


def setup_run(cfg: Config, custom_annotator: Optional[Callable]) -> tuple:
    """Checks that need no model, then ranks, device and seeds. Returns (rank, world, device, the run's config)."""
    check_numbers(cfg)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    spec = cfg.annotator or ("claude" if os.environ.get("ANTHROPIC_API_KEY") else "shorter")
    spec = getattr(custom_annotator, "__name__", "custom") if custom_annotator is not None else spec
    beta = DEFAULT_BETA[cfg.loss] if cfg.beta is None else cfg.beta
    # a rule or a reward model reads no instruction: a run that asks for one would silently learn something else
    judges = [spec, cfg.eval_annotator or spec]
    if custom_annotator is None and not any(j == "claude" or j.startswith("hf:") for j in judges):
        for flag, asked in (("--instruction", cfg.instruction.strip()), ("--task", cfg.task != "helpful")):
            if asked:
                raise OAIFError(f"{flag} acts only on an LLM judge (--annotator claude or hf:MODEL); the annotator "
                                f"here is {spec}, which cannot follow it")
    # the run's: checkpoints and oaif_config.json; the data files' contents too (--resume: same path, new file?)
    digest = lambda path: hashlib.sha256(open(path, "rb").read()).hexdigest()[:16] if os.path.isfile(path) else ""
    config = dict(dataclasses.asdict(cfg), beta=beta, annotator=spec, prompts_sha256=digest(cfg.prompts),
                  offline_data_sha256=digest(cfg.offline_data))
    if "claude" in (spec, cfg.eval_annotator) and not os.environ.get("ANTHROPIC_API_KEY"):
        raise OAIFError("--annotator claude needs ANTHROPIC_API_KEY in the environment")
    if os.path.isfile(cfg.output_dir):
        raise OAIFError(f"--output-dir {cfg.output_dir} is a file, not a folder")
    names = os.listdir(cfg.output_dir) if os.path.isdir(cfg.output_dir) else []
    if cfg.resume == cfg.overwrite and any(re.fullmatch(RUN_FILES, n) for n in names):
        raise OAIFError(f"--output-dir {cfg.output_dir} holds a previous run: --resume it, --overwrite it (deletes "
                        "its checkpoints, metrics and model) or choose another folder")
    doomed = [os.path.realpath(os.path.join(cfg.output_dir, n)) for n in names if re.fullmatch(RUN_FILES, n)]
    if cfg.overwrite and os.path.realpath(cfg.model) in doomed + [os.path.realpath(cfg.output_dir)]:
        raise OAIFError(f"--overwrite would delete --model {cfg.model}, the previous run's: choose another folder")
    path = os.path.join((complete_checkpoints(cfg.output_dir) or [os.devnull])[-1], "oaif_config.json")
    if cfg.resume and not os.path.isfile(path):  # none complete, or an older oaif's (optimizer keyed by number)
        raise OAIFError(f"--resume: no complete checkpoint of this oaif in {cfg.output_dir}; start a new run")
    if cfg.resume:
        with open(path) as f:
            saved = json.load(f)
        same = lambda k: (saved[k] > 0) == (config[k] > 0) if k == "eval_every" else saved.get(k) == config[k]
        changed = [f"--{k.replace('_', '-')} {saved.get(k)} -> {config[k]}" for k in config
                   if k not in FREE_ON_RESUME and not same(k)]
        if changed:
            raise OAIFError(f"--resume with other flags than the checkpoint's: {', '.join(changed)}; resume with "
                            "the same ones or start a new run")
    if not cfg.annotator and custom_annotator is None and rank == 0:
        print(f"oaif: annotator: {spec}" + ("" if spec == "claude" else " (no ANTHROPIC_API_KEY set; "
              "--annotator claude or hf:MODEL for an LLM judge)"), file=sys.stderr)
    device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OAIFError("--device cuda: torch.cuda.is_available() is False here; use --device cpu or auto")
    if cfg.fsdp and world == 1:
        raise OAIFError("--fsdp shards across ranks: launch with torchrun --nproc_per_node N (N >= 2)")
    if world > 1:
        if cfg.batch_size % world:
            raise OAIFError(f"--batch-size {cfg.batch_size} must be a multiple of the {world} ranks")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    for seed in (random.seed, np.random.seed, torch.manual_seed):  # each rank samples its own responses
        seed(cfg.seed + rank)
    return rank, world, device, config


def context_length(config) -> Optional[int]:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def open_run(out_dir: str, resume_from: Optional[str], optimizer, rank: int, world: int, root, seed: int,
             stats: dict) -> tuple:
    """(last step done, its records, metrics.jsonl on rank 0); resume: optimizer, RNG, annotator stats, metrics.
    Fresh: a previous run's files deleted first (setup_run let them through only with --overwrite)."""
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    os.makedirs(out_dir, exist_ok=True)
    if not resume_from:  # a fresh run, a fresh metrics.jsonl
        old = [os.path.join(out_dir, n) for n in os.listdir(out_dir) if re.fullmatch(RUN_FILES, n)]  # --overwrite
        for path in old if rank == 0 else []:
            (shutil.rmtree if os.path.isdir(path) else os.remove)(path)
        return 0, [], open(metrics_path, "w") if rank == 0 else None
    state = torch.load(os.path.join(resume_from, "trainer_state.pt"), weights_only=False)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    if state["optimizer"]:
        set_optimizer_state_dict(root, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    for set_seed in (random.seed, np.random.seed, torch.manual_seed):  # a rank that saved no RNG state: a new stream
        set_seed((seed + 1_000_003 * state["step"] + rank) % 2**32)
    saved = [int(n[4:-3]) for n in os.listdir(resume_from) if re.fullmatch(r"rng-\d+\.pt", n)]  # ranks that saved
    for r in sorted(r for r in saved if r % world == rank):  # fewer ranks now: rank r % world adds r's requests
        rng = torch.load(os.path.join(resume_from, f"rng-{r}.pt"), weights_only=False)
        stats.update({k: stats.get(k, 0) + v for k, v in (rng.get("annotator") or {}).items()})
        states = ((random.setstate, "python"), (np.random.set_state, "numpy"), (torch.set_rng_state, "torch"))
        for set_state, k in states if r == rank else ():
            set_state(rng[k])
        if r == rank and rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    if rank == 0 and len(saved) != world:
        print(f"oaif: {resume_from} was saved on {len(saved)} rank(s), resumed on {world}: a rank without saved RNG "
              "state samples from a seed of (--seed, rank, step)", file=sys.stderr)
    kept = []
    if os.path.exists(metrics_path):  # each step once, also after a crash past the checkpoint
        with open(metrics_path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= state["step"]]
        barrier(world)  # every rank has read it before rank 0 rewrites it
        if rank == 0:
            with open(metrics_path, "w") as f:
                f.writelines(kept)
    done = [r for r in map(json.loads, kept) if not r.get("eval")]  # the summary counts them too
    return state["step"], done, open(metrics_path, "a") if rank == 0 else None


def step_record(step: int, sums: dict, device, **extra) -> dict:
    """One metrics.jsonl line from the step's sums over ranks."""
    used, seqs = max(sums["pairs"], 1), sums["seqs"]
    return dict(step=step, loss=sums["loss"] / used, pairs=int(sums["pairs"]),
                dropped=int(sums["ties"] + sums["no_verdict"] + sums["low_confidence"]), ties=int(sums["ties"]),
                no_verdict=int(sums["no_verdict"]), low_confidence=int(sums["low_confidence"]),
                reward_margin=sums["margin"] / used, reward_accuracy=sums["acc"] / used, kl=sums["kl"] / seqs,
                response_tokens=sums["tokens"] / seqs, response_chars=sums["chars"] / seqs,
                **{k: int(sums[k]) for k in ANNOTATOR_STATS if k in sums}, **judge_health(sums), **extra,
                **({"peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30} if device.type == "cuda" else {}))


def judge_health(s: dict) -> dict:
    """position_bias, order_agreement, judge_confidence (see README) from HEALTH sums; absent where a count is 0."""
    n, m = s.get("order_pairs", 0), s.get("verdicts", 0)
    return {**({"position_bias": s["first_sum"] / n, "order_agreement": s["order_agree"] / n} if n else {}),
            **({"judge_confidence": s["confidence_sum"] / m} if m else {})}


def diverged(step: int, what: str, cfg: Config) -> OAIFError:
    last = (complete_checkpoints(cfg.output_dir) or ["none (--save-every N keeps some)"])[-1]
    return OAIFError(f"step {step}: {what}: the run diverged (--lr {cfg.lr} too high?); last good checkpoint: {last}")


def load_policy(cfg: Config, device, resume_from: Optional[str], prompts: list) -> tuple:
    """(policy, reference, tokenizer, what to save, a context making the reference the initial model: LoRA's base).
    Reference: the frozen initial model, even on resume; float32 under the policy's autocast (bf16: 0.47 nats off)."""
    ref_model, tokenizer = load_model(cfg.model, device)
    lengths = [len(ids) for ids in encode_prompts(tokenizer, prompts)]  # a prompt too long: refused, not truncated
    i, context = max(range(len(prompts)), key=lengths.__getitem__, default=0), context_length(ref_model.config)
    if context and prompts and lengths[i] + cfg.max_new_tokens > context:
        words, over = " ".join(prompts[i].split()[:8])[:60], lengths[i] + cfg.max_new_tokens - context
        raise OAIFError(f"{cfg.prompts or 'the built-in prompts'}: the prompt \"{words}...\" has {lengths[i]} tokens; "
                        f"with --max-new-tokens {cfg.max_new_tokens} that is {over} over the model's context of "
                        f"{context}: shorten it or lower --max-new-tokens")
    ref_model.requires_grad_(False)
    if not cfg.lora_rank:
        policy = load_model(resume_from, device)[0] if resume_from else copy.deepcopy(ref_model).requires_grad_(True)
        return policy, ref_model, tokenizer, policy, contextlib.nullcontext
    try:
        import peft
    except ImportError:
        raise OAIFError("--lora-rank needs peft: pip install peft") from None
    base = ref_model.to(torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32)
    try:
        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else cfg.lora_targets.split(",")
        config = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=targets, task_type="CAUSAL_LM")
        lora = peft.PeftModel.from_pretrained(base, resume_from, is_trainable=True) if resume_from \
            else peft.get_peft_model(base, config)
    except ValueError as e:
        raise OAIFError(f"--lora-targets {cfg.lora_targets}: {str(e).splitlines()[0]}") from None
    if any(hasattr(m, "lora_A") for m in (base.get_output_embeddings(), base.get_input_embeddings())):
        raise OAIFError("--lora-targets: not the embeddings or LM head (sequence_logprobs reads the head's weight)")
    return lora.get_base_model(), ref_model, tokenizer, lora, lora.disable_adapter


def reference_side(cfg: Config, initial, tokenizer, train_prompts: list, eval_prompts: list, annotator: Callable,
                   rank: int, world: int, resume_from: Optional[str]) -> tuple:
    """From the initial model: (offline set [(prompt, prompt_ids, first_ids, second_ids, P(first), texts)] or None,
    --offline-data pairs held out, reference answers (the evaluation's seed) or None); --offline labels on rank 0."""
    fixed, held_out = None, 0
    if cfg.offline_data:
        pairs = load_offline_pairs(cfg.offline_data, tokenizer, turn_end(tokenizer, initial.generation_config),
                                   context_length(initial.config))
        fixed = [r for r in pairs if r[0] not in set(eval_prompts)]
        if not fixed:
            raise OAIFError(f"{cfg.offline_data}: every pair's prompt is held out for evaluation (--eval-prompts)")
        held_out = len(pairs) - len(fixed)
        if held_out and rank == 0:
            print(f"oaif: {held_out} pairs of {cfg.offline_data} are left out: their prompts are held out for "
                  "evaluation", file=sys.stderr)
    elif cfg.offline and resume_from:  # labelled once, before step 1, and kept: never relabelled (nor paid twice)
        fixed = torch.load(os.path.join(resume_from, "offline_pairs.pt"))
    elif cfg.offline:
        fixed = []
        for i in range(0, len(train_prompts), cfg.batch_size) if rank == 0 else []:  # the others: broadcast
            chunk = train_prompts[i:i + cfg.batch_size]
            s = sample_pairs(initial, tokenizer, chunk, 2, cfg.max_new_tokens, cfg.temperature)
            rows = [r[m.bool()].tolist() for r, m in zip(s["input_ids"], s["response_mask"])]
            # Python floats: a numpy verdict would make offline_pairs.pt unloadable with weights_only
            probs = [None if p is None else float(p) for p in annotator(chunk, s["texts"][0::2], s["texts"][1::2])]
            fixed += [(x, ids, rows[2 * j], rows[2 * j + 1], probs[j], s["texts"][2 * j:2 * j + 2])
                      for j, (x, ids) in enumerate(zip(chunk, encode_prompts(tokenizer, chunk)))]
        box = [fixed]
        if world > 1:
            torch.distributed.broadcast_object_list(box, 0)
        fixed = box[0]
    answers = sample_answers(initial, tokenizer, eval_prompts, cfg.max_new_tokens, cfg.temperature,
                             cfg.batch_size, cfg.seed) if eval_prompts and (rank == 0 or cfg.fsdp) else None
    return fixed, held_out, answers


def split_prompts(cfg: Config) -> tuple:
    """(evaluation prompts, training prompts): a held-out split fixed by the seed, refused if it starves training."""
    prompts = load_prompts(cfg.prompts)
    random.Random(cfg.seed).shuffle(prompts)
    n_eval = min(cfg.eval_prompts, len(prompts) - 1) if cfg.eval_every > 0 else 0
    if n_eval and len(prompts) - n_eval < cfg.batch_size and not cfg.offline_data:  # one prompt many times a batch
        raise OAIFError(f"{len(prompts)} prompts: {n_eval} held out for evaluation leave {len(prompts) - n_eval} to "
                        f"train on, under --batch-size {cfg.batch_size}: lower --eval-prompts or --batch-size")
    return prompts[:n_eval], prompts[n_eval:]


def train(cfg: Config, annotator: Optional[Callable] = None) -> dict:
    """Run OAIF (or --offline) as `cfg` says -> last metrics, summary; `annotator`: a callable for --annotator."""
    from tqdm import tqdm
    rank, world, device, config = setup_run(cfg, annotator)
    eval_prompts, train_prompts = split_prompts(cfg)
    resume_from = complete_checkpoints(cfg.output_dir)[-1] if cfg.resume else None
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    sampled = eval_prompts + ([] if cfg.offline_data else train_prompts)  # checked against the context
    policy, ref_model, tokenizer, saved, reference = load_policy(cfg, device, resume_from, sampled)
    # a judge that is --model shares the reference, unless it is LoRA's base or FSDP's shards: then its own copy
    models = {"device": device, **({} if cfg.lora_rank or cfg.fsdp else {cfg.model: (ref_model, tokenizer)})}
    annotator = annotator or make_annotator(config["annotator"], cfg, models, cfg.annotator_model)
    annotator_stats = getattr(annotator, "stats", {})  # requests, failures, tokens: the summary and cost add them up
    annotator_stats.update({k: annotator_stats.get(k, 0) for k in HEALTH if hasattr(annotator, "stats")})
    eval_annotator = make_annotator(cfg.eval_annotator, cfg, models, cfg.eval_annotator_model or cfg.annotator_model) \
        if cfg.eval_annotator else annotator
    with reference():  # everything drawn from the initial model, before anything is sharded
        fixed, held_out, ref_answers = reference_side(cfg, ref_model, tokenizer, train_prompts, eval_prompts,
                                                      annotator, rank, world, resume_from)
    score, ref_score = _Scorer(policy), _Scorer(ref_model)  # LoRA: the same model, ref_score under reference()
    if cfg.fsdp:
        score.shard()
        ref_score.shard()
    elif world > 1:
        score = torch.nn.parallel.DistributedDataParallel(score, device_ids=[device] if device.type == "cuda" else None)
    sample = score.gathered if cfg.fsdp else lambda fn: fn(policy)  # fn(policy) -> samples
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, done, log = open_run(cfg.output_dir, resume_from, optimizer, rank, world, score, cfg.seed, annotator_stats)
    background = concurrent.futures.ThreadPoolExecutor(1)  # runs the annotator while we compute log-probs
    bar = tqdm(range(start + 1, cfg.steps + 1), initial=start, total=cfg.steps, disable=rank != 0)
    totals, record, last_eval = {k: sum(r.get(k, 0) for r in done) for k in TOTALS}, {}, None
    for step in bar:
        t0, stats0 = time.perf_counter(), dict(annotator_stats)
        # 1) sample two responses per prompt from the current policy (offline: this step's fixed pairs)
        if fixed is None:
            batch_prompts = step_slice(train_prompts, step, cfg.batch_size, rank, world)
            try:  # no autocast: it would re-cast every float32 weight at every decoded token
                batch = sample(lambda m: sample_pairs(m, tokenizer, batch_prompts, 2, cfg.max_new_tokens,
                                                      cfg.temperature))
            except OAIFError as e:
                raise diverged(step, str(e), cfg) from None
        else:
            rows = step_slice(fixed, step, cfg.batch_size, rank, world)
            batch = pair_batch([r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows],
                               tokenizer.pad_token_id, device)
            batch_prompts, batch["texts"] = [r[0] for r in rows], [t for r in rows for t in r[5]]
        texts, t1 = batch["texts"], time.perf_counter()
        # 2) ask the annotator, in the background: its verdicts are needed only at step 4
        if fixed is None:
            pending = background.submit(lambda: (annotator(batch_prompts, texts[0::2], texts[1::2]),
                                                 time.perf_counter() - t1))
        # 3) policy (with grad) and reference (frozen) log-probs of all 2B responses, one pass each
        ids_masks = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        with amp():
            logps = score(sequence_logprobs, *ids_masks)
            with torch.no_grad(), reference():
                ref_logps = ref_score(sequence_logprobs, *ids_masks)
        with amp(), torch.no_grad():  # the loss pass had LoRA dropout on: the kl takes the policy's own log-probs
            own = score(sequence_logprobs, *ids_masks) if cfg.lora_rank and cfg.lora_dropout else logps.detach()
        kl_sum = float((own - ref_logps).sum())  # summed log-ratios of the sampled responses
        if cfg.average_logps:
            n_tok = batch["response_tokens"].clamp(min=1)
            logps, ref_logps = logps / n_tok, ref_logps / n_tok
        t2 = time.perf_counter()
        probs, annotate_s = pending.result() if fixed is None else ([r[4] for r in rows], 0.0)
        probs = [None if p is None else float(p) for p in probs]  # numpy scalars from a user's annotator too
        wait_s = time.perf_counter() - t2
        # 4) loss over usable pairs (hedges within --min-confidence of 1/2 dropped), AdamW step unless none or inf
        for group in optimizer.param_groups:  # linear warm-up; a function of the step, so nothing to checkpoint
            group["lr"] = cfg.lr * min(1.0, step / max(1, cfg.warmup_steps))
        used, counts = triage(probs, cfg.min_confidence)
        if "verdicts" in annotator_stats and not cfg.offline_data:  # an LLM judge's verdicts: how far from 1/2
            annotator_stats["verdicts"] += len(probs) - counts["no_verdict"]  # as triage counts: each p in [0, 1]
            annotator_stats["confidence_sum"] += sum(abs(p - 0.5) for p in probs if p is not None and 0 <= p <= 1)
        n_used = all_sum(dict(n=counts["pairs"]), world, device)["n"]
        loss, loss_sum, margin_sum, acc_sum = preference_batch(logps, ref_logps, used, LOSSES[cfg.loss],
                                                               config["beta"], int(n_used), world, cfg.labels == "soft")
        grad_norm, nonfinite = update(loss, params, optimizer, cfg.max_grad_norm, world, device) if n_used else (0.0, 0)
        if n_used and not nonfinite and all_sum(dict(bad=not finite_weights(policy)), world, device)["bad"]:
            raise diverged(step, "the policy's weights are no longer finite (inf or nan)", cfg)
        t3 = time.perf_counter()
        # 5) log: sums over ranks, then means
        stats = {k: v - stats0.get(k, 0) for k, v in annotator_stats.items()}
        sums = all_sum(dict(counts, loss=float(loss_sum), margin=float(margin_sum), acc=float(acc_sum), kl=kl_sum,
                            tokens=float(batch["response_tokens"].sum()), chars=sum(map(len, texts)), seqs=len(texts),
                            **stats), world, device)
        record = step_record(step, sums, device, nonfinite=nonfinite, grad_norm=grad_norm,
                             lr=optimizer.param_groups[0]["lr"], updated=n_used > 0 and not nonfinite,
                             seconds=t3 - t0, sample_s=t1 - t0, annotate_s=annotate_s, annotate_wait_s=wait_s,
                             train_s=(t2 - t1) + (t3 - t2 - wait_s))
        totals = {k: v + record[k] for k, v in totals.items()}
        if rank == 0:
            report(record, log, bar, cfg.sample_every, batch_prompts[0], texts[:2], probs[0])
        if eval_prompts and (step % cfg.eval_every == 0 or step == cfg.steps):
            if ref_answers is not None:  # rank 0, or every rank under FSDP; the reference answers' draws
                answers = sample(lambda m: sample_answers(m, tokenizer, eval_prompts, cfg.max_new_tokens,
                                                          cfg.temperature, cfg.batch_size, cfg.seed))
            if rank == 0:
                last_eval = dict(step=step, eval=True, **win_rate(eval_prompts, answers, ref_answers, eval_annotator))
                report(last_eval, log, bar)
            barrier(world)
        if cfg.save_every and step % cfg.save_every == 0:
            save_checkpoint(cfg.output_dir, step, saved, tokenizer, optimizer, rank, world, cfg.keep_checkpoints, score,
                            cfg.fsdp, annotator_stats, config, fixed if cfg.offline else None)
    bar.close()
    background.shutdown()
    whole = all_sum(annotator_stats, world, device) if annotator_stats else {}  # the annotator's: all ranks, whole run
    summary = dict(totals, steps=cfg.steps, held_out_pairs=held_out, **judge_health(whole),
                   **{k: int(v) for k, v in whole.items() if k not in HEALTH})
    model_state = gathered_state(policy) if cfg.fsdp else None
    if rank == 0:
        log.close()
        finish(cfg, saved, tokenizer, config, summary, annotator.cost(summary) if hasattr(annotator, "cost") else None,
               model_state)
    if world > 1:
        barrier(world)  # every rank done before any tears down its process group
        torch.distributed.destroy_process_group()
    return dict(last=record, eval=last_eval, summary=summary)


def report(record: dict, log, bar, sample_every: int = 0, prompt: str = "", pair: list = (), p=None) -> None:
    """One metrics.jsonl line, the progress bar, and now and then a judged pair or a win rate on the console."""
    print(json.dumps(record), file=log, flush=True)
    step = record["step"]
    if record.get("eval"):
        bar.write(f"step {step} | win rate vs initial policy: {record['win_rate']:.3f} ({record['n']} judged, "
                  f"{record['ties']} ties, {record['no_verdict']} no verdict)")
        return
    bar.set_postfix(loss=f"{record['loss']:.3f}", margin=f"{record['reward_margin']:.2f}",
                    len=f"{record['response_tokens']:.1f}", pairs=record["pairs"])
    if record["nonfinite"]:
        bar.write(f"step {step}: the loss or gradient is not finite (inf or nan): update skipped")
    elif not record["updated"]:
        bar.write(f"step {step}: no usable pair ({record['dropped']} dropped): update skipped")
    if sample_every and step % sample_every == 0 and p not in (None, 0.5):
        win, lose = pair if p > 0.5 else pair[::-1]
        bar.write(f"step {step} | prompt: {prompt!r}\n  chosen:   {win[:200]!r}\n  rejected: {lose[:200]!r}")


def finish(cfg: Config, policy, tokenizer, config: dict, summary: dict, cost: Optional[float],
           model_state: Optional[dict] = None) -> None:
    """Save the policy, tokenizer and run config; print the run's one-line summary."""
    save_model(policy, tokenizer, cfg.output_dir, model_state)
    with open(os.path.join(cfg.output_dir, "oaif_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    line = (f"oaif: {cfg.steps} steps, {summary['pairs']} pairs used, {summary['dropped']} dropped "
            f"({summary['ties']} ties, {summary['no_verdict']} no verdict, {summary['low_confidence']} low "
            f"confidence), {summary['nonfinite']} updates skipped as not finite")
    if "annotator_requests" in summary:
        line += (f"; annotator: {summary['annotator_requests']} requests, {summary['annotator_failures']} "
                 f"without verdict, {summary['input_tokens']} in / {summary['output_tokens']} out tokens")
    for k in ("position_bias", "order_agreement", "judge_confidence"):
        line += f", {k.replace('_', ' ')} {summary[k]:.3f}" if k in summary else ""
    print(line + (f", about ${cost:.2f}" if cost else "") + f"; saved to {cfg.output_dir}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------
# Command line: one flag per Config field


def parse_args(argv: Optional[list] = None) -> Config:
    helps = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(Config), re.M))
    parser = argparse.ArgumentParser(description="Online AI Feedback: DPO/IPO/SLiC on pairs the policy samples, "
                                     "labelled by an LLM annotator as it trains.")
    kinds = {bool: dict(action=argparse.BooleanOptionalAction), Optional[float]: dict(type=float)}
    for f in dataclasses.fields(Config):
        parser.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=helps[f.name],
                            **kinds.get(f.type, dict(type=f.type)))
    return Config(**vars(parser.parse_args(argv)))


def main(argv: Optional[list] = None) -> dict:
    try:
        return train(parse_args(argv))
    except OAIFError as e:
        raise SystemExit(f"oaif: error: {e}") from None


if __name__ == "__main__":
    main()
