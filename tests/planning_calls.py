"""Counting the meshes a planning function is asked for (mesh search tests)."""


def record_shapes(monkeypatch, owner, name: str) -> list[dict]:
  """Patches `owner.<name>`, a planning function called as `f(config, options, shape,
  ...)`, to record each mesh shape it is asked for; returns the (live) list."""
  asked, real = [], getattr(owner, name)

  def recorded(config, options, shape, *args, **kwargs):
    asked.append(dict(shape))
    return real(config, options, shape, *args, **kwargs)
  monkeypatch.setattr(owner, name, recorded)
  return asked
