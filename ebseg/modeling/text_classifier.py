"""CLIP's text tower as an open-vocabulary classifier, plus the learnable background row.

Class names are encoded with the 14 ViLD prompt templates: each template's embeddings are normalised,
averaged over templates and normalised again. The text tower is frozen; only ``bg_embed`` trains. Caching
the embeddings of a vocabulary is the predictor's job (the module stays pure).
"""

from __future__ import annotations

from collections.abc import Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

VILD_TEMPLATES = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)


def overlong_names(
    names: Sequence[str], *, context_length: int, templates: Sequence[str] = VILD_TEMPLATES
) -> list[str]:
    """The names whose longest prompt takes more than ``context_length`` tokens (start and end of text
    included): ``open_clip.tokenize`` would cut them silently and the class would be encoded wrong."""
    from open_clip.tokenizer import _tokenizer  # open_clip's own BPE, as tokenize() uses it

    def count(text: str) -> int:
        return len(_tokenizer.encode(text))

    room = context_length - 2  # the start- and end-of-text tokens
    longest = max(templates, key=lambda t: count(t.format("x")))
    # A prompt's count is its template's plus its name's, less at most 2 where the name's last characters
    # merge with the template's punctuation. So every template needs checking only for names within 3
    # tokens of the limit in the longest one (one tokenisation a name instead of 14: 847 names in 0.3 s).
    return [
        n
        for n in names
        if (k := count(longest.format(n))) > room
        or (k > room - 3 and any(count(t.format(n)) > room for t in templates))
    ]


class TextClassifier(nn.Module):
    """Takes the text parts of an open_clip ``CLIP`` (so its weights load by name)."""

    def __init__(self, clip: nn.Module, *, templates: Sequence[str] = VILD_TEMPLATES):
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.logit_scale = clip.logit_scale  # frozen CLIP temperature (ln 100 for the OpenAI weights)
        # The causal mask is a constant: rebuilt, not stored in checkpoints.
        self.register_buffer("attn_mask", clip.attn_mask.clone(), persistent=False)
        embed_dim = self.text_projection.shape[1]
        self.bg_embed = nn.Parameter(torch.randn(1, embed_dim) * embed_dim**-0.5)
        self.templates = tuple(templates)
        self.context_length = self.positional_embedding.shape[0]

    @property
    def embed_dim(self) -> int:
        return self.text_projection.shape[1]

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [N, L] int64, L <= context -> [N, D] unit embeddings (pooled at the end-of-text token).

        The mask is causal, so the tokens up to end-of-text never see the padding after it: a batch may
        be cut after its longest prompt without changing the result (and prompts are far shorter than 77).
        """
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        x = self.ln_final(x)
        # The end-of-text token has the largest id, so argmax finds it (CLIP's pooling rule).
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ self.text_projection
        return F.normalize(x, dim=-1)

    @torch.no_grad()
    def encode_names(self, names: Sequence[str], *, chunk: int = 256) -> torch.Tensor:
        """Prompt-ensembled class embeddings: [K, D], unit norm, on this module's device."""
        device = self.text_projection.device
        per_template = []
        for template in self.templates:
            prompts = [template.format(name) for name in names]
            tokens = open_clip.tokenize(prompts, context_length=self.context_length).to(device)
            encoded = []
            for part in tokens.split(chunk):
                end = int(part.argmax(dim=-1).max()) + 1  # past the longest prompt's end-of-text token
                encoded.append(self.encode_tokens(part[:, :end]))
            per_template.append(torch.cat(encoded))
        return F.normalize(torch.stack(per_template).mean(dim=0), dim=-1)

    def classifier(self, class_embeddings: torch.Tensor) -> torch.Tensor:
        """[K, D] class embeddings -> [K + 1, D] unit rows scaled by exp(logit_scale); background last."""
        rows = F.normalize(torch.cat([class_embeddings.to(self.bg_embed.dtype), self.bg_embed]), dim=-1)
        return self.logit_scale.exp() * rows
