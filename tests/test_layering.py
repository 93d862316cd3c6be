"""inpaint/ is the plain-PyTorch library: importing all of it must not pull in Ray."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_model_library_never_imports_ray():
    modules = sorted(f"inpaint.{p.stem}" for p in (REPO / "inpaint").glob("*.py") if p.stem != "__init__")
    modules += ["inpaint.models", "inpaint.data"]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "leaked = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
            + "assert not leaked, leaked\nprint(len(sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
