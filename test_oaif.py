"""Tests for oaif.py: oracles for the math, a tiny random GPT-2 built offline for everything else, and a
stand-in Messages API on 127.0.0.1 for the Claude annotator (the real anthropic SDK, over real HTTP).

    python -m pytest -q test_oaif.py
"""
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import oaif

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "examples"))
from standin_messages_api import StandInMessagesAPI  # noqa: E402  (POST /v1/messages on 127.0.0.1)
from tiny_model import build_tiny_model  # noqa: E402  (a random GPT-2 + BPE tokenizer, built offline)


# ----------------------------------------------------------------------------------------------------------
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
    return ["--model", tiny, "--output-dir", str(out), "--annotator", "shorter", "--steps", "2", "--batch-size",
            "4", "--max-new-tokens", "8", "--lr", "1e-3", "--sample-every", "0", *extra]


# ----------------------------------------------------------------------------------------------------------
# Losses: values at hand-computed points and gradient signs


def logps(h: float):
    """Four (1,) log-prob tensors with margin h (policy_chosen carries it), policy ones requiring grad."""
    pc, pr = torch.tensor([h - 3.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True)
    return pc, pr, torch.tensor([-3.0]), torch.tensor([-5.0])


def test_dpo_at_zero_margin_is_log2():
    assert oaif.dpo_loss(*logps(0.0), beta=0.1).item() == pytest.approx(math.log(2))
    assert oaif.dpo_loss(*logps(10.0), beta=0.1).item() == pytest.approx(math.log(1 + math.exp(-1.0)))


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
    assert pc.grad.item() < 0 < pr.grad.item()  # descent raises the chosen log-prob, lowers the rejected


def test_losses_reject_bad_shapes():
    with pytest.raises(AssertionError):
        oaif.dpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(2))


# ----------------------------------------------------------------------------------------------------------
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
    scale = lambda t: 1 + t.abs().max().item()  # relative to the size of what is compared
    assert (out.double() - ref).abs().max().item() <= tol * scale(ref)
    assert (hidden.grad.double() - h64.grad).abs().max().item() <= tol * scale(h64.grad)
    assert (weight.grad.double() - w64.grad).abs().max().item() <= tol * scale(w64.grad)
    assert weight.grad.dtype == weight.dtype and hidden.grad.dtype == hidden.dtype


@pytest.mark.parametrize("chunk", [None, 1, 7, 64, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_logprobs_matches_float64(chunk, temperature):
    check_against_oracle(N=50, H=16, V=97, chunk=chunk, temperature=temperature)


def test_fused_logprobs_bf16_inputs():
    # bf16 hidden states: logits are rounded to bf16 (8-bit mantissa) before the float32 logsumexp, so the
    # values and gradients are good to about 1e-2 relative, like any bf16 matmul.
    check_against_oracle(N=40, H=32, V=211, chunk=16, dtype=torch.bfloat16, tol=3e-2)


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
    batch = oaif.pair_batch(prompts, [[5, 6, 7], [9]], [[8], [10, 11, 12, 13]], tok.pad_token_id, "cpu")
    ours = oaif.sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    ours.sum().backward()
    grad_ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = hf_sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    ref.sum().backward()
    assert ours.shape == (4,)
    assert torch.allclose(ours, ref, atol=1e-4)
    wte = "transformer.wte.weight"  # GPT-2 ties it to the LM head: the head's gradient must land here too
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert torch.allclose(grad_ours[wte], model.transformer.wte.weight.grad, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(grad_ours[n], p.grad, atol=1e-5), n


# ----------------------------------------------------------------------------------------------------------
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
        assert eos not in r[:k - 1].tolist()  # and has none before
        assert text == tok.decode(r[:k], skip_special_tokens=True)
    assert torch.equal(s["attention_mask"][:, P:], rmask)  # nothing after EOS is attended


def test_left_padded_batch_generates_like_single_prompts(model_tok):
    model, tok = model_tok
    prompts = ["Explain recursion to a child.", "Hi"]
    batched = oaif.sample_pairs(model, tok, prompts, n=1, max_new_tokens=10, temperature=0)["texts"]
    alone = [oaif.sample_pairs(model, tok, [p], n=1, max_new_tokens=10, temperature=0)["texts"][0] for p in prompts]
    assert batched == alone


def test_chat_template_is_used_when_present(model_tok):
    _, tok = model_tok
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    assert oaif.encode_prompts(tok, ["hello"]) == [tok("<user>hello<assistant>").input_ids]


# ----------------------------------------------------------------------------------------------------------
# Annotators that need no network


def test_shorter_and_both_orders():
    assert oaif.shorter(["x"] * 3, ["ab", "abc", "ab"], ["abc", "ab", "cd"]) == [1.0, 0.0, None]
    biased = lambda p, a, b: [1.0] * len(p)  # always prefers whatever it sees first
    assert oaif.both_orders(biased, ["x", "y"], ["a", "b"], ["c", "d"]) == [0.5, 0.5]
    fair = lambda p, a, b: oaif.shorter(p, a, b)
    assert oaif.both_orders(fair, ["x", "y"], ["a", "bbb"], ["cc", "d"]) == [1.0, 0.0]


@pytest.mark.parametrize("reply,verdict", [
    ("Response 1 is clearer.\nPreferred Response=1", 1.0), ("Preferred Response=2.", 0.0), ("2", 0.0),
    ("**Preferred Summary=1**", 1.0), ("I rate them 10 and 12", None), ("Both are fine.", None), ("", None),
    ("Preferred Response=3", None), ("1 is better than 2 but I can't decide", None)])
def test_parse_verdict(reply, verdict):
    assert oaif.parse_verdict(reply) == verdict


def test_position_biased_annotator_trains_nothing(tiny, tmp_path):
    cfg = oaif.parse_args(run_args(tiny, tmp_path))
    before = oaif.load_model(tiny, torch.device("cpu"))[0].state_dict()
    biased = lambda p, a, b: oaif.both_orders(lambda p, a, b: [1.0] * len(p), p, a, b)
    out = oaif.train(cfg, annotator=biased)
    rows = read_metrics(tmp_path)
    assert [r["pairs"] for r in rows] == [0, 0] and [r["dropped"] for r in rows] == [4, 4]
    assert not any(r["updated"] for r in rows) and out["summary"]["ties"] == 8
    after = oaif.load_model(str(tmp_path), torch.device("cpu"))[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------------------------------------
# The online loop end to end


def test_online_loop_learns_shorter_responses(tiny, tmp_path):
    """The issue's bar: tiny GPT-2, `shorter`, lr 3e-3, 60 steps of 8 prompts, 32 new tokens: the mean
    response length of the last 5 steps is under half that of the first 5."""
    oaif.main(["--model", tiny, "--output-dir", str(tmp_path), "--annotator", "shorter", "--lr", "3e-3",
               "--steps", "60", "--batch-size", "8", "--max-new-tokens", "32", "--sample-every", "0"])
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 61))
    first = sum(r["response_chars"] for r in rows[:5]) / 5
    last = sum(r["response_chars"] for r in rows[-5:]) / 5
    assert last < first / 2, (first, last)
    assert all(r["pairs"] + r["dropped"] == 8 for r in rows)
    assert sum(r["pairs"] for r in rows) > 0.5 * 8 * 60
    assert rows[-1]["kl"] > 0  # the policy moved away from the reference on its own samples
    for key in ("loss", "reward_margin", "reward_accuracy", "response_tokens", "seconds", "sample_s",
                "annotate_s", "train_s"):
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
    oaif.main(run_args(tiny, tmp_path, "--dtype", "bfloat16", "--loss", loss, "--average-logps"))
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path))


def test_parse_args_round_trip():
    cfg = oaif.parse_args(["--model", "m", "--steps", "3", "--loss", "ipo", "--beta", "0.5", "--offline"])
    assert (cfg.model, cfg.steps, cfg.loss, cfg.beta, cfg.offline) == ("m", 3, "ipo", 0.5, True)
    assert oaif.parse_args([]) == oaif.Config()


def bad_run(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        oaif.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("oaif: error: ") and "\n" not in msg and "Traceback" not in capsys.readouterr().err
    return msg


def test_bad_inputs_give_one_line(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert "not found" in bad_run(run_args(tiny, out, "--prompts", str(tmp_path / "nope.txt")), capsys)
    (tmp_path / "empty.txt").write_text("\n\n")
    assert "empty" in bad_run(run_args(tiny, out, "--prompts", str(tmp_path / "empty.txt")), capsys)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert "bad.jsonl:2" in bad_run(run_args(tiny, out, "--prompts", str(tmp_path / "bad.jsonl")), capsys)
    (tmp_path / "long.txt").write_text("word " * 2000 + "\n")
    assert "context" in bad_run(run_args(tiny, out, "--prompts", str(tmp_path / "long.txt")), capsys)
    assert "cannot load model" in bad_run(run_args(str(tmp_path / "no-model"), out), capsys)
    assert "unknown --loss" in bad_run(run_args(tiny, out, "--loss", "ppo"), capsys)
    assert not out.exists()  # nothing half-written


def test_prompts_files(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "one", "id": 1}\n{"prompt": "two"}\n')
    assert oaif.load_prompts(str(tmp_path / "p.txt")) == oaif.load_prompts(str(tmp_path / "p.jsonl")) == ["one", "two"]
    assert len(oaif.load_prompts("")) >= 32


# ----------------------------------------------------------------------------------------------------------
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
    assert claude(["q"], ["same"], ["same"]) == [None] and server.requests == 4  # identical: no call


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
    assert claude.stats["annotator_failures"] == 4 and server.requests == 8  # 4 requests, each tried twice


@pytest.mark.parametrize("reply", ["", "I cannot decide.", "Preferred Response=3", "1 or 2? both good"])
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
    return subprocess.run([sys.executable, os.path.join(HERE, "oaif.py"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=HERE)


def test_cli_with_claude_end_to_end(api, tiny, tmp_path):
    server = api()
    key = "sk-ant-secret-0123456789"
    out = tmp_path / "run"
    r = run_cli(["--model", tiny, "--output-dir", str(out), "--steps", "3", "--batch-size", "4",
                 "--max-new-tokens", "8", "--lr", "1e-3", "--instruction", "Prefer the shorter response."],
                {"ANTHROPIC_API_KEY": key, "ANTHROPIC_BASE_URL": server.url})
    assert r.returncode == 0, r.stderr
    rows = read_metrics(out)
    assert len(rows) == 3 and server.keys and all(key in k for k in server.keys)  # the SDK sent our key
    assert sum(row["annotator_requests"] for row in rows) == server.requests > 0
    assert all(row["pairs"] + row["dropped"] == 4 for row in rows) and sum(row["pairs"] for row in rows) > 0
    assert "requests" in r.stderr and "annotator: claude" in r.stderr
    everything = r.stdout + r.stderr + "".join(p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file())
    assert key not in everything


def test_cli_stops_on_bad_key(api, tiny, tmp_path):
    server = api(always=401)
    r = run_cli(["--model", tiny, "--output-dir", str(tmp_path / "run"), "--steps", "3", "--batch-size", "2",
                 "--max-new-tokens", "8", "--annotator", "claude"],
                {"ANTHROPIC_API_KEY": "bad", "ANTHROPIC_BASE_URL": server.url})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "oaif: error: the Claude API refused the annotator's request: 401" in r.stderr


def test_local_judge_is_soft_and_order_symmetric(model_tok):
    model, tok = model_tok
    judge = oaif.LocalJudgeAnnotator(model, tok, task="tldr")
    prompts, a, b = ["Why do we dream?", "Hi"], ["Because.", "Hello there"], ["Nobody knows why.", "Hey"]
    raw = judge.judge(prompts, a, b)
    assert all(0 < p < 1 for p in raw)
    p_ab, p_ba = judge(prompts, a, b), judge(prompts, b, a)
    assert all(0 <= p <= 1 for p in p_ab)
    assert p_ab == pytest.approx([1 - p for p in p_ba], abs=1e-6)  # flips when the order flips
    assert judge(["x"], ["same"], ["same"]) == [pytest.approx(0.5)]


# ----------------------------------------------------------------------------------------------------------
# Win rate, evaluation records and the offline baseline


def tie_if_equal_else_shorter(prompts, first, second):
    return [0.5 if a == b else p for a, b, p in zip(first, second, oaif.shorter(prompts, first, second))]


def test_win_rate_against_itself_is_one_half_with_ties(model_tok):
    model, tok = model_tok
    r = oaif.win_rate(model, model, tok, oaif.DEFAULT_PROMPTS[:6], tie_if_equal_else_shorter, max_new_tokens=8,
                      temperature=0)  # greedy: the same model gives the same responses
    assert r["policy_chars"] == r["reference_chars"]
    assert {k: r[k] for k in ("win_rate", "n", "wins", "ties", "losses", "no_verdict")} == dict(
        win_rate=0.5, n=6, wins=0, ties=6, losses=0, no_verdict=0)


def test_win_rate_of_a_policy_forced_short_is_one(model_tok):
    import copy

    model, tok = model_tok
    short = copy.deepcopy(model)
    with torch.no_grad():  # every final hidden state is 100 v and EOS's (tied) embedding is v: EOS wins
        v = torch.ones(short.config.n_embd) / short.config.n_embd ** 0.5
        short.transformer.ln_f.weight.zero_()
        short.transformer.ln_f.bias.copy_(100 * v)
        short.transformer.wte.weight[tok.eos_token_id] = v
    torch.manual_seed(0)
    r = oaif.win_rate(short, model, tok, oaif.DEFAULT_PROMPTS[:6], oaif.shorter, max_new_tokens=8, batch_size=4)
    assert r["win_rate"] == 1.0 and r["wins"] == r["n"] and r["n"] + r["no_verdict"] == 6 and r["n"] >= 5


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

    cfg = oaif.parse_args(run_args(tiny, tmp_path, "--steps", "12", "--eval-every", "12", "--eval-prompts", "8"))
    oaif.train(cfg, annotator=recording)
    train_seen, eval_seen = {p for call in seen[:-2] for p in call}, seen[-2] + seen[-1]  # eval: 2 batches of 4
    assert len(set(eval_seen)) == 8 and not train_seen & set(eval_seen)  # 12 steps x 4 cover all 32 training prompts
    assert len(train_seen) == len(oaif.DEFAULT_PROMPTS) - 8


def test_offline_trains_on_a_fixed_set(tiny, tmp_path):
    calls = []

    def recording(prompts, first, second):
        calls.append(list(zip(prompts, first, second)))
        return oaif.shorter(prompts, first, second)

    (tmp_path / "p.txt").write_text("Why do we dream?\nWhat is inflation?\nHow do bees make honey?\nWhat is a prime?\n")
    cfg = oaif.parse_args(run_args(tiny, tmp_path / "off", "--steps", "4", "--offline", "--prompts",
                                   str(tmp_path / "p.txt")))
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


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and resume; two Gloo ranks


def final_params(path) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).state_dict()


def test_resume_is_exact(tiny, tmp_path):
    oaif.main(run_args(tiny, tmp_path / "straight", "--steps", "4"))
    oaif.main(run_args(tiny, tmp_path / "resumed", "--steps", "2", "--save-every", "2"))
    assert os.path.isfile(tmp_path / "resumed" / "checkpoint-2" / "trainer_state.pt")
    os.makedirs(tmp_path / "resumed" / "checkpoint-3")  # a checkpoint cut off mid-write: must be ignored
    oaif.main(run_args(tiny, tmp_path / "resumed", "--steps", "4", "--resume"))
    a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    straight = read_metrics(tmp_path / "straight")
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight]


def test_keep_checkpoints_and_incomplete_ones_ignored(tiny, tmp_path):
    oaif.main(run_args(tiny, tmp_path, "--steps", "3", "--save-every", "1", "--keep-checkpoints", "2"))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    os.remove(tmp_path / "checkpoint-3" / "trainer_state.pt")
    assert oaif.complete_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-2")]


def test_two_gloo_ranks_match_one_process(tiny, tmp_path):
    # Sampling and annotation made deterministic with fixed pairs: the only difference left is the split.
    pairs = [{"prompt": f"Question {i}?", "chosen": "Yes." * (i % 3 + 1), "rejected": f"No, {i} times no."}
             for i in range(8)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    args = run_args(tiny, tmp_path / "one", "--steps", "3", "--offline-data", str(tmp_path / "pairs.jsonl"))
    oaif.main(args)
    two = [a if a != str(tmp_path / "one") else str(tmp_path / "two") for a in args]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29517", os.path.join(HERE, "oaif.py"), *two], capture_output=True, text=True, timeout=300,
                       cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    one, dist = final_params(tmp_path / "one"), final_params(tmp_path / "two")
    assert all(torch.allclose(one[k], dist[k], atol=1e-5) for k in one)
    assert not all(torch.equal(one[k], final_params(tiny)[k]) for k in one)  # and training did move them
    rows_one, rows_two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["pairs"] for r in rows_two] == [r["pairs"] for r in rows_one] == [4, 4, 4]  # reduced over ranks
    assert [r["loss"] for r in rows_two] == pytest.approx([r["loss"] for r in rows_one], abs=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Examples run


EXAMPLES = ["bench_logprobs.py", "bench_step.py", "bench_vs_trl.py", "custom_annotator.py", "length_control.py",
            "online_vs_offline.py", "plot_metrics.py", "standin_messages_api.py", "tiny_model.py"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_help(name):
    r = subprocess.run([sys.executable, os.path.join(HERE, "examples", name), "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and len(r.stdout) > 100, r.stderr  # its usage or docstring


def test_online_vs_offline_tiny_two_steps(tmp_path, capsys):
    sys.path.insert(0, os.path.join(HERE, "examples"))
    import online_vs_offline

    arms = online_vs_offline.main(["--tiny", "--steps", "2", "--eval-every", "2", "--eval-prompts", "4",
                                   "--batch-size", "4", "--max-new-tokens", "8", "--out", str(tmp_path)])
    assert [len(arms[a][0]) for a in ("online", "offline")] == [2, 2]
    assert all(arms[a][1][-1]["step"] == 2 for a in arms)
    assert "win rate against the initial policy" in capsys.readouterr().out


def test_bench_logprobs_quick(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(HERE, "examples", "bench_logprobs.py"), "--quick", "--json",
                        str(tmp_path / "b.json")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.load(open(tmp_path / "b.json"))
    assert {r["variant"] for r in rows} == {"naive", "selective", "fused"}
    assert all(r["max_err"] < 1e-4 for r in rows)  # every variant computes the same log-probs


def test_plot_metrics_table(tiny, tmp_path):
    oaif.main(run_args(tiny, tmp_path, "--eval-every", "2", "--eval-prompts", "4"))
    r = subprocess.run([sys.executable, os.path.join(HERE, "examples", "plot_metrics.py"),
                        str(tmp_path / "metrics.jsonl"), "--png", str(tmp_path / "c.png")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c.png").exists() or "win rate" in r.stdout  # a plot with matplotlib, a table without
