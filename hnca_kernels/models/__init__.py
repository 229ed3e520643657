"""Models trained with HNCA."""

from .vae import ESTIMATORS, BernoulliVAE

__all__ = ["BernoulliVAE", "ESTIMATORS"]
