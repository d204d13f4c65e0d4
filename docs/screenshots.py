"""Screenshots of what a researcher sees first in MLflow after `cl run`, for the docs.

Runs the quickstart over two seeds into a fresh SQLite store in a temporary folder, starts
`mlflow server` on it, opens the link `cl run` printed (the runs list on the invocation's
saved view) and the parent run's overview in headless Chromium through Playwright, and
saves docs/images/mlflow-runs-view.png, mlflow-runs-charts.png (the same view's charts) and
mlflow-parent-overview.png.

    pip install -e '.[docs]'          # Playwright (its Python package; no browser download needed)
    python docs/screenshots.py [--chromium /usr/bin/chromium] [--out docs/images]

Chromium: Debian's `chromium` package works (`--chromium`, default /usr/bin/chromium); it is
started with --no-sandbox, as a container's root user needs.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# MLflow 3.17's UI opens its assistant panel on a first visit: these say it was opened already.
QUIET_UI = ("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1','true');"
            "localStorage.setItem('mlflow.assistant.panelOpen_v1','false');")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_quickstart(folder: Path) -> tuple[str, str]:
    """`cl run experiments/quickstart.yaml --seeds 0,1` into `folder`: (store URI, its stderr);
    a folder that holds such a run already (`--workdir`) is reused."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    log = folder / "cl-run.log"
    if log.exists():
        return uri, log.read_text()
    env = {**os.environ, "CL_JOURNAL_DIR": str(folder / "cl-journal"), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "cl", "run", "experiments/quickstart.yaml", "--seeds", "0,1",
                           "--tracking-uri", uri, "--no-progress"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        sys.exit(f"cl run failed:\n{proc.stderr}")
    log.write_text(proc.stderr)
    return uri, proc.stderr


def links(stderr: str, port: int) -> tuple[str, str]:
    """The view link and the parent run's link `cl run` printed, on the server's port."""
    view = re.search(r"MLflow: (\S+)", stderr)
    parent = re.search(r"MLflow parent run: (\S+)", stderr)
    if not view or not parent:
        sys.exit(f"cl run printed no MLflow links:\n{stderr}")
    return tuple(re.sub(r"^http://127\.0\.0\.1:\d+", f"http://127.0.0.1:{port}", m.group(1)) for m in (view, parent))


def start_server(uri: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host",
                               "127.0.0.1", "--port", str(port), "--workers", "1"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return server
        except OSError:
            time.sleep(0.5)
    os.killpg(server.pid, signal.SIGTERM)
    sys.exit("mlflow server did not start")


def shoot(chromium: str, out: Path, pages: dict[str, str]) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        for name, url in pages.items():
            tall = "compareRunsMode=CHART" in url  # the bars and the seen-task curve below them
            context = browser.new_context(viewport={"width": 1500, "height": 1150 if tall else 820})
            context.add_init_script(QUIET_UI)
            page = context.new_page()
            page.goto(url)
            page.wait_for_timeout(8000)  # the UI polls, so the network never idles: the page and charts draw by then
            page.screenshot(path=str(out / name))
            print(f"{out / name}: {url}")
            context.close()
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"))
    parser.add_argument("--workdir", help="keep the run and its store here (reused if it holds them); "
                                          "default: a temporary folder, removed")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cl-screenshots-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        uri, stderr = run_quickstart(work)
        port = free_port()
        view, parent = links(stderr, port)
        server = start_server(uri, port)
        try:
            shoot(args.chromium, out, {"mlflow-runs-view.png": view,
                                       "mlflow-runs-charts.png": view + "&compareRunsMode=CHART",
                                       "mlflow-parent-overview.png": parent})
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
