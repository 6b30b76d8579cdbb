"""Relative links and images in README.md, docs/*.md and runs/*.md resolve (anchors too); README is short."""

from __future__ import annotations

import pathlib
import re

import jupytext
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Pages a link may point to before they exist (none now); an existing file is checked like any other.
PENDING: set[str] = set()

# The pages of the docs map, each opening (after its title) with the question it answers.
QUESTION_PAGES = ('configuration', 'how-it-works', 'faithfulness', 'seeing-inside', 'performance',
                  'scaling-out', 'speedrun', 'gpu')

_FENCE = re.compile(r'^(```|~~~).*?^\1', re.M | re.S)
_CODE = re.compile(r'`[^`\n]*`')
_LINK = re.compile(r'!?\[(?:[^\]\n]|\][^(\n])*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
_HTML = re.compile(r'<(?:img|a)\b[^>]*?\b(?:src|href)="([^"]+)"', re.I)


def doc_files(root: pathlib.Path = REPO) -> list[pathlib.Path]:
  """README.md, the docs pages and the run files' pages (runs/: the index and the logbook)."""
  return [root / 'README.md', *sorted((root / 'docs').glob('*.md')), *sorted((root / 'runs').glob('*.md'))]


def targets(text: str) -> list[str]:
  """Link and image targets of a markdown text, outside code blocks and code spans."""
  text = _CODE.sub('', _FENCE.sub('', text))
  return _LINK.findall(text) + _HTML.findall(text)


def slug(heading: str) -> str:
  """GitHub's anchor for a heading: its rendered text in lower case, punctuation dropped (but for `-` and
  `_`), each space a hyphen. Emphasis marks and link targets are not text; code spans keep every
  character (`speedrun_gpt2` keeps its underscore, as `snake_case` does outside code)."""
  text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', heading.strip())
  parts = text.split('`')
  for i in range(0, len(parts), 2):  # Outside code spans: drop * and the _ of _emphasis_.
    parts[i] = re.sub(r'(?<!\w)_+|_+(?!\w)', '', parts[i].replace('*', ''))
  return re.sub(r'[^\w\- ]', '', ''.join(parts).lower()).replace(' ', '-')


def anchors(path: pathlib.Path) -> set[str]:
  """The heading anchors of a markdown file (duplicates get -1, -2, ... as on GitHub)."""
  seen: dict[str, int] = {}
  out = set()
  for line in _FENCE.sub('', path.read_text(encoding='utf-8')).splitlines():
    m = re.match(r'#{1,6}\s+(.*?)\s*#*\s*$', line)
    if m:
      s = slug(m.group(1))
      out.add(s if s not in seen else f'{s}-{seen[s]}')
      seen[s] = seen.get(s, 0) + 1
  return out


def broken_links(path: pathlib.Path, root: pathlib.Path = REPO, pending: set[str] = frozenset(),
                 text: str | None = None) -> list[str]:
  """What does not resolve among the relative links and images of one markdown file (or of `text`,
  markdown that lives at `path`)."""
  problems = []
  for target in targets(path.read_text(encoding='utf-8') if text is None else text):
    if re.match(r'^[a-z][a-z0-9+.-]*:', target, re.I):  # http:, https:, mailto: ...: not checked here.
      continue
    file_part, _, anchor = target.partition('#')
    dest = (path.parent / file_part).resolve() if file_part else path
    rel = dest.relative_to(root).as_posix() if dest.is_relative_to(root) else str(dest)
    if not dest.exists():
      if rel not in pending:
        problems.append(f'{path.name}: {target} ({rel} does not exist)')
      continue
    if anchor and dest.suffix == '.md' and anchor not in anchors(dest):
      problems.append(f'{path.name}: {target} (no heading #{anchor} in {rel})')
  return problems


def test_every_relative_link_and_image_resolves():
  files = doc_files()
  assert len(files) >= 8, [f.name for f in files]  # README and the docs pages are all found.
  problems = [p for f in files for p in broken_links(f, pending=PENDING)]
  assert not problems, '\n'.join(problems)


def test_the_notebooks_links_resolve():
  source = REPO / 'notebooks' / 'walkthrough.py'
  markdown = '\n\n'.join(c.source for c in jupytext.read(source).cells if c.cell_type == 'markdown')
  assert '](../docs/' in markdown
  problems = broken_links(source, pending=PENDING, text=markdown)
  assert not problems, '\n'.join(problems)


def test_the_checker_reports_missing_files_images_and_anchors(tmp_path):
  (tmp_path / 'docs').mkdir()
  (tmp_path / 'docs' / 'page.md').write_text('# A page\n\n## Deep dive: why?\n\n## The `speedrun_gpt2` _preset_\n',
                                              encoding='utf-8')
  (tmp_path / 'docs' / 'pic.png').write_bytes(b'')
  (tmp_path / 'README.md').write_text(
      'ok [page](docs/page.md), [section](docs/page.md#deep-dive-why), ![pic](docs/pic.png), '
      '<img src="docs/pic.png" width="9">, [web](https://example.com/x), [self](#top), '
      '[code](docs/page.md#the-speedrun_gpt2-preset)\n'
      'bad [gone](docs/gone.md), ![lost](docs/lost.png), <img src="docs/nope.png">, '
      '[anchor](docs/page.md#no-such-part), [self](#nowhere), [code](docs/page.md#the-speedrungpt2-preset)\n'
      '`[code](docs/code-span.md)`\n```\n[fenced](docs/fenced.md)\n```\n# Top\n', encoding='utf-8')
  problems = broken_links(tmp_path / 'README.md', root=tmp_path)
  assert sorted(p.split(' (')[0] for p in problems) == [
      'README.md: #nowhere', 'README.md: docs/gone.md', 'README.md: docs/lost.png',
      'README.md: docs/nope.png', 'README.md: docs/page.md#no-such-part',
      'README.md: docs/page.md#the-speedrungpt2-preset']
  pending = broken_links(tmp_path / 'README.md', root=tmp_path, pending={'docs/gone.md'})
  assert len(pending) == 5 and not any('gone.md' in p for p in pending)


def test_readme_is_short_and_keeps_the_ci_test_command():
  readme = (REPO / 'README.md').read_text(encoding='utf-8')
  assert len(readme.splitlines()) <= 150
  command = 'python -m pytest -q -n auto --dist loadfile'  # What CI runs: the README shows exactly that.
  assert f'\n{command} ' in readme and f'\n{command}\n' in (REPO / '.ci' / 'run').read_text(encoding='utf-8')


@pytest.mark.parametrize('page', QUESTION_PAGES)
def test_docs_page_opens_with_its_question_and_is_on_the_map(page):
  path = REPO / 'docs' / f'{page}.md'
  lines = [l for l in path.read_text(encoding='utf-8').splitlines() if l.strip()]
  assert lines[0].startswith('# '), lines[0]
  assert lines[1].rstrip('*_ ').endswith('?'), f'{path.name} should open with its question: {lines[1]!r}'
  assert f'](docs/{page}.md)' in (REPO / 'README.md').read_text(encoding='utf-8')
