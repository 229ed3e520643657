"""``python -m hnca_kernels ...`` is the ``hnca`` command."""

from .cli import entry

if __name__ == "__main__":
    entry()
