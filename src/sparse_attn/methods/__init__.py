"""Estimators: one module per method; importing this package registers them all."""

# Imported for registration.
from . import (  # noqa: F401
    anchor,
    auto,
    block_topk,
    dense,
    flexprefill,
    hip,
    moa,
    moba,
    neighborhood,
    power,
    proxyattn,
    radial,
    random,
    sale,
    seer,
    sliding_tile,
    streaming,
    strided_shards,
    tri_shape,
    vertical_slash,
    vmoba,
    xattention,
)
