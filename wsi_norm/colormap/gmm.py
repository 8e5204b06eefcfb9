"""The mixture-model colour map (``--method gmm``): DCGMM's per-component moment match, per pixel.

For a pixel with HSD coordinates ``x`` (:mod:`wsi_norm.stain.hsd`, optical density against the
source's white point)::

    y = sum_k gamma_k(x) * (mu_j(k)^t + sigma_j(k)^t / sigma_k^s * (x - mu_k^s))

channel by channel (diagonal covariances), where ``j(k)`` is the target component matched to
source component ``k`` (:func:`wsi_norm.stain.gmm.match_components`; a component without a match
uses the slides' global HSD moments instead), and ``gamma_k(x)`` are the source mixture's
posterior memberships, **tempered** and **bounded**:

* tempered: ``gamma = softmax(log(pi_k N(x; mu_k, sigma_k)) / T)`` with ``T =``
  :data:`MEMBERSHIP_TEMPERATURE`, so the hand-over between two components with different moment
  maps is spread over more colours and a one-level input step cannot jump between them;
* bounded: the map is evaluated at ``x`` clipped to a box of tissue colours (the source's
  slide-wide HSD mean +- 2.5 standard deviations per channel, widened to hold every component
  mean), so outside the tissue's colours (saturated corners of the RGB cube) memberships stop
  changing instead of switching suddenly between two far-apart components; beyond the box a pixel
  gets the optical-density change of its box point added to its own optical density (a constant
  shift per channel, whose slope is that of white balance), not the components' scales.

Each component's per-channel scale ``sigma^t / sigma^s`` is kept within [1/2, 2]: two independent
fits split tissue differently, and a component's spread ratio is then noise that a raw ratio (up to
8.4 between the real pairs) would amplify. Chromaticity is rendered at no more than 1.5 times the
input pixel's own density (``D_e``), so a pale pixel lifted to a dark one does not have its
chromatic noise (``c = OD / D``) amplified by the density ratio.

Continuity (one-level input steps, measured on the real pairs above): <= 4 levels on tissue
colours, <= 7 over the glass band and over the cube once every channel is >= 16, up to 45 at the
cube's dark faces (a channel at 0-15: 0 -> 1 is 0.69 OD, which HSD's density, the mean of the
three channels, carries into every channel; Macenko's map reaches 16 there).
``tests/unit/test_stain_gmm.py`` holds these.

``y`` goes back to optical density and is rendered into the target's white point,
``(wt + 1) exp(-od) - 1``. The map is a function of the pixel alone: one 256^3 LUT, no seams.
Glass (``D`` near 0) is handed to the target's white point by a :class:`GlassBlend`, exactly as
Reinhard's map does (``glass="keep"`` keeps the source's glass).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from wsi_norm.color import DEFAULT_WHITE, _white_channels
from wsi_norm.colormap.maps import ColorMap, GlassBlend, planar_intensity, planar_od
from wsi_norm.stain.gmm import ComponentMatch, GmmStats, match_components
from wsi_norm.stain.hsd import effective_density, hsd_from_od, od_from_hsd

__all__ = ["MEMBERSHIP_TEMPERATURE", "GmmMap"]

MEMBERSHIP_TEMPERATURE = 16.0
"""``T``: log-memberships are divided by it before the softmax (1 = the mixture's posteriors; 16 is
as if every component were 4 times wider, with its weight's say cut alike). Chosen on the real pairs
(CMU-1-Small-Region and the two torchstain patches, all six directions, 10^5 seeded one-level steps
with every channel >= 16): the largest output step is 64 levels at T = 1, 23 at T = 4 and 7 at
T = 16, where two components' maps hand over; the composition test (generated, nuclei 10 % vs
40 %) keeps a mean CIEDE2000 under 1 at T = 1, 4 and 16."""
#: The box: the source's slide-wide HSD mean +- this many standard deviations (widened to hold
#: every component mean).
_BOX_STDS = 2.5
#: A component's per-channel scale sigma^t / sigma^s is kept within [1 / this, this].
_MAX_SCALE = 2.0
#: Chromaticity is rendered at most at this many times the input pixel's (effective) density.
_CHROMA_GAIN = 1.5


class GmmMap(ColorMap):
    """Per-component moment matching in HSD with tempered memberships of the source mixture.

    Parameters
    ----------
    source, target : GmmStats
        The source slide's and the template's mixtures.
    source_white, target_white : float or (3,) float, keyword-only
        White points (glass intensity per channel) of the source and the target; 240.
    glass : GlassBlend, keyword-only, optional
        Hand glass over to the target's white (``mode="target"``) or keep it (``"keep"``).
    temperature : float, keyword-only
        Membership temperature ``T`` (> 0); :data:`MEMBERSHIP_TEMPERATURE`.

    Attributes
    ----------
    match : ComponentMatch
        Which target component each source component maps to, and the fallbacks taken.
    scale, offset : (K_s, 3) float64
        Component k's map ``y = offset[k] + scale[k] * x`` in HSD.

    Raises
    ------
    ValueError
        A temperature that is not a positive finite number.
    """

    method: ClassVar[str] = "gmm"

    def __init__(
        self,
        source: GmmStats,
        target: GmmStats,
        *,
        source_white: Any = DEFAULT_WHITE,
        target_white: Any = DEFAULT_WHITE,
        glass: GlassBlend | None = None,
        temperature: float = MEMBERSHIP_TEMPERATURE,
    ) -> None:
        super().__init__(glass=glass)
        if not (np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {temperature}")
        self.source_white = _white_channels(source_white)
        self.target_white = _white_channels(target_white)
        self.temperature = float(temperature)
        self.match: ComponentMatch = match_components(source, target)
        k_s = source.n_components
        mu_t = np.empty((k_s, 3))
        sigma_t = np.empty((k_s, 3))
        mu_s = np.empty((k_s, 3))
        sigma_s = np.empty((k_s, 3))
        for k, j in enumerate(self.match.target_index):
            if j < 0:  # absent in the target: the global moment match
                mu_s[k], sigma_s[k] = source.global_mean, source.global_std
                mu_t[k], sigma_t[k] = target.global_mean, target.global_std
            else:
                mu_s[k], sigma_s[k] = source.means[k], source.stds[k]
                mu_t[k], sigma_t[k] = target.means[j], target.stds[j]
        self.scale = np.clip(sigma_t / sigma_s, 1.0 / _MAX_SCALE, _MAX_SCALE)
        self.offset = mu_t - self.scale * mu_s
        # memberships: log(pi_k) - sum_c log(sigma_kc) - sum_c (x_c - mu_kc)^2 / (2 sigma_kc^2)
        self._log_prior = np.log(source.weights) - np.log(source.stds).sum(axis=1)
        self._means = source.means.copy()
        self._half_precision = 0.5 / source.stds**2
        self._box_lo = np.minimum(source.global_mean - _BOX_STDS * source.global_std, source.means.min(axis=0))
        self._box_hi = np.maximum(source.global_mean + _BOX_STDS * source.global_std, source.means.max(axis=0))

    def notes(self) -> dict[str, Any]:
        """Provenance: components, temperature and the matching (fallbacks included)."""
        return {"gmm": {"source_components": len(self.match.target_index), "temperature": self.temperature,
                        "fallbacks": self.match.fallbacks, "match": self.match.to_dict()}}

    def _inside(self, xp: ModuleType, hsd: list[Any]) -> list[Any]:
        """Planar HSD clipped to the source mixture's box."""
        return [xp.clip(hsd[c], float(self._box_lo[c]), float(self._box_hi[c])) for c in range(3)]

    def memberships(self, xp: ModuleType, hsd: list[Any]) -> list[Any]:
        """Tempered memberships ``gamma_k`` of planar HSD channels (a list of K arrays summing to 1)."""
        return self._memberships_inside(xp, self._inside(xp, hsd))

    def _memberships_inside(self, xp: ModuleType, x: list[Any]) -> list[Any]:
        logits = []
        for k in range(len(self._means)):
            z = float(self._log_prior[k])
            for c in range(3):
                d = x[c] - float(self._means[k, c])
                z = z - d * d * float(self._half_precision[k, c])
            logits.append(z / self.temperature)
        top = logits[0]
        for z in logits[1:]:
            top = xp.maximum(top, z)
        weights = [xp.exp(z - top) for z in logits]
        total = weights[0]
        for w in weights[1:]:
            total = total + w
        return [w / total for w in weights]

    def _map_channels(self, xp: ModuleType, r: Any, g: Any, b: Any) -> list[Any]:
        od = planar_od(xp, (r, g, b), self.source_white)
        hsd = hsd_from_od(xp, od[0], od[1], od[2])
        inside = self._inside(xp, hsd)
        gamma = self._memberships_inside(xp, inside)
        mapped = []
        for c in range(3):
            scale = gamma[0] * float(self.scale[0, c])
            offset = gamma[0] * float(self.offset[0, c])
            for k in range(1, len(gamma)):
                scale = scale + gamma[k] * float(self.scale[k, c])
                offset = offset + gamma[k] * float(self.offset[k, c])
            mapped.append(offset + scale * inside[c])
        # chromaticity is rendered at no more than CHROMA_GAIN times the input's density: a pale
        # pixel lifted to a dark one would otherwise amplify its chromatic noise (c = OD / D)
        chroma_density = xp.minimum(effective_density(xp, mapped[0]), _CHROMA_GAIN * effective_density(xp, inside[0]))
        od_out = od_from_hsd(xp, mapped[0], mapped[1], mapped[2], chroma_density=chroma_density)
        # beyond the box: the box point's optical-density change, added to the pixel's own OD
        # (a constant shift per channel, so the map's slope there is that of white balance)
        od_box = od_from_hsd(xp, inside[0], inside[1], inside[2])
        od_out = [o + (i - q) for o, i, q in zip(od_out, od, od_box)]
        return planar_intensity(xp, od_out, self.target_white)
