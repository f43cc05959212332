"""jaxrec.kernels: fused embedding kernels on one device's shard.

Pallas (Triton, GPU) kernels with an XLA reference that is also the CPU path; pick with
`kernel='auto'|'xla'|'pallas'` (auto: Pallas on GPU). See `lookup` (forward: multi-table
lookup + weighted pooling), `update` (backward fused with the row-wise optimizer), `optim`
(optimizers and their state) and `quant` (int8 rows, stochastic rounding, comm dtypes).
"""

from jaxrec.kernels.lookup import (csr_to_padded, lookup_pool, lookup_pool_csr,
                                   padded_to_csr)
from jaxrec.kernels.optim import (SGD, Adagrad, Optimizer, RowWiseAdagrad, coerce,
                                  init_opt_state, update_rows)
from jaxrec.kernels.platform import KERNELS, resolve_kernel
from jaxrec.kernels.quant import (COMM_DTYPES, TABLE_DTYPES, QuantizedTable,
                                  all_to_all_compressed, cast_store, comm_cast, comm_uncast,
                                  dequantize, quantize)
from jaxrec.kernels.update import segments, sparse_update, sparse_update_csr

__all__ = [
    "KERNELS", "COMM_DTYPES", "TABLE_DTYPES", "SGD", "Adagrad", "RowWiseAdagrad", "Optimizer",
    "QuantizedTable", "all_to_all_compressed", "cast_store", "coerce", "comm_cast",
    "comm_uncast", "csr_to_padded", "dequantize", "init_opt_state", "lookup_pool",
    "lookup_pool_csr", "padded_to_csr", "quantize", "resolve_kernel", "segments",
    "sparse_update", "sparse_update_csr", "update_rows",
]
