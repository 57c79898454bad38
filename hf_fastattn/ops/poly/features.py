"""Polynomials P ≈ exp and their packed symmetric tensor-power feature maps.

P(s q.k) = sum_t c_t s^t (q.k)^t, and (q.k)^t is a sum of products of matching monomials of q and k,
so P(s q.k) = (coef * mono(q)) . mono(k) with a coefficient per feature (`FeatureMap`). Features are
built chunk by chunk from contiguous slices (no index gathers, which on CPU cost more than the matmuls
they feed) and have explicit VJPs where it matters (degree 2).
"""

from __future__ import annotations

import functools
import math

import torch


# ------------------------------------------------------------------------------------- polynomials
@functools.lru_cache(maxsize=32)
def poly_coefficients(degree: int, kind: str = "taylor", fit_range: float = 2.0) -> tuple[float, ...]:
    """Coefficients c_0..c_g of an even-degree P > 0 that approximates exp.

    `taylor`: c_t = 1/t! (exact at 0; every even Taylor polynomial of exp is positive on the real line).
    `fit`: least squares of the *relative* error P(x) e^{-x} - 1 on [-fit_range, fit_range]; it must stay
    positive on the whole real line (checked), since the normaliser is a sum of P values.
    """
    if degree < 2 or degree % 2:
        raise ValueError(f"polynomial degree must be even and >= 2, got {degree}")
    if kind == "taylor":
        return tuple(1.0 / math.factorial(t) for t in range(degree + 1))
    if kind != "fit":
        raise ValueError(f"poly_coeffs must be 'taylor' or 'fit', got {kind!r}")
    x = torch.linspace(-fit_range, fit_range, 2001, dtype=torch.float64)
    basis = torch.stack([x**t * torch.exp(-x) for t in range(degree + 1)], dim=1)
    c = torch.linalg.lstsq(basis, torch.ones_like(x)[:, None]).solution[:, 0]
    coeffs = tuple(float(v) for v in c)
    if poly_minimum(coeffs) <= 0:
        raise ValueError(
            f"the degree-{degree} fit of exp on [-{fit_range}, {fit_range}] is not positive on the real line; "
            "use a smaller fit_range, a higher degree, or poly_coeffs='taylor'"
        )
    return coeffs


def poly_minimum(coeffs) -> float:
    """min over the real line of P (even degree, positive leading coefficient)."""
    c = torch.tensor(coeffs, dtype=torch.float64)
    if c[-1] <= 0:
        return -math.inf
    deriv = (c[1:] * torch.arange(1, len(c), dtype=torch.float64)).flip(0)
    # real critical points of P: eigenvalues of the companion matrix of P'
    n = len(deriv) - 1
    comp = torch.zeros(n, n, dtype=torch.float64)
    comp[0] = -deriv[1:] / deriv[0]
    if n > 1:
        comp[1:, :-1] = torch.eye(n - 1, dtype=torch.float64)
    roots = torch.linalg.eigvals(comp)
    real = roots.real[roots.imag.abs() < 1e-9]
    return float(poly_eval(coeffs, real).min()) if len(real) else float(c[0])


def poly_eval(coeffs, x):
    """P(x) by Horner's rule (x a tensor or a float)."""
    out = torch.full_like(x, coeffs[-1]) if isinstance(x, torch.Tensor) else float(coeffs[-1])
    for c in reversed(coeffs[:-1]):
        out = out * x + c
    return out


def poly_deriv(coeffs, x: torch.Tensor) -> torch.Tensor:
    """P'(x)."""
    return poly_eval(tuple(t * c for t, c in enumerate(coeffs))[1:], x)


def abs_poly(coeffs, b):
    """sum_t |c_t| b^t >= |P(x)| for |x| <= b: the far-part bound behind the overflow-safe shift."""
    return poly_eval(tuple(abs(c) for c in coeffs), b)


def weight_error(coeffs, bound: float) -> float:
    """max over |x| <= bound of |P(x) e^{-x} - 1|: the worst relative error of one attention weight."""
    x = torch.linspace(-bound, bound, 4001, dtype=torch.float64)
    return float((poly_eval(coeffs, x) * torch.exp(-x) - 1).abs().max())


@functools.lru_cache(maxsize=256)
def gaussian_output_error(coeffs: tuple, sigma: float) -> float:
    """Predicted relative output error ||O_P - O|| / ||O|| when the logits of a row are N(0, sigma^2) and the
    values are random and independent of them (the long-sequence limit).

    With weight errors e(x) = P(x) e^{-x} - 1 the perturbed output is sum_j p_j (e_j - ebar)/(1 + ebar) v_j,
    p = softmax. Averaging over v, the squared relative error is sum_j p_j^2 (e_j - ebar)^2 / sum_j p_j^2
    / (1 + ebar)^2. As n grows these sums become expectations under e^{2x} N(0, s^2) = N(2 s^2, s^2)
    (and ebar under e^x N(0, s^2) = N(s^2, s^2)), evaluated here by quadrature.
    """
    if sigma <= 0:
        return 0.0
    z = torch.linspace(-12, 12, 24001, dtype=torch.float64)
    pdf = torch.exp(-0.5 * z * z)
    pdf = pdf / pdf.sum()

    def err(x):
        return poly_eval(coeffs, x) * torch.exp(-x) - 1

    ebar = float((pdf * err(sigma**2 + sigma * z)).sum())
    second = float((pdf * (err(2 * sigma**2 + sigma * z) - ebar) ** 2).sum())
    return math.sqrt(second) / abs(1 + ebar) if 1 + ebar != 0 else math.inf


# --------------------------------------------------------------------------------- feature maps
SLAB = 8  # variables per block of the degree-2 slab map


def feature_count(d: int, degree: int) -> int:
    """r of the feature map used for (d, degree): see `FeatureMap`."""
    return FeatureMap.get(d, degree).r


def check_feature_count(d: int, degree: int, cap: int) -> int:
    r = feature_count(d, degree)
    if r > cap:
        smaller = [g for g in range(2, degree, 2) if feature_count(d, g) <= cap]
        hint = f"use degree={smaller[-1]}" if smaller else "use method='exact' or 'conv'"
        raise ValueError(
            f"poly degree {degree} on head_dim {d} needs r = {r} features per head, above feature_cap = {cap}; "
            f"{hint}, or raise feature_cap"
        )
    return r


class FeatureMap:
    """mono: [..., d] -> [..., r] with P(s q.k) = (coefficients(c, s) * mono(q)) . mono(k).

    degree 2 (the workhorse): [1, x, slabs]. Slab I is the outer product of the variables of block I
    (SLAB of them) with the variables from block I on, flattened: pairs inside a block appear twice
    (a, b and b, a; multiplicity 1 each), pairs across blocks once (multiplicity 2). That packs the
    symmetric half up to the diagonal blocks (d = 64: r = 2369 instead of 4161 for the full outer
    product; exact packing would give 2145) with d / SLAB contiguous products and an explicit VJP of
    2 d / SLAB small matmuls. Exact per-multiset packing costs d slices and an autograd VJP per chunk.

    degree >= 4: exact multiset packing, r = sum_t C(d + t - 1, t), each degree built from the previous
    with contiguous slices (no index gathers); VJP by autograd.
    """

    _cache: dict = {}

    @classmethod
    def get(cls, d: int, degree: int) -> FeatureMap:
        key = (d, degree)
        if key not in cls._cache:
            cls._cache[key] = cls(d, degree)
        return cls._cache[key]

    def __init__(self, d: int, degree: int):
        if degree < 2 or degree % 2:
            raise ValueError(f"polynomial degree must be even and >= 2, got {degree}")
        self.d, self.degree = d, degree
        self.blocks = [(i, min(SLAB, d - i)) for i in range(0, d, SLAB)]
        if degree == 2:
            self.r = 1 + d + sum(bw * (d - i) for i, bw in self.blocks)
        else:
            self.r = sum(math.comb(d + t - 1, t) for t in range(degree + 1))

    # -- forward
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.degree == 2 and not (x.requires_grad and torch.is_grad_enabled()):
            # the chunk ops' path (explicit VJPs): slabs multiplied straight into one buffer, no parts + cat
            # (the cat was 14 % of a CPU backward)
            out = x.new_empty(*x.shape[:-1], self.r)
            out[..., 0] = 1
            out[..., 1 : 1 + self.d] = x
            off = 1 + self.d
            for i, bw in self.blocks:
                n = bw * (self.d - i)
                slab = out[..., off : off + n].unflatten(-1, (bw, -1))
                torch.mul(x[..., i : i + bw, None], x[..., None, i:], out=slab)
                off += n
            return out
        parts = [torch.ones_like(x[..., :1]), x]
        if self.degree == 2:
            parts += [(x[..., i : i + bw, None] * x[..., None, i:]).flatten(-2) for i, bw in self.blocks]
            return torch.cat(parts, dim=-1)
        starts, prev = _suffix_starts(self.d, self.degree), x
        for t in range(2, self.degree + 1):
            st = starts[t - 2]
            prev = torch.cat([x[..., a : a + 1] * prev[..., st[a] :] for a in range(self.d)], dim=-1)
            parts.append(prev)
        return torch.cat(parts, dim=-1)

    # -- backward: d/dx sum(mono(x) * g)
    def vjp(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if self.degree != 2:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                (dx,) = torch.autograd.grad(self(xg), xg, g)
            return dx
        d = self.d
        dx = g[..., 1 : 1 + d].clone()
        off = 1 + d
        for i, bw in self.blocks:
            gs = g[..., off : off + bw * (d - i)].unflatten(-1, (bw, d - i))
            off += bw * (d - i)
            dx[..., i : i + bw] += (gs @ x[..., i:, None])[..., 0]
            dx[..., i:] += (x[..., None, i : i + bw] @ gs)[..., 0, :]
        return dx

    def coefficients(self, coeffs, scale: float, dtype=torch.float32, device=None) -> torch.Tensor:
        """[r]: c_t s^t times the multiplicity of each feature."""
        if len(coeffs) != self.degree + 1:
            raise ValueError(f"{len(coeffs)} coefficients for a degree-{self.degree} feature map")
        c = [coeffs[t] * scale**t for t in range(self.degree + 1)]
        if self.degree == 2:
            parts = [torch.tensor([c[0]], dtype=torch.float64), torch.full((self.d,), c[1], dtype=torch.float64)]
            for i, bw in self.blocks:
                slab = torch.full((bw, self.d - i), 2 * c[2], dtype=torch.float64)
                slab[:, :bw] = c[2]  # pairs inside the block appear in both orders
                parts.append(slab.flatten())
            out = torch.cat(parts)
        else:
            mult = torch.tensor(_multiplicities(self.d, self.degree), dtype=torch.float64)
            per = [torch.full((math.comb(self.d + t - 1, t),), c[t], dtype=torch.float64) for t in range(self.degree + 1)]
            out = mult * torch.cat(per)
        return out.to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _suffix_starts(d: int, degree: int) -> tuple[tuple[int, ...], ...]:
    """starts[t-1][a]: index among the degree-t multisets (ordered by smallest variable) of the first one whose
    smallest variable is >= a, so that degree t + 1 = cat_a x_a * mono_t[starts[t-1][a]:]."""
    starts = []
    for t in range(1, degree):
        total = math.comb(d + t - 1, t)  # multisets of size t over variables a..d-1: C(d - a + t - 1, t)
        starts.append(tuple(total - math.comb(d - a + t - 1, t) for a in range(d)))
    return tuple(starts)


@functools.lru_cache(maxsize=64)
def _multiplicities(d: int, degree: int) -> tuple[float, ...]:
    """t!/prod(m_i!) for every multiset, in the order of the exact packing."""
    out = [1.0] + [1.0] * d
    prev = [((a, 1),) for a in range(d)]
    starts = _suffix_starts(d, degree)
    for t in range(2, degree + 1):
        st = starts[t - 2]
        cur = []
        for a in range(d):
            for m in prev[st[a] :]:
                counts = dict(m)
                counts[a] = counts.get(a, 0) + 1
                cur.append(tuple(sorted(counts.items())))
        out += [math.factorial(t) / math.prod(math.factorial(c) for _, c in m) for m in cur]
        prev = cur
    return tuple(out)
