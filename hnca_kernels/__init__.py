"""hnca-kernels: fast Hindsight Network Credit Assignment for discrete stochastic networks."""

from . import distributed, functional
from .backends import BackendUnavailableError, available_backends, use_backend
from .baseline import CallBaselines, MovingAverageBaseline
from .graphs import CapturedStep
from .validation import checks
from .layers import BernoulliLinear, CategoricalLinear
from .record import Record, StochasticCall, record
from .sequential import StochasticSequential

__all__ = [
    "record",
    "Record",
    "StochasticCall",
    "BernoulliLinear",
    "CategoricalLinear",
    "StochasticSequential",
    "MovingAverageBaseline",
    "CallBaselines",
    "CapturedStep",
    "use_backend",
    "checks",
    "available_backends",
    "BackendUnavailableError",
    "functional",
    "distributed",
]
__version__ = "0.1.0"
