"""Model families (one module each) behind the interface in ``rt_jax.models.family``.

Importing this package imports every family module, and each registers its family object, so
``get_family(config)`` finds any of them; code above the models never imports a family by name.
"""

from rt_jax.models import lrt, recursive, standard

__all__ = ["lrt", "recursive", "standard"]
