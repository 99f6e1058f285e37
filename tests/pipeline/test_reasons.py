"""The reject reasons: README's table is generated from the stages' declarations, and every code a
stage rejects with (or the planner records) is declared."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from pipeline.reasons import END, START, reason_table
from stages.base import MODALITIES
from stages.registry import STAGES, load_builtin

ROOT = Path(__file__).resolve().parents[2]


def declared() -> dict[str, dict[str, str]]:
    load_builtin()
    return {name: cls.reject_reasons() for name, cls in STAGES.items()}


def _code(node: ast.expr, modalities: list[str]) -> list[str] | None:
    """The codes a literal or an f-string over ``{self.modality}`` / ``{m}`` stands for; None: not knowable."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if not isinstance(node, ast.JoinedStr) or not modalities:
        return None
    parts = []
    for v in node.values:
        if isinstance(v, ast.Constant):
            parts.append(str(v.value))
        elif ast.unparse(v.value) in ("self.modality", "m", "cls.modality", "modality"):
            parts.append("{}")
        else:
            return None
    return ["".join(parts).replace("{}", m) for m in modalities]


def used_codes() -> list[tuple[str, str, list[str], bool]]:
    """(where, code, stages, every) for each literal reject code under stages/: inside a class, every
    registered stage built on it must declare the code; elsewhere, some stage of the module (any
    stage when the module defines none, e.g. stages/fetch.py)."""
    declared()   # registers the built-in stages
    out: list[tuple[str, str, list[str], bool]] = []
    for path in sorted((ROOT / "stages").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        owners: dict[ast.AST, list[str]] = {}   # node -> registered stages built on its class
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):   # outer classes first
            names = [name for name, k in STAGES.items()
                     if any(b.__module__ == module and b.__qualname__ == cls.name for b in k.__mro__)]
            for sub in ast.walk(cls):
                owners[sub] = names
        local = [name for name, k in STAGES.items() if k.__module__ == module]
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Name) and f.id == "Reject" and node.args:
                arg = node.args[0]
            elif isinstance(f, ast.Attribute) and f.attr in ("reject", "bad_modality") \
                    and ast.unparse(f.value) == "self" and len(node.args) >= 3:
                arg = node.args[2]
            else:
                continue
            where, every = f"{path.relative_to(ROOT)}:{node.lineno}", bool(owners.get(node))
            for name in owners.get(node) or [""]:
                modality = STAGES[name].modality if name else None
                for code in _code(arg, [modality] if modality else list(MODALITIES)) or []:
                    out.append((where, code, [name] if every else local, every))
    assert len(out) > 40, "the scan of stages/ found too few reject calls: has the API changed?"
    return out


def test_readme_table_is_up_to_date():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert START in readme and END in readme, "README.md lost its reject-reasons markers"
    current = readme.split(START, 1)[1].split(END, 1)[0].strip("\n")
    assert current == reason_table().strip("\n"), (
        "README.md's reject reason table is out of date with the stages' declarations: "
        "run `python -m pipeline.reasons --write README.md`")


def test_every_reject_code_used_in_stages_is_declared():
    decl = declared()
    everything = {code for reasons in decl.values() for code in reasons}
    missing = [f"{where}: {code!r} (declare it in the `reasons` of {' / '.join(stages) or 'a stage'})"
               for where, code, stages, every in used_codes()
               if not ((all if every else any)(code in decl[s] for s in stages) if stages else code in everything)]
    assert not missing, "reject codes used but not declared:\n" + "\n".join(missing)


def test_planner_codes_are_declared_by_ingest():
    """The planner records whole-sample duplicates and bad splits under the ``ingest`` stage."""
    tree = ast.parse((ROOT / "pipeline" / "plan.py").read_text(encoding="utf-8"))
    codes = {c.value for kw in ast.walk(tree) if isinstance(kw, ast.keyword) and kw.arg == "reject_reason"
             for c in ast.walk(kw.value) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    assert codes, "no reject_reason=... found in pipeline/plan.py"
    assert codes <= set(declared()["ingest"]), codes - set(declared()["ingest"])


def test_codes_are_snake_case_and_described():
    for name, reasons in declared().items():
        for code, when in reasons.items():
            assert re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", code), f"{name}: {code!r} is not snake_case"
            assert when.strip() and "{" not in when, f"{name}: {code!r} needs a description"
