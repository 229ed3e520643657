"""Command-line experiments (``hnca bandit``, ``hnca vae``, ``hnca plot``) and their helpers."""
