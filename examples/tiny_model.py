"""Build a tiny random GPT-2 (2 layers, 32 wide) and a byte-level BPE tokenizer trained on oaif's
built-in prompts, offline, into a folder that `from_pretrained` loads like any hub model. The tests
and the examples' --tiny flag use it; it is also the quickest way to try oaif with no download. Also
the examples' shared helpers: --model / --tiny / --out (resolve), a finished arm (finished).

    python examples/tiny_model.py /tmp/tiny && python oaif.py --model /tmp/tiny --lr 3e-3 --steps 60
"""

import dataclasses
import hashlib
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import oaif  # noqa: E402

EOS = "<|endoftext|>"


def build_tiny_model(
    path: str,
    vocab_size: int = 400,
    n_positions: int = 1024,
    seed: int = 0,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 2,
    model_vocab: int = 0,
    embed_std: float = 0.02,
) -> str:
    """Save a random GPT-2 and its byte-level BPE tokenizer to `path`; returns `path`. `model_vocab`
    pads the model's vocabulary (ids past the tokenizer's decode to nothing): 50257 gives GPT-2's
    LM-head cost. `embed_std`: the (tied) token embeddings' scale. At GPT-2's init, 0.02, the final
    hidden state of a 32-wide model has a dot product under 1 with EOS's embedding, so blocks alone
    (LoRA) cannot make EOS likely; 0.2 is nearer a trained model's scale (gpt2's own embeddings: std
    0.14 over 768 dims)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from transformers.utils import logging

    logging.disable_progress_bar()  # "Writing model shards" for a 100 KB file

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(  # no progress bar: off a terminal it prints blank lines
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(oaif.DEFAULT_PROMPTS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=max(len(tokenizer), model_vocab),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    model = GPT2LMHeadModel(config)
    scale = embed_std / config.initializer_range
    model.transformer.wte.weight.data.mul_(scale)  # the same draw, rescaled
    model.save_pretrained(path)
    return path


def new_run_folder(root: str) -> str:
    """ROOT/run-N, N one past the highest there: each invocation its own folder, none reused."""
    os.makedirs(root, exist_ok=True)
    while True:
        runs = [re.fullmatch(r"run-(\d+)", name) for name in os.listdir(root)]
        done = [int(m.group(1)) for m in runs if m]
        path = os.path.join(root, f"run-{max(done, default=0) + 1}")
        try:
            os.mkdir(path)  # two invocations at once: the second takes the next number
            return path
        except FileExistsError:
            continue


def resolve(parser, args, name: str) -> tuple:
    """The examples' --model / --tiny / --out / --lr -> (model path, output folder, learning rate).
    No --out: a new oaif-out/NAME/run-N each time (printed), so the same command runs again; --out
    DIR: that folder, where an arm already finished with the same flags is read, not run again."""
    if not args.model and not args.tiny:
        parser.error("give --model or --tiny")
    out = args.out or new_run_folder(os.path.join("oaif-out", name))
    os.makedirs(out, exist_ok=True)
    print(f"output: {out}", flush=True)
    model = build_tiny_model(os.path.join(out, "tiny")) if args.tiny else args.model
    return model, out, args.lr if args.lr is not None else 3e-3 if args.tiny else 1e-5


def finished(argv: list) -> bool:
    """Did oaif.py run with these very flags finish in their --output-dir (its oaif_config.json)?"""
    cfg = dataclasses.asdict(oaif.parse_args(argv))
    path = os.path.join(cfg["output_dir"], "oaif_config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        saved = {"judge_question": "", **json.load(f)}  # older runs: none
    if cfg["beta"] is None:  # as the run saved it
        cfg["beta"] = oaif.DEFAULT_BETA[cfg["loss"]]
    for k in ("prompts", "offline_data"):  # the same file name, other contents: run again
        if f"{k}_sha256" in saved and os.path.isfile(cfg[k]):
            with open(cfg[k], "rb") as f:
                cfg[f"{k}_sha256"] = hashlib.sha256(f.read()).hexdigest()[:16]
    free = ("sample_every", "resume", "overwrite")  # they do not change what the run learns
    # An hf: judge before df3cb60 added no "long?" less "short?" to its own question, before
    # 31c160e (judge_weighs_length true) weighed it a third as much, and before 7b96f0e (configs
    # with judge_debias) took 0.25 x "good?" off any: another judge.
    hf = [j[:3] for j in (cfg["annotator"], cfg["eval_annotator"])]
    own = not cfg["judge_question"].strip() or "judge_debias" in saved
    new = saved.get("judge_weighs_length") == oaif.LENGTH_SCALE
    if not new and cfg["instruction"].strip() and "hf:" in hf and own:
        return False
    return all(saved.get(k) == v for k, v in cfg.items() if k not in free)


def build_gpt2_small(path: str, seed: int = 0) -> str:
    """A random GPT-2 small (GPT2Config's default: 124M parameters, 12 x 768, V 50257)."""
    return build_tiny_model(path, seed=seed, n_embd=768, n_layer=12, n_head=12, model_vocab=50257)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path")
    p.add_argument("--gpt2-small", action="store_true", help="GPT-2 small's size (124M), not tiny")
    p.add_argument(
        "--embed-std", type=float, default=0.02, help="embeddings' scale (0.2: for LoRA)"
    )
    a = p.parse_args()
    print(
        build_gpt2_small(a.path)
        if a.gpt2_small
        else build_tiny_model(a.path, embed_std=a.embed_std)
    )
