"""Parameter subsets: an Objective whose params() (so every analyzer's differentiated and moved weights) are
only those whose names match a regular expression; the others stay fixed and get no gradient."""
from __future__ import annotations

import copy
import re

from nexus_opt.errors import UserError


MAX_REGEX = 500      # characters of a --params pattern
MAX_REPEAT = 1000    # the largest {m,n} count
MAX_UNBOUNDED = 3    # '*' / '+' in one pattern: k of them backtrack like len(name)^k


def _repeats(tree) -> list:
    """(min, max, subpattern) of every repetition in a parsed pattern, outermost first."""
    try:
        from re import _constants as c, _parser as p
    except ImportError:  # pragma: no cover -- Python < 3.11
        import sre_constants as c
        import sre_parse as p
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        items = node.data if isinstance(node, p.SubPattern) else node
        for op, av in items if isinstance(items, list) else []:
            if op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)):
                found.append(av)
                stack.append(av[2])
            elif op == c.SUBPATTERN:
                stack.append(av[-1])
            elif op == c.BRANCH:
                stack.extend(av[1])
            elif op in (c.ASSERT, c.ASSERT_NOT):
                stack.append(av[1])
    return found


def compile_params(regex: str):
    """A --params pattern compiled with bounds: at most MAX_REGEX characters, {m,n} counts up to MAX_REPEAT, at
    most MAX_UNBOUNDED '*'/'+' and no repetition inside another (the shapes that backtrack exponentially, e.g. '(.*)*'); errors are
    UserErrors."""
    from nexus_opt.files import short

    if len(regex) > MAX_REGEX:
        raise UserError(f"--params is {len(regex)} characters long (at most {MAX_REGEX}); give a shorter pattern")
    try:
        from re import _parser as p
    except ImportError:  # pragma: no cover
        import sre_parse as p
    try:
        tree = p.parse(regex)
        pat = re.compile(regex)
    except (re.error, OverflowError, RecursionError, ValueError) as e:
        raise UserError(f"--params '{short(regex)}' is not a valid regular expression "
                        f"({type(e).__name__}: {short(e, 120)})") from None
    reps = _repeats(tree)
    for lo, hi, sub in reps:
        if hi != p.MAXREPEAT and hi > MAX_REPEAT or lo > MAX_REPEAT:
            raise UserError(f"--params '{short(regex)}' repeats up to {max(lo, hi)} times (at most {MAX_REPEAT})")
        if hi == p.MAXREPEAT or hi > 1:
            if any(h2 == p.MAXREPEAT or h2 > 1 for _, h2, _ in _repeats(sub)):
                raise UserError(f"--params '{short(regex)}' nests a repetition inside another (like '(a*)*'), which "
                                "can take forever to match; write it without the nesting")
    if sum(hi == p.MAXREPEAT for _, hi, _ in reps) > MAX_UNBOUNDED:
        raise UserError(f"--params '{short(regex)}' has more than {MAX_UNBOUNDED} unbounded repetitions (*, +), which "
                        "can take forever to match; a parameter name needs few")
    return pat


def select(obj, regex: str | None):
    """A shallow view of `obj` (same model and batches) restricted to parameters matching `regex` (re.search);
    None or '' gives obj itself. A regex that matches nothing, or does not compile, is a UserError."""
    if regex is None or regex == "":
        return obj
    pat = compile_params(regex)
    names = [n for n, p in obj.model.named_parameters() if p.requires_grad]
    if not any(pat.search(n) for n in names):
        some = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        from nexus_opt.files import short

        raise UserError(f"--params '{short(regex)}' matches no parameter; names are like: {short(some)}")
    view = copy.copy(obj)
    view.param_regex = pat
    view.meta = dict(obj.meta, params=regex)
    return view
