"""Build a tiny random GPT-2 (2 layers, 32 wide) and a byte-level BPE tokenizer trained on oaif's built-in
prompts, offline, into a folder that `from_pretrained` loads like any hub model. The tests and the examples'
--tiny flag use it; it is also the quickest way to try oaif with no download.

    python examples/tiny_model.py /tmp/tiny && python oaif.py --model /tmp/tiny --lr 3e-3 --steps 60
"""
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import oaif  # noqa: E402


def build_tiny_model(path: str, vocab_size: int = 400, n_positions: int = 1024, seed: int = 0, n_embd: int = 32,
                     n_layer: int = 2, n_head: int = 2, model_vocab: int = 0, embed_std: float = 0.02) -> str:
    """Save a random GPT-2 and its byte-level BPE tokenizer to `path`; returns `path`. `model_vocab` pads
    the model's vocabulary (ids past the tokenizer's decode to nothing): 50257 gives GPT-2's LM-head cost.
    `embed_std`: the (tied) token embeddings' scale. At GPT-2's init, 0.02, the final hidden state of a
    32-wide model has a dot product under 1 with EOS's embedding, so blocks alone (LoRA) cannot make EOS
    likely; 0.2 is nearer a trained model's scale (gpt2's own embeddings: std 0.14 over 768 dims)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(oaif.DEFAULT_PROMPTS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=max(len(tokenizer), model_vocab), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=eos, eos_token_id=eos)
    model = GPT2LMHeadModel(config)
    model.transformer.wte.weight.data.mul_(embed_std / config.initializer_range)  # the same draw, rescaled
    model.save_pretrained(path)
    return path


def resolve(parser, args, prefix: str) -> tuple:
    """The examples' --model / --tiny / --out / --lr -> (model path, output folder, learning rate)."""
    if not args.model and not args.tiny:
        parser.error("give --model or --tiny")
    out = args.out or tempfile.mkdtemp(prefix=prefix)
    model = build_tiny_model(os.path.join(out, "tiny")) if args.tiny else args.model
    return model, out, args.lr if args.lr is not None else 3e-3 if args.tiny else 1e-5


def build_gpt2_small(path: str, seed: int = 0) -> str:
    """A random GPT-2 small (the default GPT2Config: 124M parameters, 12 x 768, V = 50257): gpt2's compute."""
    return build_tiny_model(path, seed=seed, n_embd=768, n_layer=12, n_head=12, model_vocab=50257)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path")
    p.add_argument("--gpt2-small", action="store_true", help="GPT-2 small's size (124M) instead of tiny")
    p.add_argument("--embed-std", type=float, default=0.02, help="token embeddings' scale (0.2: enough for LoRA)")
    a = p.parse_args()
    print(build_gpt2_small(a.path) if a.gpt2_small else build_tiny_model(a.path, embed_std=a.embed_std))
