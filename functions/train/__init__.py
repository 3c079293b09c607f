"""The training loop: the trainer and its checkpoints, the runner, federated data, stopping, final evaluations, sweeps."""
