"""jaxrec.kernels."""
