"""jaxrec: recommendation-model training on JAX with sharded embedding tables."""

__version__ = "0.1.0"
