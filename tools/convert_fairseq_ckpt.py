#!/usr/bin/env python
"""Convert fairseq Megatron-11b shards to an m11b_jax checkpoint (and back): see `m11b_jax.convert`.

    python tools/convert_fairseq_ckpt.py SRC OUT [--dtype float32|bfloat16|float16] [--verify]
    python tools/convert_fairseq_ckpt.py --to-fairseq CKPT OUTDIR --model-parallel-size N
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled

from m11b_jax.convert import main  # noqa: E402

if __name__ == "__main__":
    main()
