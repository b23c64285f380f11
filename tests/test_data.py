"""The data layer in an in-process IPython shell: notebook tables, {{var}}, --con, database."""

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

from nbcustom import data
from nbcustom.errors import NbCustomError


def rows(ip, sql, line=""):
    """What every data-taking magic does with its line and body."""
    magics = next(c for c in ip.configurables if type(c).__name__ == "NbCustom")
    args = {"con": line.split()[1]} if line.startswith("--con") else {}
    context = magics._context(args)
    return data.query(context["con"], sql, context["namespace"])


@pytest.mark.parametrize(
    "frame",
    [
        pd.DataFrame({"x": [1, 2, 3], "s": ["a", "b", "c"]}),
        pl.DataFrame({"x": [1, 2, 3], "s": ["a", "b", "c"]}),
        pa.table({"x": [1, 2, 3], "s": ["a", "b", "c"]}),
    ],
    ids=["pandas", "polars", "pyarrow"],
)
def test_namespace_tables_are_queryable(ip, frame):
    ip.user_ns["tickets_df"] = frame
    result = rows(ip, "SELECT sum(x) AS total, string_agg(s, '') AS s FROM tickets_df")
    assert isinstance(result, pa.Table)
    assert result.to_pylist() == [{"total": 6, "s": "abc"}]


def test_var_with_quote_becomes_a_literal(ip):
    ip.user_ns["people"] = pd.DataFrame({"name": ["O'Brien", "Smith"], "age": [41, 35]})
    ip.user_ns["who"] = "O'Brien"
    ip.user_ns["min_age"] = 40
    result = rows(ip, "SELECT name FROM people WHERE name = {{who}} AND age >= {{ min_age }}")
    assert result.column("name").to_pylist() == ["O'Brien"]


def test_unknown_var_is_an_error(ip):
    with pytest.raises(NbCustomError, match="define nope"):
        rows(ip, "SELECT {{nope}}")


def test_con_option_uses_that_connection(ip):
    other = duckdb.connect()
    other.execute("CREATE TABLE only_here AS SELECT 42 AS answer")
    ip.user_ns["other"] = other
    assert rows(ip, "SELECT answer FROM only_here", "--con other").to_pylist() == [{"answer": 42}]
    with pytest.raises(NbCustomError, match="SQL error"):
        rows(ip, "SELECT answer FROM only_here")
    with pytest.raises(NbCustomError, match="no such variable"):
        rows(ip, "SELECT 1", "--con missing")


def test_config_database_file(ip, tmp_path):
    path = tmp_path / "shop.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE orders AS SELECT range AS id FROM range(5)")
    con.close()
    ip.run_line_magic("config", f"NbCustom.database = {str(path)!r}")
    try:
        assert rows(ip, "SELECT count(*) AS n FROM orders").to_pylist() == [{"n": 5}]
    finally:
        ip.run_line_magic("config", "NbCustom.database = ':memory:'")
    with pytest.raises(NbCustomError):
        rows(ip, "SELECT count(*) FROM orders")


def test_default_connection_is_duckdbs_own(ip):
    duckdb.sql("CREATE OR REPLACE TABLE made_in_notebook AS SELECT 7 AS v")
    assert rows(ip, "SELECT v FROM made_in_notebook").to_pylist() == [{"v": 7}]


def test_real_table_wins_over_namespace_name(ip):
    duckdb.sql("CREATE OR REPLACE TABLE shadow AS SELECT 1 AS v")
    ip.user_ns["shadow"] = pd.DataFrame({"v": [2]})
    assert rows(ip, "SELECT v FROM shadow").to_pylist() == [{"v": 1}]


@pytest.mark.parametrize(
    "value, literal",
    [(None, "NULL"), (True, "TRUE"), (3, "3"), (2.5, "2.5"), ("it's", "'it''s'"), ([1, "a"], "[1, 'a']")],
)
def test_sql_literal(value, literal):
    assert data.sql_literal(value) == literal


def test_empty_and_non_select_sql(ip):
    with pytest.raises(NbCustomError, match="no SQL"):
        rows(ip, "  ;  ")
    with pytest.raises(NbCustomError, match="SELECT"):
        rows(ip, "CREATE OR REPLACE TABLE t_nothing (x INT)")


def test_batches_read_a_query_a_slice_at_a_time_with_notebook_tables_and_the_total(ip):
    ip.user_ns["numbers_df"] = pd.DataFrame({"n": range(1000)})
    magics = next(c for c in ip.configurables if type(c).__name__ == "NbCustom")
    context = magics._context({})
    parts = list(data.batches("SELECT n FROM numbers_df WHERE n < {{limit}} ORDER BY n", 256, context["namespace"],
                              context["con"], {"limit": 700}))
    assert [len(p) for p, _ in parts] == [256, 256, 188] and {total for _, total in parts} == {700}
    assert pd.concat([p for p, _ in parts])["n"].tolist() == list(range(700))
    assert [len(p) for p, _ in data.batches(pd.DataFrame({"n": range(5)}), 2)] == [2, 2, 1]
    with pytest.raises(NbCustomError, match="no rows"):
        next(data.batches("SELECT * FROM numbers_df WHERE n < 0", 256, context["namespace"], context["con"]))
    with pytest.raises(NbCustomError, match="SQL error"):
        next(data.batches("SELECT missing FROM numbers_df", 256, context["namespace"], context["con"]))


def test_write_parts_replaces_the_table_only_once_every_part_is_in():
    con = duckdb.connect()
    con.execute("CREATE TABLE scored AS SELECT 'old' AS prediction")

    def parts(fail_at=None):
        for i in range(3):
            if i == fail_at:
                raise KeyboardInterrupt  # Ctrl-C in the middle of a long %%predict --into
            yield pd.DataFrame({"i": [2 * i, 2 * i + 1], "prediction": ["new", "new"]}), 6

    seen = []
    with pytest.raises(KeyboardInterrupt):
        data.write_parts(con, "scored", parts(fail_at=2), 6, 3, lambda done, total: seen.append((done, total)))
    assert con.execute("SELECT * FROM scored").fetchall() == [("old",)] and seen == [(2, 6), (4, 6)]
    assert con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name LIKE '__nbcustom%'").fetchone() == (0,)

    kept, written = data.write_parts(con, "scored", parts(), 6, 3, lambda done, total: None)
    assert written == 6 and kept["i"].tolist() == list(range(6))  # up to `keep` rows come back
    assert data.write_parts(con, "scored", parts(), 5, 3, lambda done, total: None)[0]["i"].tolist() == [0, 1, 2]  # else `preview`
    assert con.execute("SELECT i, prediction FROM scored ORDER BY i").fetchall() == [(i, "new") for i in range(6)]
    assert con.execute("SELECT count(*) FROM information_schema.tables").fetchone() == (1,)
