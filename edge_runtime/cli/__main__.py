"""``python -m edge_runtime.cli``: the same as the ``edgert`` console script."""

from edge_runtime.cli import main

main()
