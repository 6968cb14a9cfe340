"""The speed levers' one way of changing a torchvision module: swap its class, in place, for one that overrides a
few methods (``train.parallel_rpn``: detpipe.rpn; ``train.sync_free_inputs``/``sync_free_loss``: detpipe.syncfree).

The module keeps its weights, buffers and state; only its class changes. For torchvision's own class the lever's
class itself is used, for torchvision's subclasses a lever's own named class where it has one (both importable by
name, so the module pickles); for another subclass, a class made from both (one per subclass; it does not pickle),
unless the subclass has its own version of a method the lever replaces: that subclass is left as it is, with a
warning, so its own code is never bypassed silently.

``torch.jit.script`` scripts a swapped module as the class it had. torch writes what it scripts into the parent's
submodules: where the parent is a lever too (the model under ``sync_free_inputs``) the model itself keeps its
levers, but a lever under a plain parent (the RPN with ``parallel_rpn`` alone) is replaced by its plain copy in
the model; script a ``copy.deepcopy`` of such a model to keep the levers on the original.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Mapping


class Lever:
    """Base of the levers' classes. A lever sets TORCHVISION (the class it derives from) and REPLACES (the names
    of the methods it overrides); PREFIX names the classes made for subclasses; KEPT says what a subclass left
    as it is keeps."""

    TORCHVISION: type
    REPLACES: tuple[str, ...] = ()
    PREFIX = ""
    KEPT = ""

    def __prepare_scriptable__(self):
        """``torch.jit.script`` compiles a copy with the class the module had (same weights): it cannot compile the
        levers' training-only methods."""
        plain = copy.copy(self)  # with its own __dict__
        plain.__dict__["_modules"] = type(self._modules)(self._modules)  # torch writes the scripted children here
        plain.__class__ = next(c for c in type(self).__mro__ if not issubclass(c, Lever))
        return plain


def swap(module, lever: type[Lever], named: Mapping[type, type] | None = None) -> bool:
    """Give ``module`` (in place) ``lever``'s methods; True if it has them now, False if a subclass's own version
    of one of them is kept (with a warning). ``named``: the lever's importable classes for other torchvision
    classes than TORCHVISION (subclasses of it), by the class they replace."""
    base = type(module)
    if isinstance(module, lever):
        return True
    own = [name for name in lever.REPLACES
           if inspect.getattr_static(base, name) is not inspect.getattr_static(lever.TORCHVISION, name)]
    if own:
        warnings.warn(f"{base.__name__} has its own {', '.join(own)}: left as it is, {lever.KEPT}", stacklevel=3)
        return False
    if base is lever.TORCHVISION:
        module.__class__ = lever
    elif named and base in named:
        module.__class__ = named[base]
    else:
        if (lever, base) not in _MADE:
            _MADE[lever, base] = type(f"{lever.PREFIX}{base.__name__}", (lever, base), {"__module__": lever.__module__})
        module.__class__ = _MADE[lever, base]
    return True


_MADE: dict[tuple[type, type], type] = {}  # the classes made for subclasses, one per lever and subclass
