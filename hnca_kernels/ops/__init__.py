"""Backends of the counterfactual reductions; ``reference`` is the specification."""


def bad_parent_values(lo: float, hi: float) -> ValueError:
    """The error for parents that are not all lo or hi (said the same by every backend)."""
    return ValueError(
        f"x must hold only the parent values {(lo, hi)} (a layer of stochastic units); "
        "counterfactual messages are defined for binary parents"
    )
