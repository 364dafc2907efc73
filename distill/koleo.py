"""The KoLeo regulariser on the nested embedding (distill.koleo_weight): it spreads a batch's embeddings
apart, so that no prefix z[:m] collapses to a few directions while its heads still fit the teachers.

KoLeo (the Kozachenko-Leonenko entropy estimator; Sablayrolles et al., "Spreading vectors for similarity
search", https://arxiv.org/abs/1806.03198), as DINOv2 uses it
(https://github.com/facebookresearch/dinov2/blob/main/dinov2/loss/koleo_loss.py): on L2-normalised
vectors, minus the mean log of each one's distance to its nearest neighbour in the batch,

    KoLeo(x) = -1/n sum_i log(min_{j != i} |x_i - x_j| + eps),    x_i = v_i / |v_i|

taken here on every nested prefix z[:m] and averaged over the nested dims.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-8  # DINOv2's, inside the log and in the pairwise distance


def koleo(vectors: Tensor) -> Tensor:
    """KoLeo of a batch [n >= 2, d], in fp32. The nearest neighbour is chosen without gradient (the
    largest dot product of unit vectors); the gradient flows through its distance."""
    if len(vectors) < 2:
        raise ValueError(f"KoLeo needs at least 2 vectors in a batch, got {len(vectors)}: raise distill.batch_size")
    unit = F.normalize(vectors.float(), dim=-1, eps=EPS)
    with torch.no_grad():
        dots = unit @ unit.T
        dots.fill_diagonal_(-2.0)  # below any cosine: a vector is never its own neighbour
        nearest = dots.argmax(dim=1)
    distances = F.pairwise_distance(unit, unit[nearest], eps=EPS)
    return -torch.log(distances + EPS).mean()


def nested_koleo(z: Tensor, nested_dims: Sequence[int]) -> Tensor:
    """KoLeo of each prefix z[:, :m], averaged over the nested dims."""
    return torch.stack([koleo(z[:, :m]) for m in nested_dims]).mean()
