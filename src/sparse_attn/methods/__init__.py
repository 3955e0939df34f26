"""Estimators: one module per method; importing this package registers them all."""

from . import block_topk, dense, flexprefill, power, proxyattn, random, streaming, strided_shards, tri_shape, vertical_slash, xattention  # noqa: F401  (imported for registration)
