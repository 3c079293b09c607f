"""Client engines: every client's part in a loop, vectorised over clients, or as stacked SGD."""
