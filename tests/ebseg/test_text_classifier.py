"""The text classifier: prompt ensembling, the background row, and the exact token-length cut."""

from __future__ import annotations

import open_clip
import pytest
import torch

from ebseg.build import build_ebseg
from ebseg.modeling.text_classifier import VILD_TEMPLATES


@pytest.fixture(scope="module")
def text():
    torch.manual_seed(0)
    return build_ebseg("tiny").text.eval()


def test_cutting_tokens_after_the_longest_prompt_changes_nothing(text):
    tokens = open_clip.tokenize(["a photo of a cat.", "There is a large traffic light in the scene."])
    end = int(tokens.argmax(-1).max()) + 1
    assert end < 20
    with torch.no_grad():
        full = text.encode_tokens(tokens)
        cut = text.encode_tokens(tokens[:, :end])
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-6)


def test_names_are_ensembled_over_the_vild_templates(text):
    assert len(VILD_TEMPLATES) == 14
    names = ["cat", "dog, puppy"]
    with torch.no_grad():
        emb = text.encode_names(names)
        per_template = torch.stack(
            [text.encode_tokens(open_clip.tokenize([t.format(n) for n in names])) for t in VILD_TEMPLATES]
        )
    expected = torch.nn.functional.normalize(per_template.mean(0), dim=-1)
    torch.testing.assert_close(emb, expected, rtol=1e-5, atol=1e-6)
    assert emb.shape == (2, text.embed_dim)


def test_classifier_appends_the_scaled_background_row(text):
    emb = torch.nn.functional.normalize(torch.randn(3, text.embed_dim), dim=-1)
    rows = text.classifier(emb)
    scale = text.logit_scale.exp()
    assert rows.shape == (4, text.embed_dim)
    torch.testing.assert_close(rows.norm(dim=-1), scale.expand(4))
    torch.testing.assert_close(rows[-1] / scale, torch.nn.functional.normalize(text.bg_embed[0], dim=-1))


def test_overlong_names_agree_with_tokenizing_every_prompt():
    from open_clip.tokenizer import _tokenizer

    from ebseg.modeling.text_classifier import VILD_TEMPLATES, overlong_names

    # Names around the limit, some ending in punctuation that merges with a template's ".".
    names = [" ".join(["word"] * k) + end for k in range(58, 70) for end in ("", ".", "!?", "-x")] + ["cat"]
    brute = [n for n in names if any(len(_tokenizer.encode(t.format(n))) > 75 for t in VILD_TEMPLATES)]
    assert overlong_names(names, context_length=77) == brute
    assert brute and "cat" not in brute and len(brute) < len(names)
