"""geohier's pipeline: the command-line steps from raw photos to a trained, evaluated run.

Run ``python -m pipeline --help``. Each command module exposes ``register(subparsers)``
and a function the dashboard pages call too; the parser here is only wiring.
"""
