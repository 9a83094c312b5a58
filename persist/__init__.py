"""PostgreSQL: migrations, the writer, resync, reconcile, webhooks (on stock's lower floors)."""
