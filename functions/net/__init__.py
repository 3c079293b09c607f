"""Real clients over the network: the wire format, credentials, the device server and the remote engine."""
