#!/usr/bin/env python3
"""The mechanical part of moving the store from sqlx-sqlite to sqlx's Any driver.

Run from the repository root, again whenever main has moved on (it is idempotent: converted
code is left as it is):

    scripts/pg_convert.py [--dry-run] [FILES...]

Default files: control-plane/src/store/*.rs except SQLITE_ONLY. What it does, per file:

1. In every Rust string literal that is SQL (it holds a SQL keyword and a placeholder):
   `?NNN` -> `$NNN`, and each bare `?` -> `$1`, `$2`, ... numbered within that literal.
   Literals that are fragments of a bigger statement (no SELECT/INSERT/UPDATE/DELETE/WITH at the
   start) or that interpolate `{placeholders}`-like text before a placeholder are numbered too
   but REPORTED, since their numbers may have to start after other fragments.
2. `COALESCE(SUM(<condition>), 0)` -> `COUNT(*) FILTER (WHERE <condition>)` (PostgreSQL does
   not sum booleans; both support FILTER).
3. The column `offset` (a reserved word in PostgreSQL) is quoted as "offset" in SQL literals
   (inside raw strings only when they have `#` delimiters; otherwise reported).
4. sqlx SQLite types -> Any types: `sqlx::sqlite::SqliteRow` -> `sqlx::any::AnyRow`,
   `SqliteConnection` -> `AnyConnection`, `SqlitePool` -> `AnyPool`.
5. Reports (file:line, for a human): SQLite-only SQL (`BEGIN IMMEDIATE`, `json_group_array`,
   `INSERT OR`, `IS ?`/`IS '...'` with a value, `IFNULL`, `LIMIT -1`, `rowid`, `GLOB`,
   two-argument `MAX`/`MIN`, uncast `SUM`/`AVG`), `bool` decodes (`try_get::<bool`,
   `query_scalar::<_, bool>`, `: bool = sqlx::query_scalar`), run-time placeholder lists
   (`vec!["?"; n]`), and `.bind(` of expressions that look boolean.

The rules behind it are in docs/postgres.md. Exit status 0; the report goes to stderr.
"""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SQL_HINT = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|WHERE|VALUES|SET|FROM|RETURNING|ORDER BY|LIMIT|GROUP BY|JOIN)\b")
STATEMENT_START = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|WITH|CREATE|DROP|BEGIN|COMMIT)\b")
REPORTS = [
    (re.compile(r"BEGIN IMMEDIATE"), "BEGIN IMMEDIATE: SQLite only (dialect helper)"),
    (re.compile(r"json_group_array", re.I), "json_group_array: SQLite only (dialect helper)"),
    (re.compile(r"\bINSERT\s+OR\b", re.I), "INSERT OR …: use ON CONFLICT"),
    (re.compile(r"\bIS\s+(NOT\s+)?(\$\d+|\?|'[^']*')", re.I), "IS <value>: use IS [NOT] DISTINCT FROM"),
    (re.compile(r"\bIFNULL\b", re.I), "IFNULL: use COALESCE"),
    (re.compile(r"LIMIT\s+-1"), "LIMIT -1: SQLite only"),
    (re.compile(r"\browid\b", re.I), "rowid: SQLite only"),
    (re.compile(r"\bGLOB\b"), "GLOB: SQLite only"),
    (re.compile(r"(?<!CAST\()\b(SUM|AVG)\(", re.I), "SUM/AVG: NUMERIC on PostgreSQL, cast it"),
    (re.compile(r"\bstrftime|julianday|datetime\(|unixepoch", re.I), "SQLite date function"),
    (re.compile(r"\bPRAGMA\b"), "PRAGMA: SQLite only"),
]
CODE_REPORTS = [
    (re.compile(r"try_get::<bool"), "bool decode: read i64 (docs/postgres.md rule 2)"),
    (re.compile(r"query_scalar::<_, bool>"), "bool decode: read i64"),
    (re.compile(r":\s*bool\s*=\s*sqlx::query_scalar"), "bool decode: read i64"),
    (re.compile(r'vec!\["\?"'), "run-time placeholder list: number it from the right start"),
    (re.compile(r"\.bind\((true|false|[a-z_.]*(enabled|flag|read_only|reuse|record|manual|is_[a-z_]*))\)"),
     "binds what may be a bool: bind i64::from(..) if the column is a 0/1 flag"),
]
# Store files that talk to SQLite itself with the native driver and stay as they are
# (main's backup.rs: `VACUUM INTO` and `PRAGMA integrity_check` on a connection of its own).
SQLITE_ONLY = {"backup.rs"}
TYPE_RENAMES = [
    ("sqlx::sqlite::SqliteRow", "sqlx::any::AnyRow"),
    ("sqlx::SqliteConnection", "sqlx::AnyConnection"),
    ("SqliteConnection", "AnyConnection"),
    ("SqlitePool", "AnyPool"),
    ("SqliteRow", "AnyRow"),
]


def literals(text):
    """Yields (start, end, body_start, body_end, raw_hashes) of each string literal; None for
    raw_hashes means a normal (escaped) string."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
            continue
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
            continue
        if c == "'":
            m = re.match(r"'(\\(x[0-9a-fA-F]{2}|u\{[0-9a-fA-F]+\}|.)|[^\\'])'", text[i:])
            i += m.end() if m else 1  # a lifetime otherwise
            continue
        m = re.match(r"b?r(#*)\"", text[i:])
        if m and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = m.group(1)
            body = i + m.end()
            close = text.find('"' + hashes, body)
            yield i, close + 1 + len(hashes), body, close, hashes
            i = close + 1 + len(hashes)
            continue
        if c == '"':
            j = i + 1
            while text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            yield i, j + 1, i + 1, j, None
            i = j + 1
            continue
        i += 1


def balanced(text, open_at):
    """The index just after the parenthesis that closes the one at `open_at`, or None."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


BOOLEAN_SUM = re.compile(r"COALESCE\(SUM\(")


def rewrite_boolean_sums(body):
    """`COALESCE(SUM(<condition>), 0)` (SQLite sums booleans as 0/1; PostgreSQL refuses) ->
    `COUNT(*) FILTER (WHERE <condition>)`, the same number on both (and a BIGINT)."""
    out, i = [], 0
    for match in BOOLEAN_SUM.finditer(body):
        if match.start() < i:
            continue
        sum_open = match.end() - 1
        sum_close = balanced(body, sum_open)
        if sum_close is None:
            continue
        rest = re.match(r"\s*,\s*0\s*\)", body[sum_close:])
        condition = body[sum_open + 1 : sum_close - 1]
        if not rest or not re.search(r"=|<|>|\bIN\b|\bAND\b|\bOR\b|\bIS\b", condition):
            continue
        out.append(body[i : match.start()])
        out.append(f"COUNT(*) FILTER (WHERE {condition})")
        i = sum_close + rest.end()
    out.append(body[i:])
    return "".join(out)


def convert_sql(body, hashes, report):
    """Returns the converted literal body."""
    if not SQL_HINT.search(body):
        return body
    body = rewrite_boolean_sums(body)
    for pattern, message in REPORTS:
        if pattern.search(body):
            report(message)
    for match in re.finditer(r"\b(MAX|MIN)\(", body, flags=re.I):
        close = balanced(body, match.end() - 1)
        inner = body[match.end() : (close or len(body)) - 1]
        depth, top_level_comma = 0, False
        for char in inner:
            depth += {"(": 1, ")": -1}.get(char, 0)
            top_level_comma |= char == "," and depth == 0
        if top_level_comma:
            report("two-argument MAX/MIN (a scalar in SQLite): use CASE")
    has_placeholder = re.search(r"\?", body) is not None
    if has_placeholder:
        if not STATEMENT_START.match(body):
            report("SQL fragment with placeholders: check the numbering across fragments")
        if re.search(r"\{[a-z_]*(placeholder|ids|list|values)[a-z_]*\}", body) and re.search(
            r"\{[a-z_]*(placeholder|ids|list|values)[a-z_]*\}[\s\S]*\?", body
        ):
            report("placeholders after an interpolated list: numbering must start after it")
        counter = [0]

        def number(match):
            if match.group(1):
                return "$" + match.group(1)
            counter[0] += 1
            return f"${counter[0]}"

        if re.search(r"\?\d", body) and re.search(r"\?(?!\d)", body):
            report("mixed ?N and ? placeholders")
        body = re.sub(r"\?(\d+)?", number, body)
    if re.search(r'(?<!")\boffset\b(?!")', body) and "job_logs" in body or (
        re.search(r"\boffset\s*\+\s*length", body)
    ):
        if hashes is None:
            body = re.sub(r'(?<!")\boffset\b(?!\\?")', r'\\"offset\\"', body)
        elif hashes:
            body = re.sub(r'(?<!")\boffset\b(?!")', '"offset"', body)
        else:
            report('"offset" needs quoting inside a raw string without # delimiters')
    return body


def convert_file(path, dry_run):
    text = path.read_text()
    out, last, notes = [], 0, []

    def line_of(pos):
        return text.count("\n", 0, pos) + 1

    for start, end, body_start, body_end, hashes in list(literals(text)):
        body = text[body_start:body_end]

        def report(message, pos=start):
            notes.append((line_of(pos), message))

        new_body = convert_sql(body, hashes, report)
        out.append(text[last:body_start])
        out.append(new_body)
        last = body_end
    out.append(text[last:])
    new = "".join(out)
    for old_name, new_name in TYPE_RENAMES:
        new = re.sub(r"(?<![\w:])" + re.escape(old_name) + r"\b(?!::)", new_name, new)
    for number, line in enumerate(new.splitlines(), 1):
        for pattern, message in CODE_REPORTS:
            if pattern.search(line):
                notes.append((number, message))
    if new != text and not dry_run:
        path.write_text(new)
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    for number, message in sorted(set(notes)):
        sys.stderr.write(f"{rel}:{number}: {message}\n")
    return new != text


def main():
    args = [a for a in sys.argv[1:] if a != "--dry-run"]
    dry_run = "--dry-run" in sys.argv[1:]
    files = [pathlib.Path(a).resolve() for a in args] or sorted(
        path
        for path in (ROOT / "control-plane" / "src" / "store").glob("*.rs")
        if path.name not in SQLITE_ONLY
    )
    changed = [f for f in files if convert_file(f, dry_run)]
    verb = "would change" if dry_run else "changed"
    sys.stderr.write(f"{verb} {len(changed)} of {len(files)} files\n")


if __name__ == "__main__":
    main()
