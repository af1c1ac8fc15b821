"""The reference's optimiser recipe: AdamW parameter groups, poly learning rate, full-model gradient clipping.

EBSeg trains with AdamW (lr 1e-4 for B, weight decay 0.05), ``lr = base * (1 - step / max_steps) ** 0.9``
with no warmup, and clips the L2 norm of all trainable gradients together to 0.01 (detectron2's
"full_model" clipping). Weight decay is 0 for:

- parameters of normalisation modules (torch's BatchNorm / GroupNorm / InstanceNorm / LayerNorm /
  LocalResponseNorm types; a custom norm such as the fusion layers' channel LayerNorm is not one of them
  and keeps the decay, as in the reference);
- ``nn.Embedding`` parameters (the decoder's query and level embeddings);
- parameters whose own name (not the module path) contains one of :data:`NO_DECAY_NAME_PARTS`, which in
  EBSeg picks ``clip.positional_embedding`` and ``sam.pos_embed``.

Everything else decays, biases and ``text.bg_embed`` included. The reference builds one group per
parameter with identical learning rates (its LR multipliers are all 1.0); two groups give the same update.
Frozen parameters (``requires_grad=False``) are left out.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ebseg.build import apply_freezing
from pipeline.train.job import TRAINABLE_POLICIES

NO_DECAY_NAME_PARTS = (
    "absolute_pos_embed",
    "positional_embedding",
    "pos_embed",
    "query_embed",
    "relative_position_bias_table",
)
NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


# The text encoder only turns class names into embeddings, once before training, so it gets no gradient
# under any policy; its temperature and the background row are used in every forward and may train.
TEXT_ENCODER_PREFIXES = (
    "text.token_embedding",
    "text.positional_embedding",
    "text.transformer.",
    "text.ln_final.",
    "text.text_projection",
)


def set_trainable(model: nn.Module, policy: str) -> None:
    """Apply a trainable policy to a built EBSeg model.

    ``"reference"``: keep the freezing ``ebseg.build.apply_freezing`` applied (the paper's: CLIP and SAM
    frozen except their positional embeddings, plus ``text.bg_embed`` and the whole head). ``"all"``: train
    every parameter but the text encoder, for models that start from random weights (the demo), whose frozen
    random encoders would carry no signal; the paper never does this.
    """
    if policy == "reference":
        apply_freezing(model)
    elif policy == "all":
        for name, param in model.named_parameters():
            param.requires_grad = not name.startswith(TEXT_ENCODER_PREFIXES)
    else:
        raise ValueError(f"trainable must be one of {TRAINABLE_POLICIES}, got {policy!r}")


def decays(module: nn.Module, param_name: str) -> bool:
    """Whether the parameter ``param_name`` (its name inside ``module``, no dots) gets weight decay."""
    if isinstance(module, (*NORM_TYPES, nn.Embedding)):
        return False
    return not any(part in param_name for part in NO_DECAY_NAME_PARTS)


def param_groups(model: nn.Module, *, weight_decay: float) -> list[dict]:
    """Two AdamW groups, ``decay`` and ``no_decay``, of the trainable parameters of ``model``.

    Each group carries ``param_names`` (full dotted names) so tests and logs can see the split; a parameter
    shared by two modules is counted once, under the first module that owns it.
    """
    seen: set[int] = set()
    groups = {
        True: {"params": [], "param_names": [], "weight_decay": weight_decay, "name": "decay"},
        False: {"params": [], "param_names": [], "weight_decay": 0.0, "name": "no_decay"},
    }
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            group = groups[decays(module, name)]
            group["params"].append(param)
            group["param_names"].append(f"{module_name}.{name}" if module_name else name)
    return [group for group in groups.values() if group["params"]]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (torch defaults: betas (0.9, 0.999), eps 1e-8) over :func:`param_groups`."""
    groups = param_groups(model, weight_decay=weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters (check the trainable policy)")
    return torch.optim.AdamW(groups, lr=lr)


class PolyDecay:
    """LR factor ``(1 - step / max_steps) ** power`` (detectron2's WarmupPolyLR without warmup).

    A class rather than a lambda so ``LambdaLR.state_dict`` can save it; 0 from ``max_steps`` on.
    """

    def __init__(self, max_steps: int, power: float = 0.9):
        if max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {max_steps}")
        self.max_steps = max_steps
        self.power = power

    def __call__(self, step: int) -> float:
        return max(0.0, 1.0 - step / self.max_steps) ** self.power


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, max_steps: int, power: float = 0.9
) -> torch.optim.lr_scheduler.LambdaLR:
    """Poly schedule stepped once per optimiser step; after ``k`` steps the LR is ``base * decay(k)``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, PolyDecay(max_steps, power))


def poly_lr(base_lr: float, step: int, *, max_steps: int, power: float = 0.9) -> float:
    """The learning rate used for the optimiser step after ``step`` completed steps."""
    return base_lr * PolyDecay(max_steps, power)(step)


def clip_gradients(params: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor | None:
    """Clip the joint L2 norm of all gradients to ``max_norm`` (the reference: 0.01 over every trainable
    parameter, after AMP unscaling). Returns the norm before clipping, or None when clipping is off."""
    if max_norm is None or max_norm <= 0:
        return None
    return torch.nn.utils.clip_grad_norm_(list(params), max_norm)


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every parameter the optimiser updates (the reference clips exactly these)."""
    return [p for group in optimizer.param_groups for p in group["params"]]
