"""m11b-jax: fairseq's Megatron-11b language model in JAX/Flax with SPMD sharding."""

__version__ = "0.1.0"
