"""The HTTP API: routes, the request front, metrics and the OpenAPI document (no SQL)."""
