"""A local Sphinx extension for the book (``_config.yml``: ``sphinx.local_extensions``).

sphinx-thebe's configuration script is registered twice by this Jupyter Book / Sphinx
combination, so every page declared ``const THEBE_JS_URL`` twice and the browser reported a
SyntaxError (caught by tests/test_browser.py). Drop repeated script entries from each page.

It also adds the book's style sheet, ``book/_static/book.css`` (what the page needs at phone width).
"""
from pathlib import Path

STATIC = Path(__file__).resolve().parent.parent / "book" / "_static"


def _drop_duplicate_scripts(app, pagename, templatename, context, doctree):
    seen, kept = set(), []
    for js in context.get("script_files", []):
        attributes = getattr(js, "attributes", {}) or {}
        key = (getattr(js, "filename", js) or "", str(attributes.get("body", "")))  # inline: None or ""
        if key not in seen:
            seen.add(key)
            kept.append(js)
    context["script_files"] = kept


def _add_static(app):
    app.config.html_static_path.append(str(STATIC))


def setup(app):
    app.connect("html-page-context", _drop_duplicate_scripts, priority=900)
    app.connect("builder-inited", _add_static)
    app.add_css_file("book.css")
    return {"parallel_read_safe": True, "parallel_write_safe": True}
