"""Execute chapters in place, storing fresh outputs: ``make execute [NB=book/01_...ipynb]``.

Run this after changing a chapter or the code it calls, then commit the refreshed outputs;
``make test`` checks them with nbval. ``make execute`` sets ``EFFICIENTML_CHECK=off``: a recorded
value that moved beyond its tolerance, or a claim that does not hold, is printed (and listed
after the chapter here) instead of stopping the run.
"""
import sys
import time
from pathlib import Path

import nbclient
import nbformat


def main(paths: list[str]) -> int:
    for p in paths or sorted(str(p) for p in Path("book").glob("*.ipynb")):
        nb = nbformat.read(p, as_version=4)
        t0 = time.perf_counter()
        nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                                resources={"metadata": {"path": str(Path(p).parent)}}).execute()
        nbformat.write(nb, p)
        print(f"{p}: executed in {time.perf_counter() - t0:.0f} s", flush=True)
        for cell in nb.cells:  # what record and claim reported instead of raising (EFFICIENTML_CHECK=off)
            for out in cell.get("outputs", []):
                for line in out.get("text", "").splitlines():
                    if line.startswith("DOES NOT HOLD") or "values differ from the stored ones" in line:
                        print("  " + line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
