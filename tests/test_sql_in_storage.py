"""All SQL lives in ``flm/storage/``: every other module calls a repository. The check reads
every string literal in ``flm/`` (f-string parts and adjacent literals included) outside
storage and fails on one that is an SQL statement."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import flm

ROOT = Path(flm.__file__).parent

SQL = re.compile(
    r"\b(SELECT\b[\s\S]+?\bFROM\b|INSERT\s+(OR\s+\w+\s+)?INTO\b|UPDATE\s+\w+\s+SET\b"
    r"|DELETE\s+FROM\b|(CREATE|DROP|ALTER)\s+(TABLE|INDEX|TRIGGER|VIEW)\b|PRAGMA\s+\w+"
    r"|BEGIN\s+(IMMEDIATE|EXCLUSIVE|DEFERRED)\b)"
)


def sql_strings(source: str) -> list[tuple[int, str]]:
    """(line, text) of the string literals in ``source`` that hold SQL."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.JoinedStr):
            text = "".join(
                v.value
                for v in node.values
                if isinstance(v, ast.Constant) and isinstance(v.value, str)
            )
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        else:
            continue
        if SQL.search(text):
            found.append((node.lineno, text[:60]))
    return found


def test_no_sql_outside_storage() -> None:
    found = [
        f"{path.relative_to(ROOT.parent)}:{line}: {text!r}"
        for path in sorted(ROOT.rglob("*.py"))
        if path.relative_to(ROOT).parts[0] != "storage"
        for line, text in sql_strings(path.read_text())
    ]
    assert found == []


@pytest.mark.parametrize(
    ("line", "is_sql"),
    [
        ('q = "SELECT id FROM api_keys"', True),
        ('q = ("SELECT id, label "\n     "FROM api_keys WHERE id=?")', True),
        ('q = f"INSERT INTO {table}(a) VALUES (?)"', True),
        ('q = "UPDATE engines SET enabled=0"', True),
        ('q = "DELETE FROM ip_blocklist WHERE ip=?"', True),
        ('q = "CREATE TABLE t(a)"', True),
        ('q = "PRAGMA integrity_check"', True),
        ('conn.execute("BEGIN IMMEDIATE")', True),
        ('METHODS = {"GET", "DELETE", "OPTIONS"}', False),
        ('doc = "select the model from the list"', False),
        ('msg = "the update set is empty"', False),
    ],
)
def test_the_check_tells_sql_from_other_text(line: str, is_sql: bool) -> None:
    assert bool(sql_strings(line)) is is_sql
