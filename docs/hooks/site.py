"""MkDocs hooks of the atpstar site (mkdocs.yml ``hooks:``).

- Tutorials on real models run only in the full build: `make docs` (CI) executes the notebooks on
  the built-in toy model; `make docs-full` sets ATPSTAR_DOCS_FULL=1 and also executes the ones listed
  under `extra.full_build_only` (they load SmolLM2-135M or Gemma-3-270M). Outside the full build
  those pages show their code without outputs, under a note that says so.
- The command-line reference is generated from the argparse parser (`<!-- atpstar-cli-help -->`).
- CHANGELOG.md is included in the site; its links are relative to the repository root.
- The house style heads runnable examples "Example:" (docs/style: Args / Returns / Raises / Example);
  griffe reads only "Examples:" as an examples section (code blocks) and renders "Example:" as an
  admonition of plain text, so the singular is mapped to the same section.
- Notebook pages are rendered by nbconvert, whose links MkDocs neither resolves nor checks: their
  links name source files as in Markdown pages (`../results.md#anchor`, `find.py`) and are turned
  into page URLs here; after the build every relative link of every page is checked against the
  built site (a broken one is a warning, which fails the strict build).
"""

from __future__ import annotations

import argparse
import logging
import os
import posixpath
import re
from html.parser import HTMLParser
from pathlib import Path, PurePath
from urllib.parse import unquote, urlsplit

from griffe._internal.docstrings import google as _google  # griffe is pinned by the docs extra
from mkdocs.utils import get_relative_url

_google._section_kind.setdefault("example", _google.DocstringSectionKind.examples)

log = logging.getLogger("mkdocs.hooks.atpstar")
FULL = os.environ.get("ATPSTAR_DOCS_FULL", "") not in ("", "0")
NOTE = (
    '<div class="admonition warning"><p class="admonition-title">Not executed in this build</p>'
    "<p>This page loads a real model and is executed only by the full documentation build "
    "(<code>make docs-full</code>); here it shows its code without outputs.</p></div>"
)
CLI_MARKER = "<!-- atpstar-cli-help -->"


def _full_only(config) -> list[str]:
    return list(config["extra"].get("full_build_only", []))


def on_config(config):
    """Outside the full build, add the real-model tutorials to mkdocs-jupyter's execute_ignore."""
    if not FULL:
        plugin = config["plugins"]["mkdocs-jupyter"]
        plugin.config["execute_ignore"] = list(plugin.config["execute_ignore"]) + _full_only(config)
    return config


def on_page_markdown(markdown, page, config, files):
    """Fill in the CLI reference; make the changelog's repository-relative links site-relative."""
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, _cli_help())
    if page.file.src_uri == "changelog.md":
        changelog = Path(config["config_file_path"]).parent / "CHANGELOG.md"
        markdown = re.sub(r"\]\(docs/", "](", changelog.read_text(encoding="utf-8"))
    return markdown


def on_page_content(html, page, config, files):
    """Resolve a notebook's source links; put the 'not executed' note on top of a real-model tutorial."""
    if page.file.src_uri.endswith(".py"):
        html = _SOURCE_LINK.sub(lambda match: _page_link(match, page, files), html)
    if FULL or not any(PurePath(page.file.src_uri).match(p) for p in _full_only(config)):
        return html
    return NOTE + html


_SOURCE_LINK = re.compile(r'href="(?![a-z]+:|#)([^"#]+\.(?:md|py))(#[^"]*)?"')


def _page_link(match, page, files) -> str:
    """href="../results.md#x" in a notebook -> the URL of that page relative to this one."""
    src = posixpath.normpath(posixpath.join(posixpath.dirname(page.file.src_uri), match.group(1)))
    target = files.get_file_from_path(src)
    if target is None:
        log.warning("%s: link %r names no documentation file", page.file.src_uri, match.group(1))
        return match.group(0)
    return f'href="{get_relative_url(target.url, page.url)}{match.group(2) or ""}"'



def _cli_help() -> str:
    from atpstar.cli.parser import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = ["## atpstar", "", "```text", parser.format_help().rstrip(), "```", ""]
    for name, command in sub.choices.items():
        parts += [f"## atpstar {name}", "", "```text", command.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        if values.get("id"):
            self.ids.add(values["id"])
        if tag == "a" and values.get("href"):
            self.links.append(values["href"])


def on_post_build(config):
    """Check every relative link (and its anchor) of every built page against the built site."""
    site = Path(config["site_dir"])
    pages: dict[Path, _Links] = {}
    for html in site.rglob("*.html"):
        parser = _Links()
        parser.feed(html.read_text(encoding="utf-8"))
        pages[html.resolve()] = parser
    for html, parser in pages.items():
        if html.parent.name == "search" or html.name == "404.html":
            continue
        for href in parser.links:
            parts = urlsplit(href)
            if parts.scheme or parts.netloc or href.startswith(("mailto:", "javascript:")):
                continue
            target = (html.parent / unquote(parts.path)).resolve() if parts.path else html
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                log.warning("%s: broken link %r", html.relative_to(site.resolve()), href)
            elif parts.fragment and target.suffix == ".html" and parts.fragment not in pages[target].ids:
                log.warning("%s: link %r names a missing anchor", html.relative_to(site.resolve()), href)
