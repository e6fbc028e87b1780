"""Developer tooling, never loaded by a server: the built-in model and adapters
(:mod:`.assets`) and a launcher that serves them (:mod:`.serve`)."""
