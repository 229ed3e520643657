"""``python -m hnca_kernels ...`` is the ``hnca`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
