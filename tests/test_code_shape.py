"""The promises the layout makes to people who copy and change the scripts: small one-concern utils
modules, scripts that read in one sitting, imports that run one way (scripts -> utils), and tests
and benchmarks that use utils rather than a script's internals."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in REPO.glob("*.py"))
SCRIPT_NAMES = {p.stem for p in SCRIPTS}
UTILS = sorted((REPO / "utils").glob("*.py"))
MAX_LINES = {"script": 550, "utils": 350}
MAX_FUNCTION_LINES = 120


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def imported_modules(module: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(module):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_main_scripts_are_at_the_top_level():
    assert {"pretrain", "finetune_ctc", "extract_features", "transcribe", "probe"} <= SCRIPT_NAMES
    assert not (REPO / "common.py").exists()


@pytest.mark.parametrize("path", SCRIPTS + UTILS, ids=lambda p: str(p.relative_to(REPO)))
def test_files_and_functions_are_short_enough_to_read(path):
    kind = "utils" if path.parent.name == "utils" else "script"
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES[kind], f"{path.name}: {lines} lines, more than {MAX_LINES[kind]}"
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{path.name}: {node.name} is {length} lines"


@pytest.mark.parametrize("path", UTILS, ids=lambda p: p.name)
def test_utils_never_import_a_script(path):
    assert not imported_modules(tree(path)) & SCRIPT_NAMES


@pytest.mark.parametrize(
    "path",
    sorted([*(REPO / "tests").glob("*.py"), *(REPO / "bench").glob("*.py")]),
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_tests_and_benches_use_only_a_scripts_main(path):
    """A test or bench may run a script (or call its main); what it needs beyond that lives in utils."""
    module = tree(path)
    aliases = {}
    for node in ast.walk(module):
        if isinstance(node, ast.ImportFrom) and node.module in SCRIPT_NAMES:
            assert {a.name for a in node.names} <= {"main"}, f"{path.name} imports {node.module} internals"
        elif isinstance(node, ast.Import):
            aliases.update({a.asname or a.name: a.name for a in node.names if a.name in SCRIPT_NAMES})
    for node in ast.walk(module):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            assert node.attr == "main", f"{path.name} uses {aliases[node.value.id]}.{node.attr}"
