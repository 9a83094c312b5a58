"""What the tests share: servers, drills, receivers, the poll helper, models."""
