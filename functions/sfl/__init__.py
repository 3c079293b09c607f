"""Split federated learning: the step, its FL counterpart, FedAvg, communication saving, overhead, client engines."""
