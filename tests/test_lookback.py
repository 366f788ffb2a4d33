"""The `lookback` analysis (the README's worked example): rates equal the argmax of the model's eager attention, on
the texts summary reads with the same seed."""

import pandas as pd
import pytest
import torch

import interp
from helpers import eager_attentions
from interp.analyses.inputs import TEXTS


@pytest.mark.parametrize("offset", [0, 1])
def test_lookback_rates_equal_the_eager_argmax(offset):
    eager = interp.load_model("stories260k", attn_implementation="eager")
    result = interp.score("stories260k", "lookback", samples=2, offset=offset)
    texts = [s["text"] for s in result.meta["plan"]]
    assert texts == [TEXTS[s["prompt"]] for s in interp.score("stories260k", "summary", samples=2).meta["plan"]]
    hits, queries = {}, 0
    for text in texts:
        inputs = eager.prepare(text, truncation=True, max_length=128)
        for layer, p in enumerate(eager_attentions(eager, inputs)):
            n = p.shape[-1]
            on_key = p[0, :, offset:].argmax(-1) == torch.arange(n - offset)  # (H, n - offset)
            for head, count in enumerate(on_key.sum(-1).tolist()):
                hits[layer, head] = hits.get((layer, head), 0) + count
        queries += n - offset
    expected = pd.Series({key: 100 * v / queries for key, v in hits.items()})
    got = result.heads.set_index(["layer", "head"])["lookback_rate"]
    assert got.sort_index().to_numpy() == pytest.approx(expected.sort_index().to_numpy(), abs=1e-4)  # one query is 0.4 %
    assert got.max() > 0


def test_lookback_refuses_a_negative_offset():
    with pytest.raises(ValueError, match="offset"):
        interp.score("stories260k", "lookback", samples=1, offset=-1)


def test_lookback_refuses_an_offset_beyond_the_samples():
    with pytest.raises(ValueError, match="offset 20: a sample has 16 tokens"):
        interp.score("stories260k", "lookback", samples=1, max_tokens=16, offset=20)
