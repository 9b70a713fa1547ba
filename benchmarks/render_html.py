"""Screenshot a circuits HTML page in headless Chromium (Debian package ``chromium``) to check it renders.

    python benchmarks/render_html.py runs/NAME/circuits/circuits.html shot.png --hash L1H0:t17

``--hash`` selects a head and pins a token (the page's deep-link syntax). Not a test: needs chromium.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html")
    ap.add_argument("png")
    ap.add_argument("--hash", default="", help="e.g. L1H0:t17")
    ap.add_argument("--size", default="1200,900")
    args = ap.parse_args()
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        print("chromium not found (apt-get install -y chromium)", file=sys.stderr)
        return 2
    url = Path(args.html).resolve().as_uri() + (f"#{args.hash}" if args.hash else "")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={args.size}",
           f"--screenshot={Path(args.png).resolve()}", url]
    return subprocess.run(cmd, capture_output=True, timeout=120).returncode


if __name__ == "__main__":
    sys.exit(main())
