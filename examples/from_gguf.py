"""Turn a local GGUF file (what llama.cpp users have) into a folder that `oaif.py --model DIR`
trains: the weights dequantised into a plain transformers model, float32 (the default) or bfloat16
(half the disk), and its tokenizer with the chat template, offline. Needs
`pip install gguf accelerate` (for the conversion only).

    python examples/from_gguf.py SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smollm2
    python oaif.py --model /tmp/smollm2

A quantised file (Q4, Q8...) is dequantised, not restored: its model is a little worse than the
original weights. Architectures: those transformers reads from GGUF (Llama, Mistral, Qwen2, Gemma,
Phi-3 and others). The sampler stops at the GGUF's EOS and, where the file names one, its
end-of-turn token (generation_config).
"""

import argparse
import importlib.util
import os
import sys


def end_ids(path: str) -> list:
    """The GGUF's EOS and end-of-turn token ids (llama.cpp's metadata keys), whichever it has."""
    import gguf

    fields = gguf.GGUFReader(path).fields
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
    return sorted({int(fields[k].contents()) for k in keys if k in fields})


def convert(gguf_path: str, out_dir: str, dtype: str = "float32") -> None:
    """FILE.gguf -> out_dir (config.json, model.safetensors, tokenizer files, chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    dequantised = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = dequantised.config
    # the weights are plain tensors now: no GGUF traces in the folder
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(dequantised.state_dict())
    generation = model.generation_config
    generation.eos_token_id = end_ids(gguf_path) or generation.eos_token_id
    model.to(getattr(torch, dtype)).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{out_dir}: {config.model_type}, {params / 1e6:.0f}M parameters, "
        f"vocabulary {config.vocab_size}, {dtype}, "
        f"chat template: {'yes' if tokenizer.chat_template else 'none'}, "
        f"EOS {model.generation_config.eos_token_id}"
    )


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("gguf", metavar="FILE.gguf", help="a local GGUF file")
    p.add_argument("out", metavar="DIR", help="a new or empty folder for the model")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the saved weights' dtype (oaif loads them as float32 either way)",
    )
    a = p.parse_args(argv)
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        needs, install = " and ".join(missing), " ".join(missing)
        sys.exit(f"from_gguf: reading GGUF needs {needs}: pip install {install}")
    if not os.path.isfile(a.gguf):
        sys.exit(f"from_gguf: no such file: {a.gguf}")
    if os.path.exists(a.out) and (not os.path.isdir(a.out) or os.listdir(a.out)):
        sys.exit(f"from_gguf: {a.out} exists and is not an empty folder; name a new one")
    convert(a.gguf, a.out, a.dtype)


if __name__ == "__main__":
    main()
