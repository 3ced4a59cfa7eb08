"""The memory a run needs, computed (not measured) from the published configs of Llama-3.2-1B,
Llama-3.2-3B and Llama-3.1-8B: parameters counted on the meta device (no weights are made), bytes
per parameter from what oaif holds, activations from the shapes of the log-prob pass. For a measured
table, run oaif on a GPU and read peak_mem_gb in metrics.jsonl.

    python examples/memory_table.py \
        [--prompts 8 --new-tokens 128 --prompt-tokens 48 --lora-rank 16 --gpus 8]

What oaif holds, per parameter P of the policy:
  full fine-tuning   policy float32 (4) + gradients float32 (4) + AdamW moments (8)
                     + reference float32 (4) = 20 P
  --lora-rank R      the frozen base in the compute dtype, bf16 (2): it is the reference too
                     (adapter off); the adapter's own weights, gradients and AdamW state at 16 bytes
                     each; no gradient for the frozen LM head (the fused head's backward skips it)
  --fsdp on N GPUs   full fine-tuning's 20 P divided by N (the reference sharded too), plus one
                     layer gathered
Activations (bf16 autocast, kept for the backward of one log-prob pass over prompts x 2 sequences):
  per token and layer ~ 2 bytes x (4 H + 2 KV + 3 I) + 4 bytes x 2 H (the norms' float32 inputs);
the reference pass keeps nothing; the fused head keeps one float per token; sampling's KV cache is
float32.
"""

import argparse

import torch

CONFIGS = {  # the published configs' shapes
    "Llama-3.2-1B": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "Llama-3.2-3B": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "Llama-3.1-8B": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}


def count(name, lora_rank):
    from transformers import LlamaConfig, LlamaForCausalLM

    c = LlamaConfig(**CONFIGS[name])
    with torch.device("meta"):
        model = LlamaForCausalLM(c)
    params = sum(p.numel() for p in model.parameters())
    linear = [
        m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    ]
    lora = sum(lora_rank * (m.in_features + m.out_features) for m in linear)
    return c, params, lora


def main(argv=None):
    p = argparse.ArgumentParser(
        description="oaif's memory per GPU, computed from the models' configs."
    )
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument(
        "--prompt-tokens", type=int, default=48, help="a typical chat prompt with its template"
    )
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu-gib", type=float, default=80)
    a = p.parse_args(argv)
    rows, T = 2 * a.prompts, a.prompt_tokens + a.new_tokens
    print(
        f"computed, not measured: {a.prompts} prompts x 2 x {a.new_tokens} new tokens, "
        "bf16 autocast; GiB per GPU"
    )
    print(
        "| model | parameters | full fine-tuning | LoRA r%d | FSDP on %d GPUs |"
        % (a.lora_rank, a.gpus)
    )
    print("|---|---|---|---|---|")

    def fmt(b):
        return f"{b / 2**30:.1f}" + ("" if b / 2**30 <= a.gpu_gib else f" (> {a.gpu_gib:g})")

    for name in CONFIGS:
        c, P, L = count(name, a.lora_rank)
        H, inter = c.hidden_size, c.intermediate_size  # the docstring's H and I
        KV = c.num_key_value_heads * (H // c.num_attention_heads)
        act = rows * T * c.num_hidden_layers * (2 * (4 * H + 2 * KV + 3 * inter) + 4 * 2 * H)
        kv = rows * T * c.num_hidden_layers * 2 * KV * 4
        extra = act + kv
        layer = 4 * (4 * H * H + 3 * H * inter)  # one decoder layer gathered, float32
        full, lora, fsdp = 20 * P + extra, 2 * P + 16 * L + extra, 20 * P / a.gpus + layer + extra
        print(
            f"| {name} | {P / 1e9:.2f} B (LoRA {L / 1e6:.1f} M) "
            f"| {fmt(full)} | {fmt(lora)} | {fmt(fsdp)} |"
        )


if __name__ == "__main__":
    main()
