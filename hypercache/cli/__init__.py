"""Command-line entry points: ``hypercache-node`` and the ``hypercache`` client."""
