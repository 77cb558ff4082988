"""Build the HTML book: ``make book`` runs this; the browser test runs it into a temporary folder.

1. Generate ``book/results.md`` ("Results at a glance") from the executed chapters and the
   full-profile result files (``python -m efficientml.glance``).
2. ``jupyter-book build`` with warnings as errors (a broken cross-reference or a missing
   figure fails the build). Launch buttons (Binder, Colab) are added when the repository's
   GitHub URL is known: ``--repo-url``, else ``$BOOK_REPOSITORY_URL``, else the git remote
   ``origin``; without one the book has no launch buttons, and says so here.
3. Copy MathJax into the site (``scripts/vendor_mathjax.py``), so the book reads offline.

Usage: python scripts/build_book.py [--out DIR] [--repo-url URL]   (the site lands in DIR/_build/html)
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def repository_url(explicit: str | None) -> str | None:
    """The repository's https GitHub URL, or None when unknown."""
    url = explicit or os.environ.get("BOOK_REPOSITORY_URL")
    if not url:
        try:
            url = subprocess.run(["git", "-C", str(ROOT), "remote", "get-url", "origin"], capture_output=True,
                                 text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
    m = re.match(r"^(?:https://github\.com/|git@github\.com:)([\w.-]+)/([\w.-]+?)(?:\.git)?/?$", url)
    return f"https://github.com/{m.group(1)}/{m.group(2)}" if m else None


def config_with_launch_buttons(out: Path, repo_url: str) -> Path:
    """_config.yml plus the repository and launch-button settings, written under ``out``."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["repository"] = {"url": repo_url, "path_to_book": "", "branch": "main"}
    config["launch_buttons"] = {"notebook_interface": "jupyterlab", "binderhub_url": "https://mybinder.org",
                                "colab_url": "https://colab.research.google.com"}
    config.setdefault("html", {}).update(use_repository_button=True, use_issues_button=True)
    config["html"]["favicon"] = str(ROOT / config["html"]["favicon"])
    sphinx = config.get("sphinx", {})  # paths in the config are relative to the config file: make them absolute
    sphinx["local_extensions"] = {name: str(ROOT / path) for name, path in sphinx.get("local_extensions", {}).items()}
    path = out / "_build" / "_config.launch.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT), help="the site goes to OUT/_build/html (default: the repository)")
    p.add_argument("--repo-url", default=None, help="GitHub URL of the repository, for launch buttons")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    bin_dir = Path(sys.executable).parent

    from efficientml.glance import main as glance
    glance([str(ROOT / "book" / "results.md")])

    cmd = [str(bin_dir / "jupyter-book"), "build", str(ROOT), "--warningiserror", "--keep-going"]
    if out != ROOT:
        cmd += ["--path-output", str(out)]
    repo_url = repository_url(a.repo_url)
    if repo_url:
        cmd += ["--config", str(config_with_launch_buttons(out, repo_url))]
        print(f"launch buttons (Binder, Colab) for {repo_url}")
    else:
        print("no launch buttons: the repository's GitHub URL is unknown (no git remote 'origin'); "
              "set BOOK_REPOSITORY_URL=https://github.com/OWNER/REPO or pass --repo-url")
    subprocess.run(cmd, check=True)
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "vendor_mathjax.py"),
                           str(out / "_build" / "html")]).returncode


if __name__ == "__main__":
    sys.exit(main())
