"""Reading csv and Parquet files into columns of cells, as read, for `jtrain.data.tables`.

CSV is read with pyarrow's reader, every cell as text; Parquet with `readers.iter_file_rows`,
every cell a Python value. The rows of several files are pooled, a column a file lacks being
None there. A CSV line with the wrong number of cells or invalid UTF-8 is skipped and counted
with its "file:row". CSV rows are numbered as pyarrow does, the header being row 1: the line
number unless there are blank lines or line breaks inside quoted cells. pyarrow comes with
the `prepare` extra.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools

from jtrain import extras
from jtrain.data import readers
from jtrain.data.records import Skipped


@dataclasses.dataclass
class Table:
    """Every file's rows, pooled, as columns of cells as read (None where a file lacks one)."""

    columns: dict[str, list]  # name -> cells (str for CSV, Python values for Parquet)
    where: list[str]  # "file:row" of each row


def header(kind: str, path: str) -> list[str]:
    """The column names of one file, read without reading its rows."""
    if kind == "parquet":
        pq = extras.need("pyarrow.parquet", extra="prepare", use="reading Parquet tables")
        try:
            return list(pq.read_schema(path).names)
        except Exception as err:  # pyarrow raises several kinds for a file that is not Parquet
            raise ValueError(f"{path}: cannot read it as parquet ({err}).") from err
    try:
        with readers.open_binary(path) as f:
            line = f.readline().decode("utf-8-sig")  # the header, which may not span lines
        names = next(csv.reader([line]), None)
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path}: cannot read its header row as csv ({err}).") from err
    if not names:
        raise ValueError(f"{path}: empty; a csv file needs a header row of column names.")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"{path}: the header names {twice} more than once; rename them.")
    return names


def read(kind: str, paths: list[str], skipped: Skipped) -> Table:
    """Every file of `paths` ("csv" or "parquet" `kind`), pooled; bad CSV rows go to `skipped`."""
    parts = []
    names: dict[str, None] = {}  # in order of first appearance
    for path in paths:
        names_here = header(kind, path)
        names.update(dict.fromkeys(names_here))
        if kind == "csv":
            parts.append(_csv_columns(path, names_here, skipped))
        else:
            parts.append(_parquet_columns(path, names_here))
    columns = {
        name: [cell for part in parts for cell in part.columns.get(name, [None] * len(part.where))]
        for name in names
    }
    return Table(columns, [where for part in parts for where in part.where])


def _parquet_columns(path: str, names: list[str]) -> Table:
    columns: dict[str, list] = {name: [] for name in names}
    where = []
    for row in readers.iter_file_rows(path, fmt="parquet"):
        where.append(row.source)
        for name in names:
            columns[name].append(row.value.get(name))
    return Table(columns, where)


def _csv_columns(path: str, names: list[str], skipped: Skipped) -> Table:
    """One CSV file as text cells; ragged rows and invalid UTF-8 go to `skipped`."""
    pacsv = extras.need("pyarrow.csv", extra="prepare", use="reading CSV tables")
    import pyarrow as pa

    ragged = []

    def keep_ragged(row) -> str:
        ragged.append(row)
        return "skip"

    try:
        with readers.open_binary(path) as f:
            table = pacsv.read_csv(
                f,
                read_options=pacsv.ReadOptions(use_threads=False),  # rows numbered in order
                parse_options=pacsv.ParseOptions(
                    newlines_in_values=True, invalid_row_handler=keep_ragged
                ),
                # Binary, not text: a cell of invalid UTF-8 spoils its row, not the file.
                convert_options=pacsv.ConvertOptions(
                    column_types=dict.fromkeys(names, pa.binary())
                ),
            )
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: cannot read it as csv ({err}); fix or remove it.") from err
    for row in ragged:
        why = f"{row.actual_columns} cells, the header has {row.expected_columns}"
        skipped.add(f"{path}:{row.number}", "ragged", why)
    where = [f"{path}:{n}" for n in _row_numbers(table.num_rows, {r.number for r in ragged})]
    invalid: dict[int, str] = {}
    columns = {name: _decoded(table.column(name).to_pylist(), invalid) for name in names}
    for i in sorted(invalid):
        skipped.add(where[i], "invalid_utf8", f"invalid UTF-8 ({invalid[i]})")
    if invalid:
        keep = [i for i in range(len(where)) if i not in invalid]
        columns = {name: [column[i] for i in keep] for name, column in columns.items()}
        where = [where[i] for i in keep]
    return Table(columns, where)


def _decoded(cells: list[bytes], invalid: dict[int, str]) -> list[str | None]:
    """The cells as text; a cell of invalid UTF-8 is None, its row's reason in `invalid`."""
    out = []
    for i, cell in enumerate(cells):
        try:
            out.append(cell.decode("utf-8"))
        except UnicodeDecodeError as err:
            invalid.setdefault(i, err.reason)
            out.append(None)
    return out


def _row_numbers(count: int, taken: set) -> list[int]:
    """pyarrow's numbers of the `count` good rows (the header is 1; `taken`: ragged rows)."""
    return list(itertools.islice((n for n in itertools.count(2) if n not in taken), count))
