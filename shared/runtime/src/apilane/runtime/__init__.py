"""apilane's service runtime: the bus adapter, settings, tracing and the service lifecycle."""
