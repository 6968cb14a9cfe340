"""The speed levers' one way of changing a torchvision module: swap its class, in place, for one that overrides a
few methods (``train.parallel_rpn``: detpipe.rpn; ``train.sync_free_inputs``/``sync_free_loss``: detpipe.syncfree).

The module keeps its weights, buffers and state; only its class changes. For torchvision's own class the lever's
class itself is used (importable by name, so the module pickles); for a subclass, a class made from both, unless
the subclass has its own version of a method the lever replaces: that subclass is left as it is, with a warning,
so its own code is never bypassed silently. ``torch.jit.script`` scripts a swapped module as the class it had.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping


class Lever:
    """Base of the levers' classes. A lever sets TORCHVISION (the class it derives from) and REPLACES (the names
    of the methods it overrides); PREFIX names the classes made for subclasses."""

    TORCHVISION: type
    REPLACES: tuple[str, ...] = ()
    PREFIX = ""

    def __prepare_scriptable__(self):
        """``torch.jit.script`` compiles a copy with the class the module had (same weights): it cannot compile the
        levers' training-only methods."""
        plain = copy.copy(self)  # with its own __dict__
        plain.__class__ = next(c for c in type(self).__mro__ if not issubclass(c, Lever))
        return plain


def swap(module, lever: type[Lever], named: Mapping[type, type] | None = None) -> bool:
    """Give ``module`` (in place) ``lever``'s methods; True if it has them now, False if a subclass's own version
    of one of them is kept (with a warning). ``named``: the lever's importable classes for other torchvision
    classes than TORCHVISION (subclasses of it), by the class they replace."""
    base = type(module)
    if isinstance(module, lever):
        return True
    own = [name for name in lever.REPLACES if getattr(base, name) is not getattr(lever.TORCHVISION, name)]
    if own:
        warnings.warn(f"{base.__name__} has its own {', '.join(own)}: left as it is, without "
                      f"{lever.__module__}'s {lever.__name__}", stacklevel=3)
        return False
    module.__class__ = (lever if base is lever.TORCHVISION else (named or {}).get(base) or
                        type(f"{lever.PREFIX}{base.__name__}", (lever, base), {"__module__": lever.__module__}))
    return True
