"""jaxrec.sharding."""
