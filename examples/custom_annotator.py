"""Plug your own annotator into oaif.train(): any function (prompts, first, second) -> P(first is
better) per pair, or None for "no verdict". Here: a rule that likes answers mentioning the prompt's
last word, judged in both orders by oaif.both_orders (a rule like this one is order-blind anyway;
an LLM is not).

    python examples/custom_annotator.py            # on the tiny offline GPT-2, ~20 s on 2 cores
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tiny_model import build_tiny_model  # noqa: E402

import oaif  # noqa: E402


def on_topic(prompts, first, second):
    """Prefer the response that repeats more letters of the prompt's last word; ties are no
    verdict."""

    def score(prompt, response):
        word = prompt.rstrip("?.!").split()[-1].lower()
        # A response cut at the length cap ends with oaif.CUT: count only what the policy wrote.
        return sum(response.removesuffix(oaif.CUT).lower().count(c) for c in set(word))

    verdicts = []
    for x, a, b in zip(prompts, first, second):
        sa, sb = score(x, a), score(x, b)
        verdicts.append(None if sa == sb else float(sa > sb))
    return verdicts


def annotator(prompts, first, second):
    return oaif.both_orders(on_topic, prompts, first, second)


if __name__ == "__main__":
    if "-h" in sys.argv or "--help" in sys.argv:
        print(__doc__)
        sys.exit(0)
    out = tempfile.mkdtemp()
    model = build_tiny_model(os.path.join(out, "tiny"))
    cfg = oaif.Config(
        model=model,
        output_dir=os.path.join(out, "run"),
        steps=30,
        batch_size=8,
        lr=3e-3,
        max_new_tokens=32,
        prompts=os.path.join(os.path.dirname(__file__), "prompts.jsonl"),
    )
    result = oaif.train(cfg, annotator=annotator)
    last = result["last"]
    print(f"last step: {last['pairs']} pairs used, reward accuracy {last['reward_accuracy']:.2f}")
    print(f"metrics in {cfg.output_dir}/metrics.jsonl")
