"""Backends of the counterfactual reductions; ``reference`` is the specification."""
