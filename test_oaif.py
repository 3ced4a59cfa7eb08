"""Tests for oaif.py: oracles for the math, a tiny random GPT-2 built offline for everything else,
and a stand-in Messages API on 127.0.0.1 for the Claude annotator (the real anthropic SDK, over real
HTTP).

    python -m pytest -q test_oaif.py
"""

import json
import math
import os
import shutil
import subprocess
import sys
import time
import timeit

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import oaif

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "examples"))
from standin_messages_api import StandInMessagesAPI  # noqa: E402  (POST /v1/messages on 127.0.0.1)
from tiny_model import build_tiny_model  # noqa: E402  (a random GPT-2 + BPE tokenizer, built offline)

try:
    import peft
except ImportError:  # optional (--lora-rank): requirements.txt leaves it out, CI installs it
    peft = None
needs_peft = pytest.mark.skipif(
    peft is None, reason="needs peft (pip install peft) for --lora-rank"
)


# --------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture
def model_tok(tiny):
    return oaif.load_model(tiny, torch.device("cpu"))


def read_metrics(out_dir) -> list:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_args(tiny, out, *extra) -> list:
    args = ["--model", tiny, "--output-dir", str(out), "--annotator", "shorter", "--steps", "2"]
    args += ["--batch-size", "4", "--max-new-tokens", "8", "--lr", "1e-3", "--sample-every", "0"]
    return args + list(extra)


# --------------------------------------------------------------------------------------------------
# Losses: values at hand-computed points and gradient signs


def logps(h: float):
    """Four (1,) log-prob tensors with margin h (policy_chosen carries it), policy ones requiring
    grad."""
    pc, pr = torch.tensor([h - 3.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True)
    return pc, pr, torch.tensor([-3.0]), torch.tensor([-5.0])


def test_dpo_at_zero_margin_is_log2():
    assert oaif.dpo_loss(*logps(0.0), beta=0.1).item() == pytest.approx(math.log(2))
    assert oaif.dpo_loss(*logps(10.0), beta=0.1).item() == pytest.approx(
        math.log(1 + math.exp(-1.0))
    )


def test_ipo_minimum_at_half_over_beta():
    beta = 0.25
    at_min = oaif.ipo_loss(*logps(1 / (2 * beta)), beta=beta)
    assert at_min.item() == pytest.approx(0.0, abs=1e-12)
    assert oaif.ipo_loss(*logps(0.0), beta=beta).item() == pytest.approx(4.0)
    pc = logps(1 / (2 * beta))[0]
    oaif.ipo_loss(pc, *logps(1 / (2 * beta))[1:], beta=beta).sum().backward()
    assert pc.grad.item() == pytest.approx(0.0, abs=1e-6)


def test_slic_hinge():
    beta = 0.002
    assert oaif.slic_loss(*logps(0.0), beta=beta).item() == pytest.approx(1.0)
    assert oaif.slic_loss(*logps(250.0), beta=beta).item() == pytest.approx(0.5)
    assert oaif.slic_loss(*logps(600.0), beta=beta).item() == 0.0  # past the hinge at 1/beta = 500


@pytest.mark.parametrize("name", ["dpo", "ipo", "slic"])
def test_loss_gradient_signs(name):
    pc, pr, rc, rr = logps(0.0)
    loss = oaif.LOSSES[name](pc, pr, rc, rr, oaif.DEFAULT_BETA[name])
    assert loss.shape == (1,)
    loss.sum().backward()
    # descent raises the chosen log-prob, lowers the rejected
    assert pc.grad.item() < 0 < pr.grad.item()


@pytest.mark.parametrize("h,p", [(0.0, 0.7), (2.0, 0.9), (-3.0, 0.6)])
def test_soft_label_losses_at_hand_points(h, p):
    def s(x):
        return 1 / (1 + math.exp(-x))

    b = 0.5

    assert oaif.dpo_loss(*logps(h), beta=b, label_p=p).item() == pytest.approx(
        -p * math.log(s(b * h)) - (1 - p) * math.log(s(-b * h))
    )
    assert oaif.ipo_loss(*logps(h), beta=b, label_p=p).item() == pytest.approx(
        (h - (2 * p - 1) / (2 * b)) ** 2
    )
    assert oaif.slic_loss(*logps(h), beta=0.2, label_p=p).item() == pytest.approx(
        p * max(0, 1 - 0.2 * h) + (1 - p) * max(0, 1 + 0.2 * h)
    )
    # a (B,) tensor of labels; p = 1 is the hard loss exactly, p = 1/2 has its minimum at h = 0
    x = [torch.tensor([h, h]) for h in (1.0, -2.0, 0.5, 0.25)]
    for name in ("dpo", "ipo", "slic"):
        loss = oaif.LOSSES[name]
        assert torch.equal(loss(*x, beta=0.3, label_p=torch.tensor([1.0, 1.0])), loss(*x, beta=0.3))
        pc, zeros = torch.tensor([0.0], requires_grad=True), [torch.zeros(1) for _ in range(3)]
        loss(pc, *zeros, beta=0.3, label_p=0.5).sum().backward()
        # the hinge is flat there
        assert pc.grad.item() == pytest.approx(0.0, abs=1e-7) or name == "slic"


def test_losses_reject_bad_shapes():
    with pytest.raises(AssertionError):
        oaif.dpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(2))


# --------------------------------------------------------------------------------------------------
# fused_logprobs against log_softmax + gather in float64


def oracle_logprobs(hidden, weight, labels, temperature=1.0):
    logits = hidden.double() @ weight.double().T / temperature
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp.masked_fill(labels == -100, 0.0)


def check_against_oracle(N, H, V, chunk, temperature=1.0, dtype=torch.float32, tol=1e-5, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g).mul(0.5).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::3] = -100
    upstream = torch.randn(N, generator=g)
    out = oaif.fused_logprobs(hidden, weight, labels, temperature, chunk)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    assert torch.all(out[labels == -100] == 0)
    (out * upstream).sum().backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = oracle_logprobs(h64, w64, labels, temperature)
    (ref * upstream.double()).sum().backward()

    def scale(t):  # relative to the size of what is compared
        return 1 + t.abs().max().item()

    assert (out.double() - ref).abs().max().item() <= tol * scale(ref)
    assert (hidden.grad.double() - h64.grad).abs().max().item() <= tol * scale(h64.grad)
    assert (weight.grad.double() - w64.grad).abs().max().item() <= tol * scale(w64.grad)
    assert weight.grad.dtype == weight.dtype and hidden.grad.dtype == hidden.dtype


@pytest.mark.parametrize("chunk", [None, 1, 7, 64, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_logprobs_matches_float64(chunk, temperature):
    check_against_oracle(N=50, H=16, V=97, chunk=chunk, temperature=temperature)


def test_fused_logprobs_bf16_inputs():
    # bf16 hidden states: logits are rounded to bf16 (8-bit mantissa) before the float32 logsumexp,
    # so the values and gradients are good to about 1e-2 relative, like any bf16 matmul.
    check_against_oracle(N=40, H=32, V=211, chunk=16, dtype=torch.bfloat16, tol=3e-2)


class OutputShapes(TorchDispatchMode):
    """Records the shape and dtype of every tensor each aten op returns."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.seen += [
            (tuple(t.shape), t.dtype)
            for t in (out if isinstance(out, (tuple, list)) else [out])
            if isinstance(t, torch.Tensor)
        ]
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_head_backward_makes_no_head_gradient(dtype):
    # LoRA freezes the LM head: its backward must neither allocate nor write the float32 (V, H)
    # gradient buffer, and grad_h must be bit-identical to a trainable head's (itself checked
    # against float64 above).
    N, H, V = 40, 24, 211
    hidden, weight = torch.randn(N, H).to(dtype), torch.randn(V, H) * 0.5
    labels = torch.randint(0, V, (N,))
    grads, shapes = [], []
    for trainable in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(trainable)
        out = oaif.fused_logprobs(h, w, labels, chunk_size=16)
        with OutputShapes() as rec:
            out.sum().backward()
        grads.append(h.grad)
        shapes.append(rec.seen.count(((V, H), torch.float32)))
        assert (w.grad is not None) == trainable
    assert torch.equal(grads[0], grads[1])
    # the first: the recorder sees the buffer when there is one
    assert shapes[0] > 0 and shapes[1] == 0


def test_fused_logprobs_batch_dims_and_all_ignored():
    hidden, weight = torch.randn(2, 5, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (2, 5))
    out = oaif.fused_logprobs(hidden, weight, labels, chunk_size=3)
    assert torch.allclose(out.double(), oracle_logprobs(hidden, weight, labels), atol=1e-5)
    none = oaif.fused_logprobs(hidden, weight, torch.full((2, 5), -100))
    assert none.shape == (2, 5) and torch.all(none == 0)


def hf_sequence_logprobs(model, ids, mask, resp):
    """The oracle: the model's own logits and cross-entropy over the response tokens."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, :-1].float()
    labels = ids[:, 1:].masked_fill(resp[:, 1:] == 0, -100)
    ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return -ce.sum(-1)


def test_sequence_logprobs_matches_hf_cross_entropy_and_tied_gradient(model_tok):
    model, tok = model_tok
    prompts = [tok("Explain why the sky is blue.").input_ids, tok("Hi").input_ids]
    batch = oaif.pair_batch(
        prompts, [[5, 6, 7], [9]], [[8], [10, 11, 12, 13]], tok.pad_token_id, "cpu"
    )
    ids, mask, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    ours = oaif.sequence_logprobs(model, ids, mask, resp)
    ours.sum().backward()
    grad_ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = hf_sequence_logprobs(model, ids, mask, resp)
    ref.sum().backward()
    assert ours.shape == (4,)
    assert torch.allclose(ours, ref, atol=1e-4)
    # GPT-2 ties it to the LM head: the head's gradient must land here too
    wte = "transformer.wte.weight"
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert torch.allclose(grad_ours[wte], model.transformer.wte.weight.grad, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(grad_ours[n], p.grad, atol=1e-5), n


# --------------------------------------------------------------------------------------------------
# Sampling


def test_response_mask_stops_after_first_eos():
    resp = torch.tensor([[4, 0, 5, 0], [4, 5, 6, 7], [0, 3, 3, 3]])
    mask = oaif.response_mask_after_eos(resp, [0])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_sample_pairs_shapes_eos_and_texts(model_tok):
    model, tok = model_tok
    torch.manual_seed(0)
    s = oaif.sample_pairs(model, tok, ["Why do we dream?", "Hi"], n=2, max_new_tokens=12)
    assert s["input_ids"].shape[0] == 4 and len(s["texts"]) == 4
    P = s["input_ids"].shape[1] - 12
    resp, rmask = s["input_ids"][:, P:], s["response_mask"][:, P:]
    eos = tok.eos_token_id
    for r, m, text, n in zip(resp, rmask, s["texts"], s["response_tokens"]):
        k = int(m.sum())
        assert n == k and m[:k].all() and not m[k:].any()  # one contiguous response
        if k < 12:
            assert r[k - 1] == eos  # a response shorter than the cap ends with its EOS
        assert eos not in r[: k - 1].tolist()  # and has none before
        # a response cut at the cap says so to the annotator
        cut = "" if r[k - 1] == eos else oaif.CUT
        assert text == tok.decode(r[:k], skip_special_tokens=True) + cut
    assert torch.equal(s["attention_mask"][:, P:], rmask)  # nothing after EOS is attended


def test_left_padded_batch_generates_like_single_prompts(model_tok):
    model, tok = model_tok
    prompts = ["Explain recursion to a child.", "Hi"]
    batched = oaif.sample_pairs(model, tok, prompts, n=1, max_new_tokens=10, temperature=0)["texts"]
    alone = [
        oaif.sample_pairs(model, tok, [p], n=1, max_new_tokens=10, temperature=0)["texts"][0]
        for p in prompts
    ]
    assert batched == alone


def test_chat_template_is_used_when_present(model_tok):
    _, tok = model_tok
    tok.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    )
    assert oaif.encode_prompts(tok, ["hello"]) == [tok("<user>hello<assistant>").input_ids]


# --------------------------------------------------------------------------------------------------
# Annotators that need no network


def test_shorter_and_both_orders():
    assert oaif.shorter(["x"] * 3, ["ab", "abc", "ab"], ["abc", "ab", "cd"]) == [1.0, 0.0, 0.5]
    assert oaif.longer(["x"] * 3, ["ab", "abc", "ab"], ["abc", "ab", "cd"]) == [0.0, 1.0, 0.5]

    def biased(p, a, b):  # always prefers whatever it sees first
        return [1.0] * len(p)

    assert oaif.both_orders(biased, ["x", "y"], ["a", "b"], ["c", "d"]) == [0.5, 0.5]

    def fair(p, a, b):
        return oaif.shorter(p, a, b)

    assert oaif.both_orders(fair, ["x", "y"], ["a", "bbb"], ["cc", "d"]) == [1.0, 0.0]


@pytest.mark.parametrize(
    "reply,verdict",
    [
        ("Response 1 is clearer.\nPreferred Response=1", 1.0),
        ("Preferred Response=2.", 0.0),
        ("2", 0.0),
        ("**Preferred Summary=1**", 1.0),
        ("I rate them 10 and 12", None),
        ("Both are fine.", None),
        ("", None),
        ("Preferred Response=3", None),
        ("1 is better than 2 but I can't decide", None),
        ("Preferred Response=1, not Response 2.", 1.0),
        ("Preferred Response=1 (over Response 2)", 1.0),
        ("**Preferred Response:** 2", 0.0),
        ("Preferred response = **1**\n\nNote on 2", 1.0),
        ("Response 2 rambles. Preferred Response=1. Preferred Response=2", 0.0),
        ("Preferred Response=", None),
        ("Response 1 is clearly better than Response 2.", None),
        ("Both are weak, but 1 edges out 2", None),
        ("**2**", 0.0),
        ("Preferred Response = Response 2", 0.0),
        ("Preferred: 2", 0.0),
        ("Preferred response: 2", 0.0),
        ("**Preferred:** Response 1", 1.0),
        ("Preference: 1", 1.0),
        ("Preferred = **2**", 0.0),
        ("Response 2 is preferred because it is shorter", None),
        ("1 beats 2", None),
        ("My preference for 1 over 2 is weak", None),
        ("Unpreferred: 2", None),
        ("Preferred: neither", None),
        ("Preferred Response=1. Response 2 is preferred by some", 1.0),
        ("Preferred Response=1 (some readers may prefer Response 2's detail)", 1.0),
        (
            "Preferred Response=2\nReaders who prefer response 1's tone would still find it wrong.",
            0.0,
        ),
        ("Preferred Response=1. I prefer responses that get to the point.", 1.0),
    ],
)
def test_parse_verdict(reply, verdict):
    assert oaif.parse_verdict(reply) == verdict


def test_position_biased_annotator_trains_nothing(tiny, tmp_path):
    cfg = oaif.parse_args(run_args(tiny, tmp_path))
    before = oaif.load_model(tiny, torch.device("cpu"))[0].state_dict()

    def biased(p, a, b):
        return oaif.both_orders(lambda p, a, b: [1.0] * len(p), p, a, b)

    out = oaif.train(cfg, annotator=biased)
    rows = read_metrics(tmp_path)
    assert [r["pairs"] for r in rows] == [0, 0] and [r["dropped"] for r in rows] == [4, 4]
    assert not any(r["updated"] for r in rows) and out["summary"]["ties"] == 8
    after = oaif.load_model(str(tmp_path), torch.device("cpu"))[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------------------------------
# The online loop end to end


def test_online_loop_learns_shorter_responses(tiny, tmp_path):
    """The issue's bar: tiny GPT-2, `shorter`, lr 3e-3, 60 steps of 8 prompts, 32 new tokens: the
    mean response length of the last 5 steps is under half that of the first 5."""
    flags = "--annotator shorter --lr 3e-3 --steps 60 --batch-size 8 --max-new-tokens 32"
    oaif.main(
        ["--model", tiny, "--output-dir", str(tmp_path), *flags.split(), "--sample-every", "0"]
    )
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 61))
    first = sum(r["response_chars"] for r in rows[:5]) / 5
    last = sum(r["response_chars"] for r in rows[-5:]) / 5
    assert last < first / 2, (first, last)
    assert all(r["pairs"] + r["dropped"] == 8 for r in rows)
    assert sum(r["pairs"] for r in rows) > 0.5 * 8 * 60
    assert rows[-1]["kl"] > 0  # the policy moved away from the reference on its own samples
    for key in (
        "loss",
        "reward_margin",
        "reward_accuracy",
        "response_tokens",
        "seconds",
        "sample_s",
        "annotate_s",
        "train_s",
    ):
        assert all(math.isfinite(r[key]) for r in rows), key


def test_output_reloads_and_config_saved(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    oaif.main(run_args(tiny, tmp_path, "--loss", "ipo"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    AutoTokenizer.from_pretrained(str(tmp_path))
    initial = AutoModelForCausalLM.from_pretrained(tiny)
    changed = [not torch.equal(a, b) for a, b in zip(model.parameters(), initial.parameters())]
    assert any(changed)
    saved = json.load(open(tmp_path / "oaif_config.json"))
    assert saved["loss"] == "ipo" and saved["beta"] == 1.0 and saved["annotator"] == "shorter"


@pytest.mark.parametrize("loss", ["dpo", "slic"])
def test_bf16_and_average_logps_run(tiny, tmp_path, loss):
    # every response n = 8 tokens (7 + the end token): at step 1 (h = 0, both losses linear in h
    # there) averaging divides each log-prob, so the whole gradient, by n; the loss is unchanged
    # (h = 0 either way)
    tok = oaif.load_model(tiny, torch.device("cpu"))[1]
    texts = ["Yes, it is.", "Write a haiku.", "Explain recursion."]
    assert {len(tok(t, add_special_tokens=False).input_ids) for t in texts} == {7}
    rows = [
        {"prompt": f"Question {i}?", "chosen": texts[i % 3], "rejected": texts[(i + 1) % 3]}
        for i in range(4)
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {}
    pairs = str(tmp_path / "pairs.jsonl")
    for avg in ([], ["--average-logps"]):
        out = tmp_path / str(len(avg))
        extra = ["--steps", "1", "--dtype", "bfloat16", "--loss", loss, "--offline-data", pairs]
        oaif.main(run_args(tiny, out, *extra, *avg))
        runs[bool(avg)] = read_metrics(out)[0]
    assert runs[True]["loss"] == runs[False]["loss"] and math.isfinite(runs[True]["loss"])
    # 8: exact in bf16 too
    assert runs[True]["grad_norm"] == pytest.approx(runs[False]["grad_norm"] / 8, rel=1e-6)


def test_parse_args_round_trip():
    cfg = oaif.parse_args(
        ["--model", "m", "--steps", "3", "--loss", "ipo", "--beta", "0.5", "--offline"]
    )
    assert (cfg.model, cfg.steps, cfg.loss, cfg.beta, cfg.offline) == ("m", 3, "ipo", 0.5, True)
    assert oaif.parse_args([]) == oaif.Config()


def bad_run(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        oaif.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("oaif: error: ") and "\n" not in msg
    assert "Traceback" not in capsys.readouterr().err
    return msg


def test_bad_inputs_give_one_line(tiny, tmp_path, capsys):
    out = tmp_path / "out"

    def bad_prompts(name):
        return bad_run(run_args(tiny, out, "--prompts", str(tmp_path / name)), capsys)

    assert "not found" in bad_prompts("nope.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    assert "empty" in bad_prompts("empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert "bad.jsonl:2" in bad_prompts("bad.jsonl")
    (tmp_path / "long.txt").write_text("word " * 2000 + "\n")
    assert "context" in bad_prompts("long.txt")
    assert "cannot load model" in bad_run(run_args(str(tmp_path / "no-model"), out), capsys)
    assert "unknown --loss" in bad_run(run_args(tiny, out, "--loss", "ppo"), capsys)
    assert not out.exists()  # nothing half-written
    (tmp_path / "a_file").write_text("")
    assert "Not a directory" in bad_run(run_args(tiny, tmp_path / "a_file" / "out"), capsys)


def test_prompts_files(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "one", "id": 1}\n{"prompt": "two"}\n')
    txt, jsonl = (oaif.load_prompts(str(tmp_path / name)) for name in ("p.txt", "p.jsonl"))
    assert txt == jsonl == ["one", "two"]
    assert len(oaif.load_prompts("")) >= 32
    # line 3, after a blank line
    (tmp_path / "bad.jsonl").write_text('{"prompt": "one"}\n\n{"prompt": 7}\n')
    with pytest.raises(oaif.OAIFError, match="bad.jsonl:3: "):
        oaif.load_prompts(str(tmp_path / "bad.jsonl"))


def test_files_with_a_byte_order_mark_read_as_their_text(tmp_path):
    # Notepad and Excel start UTF-8 files with a BOM: it is no part of the first prompt or pair.
    bom = "\ufeff".encode()
    (tmp_path / "p.txt").write_bytes(bom + "one\ntwo\n".encode())
    (tmp_path / "p.jsonl").write_bytes(bom + '{"prompt": "one"}\n{"prompt": "two"}\n'.encode())
    for name in ("p.txt", "p.jsonl"):
        assert oaif.load_prompts(str(tmp_path / name)) == ["one", "two"]
    pair = '{"prompt": "Why?", "chosen": "Because.", "rejected": "No."}\n'
    (tmp_path / "d.jsonl").write_bytes(bom + pair.encode())
    rows = oaif.read_lines(str(tmp_path / "d.jsonl"), "offline data", ("prompt", "chosen"), "x")
    assert rows == [(1, ("Why?", "Because."))]
    # A byte that is not UTF-8 is named by its line, past the BOM and past any read buffer.
    (tmp_path / "bad.txt").write_bytes(bom + b"one\n" * 5000 + b"caf\xe9\n")
    with pytest.raises(oaif.OAIFError, match=r"bad.txt:5001 is not"):
        oaif.load_prompts(str(tmp_path / "bad.txt"))


# --------------------------------------------------------------------------------------------------
# Claude annotator: the real anthropic SDK against a stand-in Messages API on 127.0.0.1


@pytest.fixture
def api():
    servers = []

    def start(**kw):
        servers.append(StandInMessagesAPI(**kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


PAIRS = (["q1", "q2"], ["short", "a much longer answer"], ["a longer answer", "tiny"])


def test_claude_labels_whichever_order(api):
    server = api()
    claude = oaif.ClaudeAnnotator(client=server.client())
    assert claude(*PAIRS) == [1.0, 0.0]
    assert server.requests == 4  # both orders of both pairs
    assert claude(*PAIRS) == [1.0, 0.0] and server.requests == 4  # the second time from the cache
    assert claude.stats["annotator_requests"] == 4 and claude.stats["output_tokens"] == 36
    # identical: a tie, no call, and no pair for the order statistics (none was asked)
    health = {k: claude.stats[k] for k in ("order_pairs", "first_sum", "order_agree")}
    assert claude(["q"], ["same"], ["same"]) == [0.5] and server.requests == 4
    assert health == {k: claude.stats[k] for k in health}


def test_claude_reply_cut_off_at_max_tokens_is_no_verdict(api):
    server = api(
        reply=lambda a, b: "Response 1 is short, while Response 2", stop_reason="max_tokens"
    )
    claude = oaif.ClaudeAnnotator(client=server.client())
    assert claude(*PAIRS) == [None, None] and claude.stats["annotator_failures"] == 4
    assert claude(*PAIRS) == [None, None] and server.requests == 8  # not cached: asked again


def test_claude_always_answering_1_gives_only_ties(api):
    claude = oaif.ClaudeAnnotator(client=api(reply=lambda a, b: "Preferred Response=1").client())
    assert claude(*PAIRS) == [0.5, 0.5]


@pytest.mark.parametrize("fault", [529, 429, 500])
def test_claude_transient_faults_are_retried(api, fault):
    server = api(faults=[fault, fault])
    claude = oaif.ClaudeAnnotator(client=server.client(max_retries=3), max_workers=1)
    assert claude(*PAIRS) == [1.0, 0.0]
    assert server.requests == 6 and claude.stats["annotator_failures"] == 0


def test_claude_server_always_failing_gives_no_verdicts(api):
    server = api(always=529)
    claude = oaif.ClaudeAnnotator(client=server.client(max_retries=1))
    assert claude(*PAIRS) == [None, None]
    # 4 requests, each tried twice
    assert claude.stats["annotator_failures"] == 4 and server.requests == 8


@pytest.mark.parametrize(
    "reply", ["", "I cannot decide.", "Preferred Response=3", "1 or 2? both good"]
)
def test_claude_malformed_replies_give_no_verdicts(api, reply):
    claude = oaif.ClaudeAnnotator(client=api(reply=lambda a, b: reply).client())
    assert claude(*PAIRS) == [None, None] and claude.stats["annotator_failures"] == 4


def test_claude_requests_run_concurrently(api):
    server = api(delay=0.5)
    claude = oaif.ClaudeAnnotator(client=server.client(), max_workers=16)
    firsts = [f"answer {'x' * i}" for i in range(8)]
    seconds = [f"reply {'y' * (20 - i)}" for i in range(8)]
    t = time.perf_counter()
    assert claude([f"q{i}" for i in range(8)], firsts, seconds) == [1.0] * 8
    elapsed = time.perf_counter() - t
    assert server.requests == 16 and server.peak >= 8  # 16 x 0.5 s would be 8 s one at a time
    assert elapsed < 8, elapsed


@pytest.mark.parametrize("status", [401, 404])
def test_claude_unrecoverable_errors_stop_with_one_line(api, status):
    server = api(always=status)
    claude = oaif.ClaudeAnnotator(client=server.client())
    with pytest.raises(oaif.OAIFError, match=str(status)) as e:
        claude(*PAIRS)
    assert "\n" not in str(e.value) and "test-key" not in str(e.value)
    assert server.requests <= 4  # not retried


def test_claude_missing_key_stops_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    msg = bad_run(["--model", str(tmp_path / "not-loaded"), "--annotator", "claude"], capsys)
    assert "ANTHROPIC_API_KEY" in msg  # the model path is bad too: the key is checked first


def run_cli(args, env_extra, timeout=120):
    env = dict(os.environ, **env_extra)
    return subprocess.run(
        [sys.executable, os.path.join(HERE, "oaif.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=HERE,
    )


def test_cli_with_claude_end_to_end(api, tiny, tmp_path):
    server = api()
    key = "sk-ant-secret-0123456789"
    out = tmp_path / "run"
    flags = "--steps 3 --batch-size 4 --max-new-tokens 8 --lr 1e-3"
    args = ["--model", tiny, "--output-dir", str(out), *flags.split()]
    args += ["--instruction", "Prefer the shorter response.", "--eval-every", "3"]
    args += ["--eval-prompts", "4", "--eval-annotator", "claude", "--temperature", "1.5"]
    args += ["--eval-annotator-model", "claude-judge-x"]
    r = run_cli(args, {"ANTHROPIC_API_KEY": key, "ANTHROPIC_BASE_URL": server.url})
    assert r.returncode == 0, r.stderr
    rows = [r for r in read_metrics(out) if not r.get("eval")]
    # the SDK sent our key
    assert len(rows) == 3 and server.keys and all(key in k for k in server.keys)
    # training's judge, and the evaluation's
    assert server.models == {"claude-haiku-4-5", "claude-judge-x"}
    training_requests = server.requests - server.by_model["claude-judge-x"]
    assert sum(row["annotator_requests"] for row in rows) == training_requests
    assert all(row["pairs"] + row["dropped"] == 4 for row in rows)
    assert sum(row["pairs"] for row in rows) > 0
    assert "requests" in r.stderr and "annotator: claude" in r.stderr
    files = "".join(p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file())
    assert key not in r.stdout + r.stderr + files


def test_cli_stops_on_bad_key(api, tiny, tmp_path, capsys, monkeypatch):
    server = api(always=401)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "bad")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
    args = ["--model", tiny, "--output-dir", str(tmp_path / "run"), "--steps", "3"]
    args += ["--batch-size", "2", "--max-new-tokens", "8", "--annotator", "claude"]
    # in this process (the end-to-end test above runs the CLI's own): the status, the API's words
    msg = bad_run(args, capsys)
    assert msg.startswith(
        "oaif: error: the Claude API refused the annotator's request: 401 stand-in"
    )


@pytest.mark.parametrize("opposite", ["", " Is this a long response?"])
def test_local_judge_is_pointwise_yes_no_log_odds(model_tok, opposite):
    model, tok = model_tok
    concise, long = "Is this a concise response?", "Is this a long response?"
    judge = oaif.LocalJudgeAnnotator(model, tok, "tldr", "Be brief.", question=concise + opposite)
    assert judge.questions == [concise, long][: 1 + bool(opposite)]
    assert oaif.LocalJudgeAnnotator(model, tok, "tldr").questions == ["Is this a good summary?"]
    prompts, a, b = (
        ["Why do we dream?", "Hi"],
        ["Because.", "Hello there, how are you?"],
        ["Nobody knows.", "Hey"],
    )

    def plain(question):  # each whole input alone, unpadded, uncached, the model's own logits
        yes, no = judge.words  # the first token of each answer as it follows the input (below)
        ids = [tok(judge.ask(p, r, question)).input_ids for p, r in zip(prompts + prompts, a + b)]
        with torch.no_grad():
            last = [model(torch.tensor([x])).logits[0, -1] for x in ids]
        return ids, [float(lg[yes] - lg[no]) for lg in last]

    (ids, s), (l_ids, sl) = plain(concise), plain(long)
    # the examples' KV cache, then each response's, then each question from a copy: the same
    # log-odds as every whole input read alone
    both = judge.scores(prompts + prompts, a + b, [concise, long])
    assert both.shape == (4, 2) and both.flatten().tolist() == pytest.approx(
        [x for pair in zip(s, sl) for x in pair], abs=1e-5
    )
    # with an opposite, its log-odds come off
    s = [x - y for x, y in zip(s, sl)] if opposite else s
    p_ab = judge(prompts, a, b)
    assert p_ab == pytest.approx([1 / (1 + math.exp(s[i + 2] - s[i])) for i in range(2)], abs=1e-5)
    assert judge(prompts, b, a) == pytest.approx([1 - p for p in p_ab], abs=1e-6)  # order-blind
    assert judge(["x"], ["same"], ["same"]) == [0.5] and judge([], [], []) == []
    with pytest.raises(oaif.OAIFError, match="over the judge's context of 1024 tokens"):
        judge(["x"], ["word " * 1100], ["y"])
    # one request per response and question, its input counted as read whole, none per order
    k = len(judge.questions)
    assert judge.stats["annotator_requests"] == 8 + k * (4 + 4 + 2)
    same = [len(tok(judge.ask("x", "same", q)).input_ids) for q in (concise, long)]
    read = [sum(map(len, ids)), sum(map(len, l_ids))]
    assert judge.stats["input_tokens"] == sum(read) + 2 * (sum(read[:k]) + sum(same[:k]))


def test_local_judge_scores_the_tokens_of_each_whole_input():
    # SentencePiece as Llama and Mistral use it: text tokenized alone starts with a word-start piece
    # ("▁Why"), in the whole input after "\n\n" it does not ("Why"): the cached parts (the examples,
    # the response) must not change the tokens
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    sp = Tokenizer(models.BPE(byte_fallback=True))
    newline = pre_tokenizers.Split("\n", "isolated")  # a piece of its own, as Llama's <0x0A>
    sp.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(prepend_scheme="first"), newline]
    )
    sp.train_from_iterator(
        oaif.DEFAULT_PROMPTS + ["Conversation:\nWhy Yes No"] * 4,
        trainers.BpeTrainer(vocab_size=300),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=sp)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2)).eval()
    judge = oaif.LocalJudgeAnnotator(model, tok, "helpful", "Be brief.", question="Why brief?")
    prompts, responses = (
        ["Why do we dream?", "Why is the sky blue?", "Hi"],
        ["Because.", "Light scatters.", "Hey"],
    )
    questions = ["Why brief?", "Is this a good response?"]
    ids = [
        tok(judge.ask(*x, q), add_special_tokens=False).input_ids
        for x in zip(prompts, responses)
        for q in questions
    ]
    # the response and its question tokenized apart: other tokens ("▁Why")
    for x in zip(prompts, responses):
        text = judge.ask(*x, "Why brief?")
        cut = text.rindex("Why brief?")
        apart = [tok(t, add_special_tokens=False).input_ids for t in (text[:cut], text[cut:])]
        assert sum(apart, []) != tok(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        s = [
            float(lg[judge.words[0]] - lg[judge.words[1]])
            for lg in (model(torch.tensor([x])).logits[0, -1] for x in ids)
        ]
    assert judge.scores(prompts, responses, questions).flatten().tolist() == pytest.approx(
        s, abs=1e-5
    )


def test_local_judge_dtype_is_a_rule_whatever_the_policy_trains_in(tiny, monkeypatch):
    # a rule, not a timing (a busy machine timed otherwise, and a resume judged in another dtype):
    # a timing that says bf16 is faster on this CPU changes nothing
    seconds = iter([[2.0], [1.0]] * 3)  # float32's, then bf16's
    monkeypatch.setattr(timeit, "repeat", lambda *args, **kwargs: next(seconds))
    assert [oaif.judge_dtype(torch.device("cpu")) for _ in range(3)] == [torch.float32] * 3
    # judge_dtype's answer on a GPU, stood in
    for dtype in (torch.bfloat16, torch.float32):
        monkeypatch.setattr(oaif, "judge_dtype", lambda device, d=dtype: d)
        judge = oaif.make_annotator(
            "hf:" + tiny, oaif.Config(dtype="float32"), dict(device=torch.device("cpu")), ""
        )
        assert judge.model.dtype == dtype and 0 < judge(["Hi"], ["Hello"], ["Hey there"])[0] < 1


# --------------------------------------------------------------------------------------------------
# Win rate, evaluation records and the offline baseline


def tie_if_equal_else_shorter(prompts, first, second):
    return [
        0.5 if a == b else p for a, b, p in zip(first, second, oaif.shorter(prompts, first, second))
    ]


def test_win_rate_against_itself_is_one_half_with_ties(model_tok):
    model, tok = model_tok
    prompts = oaif.DEFAULT_PROMPTS[:6]
    a, b = (
        oaif.sample_answers(model, tok, prompts, 8, 0.9, batch_size=4, seed=3) for _ in range(2)
    )
    assert a == b  # the same seed: the same draws, whatever the global RNG did in between
    r = oaif.win_rate(prompts, a, b, tie_if_equal_else_shorter)
    assert r["policy_chars"] == r["reference_chars"]
    assert {k: r[k] for k in ("win_rate", "n", "wins", "ties", "losses", "no_verdict")} == dict(
        win_rate=0.5, n=6, wins=0, ties=6, losses=0, no_verdict=0
    )


def test_win_rate_counts_ties_as_training_does():
    # indifferent but leaning to the first position, in both orders: (0.9 + 1 - 0.9) / 2 is
    # 0.49999999999999994
    def judge(prompts, first, second):
        return oaif.both_orders(lambda *x: [0.9] * len(x[0]), prompts, first, second)

    p = judge(["x"] * 3, ["a", "b", "c"], ["d", "e", "f"])
    assert oaif.triage(p, 0.0)[1]["ties"] == 3  # training drops them as ties
    out = oaif.win_rate(["x"] * 4, ["a", "b", "c", "d"], ["e", "f", "g", "h"], judge)
    assert (out["win_rate"], out["ties"], out["losses"]) == (0.5, 4, 0)
    nonsense = oaif.win_rate(["x"] * 2, ["a", "b"], ["c", "d"], lambda *x: [float("nan"), 1.5])
    # as triage: no verdict, not vanished or a win
    assert (nonsense["n"], nonsense["no_verdict"]) == (0, 2)


def forced_short(model, tok):
    """A copy of the tiny model that ends every response at once: every final hidden state is
    100 v and EOS's (tied) embedding is v, so EOS wins."""
    import copy

    short = copy.deepcopy(model)
    with torch.no_grad():
        v = torch.ones(short.config.n_embd) / short.config.n_embd**0.5
        short.transformer.ln_f.weight.zero_()
        short.transformer.ln_f.bias.copy_(100 * v)
        short.transformer.wte.weight[tok.eos_token_id] = v
    return short


def test_win_rate_of_a_policy_forced_short_is_one(model_tok):
    model, tok = model_tok
    short = forced_short(model, tok)
    prompts = oaif.DEFAULT_PROMPTS[:6]
    answers = [
        oaif.sample_answers(m, tok, prompts, 8, batch_size=4, seed=0) for m in (short, model)
    ]
    r = oaif.win_rate(prompts, *answers, oaif.shorter)
    assert r["win_rate"] == 1.0 and r["wins"] == r["n"]
    assert r["n"] + r["no_verdict"] == 6 and r["n"] >= 5


def test_eval_records_in_metrics(tiny, tmp_path):
    oaif.main(run_args(tiny, tmp_path, "--steps", "3", "--eval-every", "2", "--eval-prompts", "4"))
    evals = [r for r in read_metrics(tmp_path) if r.get("eval")]
    assert [e["step"] for e in evals] == [2, 3]  # every 2 steps and at the end
    assert all(e["n"] + e["no_verdict"] == 4 and 0 <= e["win_rate"] <= 1 for e in evals if e["n"])


def test_eval_prompts_are_held_out(tiny, tmp_path):
    seen = []

    def recording(prompts, first, second):
        seen.append(list(prompts))
        return oaif.shorter(prompts, first, second)

    cfg = oaif.parse_args(
        run_args(tiny, tmp_path, "--steps", "12", "--eval-every", "12", "--eval-prompts", "8")
    )
    oaif.train(cfg, annotator=recording)
    # the evaluation: one call
    train_seen, eval_seen = {p for call in seen[:-1] for p in call}, seen[-1]
    # 12 steps x 4 cover all 32 training prompts
    assert len(set(eval_seen)) == 8 and not train_seen & set(eval_seen)
    assert len(train_seen) == len(oaif.DEFAULT_PROMPTS) - 8


def test_offline_trains_on_a_fixed_set(tiny, tmp_path):
    calls = []

    def recording(prompts, first, second):
        calls.append(list(zip(prompts, first, second)))
        return oaif.shorter(prompts, first, second)

    (tmp_path / "p.txt").write_text(
        "Why do we dream?\nWhat is inflation?\nHow do bees make honey?\nWhat is a prime?\n"
    )
    extra = ["--steps", "4", "--offline", "--prompts", str(tmp_path / "p.txt")]
    cfg = oaif.parse_args(run_args(tiny, tmp_path / "off", *extra))
    oaif.train(cfg, annotator=recording)
    assert len(calls) == 1 and len(calls[0]) == 4  # labelled once, before training
    rows = read_metrics(tmp_path / "off")
    assert len({r["response_chars"] for r in rows}) == 1  # the same 4 pairs every step
    assert all(r["annotate_s"] == 0 for r in rows)
    cfg.offline, cfg.output_dir = False, str(tmp_path / "on")
    calls.clear()
    oaif.train(cfg, annotator=recording)
    assert len(calls) == 4  # online: a fresh batch of pairs judged every step


def test_offline_data_file(tiny, tmp_path):
    rows = [{"prompt": "Why?", "chosen": "Because.", "rejected": "It is a long story, really."}] * 3
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    oaif.main(run_args(tiny, tmp_path / "out", "--offline-data", str(tmp_path / "pairs.jsonl")))
    assert [r["pairs"] for r in read_metrics(tmp_path / "out")] == [4, 4]


# --------------------------------------------------------------------------------------------------
# Checkpoints and resume; two Gloo ranks


def final_params(path) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).state_dict()


class CountingShorter:
    """The shorter rule with an annotator's request counters, as ClaudeAnnotator keeps them."""

    def __init__(self):
        self.stats = dict(
            annotator_requests=0, annotator_failures=0, input_tokens=0, output_tokens=0
        )

    def __call__(self, prompts, first, second):
        self.stats["annotator_requests"] += len(prompts)
        self.stats["input_tokens"] += sum(map(len, first + second))
        return oaif.shorter(prompts, first, second)


def test_resume_is_exact(tiny, tmp_path):
    def run(out, *extra):
        args = run_args(tiny, out, "--eval-every", "2", "--eval-prompts", "4", *extra)
        return oaif.train(oaif.parse_args(args), annotator=CountingShorter())

    whole = run(tmp_path / "straight", "--steps", "4")
    run(tmp_path / "resumed", "--steps", "2", "--save-every", "2")
    assert os.path.isfile(tmp_path / "resumed" / "checkpoint-2" / "trainer_state.pt")
    # a checkpoint cut off mid-write: must be ignored
    os.makedirs(tmp_path / "resumed" / "checkpoint-3")
    out = run(tmp_path / "resumed", "--steps", "4", "--resume")
    a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [r for r in read_metrics(tmp_path / "resumed") if not r.get("eval")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    straight = [r for r in read_metrics(tmp_path / "straight") if not r.get("eval")]
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight]
    pairs = [r["pairs"] for r in rows]
    assert out["summary"]["pairs"] == sum(pairs) > sum(pairs[2:])
    # the annotator's counts (and cost): the whole run, evals too
    for k in ("annotator_requests", "input_tokens"):
        assert out["summary"][k] == whole["summary"][k] > sum(r[k] for r in rows) > 0


def test_keep_checkpoints_and_incomplete_ones_ignored(tiny, tmp_path):
    oaif.main(
        run_args(tiny, tmp_path, "--steps", "3", "--save-every", "1", "--keep-checkpoints", "2")
    )
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    os.remove(tmp_path / "checkpoint-3" / "trainer_state.pt")
    assert oaif.complete_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-2")]


def test_reused_output_dir_needs_resume_or_overwrite(tiny, tmp_path, capsys):
    oaif.main(run_args(tiny, tmp_path / "out", "--save-every", "1"))
    # refused before any model loads: this model does not exist
    for extra in ([], ["--resume", "--overwrite"]):
        msg = bad_run(run_args(str(tmp_path / "no-model"), tmp_path / "out", *extra), capsys)
        assert "holds a previous run" in msg and "--overwrite" in msg
    (tmp_path / "out" / "notes.txt").write_text("the user's own file")
    oaif.main(run_args(tiny, tmp_path / "out", "--steps", "1", "--save-every", "1", "--overwrite"))
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-1"]
    assert [r["step"] for r in read_metrics(tmp_path / "out")] == [1]
    assert (tmp_path / "out" / "notes.txt").read_text() == "the user's own file"
    assert "is a file" in bad_run(run_args(tiny, tmp_path / "out" / "notes.txt"), capsys)


def test_overwrite_refuses_to_delete_the_model_it_starts_from(tiny, tmp_path, capsys):
    # "train more from my result, in place": deleted at the start, a crash would leave neither run's
    # model
    oaif.main(run_args(tiny, tmp_path, "--steps", "1", "--save-every", "1"))
    before = sorted(os.listdir(tmp_path))
    for model in (tmp_path / "checkpoint-1", tmp_path):
        msg = bad_run(run_args(tiny, tmp_path, "--model", str(model), "--overwrite"), capsys)
        assert f"--overwrite would delete --model {model}" in msg
    assert sorted(os.listdir(tmp_path)) == before and "model.safetensors" in before
    # a checkpoint of an oaif before name-keyed state
    os.remove(tmp_path / "checkpoint-1" / "oaif_config.json")
    msg = bad_run(run_args(tiny, tmp_path, "--resume"), capsys)
    assert "no complete checkpoint of this oaif" in msg


def test_overwrite_leaves_no_chat_template_of_the_previous_model(tiny, tmp_path):
    from transformers import AutoTokenizer

    chat = shutil.copytree(tiny, tmp_path / "chat")
    tok = AutoTokenizer.from_pretrained(chat)
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    )
    tok.save_pretrained(chat)
    oaif.main(run_args(str(chat), tmp_path / "out", "--steps", "1"))
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == tok.chat_template
    # a model without a template
    oaif.main(run_args(tiny, tmp_path / "out", "--steps", "1", "--overwrite"))
    # it would format every prompt
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template is None


def test_checkpoint_before_any_update_resumes_exactly(tiny, tmp_path):
    # the optimizer has no state yet: saving it must not take the zero step that would shift AdamW's
    # bias correction
    def hedging_first(prompts, first, second):
        hedging_first.calls += 1
        if hedging_first.calls == 1:
            return [0.5] * len(prompts)
        return oaif.shorter(prompts, first, second)

    for out, extra in (
        ("straight", []),
        ("resumed", ["--steps", "1", "--save-every", "1"]),
        ("resumed", ["--resume"]),
    ):
        hedging_first.calls = 0 if extra != ["--resume"] else 1
        args = run_args(tiny, tmp_path / out, "--steps", "3", *extra)
        oaif.train(oaif.parse_args(args), annotator=hedging_first)
    assert [r["updated"] for r in read_metrics(tmp_path / "resumed")] == [False, True, True]
    a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_flags_that_shape_training(tiny, tmp_path, capsys):
    oaif.main(run_args(tiny, tmp_path, "--steps", "1", "--save-every", "1"))
    extra = ["--loss", "ipo", "--beta", "5", "--seed", "1", "--batch-size", "8"]
    extra += ["--eval-every", "3", "--steps", "9", "--save-every", "3"]
    msg = bad_run(run_args(tiny, tmp_path, "--resume", *extra), capsys)
    for change in (
        "--loss dpo -> ipo",
        "--beta 0.1 -> 5.0",
        "--seed 0 -> 1",
        "--batch-size 4 -> 8",
        "--eval-every 0 -> 3",
    ):
        assert change in msg
    assert "--steps" not in msg and "--save-every" not in msg  # free to change
    # dpo's default beta, said explicitly
    oaif.main(run_args(tiny, tmp_path, "--resume", "--beta", "0.1"))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_lora_resume_refuses_another_rank(tiny, tmp_path, capsys):
    pytest.importorskip("peft", reason="LoRA needs peft (pip install peft)")
    lora, full = tmp_path / "lora", tmp_path / "full"
    oaif.main(run_args(tiny, lora, "--steps", "1", "--save-every", "1", "--lora-rank", "4"))
    oaif.main(run_args(tiny, full, "--steps", "1", "--save-every", "1"))

    def refusal(out, *extra):
        return bad_run(run_args(tiny, out, "--resume", *extra), capsys)

    assert "--lora-rank 4 -> 16" in refusal(lora, "--lora-rank", "16")
    assert "--lora-rank 4 -> 0" in refusal(lora)
    assert "--lora-rank 0 -> 4" in refusal(full, "--lora-rank", "4")


def test_offline_resume_never_relabels(tiny, tmp_path):
    (tmp_path / "p.txt").write_text(
        "Why do we dream?\nWhat is inflation?\nHow do bees make honey?\nWhat is a prime?\n"
    )

    def run(out, *extra):
        args = run_args(tiny, out, "--offline", "--prompts", str(tmp_path / "p.txt"), *extra)
        return oaif.train(oaif.parse_args(args), annotator=CountingShorter())

    whole = run(tmp_path / "straight", "--steps", "4")
    run(tmp_path / "resumed", "--steps", "2", "--save-every", "2")
    out = run(tmp_path / "resumed", "--steps", "4", "--resume")
    # labelled once
    assert out["summary"]["annotator_requests"] == whole["summary"]["annotator_requests"] == 4
    a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fixed", ["--offline-data", "--offline"])
def test_two_gloo_ranks_match_one_process(tiny, tmp_path, fixed):
    # Sampling and annotation made deterministic with fixed pairs: the only difference left is the
    # split. --offline: rank 0 samples and labels the set once and shares it, so it is the one
    # process's set.
    pairs = [
        {
            "prompt": f"Question {i}?",
            "chosen": "Yes." * (i % 3 + 1),
            "rejected": f"No, {i} times no.",
        }
        for i in range(8)
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (tmp_path / "p.txt").write_text("".join(f"{p['prompt']}\n" for p in pairs))
    extra = (
        ["--offline-data", str(tmp_path / "pairs.jsonl")]
        if fixed == "--offline-data"
        else ["--offline", "--prompts", str(tmp_path / "p.txt")]
    )
    args = run_args(tiny, tmp_path / "one", "--steps", "3", *extra)
    oaif.main(args)
    two = [a if a != str(tmp_path / "one") else str(tmp_path / "two") for a in args]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch += ["--master_port", "29517", os.path.join(HERE, "oaif.py"), *two]
    r = subprocess.run(
        launch,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=HERE,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    one, dist = final_params(tmp_path / "one"), final_params(tmp_path / "two")
    assert all(torch.allclose(one[k], dist[k], atol=1e-5) for k in one)
    # and training did move them
    assert not all(torch.equal(one[k], final_params(tiny)[k]) for k in one)
    rows_one, rows_two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["pairs"] for r in rows_two] == [r["pairs"] for r in rows_one]  # reduced over ranks
    assert fixed == "--offline" or [r["pairs"] for r in rows_one] == [4, 4, 4]
    assert [r["loss"] for r in rows_two] == pytest.approx([r["loss"] for r in rows_one], abs=1e-5)


# --------------------------------------------------------------------------------------------------
# Examples run


EXAMPLES = [
    "bench_logprobs.py",
    "bench_sampler.py",
    "bench_step.py",
    "bench_vs_trl.py",
    "custom_annotator.py",
    "from_gguf.py",
    "length_control.py",
    "memory_table.py",
    "online_vs_offline.py",
    "plot_metrics.py",
    "standin_messages_api.py",
    "tiny_model.py",
]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_help(name, capsys, monkeypatch):
    # As `python examples/NAME --help` runs it, in this process: torch imported once, not ten times.
    import runpy

    path = os.path.join(HERE, "examples", name)
    monkeypatch.setattr(sys, "argv", [path, "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))
    code = 0
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        code = e.code
    assert code in (0, None) and len(capsys.readouterr().out) > 100  # its usage or docstring


def test_online_vs_offline_tiny_two_steps(tmp_path, capsys):
    sys.path.insert(0, os.path.join(HERE, "examples"))
    import online_vs_offline

    args = ["--tiny", "--steps", "2", "--eval-every", "2", "--eval-prompts", "4"]
    args += ["--batch-size", "4", "--max-new-tokens", "8", "--out", str(tmp_path)]
    arms = online_vs_offline.main(args)
    assert [len(arms[a][0]) for a in ("online", "offline")] == [2, 2]
    assert all(arms[a][1][-1]["step"] == 2 for a in arms)
    assert "win rate against the initial policy" in capsys.readouterr().out


def test_length_control_reads_a_finished_arm_only_if_its_flags_match(tmp_path, capsys):
    sys.path.insert(0, os.path.join(HERE, "examples"))
    import length_control

    def run(*extra):
        args = ["--tiny", "--out", str(tmp_path), "--batch-size", "2", "--max-new-tokens", "4"]
        return length_control.main([*args, "--eval-prompts", "1", *extra])

    first = run("--steps", "1")
    assert run("--steps", "1") == first  # the same flags: both arms read, not run again
    for arm in ("concise", "detailed"):  # as an oaif before --judge-question saved them: the same
        saved = json.loads((tmp_path / arm / "oaif_config.json").read_text())
        del saved["judge_question"]
        (tmp_path / arm / "oaif_config.json").write_text(json.dumps(saved))
    assert run("--steps", "1") == first
    # other flags: never the old arms' numbers
    with pytest.raises(SystemExit, match="holds a previous run"):
        run("--steps", "2")
    # 2 steps and the evaluation
    assert [len(r) for r in run("--steps", "2", "--overwrite").values()] == [3, 3]


def test_bench_logprobs_quick(tmp_path):
    script = os.path.join(HERE, "examples", "bench_logprobs.py")
    args = [sys.executable, script, "--quick", "--json", str(tmp_path / "b.json")]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.load(open(tmp_path / "b.json"))
    assert {r["variant"] for r in rows} == {"naive", "selective", "fused"}
    assert all(r["max_err"] < 1e-4 for r in rows)  # every variant computes the same log-probs


def test_plot_metrics_table(tiny, tmp_path):
    oaif.main(run_args(tiny, tmp_path, "--eval-every", "2", "--eval-prompts", "4"))
    script = os.path.join(HERE, "examples", "plot_metrics.py")
    metrics, png = str(tmp_path / "metrics.jsonl"), str(tmp_path / "c.png")
    args = [sys.executable, script, metrics, "--png", png]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)

    assert r.returncode == 0, r.stderr
    # a plot with matplotlib, a table without
    assert (tmp_path / "c.png").exists() or "win rate" in r.stdout


# --------------------------------------------------------------------------------------------------
# Silent wrong training (issue 12): each of these failed before its fix


def test_bf16_checkpoint_trains_with_float32_master_weights(tiny, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tiny).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    AutoTokenizer.from_pretrained(tiny).save_pretrained(tmp_path / "bf16")
    dtypes = {t.dtype for t in load_file(tmp_path / "bf16" / "model.safetensors").values()}
    assert dtypes == {torch.bfloat16}
    oaif.main(run_args(str(tmp_path / "bf16"), tmp_path / "out", "--steps", "3", "--lr", "1e-5"))
    # step 1: the policy is still exactly the reference
    assert read_metrics(tmp_path / "out")[0]["kl"] == 0.0
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    start = load_file(tmp_path / "bf16" / "model.safetensors")
    moved = [(saved[k] != start[k].float()).float().mean().item() for k in start if k in saved]
    # lr 1e-5 updates survive: most weights moved off the bf16 grid
    assert sum(moved) / len(moved) > 0.5


def test_sampling_ignores_the_checkpoints_generation_config(model_tok):
    model, tok = model_tok
    gen = model.generation_config
    gen.repetition_penalty, gen.no_repeat_ngram_size = 100.0, 1
    gen.min_new_tokens = 10  # none of these is the policy's own distribution
    s = oaif.sample_pairs(
        model, tok, ["Why do we dream?", "Hi"], n=1, max_new_tokens=10, temperature=0
    )
    with torch.no_grad():
        ids, mask = s["input_ids"], s["attention_mask"]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    resp = s["response_mask"][:, 1:].bool()
    # greedy = own argmax
    assert torch.equal(logits[:, :-1].argmax(-1)[resp], s["input_ids"][:, 1:][resp])


def test_offline_data_never_trains_on_eval_prompts(tiny, tmp_path, capsys):
    prompts = [f"Question number {i}?" for i in range(4)]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    rows = [
        {"prompt": p, "chosen": "Yes.", "rejected": f"No, {i} times no."}
        for i, p in enumerate(prompts)
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = ["--steps", "6", "--batch-size", "1", "--sample-every", "1"]
    extra += ["--prompts", str(tmp_path / "p.txt"), "--offline-data", str(tmp_path / "pairs.jsonl")]
    extra += ["--eval-every", "6", "--eval-prompts", "1"]
    out = oaif.main(run_args(tiny, tmp_path / "out", *extra))

    err = "".join(capsys.readouterr())
    trained = {p for p in prompts if f"prompt: {p!r}" in err}
    # 6 steps cycle through the 3 kept
    assert out["summary"]["held_out_pairs"] == 1 and len(trained) == 3
    held_out = set(prompts) - trained
    assert "1 pairs of" in err and len(held_out) == 1
    # and that one prompt is the evaluation's
    assert out["eval"]["n"] + out["eval"]["no_verdict"] == 1


def test_bf16_run_samples_the_reference_side_from_the_float32_initial_model(tiny, tmp_path):
    runs = {}
    for dtype in ("float32", "bfloat16"):
        for mode in ([], ["--offline"]):
            out = tmp_path / f"{dtype}{len(mode)}"
            extra = ["--steps", "1", "--dtype", dtype, "--eval-every", "1", "--eval-prompts", "6"]
            oaif.main(run_args(tiny, out, *extra, "--temperature", "1.0", *mode))
            runs[dtype, bool(mode)] = read_metrics(out)
    # policy and reference: the same weights, the same autocast
    assert runs["bfloat16", False][0]["kl"] == 0.0
    for mode in (False, True):
        f32, bf16 = runs["float32", mode], runs["bfloat16", mode]
        # the win rate's reference answers
        assert f32[-1]["reference_chars"] == bf16[-1]["reference_chars"]
    # offline set
    assert runs["float32", True][0]["response_chars"] == runs["bfloat16", True][0]["response_chars"]


# --------------------------------------------------------------------------------------------------
# Labels, guards and log-probs that are the model's own (issue 11)


def test_an_annotator_that_skips_a_pair_is_refused(tiny, tmp_path):
    # one verdict for four pairs once trained every pair on it (a custom annotator's slip)
    cfg = oaif.parse_args(run_args(tiny, tmp_path / "short", "--steps", "1"))
    with pytest.raises(oaif.OAIFError, match="the annotator gave 1 verdicts for 4 pairs"):
        oaif.train(cfg, annotator=lambda prompts, first, second: [1.0])
    # the evaluation and the offline set too: one that answers 4 pairs a call passes training's
    # batches of 4, but would leave 4 of 8 held-out pairs out unsaid
    at_most_4 = lambda prompts, first, second: oaif.shorter(prompts, first, second)[:4]  # noqa: E731
    cfg = oaif.parse_args(
        run_args(tiny, tmp_path / "eval", "--eval-every", "1", "--eval-prompts", "8")
    )
    with pytest.raises(oaif.OAIFError, match="the annotator gave 4 verdicts for 8 pairs"):
        oaif.train(cfg, annotator=at_most_4)
    # the offline set is labelled before step 1, in batches: one verdict short, not an IndexError
    drops_one = lambda prompts, first, second: oaif.shorter(prompts, first, second)[:-1]  # noqa: E731
    cfg = oaif.parse_args(run_args(tiny, tmp_path / "offline", "--offline"))
    with pytest.raises(oaif.OAIFError, match="the annotator gave 3 verdicts for 4 pairs"):
        oaif.train(cfg, annotator=drops_one)


def test_hedging_judge_trains_nothing_and_soft_labels_train(tiny, tmp_path):
    def hedge(p, a, b):  # a coin flip dressed as a verdict
        return [0.505] * len(a)

    cfg = oaif.parse_args(run_args(tiny, tmp_path / "hedge", "--steps", "3"))
    out = oaif.train(cfg, annotator=hedge)
    before, after = final_params(tiny), final_params(tmp_path / "hedge")
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    rows = read_metrics(tmp_path / "hedge")
    assert [r["low_confidence"] for r in rows] == [4, 4, 4] and not any(r["updated"] for r in rows)
    assert out["summary"]["low_confidence"] == 12 and out["summary"]["dropped"] == 12
    # the same judge with --min-confidence 0 and soft labels trains, and more gently than with hard
    # labels
    moved = {}
    for labels in ("hard", "soft"):
        extra = ["--steps", "1", "--min-confidence", "0", "--labels", labels, "--loss", "ipo"]
        cfg = oaif.parse_args(run_args(tiny, tmp_path / labels, *extra))
        oaif.train(cfg, annotator=hedge)
        assert read_metrics(tmp_path / labels)[0]["pairs"] == 4
        moved[labels] = read_metrics(tmp_path / labels)[0]["loss"]
    # IPO: the soft target margin is 0.01/(2 beta), nearly 0 = h at step 1
    assert moved["soft"] < moved["hard"]


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--steps", "0"),
        ("--steps", "-3"),
        ("--batch-size", "0"),
        ("--max-new-tokens", "0"),
        ("--temperature", "-1"),
        ("--lr", "-1"),
        ("--lr", "nan"),
        ("--beta", "-0.1"),
        ("--beta", "0"),
        ("--save-every", "-1"),
        ("--annotator-workers", "0"),
        ("--warmup-steps", "-1"),
        ("--keep-checkpoints", "-1"),
        ("--min-confidence", "0.6"),
        ("--labels", "fuzzy"),
        ("--max-grad-norm", "0"),
        ("--task", "poetry"),
        ("--lora-alpha", "0"),
    ],
)
def test_bad_numbers_give_one_line_before_loading(tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    args = ["--model", str(tmp_path / "never-loaded"), "--output-dir", str(out), "--lora-rank", "4"]
    msg = bad_run([*args, flag, value], capsys)
    assert flag in msg and not out.exists()


def test_triage_counts_hedges_ties_and_nonsense_as_dropped():
    used, counts = oaif.triage([1.0, 0.0, 0.5, None, 0.52, float("nan"), 1.5, -0.1, 0.9], 0.05)
    # nan: never "second"
    assert used[:2] == [1.0, 0.0] and used[2:8] == [None] * 6 and used[8] == pytest.approx(0.9)
    assert counts == dict(pairs=3, ties=1, no_verdict=4, low_confidence=1)


def test_eval_prompts_zero_is_refused_only_when_evaluating(tiny, tmp_path, capsys):
    args = run_args(tiny, tmp_path / "a", "--eval-every", "2", "--eval-prompts", "0")
    assert "--eval-prompts" in bad_run(args, capsys)
    # no evaluation: fine
    oaif.main(run_args(tiny, tmp_path / "b", "--steps", "1", "--eval-prompts", "0"))


def test_long_prompt_is_named(tiny, tmp_path, capsys):
    (tmp_path / "p.txt").write_text(
        "A fine prompt.\nPlease summarise this: " + "word " * 2000 + "\n"
    )
    msg = bad_run(run_args(tiny, tmp_path / "out", "--prompts", str(tmp_path / "p.txt")), capsys)
    assert "Please summarise this: word" in msg and "p.txt" in msg and "context" in msg


def test_diverging_learning_rate_stops_with_one_line(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    msg = bad_run(run_args(tiny, out, "--steps", "5", "--lr", "1e30", "--save-every", "1"), capsys)
    # the last good one is named
    assert "diverged" in msg and "--lr" in msg and "checkpoint-1" in msg
    assert not (out / "model.safetensors").exists()
    assert oaif.complete_checkpoints(str(out))[-1].endswith("-1")


def test_nonfinite_loss_skips_the_update(tiny, tmp_path):
    rows = [{"prompt": "Why?", "chosen": "Because.", "rejected": "It is a long story, really."}]
    (tmp_path / "pairs.jsonl").write_text(json.dumps(rows[0]) + "\n")
    # fixed pairs: no sampling to stop it
    extra = ["--steps", "3", "--lr", "1e30", "--offline-data", str(tmp_path / "pairs.jsonl")]
    oaif.main(run_args(tiny, tmp_path / "out", *extra))
    rows = read_metrics(tmp_path / "out")
    assert [r["updated"] for r in rows] == [True, False, False]
    assert [r["nonfinite"] for r in rows] == [0, 1, 1]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert all(t.isfinite().all() for t in saved.values())
    model = oaif.load_model(tiny, torch.device("cpu"))[0]
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(oaif.OAIFError, match="non-finite"):
        oaif.save_model(model, None, str(tmp_path / "never"), None, {})
    assert not (tmp_path / "never").exists()


def tiny_config_models():
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        GraniteConfig,
        GraniteForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    body = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
    )
    return {
        "granite": lambda: GraniteForCausalLM(GraniteConfig(**body, logits_scaling=4.0)),
        "cohere": lambda: CohereForCausalLM(CohereConfig(**body, logit_scale=0.5)),
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**body)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**body)),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300)),
    }


@pytest.mark.parametrize("name", ["granite", "cohere", "llama", "qwen2", "gpt2"])
def test_logprobs_are_the_models_own(name, monkeypatch):
    torch.manual_seed(0)
    model = tiny_config_models()[name]().eval()
    # passes: sequence_logprobs reproduces log_softmax of the model's own logits
    oaif.check_logprobs(model)
    ids = torch.randint(0, 300, (3, 9))
    mask, resp = torch.ones_like(ids), torch.zeros_like(ids)
    mask[0, :2], resp[:, 5:] = 0, 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        own = logits[:, :-1].log_softmax(-1)
        own = own.gather(-1, ids[:, 1:, None]).squeeze(-1).mul(resp[:, 1:]).sum(-1)
        assert torch.allclose(oaif.sequence_logprobs(model, ids, mask, resp), own, atol=1e-5)
    # without the head's scaling folded in, the probe refuses the model
    if name in ("granite", "cohere"):
        monkeypatch.setattr(oaif, "head_temperature", lambda config: 1.0)
        with pytest.raises(oaif.OAIFError, match=type(model).__name__ + ".*nats per token"):
            oaif.check_logprobs(model)


def test_soft_capped_head_is_refused_with_one_line():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = Gemma2ForCausalLM(
        Gemma2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            vocab_size=300,
        )
    ).eval()
    with pytest.raises(oaif.OAIFError, match="Gemma2ForCausalLM") as e:
        oaif.check_logprobs(model)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------
# Models past one GPU (issue 10): LoRA through peft, FSDP2 across ranks


@pytest.fixture(scope="session")
def tiny_wide_embeddings(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-e")), embed_std=0.2)


@needs_peft
def test_lora_learns_shorter_and_its_reference_is_the_frozen_base(tiny_wide_embeddings, tmp_path):
    from peft import AutoPeftModelForCausalLM

    base = tiny_wide_embeddings
    argv = ["--model", base, "--output-dir", str(tmp_path), "--annotator", "shorter"]
    argv += ["--lora-rank", "8", "--lora-alpha", "32", "--lr", "1e-2", "--steps", "60"]
    argv += ["--batch-size", "8", "--max-new-tokens", "32", "--sample-every", "0"]
    oaif.main(argv)
    rows = read_metrics(tmp_path)
    first, last = (sum(r["response_chars"] for r in rows[i:j]) / 5 for i, j in ((0, 5), (55, 60)))
    assert last < first / 2, (first, last)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))
    # the adapter, not a second copy of the model
    assert not (tmp_path / "model.safetensors").exists()
    lora = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path)).eval()  # loads onto its base
    model, tok = oaif.load_model(base, torch.device("cpu"))
    batch = oaif.pair_batch(
        [tok("Why do we dream?").input_ids] * 2,
        [[5, 6, 7], [9]],
        [[8], [10, 11, 12]],
        tok.pad_token_id,
        "cpu",
    )
    args = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    with torch.no_grad():
        with lora.disable_adapter():
            assert torch.equal(
                oaif.sequence_logprobs(lora.get_base_model(), *args),
                oaif.sequence_logprobs(model, *args),
            )
        assert not torch.allclose(
            oaif.sequence_logprobs(lora.get_base_model(), *args),
            oaif.sequence_logprobs(model, *args),
        )
        merged = lora.merge_and_unload()  # the README's way to a plain model
        assert torch.allclose(
            oaif.sequence_logprobs(merged, *args),
            oaif.sequence_logprobs(lora.get_base_model(), *args),
        )


@needs_peft
def test_lora_resume_is_exact_and_bf16_runs(tiny, tmp_path):
    from safetensors.torch import load_file

    # dropout: loss pass only, also on resume
    lora = ["--lora-rank", "4", "--lr", "1e-2", "--lora-dropout", "0.5"]
    oaif.main(run_args(tiny, tmp_path / "straight", "--steps", "4", *lora))
    oaif.main(run_args(tiny, tmp_path / "resumed", "--steps", "2", "--save-every", "2", *lora))
    oaif.main(run_args(tiny, tmp_path / "resumed", "--steps", "4", "--resume", *lora))
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a)
    oaif.main(run_args(tiny, tmp_path / "bf16", "--steps", "2", "--dtype", "bfloat16", *lora))
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "bf16"))


@needs_peft
def test_lora_bad_targets_are_one_line(tiny, tmp_path, capsys):
    def refusal(out, targets):
        args = run_args(tiny, tmp_path / out, "--lora-rank", "4", "--lora-targets", targets)
        return bad_run(args, capsys)

    assert "--lora-targets" in refusal("a", "nope")
    assert "LM head" in refusal("b", "wte,c_attn")


def torchrun(args, port, timeout=300):
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch += ["--master_port", str(port), os.path.join(HERE, "oaif.py"), *args]
    r = subprocess.run(
        launch,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=HERE,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_fsdp_two_gloo_ranks_match_one_process_and_resume_across_rank_counts(tiny, tmp_path):
    # One run, resumed at each step on another rank count: 1 -> 2 FSDP -> 1 -> 2 DDP -> 1. Fixed
    # pairs: the same global batches as one process's straight run, so the parameters must match it
    # whatever ran each step.
    pairs = [
        {
            "prompt": f"Question {i}?",
            "chosen": "Yes." * (i % 3 + 1),
            "rejected": f"No, {i} times no.",
        }
        for i in range(8)
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))

    # evaluation on: a judge that is --model under FSDP gets its own unsharded copy (the sharded
    # reference failed: "mixed Tensor and DTensor"); the evaluation's annotator may change on resume
    def args(out, steps, *extra):
        fixed = ["--save-every", "1", "--offline-data", str(tmp_path / "pairs.jsonl")]
        evals = ["--eval-every", "4", "--eval-prompts", "4"]
        return run_args(tiny, out, "--steps", str(steps), *fixed, *evals, *extra)

    oaif.main(args(tmp_path / "one", 5))
    oaif.main(args(tmp_path / "mixed", 1))
    fsdp = ["--resume", "--fsdp", "--eval-annotator", f"hf:{tiny}"]
    r = torchrun(args(tmp_path / "mixed", 2, *fsdp), 29531)
    assert "saved on 1 rank(s), resumed on 2" in r.stderr
    oaif.main(args(tmp_path / "mixed", 3, "--resume"))
    torchrun(args(tmp_path / "mixed", 4, "--resume"), 29532)
    oaif.main(args(tmp_path / "mixed", 5, "--resume"))
    one, mixed = final_params(tmp_path / "one"), final_params(tmp_path / "mixed")
    assert one.keys() == mixed.keys()
    assert all(torch.allclose(one[k], mixed[k], atol=1e-5) for k in one)
    assert not all(torch.equal(one[k], final_params(tiny)[k]) for k in one)
    rows_one, rows_two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "mixed")
    evals = [r for r in rows_two if r.get("eval")]  # each run's last step, and step 4
    assert [r["step"] for r in evals] == [1, 2, 3, 4, 5]
    assert all(r["n"] + r["no_verdict"] == 4 for r in evals)

    rows_one, rows_two = ([r for r in rows if not r.get("eval")] for rows in (rows_one, rows_two))
    assert [r["step"] for r in rows_two] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows_two] == pytest.approx([r["loss"] for r in rows_one], abs=1e-5)


# --------------------------------------------------------------------------------------------------
# Inputs that gave a traceback or a run that does nothing, labels the loss sees, the end of a turn
# (issue 15)


def write_pairs(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_offline_pairs_are_checked_against_the_context(tiny, tmp_path, capsys):
    rows = [
        {"prompt": "Why?", "chosen": "Because.", "rejected": "No."},
        {"prompt": "Why?", "chosen": "Because.", "rejected": "word " * 1100},
    ]
    data = write_pairs(tmp_path / "pairs.jsonl", rows)
    msg = bad_run(run_args(tiny, tmp_path / "out", "--offline-data", data), capsys)
    assert "pairs.jsonl:2" in msg and "context of 1024" in msg and not (tmp_path / "out").exists()
    # nothing is sampled (no evaluation): --max-new-tokens past the context is no reason to refuse
    # the prompts
    data = write_pairs(tmp_path / "ok.jsonl", rows[:1])
    long = ["--offline-data", data, "--max-new-tokens", "2000"]
    oaif.main(run_args(tiny, tmp_path / "ok", "--steps", "1", *long))
    # evaluation samples
    args = run_args(tiny, tmp_path / "ev", *long, "--eval-every", "1", "--eval-prompts", "2")
    assert "context" in bad_run(args, capsys)


def test_inputs_that_gave_tracebacks_are_one_line(tiny, tmp_path, capsys, monkeypatch):
    out, never = tmp_path / "out", str(tmp_path / "never-loaded")
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 au lait?\n".encode("latin-1"))
    msg = bad_run(run_args(tiny, out, "--prompts", str(tmp_path / "latin1.txt")), capsys)
    assert "latin1.txt" in msg and "UTF-8" in msg
    latin1 = '{"prompt": "Caf\xe9?", "chosen": "a", "rejected": "b"}\n'.encode("latin-1")
    (tmp_path / "latin1.jsonl").write_bytes(latin1)
    msg = bad_run(run_args(tiny, out, "--offline-data", str(tmp_path / "latin1.jsonl")), capsys)
    assert "UTF-8" in msg
    good = {"prompt": "Why?", "chosen": "Because.", "rejected": "No."}
    bads = [{"rejected": None}, {"rejected": 42}, {"chosen": ""}, {"prompt": ["Why?"]}]
    for i, bad in enumerate(bads):
        data = write_pairs(tmp_path / f"bad{i}.jsonl", [good, dict(good, **bad)])
        assert f"bad{i}.jsonl:2" in bad_run(run_args(tiny, out, "--offline-data", data), capsys)
    assert "choose auto, cpu, cuda" in bad_run(run_args(never, out, "--device", "gpu"), capsys)
    # a CPU-only machine, whatever this one is
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "--device cuda" in bad_run(run_args(never, out, "--device", "cuda"), capsys)
    assert "torchrun" in bad_run(run_args(never, out, "--fsdp"), capsys)
    assert not out.exists()


def test_eval_split_that_leaves_too_few_training_prompts_is_refused(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("".join(f"Question {i}?\n" for i in range(12)))
    never, prompts = str(tmp_path / "never-loaded"), str(tmp_path / "p.txt")
    # before loading: the model path is bad too
    msg = bad_run(
        run_args(never, tmp_path / "out", "--prompts", prompts, "--eval-every", "3"), capsys
    )
    assert "12 prompts: 11 held out" in msg and "leave 1 to train on" in msg
    assert "--batch-size 4" in msg
    assert "--eval-prompts" in msg


def test_temperature_zero_is_refused_for_training(tiny, tmp_path, capsys):
    never = str(tmp_path / "never-loaded")
    for mode in ([], ["--offline"]):
        msg = bad_run(run_args(never, tmp_path / "out", "--temperature", "0", *mode), capsys)
        assert "--temperature 0" in msg and "--offline-data" in msg
    row = {"prompt": "Why?", "chosen": "Because.", "rejected": "No."}
    data = write_pairs(tmp_path / "pairs.jsonl", [row])
    # training samples nothing; greedy eval
    extra = ["--steps", "1", "--temperature", "0", "--offline-data", data]
    extra += ["--eval-every", "1", "--eval-prompts", "2"]
    out = oaif.main(run_args(tiny, tmp_path / "greedy", *extra))
    # policy = ref
    assert out["summary"]["pairs"] == 4 and out["eval"]["ties"] + out["eval"]["no_verdict"] == 2


def test_triage_decides_on_the_float32_labels_the_loss_sees(tiny, tmp_path):
    def judge(p, a, b):  # v(a, b) = 0.6, v(b, a) = 0.5
        return [0.6 if x == "a" else 0.5 for x in a]

    p_ab, p_ba = (
        oaif.both_orders(judge, ["x"], ["a"], ["b"]),
        oaif.both_orders(judge, ["x"], ["b"], ["a"]),
    )
    # 0.55 and 0.45 in float64: either side of 0.05
    assert abs(p_ab[0] - 0.5) > 0.05 > abs(p_ba[0] - 0.5)
    # decided alike
    assert oaif.triage(p_ab, 0.05)[1]["pairs"] == oaif.triage(p_ba, 0.05)[1]["pairs"] == 1
    probs = [0.5 + 1e-9, 0.5 - 1e-9, 0.5 + 1e-7, 0.55, 0.45, 0.5 + 1e-3, 1.0, None]
    for min_confidence in (0.0, 0.05):
        used, counts = oaif.triage(probs, min_confidence)
        as_loss_sees = torch.tensor([0.5 if v is None else v for v in used], dtype=torch.float32)
        # used: never a tie
        assert int((as_loss_sees != 0.5).sum()) == counts["pairs"] and counts["ties"] == 3

    # end to end, step 1 (h = 0): each used pair's DPO loss is log 2, so their mean is too
    def near_tie(p, a, b):
        return [0.5 + 1e-9] + [1.0] * (len(a) - 1)

    cfg = oaif.parse_args(run_args(tiny, tmp_path, "--steps", "1", "--min-confidence", "0"))
    oaif.train(cfg, annotator=near_tie)
    row = read_metrics(tmp_path)[0]
    assert row["pairs"] == 3 and row["ties"] == 1 and row["loss"] == pytest.approx(math.log(2))


def test_offline_pairs_end_as_the_chat_template_ends_a_turn(tiny, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok, model = AutoTokenizer.from_pretrained(tiny), AutoModelForCausalLM.from_pretrained(tiny)
    tok.add_special_tokens({"additional_special_tokens": ["<end_of_turn>"]})  # Gemma's: not the EOS
    tok.chat_template = (
        "{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n"
        "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    model.resize_token_embeddings(len(tok))
    tok.save_pretrained(tmp_path / "gemma-like")
    model.save_pretrained(tmp_path / "gemma-like")
    seen, real = [], oaif.pair_batch

    def recording_pair_batch(p, first, second, *a):
        seen.append(first + second)
        return real(p, first, second, *a)

    monkeypatch.setattr(oaif, "pair_batch", recording_pair_batch)
    row = {"prompt": "Why?", "chosen": "Because.", "rejected": "No."}
    data = write_pairs(tmp_path / "pairs.jsonl", [row])
    gemma_like = str(tmp_path / "gemma-like")
    oaif.main(run_args(gemma_like, tmp_path / "out", "--steps", "1", "--offline-data", data))
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    assert end != tok.eos_token_id and seen
    assert all(ids[-1] == end and end not in ids[:-1] for ids in seen[0])
    assert oaif.turn_end(tok, model.generation_config) == end
    # no template: generation_config's first EOS, else the tokenizer's
    plain = AutoTokenizer.from_pretrained(tiny)
    assert oaif.turn_end(plain, GenerationConfig(eos_token_id=[7, plain.eos_token_id])) == 7
    assert oaif.turn_end(plain, GenerationConfig()) == plain.eos_token_id


def test_claude_answering_preferred_colon_digit_labels_its_pairs(api):
    server = api(reply=lambda a, b: f"Preferred: {1 if len(a) < len(b) else 2}")  # no "Response"
    claude = oaif.ClaudeAnnotator(client=server.client())
    assert claude(*PAIRS) == [1.0, 0.0] and claude.stats["annotator_failures"] == 0


# --------------------------------------------------------------------------------------------------
# Judge health in metrics.jsonl, and the reward-model annotator (issue 16)


class StandInJudge:
    """A judge function v(prompt, first, second) -> raw P(first), asked in both orders as the LLM
    judges are."""

    def __init__(self, v):
        self.v, self.stats = v, dict.fromkeys(oaif.ANNOTATOR_STATS, 0)

    def judge(self, prompts, first, second):
        return [self.v(*x) for x in zip(prompts, first, second)]

    def __call__(self, prompts, first, second):
        return oaif.both_orders(self.judge, prompts, first, second, self.stats)


class OrderBlind(StandInJudge):
    """Pointwise, like a reward model: one call per response, no order, so no position bias; a
    confidence."""

    def __call__(self, prompts, first, second):
        return [0.75] * len(prompts)


HEALTH_FIELDS = ("position_bias", "order_agreement", "judge_confidence")


@pytest.mark.parametrize(
    "v,expected",
    [
        # always leans to the first: (0.9 + 1 - 0.9) / 2 = 1/2 after both orders
        (lambda x, a, b: 0.9, (0.9, 0.0, 0.0)),
        # consistent in both orders
        (lambda x, a, b: None if a == b else 0.8 if a < b else 0.2, (0.5, 1.0, 0.3)),
        # consistent, leaning first
        (lambda x, a, b: None if a == b else 0.9 if a < b else 0.3, (0.6, 1.0, 0.3)),
    ],
)
def test_judge_health_of_stand_in_judges_of_known_bias(tiny, tmp_path, v, expected):
    out = oaif.train(oaif.parse_args(run_args(tiny, tmp_path)), annotator=StandInJudge(v))
    rows = read_metrics(tmp_path)
    for row in rows + [out["summary"]]:
        assert [row[k] for k in HEALTH_FIELDS] == pytest.approx(expected, abs=1e-9)


def test_judge_health_fields_absent_where_undefined(tiny, tmp_path):
    # --annotator shorter: a rule, no judge
    oaif.train(oaif.parse_args(run_args(tiny, tmp_path / "rule")))
    assert not any(k in row for row in read_metrics(tmp_path / "rule") for k in HEALTH_FIELDS)
    cfg = oaif.parse_args(run_args(tiny, tmp_path / "blind"))
    out = oaif.train(cfg, annotator=OrderBlind(None))
    for row in read_metrics(tmp_path / "blind") + [out["summary"]]:
        assert "position_bias" not in row and "order_agreement" not in row
        assert row["judge_confidence"] == 0.25
    rows = [{"prompt": "Why?", "chosen": "Because.", "rejected": "It is a long story, really."}] * 3
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the file's labels, not the judge's: no confidence to report
    args = run_args(tiny, tmp_path / "file", "--offline-data", str(tmp_path / "pairs.jsonl"))
    out = oaif.train(oaif.parse_args(args), annotator=OrderBlind(None))
    records = read_metrics(tmp_path / "file") + [out["summary"]]
    assert not any(k in row for row in records for k in HEALTH_FIELDS)


def confidence_judge(x, a, b):
    """Consistent in both orders, its confidence varying with the pair: run-wide means weigh the
    steps."""
    return None if a == b else 1 / (1 + math.exp(len(b) - len(a)))


def test_judge_health_summary_counts_the_whole_resumed_run(tiny, tmp_path):
    def run(out, *extra):
        cfg = oaif.parse_args(run_args(tiny, out, *extra))
        return oaif.train(cfg, annotator=StandInJudge(confidence_judge))

    whole = run(tmp_path / "straight", "--steps", "4")["summary"]
    rows = read_metrics(tmp_path / "straight")
    verdicts = [r["pairs"] + r["ties"] + r["low_confidence"] for r in rows]
    assert len({round(r["judge_confidence"], 9) for r in rows}) > 1  # the steps differ
    weighted = sum(r["judge_confidence"] * n for r, n in zip(rows, verdicts)) / sum(verdicts)
    assert whole["judge_confidence"] == pytest.approx(weighted, abs=1e-12)
    run(tmp_path / "resumed", "--steps", "2", "--save-every", "2")
    resumed = run(tmp_path / "resumed", "--steps", "4", "--resume")["summary"]
    expected = [whole[k] for k in HEALTH_FIELDS]
    assert [resumed[k] for k in HEALTH_FIELDS] == pytest.approx(expected, abs=1e-12)


def test_claude_position_bias_in_metrics(api, tiny, tmp_path):
    # a judge that always picks the first it sees
    server = api(reply=lambda a, b: "Preferred Response=1")
    claude = oaif.ClaudeAnnotator(client=server.client())
    out = oaif.train(oaif.parse_args(run_args(tiny, tmp_path, "--steps", "1")), annotator=claude)
    row = read_metrics(tmp_path)[0]
    health = (row["position_bias"], row["order_agreement"], row["judge_confidence"])
    assert health == (1.0, 0.0, 0.0)
    requests = out["summary"]["annotator_requests"]
    assert claude.stats["order_pairs"] == server.requests / 2 == requests / 2


@pytest.fixture(scope="session")
def tiny_rm(tiny, tmp_path_factory) -> str:
    """A tiny random reward model: GPT-2 with a one-logit head, the tiny model's config and
    tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    path = str(tmp_path_factory.mktemp("tiny_rm"))
    torch.manual_seed(1)
    config = GPT2Config.from_pretrained(tiny, num_labels=1)
    GPT2ForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(path)
    return path


@pytest.mark.parametrize("chat", [False, True])
def test_reward_model_annotator_is_bradley_terry_of_unpadded_scores(tiny_rm, chat):
    model, tok = oaif.load_model(tiny_rm, torch.device("cpu"), "AutoModelForSequenceClassification")
    if chat:
        tok.chat_template = (
            "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        )
    rm = oaif.RewardModelAnnotator(model, tok)
    prompts = ["Why do we dream?", "Hi", "What is a prime number?"]
    first = ["Because.", "Hello there, my friend, how are you today?", "A number"]
    second = ["Nobody knows why we dream, not even the experts.", "Hey", "A number"]
    p = rm(prompts, first, second)

    def text(x, y):
        return f"<user>{x}\n<assistant>{y}\n" if chat else f"{x}\n\n{y}"

    @torch.no_grad()
    def score(x, y):  # one response alone, no padding: the head at its last token
        ids = tok(text(x, y), return_tensors="pt").input_ids
        return float(model.score(model.transformer(ids).last_hidden_state[0, -1])[0])

    expected = [
        1 / (1 + math.exp(score(x, b) - score(x, a))) for x, a, b in zip(prompts, first, second)
    ]
    # identical: a tie
    assert p == pytest.approx(expected, abs=1e-6) and len(set(p)) == 3 and p[2] == 0.5
    assert rm(prompts, second, first) == pytest.approx([1 - q for q in p], abs=1e-6)  # order-blind
    tokens = sum(len(tok(text(x, y)).input_ids) for x, y in zip(prompts * 2, first + second))
    # two calls
    assert rm.stats["annotator_requests"] == 12 and rm.stats["input_tokens"] == 2 * tokens


def test_cli_with_reward_model(tiny, tiny_rm, tmp_path, capsys):
    out = oaif.main(run_args(tiny, tmp_path, "--annotator", f"rm:{tiny_rm}"))
    rows = read_metrics(tmp_path)
    assert len(rows) == 2
    assert all(r["annotator_requests"] == 8 and "position_bias" not in r for r in rows)
    assert all(0 <= r["judge_confidence"] < 0.5 for r in rows)
    assert out["summary"]["annotator_requests"] == 16
    assert "judge confidence" in capsys.readouterr().err

    def refusal(out, annotator):
        return bad_run(run_args(tiny, tmp_path / out, "--annotator", annotator), capsys)

    assert "cannot load model" in refusal("b", f"rm:{tmp_path / 'nothing'}")
    assert "num_labels" in refusal("c", f"rm:{tiny}")
    # a prompt and response over the reward model's context: one line, not an IndexError
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    short_rm = tmp_path / "short_rm"
    config = GPT2Config.from_pretrained(tiny_rm, n_positions=12)
    GPT2ForSequenceClassification(config).save_pretrained(short_rm)
    AutoTokenizer.from_pretrained(tiny_rm).save_pretrained(short_rm)
    assert "tokens is over its context" in refusal("d", f"rm:{short_rm}")


def test_resume_refuses_a_prompts_file_whose_content_changed(tiny, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"Question {i}?\n" for i in range(8)))
    out = tmp_path / "out"
    oaif.main(run_args(tiny, out, "--steps", "1", "--save-every", "1", "--prompts", str(prompts)))
    # same path, other prompts
    prompts.write_text("".join(f"Another question {i}?\n" for i in range(8)))
    msg = bad_run(run_args(tiny, out, "--resume", "--prompts", str(prompts)), capsys)
    assert "--prompts-sha256" in msg


# --------------------------------------------------------------------------------------------------
# Labels that mean what the instruction says: five defects that gave silent wrong labels


@pytest.mark.parametrize(
    "written,question",
    [
        (
            " a concise response?\nOpposite: Is this a long response?\n\nInstruction: Be",
            ["Is this a concise response?", "Is this a long response?"],
        ),
        (
            " a response that answers the question?\nOpposite: Is this one that strays?",
            ["Is this a response that answers the question?", "Is this one that strays?"],
        ),
    ],
)
def test_local_judge_writes_its_question_from_any_wording(
    model_tok, written, question, capsys, monkeypatch
):
    # the judge model continues its examples with the instruction, normalised to one line, greedily
    # with oaif's own sampler (no generation_config: beams or n-gram bans would change it)
    model, tok = model_tok
    seen = []
    reply = dict(written=written)

    def sample_tokens(model, ids, mask, max_new_tokens, temperature, eos_ids, pad_id):
        seen.append((tok.decode(ids[0]), max_new_tokens, temperature))
        return tok(reply["written"], return_tensors="pt").input_ids

    monkeypatch.setattr(oaif, "sample_tokens", sample_tokens)
    # the tiny judge's direction check says nothing: the lines stay in the order written
    monkeypatch.setattr(oaif.LocalJudgeAnnotator, "wanted", lambda self, q: 0.0)
    judge = oaif.LocalJudgeAnnotator(model, tok, instruction="  Be\n concise. ")
    assert judge.questions[:-2] == question and judge.instruction == "Be\n concise."
    assert seen == [(oaif.QUESTION_SHOTS + "Be concise.\nQuestion: Is this", 48, 0)]
    # none: the task's quality, not written; --judge-question: as given, not written
    assert oaif.LocalJudgeAnnotator(model, tok, "tldr").question == "Is this a good summary?"
    given = oaif.LocalJudgeAnnotator(model, tok, instruction="Be concise.", question=" Short? ")
    assert given.questions == ["Short?"] and len(seen) == 1
    # a "?" with no space after it is inside its question, not the end of one
    quoted = 'Does it end by asking "Anything else?" of the user?'
    assert oaif.LocalJudgeAnnotator(model, tok, question=quoted).questions == [quoted]
    # more than a question and its opposite, or text after them: refused, not split at each "?"
    for bad in ("Is this concise? Judge only its length.", "Short? Brief? Long?"):
        with pytest.raises(oaif.OAIFError, match="a question, or a question and its opposite"):
            oaif.LocalJudgeAnnotator(model, tok, question=bad)
    # an opposite written the same as the question would make every score 0: dropped
    reply["written"] = " a detailed response?\nOpposite: Is this a detailed response?"
    same = oaif.LocalJudgeAnnotator(model, tok, instruction="helpful and detailed")
    assert same.questions[:-2] == ["Is this a detailed response?"] and same.weights[0] == 1
    # nothing written, no "?" on the question's line, no opposite on the next, only an end token:
    # refused, with the way out
    no_opposite = " short?\nInstruction: Be"
    for bad in (
        "\nInstruction:",
        " short\nOpposite: Is this long?",
        no_opposite,
        tok.eos_token + "?",
        " ",
    ):
        reply["written"] = bad
        with pytest.raises(oaif.OAIFError, match="wrote no question .* --judge-question"):
            oaif.LocalJudgeAnnotator(model, tok, instruction="Be concise.")
    # an instruction past the judge's context: one line, not an IndexError in the embedding
    with pytest.raises(oaif.OAIFError, match="--instruction is over the judge's context"):
        oaif.LocalJudgeAnnotator(model, tok, instruction="Be brief. " * 600)
    # a run prints the question its hf: judge asks
    cfg = oaif.Config(instruction="Be concise.", judge_question="Is it short? Is it long?")
    models = {"device": torch.device("cpu"), "m": (model, tok)}
    assert oaif.make_annotator("hf:m", cfg, models, "").questions == ["Is it short?", "Is it long?"]
    err = capsys.readouterr().err
    assert "oaif: hf:m asks of each response: +1.00 x Is it short? -1.00 x Is it long?" in err


def test_a_sentencepiece_judge_writes_its_question_with_its_spaces(monkeypatch):
    # Llama-2's decoder drops the first piece's space when the written tokens are decoded alone
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    sp = Tokenizer(models.BPE(byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    sp.decoder = decoders.Metaspace(prepend_scheme="first")
    corpus = [*oaif.DEFAULT_PROMPTS, "A line.\nOpposite: Is this?"] * 2
    sp.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300))
    tok = PreTrainedTokenizerFast(tokenizer_object=sp)
    text = " a short response?\nOpposite: Is this a long one?"
    written = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(written).startswith("a short")  # alone: no space
    monkeypatch.setattr(oaif, "sample_tokens", lambda *a: torch.tensor([written]))
    monkeypatch.setattr(oaif.LocalJudgeAnnotator, "wanted", lambda self, q: 0.0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2))
    judge = oaif.LocalJudgeAnnotator(model.eval(), tok, instruction="Keep it brief.")
    assert judge.questions[:-2] == ["Is this a short response?", "Is this a long one?"]


def test_local_judge_puts_first_the_written_line_the_instruction_wants(model_tok, monkeypatch):
    # a small judge can write its two lines swapped ("Is this short?" from "Prefer longer
    # responses."): it is asked which of the two the instruction's author wants a Yes to
    model, tok = model_tok
    text = " a short response?\nOpposite: Is this a long response?"
    monkeypatch.setattr(oaif, "sample_tokens", lambda *a: tok(text, return_tensors="pt").input_ids)
    wants = {"Is this a short response?": -2.0, "Is this a long response?": 1.5}
    with monkeypatch.context() as m:
        m.setattr(oaif.LocalJudgeAnnotator, "wanted", lambda self, q: wants[q])
        judge = oaif.LocalJudgeAnnotator(model, tok, instruction="Prefer longer responses.")
        assert judge.questions[:2] == ["Is this a long response?", "Is this a short response?"]
        wants["Is this a short response?"] = 1.5  # a tie: the order written
        judge = oaif.LocalJudgeAnnotator(model, tok, instruction="Prefer longer responses.")
        assert judge.questions[:2] == ["Is this a short response?", "Is this a long response?"]
    # wanted: log P(Yes) - log P(No) at the end of one reading of the instruction and the line,
    # the answer tokens the judge's scores read
    read = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda ids, **kw: read.append(ids) or forward(ids, **kw))
    got = [judge.wanted(q) for q in wants]
    for ids, q, s in zip(read, wants, got):
        seen = tok.decode(ids[0])
        assert "Prefer longer responses." in seen and f'"{q}"' in seen
        logp = forward(ids.clone()).logits[0, -1].float().log_softmax(-1)  # read in inference_mode
        assert s == pytest.approx(float(logp[judge.words[0]] - logp[judge.words[1]]), abs=1e-5)
    assert got[0] != got[1]


def test_local_judge_with_its_own_question_adds_long_less_short_as_the_instruction_wants(
    model_tok, monkeypatch, capsys
):
    # a small judge reads a response cut at the cap as less thorough, however long: with its own
    # question it also asks "long?" less "short?", weighted by three times how much more the
    # instruction's author wants Yes to "long?" than to "short?" (wanted, the judge's own check)
    model, tok = model_tok
    text = " a detailed summary?\nOpposite: Is this a brief summary?"
    monkeypatch.setattr(oaif, "sample_tokens", lambda *a: tok(text, return_tensors="pt").input_ids)
    asked = ["Is this a detailed summary?", "Is this a brief summary?"]
    asked += ["Is this a long summary?", "Is this a short summary?"]
    wants = dict(zip(asked, [1.0, -1.0, 0.5, -0.75]))
    monkeypatch.setattr(oaif.LocalJudgeAnnotator, "wanted", lambda self, q: wants[q])
    judge = oaif.LocalJudgeAnnotator(model, tok, "tldr", "More detail, please.")
    assert judge.questions == asked and judge.weights == [1.0, -1.0, 3.75, -3.75]
    prompts, a, b = ["Why?", "Hi"], ["Because it is so.", "Hello"], ["No.", "Hey there, you"]
    # each question's log-odds as test_local_judge_is_pointwise_yes_no_log_odds checks them
    s = [
        sum(w * float(judge.scores([p], [r], [q])[0, 0]) for w, q in zip(judge.weights, asked))
        for p, r in zip(prompts + prompts, a + b)
    ]
    expected = [1 / (1 + math.exp(s[i + 2] - s[i])) for i in range(2)]
    assert judge(prompts, a, b) == pytest.approx(expected, abs=1e-5)
    assert judge(prompts, b, a) == pytest.approx([1 - p for p in expected], abs=1e-5)
    # its run's first line says so
    cfg = oaif.Config(task="tldr", instruction="More detail, please.")
    models = {"device": torch.device("cpu"), "m": (model, tok)}
    oaif.make_annotator("hf:m", cfg, models, "")
    line = " ".join(f"{w:+.2f} x {q}" for w, q in zip([1, -1, 3.75, -3.75], asked))
    assert f"oaif: hf:m asks of each response: {line}\n" in capsys.readouterr().err
    # a question given (--judge-question), or no instruction: asked as given, nothing added
    given = oaif.LocalJudgeAnnotator(model, tok, "tldr", "More detail, please.", question="Long?")
    assert given.questions == ["Long?"] and given.weights == [1.0]
    assert oaif.LocalJudgeAnnotator(model, tok, "tldr").weights == [1.0]


def test_judge_check_builds_every_mode_it_measured(model_tok, monkeypatch, capsys):
    # examples/judge_check.py's older modes override ask(), which the judge reads before its
    # question is set (for the answer tokens): each mode must still build and judge a pair
    sys.path.insert(0, os.path.join(HERE, "examples"))
    import judge_check

    model, tok = model_tok
    tok.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    for name, mode in judge_check.MODES.items():
        kw = dict(question="Is this short? Is this long?") if name == "pointwise" else {}
        judge = mode(model, tok, instruction="Prefer the more concise response.", **kw)
        assert judge.question and judge.words[0] != judge.words[1], name
    # --wordings measures each wording's own questions, weighted: refused where there are none
    for more in (["--question", "Is this short?"], ["--mode", "noshots"]):
        argv = ["judge_check.py", "--judge", "x", "--wordings", "w.json", *more]
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exit:
            judge_check.main()
        assert exit.value.code == 2 and "pointwise, without --question" in capsys.readouterr().err


def test_rules_and_reward_models_refuse_an_instruction_they_cannot_follow(
    tiny, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    for annotator in (f"rm:{tmp_path / 'rm'}", "shorter", ""):  # "" with no key: shorter
        for extra in (["--instruction", "Prefer the more detailed response."], ["--task", "tldr"]):
            args = run_args(tiny, tmp_path / "out", "--annotator", annotator, *extra)
            msg = bad_run(args, capsys)
            assert "acts only on an LLM judge" in msg and extra[0] in msg
    assert not (tmp_path / "out").exists()
    # an LLM judge anywhere in the run (here the evaluation's) can follow it: not refused
    flags = ["--steps", "1", "--instruction", "Prefer the more concise response."]
    flags += ["--eval-every", "1", "--eval-prompts", "4", "--eval-annotator", f"hf:{tiny}"]
    flags += ["--judge-question", "Is this a concise response?"]  # the tiny judge writes none
    oaif.main(run_args(tiny, tmp_path / "ok", *flags, "--save-every", "1"))
    # (the evaluation's hf: judge alone reads the question: like that judge, it may change on
    # resume, test_resume_accepts_changes_that_act_on_nothing)
    # --judge-question is an hf: judge's alone
    msg = bad_run(run_args(tiny, tmp_path / "no", "--judge-question", "Short?"), capsys)
    assert "--judge-question is an hf: judge's; the annotator here is shorter" in msg


def sentencepiece_tokenizer():
    """A Llama-2-style tokenizer (Metaspace, '▁' before the first word, newlines their own pieces)
    that has both '▁Yes' (a word after a space, or alone) and 'Yes' (after a newline, as a judge
    answers)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sp = Tokenizer(models.BPE(byte_fallback=True))
    newline = pre_tokenizers.Split("\n", "isolated")
    sp.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(prepend_scheme="first"), newline]
    )
    corpus = oaif.DEFAULT_PROMPTS + ["Answer:\nYes", "Answer:\nNo", "I say Yes or No"] * 8
    sp.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400))
    return PreTrainedTokenizerFast(tokenizer_object=sp)


def test_local_judge_reads_the_answer_tokens_it_would_produce():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = sentencepiece_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)).eval()
    judge = oaif.LocalJudgeAnnotator(
        model,
        tok,
        instruction="Prefer the more concise response.",
        question="Is this a concise response?",
    )
    text = judge.ask(
        "Why do we dream?", "Because.", judge.question
    )  # no template: ends "Answer:\n"
    before = tok(text, add_special_tokens=False).input_ids
    # the oracle: what follows the judge's input
    for word, token in zip(("Yes", "No"), judge.words):
        after = tok(text + word, add_special_tokens=False).input_ids
        assert after[: len(before)] == before and token == after[len(before)]
        piece = tok.convert_ids_to_tokens(token)
        assert piece == word != tok.convert_ids_to_tokens(tok(word).input_ids[-1])
    # Llama-2's template writes a reply as " Yes" after "[/INST]": there the judge writes "▁Yes"
    tok.chat_template = (
        "{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
        "{% else %} {{ m.content }} </s>{% endif %}{% endfor %}"
    )
    judge = oaif.LocalJudgeAnnotator(
        model,
        tok,
        instruction="Prefer the more concise response.",
        question="Is this a concise response?",
    )
    assert tok.convert_ids_to_tokens(judge.words) == ["▁Yes", "▁No"]


@pytest.mark.parametrize(
    "reply,verdict",
    [
        ("Response 1 is tighter.\nPreferred Response=1\n\nSome readers preferred Response 2.", 1.0),
        ("Preferred Response=1 (I preferred response 2's tone, though.)", 1.0),
        ("Preferred Response=2. Many preferred Response 1 at first.", 0.0),
        ("Preferred Response: 2", 0.0),
        ("**Preferred Response** = 1", 1.0),
        ("Preferred Summary=2", 0.0),
    ],
)
def test_parse_verdict_ignores_preferred_as_a_verb(reply, verdict):
    assert oaif.parse_verdict(reply) == verdict


def test_offline_resume_with_numpy_labels(tiny, tmp_path):
    import numpy as np

    (tmp_path / "p.txt").write_text(
        "Why do we dream?\nWhat is inflation?\nHow do bees make honey?\nWhat is a prime?\n"
    )

    def numpy_shorter(prompts, first, second):  # a user's annotator computing its verdicts in numpy
        return [None if p is None else np.float32(p) for p in oaif.shorter(prompts, first, second)]

    def run(out, *extra):
        args = run_args(tiny, out, "--offline", "--prompts", str(tmp_path / "p.txt"), *extra)
        return oaif.train(oaif.parse_args(args), numpy_shorter)

    run(tmp_path / "straight", "--steps", "4")
    run(tmp_path / "resumed", "--steps", "2", "--save-every", "2")
    # offline_pairs.pt loads with weights_only
    run(tmp_path / "resumed", "--steps", "4", "--resume")
    a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)

    def pairs(out):
        return [r["pairs"] for r in read_metrics(out)]

    assert pairs(tmp_path / "straight") == pairs(tmp_path / "resumed")
    assert sum(pairs(tmp_path / "straight")) > 0


# --------------------------------------------------------------------------------------------------
# Examples: run again, --paper's code path (--smoke), --parallel failures, the README's files


def test_tiny_model_prints_only_its_path(tmp_path):
    path = str(tmp_path / "t")
    script = os.path.join(HERE, "examples", "tiny_model.py")
    r = subprocess.run([sys.executable, script, path], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == path + "\n", r.stdout  # no blank lines before it


@pytest.mark.parametrize("example", ["length_control", "online_vs_offline"])
def test_example_runs_again_with_the_same_command(example, tmp_path, monkeypatch, capsys):
    """No --out: every invocation its own oaif-out/EXAMPLE/run-N, printed; none is refused."""
    import importlib

    module = importlib.import_module(example)
    monkeypatch.chdir(tmp_path)
    arms = ("detailed", "concise") if example == "length_control" else ("online", "offline")
    argv = ["--tiny", "--steps", "1", "--batch-size", "2", "--max-new-tokens", "4"]
    for n in (1, 2):
        module.main(argv + ["--eval-prompts", "2"])
        out = os.path.join("oaif-out", example, f"run-{n}")
        assert f"output: {out}" in capsys.readouterr().out
        assert all(len(read_metrics(os.path.join(out, arm))) == 2 for arm in arms)  # step, eval


def test_online_vs_offline_reads_its_finished_arms_under_out(tmp_path, monkeypatch):
    import online_vs_offline

    argv = ["--tiny", "--out", str(tmp_path), "--steps", "2", "--eval-every", "2"]
    argv += ["--batch-size", "2", "--max-new-tokens", "4", "--eval-prompts", "2"]
    first = online_vs_offline.main(argv)
    with monkeypatch.context() as m:  # the same flags: both arms read, neither run again
        m.setattr(oaif, "main", lambda argv: pytest.fail(f"ran again: {argv}"))
        assert online_vs_offline.main(argv) == first
    with pytest.raises(SystemExit, match="holds a previous run"):  # other flags: oaif's rules
        online_vs_offline.main(argv + ["--seed", "1"])
    # a resumed arm's file keeps the evaluation that ended its first run: not one the other arm has
    row = json.dumps(dict(first["online"][1][0], step=1))
    with open(tmp_path / "online" / "metrics.jsonl", "a") as f:
        f.write(row + "\n")
    with monkeypatch.context() as m:
        m.setattr(oaif, "main", lambda argv: pytest.fail(f"ran again: {argv}"))
        assert online_vs_offline.main(argv)["online"][1] == first["online"][1]


def test_length_control_smoke_takes_the_paper_code_path(tmp_path, monkeypatch, capsys):
    """--smoke: --paper's path (a process an arm, an hf: judge, the neutral judge, the table, the
    plot) on the tiny model, 2 steps; into an --out folder not there yet (each arm's log in it)."""
    import length_control

    out = tmp_path / "new" / "run"
    runs = length_control.main(["--smoke", "--out", str(out)])
    assert all((out / f"{arm}.log").is_file() for arm in runs)
    table = (out / "control.md").read_text()
    assert [len([r for r in rows if not r.get("eval")]) for rows in runs.values()] == [2, 2, 2]
    # the paper's three arms, each with its share cut and a 95% interval beside each win rate
    assert list(runs) == ["helpful", "short", "very_short"] and "very short / helpful" in table
    assert table.count(" won, ") == 6 and table.count("] (") == 6  # 3 arms x 2 judges
    assert "| helpful: (none) |" in table and "| very_short: helpful and very short |" in table
    assert table in capsys.readouterr().out  # printed, to paste into the README
    with open(out / "short" / "oaif_config.json") as f:
        cfg = json.load(f)  # --paper's oaif flags, and an hf: judge told the paper's words
    assert (cfg["dtype"], cfg["min_confidence"], cfg["annotator"][:3]) == ("bfloat16", 0.01, "hf:")
    assert cfg["instruction"] == "helpful and short"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "control.png").stat().st_size > 1000


@pytest.mark.parametrize("failing", ["detailed", "concise"])
def test_length_control_parallel_stops_the_other_arm_when_one_fails(tmp_path, monkeypatch, failing):
    import length_control

    (tmp_path / failing).mkdir()
    (tmp_path / failing / "metrics.jsonl").write_text("")  # a previous run: this arm is refused
    started, popen = [], subprocess.Popen

    def record(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", record)
    argv = ["--tiny", "--out", str(tmp_path), "--parallel", "--steps", "100000"]
    try:  # the other arm would run 100000 steps
        with pytest.raises(SystemExit) as e:
            length_control.main(argv + ["--batch-size", "2", "--max-new-tokens", "4"])
        message = str(e.value)
        assert f"the {failing} arm failed" in message and "holds a previous run" in message
        assert os.path.join(str(tmp_path), f"{failing}.log") in message and "\n" not in message
        assert len(started) == 2 and all(p.poll() is not None for p in started)  # none left
        assert sorted(p.returncode > 0 for p in started) == [False, True]  # one failed, one stopped
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()


def test_online_vs_offline_interval_is_wilsons():
    import online_vs_offline

    # Wilson's score interval: (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)
    with pytest.raises(SystemExit):  # no evaluation: nothing to compare, refused before training
        online_vs_offline.main(["--tiny", "--eval-every", "0"])
    low, high = online_vs_offline.interval(0.5, 32)
    assert (low, high) == pytest.approx((0.3363, 0.6637), abs=1e-4)
    low, high = online_vs_offline.interval(1.0, 16)
    assert high == pytest.approx(1.0) and low == pytest.approx(16 / (16 + 1.96**2), abs=1e-9)


def test_length_control_checks_its_judges_before_training(tiny, tmp_path, monkeypatch, capsys):
    import length_control

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    bad = [
        (["--neutral-judge", f"hf:{tmp_path / 'missing'}"], "not a model folder"),
        (["--neutral-judge", "claude"], "ANTHROPIC_API_KEY"),
        (["--neutral-judge", "best"], "use hf:MODEL, rm:MODEL or claude"),
        (["--neutral-judge", "claude-haiku-4-5"], "use hf:MODEL"),  # oaif knows "claude" alone
        (["--neutral-judge", "hf:"], "use hf:MODEL"),
        (["--neutral-judge", f"rm:{tiny}"], "one output, not 2"),
        # a reward model reads no instruction: it cannot steer the two arms
        (["--judge", f"rm:{tiny}"], "use hf:MODEL or claude"),
        # the paper's arms with no judge: no rule is "helpful"
        (["--arms", "paper"], "no rule stands in for --arms paper's 'helpful'"),
        (["--smoke", "--cpu"], "are presets: give one"),
        # one question for every arm would undo their instructions
        (["--judge-question=Is this short?"], "would ask every arm one question"),
    ]
    for extra, why in bad:
        with pytest.raises(SystemExit) as e:
            length_control.main(["--model", tiny, *extra])
        assert e.value.code == 2 and why in capsys.readouterr().err
    assert not (tmp_path / "oaif-out").exists()  # refused before any arm trained


def github_slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: the text as rendered (no backticks, emphasis or link
    targets), lower case, punctuation but hyphens and underscores dropped, spaces as hyphens."""
    import re

    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"[`*]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def markdown_links(path: str) -> tuple:
    """(Its local links [(target file, anchor)], relative to the repo, not URLs, not inside code;
    its anchors: each heading's slug, a repeat with -1, -2 as GitHub numbers them.)"""
    import re

    with open(path) as f:
        text = re.sub(r"(?s)```.*?```", "", f.read())
    anchors, seen = set(), {}
    for heading in re.findall(r"(?m)^#{1,6}\s+(.+?)\s*#*\s*$", text):
        slug = github_slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    text = re.sub(r"`[^`\n]*`", "", text)  # [`oaif.py`](oaif.py) keeps its link
    targets = re.findall(r"\]\(\s*<?([^)\s>]+)", text)  # inline links and images
    targets += re.findall(r"(?m)^ {0,3}\[[^\]]+\]:\s*(\S+)", text)  # reference definitions
    targets += re.findall(r"<img[^>]*\ssrc=[\"']([^\"']+)", text)
    here = os.path.relpath(os.path.dirname(os.path.abspath(path)), HERE)
    links = []
    for t in targets:
        if re.match(r"[a-zA-Z][\w+.-]*:", t):
            continue
        file, _, anchor = t.partition("#")
        file = os.path.normpath(os.path.join(here, file)) if file else os.path.relpath(path, HERE)
        links.append((file, anchor))
    return links, anchors


def test_markdown_links_and_anchors_resolve():
    def git(*args):
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True)

    try:
        files = set(git("ls-files").stdout.splitlines())
    except OSError:
        files = set()
    if not files:
        pytest.skip("not a git checkout")
    docs = ["README.md", "examples/README.md"]
    links = {doc: markdown_links(os.path.join(HERE, doc))[0] for doc in docs}
    found = {t for doc in docs for t, _ in links[doc]}
    assert {"examples/first_run.png", "oaif.py", "examples/README.md"} <= found  # the parser works
    for doc in docs:
        for target, anchor in links[doc]:
            tracked = target in files or any(f.startswith(target + "/") for f in files)
            assert tracked, f"{doc} links {target}, not in the repository (git ls-files)"
            if anchor:
                anchors = markdown_links(os.path.join(HERE, target))[1]
                assert anchor in anchors, f"{doc} links {target}#{anchor}: no such heading"
        ignored = git("check-ignore", "--no-index", *{t for t, _ in links[doc]}).stdout.split()
        assert not ignored, f".gitignore hides files {doc} links: {ignored}"


def test_github_slug_as_github_makes_it(tmp_path):
    assert github_slug("Set up, run, test") == "set-up-run-test"
    assert github_slug("`oaif_step` and Algorithm 1") == "oaif_step-and-algorithm-1"
    assert github_slug("A model's log π(y|x)") == "a-models-log-πyx"
    doc = tmp_path / "d.md"
    doc.write_text("# A\n## A\n```\n# not a heading\n```\n[x](#a-1) [y](oaif.py#z)\n")
    links, anchors = markdown_links(str(doc))
    assert anchors == {"a", "a-1"} and ("oaif.py", "z") in [
        (os.path.basename(f), a) for f, a in links
    ]


# --------------------------------------------------------------------------------------------------
# Copy-pasteable pieces: each built alone from the source of exactly the names the README lists


def readme_pieces(path: str = os.path.join(HERE, "README.md")) -> dict:
    """The README's "Copy-pasteable pieces" table: {its first name: (the names, the imports)}, each
    cell's backticked items exactly as written."""
    import re

    with open(path) as f:
        text = f.read()
    section = text.split("## Copy-pasteable pieces", 1)[1].split("\n## ", 1)[0]
    pieces = {}
    for row in re.findall(r"(?m)^\|(.+)\|\s*$", section):
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)]  # "\|" is a pipe in a cell
        names = re.findall(r"`([^`]+)`", cells[1])
        imports = re.findall(r"`([^`]+)`", cells[2])
        if names and all(x.startswith(("import ", "from ")) for x in imports):
            pieces[names[0]] = (names, imports)
    return pieces


def build_piece(names: list, imports: list) -> dict:
    """A fresh namespace holding only the piece's imports and the source of its names, pasted in
    the row's order, nothing added; every global name any of that source reads, on any branch (a
    CUDA-only one too), must be among them."""
    import ast
    import builtins
    import inspect

    ns = {"__name__": "piece"}
    exec("\n".join(imports), ns)
    source = inspect.getsource(oaif)
    # Each name's top-level statement (a constant is one statement), in the file's order.
    found = {}
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node]
        for t in targets:
            name = getattr(t, "name", None) or getattr(t, "id", None)
            if name in names:
                found.setdefault(name, node)
    assert set(found) == set(names), (
        f"names not defined at oaif.py's top level: {set(names) - set(found)}"
    )
    sources = [ast.get_source_segment(source, n, padded=True) for n in found.values()]
    decorated = []
    for node, text in zip(found.values(), sources):
        # ast's segment starts at `def`/`class`: put the decorators back.
        decorators = [
            f"@{ast.get_source_segment(source, d)}" for d in getattr(node, "decorator_list", [])
        ]
        decorated.append("\n".join(decorators + [text]))
    # Pasted in the row's order, as a reader copies them.
    code = "\n\n".join(decorated[list(found).index(name)] for name in names)
    tree = ast.parse(code)
    bound = {
        n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)
    }
    bound |= {
        a.arg
        for n in ast.walk(tree)
        if isinstance(n, ast.arguments)
        for a in n.posonlyargs + n.args + n.kwonlyargs + [n.vararg, n.kwarg]
        if a
    }
    bound |= {
        n.name
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.ExceptHandler))
    }
    bound |= {
        (a.asname or a.name).split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    }
    read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    missing = read - bound - set(ns) - set(dir(builtins))
    assert not missing, f"{names[0]} reads {sorted(missing)}, not among the names its row lists"
    exec(code, ns)
    return ns


def test_readme_pieces_parser_and_builder_catch_what_a_paster_would_hit(tmp_path):
    # The parser reads a row's cells exactly; the builder adds no import and copies one statement.
    readme = tmp_path / "README.md"
    row = "| losses | `dpo_loss`, `preference_margin` | `import torch` |"
    readme.write_text(f"# x\n\n## Copy-pasteable pieces\n\n| a | b | c |\n|---|---|---|\n{row}\n")
    assert readme_pieces(str(readme)) == {
        "dpo_loss": (["dpo_loss", "preference_margin"], ["import torch"])
    }
    with pytest.raises(AssertionError, match=r"\['F'\]"):
        build_piece(["dpo_loss", "preference_margin"], ["import torch"])
    with pytest.raises(AssertionError, match="Optional"):
        build_piece(["parse_verdict", "ANCHOR", "BARE"], ["import re"])
    ns = build_piece(["TEMPLATES", "NOUNS", "render_judge_prompt"], ["import re"])
    assert ns["NOUNS"]["harmless"] == ns["NOUNS"]["helpful"] and "harmless" in ns["TEMPLATES"]


def test_copy_pasteable_pieces_run_alone(tiny, api):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    pieces = readme_pieces()
    expected = {"fused_logprobs", "sequence_logprobs", "dpo_loss", "sample_pairs", "both_orders"}
    expected |= {"render_judge_prompt", "LocalJudgeAnnotator", "ClaudeAnnotator", "oaif_step"}
    assert set(pieces) == expected, f"the README's table rows: {sorted(pieces)}"
    ns = {piece: build_piece(*pieces[piece]) for piece in pieces}
    # fused_logprobs: both dtype paths and a frozen head, against a float64 oracle
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(9, 8, generator=g), torch.randn(13, 8, generator=g)
    labels = torch.randint(0, 13, (9,), generator=g).masked_fill(torch.arange(9) % 4 == 0, -100)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.1)):
        h = hidden.to(dtype).detach().requires_grad_()
        out = ns["fused_logprobs"]["fused_logprobs"](h, weight, labels, 0.7, 4)
        out.sum().backward()
        err = (out.double() - oracle_logprobs(hidden, weight, labels, 0.7)).abs().max()
        assert err < tol and h.grad is not None
    # the losses: log 2 at h = 0; sequence_logprobs as HF's cross-entropy says
    zero = [torch.zeros(2)] * 4
    assert ns["dpo_loss"]["dpo_loss"](*zero).tolist() == pytest.approx([math.log(2)] * 2)
    assert ns["dpo_loss"]["ipo_loss"](*zero).tolist() == [0.25] * 2
    assert ns["dpo_loss"]["slic_loss"](*zero).tolist() == [1.0] * 2
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    tok = AutoTokenizer.from_pretrained(tiny)
    tok.pad_token = tok.eos_token
    # the sampler: raw prompts, then a chat template; greedy and sampled; non-finite weights raise
    sample_pairs = ns["sample_pairs"]["sample_pairs"]
    for template in (None, "{% for m in messages %}{{ m.content }}\n{% endfor %}"):
        tok.chat_template = template
        for temperature in (0.0, 0.9):
            batch = sample_pairs(model, tok, ["Hi", "Why?"], 2, 5, temperature)
            assert batch["input_ids"].shape[0] == 4 and len(batch["texts"]) == 4
    ids, mask, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    logps = ns["sequence_logprobs"]["sequence_logprobs"](model, ids, mask, resp)
    assert logps.tolist() == pytest.approx(oaif.sequence_logprobs(model, ids, mask, resp).tolist())
    broken = AutoModelForCausalLM.from_pretrained(tiny).eval()
    with torch.no_grad():
        broken.lm_head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError):
        sample_pairs(broken, tok, ["Hi"], 2, 3, 0.9)
    # the annotator's prompt and its parsing; both orders
    prompt = ns["render_judge_prompt"]
    text = prompt["render_judge_prompt"]("tldr", "Be brief.", "x", "a", "b")
    assert "Summary 2:\nb" in text and prompt["parse_verdict"]("Preferred Summary=2") == 0.0
    stats = {}
    both_orders = ns["both_orders"]["both_orders"]
    assert both_orders(lambda p, a, b: [1.0] * len(p), ["x"], ["a"], ["b"], stats) == [0.5]
    assert stats == dict(order_pairs=1, first_sum=1.0, order_agree=0)
    # the local judge: a chat template and none, with and without an instruction, past its context
    local_judge = ns["LocalJudgeAnnotator"]["LocalJudgeAnnotator"]
    for chat_template, instruction in ((template, ""), (None, "Prefer the more concise response.")):
        tok.chat_template = chat_template
        judge = local_judge(model, tok, instruction=instruction, question="Short?")
        assert 0 < judge(["Why?"], ["Because."], ["Nobody knows, really."])[0] < 1
    with pytest.raises(Exception, match="context"):
        judge(["x"], ["word " * 1100], ["y"])
    # Claude through the real SDK and the stand-in API
    claude = ns["ClaudeAnnotator"]["ClaudeAnnotator"](client=api().client())
    assert claude(*PAIRS) == [1.0, 0.0]
    # oaif_step: online with a rule, then offline pairs; soft labels and averaged log-probs
    step = ns["oaif_step"]["oaif_step"]
    policy = AutoModelForCausalLM.from_pretrained(tiny)
    ref = AutoModelForCausalLM.from_pretrained(tiny).eval()

    ref.requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    cfg = SimpleNamespace(
        loss="ipo",
        beta=None,
        max_new_tokens=6,
        temperature=0.9,
        min_confidence=0.0,
        labels="soft",
        average_logps=True,
        max_grad_norm=1.0,
        dtype="float32",
    )
    out = step(policy, ref, tok, ["Hi", "Why?", "How?"], oaif.shorter, optimizer, cfg)
    assert out["n_used"] == out["counts"]["pairs"] > 0 and math.isfinite(out["grad_norm"])
    pairs = dict(
        oaif.pair_batch([[5, 6]], [[7, 8, 9]], [[10]], tok.pad_token_id, "cpu"),
        texts=["a b", "c"],
        probs=[0.9],
    )
    out = step(policy, ref, tok, ["Hi"], None, optimizer, cfg, pairs)
    assert out["counts"]["pairs"] == 1 and out["annotate_s"] == 0.0


# --------------------------------------------------------------------------------------------------
# The first run as a newcomer meets it (issue 20, item 5)


def test_the_same_command_runs_again_in_a_new_run_folder(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = run_args(tiny, "unused", "--steps", "1", "--save-every", "1")
    argv = argv[:2] + argv[4:]  # no --output-dir
    for n in (1, 2):
        oaif.main(argv)
        assert f"oaif: output: oaif-out/run-{n}" in capsys.readouterr().err
        assert [r["step"] for r in read_metrics(tmp_path / "oaif-out" / f"run-{n}")] == [1]
    # --resume without --output-dir continues the newest run; the one before is never touched
    before = (tmp_path / "oaif-out" / "run-1" / "metrics.jsonl").read_text()
    oaif.main(argv[:-4] + ["--steps", "2", "--save-every", "1", "--resume"])
    assert [r["step"] for r in read_metrics(tmp_path / "oaif-out" / "run-2")] == [1, 2]
    assert (tmp_path / "oaif-out" / "run-1" / "metrics.jsonl").read_text() == before
    assert not (tmp_path / "oaif-out" / "run-3").exists()


class Bar:
    """tqdm's bar as report() uses it: what it writes, kept."""

    def __init__(self):
        self.lines = []

    def write(self, text):
        self.lines.append(text)

    def set_postfix(self, *a, **kw):
        pass


def test_the_bar_shows_length_in_tokens_and_kl_and_the_summary_how_they_moved(tmp_path):
    class Postfix(Bar):
        def set_postfix(self, *a, **kw):
            self.shown = dict(*a, **kw)

    bar = Postfix()
    record = dict(step=1, loss=0.69, response_tokens=12.5, kl=0.25, pairs=8, nonfinite=0)
    oaif.report(dict(record, updated=True), open(os.devnull, "w"), bar)
    assert bar.shown["len"] == "12.5 tokens" and bar.shown["kl"] == "0.25 nats"
    # moved(): the means of the first and last k steps, the first and last win rates
    steps = [dict(step=s, response_tokens=60 - s, kl=s / 10) for s in range(1, 21)]
    evals = [dict(step=10, eval=True, win_rate=0.6), dict(step=20, eval=True, win_rate=0.9)]
    m = oaif.moved(steps[:10] + evals[:1] + steps[10:] + evals[1:])
    assert m["k"] == 5 and m["response_tokens"] == [57.0, 42.0] and m["win_rate"] == [0.6, 0.9]
    assert m["kl"] == pytest.approx([0.3, 1.8])
    # a short run: k shrinks, never below one step; no evaluation, no win rate
    assert oaif.moved(steps[:3]) == dict(k=1, response_tokens=[59, 57], kl=[0.1, 0.3], win_rate=[])
    assert oaif.moved(steps[:1])["response_tokens"] == [59, 59]


def test_the_run_ends_saying_how_length_kl_and_win_rate_moved(tiny, tmp_path, capsys):
    args = run_args(tiny, tmp_path / "out", "--steps", "4", "--eval-every", "2")
    out = oaif.main(args + ["--eval-prompts", "2"])
    rows = read_metrics(tmp_path / "out")
    steps = [r for r in rows if not r.get("eval")]
    m = out["summary"]["moved"]
    assert m["k"] == 2 and m["win_rate"] == [r["win_rate"] for r in rows if r.get("eval")]
    first = (steps[0]["response_tokens"] + steps[1]["response_tokens"]) / 2
    assert m["response_tokens"][0] == pytest.approx(first)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("oaif: the first 2 steps -> the last 2: response length ")
    assert "tokens, KL to the reference" in line and "win rate vs the initial policy" in line


def test_a_resumed_run_says_it_moved_as_a_straight_run_does(tiny, tmp_path, capsys):
    evals = ["--eval-every", "4", "--eval-prompts", "2"]
    straight = oaif.main(run_args(tiny, tmp_path / "a", "--steps", "4", *evals))
    # The first run ends at step 2 with an evaluation a straight run never makes.
    oaif.main(run_args(tiny, tmp_path / "b", "--steps", "2", "--save-every", "2", *evals))
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.6')  # a crash mid-line, past the checkpoint
    resumed = oaif.main(run_args(tiny, tmp_path / "b", "--steps", "4", "--resume", *evals))
    assert resumed["summary"]["moved"] == straight["summary"]["moved"]
    assert len(straight["summary"]["moved"]["win_rate"]) == 2
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 2, 3, 4, 4]


def test_a_run_resumed_at_its_last_step_keeps_its_closing_evaluation(tiny, tmp_path, monkeypatch):
    flags = ["--steps", "3", "--eval-every", "2", "--eval-prompts", "2", "--save-every", "3"]
    straight = oaif.main(run_args(tiny, tmp_path / "a", *flags))

    def stop(*args):
        raise KeyboardInterrupt

    # stopped after the last checkpoint, before the model is saved (Ctrl-C, a full disk)
    with monkeypatch.context() as m:
        m.setattr(oaif, "finish", stop)
        with pytest.raises(KeyboardInterrupt):
            oaif.main(run_args(tiny, tmp_path / "b", *flags))
    resumed = oaif.main(run_args(tiny, tmp_path / "b", *flags, "--resume"))
    assert resumed["summary"]["moved"] == straight["summary"]["moved"]
    assert len(straight["summary"]["moved"]["win_rate"]) == 2
    assert resumed["eval"] == straight["eval"] and straight["eval"]["step"] == 3
    assert resumed["last"]["loss"] == straight["last"]["loss"] and resumed["last"]["step"] == 3


def test_offline_the_closing_line_says_whose_length_it_is(tiny, tmp_path, capsys):
    data = write_pairs(tmp_path / "d.jsonl", [dict(prompt="Why?", chosen="A.", rejected="B b.")])
    oaif.main(run_args(tiny, tmp_path / "out", "--offline-data", data))
    assert "(of the fixed pairs, not the policy's samples" in capsys.readouterr().err


def test_printed_pairs_show_a_new_prompt_each_time():
    bar, shown = Bar(), []
    record = dict(loss=0.7, kl=0.0, response_tokens=5, pairs=8, nonfinite=0, updated=True)
    for step in range(10, 90, 10):  # 40 prompts, 8 a step, a pair printed every 10 steps
        prompts = oaif.step_slice(oaif.DEFAULT_PROMPTS, step, 8)
        texts = [f"{p} answer" for p in prompts for _ in "ab"]
        out = dict(probs=[1.0] * 8, usable=torch.ones(8), batch=dict(texts=texts))
        oaif.report(dict(record, step=step), open(os.devnull, "w"), bar, 10, prompts, out)
        shown.append(bar.lines[-1].split("prompt: ")[1].split("\n")[0])
    # the old choice, each batch's first prompt, showed one prompt 8 times
    assert len(set(shown)) == len(shown) == 8


def test_resume_accepts_changes_that_act_on_nothing(tiny, tmp_path, capsys, monkeypatch):
    (tmp_path / "p.txt").write_text("".join(f"Question {i}?\n" for i in range(8)))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    oaif.main(run_args(tiny, out, "--steps", "1", "--save-every", "1", "--prompts", "p.txt"))
    # no evaluation: no held-out split; not Claude: no Claude model; the same file, named otherwise
    idle = ["--eval-prompts", "5", "--annotator-model", "claude-other", "--prompts", "./p.txt"]
    oaif.main(run_args(tiny, out, "--steps", "2", "--resume", *idle))
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert "--eval-every" in bad_run(
        run_args(tiny, out, "--steps", "3", "--resume", *idle, "--eval-every", "1"), capsys
    )
    # a checkpoint of an oaif before --judge-question: its judge asked its own
    hf = ["--annotator", f"hf:{tiny}", "--save-every", "1"]
    oaif.main(run_args(tiny, tmp_path / "hf", "--steps", "1", *hf))
    config = tmp_path / "hf" / "checkpoint-1" / "oaif_config.json"
    saved = json.loads(config.read_text())
    del saved["judge_question"]
    config.write_text(json.dumps(saved))
    oaif.main(run_args(tiny, tmp_path / "hf", "--resume", *hf))
    assert [r["step"] for r in read_metrics(tmp_path / "hf")] == [1, 2]
    # the question of a judge that only evaluates (which may change on resume anyway)
    ev = ["--eval-annotator", f"hf:{tiny}", "--eval-every", "2", "--eval-prompts", "2"]
    ev += ["--save-every", "1"]
    question = ["--judge-question", "Is this short?"]
    oaif.main(run_args(tiny, tmp_path / "ev", "--steps", "1", *ev, *question))
    question = ["--judge-question", "Is this long?"]
    oaif.main(run_args(tiny, tmp_path / "ev", "--resume", *ev, *question))
    assert [r["step"] for r in read_metrics(tmp_path / "ev")] == [1, 1, 2, 2]


def test_resume_refuses_a_checkpoint_of_an_older_judge(tiny, tmp_path, capsys, monkeypatch):
    # before df3cb60 an hf: judge with an instruction added no "long?" less "short?" to its own
    # question, before 31c160e (judge_weighs_length true) weighed it a third as much, and before
    # 7b96f0e (judge_debias) took 0.25 x "good?" off any: another judge
    sys.path.insert(0, os.path.join(HERE, "examples"))
    import tiny_model

    flags = ["--annotator", f"hf:{tiny}", "--instruction", "Be brief.", "--save-every", "1"]
    given = ["--judge-question", "Is this short?"]  # the tiny judge writes none
    args = run_args(tiny, tmp_path, "--steps", "1", *flags, *given)
    oaif.main(args)
    paths = (tmp_path / "checkpoint-1" / "oaif_config.json", tmp_path / "oaif_config.json")
    saved = json.loads(paths[0].read_text())
    assert saved["judge_weighs_length"] == 3
    old = {k: v for k, v in saved.items() if k != "judge_weighs_length"}
    # (an older config, the flags of its resume): its own question, or the debias with a given one
    for older, resume in (
        (dict(judge_question=""), flags),
        (dict(judge_question="", judge_weighs_length=True), flags),
        (dict(judge_debias=0.25), flags + given),
    ):
        for path in paths:
            path.write_text(json.dumps(dict(old, **older)))
        assert not tiny_model.finished(run_args(tiny, tmp_path, "--steps", "1", *resume))
        msg = bad_run(run_args(tiny, tmp_path, "--steps", "2", "--resume", *resume), capsys)
        assert "this checkpoint's hf: judge asked otherwise; start a new run" in msg
    # trained by Claude (its judge unchanged): an hf: evaluation judge on resume is no refusal
    monkeypatch.setenv("ANTHROPIC_API_KEY", "never sent")
    for path in paths:
        path.write_text(json.dumps(dict(old, judge_question="", annotator="claude")))
    claude = ["--annotator", "claude", "--instruction", "Be brief.", "--save-every", "1"]
    resume = run_args(tiny, tmp_path, "--steps", "2", "--resume", *claude)
    oaif.setup_run(oaif.parse_args(resume + ["--eval-annotator", f"hf:{tiny}"]), None)
    # a given question after 7b96f0e: the judge as it is now, finished and resumed
    for config in (saved, old):
        for path in paths:
            path.write_text(json.dumps(config))
        assert tiny_model.finished(args)
    oaif.main(run_args(tiny, tmp_path, "--steps", "2", "--resume", *flags, *given))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    # a rule annotator's older checkpoint (no instruction, no judge) resumes as before
    rule = run_args(tiny, tmp_path / "rule", "--steps", "1", "--save-every", "1")
    oaif.main(rule)
    path = tmp_path / "rule" / "checkpoint-1" / "oaif_config.json"
    cfg = json.loads(path.read_text())
    del cfg["judge_weighs_length"]
    path.write_text(json.dumps(cfg))
    oaif.main(run_args(tiny, tmp_path / "rule", "--steps", "2", "--resume"))
    assert [r["step"] for r in read_metrics(tmp_path / "rule")] == [1, 2]


def test_a_printed_pair_is_one_the_loss_used():
    record = dict(loss=0.7, kl=0.0, response_tokens=5, pairs=1, nonfinite=0, updated=True)
    batch = dict(texts=["short", "a longer one", "x", "yy"])
    for probs, usable, shown in (
        ([0.51, 1.0], [0.0, 1.0], 0),
        ([float("nan"), 1.0], [0.0, 1.0], 0),
    ):
        bar, out = Bar(), dict(probs=probs, usable=torch.tensor(usable), batch=batch)
        # step 10, every 10 steps: pair 1 of 2 would be shown; pair 0 at step 20
        oaif.report(dict(record, step=20), open(os.devnull, "w"), bar, 10, ["p0", "p1"], out)
        assert len(bar.lines) == shown  # a hedge dropped by triage, or nan: never "chosen"
    oaif.report(dict(record, step=10), open(os.devnull, "w"), bar, 10, ["p0", "p1"], out)
    assert "prompt: 'p1'" in bar.lines[-1] and "chosen:   'x'" in bar.lines[-1]


# --------------------------------------------------------------------------------------------------
# Found by a review of the restructured file: a kl after the update, runs sharing a folder, a
# prompts file read as another kind on resume, scoring passes that kept a KV cache


@needs_peft
def test_lora_dropout_kl_is_the_policy_before_its_update(tiny, tmp_path):
    lora = ["--lora-rank", "4", "--lr", "1e-2", "--lora-dropout", "0.3"]
    oaif.main(run_args(tiny, tmp_path, "--steps", "1", *lora))
    assert read_metrics(tmp_path)[0]["kl"] == 0.0  # at step 1 the policy is the reference


def test_runs_started_together_get_their_own_folders(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert oaif.new_run_folder("oaif-out") == os.path.join("oaif-out", "run-1")
    os.makedirs("oaif-out/run-2")  # another run claimed run-2 meanwhile
    assert oaif.new_run_folder("oaif-out") == os.path.join("oaif-out", "run-3")
    argv = ["--model", str(tmp_path / "no-model"), "--annotator", "shorter"]
    assert "cannot load model" in bad_run(argv, capsys)
    assert sorted(os.listdir("oaif-out")) == [
        "run-1",
        "run-2",
        "run-3",
    ]  # a failed start makes none


def test_resume_refuses_the_same_bytes_read_as_another_kind(tiny, tmp_path, capsys):
    lines = "".join(json.dumps(dict(prompt=f"Question {i}?")) + "\n" for i in range(8))
    (tmp_path / "p.jsonl").write_text(lines)
    (tmp_path / "p.txt").write_text(lines)  # read as lines: each prompt would be a JSON object
    out = tmp_path / "out"
    oaif.main(
        run_args(
            tiny, out, "--steps", "1", "--save-every", "1", "--prompts", str(tmp_path / "p.jsonl")
        )
    )
    msg = bad_run(
        run_args(tiny, out, "--steps", "2", "--resume", "--prompts", str(tmp_path / "p.txt")),
        capsys,
    )
    assert "--prompts" in msg


def test_scoring_passes_keep_no_kv_cache(model_tok):
    model, tok = model_tok
    seen, forward = [], model.base_model.forward

    def recording(*args, **kw):
        seen.append(kw.get("use_cache"))
        return forward(*args, **kw)

    model.base_model.forward = recording
    ids = torch.tensor([[5, 6, 7, 8]])
    oaif.sequence_logprobs(model, ids, torch.ones_like(ids), torch.ones_like(ids))
    assert seen == [False]


def test_local_judge_reads_the_answer_after_a_thinking_template(model_tok, monkeypatch):
    model, tok = model_tok
    tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    # Qwen3's way: the reply is written after an empty thinking block, the prompt ends before it
    tok.chat_template = (
        "{% for m in messages %}{% if m.role == 'user' %}<u>{{ m.content }}\n{% else %}<a>"
        "<think>\n\n</think>\n\n{{ m.content }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<a>{% endif %}"
    )
    model.resize_token_embeddings(len(tok))
    judge = oaif.LocalJudgeAnnotator(
        model,
        tok,
        instruction="Prefer the more concise response.",
        question="Is this a concise response?",
    )
    text = judge.ask("Why?", "Because.", judge.question)
    n = len(tok(text, add_special_tokens=False).input_ids)
    expected = [tok(text + w, add_special_tokens=False).input_ids[n] for w in ("Yes", "No")]
    assert judge.words == expected and "<think>" not in tok.convert_ids_to_tokens(judge.words)
    # a judge whose Yes and No begin alike would score every response 0: refused
    monkeypatch.setattr(oaif.LocalJudgeAnnotator, "reply", lambda self, word: "<think>" + word)
    with pytest.raises(oaif.OAIFError, match="one token"):
        oaif.LocalJudgeAnnotator(
            model,
            tok,
            instruction="Prefer the more concise response.",
            question="Is this a concise response?",
        )


def test_resume_without_output_dir_never_takes_an_older_run(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = run_args(tiny, "unused", "--steps", "2", "--save-every", "1")
    argv = argv[:2] + argv[4:]  # no --output-dir
    oaif.main(argv)  # run-1, with checkpoints
    oaif.main(argv[:-2])  # run-2, none
    before = (tmp_path / "oaif-out" / "run-1" / "metrics.jsonl").read_text()
    assert "run-2" in bad_run(argv + ["--resume", "--steps", "4"], capsys)
    assert (tmp_path / "oaif-out" / "run-1" / "metrics.jsonl").read_text() == before


def test_claude_passed_to_train_has_its_cost_in_the_summary(api, tiny, tmp_path, capsys):
    claude = oaif.ClaudeAnnotator(client=api().client())
    oaif.train(oaif.parse_args(run_args(tiny, tmp_path, "--steps", "1")), annotator=claude)
    assert "about $" in capsys.readouterr().err


def test_overwrite_without_output_dir_and_the_model_here(tiny, tmp_path, monkeypatch):
    shutil.copytree(tiny, tmp_path / "model")
    monkeypatch.chdir(tmp_path / "model")
    argv = run_args(".", "unused", "--steps", "1", "--overwrite")
    oaif.main(argv[:2] + argv[4:])  # a new folder: nothing of the model's is deleted
    assert (tmp_path / "model" / "oaif-out" / "run-1" / "metrics.jsonl").exists()
    assert (tmp_path / "model" / "config.json").exists()


def test_a_response_cut_at_the_cap_tells_the_annotator(model_tok, tiny, tmp_path):
    # read whole, a cut response looks finished: the annotator reads CUT after it (README: it
    # moved the 1.5B judge's on-policy agreement from 53-67% to 78-91% under "concise")
    model, tok = model_tok
    finished = oaif.sample_pairs(forced_short(model, tok), tok, ["Hi", "Why?"], 2, 8)
    cut = oaif.sample_pairs(model, tok, ["Hi", "Why?"], 2, 8)
    assert not any(t.endswith(oaif.CUT) for t in finished["texts"])
    assert all(t.endswith(oaif.CUT) for t, n in zip(cut["texts"], cut["response_tokens"]) if n == 8)
    # the annotator gets these texts; the metrics count what the policy wrote, not CUT
    seen = []

    def annotator(prompts, first, second):
        seen.extend(first + second)
        return oaif.shorter(prompts, first, second)

    cfg = oaif.parse_args(run_args(tiny, tmp_path, "--steps", "1"))
    oaif.train(cfg, annotator=annotator)
    written = [t.removesuffix(oaif.CUT) for t in seen]
    assert len(seen) == 8 and any(t.endswith(oaif.CUT) for t in seen)
    chars = read_metrics(tmp_path)[0]["response_chars"]
    assert chars == pytest.approx(sum(map(len, written)) / 8)
    # the share cut at the cap, of the responses the annotator read
    cut_share = read_metrics(tmp_path)[0]["cut_share"]
    assert cut_share == sum(t.endswith(oaif.CUT) for t in seen) / 8 and 0 < cut_share
    texts = cut["texts"]
    written = [t.removesuffix(oaif.CUT) for t in texts]
    r = oaif.win_rate(["Hi", "Why?"] * 2, texts, texts, oaif.shorter)
    assert r["policy_chars"] == pytest.approx(sum(map(len, written)) / 4)


def test_identical_responses_tie_for_the_model_annotators(model_tok, tiny_rm):
    # one text batched two ways can score apart by rounding (bf16: 0.03 on a 512-wide judge):
    # identical responses are a tie, whatever the scores
    model, tok = model_tok
    judge = oaif.LocalJudgeAnnotator(model, tok)
    judge.scores = lambda prompts, responses, questions=None: (
        torch.arange(len(responses))[:, None] / 10
    )
    assert judge(["x", "y"], ["same", "a"], ["same", "b"]) == [
        0.5,
        pytest.approx(1 / (1 + math.e**0.2)),
    ]
    rm_model, rm_tok = oaif.load_model(
        tiny_rm, torch.device("cpu"), "AutoModelForSequenceClassification"
    )
    rm = oaif.RewardModelAnnotator(rm_model, rm_tok)
    # each row's score shifted by its place in the batch, as a batch-dependent kernel might
    rm_model.score.register_forward_hook(
        lambda m, i, o: o + torch.arange(len(o), dtype=o.dtype)[:, None, None] / 10
    )
    assert rm(["x", "y"], ["same", "a"], ["same", "b"])[0] == 0.5


def test_local_judge_without_a_template_starts_as_its_tokenizer_does(model_tok):
    # Llama and Mistral base tokenizers start every text with BOS: the judge reads it too
    from tokenizers.processors import TemplateProcessing

    model, tok = model_tok
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, bos)]
    )
    assert tok("hi").input_ids[0] == bos and not getattr(tok, "chat_template", None)
    judge = oaif.LocalJudgeAnnotator(
        model,
        tok,
        instruction="Prefer the more concise response.",
        question="Is this a concise response?",
    )
    prompts, responses = ["What is a prime number?", "Hi"], ["A number with two divisors.", "Hey"]
    with torch.no_grad():
        expected = []
        for x in zip(prompts, responses):
            lg = model(torch.tensor([tok(judge.ask(*x, judge.question)).input_ids])).logits[0, -1]
            expected.append(float(lg[judge.words[0]] - lg[judge.words[1]]))
    assert judge.scores(prompts, responses)[:, 0].tolist() == pytest.approx(expected, abs=1e-5)
    # a tokenizer that only appends EOS (here the same token as BOS) starts texts with no BOS
    tok._tokenizer.post_processor = TemplateProcessing(
        single=f"$A {tok.eos_token}", special_tokens=[(tok.eos_token, tok.eos_token_id)]
    )
    assert tok.bos_token_id == tok.eos_token_id and tok("hi").input_ids[-1] == bos
    assert oaif.LocalJudgeAnnotator(model, tok).bos == []


def test_summary_counts_the_evaluations_own_annotator(api, tiny, tmp_path, capsys, monkeypatch):
    server = api()
    monkeypatch.setenv("ANTHROPIC_API_KEY", "x")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
    argv = run_args(tiny, tmp_path, "--eval-every", "1", "--eval-prompts", "4")
    oaif.main(argv + ["--eval-annotator", "claude"])
    # The summary; the last line says how the run moved.
    line = capsys.readouterr().err.strip().splitlines()[-2]
    assert server.requests > 0
    assert f"evaluation's annotator: {server.requests} requests" in line and "about $" in line


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(tiny, tmp_path, capsys):
    argv = run_args(tiny, tmp_path, "--save-every", "2")
    oaif.main(argv)
    before = (tmp_path / "metrics.jsonl").read_text()
    msg = bad_run(argv + ["--resume", "--steps", "1"], capsys)
    assert "--steps 1" in msg and "step 2" in msg
    assert (tmp_path / "metrics.jsonl").read_text() == before
