"""Pure-PyTorch, float64-capable references: `fusedtrain.reference.<family>` is the family's own
`reference` module (the oracle the kernels are tested against, and the fallback without a build)."""
import sys

from ..mining import reference as mining
from ..optim import reference as frugal
from ..sae import reference as sae
from ..spherical import linear_reference as linear_spherical
from ..spherical import reference as spherical

__all__ = ["frugal", "linear_spherical", "mining", "sae", "spherical"]

# `from fusedtrain.reference.<family> import name` resolves through sys.modules: the submodule paths
# are aliases of the families' reference modules, not copies.
for _name in __all__:
    sys.modules[f"{__name__}.{_name}"] = globals()[_name]
del _name
