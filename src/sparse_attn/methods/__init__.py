"""Estimators: one module per method; importing this package registers them all."""

# Imported for registration.
from . import (  # noqa: F401
    block_topk,
    dense,
    flexprefill,
    moba,
    power,
    proxyattn,
    random,
    streaming,
    strided_shards,
    tri_shape,
    vertical_slash,
    xattention,
)
