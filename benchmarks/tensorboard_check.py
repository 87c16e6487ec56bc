"""Check: TensorBoard as a person sees it. Trains RLHFPPO for a few rollouts on a tiny random model, starts
``tensorboard --logdir`` on a free localhost port, reads its HTTP data API (the scalar and text tags it serves) and
screenshots the scalars and text dashboards in headless Chromium.

    python benchmarks/tensorboard_check.py                 # writes benchmarks/results/tensorboard_*.png
    python benchmarks/tensorboard_check.py --out /tmp/tb   # somewhere else

Writes ``tensorboard_scalars.png``, ``tensorboard_text.png`` and ``tensorboard_check.json`` (the tags the API
listed, the URLs, the versions). Each screenshot is taken once the page shows its content (every chart has drawn
its line; the sample table is on screen), within ``--wait`` seconds. Exits 1 when the API lacks a tag, 2 when
Chromium or TensorBoard cannot run or a page does not render. Only 127.0.0.1 is contacted. Needs Chromium (Debian:
``apt-get install chromium``) and bash; about 30 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from urllib.parse import quote

import torch as th
from versions import versions_line  # benchmarks/versions.py

from sb3_rlhf import RLHFPPO, TokenGenerationEnv, TransformerActorCriticPolicy
from sb3_rlhf.common.tiny import TINY_WORDS, save_tiny_model, tiny_prompts
from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper
from sb3_rlhf.rewards.rules import share_of_good

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
#: what a person looks for first: the SB3 reward curve, the KL to the reference, β; and the sample table
SCALAR_TAGS = ("rollout/ep_rew_mean", "rlhf/kl", "rlhf/kl_coef", "rlhf/scores", "train/approx_kl")
# SB3's TensorBoard writer stores add_text("rlhf/samples", ...) under this tag
TEXT_TAGS = ("rlhf/samples/text_summary",)
# JavaScript conditions for "the page shows it": every line chart has drawn a line (an SVG path through several
# points), and the text dashboard (Polymer: inside shadow roots) shows a sample table with its header and rows
CURVES_DRAWN = """(() => {
  const charts = Array.from(document.querySelectorAll("line-chart"));
  return charts.length >= N_CHARTS && charts.every((chart) =>
    Array.from(chart.querySelectorAll(".series-view svg path")).some((p) => (p.getAttribute("d") || "").includes("L")));
})()"""
SAMPLE_TABLE_SHOWN = """(() => {
  let cells = 0, header = false;
  const visit = (root) => root.querySelectorAll("*").forEach((el) => {
    if (el.tagName === "TD") cells += 1;
    if (el.tagName === "TH" && el.textContent.trim() === "completion") header = true;
    if (el.shadowRoot) visit(el.shadowRoot);
  });
  visit(document);
  return header && cells >= 16;
})()"""
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The first Chromium-like browser on PATH (``$CHROMIUM`` first), or None."""
    candidates = [os.environ["CHROMIUM"]] if os.environ.get("CHROMIUM") else []
    for name in [*candidates, *CHROMIUM_NAMES]:
        path = shutil.which(name)
        if path:
            return path
    return None


def train_tiny_run(folder: str, timesteps: int, seed: int = 0) -> str:
    """RLHFPPO on a tiny random Llama with the "good"-share rule reward and an adaptive KL penalty (a few
    rollouts: enough points for curves and sample tables).

    :param folder: where the tiny model and the TensorBoard logs go.
    :param timesteps: generated tokens to train (up to 8 episodes × 6 tokens per rollout).
    :param seed: seed of the model weights, the prompts and the run.
    :return: the TensorBoard log folder.
    """
    model_dir, logdir = os.path.join(folder, "tiny_model"), os.path.join(folder, "tensorboard")
    tokenizer = save_tiny_model(model_dir, TINY_WORDS, seed=seed)
    env = TokenGenerationEnv(tiny_prompts(24, seed=seed), tokenizer, max_prompt_tokens=8, max_new_tokens=6)
    env = KLPenaltyWrapper(RewardFunctionWrapper(env, fn=share_of_good), coef=0.05, target=1.0, horizon=1000)
    model = RLHFPPO(
        TransformerActorCriticPolicy,
        env,
        policy_kwargs=dict(model_name_or_path=model_dir),
        learning_rate=1e-3,
        n_episodes=8,
        batch_size=8,
        n_epochs=2,
        tensorboard_log=logdir,
        seed=seed,
        verbose=0,
    )
    model.learn(total_timesteps=timesteps)
    model.logger.close()  # flush the event file before TensorBoard reads it
    return logdir


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0) -> object:
    # a direct opener: no proxy from the environment for a localhost URL
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as response:
        return json.load(response)


def wait_for_tags(base: str, deadline: float, server: subprocess.Popen) -> tuple[dict, dict]:
    """Poll the data API until every expected scalar and text tag is served (TensorBoard loads event files in the
    background after it starts) or ``deadline`` (``time.monotonic()``) passes; return both tag listings.

    :return: ``/data/plugin/scalars/tags`` ({run: {tag: ...}}) and ``/data/plugin/text/tags`` ({run: [tag, ...]}).
    """
    scalars: dict = {}
    texts: dict = {}
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"tensorboard exited with code {server.returncode} before serving the logs")
        try:
            scalars = get_json(f"{base}/data/plugin/scalars/tags")
            texts = get_json(f"{base}/data/plugin/text/tags")
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            time.sleep(0.3)
            continue
        served_scalars = {tag for tags in scalars.values() for tag in tags}
        served_texts = {tag for tags in texts.values() for tag in tags}
        if set(SCALAR_TAGS) <= served_scalars and set(TEXT_TAGS) <= served_texts:
            break
        time.sleep(0.3)
    return scalars, texts


class HeadlessChromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages,
    each ended by a NUL byte, written to the browser's fd 3 and read from its fd 4). Standard library only; no port.

    Unlike ``--screenshot`` with ``--virtual-time-budget``, this waits for a condition on the page (TensorBoard's
    app fetches its data and draws asynchronously; a fixed budget catches empty cards now and then).
    """

    def __init__(self, chromium: str, profile: str, width: int = 1600, height: int = 1250) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # the browser expects the pipe at fds 3 and 4: copy both above them first, then let bash place them (dash reads only one-digit fds)
        high_r, high_w = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
        for fd in (to_browser_r, from_browser_w):
            os.close(fd)
        command = [
            chromium,
            "--headless",
            "--remote-debugging-pipe",
            "--no-sandbox",  # root in a container has no user namespace for the sandbox
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--no-proxy-server",  # 127.0.0.1 only, whatever the environment's proxy says
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{high_r} 4>&{high_w}', "bash", *command],
            pass_fds=(high_r, high_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(high_r)
        os.close(high_w)
        self._buffer = b""
        self._next_id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, timeout: float = 30.0, **params: object) -> dict:
        """Send one DevTools command (to the page once attached) and return its result; events are skipped."""
        self._next_id += 1
        message: dict = {"id": self._next_id, "method": method, "params": params}
        if getattr(self, "_session", None):
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next_id:
                    if "error" in reply:
                        raise RuntimeError(f"Chromium refused {method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer {method} within {timeout:.0f} s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited (code {self.process.poll()}) during {method}")
            self._buffer += chunk

    def screenshot(self, url: str, path: str, ready: str, timeout: float = 30.0) -> None:
        """Open ``url``, wait until the JavaScript expression ``ready`` is true, then save a PNG of the window.

        :param url: the page.
        :param path: where the PNG goes.
        :param ready: a JavaScript expression, polled every 0.25 s (e.g. "the chart has drawn its lines").
        :param timeout: seconds to wait for ``ready``.
        """
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not self.call("Runtime.evaluate", expression=ready, returnByValue=True)["result"].get("value"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not render within {timeout:.0f} s (waited for: {ready})")
            time.sleep(0.25)
        time.sleep(0.5)  # the last frame: animations and layout settle
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self) -> None:
        """End the browser (always: called from a ``finally``)."""
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=RESULTS, help="folder for the screenshots and tensorboard_check.json")
    parser.add_argument("--timesteps", type=int, default=200, help="generated tokens to train (about 5 rollouts)")
    parser.add_argument("--chromium", default=None, help="browser binary (default: chromium on PATH, or $CHROMIUM)")
    parser.add_argument("--wait", type=float, default=30.0, help="seconds to wait for TensorBoard and for each page")
    args = parser.parse_args()
    chromium = args.chromium or find_chromium()
    if chromium is None or shutil.which(chromium) is None:
        print("error: no Chromium found; install it (Debian: apt-get install chromium) or pass --chromium PATH")
        return 2
    th.set_num_threads(min(2, os.cpu_count() or 1))
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    with tempfile.TemporaryDirectory() as work:
        logdir = train_tiny_run(work, args.timesteps)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--host", "127.0.0.1"]
        command += ["--port", str(port), "--reload_interval", "1"]
        log_path = os.path.join(work, "tensorboard.log")
        browser = None
        with open(log_path, "w") as log:
            server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            scalars, texts = wait_for_tags(base, time.monotonic() + args.wait, server)
            # the time-series dashboard filtered to the curves worth a look, drawn as SVG (headless Chromium has no
            # WebGL for TensorBoard's default line renderer: axes without lines); the text dashboard's sample table
            pages = {
                "tensorboard_scalars.png": (
                    f"{base}/?forceSVG=true&tagFilter={quote('|'.join(SCALAR_TAGS))}#timeseries",
                    CURVES_DRAWN.replace("N_CHARTS", str(len(SCALAR_TAGS))),
                ),
                "tensorboard_text.png": (f"{base}/#text", SAMPLE_TABLE_SHOWN),
            }
            browser = HeadlessChromium(chromium, os.path.join(work, "profile"))
            for name, (url, ready) in pages.items():
                browser.screenshot(url, os.path.join(args.out, name), ready, timeout=args.wait)
        except (RuntimeError, TimeoutError, OSError) as error:
            with open(log_path) as log:
                print(f"error: {error}\ntensorboard's log ends with:\n{log.read()[-2000:]}")
            return 2
        finally:
            if browser is not None:
                browser.close()
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    served_scalars = sorted({tag for tags in scalars.values() for tag in tags})
    served_texts = sorted({tag for tags in texts.values() for tag in tags})
    missing = sorted(set(SCALAR_TAGS) - set(served_scalars)) + sorted(set(TEXT_TAGS) - set(served_texts))
    summary = {
        "versions": versions_line(),
        "seconds": round(time.time() - started, 1),
        "pages": {name: url.replace(base, "http://127.0.0.1:PORT") for name, (url, _) in pages.items()},
        "scalar_tags": served_scalars,
        "text_tags": served_texts,
        "missing": missing,
    }
    with open(os.path.join(args.out, "tensorboard_check.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))
    if missing:
        print(f"error: TensorBoard's data API does not list {', '.join(missing)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
