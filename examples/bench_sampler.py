"""Time the sampler, and the floor under it, on one machine in one run (issue 9.2). Random GPT-2
small (124M, V = 50257: `gpt2`'s compute), --prompts prompts x 2 samples x --max-new-tokens tokens:

  generate   transformers' `generate` (do_sample, top_k=0, top_p=1, dynamic KV cache): oaif's
             sampler before
  oaif       oaif.sample_pairs: a loop of its own over model.forward with the KV cache
  forward    the model's own forward passes alone (prefill + one per token, same cache, no
             sampling): what any sampler over this model must pay
  floor      per token, max(weights read once at the measured memory bandwidth, the decode GEMMs
             at the measured GEMM rate for this batch), times the number of tokens

A random model almost never samples EOS (1 in 50257 per token), so every row runs to the cap and
all three do the same number of model calls. Times: median of --repeats, interleaved.

    python examples/bench_sampler.py                 # 8 prompts x 2 x 64 tokens, float32, CPU
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
from tiny_model import build_gpt2_small  # noqa: E402

import oaif  # noqa: E402


def with_generate(model, tok, prompts, n, max_new_tokens, temperature):
    pad = tok.pad_token_id
    ids, mask = oaif.left_pad(oaif.encode_prompts(tok, prompts), pad, model.device)
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            num_return_sequences=n,
            pad_token_id=pad,
        )


@torch.no_grad()
def forward_only(model, tok, prompts, n, max_new_tokens):
    ids, mask = oaif.left_pad(oaif.encode_prompts(tok, prompts), tok.pad_token_id, model.device)
    ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1
    )
    nxt = ids[:, -1:]
    for _ in range(max_new_tokens - 1):
        mask, pos = torch.cat([mask, torch.ones_like(mask[:, :1])], 1), pos[:, -1:] + 1
        if "cache" in out:
            past = dict(cache=out["cache"])
        else:
            past = dict(past_key_values=out["past_key_values"])
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, use_cache=True, **past)


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def floor_per_token(model, rows):
    """(bandwidth-bound seconds, compute-bound seconds) for one decode step of `rows` rows."""
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    big = torch.empty(nbytes // 4)
    big.fill_(1.0)
    copy_s = median_time(lambda: big.clone(), 5)  # reads and writes nbytes
    bandwidth = 2 * nbytes / copy_s
    H, V = model.config.n_embd, model.config.vocab_size
    x = torch.randn(rows, H)
    mats = [torch.randn(H, 3 * H), torch.randn(H, H), torch.randn(H, 4 * H), torch.randn(4 * H, H)]
    head = torch.randn(H, V)

    def gemms():
        for _ in range(model.config.n_layer):
            for w in mats:
                (x if w.shape[0] == H else torch.randn(rows, 4 * H)) @ w
        x @ head

    gemm_s = median_time(gemms, 5)
    flops = 2 * rows * (model.config.n_layer * 12 * H * H + H * V)
    return nbytes / bandwidth, gemm_s, bandwidth, flops / gemm_s, nbytes


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Sampler time: transformers' generate vs oaif's loop vs the floor."
    )
    p.add_argument(
        "--model", default="", help="a model folder (default: a random GPT-2 small, built offline)"
    )
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--temperature", type=float, default=0.9)
    a = p.parse_args(argv)
    path = a.model or build_gpt2_small(
        os.path.join(tempfile.mkdtemp(prefix="oaif-sampler-"), "gpt2-small")
    )
    model, tok = oaif.load_model(path, torch.device("cpu"))
    prompts = oaif.DEFAULT_PROMPTS[: a.prompts]
    runs = {
        "generate": lambda: with_generate(model, tok, prompts, 2, a.max_new_tokens, a.temperature),
        "oaif": lambda: oaif.sample_pairs(model, tok, prompts, 2, a.max_new_tokens, a.temperature),
        "forward": lambda: forward_only(model, tok, prompts, 2, a.max_new_tokens),
    }
    for fn in runs.values():
        fn()  # warm-up
    times = {k: [] for k in runs}
    for _ in range(a.repeats):
        for k, fn in runs.items():
            times[k].append(median_time(fn, 1))
    med = {k: statistics.median(v) for k, v in times.items()}
    bw_s, gemm_s, bandwidth, rate, nbytes = floor_per_token(model, 2 * a.prompts)
    T = a.max_new_tokens
    print(
        f"\n{2 * a.prompts} rows x {T} tokens, float32, {torch.get_num_threads()} threads; "
        f"median of {a.repeats}"
    )
    print(f"{'':>10} {'seconds':>9} {'ms/token':>9} {'x generate':>11}")
    for k, v in med.items():
        print(f"{k:>10} {v:>9.3f} {1000 * v / T:>9.1f} {v / med['generate']:>11.2f}")
    floor = max(bw_s, gemm_s) * T
    print(
        f"{'floor':>10} {floor:>9.3f} {1000 * floor / T:>9.1f} {floor / med['generate']:>11.2f}   "
        f"(weights {nbytes / 1e6:.0f} MB at {bandwidth / 1e9:.1f} GB/s: "
        f"{1000 * bw_s:.1f} ms/token; "
        f"decode GEMMs at {rate / 1e9:.0f} GFLOP/s: {1000 * gemm_s:.1f} ms/token)"
    )
    return med


if __name__ == "__main__":
    main()
