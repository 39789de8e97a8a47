"""Restoration methods as named things: ``RestoreConfig.method`` chooses one, each module below registers one.

``posterior-net`` (the default: the posterior-mean network fitted for the dataset), ``latent`` (the generator
inverted over its latent), ``dps`` (posterior sampling with the teacher), ``classical`` (no learnt prior) and
``projection`` (the measurements alone). :func:`restore` runs the one a config names.
"""

from rsd_core.restore.methods import classical, dps, latent, posterior_net, projection  # noqa: F401 (registration)
from rsd_core.restore.methods.registry import (
    Method,
    RestoreModels,
    get_method,
    register_method,
    registered_methods,
    restore,
    restore_with_model,
)

__all__ = ["Method", "RestoreModels", "get_method", "register_method", "registered_methods", "restore",
           "restore_with_model"]
