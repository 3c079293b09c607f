"""Privacy: the model-inversion attack on smashed data, the ResSFL defence, expert initialisation."""
