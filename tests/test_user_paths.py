"""tests/USER_PATHS.md stays true: every test it names exists in its file (a parametrized case by its id), every path
names its tests or says it is not covered, and its counts are its table's. Read with ``ast`` (no collection, no
import of the test files): a path whose test is removed or renamed fails here."""

from __future__ import annotations

import ast
import itertools
import re

from conftest import REPO

LIST = REPO / "tests" / "USER_PATHS.md"
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::([\w:]+)(?:\[([^\]`]+)\])?`")
COUNTS = re.compile(r"^Counts: (\d+) paths, (\d+) covered, (\d+) not covered\.$", re.M)


def paths(text: str) -> list[list[str]]:
    """The cells of every row of the list's tables (header and separator rows left out)."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("|---")]
    return [row for row in rows if row[0] != "launcher"]


def _value_id(node: ast.expr, name: str, index: int) -> str:
    """pytest's id of one parameter value: a literal's text, else the argument's name and the case's index."""
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, str | int | float | bool)):
        return str(node.value)
    return f"{name}{index}"


def _case_ids(decorator: ast.expr) -> list[str] | None:
    """The ids of one ``pytest.mark.parametrize`` decorator's cases (None: another decorator)."""
    if not (isinstance(decorator, ast.Call) and ast.unparse(decorator.func).endswith("mark.parametrize")):
        return None
    names = ast.literal_eval(decorator.args[0])
    names = [part.strip() for part in names.split(",")] if isinstance(names, str) else list(names)
    cases = decorator.args[1].elts if isinstance(decorator.args[1], ast.List | ast.Tuple) else []
    given = next((keyword.value for keyword in decorator.keywords if keyword.arg == "ids"), None)
    if isinstance(given, ast.List | ast.Tuple):
        return [ast.literal_eval(item) for item in given.elts]
    ids = []
    for index, case in enumerate(cases):
        if isinstance(case, ast.Call) and ast.unparse(case.func).endswith("param"):
            named = next((keyword.value for keyword in case.keywords if keyword.arg == "id"), None)
            if named is not None:
                ids.append(ast.literal_eval(named))
                continue
            values = case.args
        else:
            values = case.elts if len(names) > 1 and isinstance(case, ast.Tuple) else [case]
        ids.append("-".join(_value_id(value, name, index) for value, name in zip(values, names, strict=False)))
    return ids


def cases_by_test(source: str) -> dict[str, set[str]]:
    """Each test function of ``source`` (``name`` or ``Class::name``) -> its cases' ids (the empty set when not
    parametrized), as pytest makes them: the decorator nearest the function first, joined by ``-``."""
    found: dict[str, set[str]] = {}
    tree = ast.parse(source)
    scopes = [("", tree.body), *((f"{node.name}::", node.body) for node in tree.body if isinstance(node, ast.ClassDef))]
    for prefix, body in scopes:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
                stacked = [ids for ids in map(_case_ids, reversed(node.decorator_list)) if ids is not None]
                found[prefix + node.name] = {"-".join(parts) for parts in itertools.product(*stacked)} if stacked \
                    else set()
    return found


def test_every_listed_test_exists() -> None:
    text = LIST.read_text(encoding="utf-8")
    references = REFERENCE.findall(text)
    assert len(references) > 50, "tests/USER_PATHS.md names its tests as `tests/FILE.py::test_name[id]`"
    missing = []
    for file, name, case in sorted(set(references)):
        path = REPO / file
        tests = cases_by_test(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if name not in tests:
            missing.append(f"{file}::{name}: no such test" + ("" if path.is_file() else " (no such file)"))
        elif case and case not in tests[name]:
            missing.append(f"{file}::{name}[{case}]: no such case (its cases: {sorted(tests[name]) or 'none'})")
    assert not missing, "tests/USER_PATHS.md names tests that do not exist:\n" + "\n".join(missing)


def test_every_path_names_its_tests_or_says_not_covered_and_the_counts_are_the_tables() -> None:
    text = LIST.read_text(encoding="utf-8")
    rows = paths(text)
    assert all(len(row) == 6 for row in rows), [row for row in rows if len(row) != 6]
    uncovered = [row for row in rows if row[-1].startswith("not covered")]
    unnamed = [row for row in rows if not row[-1].startswith("not covered") and not REFERENCE.search(row[-1])]
    assert not unnamed, f"paths naming no test and not said to be not covered: {unnamed}"
    (counts,) = COUNTS.findall(text)
    assert tuple(map(int, counts)) == (len(rows), len(rows) - len(uncovered), len(uncovered)), (
        f"the counts line says {counts}; the table holds {len(rows)} paths, {len(uncovered)} not covered")


def test_the_ids_are_pytests() -> None:
    """Against the ids pytest collected from the same source (``pytest --collect-only``, run once by hand)."""
    source = '''
import pytest
X = object()

@pytest.mark.parametrize("a", [1, "x y", None, True])
@pytest.mark.parametrize(("b", "c"), [(2, 3.5), pytest.param(4, X, id="named"), pytest.param(5, X)])
def test_stacked(a, b, c): pass

@pytest.mark.parametrize("d", [{"k": 1}, [1]], ids=["one", "two"])
def test_ids(d): pass

def test_plain(): pass

class TestK:
    @pytest.mark.parametrize("e", [X, 0])
    def test_m(self, e): pass
'''
    assert cases_by_test(source) == {
        "test_stacked": {f"{first}-{second}" for first in ("2-3.5", "named", "5-c2")
                         for second in ("1", "x y", "None", "True")},
        "test_ids": {"one", "two"}, "test_plain": set(), "TestK::test_m": {"e0", "0"}}
