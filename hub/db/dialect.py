"""The few SQL spellings that differ between SQLite and PostgreSQL, for the SQL both stores run."""

from __future__ import annotations

from typing import Final, Literal

Dialect = Literal["sqlite", "postgresql"]

GREATEST: Final[dict[Dialect, str]] = {"sqlite": "max", "postgresql": "greatest"}  # the scalar maximum
JSON_VALUES: Final[dict[Dialect, str]] = {  # a table of the values of a JSON array bound as text
    "sqlite": "json_each(?)", "postgresql": "json_array_elements_text(?::json)"}
JSON_ARRAY: Final[dict[Dialect, str]] = {  # the same for a column holding a JSON array: .format(column)
    "sqlite": "json_each({})", "postgresql": "json_array_elements_text(({})::json)"}
# A text field of a JSON object in a text column, NULL when the column is not JSON: .format(column, key)
JSON_FIELD: Final[dict[Dialect, str]] = {
    "sqlite": "json_extract(CASE WHEN json_valid({0}) THEN {0} END, '$.{1}')",
    "postgresql": "json_field({0}, '{1}')"}  # the schema's function: NULL instead of an error
JSON_INT: Final[dict[Dialect, str]] = {  # the same for an integer field, NULL when it is not one
    "sqlite": "json_extract(CASE WHEN json_valid({0}) THEN {0} END, '$.{1}')",
    "postgresql": "json_int({0}, '{1}')"}
JSON_OBJECT_ROWS: Final[dict[Dialect, str]] = {  # a JSON object of integers bound as text, as rows (key, value)
    "sqlite": "(SELECT key, value FROM json_each(?))",
    "postgresql": "(SELECT key, value::bigint AS value FROM json_each_text(?::json))"}
