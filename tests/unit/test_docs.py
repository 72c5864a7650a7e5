"""What the documentation states, checked against the code it describes.

Each test names the key, case or citation that differs, so a stale sentence
fails CI instead of misleading a reader.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import re
import subprocess
from pathlib import Path

import pytest

from elastic_nixl.config import (
    INT_RANGES,
    KNOWN_KEYS,
    AllocatorChoice,
    ElasticNixlSettings,
    TransferPath,
)

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"

ENUM_KEYS: dict[str, type[enum.Enum]] = {
    "allocator": AllocatorChoice,
    "transfer_path": TransferPath,
}


def configuration_table(markdown: str) -> dict[str, dict[str, str]]:
    """The README's ``kv_connector_extra_config`` table: key -> its cells."""
    section = markdown.split("### Configuration (`kv_connector_extra_config`)", 1)
    assert len(section) == 2, "README has no configuration section"
    rows: dict[str, dict[str, str]] = {}
    header: list[str] | None = None
    for line in section[1].splitlines():
        if not line.startswith("|"):
            if header is not None:
                break  # the table ended
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not set("".join(cells)) <= set("-: "):
            rows[cells[0].strip("`")] = dict(zip(header, cells, strict=True))
    return rows


def parse_number(text: str) -> int:
    """``4096``, ``2^30``."""
    base, _, power = text.partition("^")
    return int(base) ** int(power) if power else int(base)


def parse_default(cell: str) -> object:
    value = cell.strip("`")
    if value == "none":
        return None
    if value in ("true", "false"):
        return value == "true"
    if re.fullmatch(r"\d+", value):
        return int(value)
    return value


@pytest.fixture(scope="module")
def table() -> dict[str, dict[str, str]]:
    return configuration_table(README.read_text())


def test_table_lists_exactly_the_accepted_keys(table: dict[str, dict[str, str]]):
    assert set(table) == KNOWN_KEYS, (
        f"README documents {sorted(set(table) - KNOWN_KEYS)} that config.py does "
        f"not accept, and omits {sorted(KNOWN_KEYS - set(table))}"
    )


def test_table_defaults_are_the_settings_defaults(table: dict[str, dict[str, str]]):
    defaults = {f.name: f.default for f in dataclasses.fields(ElasticNixlSettings)}
    for key, row in table.items():
        code = defaults[key]
        if isinstance(code, enum.Enum):
            code = code.value
        assert parse_default(row["default"]) == code, (
            f"README's default for {key!r} is {row['default']}; config.py's is {code!r}"
        )


def test_table_values_are_what_config_accepts(table: dict[str, dict[str, str]]):
    for key, row in table.items():
        values = row["values"]
        if key in ENUM_KEYS:
            documented = set(re.findall(r"`([^`]+)`", values))
            accepted = {m.value for m in ENUM_KEYS[key]}
            assert documented == accepted, (
                f"{key!r}: README {documented}, code {accepted}"
            )
        elif key in INT_RANGES:
            found = re.match(r"(\d+(?:\^\d+)?) to (\d+(?:\^\d+)?)", values)
            assert found, f"{key!r}: values {values!r} are not 'LOW to HIGH'"
            documented_range = (parse_number(found[1]), parse_number(found[2]))
            code_range = (INT_RANGES[key].lowest, INT_RANGES[key].highest)
            assert documented_range == code_range, (
                f"{key!r}: README says {values!r}, config.py accepts {code_range}"
            )
        else:
            assert values == "`true`, `false`", f"{key!r}: values {values!r}"
            assert isinstance(getattr(ElasticNixlSettings(), key), bool), (
                f"README documents {key!r} as a flag; config.py does not"
            )


def test_parsing_the_table_catches_a_wrong_default():
    # The checks above are only as good as the parser: a doctored row must
    # come out different from the code.
    doctored = README.read_text().replace(
        "| `staging_slots` | 1 to 64 | 4 |", "| `staging_slots` | 1 to 64 | 5 |"
    )
    assert parse_default(configuration_table(doctored)["staging_slots"]["default"]) == 5


def tracked_text_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    paths = [REPO / p for p in out.split("\0") if p]
    return [
        p
        for p in paths
        if p.suffix in {".md", ".py", ".toml", ".sh", ".txt", ".cfg", ".yml", ".yaml"}
        or p.name in {"dev.sh", "run"}
    ]


# --- the transfer bench's case names ----------------------------------------

BENCH = REPO / "src" / "elastic_nixl" / "tools" / "bench" / "transfer.py"
CASE_NAME = r"(?:ceiling(?:_[a-z]+)*|[a-d]_(?:vanilla|project|connector)_[a-z_]+)"
# Names earlier runs gave cases, kept in the logs under docs/results/ that the
# docs quote: docs may cite them as history, the bench no longer emits them.
HISTORICAL_CASES = frozenset({"a_vanilla_static", "c_connector_vmm_staged"})


def emitted_case_names(source: str) -> set[str]:
    """The case names the bench's code gives results: string constants passed
    as ``CaseResult``'s ``case`` or as a ``name`` parameter of the module's
    functions, or assigned to a variable ``name``."""
    tree = ast.parse(source)
    name_position = {
        f.name: [a.arg for a in f.args.args].index("name")
        for f in tree.body
        if isinstance(f, ast.FunctionDef) and "name" in [a.arg for a in f.args.args]
    }
    name_position["CaseResult"] = 0
    keyword = {fn: ("case" if fn == "CaseResult" else "name") for fn in name_position}
    found: set[str] = set()

    def constants(node: ast.AST) -> set[str]:
        # A literal, or either branch of ``"x" if ... else "y"``.
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, ast.IfExp):
            return constants(node.body) | constants(node.orelse)
        return set()

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            fn = node.func.id
            if fn not in name_position:
                continue
            if len(node.args) > name_position[fn]:
                found |= constants(node.args[name_position[fn]])
            found |= {
                c
                for kw in node.keywords
                if kw.arg == keyword[fn]
                for c in constants(kw.value)
            }
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "name" for t in node.targets
        ):
            found |= constants(node.value)
    return found


def test_bench_cases_constant_is_what_the_code_emits():
    from elastic_nixl.tools.bench.transfer import CASES

    emitted = emitted_case_names(BENCH.read_text())
    assert len(CASES) == len(set(CASES))
    assert emitted == set(CASES), (
        f"emitted but not in CASES: {sorted(emitted - set(CASES))}; "
        f"in CASES but never emitted: {sorted(set(CASES) - emitted)}"
    )


def test_emitted_case_names_finds_a_new_case():
    source = (
        BENCH.read_text() + '\n\ndef later():\n    return CaseResult("e_new", 0, 0)\n'
    )
    assert "e_new" in emitted_case_names(source)


def test_bench_docstring_names_every_case_and_no_other():
    from elastic_nixl.tools.bench import transfer

    assert transfer.__doc__ is not None
    named = set(re.findall(rf"``({CASE_NAME})``", transfer.__doc__))
    assert named == set(transfer.CASES), (
        f"the docstring names {sorted(named - set(transfer.CASES))}, which the "
        f"bench does not emit, and omits {sorted(set(transfer.CASES) - named)}"
    )


@pytest.mark.parametrize("doc", ["docs/benchmarks.md", "docs/gpu.md", "README.md"])
def test_docs_name_only_cases_the_bench_emits_or_emitted(doc: str):
    from elastic_nixl.tools.bench.transfer import CASES

    named = set(re.findall(rf"`({CASE_NAME})`", (REPO / doc).read_text()))
    unknown = named - set(CASES) - HISTORICAL_CASES
    assert not unknown, f"{doc} names bench cases that never existed: {unknown}"


# --- no citation of a path outside the repository -----------------------------

# A relative path that climbs out of its directory, a path into the
# workspace folder "shared" beside the repository, or an absolute path into
# the workspace: none exists in a clone of the repository.
CLIMBING_PATH = re.compile(r"(?<![\w./-])(?:\.\./)+[\w.-][\w./-]*")
WORKSPACE_PATH = re.compile(r"(?<![\w./-])(?:/work/|shared/)[\w.-][\w./-]*")


# Citations in files this branch may not edit, each to be removed together
# with the hand edit that fixes it (the test fails once the edit is in, so
# the entry cannot outlive it).
AWAITING_HAND_EDIT: dict[str, list[str]] = {}


def citations_outside(path: Path, text: str) -> list[str]:
    """Paths ``text`` (the content of ``path``) cites that lie outside the
    repository. A climbing path counts as inside only if it names a file of
    the repository from ``path``'s folder: one that climbs from the repository
    root instead, as authors write, finds nothing there."""
    found = list(WORKSPACE_PATH.findall(text))
    for cited in CLIMBING_PATH.findall(text):
        resolved = (path.parent / cited.rstrip(".")).resolve()
        if not (resolved.is_relative_to(REPO) and resolved.exists()):
            found.append(cited)
    return found


def test_no_file_cites_a_path_outside_the_repository():
    cited = {
        str(p.relative_to(REPO)): hits
        for p in tracked_text_files()
        # This file's own examples of what is refused are not citations.
        if p != Path(__file__).resolve()
        and (hits := citations_outside(p, p.read_text(errors="replace")))
    }
    assert cited == AWAITING_HAND_EDIT, (
        f"citations of paths outside the repository: {cited}; "
        f"expected only those awaiting a hand edit: {AWAITING_HAND_EDIT}"
    )


@pytest.mark.parametrize(
    "text",
    [
        "see `../shared/device/RESULTS.md`",
        "as ``shared/device/RESULTS.md`` saw",
        "in /work/shared/DESIGN.md",
        "`../../../etc/notes.md`",
    ],
)
def test_citations_outside_finds(text: str):
    assert citations_outside(REPO / "docs" / "gpu.md", text)


def test_citations_inside_the_repository_pass():
    text = "`../README.md`, `results/gpu_tests.log`, `src/elastic_nixl/config.py`"
    assert citations_outside(REPO / "docs" / "gpu.md", text) == []
