"""jaxrec.embedding."""
