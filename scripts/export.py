"""Export the notebooks to the package: `make export` (what `nbdev_export` does, for a book whose chapters export
to several modules).

A chapter exports its own module (`#| default_exp stages.finetune`) and, with `#| export tasks`, cells to other
modules (chapter 08 writes `msopt/tasks.py` and `msopt/heads.py` beside its stage). nbdev 2 writes a module from
scratch only for a notebook's `default_exp` and otherwise appends to a file that must already exist, so a module
that no chapter has as its default would grow with every export. Here every module is written from scratch the
first time it is met in this run (chapters in order: 00, 01, ..., 18, index) and appended to after that, which
is what nbdev does for a `default_exp` module and its later `#| export` cells. Then each module's `__all__` is
wrapped within 120 columns and its imports sorted (`ruff --select I --fix`), as nbdev's optional black formatting
would, so that the generated code passes the project's lint.
"""
import ast
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from nbdev.config import get_config
from nbdev.doclinks import _build_modidx, add_init, nbglob
from nbdev.export import nb_export
from nbdev.maker import ModuleMaker


class FirstMeetingMaker(ModuleMaker):
    "A ModuleMaker that writes a module anew the first time this export run meets it, and appends afterwards."
    written: set[str] = set()

    def __init__(self, dest, name, nb_path, is_new=True, parse=True, solo_nb=False):
        is_new = name not in FirstMeetingMaker.written
        FirstMeetingMaker.written.add(name)
        super().__init__(dest, name, nb_path, is_new=is_new, parse=parse, solo_nb=solo_nb)


ALL = re.compile(r"^__all__ = \[.*?\]$", re.M | re.S)


def wrap_all(path: Path) -> None:
    "Rewrite a module's `__all__` list within 120 columns (nbdev's wrapping does not count the `__all__ = ` prefix)."
    text = path.read_text()
    m = ALL.search(text)
    if not m:
        return
    names = ast.literal_eval(m.group(0).split("=", 1)[1].strip())
    body = textwrap.fill(", ".join(repr(n) for n in names), width=120 - len("__all__ = ["), break_long_words=False,
                         break_on_hyphens=False)
    lines = body.split("\n")
    out = "__all__ = [" + ("\n" + " " * len("__all__ = [")).join(lines) + "]"
    path.write_text(text[:m.start()] + out + text[m.end():])


def main() -> None:
    cfg = get_config()
    for nb in nbglob(path=cfg.nbs_path, as_path=True).sorted("name"):
        nb_export(nb, lib_path=cfg.lib_path, mod_maker=FirstMeetingMaker)
    add_init(cfg.lib_path)
    _build_modidx()
    for module in Path(cfg.lib_path).rglob("*.py"):
        wrap_all(module)
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff:                                                   # imports sorted as the linter wants, as nbdev's black
        subprocess.run([ruff, "check", "--quiet", "--select", "I", "--fix", "--exit-zero", str(cfg.lib_path)],
                       check=True)                             # formatting would do
    stale = sorted(p for p in Path(cfg.lib_path).rglob("*.py") if p.name != "__init__.py" and p.name != "_modidx.py"
                   and p.relative_to(cfg.lib_path).with_suffix("").as_posix().replace("/", ".")
                   not in FirstMeetingMaker.written)
    for p in stale:
        print(f"warning: {p} is exported by no notebook (delete it if it was moved)")


if __name__ == "__main__":
    main()
