"""Where stock and persist meet: the process lifecycle, console, webhooks, CLI, dev, serve."""
