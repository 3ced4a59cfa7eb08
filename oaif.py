"""
Online AI Feedback (OAIF) in one file: align a language model with DPO, IPO or SLiC on pairs that it
samples itself, labelled on the spot by an LLM annotator.

    Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"   arXiv 2402.04792
    DPO  Rafailov et al. 2023                                                   arXiv 2305.18290
    IPO  Azar et al. 2023                                                       arXiv 2310.12036
    SLiC-HF  Zhao et al. 2023 (hinge as in RSO, Liu et al., arXiv 2309.06657)  arXiv 2305.10425

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
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F


class OAIFError(Exception):
    """Bad input or an unrecoverable fault; main() prints it as one line and exits non-zero."""


# ----------------------------------------------------------------------------------------------------------
# Config: every field is a flag (--batch-size for batch_size); the comment beside it is its --help.


@dataclass
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
    lr: float = 1e-5  # AdamW learning rate (the paper: 5e-7 with Adafactor on PaLM 2; tiny models take 1e-3+)
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
    resume: bool = False  # continue from the newest complete checkpoint in OUTPUT_DIR
    # models past one GPU
    lora_rank: int = 0  # train a LoRA adapter of this rank instead of every weight (0: off); pip install peft
    lora_alpha: float = 16.0  # LoRA scale: the adapter's update is multiplied by alpha / rank
    lora_dropout: float = 0.0  # dropout on the adapter's input, in the loss pass only
    lora_targets: str = "all-linear"  # modules that get adapters: comma-separated names, or every linear layer
    fsdp: bool = False  # under torchrun: shard weights, gradients and AdamW state across ranks (FSDP2)


DEFAULT_BETA = {"dpo": 0.1, "ipo": 1.0, "slic": 0.002}  # the OAIF paper's values

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
    "What are the rules of chess in brief?", "How can I be more productive in the morning?",
    "Why is the ocean salty?", "Write two sentences about the moon.", "How should I prepare for a job interview?",
    "What is the water cycle?", "Give advice to a new gardener.", "How does a compass work?",
    "What makes a good password?", "Explain what a budget is.",
]


# ----------------------------------------------------------------------------------------------------------
# Log-probabilities without the [tokens, vocab] logits tensor


def _head(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The LM head in the compute dtype. On CUDA its vocabulary is padded with zero rows to a multiple of 64:
    GEMMs over GPT-2's odd 50257 ran 5-7x slower on an H200 than over 50304 (llm.c's pad_vocab); the padded
    logits are masked to -inf, so nothing changes but the speed. (On CPU it gained ~10% for a 154 MB copy.)"""
    w = weight.to(dtype)
    return F.pad(w, (0, 0, 0, -w.shape[0] % 64)) if w.is_cuda else w


class _FusedLogprobs(torch.autograd.Function):
    """log p(label | hidden) for rows of hidden states, one chunk of logits at a time (see fused_logprobs).

    float32: a chunk's logits are held vocab-major, (V, C) = w @ h.T, whose GEMM runs ~1.4x faster on CPU than
    h @ w.T (measured at GPT-2 sizes), and the logsumexp and softmax are done in place in that one buffer.
    bf16/fp16: (C, V) logits and PyTorch's fused softmax kernels, which read the low-precision logits and
    accumulate in float32 in one kernel (the GPU path: passes over memory matter more than GEMM layout)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_size):
        rows = (labels != -100).nonzero().squeeze(1)  # one host sync, before the loop: skip ignored rows
        h = hidden[rows] * (1.0 / temperature) if temperature != 1.0 else hidden[rows]  # (n, H)
        w, lab, V = _head(weight, h.dtype), labels[rows], weight.shape[0]  # matmuls in the hidden states' dtype
        lse = torch.empty(len(rows), dtype=torch.float32, device=h.device)  # the one float kept per row
        logp = torch.empty(len(rows), dtype=torch.float32, device=h.device)
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
        T, C, V = ctx.temperature, ctx.chunk_size, weight.shape[0]
        rows = (labels != -100).nonzero().squeeze(1)
        h = hidden[rows] * (1.0 / T) if T != 1.0 else hidden[rows]
        w, lab, g = _head(weight, h.dtype), labels[rows], grad_out[rows].float()
        grad_h = torch.zeros_like(hidden)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)  # float32 accumulation
        # d logp / d logits = onehot(label) - P. Both gradients come from the softmax P alone:
        #   grad_h = g * (w[label] - P @ w) / T        grad_w = onehot.T @ (g h) - P.T @ (g h)
        # so the big buffer sees one matmul, one softmax and two matmul reads; no onehot is ever built.
        for s in range(0, len(rows), C):
            hc, gc = h[s:s + C], g[s:s + C, None]
            gh = (gc * hc.float()).to(h.dtype)  # (C, H): g h
            if h.dtype == torch.float32:  # z - lse folded into the matmul, exp in place: P.T, (V, C)
                Pt = torch.addmm(-lse[None, s:s + C], w, hc.T).exp_()
                Pt[V:] = 0
                Pw = Pt.T @ w
                grad_w.addmm_(Pt, gh, alpha=-1)
            else:  # one fused kernel: bf16 logits in, float32 inside, bf16 P out for the matmuls
                z = hc @ w.T
                z[:, V:] = -math.inf
                P = torch.softmax(z, -1)  # (C, V)
                Pw = (P @ w).float()
                grad_w.sub_((P.T @ gh).float())
            grad_h[rows[s:s + C]] = ((w[lab[s:s + C]].float() - Pw) * gc / T).to(hidden.dtype)
            grad_w.index_add_(0, lab[s:s + C], gh.float())
        return grad_h, grad_w[:V].to(weight.dtype), None, None, None


def default_chunk_size(n_rows: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk for fused_logprobs, from a memory budget for one chunk of float32 logits.

    Measured with examples/bench_logprobs.py at GPT-2 sizes (H = 768, V = 50257, N = 4096-16384 tokens):
    CPU float32, 64 MiB (256 rows): 0.98-1.18x the naive full-logits version's time over two runs, with 1/16
    of its extra memory; 2048 rows no faster and 6x the memory.
    CUDA bf16, 256 MiB or 1/16 of free memory (1335 rows measured, now 1280): 0.49x naive's time and 0.08x
    its extra memory on an H200; 8192 rows gained 25% more speed for 5x the memory."""
    budget = 64 << 20
    if device.type == "cuda":
        budget = min(torch.cuda.mem_get_info(device)[0] // 16, 256 << 20)
    rows = budget // (4 * vocab)
    return max(1, min(n_rows, rows // 128 * 128 or rows))  # GEMM-friendly: 256 rows on CPU, 1280 on CUDA


def fused_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                   chunk_size: Optional[int] = None) -> torch.Tensor:
    """Per-token log p(label | hidden) = log_softmax(hidden @ weight.T / temperature)[label], exactly, without
    ever holding the full (tokens, vocab) logits: rows are processed in chunks, the forward keeps one float
    (the logsumexp) per row and the backward recomputes each chunk's softmax.

    Args:
        hidden: (..., H) final hidden states, any float dtype; the matmuls run in this dtype.
        weight: (V, H) LM-head weight (for GPT-2, the tied input embedding: its gradient reaches it).
        labels: (...) int64 token ids; -100 means "ignore" and gives 0.0 there.
        temperature: logits are divided by it.
        chunk_size: rows per chunk; None picks one from a memory budget (default_chunk_size).
    Returns:
        (...) float32 log-probabilities, labels' shape. logsumexp and gradients accumulate in float32.
    """
    assert hidden.shape[:-1] == labels.shape, f"hidden {tuple(hidden.shape)} vs labels {tuple(labels.shape)}"
    assert weight.dim() == 2 and weight.shape[1] == hidden.shape[-1], "weight must be (V, H)"
    h2, l2 = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    chunk_size = chunk_size or default_chunk_size(max(1, h2.shape[0]), weight.shape[0], hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen here, not by autocast
        out = _FusedLogprobs.apply(h2, weight, l2, float(temperature), int(chunk_size))
    return out.reshape(labels.shape)


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token | prefix) over the response tokens of each sequence: log pi(y | x).

    Runs the transformer body only; the LM head is applied by fused_logprobs, so the full-vocabulary logits
    never exist. Works for any Hugging Face causal LM whose head is a plain bias-free linear layer.

    Args:
        input_ids: (B, T) prompt (left-padded) followed by response (right-padded).
        attention_mask: (B, T) 1 for real tokens.
        response_mask: (B, T) 1 for the response tokens to score (the EOS that ends a response included).
    Returns:
        (B,) float32.
    """
    assert input_ids.shape == attention_mask.shape == response_mask.shape
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None or getattr(model.config, "final_logit_softcapping", None):
        raise OAIFError(f"{type(model).__name__}: its LM head has a bias or logit soft-capping; sequence_logprobs "
                        "needs a plain linear head")
    # Left padding shifts every token: position ids must come from the mask, not from the column index.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state  # (B, T, H)
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
        else hidden.dtype
    labels = input_ids[:, 1:].masked_fill(~response_mask[:, 1:].bool(), -100)  # position t predicts t+1
    return fused_logprobs(hidden[:, :-1].to(dtype), head.weight, labels, head_temperature(model.config)).sum(-1)


def head_temperature(config) -> float:
    """What a model divides its head's logits by before the softmax: Granite divides them by
    `logits_scaling`, Cohere multiplies them by `logit_scale`; 1.0 for Llama, Qwen, GPT-2 and most others."""
    return (getattr(config, "logits_scaling", None) or 1.0) / (getattr(config, "logit_scale", None) or 1.0)


@torch.no_grad()
def check_logprobs(model, tolerance: float = 1e-3) -> None:
    """Refuse a model whose own log_softmax(logits) sequence_logprobs does not reproduce (a head transform
    we do not know of) rather than train on wrong numbers: a probe of 2 x 8 tokens, |error| in nats per token."""
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
# Losses. h = [log pi(y+) - log ref(y+)] - [log pi(y-) - log ref(y-)], all (B,) sums over response tokens.
# Each returns per-example losses (B,); the caller takes the mean over usable pairs.


def _h(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps) -> torch.Tensor:
    assert policy_chosen_logps.shape == policy_rejected_logps.shape == ref_chosen_logps.shape \
        == ref_rejected_logps.shape and policy_chosen_logps.dim() == 1, "all four log-probs must be (B,)"
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1,
             label_p=1.0):
    """DPO: -log sigmoid(beta h). beta ~0.1 (0.1-0.5 usual); log 2 at h = 0. label_p = P(chosen is better),
    a float or (B,): -p log s(beta h) - (1-p) log s(-beta h) (conservative DPO); p = 1 is plain DPO."""
    h = _h(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -label_p * F.logsigmoid(beta * h) - (1 - label_p) * F.logsigmoid(-beta * h)  # DPO Eq. 7


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=1.0,
             label_p=1.0):
    """IPO: (h - (2p - 1)/(2 beta))^2, minimal at a target margin of 1/(2 beta) (0.5 nats at the paper's
    beta = 1.0) for a hard label p = 1, shrinking to 0 as p -> 1/2.

    On summed log-probs (the IPO paper's definition, and ours by default) that target margin is per
    sequence, whatever the length; on length-averaged log-probs (TRL's choice, --average-logps) it is per
    token, i.e. a sequence margin of 0.5 * length: the same beta means a much stronger pull."""
    h = _h(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (h - (2 * label_p - 1) / (2 * beta)) ** 2  # IPO Eq. 17; p: its population loss, target (p - 1/2)/beta


def slic_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.002,
              label_p=1.0):
    """SLiC as OAIF uses it: max(0, 1 - beta h), the reference-normalised hinge; zero once h >= 1/beta.
    Soft label p: p hinge(h) + (1 - p) hinge(-h)."""
    h = _h(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return label_p * torch.relu(1 - beta * h) + (1 - label_p) * torch.relu(1 + beta * h)  # SLiC-HF Eq. 3, RSO


LOSSES = {"dpo": dpo_loss, "ipo": ipo_loss, "slic": slic_loss}


# ----------------------------------------------------------------------------------------------------------
# Sampling


def encode_prompts(tokenizer, prompts: list) -> list:
    """Token ids of each prompt: one user turn through the chat template if the tokenizer has one, else raw."""
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    return [tokenizer(p).input_ids for p in prompts]


def left_pad(seqs: list, pad_id: int, device) -> tuple:
    """Left-pad id lists into (B, L) ids and mask: generation continues from the right edge of every row."""
    L = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (L - len(s)) + list(s) for s in seqs], device=device)
    mask = torch.tensor([[0] * (L - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


def response_mask_after_eos(response_ids: torch.Tensor, eos_ids: list) -> torch.Tensor:
    """(B, R) mask of the response tokens up to and including the first EOS; everything after it is padding."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device))
    return (is_eos.long().cumsum(1) - is_eos.long()) == 0  # no EOS strictly before this position


def eos_token_ids(model, tokenizer) -> list:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted(set(ids + [tokenizer.eos_token_id]) - {None})


@torch.no_grad()
def sample_tokens(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, temperature: float,
                  eos_ids: list, pad_id: int) -> torch.Tensor:
    """Continue each left-padded row of (B, P) `ids` by up to max_new_tokens tokens drawn from
    softmax(logits / temperature) over the full vocabulary (temperature 0: greedy), with a KV cache.
    Returns (B, R) ids; a row stops at its first EOS and is padded after it.

    A loop of our own rather than `generate`: `generate` applies whatever the checkpoint's generation_config
    asks for (Qwen2.5-Instruct ships repetition_penalty 1.05, others no_repeat_ngram_size, min_p, ...), and
    then the pairs are not the policy's own samples. The draw is by inverse CDF (a float64 cumulative sum and
    one uniform per row: exact, and 0.4 ms for 16 x 50257 on CPU where multinomial took 17). The cache is
    preallocated: a growing one copies itself at every token. Non-finite probabilities (a diverged policy)
    raise OAIFError instead of sampling garbage."""
    from transformers import StaticCache

    B, P = ids.shape
    kv = {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values":
          StaticCache(config=model.config, max_cache_len=P + max_new_tokens)}
    eos = torch.tensor(eos_ids, device=ids.device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions from the mask, as in scoring
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                cache_position=torch.arange(P, device=ids.device), **kv)
    done, finite, tokens = torch.zeros(B, dtype=torch.bool, device=ids.device), True, []
    for t in range(max_new_tokens):
        logits = out.logits[:, -1].float()  # (B, V)
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
        mask, pos = torch.cat([mask, torch.ones_like(mask[:, :1])], 1), pos[:, -1:] + 1
        out = model(input_ids=tokens[-1][:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                    cache_position=torch.tensor([P + t], device=ids.device), **kv)
    if not finite:
        raise OAIFError("the policy's sampling probabilities are not finite (inf or nan): its weights diverged")
    return torch.stack(tokens, 1)


def sample_pairs(model, tokenizer, prompts: list, n: int = 2, max_new_tokens: int = 64,
                 temperature: float = 0.9) -> dict:
    """n responses per prompt from `model`, all in one batch (sample_tokens).

    Returns a batch of n*B rows, the samples of prompt i in rows i*n .. i*n+n-1:
        input_ids, attention_mask, response_mask: (n*B, P+R); prompt left-padded, response right-padded
        texts: the n*B decoded responses (for the annotator; scoring uses the sampled ids, never re-tokenised)
        response_tokens: (n*B,) response lengths in tokens, EOS included
    temperature 0 means greedy decoding."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_pad(encode_prompts(tokenizer, prompts), pad, model.device)
    ids, mask = ids.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0)
    eos = eos_token_ids(model, tokenizer)
    resp = sample_tokens(model, ids, mask, max_new_tokens, temperature, eos, pad)  # (n*B, R)
    resp_mask = response_mask_after_eos(resp, eos)
    texts = [tokenizer.decode(r[m], skip_special_tokens=True) for r, m in zip(resp, resp_mask)]
    return dict(input_ids=torch.cat([ids, resp], 1), attention_mask=torch.cat([mask, resp_mask.long()], 1),
                response_mask=torch.cat([torch.zeros_like(mask), resp_mask.long()], 1),
                texts=texts, response_tokens=resp_mask.sum(1))


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
# Annotators: annotator(prompts, first, second) -> list of P(first is better) in [0, 1], or None (no verdict).
# A pair with None or exactly 0.5 is never used for a gradient: it is counted and dropped, never guessed.


def both_orders(judge: Callable, prompts: list, first: list, second: list) -> list:
    """Cancel position bias: p = (v(x, a, b) + 1 - v(x, b, a)) / 2, both orders in one batched judge call.

    `judge` has the annotator signature but may prefer whatever comes first; a judge that always says
    "Response 1" yields 0.5 (a tie) for every pair, so it can never teach anything."""
    n = len(prompts)
    v = judge(prompts + prompts, first + second, second + first)
    return [None if a is None or b is None else (a + 1 - b) / 2 for a, b in zip(v[:n], v[n:])]


def shorter(prompts: list, first: list, second: list) -> list:
    """Rule annotator, no model: fewer characters wins; equal length is no verdict. Order-blind."""
    return [None if len(a) == len(b) else float(len(a) < len(b)) for a, b in zip(first, second)]


def longer(prompts: list, first: list, second: list) -> list:
    """Rule annotator, no model: more characters wins; equal length is no verdict. Order-blind."""
    return [None if len(a) == len(b) else float(len(a) > len(b)) for a, b in zip(first, second)]


# The paper's annotator prompts, in the RLAIF "detailed 0-shot" style: preamble, context, two labelled
# responses, and a request to end with the number of the preferred one.
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
QUESTION = {"tldr": ("Text", "Summary"), "helpful": ("Conversation", "Response"),
            "harmless": ("Conversation", "Response")}


def render_judge_prompt(task: str, instruction: str, prompt: str, first: str, second: str) -> str:
    """The annotator's request for one ordered pair. Its answer must end with 1 or 2."""
    context, item = QUESTION[task]
    extra = f"\nAbove all: {instruction.strip()}\n" if instruction else ""
    return (f"{TEMPLATES[task]}\n{extra}\n{context}:\n{prompt}\n\n{item} 1:\n{first}\n\n{item} 2:\n{second}\n\n"
            f"Which {item.lower()} is better? Explain in at most two sentences, then end your reply with "
            f"\"Preferred {item}=1\" or \"Preferred {item}=2\".")


ANCHOR = re.compile(r"preferred\W+(?:response|summary)\W*(\w*)", re.I)  # "**Preferred Response** = 1"
BARE = re.compile(r"(?:^|[^0-9A-Za-z])([12])[\s.!?*)\]\"'`]*$")  # a reply that is just "... 2."


def parse_verdict(reply: str) -> Optional[float]:
    """1.0 for "Preferred Response=1", 0.0 for "=2" (the last such phrase; markdown and spacing tolerated),
    else None. Only a reply with no such phrase at all may end with a bare 1 or 2. Never the last digit
    anywhere: "Preferred Response=1 (over Response 2)" is a 1."""
    anchors = ANCHOR.findall(reply)
    m = BARE.search(reply.strip()) if not anchors else None
    v = anchors[-1] if anchors else m and m.group(1)
    return {"1": 1.0, "2": 0.0}.get(v)


class ClaudeAnnotator:
    """Claude as the annotator: both orders per pair, all requests of a call concurrently, verdicts cached.

    Transient faults (429 honouring retry-after, 529 overloaded, 5xx, timeouts, dropped connections) are
    retried by the SDK (`max_retries`, `timeout`); a request that still fails is no verdict and the run
    goes on. Faults that cannot heal (400, 401, 403, 404, 422) raise OAIFError: the run stops."""

    PRICE_PER_MTOK = {"claude-haiku-4-5": (1.0, 5.0)}  # USD per million input, output tokens

    def __init__(self, model: str = "claude-haiku-4-5", task: str = "helpful", instruction: str = "",
                 client=None, max_workers: int = 16, max_tokens: int = 200, max_retries: int = 4,
                 timeout: float = 60.0):
        import anthropic  # only this annotator needs the SDK

        if task not in TEMPLATES:
            raise OAIFError(f"unknown --task {task!r}; choose from {', '.join(TEMPLATES)}")
        self.anthropic = anthropic
        self.client = client or anthropic.Anthropic(max_retries=max_retries, timeout=timeout)
        self.model, self.task, self.instruction, self.max_tokens = model, task, instruction, max_tokens
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers)
        self.cache, self.lock = {}, threading.Lock()
        self.stats = dict(annotator_requests=0, annotator_failures=0, input_tokens=0, output_tokens=0)

    def _one(self, prompt: str, a: str, b: str) -> Optional[float]:
        if a == b:  # nothing to judge: no call, no verdict
            return None
        key = (prompt, a, b)
        if key in self.cache:
            return self.cache[key]
        api = self.anthropic
        try:
            msg = self.client.messages.create(model=self.model, max_tokens=self.max_tokens, messages=[
                {"role": "user", "content": render_judge_prompt(self.task, self.instruction, prompt, a, b)}])
        except (api.BadRequestError, api.AuthenticationError, api.PermissionDeniedError, api.NotFoundError,
                api.UnprocessableEntityError) as e:
            body = e.body.get("error", {}) if isinstance(e.body, dict) else {}
            detail = body.get("message") if isinstance(body, dict) else None
            raise OAIFError(f"the Claude API refused the annotator's request: {e.status_code} "
                            f"{type(e).__name__}: {detail or 'no detail'}") from None
        except api.APIError:  # still failing after the SDK's retries
            with self.lock:
                self.stats["annotator_requests"] += 1
                self.stats["annotator_failures"] += 1
            return None
        reply = "".join(getattr(block, "text", "") for block in msg.content)
        verdict = None if msg.stop_reason == "max_tokens" else parse_verdict(reply)  # cut off: no verdict
        with self.lock:
            self.stats["annotator_requests"] += 1
            self.stats["annotator_failures"] += verdict is None
            self.stats["input_tokens"] += msg.usage.input_tokens
            self.stats["output_tokens"] += msg.usage.output_tokens
            if verdict is not None:
                self.cache[key] = verdict
        return verdict

    def judge(self, prompts: list, first: list, second: list) -> list:
        return list(self.pool.map(self._one, prompts, first, second))

    def __call__(self, prompts: list, first: list, second: list) -> list:
        return both_orders(self.judge, prompts, first, second)

    def cost(self) -> Optional[float]:
        price = self.PRICE_PER_MTOK.get(self.model)
        return price and (self.stats["input_tokens"] * price[0] + self.stats["output_tokens"] * price[1]) / 1e6


class LocalJudgeAnnotator:
    """Any Hugging Face causal LM as the annotator, offline once on disk: the same templates, and the soft
    verdict P("1") / (P("1") + P("2")) read from the next-token distribution, both orders averaged."""

    def __init__(self, model, tokenizer, task: str = "helpful", instruction: str = "", batch_size: int = 8):
        if task not in TEMPLATES:
            raise OAIFError(f"unknown --task {task!r}; choose from {', '.join(TEMPLATES)}")
        self.model, self.tokenizer, self.task, self.instruction = model, tokenizer, task, instruction
        self.batch_size = batch_size
        self.context = context_length(model.config)
        # the last token of "1" / "2" (sentencepiece vocabularies may put a word-start piece before it)
        self.digits = [tokenizer("1", add_special_tokens=False).input_ids[-1],
                       tokenizer("2", add_special_tokens=False).input_ids[-1]]
        self.stats = dict(annotator_requests=0, annotator_failures=0, input_tokens=0, output_tokens=0)

    @torch.inference_mode()
    def judge(self, prompts: list, first: list, second: list) -> list:
        item = QUESTION[self.task][1]
        asks = [render_judge_prompt(self.task, self.instruction, *x) for x in zip(prompts, first, second)]
        answer = f"Preferred {item}="  # the digit must be the very next token
        if getattr(self.tokenizer, "chat_template", None):
            texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": a}], tokenize=False,
                                                        add_generation_prompt=True) + answer for a in asks]
        else:
            texts = [a + "\n" + answer for a in asks]
        out = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        W = self.model.get_output_embeddings().weight[self.digits]  # (2, H): only two logits are needed
        for i in range(0, len(texts), self.batch_size):
            seqs = [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts[i:i + self.batch_size]]
            if self.context and max(map(len, seqs)) > self.context:
                raise OAIFError(f"a judge prompt has {max(map(len, seqs))} tokens, over the judge's context of "
                                f"{self.context}: use a judge with a longer context or shorter responses")
            ids, mask = left_pad(seqs, pad, self.model.device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            h = self.model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                      use_cache=False).last_hidden_state[:, -1]  # (b, H), left padding
            logits = (h @ W.T.to(h.dtype)).float() / head_temperature(self.model.config)
            out += torch.softmax(logits, -1)[:, 0].tolist()
            self.stats["annotator_requests"] += len(ids)
            self.stats["input_tokens"] += int(mask.sum())
        return out

    def __call__(self, prompts: list, first: list, second: list) -> list:
        return both_orders(self.judge, prompts, first, second)


def make_annotator(spec: str, cfg: Config, models: dict, claude_model: str) -> Callable:
    """--annotator NAME -> callable. `models` caches loaded (model, tokenizer) pairs: a judge that is the
    policy's own starting checkpoint reuses the frozen reference model instead of loading a third copy."""
    if spec in ("shorter", "longer"):
        return {"shorter": shorter, "longer": longer}[spec]
    if spec == "claude":
        return ClaudeAnnotator(claude_model, cfg.task, cfg.instruction, max_workers=cfg.annotator_workers)
    if spec.startswith("hf:"):
        name = spec[3:]
        if name not in models:
            models[name] = load_model(name, models["device"])
            models[name][0].requires_grad_(False).to(torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32)
        return LocalJudgeAnnotator(*models[name], task=cfg.task, instruction=cfg.instruction)
    raise OAIFError(f"unknown annotator {spec!r}; use shorter, longer, claude or hf:MODEL")


# ----------------------------------------------------------------------------------------------------------
# Evaluation: win rate of the policy against the initial model, judged by an annotator


def sample_answers(model, tokenizer, prompts: list, max_new_tokens: int = 64, temperature: float = 0.9,
                   batch_size: int = 8, seed: Optional[int] = None) -> list:
    """One response per prompt, batch by batch. With a seed, the draws are the same for any model (common
    random numbers: two models that agree give the same answer) and the global RNG is left untouched."""
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else [],
                               enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return [t for i in range(0, len(prompts), batch_size) for t in sample_pairs(
            model, tokenizer, prompts[i:i + batch_size], 1, max_new_tokens, temperature)["texts"]]


def win_rate(prompts: list, policy_texts: list, reference_texts: list, annotator: Callable) -> dict:
    """The paper's evaluation: annotator(prompts, policy's answers, reference's answers). Ties (p = 0.5) count
    1/2; prompts with no verdict are left out and counted. Also the mean answer length (characters) of each."""
    probs = annotator(prompts, policy_texts, reference_texts)
    none, ties = sum(p is None for p in probs), sum(p == 0.5 for p in probs)
    wins, losses = sum(p is not None and p > 0.5 for p in probs), sum(p is not None and p < 0.5 for p in probs)
    n = wins + ties + losses
    return dict(win_rate=(wins + 0.5 * ties) / n if n else float("nan"), n=n, wins=wins, ties=ties,
                losses=losses, no_verdict=none, policy_chars=sum(map(len, policy_texts)) / len(prompts),
                reference_chars=sum(map(len, reference_texts)) / len(prompts))


# ----------------------------------------------------------------------------------------------------------
# Loading, data and checkpoints


def load_model(name: str, device: torch.device) -> tuple:
    """(model, tokenizer) from a hub id or folder, ready to sample: pad token set, left padding, eval mode."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()  # one bar per run is enough: ours
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        # float32 whatever the file holds: most chat checkpoints are stored in bf16, where AdamW's small
        # updates would round away (with LoRA the frozen base alone is cast to the compute dtype)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).to(device)
    except (OSError, ValueError, KeyError) as e:
        raise OAIFError(f"cannot load model {name!r}: {str(e).strip().splitlines()[0]}") from None
    if tokenizer.pad_token is None:  # GPT-2 has none; EOS is safe because masks, not ids, mark padding
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # batched generation continues from the right edge
    # eval() only switches dropout off: policy and reference must score the same tokens the same way.
    check_logprobs(model.eval())
    return model, tokenizer


def load_prompts(path: str) -> list:
    if not path:
        return list(DEFAULT_PROMPTS)
    if not os.path.isfile(path):
        raise OAIFError(f"prompts file not found: {path}")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if path.endswith(".jsonl"):
        prompts = []
        for i, line in enumerate(lines, 1):
            try:
                prompts.append(json.loads(line)["prompt"])
                assert isinstance(prompts[-1], str) and prompts[-1].strip()
            except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
                raise OAIFError(f"{path}:{i}: expected a JSON object with a non-empty \"prompt\" string") from None
    elif path.endswith(".txt"):
        prompts = lines
    else:
        raise OAIFError(f"prompts file must be .txt or .jsonl: {path}")
    if not prompts:
        raise OAIFError(f"prompts file is empty: {path}")
    return prompts


def load_offline_pairs(path: str, tokenizer) -> list:
    """A .jsonl of prompt/chosen/rejected -> [(prompt, prompt_ids, chosen_ids, rejected_ids, 1.0, texts)]."""
    if not os.path.isfile(path):
        raise OAIFError(f"offline data not found: {path}")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate((l for l in f if l.strip()), 1):
            try:
                r = json.loads(line)
                x, yw, yl = r["prompt"], r["chosen"], r["rejected"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise OAIFError(f"{path}:{i}: expected a JSON object with prompt, chosen and rejected") from None
            eos = [tokenizer.eos_token_id]  # a response ends with EOS, as a sampled one does
            enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids + eos
            pairs.append((x, encode_prompts(tokenizer, [x])[0], enc(yw), enc(yl), 1.0, [yw, yl]))
    if not pairs:
        raise OAIFError(f"offline data is empty: {path}")
    return pairs


def step_slice(items: list, step: int, batch_size: int, rank: int = 0, world: int = 1) -> list:
    """The prompts of `step` (1-based) for this rank: a fixed cycle through `items`, so that the online and
    offline arms see the same prompts in the same order and a resumed run picks up where it stopped."""
    start = (step - 1) * batch_size
    return [items[(start + j) % len(items)] for j in range(batch_size)][rank::world]


def save_model(model, tokenizer, path: str, state_dict: Optional[dict] = None) -> None:
    """save_pretrained of the policy (a peft model: its adapter) and tokenizer; never weights that are inf or
    nan. state_dict: the full weights gathered from FSDP shards."""
    if not (finite_weights(model) if state_dict is None else finite_weights(state_dict.values())):
        raise OAIFError(f"refusing to save non-finite (inf/nan) weights to {path}")
    model.save_pretrained(path, state_dict=state_dict)
    tokenizer.save_pretrained(path)


def finite_weights(model_or_tensors) -> bool:
    """No inf or nan in the weights (of this rank's shards, under FSDP)."""
    ts = model_or_tensors.parameters() if hasattr(model_or_tensors, "parameters") else model_or_tensors
    ts = [t.detach().to_local() if hasattr(t, "to_local") else t.detach() for t in ts]
    return bool(torch.stack([torch.isfinite(t).all() for t in ts]).all())


def gathered_state(policy, root, optimizer, fsdp: bool) -> tuple:
    """(full model state dict or None, optimizer state dict): under FSDP gathered from every rank's shards,
    so a checkpoint is the same files for any number of ranks. A collective: every rank calls it."""
    if not fsdp:
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(policy, options=full), get_optimizer_state_dict(root, optimizer, options=full)


def save_checkpoint(out_dir: str, step: int, policy, tokenizer, optimizer, rank: int, world: int,
                    keep: int, root=None, fsdp: bool = False) -> None:
    """OUTPUT_DIR/checkpoint-STEP, written under a temporary name and renamed: never half a checkpoint.
    trainer_state.pt is written last; a folder without it is incomplete and ignored by --resume."""
    final, tmp = os.path.join(out_dir, f"checkpoint-{step}"), os.path.join(out_dir, f".tmp-checkpoint-{step}")
    model_state, optimizer_state = gathered_state(policy, root, optimizer, fsdp)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(policy, tokenizer, tmp, model_state)
    barrier(world)
    rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
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
    found = []
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        if m and os.path.isfile(os.path.join(out_dir, name, "trainer_state.pt")):
            found.append((int(m.group(1)), os.path.join(out_dir, name)))
    return [path for _, path in sorted(found)]


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


class _Scorer(torch.nn.Module):
    """Runs fn(model, *args) as its forward. DistributedDataParallel synchronises the gradients of what runs
    inside a module's forward, and FSDP gathers a module's shards around it: this makes sequence_logprobs
    (or, under FSDP, the whole sampling loop) that forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.dropouts = [m for n, m in model.named_modules() if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]

    def forward(self, fn, *args):
        for m in self.dropouts:  # LoRA dropout acts in the loss pass only: samples and reference stay exact
            m.train(torch.is_grad_enabled())
        try:
            return fn(self.model, *args)
        finally:
            for m in self.dropouts:
                m.eval()


def add_lora(model, cfg: Config, resume_from: Optional[str]):
    """`model` (frozen) with a trainable LoRA adapter, through peft; resume_from: the adapter of a checkpoint."""
    try:
        import peft
    except ImportError:
        raise OAIFError("--lora-rank needs peft: pip install peft") from None
    try:
        if resume_from:
            return peft.PeftModel.from_pretrained(model, resume_from, is_trainable=True)
        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else cfg.lora_targets.split(",")
        config = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=targets, task_type="CAUSAL_LM")
        lora = peft.get_peft_model(model, config)
    except ValueError as e:
        raise OAIFError(f"--lora-targets {cfg.lora_targets}: {str(e).splitlines()[0]}") from None
    if any(hasattr(m, "lora_A") for m in (model.get_output_embeddings(), model.get_input_embeddings())):
        raise OAIFError("--lora-targets: not the embeddings or LM head (sequence_logprobs reads the head's weight)")
    return lora


def shard(root) -> None:
    """FSDP2: every transformer block its own unit (gathered just for its forward and backward), the rest
    (embeddings, final norm, LM head) the root's."""
    from torch.distributed.fsdp import fully_shard

    for m in root.modules():
        if type(m).__name__ in (getattr(root.model, "_no_split_modules", None) or []):
            fully_shard(m)
    fully_shard(root)


@torch.no_grad()
def run_gathered(root, fn: Callable):
    """fn(model) inside the FSDP root's forward, each unit gathered once for the whole call (sampling decodes
    token by token: not an all-gather per layer per token), then sharded again."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        return root(fn)
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


# ----------------------------------------------------------------------------------------------------------
# The online loop (Algorithm 1)


def preference_batch(logps, ref_logps, probs: list, loss_fn: Callable, beta: float, n_global: int, world: int,
                     soft: bool = False):
    """Loss over the usable pairs of one step, from the (2B,) policy and reference log-probs (rows 2i, 2i+1 =
    first, second) and the annotator's P(first is better) (None or 0.5: unusable). soft: the loss takes
    max(p, 1 - p) as P(chosen is better); hard: 1. The loss is scaled so that DDP's gradient average is the
    mean over all ranks' usable pairs. Returns (loss, sums of loss, margin and accuracy over usable pairs)."""
    p = torch.tensor([0.5 if v is None else v for v in probs], dtype=torch.float32, device=logps.device)
    usable = (p != 0.5).float()  # no verdict and ties contribute nothing
    first_wins = p > 0.5
    pc, pr = torch.where(first_wins, logps[0::2], logps[1::2]), torch.where(first_wins, logps[1::2], logps[0::2])
    rc, rr = torch.where(first_wins, ref_logps[0::2], ref_logps[1::2]), \
        torch.where(first_wins, ref_logps[1::2], ref_logps[0::2])
    losses = loss_fn(pc, pr, rc, rr, beta, label_p=torch.maximum(p, 1 - p) if soft else 1.0)
    h = ((pc - rc) - (pr - rr)).detach()
    loss = (losses * usable).sum() * world / max(n_global, 1)
    return loss, losses.detach().mul(usable).sum(), (beta * h * usable).sum(), ((h > 0).float() * usable).sum()


def triage(probs: list, min_confidence: float) -> tuple:
    """(the verdicts the loss may use, None elsewhere; counts of usable pairs, ties, no verdict and hedges:
    verdicts within min_confidence of 1/2)."""
    used = [None if p is None or p == 0.5 or abs(p - 0.5) < min_confidence else p for p in probs]
    counts = dict(pairs=sum(p is not None for p in used), ties=sum(p == 0.5 for p in probs),
                  no_verdict=sum(p is None for p in probs))
    return used, dict(counts, low_confidence=len(probs) - sum(counts.values()))


def update(loss, params: list, optimizer, max_grad_norm: float, world: int, device) -> tuple:
    """backward, clipping and an AdamW step, unless the loss or the gradient is not finite (on any rank):
    then no step. Returns (gradient norm, 1 if skipped as not finite else 0)."""
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
    positive |= {"eval_prompts"} if cfg.eval_every > 0 else set()
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
    for name, allowed in (("loss", LOSSES), ("dtype", ("float32", "bfloat16")), ("labels", ("hard", "soft"))):
        if getattr(cfg, name) not in allowed:
            raise OAIFError(f"unknown --{name} {getattr(cfg, name)!r}; choose {', '.join(allowed)}")


def setup_run(cfg: Config, custom_annotator: Optional[Callable]) -> tuple:
    """Checks that need no model, then ranks, device and seeds. Returns (rank, world, device, annotator name)."""
    check_numbers(cfg)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    spec = cfg.annotator or ("claude" if os.environ.get("ANTHROPIC_API_KEY") else "shorter")
    spec = getattr(custom_annotator, "__name__", "custom") if custom_annotator is not None else spec
    for s in (spec, cfg.eval_annotator):
        if s == "claude" and not os.environ.get("ANTHROPIC_API_KEY"):
            raise OAIFError("--annotator claude needs ANTHROPIC_API_KEY in the environment")
    if cfg.resume and not complete_checkpoints(cfg.output_dir):
        raise OAIFError(f"--resume: no complete checkpoint in {cfg.output_dir}")
    if not cfg.annotator and custom_annotator is None and rank == 0:
        print(f"oaif: annotator: {spec}" + ("" if spec == "claude" else " (no ANTHROPIC_API_KEY set; "
              "--annotator claude or hf:MODEL for an LLM judge)"), file=sys.stderr)
    device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if cfg.fsdp and world == 1:
        raise OAIFError("--fsdp shards across ranks: launch with torchrun --nproc_per_node N (N >= 2)")
    if world > 1:
        if cfg.batch_size % world:
            raise OAIFError(f"--batch-size {cfg.batch_size} must be a multiple of the {world} ranks")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    random.seed(cfg.seed + rank)  # each rank samples its own responses
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)
    return rank, world, device, spec


def context_length(config) -> Optional[int]:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_context(tokenizer, prompts: list, max_new_tokens: int, context: Optional[int], source: str) -> None:
    """Refuse (never truncate) a prompt that does not fit the model's context with its response."""
    lengths = [len(ids) for ids in encode_prompts(tokenizer, prompts)]
    i = max(range(len(prompts)), key=lengths.__getitem__)
    if context and lengths[i] + max_new_tokens > context:
        words = " ".join(prompts[i].split()[:8])
        raise OAIFError(f"{source}: the prompt \"{words[:60]}...\" has {lengths[i]} tokens; with --max-new-tokens "
                        f"{max_new_tokens} that is {lengths[i] + max_new_tokens - context} over the model's context "
                        f"of {context}: shorten it or lower --max-new-tokens")


def offline_pairs(cfg: Config, initial, tokenizer, prompts: list, eval_prompts: list, annotator: Callable) -> tuple:
    """The offline baseline's fixed set: [(prompt, prompt_ids, first_ids, second_ids, P(first better), texts)],
    and how many pairs of --offline-data were left out because their prompt is held out for evaluation.
    From --offline-data, or the paper's way: two samples per prompt from the *initial* policy, labelled once
    by the same annotator."""
    if cfg.offline_data:
        pairs = load_offline_pairs(cfg.offline_data, tokenizer)
        kept = [r for r in pairs if r[0] not in set(eval_prompts)]
        if not kept:
            raise OAIFError(f"{cfg.offline_data}: every pair's prompt is held out for evaluation (--eval-prompts)")
        return kept, len(pairs) - len(kept)
    pairs = []
    for i in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[i:i + cfg.batch_size]
        s = sample_pairs(initial, tokenizer, chunk, 2, cfg.max_new_tokens, cfg.temperature)
        rows = [r[m.bool()].tolist() for r, m in zip(s["input_ids"], s["response_mask"])]
        probs = annotator(chunk, s["texts"][0::2], s["texts"][1::2])
        pairs += [(x, ids, rows[2 * j], rows[2 * j + 1], probs[j], s["texts"][2 * j:2 * j + 2])
                  for j, (x, ids) in enumerate(zip(chunk, encode_prompts(tokenizer, chunk)))]
    return pairs, 0


def open_run(out_dir: str, resume_from: Optional[str], optimizer, rank: int, root, fsdp: bool) -> tuple:
    """(first step to run - 1, the step records kept from before, metrics.jsonl open for appending on rank 0)."""
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        if not resume_from and os.path.exists(metrics_path):
            os.remove(metrics_path)
    start, done = restore(resume_from, optimizer, rank, metrics_path, root, fsdp) if resume_from else (0, [])
    return start, done, open(metrics_path, "a") if rank == 0 else None


def restore(checkpoint: str, optimizer, rank: int, metrics_path: str, root=None, fsdp: bool = False) -> tuple:
    """Optimizer and RNG states of a checkpoint; metrics.jsonl cut back to its steps.
    Returns (its step, the kept step records: the summary counts them too)."""
    state = torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=False)
    if fsdp:  # the gathered state, cut into this rank's shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(root, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    rng = torch.load(os.path.join(checkpoint, f"rng-{rank}.pt"), weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    kept = []
    if os.path.exists(metrics_path):  # each step once, also after a crash past the checkpoint
        with open(metrics_path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= state["step"]]
        barrier(int(os.environ.get("WORLD_SIZE", 1)))  # every rank has read it before rank 0 rewrites it
        if rank == 0:
            with open(metrics_path, "w") as f:
                f.writelines(kept)
    return state["step"], [r for r in map(json.loads, kept) if not r.get("eval")]


def step_record(step: int, sums: dict, **extra) -> dict:
    """One metrics.jsonl line from the step's sums over ranks."""
    used, seqs = max(sums["pairs"], 1), sums["seqs"]
    return dict(step=step, loss=sums["loss"] / used, pairs=int(sums["pairs"]),
                dropped=int(sums["ties"] + sums["no_verdict"] + sums["low_confidence"]), ties=int(sums["ties"]),
                no_verdict=int(sums["no_verdict"]), low_confidence=int(sums["low_confidence"]),
                reward_margin=sums["margin"] / used, reward_accuracy=sums["acc"] / used, kl=sums["kl"] / seqs,
                response_tokens=sums["tokens"] / seqs, response_chars=sums["chars"] / seqs,
                **{k: int(sums[k]) for k in ANNOTATOR_STATS if k in sums}, **extra)


ANNOTATOR_STATS = ("annotator_requests", "annotator_failures", "input_tokens", "output_tokens")
TOTALS = ("pairs", "dropped", "ties", "no_verdict", "low_confidence", "nonfinite")


def peak_memory(device) -> dict:
    return {"peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30} if device.type == "cuda" else {}


def diverged(step: int, what: str, cfg: Config) -> OAIFError:
    last = (complete_checkpoints(cfg.output_dir) or ["none (--save-every N keeps some)"])[-1]
    return OAIFError(f"step {step}: {what}: the run diverged (--lr {cfg.lr} too high?); last good checkpoint: {last}")


def load_policy(cfg: Config, device, resume_from: Optional[str]) -> tuple:
    """(policy, reference model, tokenizer, what to save, a context in which the reference is the initial model).

    The reference is the frozen initial model, also on resume. It is float32 like the policy's master weights
    and runs under the same autocast: a bf16 copy (its norms and residual adds in bf16 too) scored SmolLM2's
    own samples 0.47 nats per sequence away from the identical float32 policy, so step 1 showed a KL and
    margins that were only rounding. With LoRA there is one model: its frozen base (in the compute dtype),
    and the reference is the policy with its adapter disabled."""
    ref_model, tokenizer = load_model(cfg.model, device)
    ref_model.requires_grad_(False)
    if cfg.lora_rank:
        lora = add_lora(ref_model.to(torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32), cfg, resume_from)
        return lora.get_base_model(), ref_model, tokenizer, lora, lora.disable_adapter
    policy = load_model(resume_from, device)[0] if resume_from else copy.deepcopy(ref_model).requires_grad_(True)
    return policy, ref_model, tokenizer, policy, contextlib.nullcontext


def reference_side(cfg: Config, initial, tokenizer, train_prompts: list, eval_prompts: list, annotator: Callable,
                   rank: int, world: int) -> tuple:
    """(the offline fixed set or None, pairs left out of it as held-out, the win rate's reference answers or
    None), all drawn from the initial model. --offline's set is sampled and labelled once, on rank 0, and
    shared with every rank; the reference answers use the evaluation's seed (rank 0 evaluates; under FSDP
    every rank samples, as the shards must be gathered)."""
    fixed, held_out = None, 0
    if cfg.offline or cfg.offline_data:
        box = [offline_pairs(cfg, initial, tokenizer, train_prompts, eval_prompts, annotator)
               if rank == 0 or cfg.offline_data else None]
        if cfg.offline and world > 1:
            torch.distributed.broadcast_object_list(box, 0)
        fixed, held_out = box[0]
    if held_out and rank == 0:
        print(f"oaif: {held_out} pairs of {cfg.offline_data} are left out: their prompts are held out for evaluation",
              file=sys.stderr)
    answers = sample_answers(initial, tokenizer, eval_prompts, cfg.max_new_tokens, cfg.temperature,
                             cfg.batch_size, cfg.seed) if eval_prompts and (rank == 0 or cfg.fsdp) else None
    return fixed, held_out, answers


def train(cfg: Config, annotator: Optional[Callable] = None) -> dict:
    """Run OAIF (or, with --offline, the offline baseline) as `cfg` says; returns the last metrics and a
    summary. `annotator` overrides --annotator with any callable of the annotator interface."""
    from tqdm import tqdm

    rank, world, device, spec = setup_run(cfg, annotator)
    beta = cfg.beta if cfg.beta is not None else DEFAULT_BETA[cfg.loss]
    prompts = load_prompts(cfg.prompts)
    random.Random(cfg.seed).shuffle(prompts)  # the held-out split is fixed by the seed
    n_eval = min(cfg.eval_prompts, len(prompts) - 1) if cfg.eval_every > 0 else 0
    eval_prompts, train_prompts = prompts[:n_eval], prompts[n_eval:]
    resume_from = complete_checkpoints(cfg.output_dir)[-1] if cfg.resume else None
    amp = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    policy, ref_model, tokenizer, saved, reference = load_policy(cfg, device, resume_from)
    check_context(tokenizer, prompts, cfg.max_new_tokens, context_length(policy.config),
                  cfg.prompts or "the built-in prompts")
    models = {"device": device, **({} if cfg.lora_rank else {cfg.model: (ref_model.requires_grad_(False), tokenizer)})}
    annotator = annotator or make_annotator(spec, cfg, models, cfg.annotator_model)
    eval_annotator = make_annotator(cfg.eval_annotator, cfg, models, cfg.eval_annotator_model or cfg.annotator_model) \
        if cfg.eval_annotator else annotator
    with reference():  # everything drawn from the initial model, before anything is sharded
        fixed, held_out, ref_answers = reference_side(cfg, ref_model, tokenizer, train_prompts, eval_prompts,
                                                      annotator, rank, world)
    score, ref_score = _Scorer(policy), _Scorer(ref_model)  # LoRA: the same model, ref_score under reference()
    if cfg.fsdp:
        shard(score)
        shard(ref_score)
    elif world > 1:
        score = torch.nn.parallel.DistributedDataParallel(score, device_ids=[device] if device.type == "cuda" else None)
    sample = partial(run_gathered, score) if cfg.fsdp else lambda fn: fn(policy)  # fn(policy) -> samples
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, done, log = open_run(cfg.output_dir, resume_from, optimizer, rank, score, cfg.fsdp)
    background = concurrent.futures.ThreadPoolExecutor(1)  # runs the annotator while we compute log-probs
    bar = tqdm(range(start + 1, cfg.steps + 1), initial=start, total=cfg.steps, disable=rank != 0)
    totals, record, last_eval = {k: sum(r.get(k, 0) for r in done) for k in TOTALS}, {}, None
    for step in bar:
        t0, stats0 = time.perf_counter(), dict(getattr(annotator, "stats", {}))
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
        kl_sum = float((logps.detach() - ref_logps).sum())  # summed log-ratios of the sampled responses
        if cfg.average_logps:
            n_tok = batch["response_tokens"].clamp(min=1)
            logps, ref_logps = logps / n_tok, ref_logps / n_tok
        t2 = time.perf_counter()
        probs, annotate_s = pending.result() if fixed is None else ([r[4] for r in rows], 0.0)
        wait_s = time.perf_counter() - t2
        # 4) loss over the usable pairs (a verdict within --min-confidence of 1/2 is a hedge: dropped), AdamW
        # step with clipping; no usable pair anywhere, or a loss or gradient that is not finite: no update
        for group in optimizer.param_groups:  # linear warm-up; a function of the step, so nothing to checkpoint
            group["lr"] = cfg.lr * min(1.0, step / max(1, cfg.warmup_steps))
        used, counts = triage(probs, cfg.min_confidence)
        n_used = all_sum(dict(n=counts["pairs"]), world, device)["n"]
        loss, loss_sum, margin_sum, acc_sum = preference_batch(logps, ref_logps, used, LOSSES[cfg.loss], beta,
                                                               int(n_used), world, cfg.labels == "soft")
        grad_norm, nonfinite = update(loss, params, optimizer, cfg.max_grad_norm, world, device) if n_used else (0.0, 0)
        if n_used and not nonfinite and all_sum(dict(bad=not finite_weights(policy)), world, device)["bad"]:
            raise diverged(step, "the policy's weights are no longer finite (inf or nan)", cfg)
        t3 = time.perf_counter()
        # 5) log: sums over ranks, then means
        stats = {k: v - stats0.get(k, 0) for k, v in getattr(annotator, "stats", {}).items()}
        sums = all_sum(dict(counts, loss=float(loss_sum), margin=float(margin_sum), acc=float(acc_sum), kl=kl_sum,
                            tokens=float(batch["response_tokens"].sum()), chars=sum(map(len, texts)), seqs=len(texts),
                            **stats), world, device)
        record = step_record(step, sums, nonfinite=nonfinite, grad_norm=grad_norm,
                             lr=optimizer.param_groups[0]["lr"], updated=n_used > 0 and not nonfinite,
                             seconds=t3 - t0, sample_s=t1 - t0, annotate_s=annotate_s, annotate_wait_s=wait_s,
                             train_s=(t2 - t1) + (t3 - t2 - wait_s), **peak_memory(device))
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
            save_checkpoint(cfg.output_dir, step, saved, tokenizer, optimizer, rank, world,
                            cfg.keep_checkpoints, score, cfg.fsdp)
    bar.close()
    background.shutdown()
    summary = dict(totals, steps=cfg.steps, held_out_pairs=held_out, **getattr(annotator, "stats", {}))
    model_state = gathered_state(policy, score, optimizer, cfg.fsdp)[0] if cfg.fsdp else None
    if rank == 0:
        log.close()
        finish(cfg, saved, tokenizer, dict(dataclasses.asdict(cfg), beta=beta, annotator=spec), summary,
               annotator.cost() if hasattr(annotator, "cost") else None, model_state)
    if world > 1:
        barrier(world)  # every rank done before any tears down its process group
        torch.distributed.destroy_process_group()
    return dict(last=record, eval=last_eval, summary=summary)


def report(record: dict, log, bar, sample_every: int = 0, prompt: str = "", pair: list = (), p=None) -> None:
    """One metrics.jsonl line, the progress bar, and now and then a judged pair or a win rate on the console."""
    log.write(json.dumps(record) + "\n")
    log.flush()
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
    print(line + (f", about ${cost:.2f}" if cost else "") + f"; saved to {cfg.output_dir}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------
# Command line: one flag per Config field


def parse_args(argv: Optional[list] = None) -> Config:
    helps = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(Config), re.M))
    parser = argparse.ArgumentParser(description="Online AI Feedback: DPO/IPO/SLiC on pairs the policy samples, "
                                     "labelled by an LLM annotator as it trains.")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helps[f.name])
        else:
            kind = float if f.name == "beta" else f.type
            parser.add_argument(flag, type=kind, default=f.default, help=helps[f.name])
    return Config(**vars(parser.parse_args(argv)))


def main(argv: Optional[list] = None) -> dict:
    cfg = parse_args(argv)
    try:
        return train(cfg)
    except OAIFError as e:
        raise SystemExit(f"oaif: error: {e}") from None


if __name__ == "__main__":
    main()
