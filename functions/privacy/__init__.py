"""Privacy: the model-inversion attack on smashed data, defences of the smashed data (ResSFL), expert initialisation.

Importing the package registers the built-in defences (functions.privacy.defences)."""
from functions.privacy import ressfl  # noqa: F401  (registers it)
