"""The table of every reject reason, generated from the stages' declarations (``Stage.reasons``).

``python -m pipeline.reasons`` prints it; ``python -m pipeline.reasons --write README.md`` puts it
between the README's markers (tests/pipeline/test_reasons.py checks that it is up to date).
"""
from __future__ import annotations

import argparse
from pathlib import Path

START, END = "<!-- reject-reasons:start -->", "<!-- reject-reasons:end -->"
ORDER = ("ingest.scan", "ingest", "cleanup", "dedup", "augment", "features")   # pipeline order


def _stage_key(name: str) -> tuple:
    """Pipeline order by group, then by name (a ``.prep`` stage before its model stage)."""
    rank = next((k for k, g in enumerate(ORDER) if name == g or name.startswith(g + ".")), len(ORDER))
    return rank, name.removesuffix(".prep"), not name.endswith(".prep")


def reason_rows() -> list[tuple[str, str, str]]:
    """(stage, reason, when) for every reason of every registered built-in stage, in table order."""
    from stages.registry import STAGES, load_builtin

    load_builtin()
    builtin = [name for name in STAGES if STAGES[name].__module__.startswith("stages.")]   # not plug-ins
    return [(name, code, when) for name in sorted(builtin, key=_stage_key)
            for code, when in sorted(STAGES[name].reject_reasons().items())]


def reason_table() -> str:
    lines = ["| stage | reason | when |", "|---|---|---|"]
    lines += ["| `%s` | `%s` | %s |" % (s, r, w.replace("|", r"\|")) for s, r, w in reason_rows()]
    return "\n".join(lines) + "\n"


def update_readme(path: str | Path) -> bool:
    """Rewrite the table between the markers; True when the file changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    head, start, rest = text.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError(f"{path}: no {START} ... {END} markers")
    new = f"{head}{START}\n{reason_table()}{END}{tail}"
    if new == text:
        return False
    path.write_text(new, encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.reasons", description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="README", help="update the table between the markers in this file")
    args = parser.parse_args(argv)
    if args.write:
        print(f"{args.write}: {'updated' if update_readme(args.write) else 'up to date'}")
    else:
        print(reason_table(), end="")


if __name__ == "__main__":
    main()
