"""jaxrec.checkpoint."""
