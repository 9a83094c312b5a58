"""Background work: supervision, the reaper, the payment probe, the sold-out cache."""
