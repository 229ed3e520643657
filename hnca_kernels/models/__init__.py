"""Models trained with HNCA."""

from .vae import ESTIMATORS, UNBIASED_ESTIMATORS, BernoulliVAE

__all__ = ["BernoulliVAE", "ESTIMATORS", "UNBIASED_ESTIMATORS"]
