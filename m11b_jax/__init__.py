"""m11b-jax: fairseq's Megatron-11b language model in JAX/Flax with SPMD sharding."""

__version__ = "0.1.0"

from m11b_jax.api import LanguageModel  # noqa: E402

__all__ = ["LanguageModel"]
