"""The inference core: one conversation on a build - manifests, personas, LM state, session."""
