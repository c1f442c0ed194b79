"""A folder of links that stands for a bare GPU machine's Python packages, for the tests
that run a tool in an interpreter seeing only that folder (``python -I -S``)."""

import importlib.metadata as md
import re
from pathlib import Path
from typing import Iterable


def norm(name: str) -> str:
    """A distribution name as packaging normalises it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def link_site(root: Path, packages: Iterable[str], leave_out: Iterable[str] = ()) -> Path:
    """Links in ``root`` to ``packages`` as installed here and to everything they require,
    less the distributions in ``leave_out`` (those must come from a tool's bundle)."""
    root.mkdir(parents=True)
    skip = {norm(n) for n in leave_out}
    todo, seen = list(packages), set()
    while todo:
        name = norm(todo.pop())
        if name in seen or name in skip:
            continue
        seen.add(name)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        todo += [re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0] for r in dist.requires or [] if "extra ==" not in r]
        for f in dist.files or []:
            top = f.parts[0]
            if top.endswith(".pth") or top in ("..", "__pycache__") or (root / top).exists():
                continue
            target = Path(dist.locate_file(top))
            if target.exists():
                (root / top).symlink_to(target)
    assert (root / "torch").exists()
    return root
