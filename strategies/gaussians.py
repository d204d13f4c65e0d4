"""Class-conditional Gaussians over features: what SLCA and APG sample old classes from."""
from __future__ import annotations

import torch


def cholesky_factors(covs: torch.Tensor, jitter: float, who: str = "class Gaussians") -> torch.Tensor:
    """Lower Cholesky factors (float64) of each covs[i] + jitter I (covs: (n, d, d)), so that
    mu + L z with z ~ N(0, I) has that covariance. Where a covariance is still not positive
    definite (too few rows for the feature width, or rounding), the jitter added grows tenfold
    until it is; `who` names the caller in the error if it never is."""
    eye = torch.eye(covs.shape[-1], dtype=torch.float64, device=covs.device)
    cov = covs.double() + jitter * eye
    factors, info = torch.linalg.cholesky_ex(cov)
    extra = max(jitter, 1e-8)
    for _ in range(12):
        bad = (info > 0).nonzero().squeeze(1)
        if not len(bad):
            return factors
        cov[bad] += extra * eye
        factors[bad], info[bad] = torch.linalg.cholesky_ex(cov[bad])
        extra *= 10
    raise RuntimeError(f"{who}: a class covariance stays non-positive-definite whatever the jitter; "
                       f"are its features finite?")
