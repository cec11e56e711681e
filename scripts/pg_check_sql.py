#!/usr/bin/env python3
"""Asks PostgreSQL to parse and plan every SQL statement of the store, without running it.

    scripts/pg_check_sql.py POSTGRES_URL

The database at POSTGRES_URL must hold the schema of migrations/postgres (e.g. a scratch
database the script is allowed to fill: it applies the migrations first when `jobs` is
missing). Every string literal of control-plane/src/store/*.rs that starts a statement
(SELECT/INSERT/UPDATE/DELETE/WITH) is taken; `{NAME}` is replaced by the value of a
`const NAME: &str = "…"` of the store when there is one (other interpolations: the statement is
skipped and counted). Each statement is sent as `PREPARE` (parse, name resolution, types) inside
a transaction that is rolled back. Parameters whose type PostgreSQL cannot infer without sqlx's
typed binds ("could not determine data type of parameter") are counted apart, not as errors.

Exit status 1 when a statement fails. It complements the store tests run on PostgreSQL:
it reaches the statements no test runs, but not the run-time behaviour.
"""

import pathlib
import re
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from pg_convert import literals  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
STORE = ROOT / "control-plane" / "src" / "store"
PSQL = "/usr/lib/postgresql/15/bin/psql"
START = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|WITH)\b")


def unescape(body, hashes):
    if hashes is not None:
        return body
    body = re.sub(r"\\\n\s*", "", body)
    return body.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")


def psql(url, sql):
    return subprocess.run(
        [PSQL, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url],
        input=sql,
        capture_output=True,
        text=True,
    )


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    url = sys.argv[1]
    probe = psql(url, "SELECT 1 FROM jobs LIMIT 0;")
    if probe.returncode != 0:
        for migration in sorted((ROOT / "migrations" / "postgres").glob("*.sql")):
            result = psql(url, migration.read_text())
            if result.returncode != 0:
                sys.exit(f"{migration}: {result.stderr}")
    consts, statements = {}, []
    for path in sorted(STORE.glob("*.rs")):
        text = path.read_text()
        for match in re.finditer(r'const (\w+): &str =\s*"', text):
            start = match.end() - 1
            for lit in literals(text[start:]):
                consts[match.group(1)] = unescape(text[start + lit[2] : start + lit[3]], lit[4])
                break
        for start, _end, body_start, body_end, hashes in literals(text):
            body = unescape(text[body_start:body_end], hashes)
            if START.match(body):
                line = text.count("\n", 0, start) + 1
                statements.append((f"{path.relative_to(ROOT)}:{line}", body))
    failed, untyped, skipped, ok = [], 0, 0, 0
    for where, sql in statements:
        for _ in range(3):  # constants may refer to constants
            sql = re.sub(r"\{(\w+)\}", lambda m: consts.get(m.group(1), m.group(0)), sql)
        if re.search(r"\{[^}]*\}", sql) or re.search(r"sqlite_master|pragma_", sql):
            skipped += 1
            continue
        result = psql(url, f"BEGIN;\nPREPARE check_statement AS {sql};\nROLLBACK;\n")
        if result.returncode == 0:
            ok += 1
        elif "could not determine data type of parameter" in result.stderr:
            untyped += 1
        else:
            failed.append((where, result.stderr.strip().splitlines()[0]))
    for where, error in failed:
        print(f"{where}: {error}")
    print(
        f"{ok} statements prepared, {len(failed)} failed, {untyped} need typed parameters "
        f"(fine through sqlx), {skipped} skipped (run-time interpolation, SQLite-only branch)"
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
