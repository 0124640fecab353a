"""A counter-based integer mixer: reproducible pseudo-random bits from integer ids on device.

Used where randomness must be a pure function of positions (the on-the-fly shuffle, the
analysis's reservoir priorities), so results do not depend on batching or on the device count.
"""

import jax
import jax.numpy as jnp


def mix32(x: jax.Array) -> jax.Array:
    """The lowbias32 integer mixer (C. Wellons): a bijection of uint32 with full avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)
