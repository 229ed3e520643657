"""Models trained with HNCA: discrete VAEs written with the record."""

from .vae import ESTIMATORS, UNBIASED_ESTIMATORS, BernoulliVAE, CategoricalVAE, DiscreteVAE

__all__ = ["DiscreteVAE", "BernoulliVAE", "CategoricalVAE", "ESTIMATORS", "UNBIASED_ESTIMATORS"]
