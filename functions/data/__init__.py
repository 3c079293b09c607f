"""Datasets, their readers, the federated partition, the loaders and the views clients make."""
