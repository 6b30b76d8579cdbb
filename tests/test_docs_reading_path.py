"""docs/how-it-works.md's reading-path table gives each file's true length, and their sum (<= 1,800 lines)."""

from __future__ import annotations

import ast
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
DOC = REPO / 'docs' / 'how-it-works.md'
HEADING = '### The reading path'
LIMIT = 1800  # The core a learner reads in one sitting.


def table_rows() -> list[list[str]]:
  """The cells of each body row of the first table after HEADING."""
  lines = DOC.read_text(encoding='utf-8').splitlines()
  start = lines.index(HEADING)
  rows, in_table = [], False
  for line in lines[start + 1:]:
    if line.startswith('|'):
      in_table = True
      rows.append([cell.strip() for cell in line.strip().strip('|').split('|')])
    elif in_table:
      break
  return [r for r in rows[1:] if not set(''.join(r)) <= set('-: ')]  # Without the header and separator.


def number(cell: str) -> int:
  return int(cell.replace('*', '').replace(',', ''))


def wc_l(path: pathlib.Path) -> int:
  return path.read_bytes().count(b'\n')


def function_span(path: pathlib.Path, name: str) -> tuple[int, int]:
  """First and last line of the top-level function `name` (its decorators included)."""
  for node in ast.parse(path.read_text(encoding='utf-8')).body:
    if isinstance(node, ast.FunctionDef) and node.name == name:
      return min([node.lineno] + [d.lineno for d in node.decorator_list]), node.end_lineno
  raise AssertionError(f'{path.name} has no function {name}')


def test_reading_path_counts_are_the_files_lengths():
  rows = table_rows()
  files = [r for r in rows if r[0].startswith('[')]
  totals = [r for r in rows if 'total' in r[0]]
  assert len(files) >= 10 and len(totals) == 1, rows
  wrong, counted = [], 0
  for what, _, lines in files:
    path = REPO / re.search(r'\[`([^`]+)`\]', what).group(1)
    part = re.search(r'`(\w+)` only \(lines (\d+)-(\d+)\)', what)
    if part:  # One function of the file: its stated span must be where it is.
      span = function_span(path, part.group(1))
      stated = (int(part.group(2)), int(part.group(3)))
      if span != stated:
        wrong.append(f'{path.name} {part.group(1)}: lines {stated[0]}-{stated[1]} in the doc, '
                     f'{span[0]}-{span[1]} in the file')
      real = span[1] - span[0] + 1
    else:
      real = wc_l(path)
    if number(lines) != real:
      wrong.append(f'{path.relative_to(REPO)}: {lines} lines in the doc, {real} in the file')
    counted += real
  assert not wrong, 'docs/how-it-works.md, "The reading path": ' + '; '.join(wrong)
  total = number(totals[0][-1])
  assert total == sum(number(r[-1]) for r in files) == counted
  assert total <= LIMIT, f'the reading path is {total} lines, over {LIMIT}'
