"""Point sampling for the mask costs and losses (PointRend style).

Points are normalised (x, y) coordinates in [0, 1]^2 over the whole padded canvas, so a [H/4, W/4]
prediction and an [H, W] target are read at the same places. Every sampler takes an optional
``torch.Generator`` so that a run can be repeated exactly, and :func:`pixel_centres` replaces random
points by every pixel centre of a grid (deterministic; the reference's parity run uses it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def point_sample(inputs: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear reads of ``inputs`` at ``coords`` (zeros outside, ``align_corners=False``).

    inputs: [N, H, W]; coords: [N, P, 2] (x, y) in [0, 1] -> [N, P] in the inputs' dtype (bool and
    integer inputs are read as float32).
    """
    if not inputs.is_floating_point():
        inputs = inputs.float()
    grid = (2.0 * coords - 1.0).to(inputs.dtype).unsqueeze(2)  # [N, P, 1, 2]
    out = F.grid_sample(inputs.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, 0, :, 0]


def uniform_points(
    count: int,
    num_points: int,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[count, num_points, 2] float32 points drawn uniformly in [0, 1]^2.

    With a generator the draw happens on the generator's device and is then moved, so one CPU
    generator fixes the points of a GPU run as well.
    """
    where = generator.device if generator is not None else device
    points = torch.rand(count, num_points, 2, generator=generator, device=where)
    return points.to(device)


def pixel_centres(height: int, width: int, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """[height * width, 2] float32: ((j + 0.5) / width, (i + 0.5) / height), row-major over (i, j).

    Reading an [height, width] map at these points returns it exactly.
    """
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1)


def uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Mask-logit uncertainty: highest where the logit is closest to 0."""
    return -logits.abs()


@torch.no_grad()
def uncertain_points(
    logits: torch.Tensor,
    num_points: int,
    *,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PointRend's importance sampling: [N, num_points, 2] points per mask.

    logits: [N, h, w] mask logits. Draws ``num_points * oversample_ratio`` uniform candidates, keeps
    the ``importance_sample_ratio * num_points`` most uncertain of them (|logit| smallest) and fills the
    rest with fresh uniform points, so the loss looks at boundaries without ignoring the interior.
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    count = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    candidates = uniform_points(count, num_sampled, device=logits.device, generator=generator)
    scores = uncertainty(point_sample(logits, candidates))  # [N, num_sampled]
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    index = scores.topk(num_uncertain, dim=1).indices  # [N, num_uncertain]
    chosen = torch.gather(candidates, 1, index.unsqueeze(-1).expand(-1, -1, 2))
    if num_random == 0:
        return chosen
    fresh = uniform_points(count, num_random, device=logits.device, generator=generator)
    return torch.cat([chosen, fresh], dim=1)
