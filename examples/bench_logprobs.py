"""Benchmark per-token log-probs, forward + backward, at LM-head sizes
(default GPT-2: H = 768, V = 50257):

  naive      log_softmax(hidden @ W.T).gather(...)             (TRL's online DPO)
  selective  logits materialised, then per-sequence logsumexp minus the gathered logit (TRL's
             selective_log_softmax idea; one loop iteration per 512-token sequence)
  fused      oaif.fused_logprobs, default chunk size, then a sweep of chunk sizes
  torch_lce  PyTorch's chunked F.linear_cross_entropy(..., reduction="none",
             options=LinearCrossEntropyOptions()), negated; only where this torch has it
             (2.13+), not in --quick

Time is the median of --repeats runs; extra peak memory is measured on CPU in a subprocess per
variant (peak RSS minus that process's RSS with its inputs allocated), on CUDA with
max_memory_allocated after a reset; the error is the max absolute difference from float64 on the
first 256 rows (log-probs and the hidden states' gradient). float32 on CPU, bfloat16 on CUDA
(logsumexp in float32 for every variant).

    python examples/bench_logprobs.py                  # CPU, N = 1024 and 4096
    python examples/bench_logprobs.py --device cuda    # N = 1024, 4096, 16384
    python examples/bench_logprobs.py --quick          # small shapes, seconds
    # named LM heads
    python examples/bench_logprobs.py --shapes qwen2.5-0.5b:2048,gpt2:4096 --chunks ""
    # N from --sizes
    python examples/bench_logprobs.py --device cuda --shapes llama3.2-1b,gemma3
    # LoRA: no head gradient
    python examples/bench_logprobs.py --shapes qwen2.5-0.5b:2048 --frozen-head

--shapes: comma-separated NAME[:N[+N...]], NAME one of SHAPES below or HxV (e.g. 896x151936);
without :N the sizes come from --sizes.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import oaif  # noqa: E402


def naive(h, W, labels, chunk):
    return torch.log_softmax((h @ W.T).float(), -1).gather(1, labels[:, None]).squeeze(1)


def selective(h, W, labels, chunk, seq=512):
    logits = h @ W.T  # (N, V) materialised, in the input dtype
    picked = logits.gather(1, labels[:, None]).squeeze(1).float()
    lse = torch.cat(
        [torch.logsumexp(logits[i : i + seq].float(), -1) for i in range(0, len(logits), seq)]
    )
    return picked - lse


def fused(h, W, labels, chunk):
    return oaif.fused_logprobs(h, W, labels, chunk_size=chunk)


def torch_lce(h, W, labels, chunk):
    opts = (
        torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk, chunking_method=None)
        if chunk
        else torch.nn.LinearCrossEntropyOptions()
    )
    return -F.linear_cross_entropy(h, W, labels, reduction="none", options=opts).float()


VARIANTS = {"naive": naive, "selective": selective, "fused": fused}
HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy") and hasattr(
    torch.nn, "LinearCrossEntropyOptions"
)
if HAS_TORCH_LCE:
    VARIANTS["torch_lce"] = torch_lce

# LM heads (H, V): hidden size and vocabulary
SHAPES = {
    "gpt2": (768, 50257),
    "qwen2.5-0.5b": (896, 151936),
    "llama3.2-1b": (2048, 128256),
    "gemma3": (1152, 262144),
}


def parse_shapes(spec, default_sizes):
    """'qwen2.5-0.5b:2048,gpt2:4096+8192,896x151936' -> [(name, H, V, [N, ...]), ...]"""
    out = []
    for item in filter(None, spec.split(",")):
        name, _, ns = item.partition(":")
        H, V = SHAPES[name] if name in SHAPES else map(int, name.lower().split("x"))
        out.append((name, H, V, [int(n) for n in ns.split("+")] if ns else default_sizes))
    return out


def inputs(N, H, V, device, dtype, seed=0, frozen_head=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(device, dtype).requires_grad_()
    W = torch.randn(V, H, generator=g).mul_(0.02)  # in place: no temporary
    W = W.to(device, dtype).requires_grad_(not frozen_head)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    upstream = torch.randn(N, generator=g).to(device)
    return h, W, labels, upstream


def rss_peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(variant, N, H, V, chunk, device, repeats, frozen_head=False):
    """One variant at one size: median time, extra peak memory, max error against float64."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    h, W, labels, upstream = inputs(N, H, V, device, dtype, frozen_head=frozen_head)
    fn = VARIANTS[variant]

    def run():
        h.grad = W.grad = None
        (fn(h, W, labels, chunk) * upstream).sum().backward()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        sync()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        base = rss_peak_mb()
        run()
        extra = rss_peak_mb() - base
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t)
    # error on the first 256 rows: a row's log-prob and hidden-state gradient depend on that row
    # alone
    k = min(256, N)
    h64, W64 = h.detach()[:k].double().requires_grad_(), W.detach().double()
    ref = torch.log_softmax(h64 @ W64.T, -1).gather(1, labels[:k, None]).squeeze(1)
    (ref * upstream[:k].double()).sum().backward()
    out = fn(h.detach()[:k].clone().requires_grad_(), W.detach(), labels[:k], chunk)
    h_k = h.grad[:k].double()
    err = max((out.double() - ref).abs().max().item(), (h_k - h64.grad).abs().max().item())
    time_s = statistics.median(times)
    return dict(variant=variant, N=N, chunk=chunk, time_s=time_s, extra_mb=extra, max_err=err)


def run_one(a, variant, N, H, V, chunk):
    """One measurement: on CPU in a fresh process (its peak RSS is its own), else here. None if it
    failed."""
    if a.device == "cpu" and not a.quick:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            variant,
            str(N),
            str(chunk),
            "--repeats",
            str(a.repeats),
            "--hidden",
            str(H),
            "--vocab",
            str(V),
        ] + ["--frozen-head"] * a.frozen_head
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            print(f"{N:>6} {variant:>10} failed: {r.stderr.strip().splitlines()[-1:]}")
            return None
        return json.loads(r.stdout.strip().splitlines()[-1])
    try:
        return measure(variant, N, H, V, chunk or None, a.device, a.repeats, a.frozen_head)
    except torch.cuda.OutOfMemoryError:
        print(f"{N:>6} {variant:>10} out of memory")
        return None
    finally:
        if a.device == "cuda":
            torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--sizes", default="", help="comma-separated N (default: 1024,4096 on CPU; +16384 on CUDA)"
    )
    p.add_argument(
        "--chunks",
        default="128,256,512,1024,2048",
        help="chunk sizes to sweep for fused ('' for none)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument(
        "--shapes",
        default="",
        help="LM heads to run, NAME[:N[+N]],... with NAME in "
        f"{', '.join(SHAPES)} or HxV (default: --hidden x --vocab)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small shapes (N=256, H=64, V=2048), one repeat, one "
        "process (so CPU memory numbers are not isolated): a smoke test",
    )
    p.add_argument("--json", default="", help="also write the rows to this file")
    p.add_argument(
        "--frozen-head",
        action="store_true",
        help="the LM head needs no gradient (LoRA): hidden-state gradients only",
    )
    p.add_argument("--worker", nargs=3, metavar=("VARIANT", "N", "CHUNK"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.sizes, a.hidden, a.vocab, a.repeats, a.chunks = a.sizes or "256", 64, 2048, 1, "64,100"
    if a.worker:  # one measurement in this fresh process, printed as JSON
        v, N, chunk = a.worker
        chunk = int(chunk) or None
        row = measure(v, int(N), a.hidden, a.vocab, chunk, a.device, a.repeats, a.frozen_head)
        print(json.dumps(row))
        return
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_logprobs: --device cuda but no CUDA device is available")
    sizes = a.sizes or ("1024,4096,16384" if a.device == "cuda" else "1024,4096")
    sizes = [int(s) for s in sizes.split(",")]
    shapes = parse_shapes(a.shapes, sizes) or [(f"{a.hidden}x{a.vocab}", a.hidden, a.vocab, sizes)]
    runs = [("naive", 0), ("selective", 0), ("fused", 0)] + [
        ("fused", int(c)) for c in a.chunks.split(",") if c
    ]
    if HAS_TORCH_LCE and not a.quick:  # --quick keeps its variant set (the test suite checks it)
        runs.append(("torch_lce", 0))
    rows = []
    print(
        f"device={a.device} dtype={'float32' if a.device == 'cpu' else 'bfloat16'} "
        f"threads={torch.get_num_threads()} torch={torch.__version__} frozen_head={a.frozen_head}",
        flush=True,
    )
    for shape, H, V, Ns in shapes:
        print(f"{shape}: H={H} V={V}", flush=True)
        print(
            f"{'N':>6} {'variant':>10} {'chunk':>7} {'time s':>9} {'x naive':>8} "
            f"{'extra MiB':>10} {'x naive':>8} {'max err':>9}  TFLOP/s",
            flush=True,
        )
        for N in Ns:
            for variant, chunk in runs:
                row = run_one(a, variant, N, H, V, chunk)
                if row is None:
                    continue
                row.update(shape=shape, H=H, V=V)
                if chunk == 0 and variant == "fused":
                    row["chunk"] = oaif.default_chunk_size(N, V, torch.device(a.device))
                    row["default"] = True
                base = next(
                    (r for r in rows if (r["shape"], r["N"], r["variant"]) == (shape, N, "naive")),
                    row,
                )
                # chunked ones recompute
                flops = (6 if variant in ("naive", "selective") else 8) * N * H * V
                flops -= 2 * N * H * V * a.frozen_head  # no head gradient
                row.update(
                    time_ratio=row["time_s"] / base["time_s"],
                    mem_ratio=row["extra_mb"] / max(base["extra_mb"], 1e-9),
                    tflops=flops / row["time_s"] / 1e12,
                )
                rows.append(row)
                name = variant + ("*" if row.get("default") else "")
                print(
                    f"{N:>6} {name:>10} {row['chunk'] or '-':>7} {row['time_s']:>9.3f} "
                    f"{row['time_ratio']:>8.2f} {row['extra_mb']:>10.0f} {row['mem_ratio']:>8.3f} "
                    f"{row['max_err']:>9.1e}  {row['tflops']:.2f}",
                    flush=True,
                )
    print(
        "fused* = the default chunk size; TFLOP/s counts 6NHV for naive/selective, 8NHV for fused "
        "and torch_lce (they recompute the logits), 2NHV less with --frozen-head"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
