"""Estimators: one module per method; importing this package registers them all."""

from . import dense, random  # noqa: F401  (imported for registration)
