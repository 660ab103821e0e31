"""Code that the API, the relay and the worker share: settings, envelope, connections, logs."""
