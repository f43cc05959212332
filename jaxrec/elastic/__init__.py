"""jaxrec.elastic."""
