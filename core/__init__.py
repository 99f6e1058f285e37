"""The layer pipeline/ and training/ share: the run configuration, the store API and the table schemas."""
