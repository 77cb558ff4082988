"""Copy MathJax 3 into the built book (_build/html/_static/mathjax), so it typesets math with no
network; ``make book`` runs this after the build. MathJax comes from the pinned PyPI package
django-static-mathjax, which has no dependencies. (Copied after the build, not through Sphinx's
html_static_path: Jupyter Book would add every .js file found there to every page.)"""
import importlib.util
import shutil
import sys
from pathlib import Path


def main(html_dir: str = "_build/html") -> int:
    spec = importlib.util.find_spec("mathjax")
    if spec is None or not spec.submodule_search_locations:
        print("MathJax is not installed: run `make setup` (requirements.txt pins django-static-mathjax)",
              file=sys.stderr)
        return 1
    src = Path(list(spec.submodule_search_locations)[0]) / "static" / "mathjax" / "es5"
    dst = Path(html_dir) / "_static" / "mathjax"
    shutil.copytree(src, dst, dirs_exist_ok=True)
    print(f"MathJax copied to {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
