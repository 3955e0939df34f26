"""Estimators: one module per method; importing this package registers them all."""

from . import dense, power, random, streaming, strided_shards, tri_shape  # noqa: F401  (imported for registration)
