"""A fixed texture filter bank: the demo's high-rank stand-in teacher, with no weights to load or seed.

Random-weight networks answer mostly to a tile's mean colour, so their features are nearly low-rank
functions of it and the demo's nested curve (m = 16 .. full width) is flat. This bank answers to texture,
as a two-layer scattering transform does (Bruna and Mallat, https://arxiv.org/abs/1203.1513): the tile is
turned into haematoxylin, eosin and residual optical densities (Ruifrok and Johnston's stain matrix);
order 1 is the modulus of Morlet wavelets at ``octaves`` scales and ``orientations`` angles on each stain;
order 2 the modulus of coarser wavelets (``orientations_2`` angles) on those moduli, which says how the
texture is arranged. Each map is averaged over a ``grid`` x ``grid`` grid of cells, the moduli log-compressed; the
cells are the bank's patch tokens (row-major, no prefix tokens), the mean stain densities of a cell its
first three features. Every filter is a formula held as a buffer, so the bank is deterministic and its weights
hash (pipeline/weights.py, source ``fixed``) names exactly these filters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Stain vectors of haematoxylin, eosin and DAB as rows (Ruifrok and Johnston, Anal Quant Cytol Histol 2001; the
# matrix skimage.color uses): optical density = stains @ this matrix.
RGB_FROM_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))
BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)  # the low-pass of each octave step (a Burt-Adelson pyramid's)


def morlet_bank(orientations: int, size: int, sigma: float, xi: float) -> Tensor:
    """``[2 * orientations, 1, size, size]``: real parts, then imaginary parts, of zero-mean Morlet wavelets
    at angles k * pi / orientations, centre frequency ``xi`` (radians per pixel) and Gaussian width ``sigma``."""
    r = torch.arange(size, dtype=torch.float64) - size // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    envelope = torch.exp(-(x**2 + y**2) / (2 * sigma**2))
    angles = torch.arange(orientations, dtype=torch.float64) * math.pi / orientations
    along = x * torch.cos(angles).view(-1, 1, 1) + y * torch.sin(angles).view(-1, 1, 1)
    wave = torch.exp(1j * xi * along)
    beta = (envelope * wave).sum((1, 2), keepdim=True) / envelope.sum()  # Morlet's correction: no response to flat regions
    psi = envelope * (wave - beta) / envelope.sum()
    return torch.cat([psi.real, psi.imag]).unsqueeze(1).float()


class TextureBank(nn.Module):
    """Stain densities -> order-1 and order-2 wavelet moduli -> log cell means: tokens ``[B, grid**2, C]``."""

    def __init__(self, octaves: int = 4, orientations: int = 8, orientations_2: int = 4, grid: int = 14, first_octave: int = 1,
                 size: int = 7, sigma: float = 1.1, xi: float = math.pi / 2, epsilon: float = 1e-3):
        super().__init__()
        self.octaves, self.grid, self.first_octave, self.epsilon = octaves, grid, first_octave, epsilon
        self.orientations, self.orientations_2 = orientations, orientations_2
        hed_from_rgb = torch.linalg.inv(torch.tensor(RGB_FROM_HED, dtype=torch.float64))
        self.register_buffer("stain_matrix", hed_from_rgb[:, :2].T.reshape(2, 3, 1, 1).float())  # H and E; DAB is absent from H&E
        binomial = torch.tensor(BINOMIAL)
        self.register_buffer("low_pass", (torch.outer(binomial, binomial) / binomial.sum() ** 2).reshape(1, 1, 5, 5))
        self.register_buffer("order_1", morlet_bank(orientations, size, sigma, xi))
        self.register_buffer("order_2", morlet_bank(orientations_2, size, sigma, xi))
        pairs = octaves * (octaves - 1) // 2
        self.num_features = 3 + 2 * octaves * orientations + 2 * orientations * orientations_2 * pairs

    def forward(self, pixels: Tensor) -> Tensor:
        """RGB in [0, 1] ``[B, 3, H, W]`` (the spec's mean 0, std 1) -> tokens ``[B, grid**2, num_features]``."""
        density = F.conv2d(-torch.log(pixels.clamp(min=1 / 255)), self.stain_matrix)
        moduli = []
        level = density
        for _ in range(self.first_octave):  # the finest wavelength is 4 px at this octave: 2**first_octave * 4 px of the input
            level = self._down(level)
        for octave in range(self.octaves):
            level = level if octave == 0 else self._down(level)
            order_1 = self._modulus(level, self.order_1)
            moduli.append(self._cells(order_1))
            coarser = order_1
            for _ in range(octave + 1, self.octaves):  # the order-1 maps at each coarser octave, and their wavelets
                coarser = self._down(coarser)
                moduli.append(self._cells(self._modulus(coarser, self.order_2)))
        energies = torch.log(torch.cat(moduli, dim=1) + self.epsilon).flatten(2).transpose(1, 2)
        level = energies.mean(-1, keepdim=True)
        # Each cell's moduli relative to its own mean level: tissue amount and stain strength move every log modulus
        # together, and left as they are would hold nearly all the variance (the random stand-ins' flaw).
        relative = F.layer_norm(energies, energies.shape[-1:])
        return torch.cat([self._cells(density).flatten(2).transpose(1, 2), level, relative], dim=-1)

    def _modulus(self, maps: Tensor, bank: Tensor) -> Tensor:
        """|maps * wavelet| for every map and wavelet of ``bank``: ``[B, C * angles, H, W]``."""
        batch, channels, height, width = maps.shape
        angles = bank.shape[0] // 2
        pad = bank.shape[-1] // 2
        response = F.conv2d(F.pad(maps, (pad,) * 4, mode="reflect"), bank.repeat(channels, 1, 1, 1), groups=channels)
        parts = response.view(batch, channels, 2, angles, height, width)
        return torch.hypot(parts[:, :, 0], parts[:, :, 1]).view(batch, channels * angles, height, width)

    def _down(self, maps: Tensor) -> Tensor:
        """One octave down: binomial low-pass, every second pixel."""
        channels = maps.shape[1]
        return F.conv2d(F.pad(maps, (2,) * 4, mode="reflect"), self.low_pass.expand(channels, 1, 5, 5), stride=2, groups=channels)

    def _cells(self, maps: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(maps, self.grid)



class TextureTeacher(nn.Module):
    """The bank, then a linear projection of each token to ``width`` features: fitted once on the demo tiles
    (pipeline/demo/texture_teacher.py) to the bank's principal axes with their spread partly evened out, so the
    variance is held by many texture statistics rather than a few."""

    def __init__(self, width: int = 384, **bank_kwargs):
        super().__init__()
        self.bank = TextureBank(**bank_kwargs)
        self.projection = nn.Linear(self.bank.num_features, width)
        self.num_features = width

    def forward(self, pixels: Tensor) -> Tensor:
        return self.projection(self.bank(pixels))


MODELS = {"texture_scattering": TextureTeacher}
