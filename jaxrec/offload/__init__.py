"""jaxrec.offload."""
