"""A stand-in for a tensorstore future, to check that code waits on every one it starts."""


class Future:
  """Done when waited on (`exception()` or `result()`: `waited`); fails with `error`
  (None: succeeds). Appends itself to `log`."""

  def __init__(self, log: list, error: Exception | None = None):
    self.error, self.waited = error, False
    log.append(self)

  def exception(self):
    self.waited = True
    return self.error

  def result(self):
    self.waited = True
    if self.error is not None:
      raise self.error
