"""jaxrec.planner."""
