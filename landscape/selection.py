"""Parameter subsets: an Objective whose params() (so every analyzer's differentiated and moved weights) are
only those whose names match a regular expression; the others stay fixed and get no gradient."""
from __future__ import annotations

import copy
import re

from nexus_opt.errors import UserError


def select(obj, regex: str | None):
    """A shallow view of `obj` (same model and batches) restricted to parameters matching `regex` (re.search);
    None or '' gives obj itself. A regex that matches nothing, or does not compile, is a UserError."""
    if regex is None or regex == "":
        return obj
    try:
        pat = re.compile(regex)
    except re.error as e:
        raise UserError(f"--params '{regex}' is not a valid regular expression ({e})") from None
    names = [n for n, p in obj.model.named_parameters() if p.requires_grad]
    if not any(pat.search(n) for n in names):
        some = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise UserError(f"--params '{regex}' matches no parameter; names are like: {some}")
    view = copy.copy(obj)
    view.param_regex = pat
    view.meta = dict(obj.meta, params=regex)
    return view
