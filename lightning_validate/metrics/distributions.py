"""The few distribution functions the intervals and paired tests need, in plain Python floats (no scipy at run time).

The normal quantile is the standard library's (``statistics.NormalDist``, accurate to double precision). Student's
t and the binomial go through the regularized incomplete beta function, evaluated by its continued fraction
(modified Lentz), which converges to double precision for every argument once the symmetry
``I_x(a, b) = 1 - I_{1-x}(b, a)`` puts ``x`` on the fast side. They run on the host, once per epoch or comparison.

Example:
    >>> round(normal_quantile(0.975), 6), round(t_quantile(0.975, 9), 6)  # 1.96, and t with 9 degrees of freedom
    (1.959964, 2.262157)
    >>> round(binomial_cdf(1, 10, 0.5) * 1024, 12)  # P(X <= 1) for X ~ Binomial(10, 1/2) is 11 / 1024
    11.0

"""

from __future__ import annotations

import functools
import math
from statistics import NormalDist

__all__ = ["beta_regularized", "binomial_cdf", "normal_cdf", "normal_quantile", "t_cdf", "t_quantile"]

_NORMAL = NormalDist()
_EPS = 1e-16
_TINY = 1e-300


def normal_quantile(p: float) -> float:
    """The ``p`` quantile of the standard normal distribution."""
    return _NORMAL.inv_cdf(p)


def normal_cdf(x: float) -> float:
    """``P(Z <= x)`` for a standard normal ``Z``."""
    return _NORMAL.cdf(x)


def _continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of ``I_x(a, b)`` (Numerical Recipes' ``betacf``, modified Lentz).

    For ``x`` on its fast side, ``x < (a + 1) / (a + b + 2)``.
    """
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    # Convergence takes O(sqrt(max(a, b))) terms; the bound only guards against a loop that never ends.
    for m in range(1, 100_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            break
    return h


def _stirling_rest(x: float) -> float:
    """``lgamma(x) - ((x - 1/2) log x - x + log(2 pi) / 2)`` for ``x >= 10`` (the Stirling series)."""
    x2 = x * x
    return (1.0 / 12.0 - (1.0 / 360.0 - (1.0 / 1260.0 - 1.0 / (1680.0 * x2)) / x2) / x2) / x


def _log_beta(a: float, b: float) -> float:
    """``log B(a, b)``; for a large argument without the cancellation of ``lgamma(a + b) - lgamma(a)``."""
    small, large = min(a, b), max(a, b)
    if large < 1e3:
        return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    # lgamma(L + s) - lgamma(L) = (L - 1/2) log1p(s / L) + s log(L + s) - s + rest(L + s) - rest(L), all terms small
    ratio = ((large - 0.5) * math.log1p(small / large) + small * math.log(large + small) - small
             + _stirling_rest(large + small) - _stirling_rest(large))
    return math.lgamma(small) - ratio


def beta_regularized(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)`` for ``a, b > 0`` and ``0 <= x <= 1``."""
    if not (a > 0 and b > 0):
        raise ValueError(f"Expected `a` and `b` > 0 but got a={a!r}, b={b!r}.")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"Expected `x` in [0, 1] but got {x!r}.")
    return _beta(a, b, x, 1.0 - x)


def _beta(a: float, b: float, x: float, y: float) -> float:
    """``I_x(a, b)`` given both ``x`` and ``y = 1 - x``, the smaller one exact.

    So ``a log x`` keeps its digits when ``a`` is large and ``x`` close to 1 (t with many degrees of freedom).
    """
    if x <= 0.0 or y >= 1.0:
        return 0.0
    if y <= 0.0 or x >= 1.0:
        return 1.0
    log_x = math.log1p(-y) if x > 0.5 else math.log(x)
    log_y = math.log1p(-x) if y > 0.5 else math.log(y)
    log_front = -_log_beta(a, b) + a * log_x + b * log_y
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _continued_fraction(b, a, y) / b


#: From this many degrees of freedom on, t goes through its expansion around the normal: the continued fraction
#: converges slowly there, and four terms of the expansion are exact to double precision.
_LARGE_DF = 1e4


def _expansion(z: float, df: float) -> tuple[float, float]:
    """The t quantile at the normal quantile ``z`` (Abramowitz & Stegun 26.7.5), and its derivative in ``z``."""
    v = 1.0 / df
    z2 = z * z
    g1 = (z2 + 1) * z / 4.0
    g2 = ((5 * z2 + 16) * z2 + 3) * z / 96.0
    g3 = (((3 * z2 + 19) * z2 + 17) * z2 - 15) * z / 384.0
    g4 = ((((79 * z2 + 776) * z2 + 1482) * z2 - 1920) * z2 - 945) * z / 92160.0
    d1 = (3 * z2 + 1) / 4.0
    d2 = ((25 * z2 + 48) * z2 + 3) / 96.0
    d3 = (((21 * z2 + 95) * z2 + 51) * z2 - 15) / 384.0
    d4 = ((((711 * z2 + 5432) * z2 + 7410) * z2 - 5760) * z2 - 945) / 92160.0
    return (z + v * (g1 + v * (g2 + v * (g3 + v * g4))), 1.0 + v * (d1 + v * (d2 + v * (d3 + v * d4))))


def t_cdf(x: float, df: float) -> float:
    """``P(T <= x)`` for Student's t with ``df`` degrees of freedom (``math.inf``: the normal)."""
    if math.isinf(df):
        return normal_cdf(x)
    if df >= _LARGE_DF:  # invert the quantile expansion: Newton in z, from z = x
        z = x
        for _ in range(50):
            t, slope = _expansion(z, df)
            step = (t - x) / slope
            z -= step
            if abs(step) <= 1e-16 * max(1.0, abs(z)):
                break
        return normal_cdf(z)
    x2 = x * x
    tail = 0.5 * _beta(df / 2.0, 0.5, df / (df + x2), x2 / (df + x2))  # P(T > |x|)
    return 1.0 - tail if x > 0 else tail


def _t_pdf(x: float, df: float) -> float:
    log_c = math.lgamma((df + 1.0) / 2.0) - math.lgamma(df / 2.0) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1.0) / 2.0 * math.log1p(x * x / df))


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df > 0`` degrees of freedom (``math.inf``: the normal)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"Expected a probability in (0, 1) but got {p!r}.")
    if not df > 0:
        raise ValueError(f"Expected `df` > 0 but got {df!r}.")
    z = normal_quantile(p)
    if math.isinf(df):
        return z
    if df >= _LARGE_DF:
        return _expansion(z, df)[0]
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if df == 1.0:
        return math.tan(math.pi * (p - 0.5))
    if df == 2.0:
        return (2.0 * p - 1.0) / math.sqrt(2.0 * p * (1.0 - p))
    # Start from the Cornish-Fisher expansion (Abramowitz & Stegun 26.7.5), then Newton on the exact CDF.
    g1 = (z**3 + z) / 4.0
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96.0
    x = z + g1 / df + g2 / df**2
    if not x > 0:
        x = z
    for _ in range(100):
        step = (t_cdf(x, df) - p) / _t_pdf(x, df)
        if x - step <= 0:  # the quantile of p >= 0.5 is >= 0; halve instead of crossing it
            step = x / 2.0
        x -= step
        if abs(step) <= 1e-13 * max(1.0, abs(x)):  # the CDF itself is exact to about 1e-16
            break
    return x


def binomial_cdf(k: int, n: int, p: float) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(n, p)``: ``I_{1-p}(n - k, k + 1)``."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return beta_regularized(n - k, k + 1.0, 1.0 - p)
