"""Load tests (locust) and benchmarks of the stock service; run them with ``make``."""
