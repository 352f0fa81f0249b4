"""The in-car service: daemon, configuration, control socket, metrics, notify, logging, check."""
