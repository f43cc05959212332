"""jaxrec.data."""
