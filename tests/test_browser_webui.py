"""The page in a real headless Chromium, over a real stack of processes with scaled-down costs."""

import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from selenium.common.exceptions import WebDriverException

from dockercoins.net import free_port
from dockercoins.redis_store import HASHES_KEY, WALLET_KEY
from dockercoins_tools.embedded_redis import redis_server_argv
from tests.stack import FAST_COSTS, ServiceProcesses, python_m, wait_until
from tests.support import ROOT, service_env, skip_unless_ci

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = ROOT / "test-artifacts"

BETWEEN_STATES = (WebDriverException, httpx.HTTPError, redis.RedisError, ValueError, KeyError)
"""What the page, the web UI or Redis may raise while they change state: "not yet"."""

NUMBERS_OFF_LINE = """
return ['speed', 'coins', 'hashes'].flatMap((id) => {
  const figure = document.getElementById(id);
  const box = figure.closest('section, .tile').getBoundingClientRect();
  const r = figure.getBoundingClientRect();
  const lines = r.height / parseFloat(getComputedStyle(figure).lineHeight);
  return lines > 1.5 || r.left < box.left || r.right > box.right
    ? [`${id} "${figure.textContent}": ${lines.toFixed(1)} lines, x ${r.left}-${r.right}`
       + ` in a box at ${box.left}-${box.right}`]
    : [];
});
"""
"""The big figures that wrap onto a second line or run out of their box, with what they show."""

AXIS_LABELS_CLIPPED = """
const canvas = document.querySelector('#chart canvas');
const edge = canvas.getContext('2d').getImageData(0, 0, 3, canvas.height).data;
return edge.some((value, i) => i % 4 === 3 && value > 0);
"""
"""Ink in the chart's 3 leftmost pixel columns: a y-axis label wider than the axis margin."""


def wait_for(
    what: str | Callable[[], str], check: Callable[[], object], timeout: float = 20.0
) -> float:
    """`wait_until` for the page: `check` may meet it or a server between two states."""
    return wait_until(check, timeout, what, errors=BETWEEN_STATES, interval=0.2)


@pytest.fixture
def browser() -> Iterator[Any]:
    """Debian's chromium, headless, driven through Debian's chromedriver (nothing downloaded)."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists()]
    if missing:
        # `make test` installs them when it runs as root with apt (scripts/test-prerequisites).
        skip_unless_ci(
            f"missing {', '.join(missing)}: install Debian's chromium and chromium-driver "
            "(apt-get install -y chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="dockercoins-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,860",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def feed_turbo_numbers(redis_url: str, stop: threading.Event) -> None:
    """Put a million coins and 20 M hashes in Redis, then add hashes at 1.2 M/s until `stop`."""
    # The million coins are one EVAL: on a loaded machine it holds Redis for 10 s and more,
    # past redis-py's default 5 s timeout, which ended this thread and the turbo numbers.
    client = redis.Redis.from_url(redis_url, socket_timeout=60)
    client.eval(
        "for i = 1, tonumber(ARGV[1]) do redis.call('HSET', KEYS[1], 'turbo' .. i, '') end",
        1,
        WALLET_KEY,
        1_000_000,
    )
    client.incrby(
        HASHES_KEY, 20_000_000
    )  # after the coins: a turbo speed on the page comes with them
    while not stop.wait(0.1):
        client.incrby(HASHES_KEY, 120_000)


def test_page_tells_the_scaling_story_and_survives_outages(browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    redis_port, rng_port, hasher_port, webui_port = (free_port() for _ in range(4))
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    redis_argv = [*redis_server_argv("127.0.0.1", redis_port, None), "--dir", str(tmp_path)]
    env = service_env(
        rng_port=rng_port,
        hasher_port=hasher_port,
        **FAST_COSTS,
        worker_stage_window=3,
        rng_addr=f"127.0.0.1:{rng_port}",
        hasher_addr=f"127.0.0.1:{hasher_port}",
        redis_url=redis_url,
        webui_port=webui_port,
    )
    url = f"http://127.0.0.1:{webui_port}"
    stack = ServiceProcesses(tmp_path)
    feeding = threading.Event()  # set: the turbo-sized numbers stop

    def redis_up() -> bool:
        return bool(redis.Redis.from_url(redis_url, socket_timeout=1).ping())

    def text(element_id: str) -> str:
        return str(browser.find_element(By.ID, element_id).text)

    def chart(attribute: str) -> str:
        return str(browser.find_element(By.ID, "chart").get_attribute(attribute) or "")

    def speed() -> float:
        value = browser.find_element(By.ID, "speed").get_attribute("data-value")
        return float(value) if value else 0.0

    def status() -> str:
        return text("status").lower()

    def stage_bars() -> dict[str, float]:
        """Stage -> the drawn width of its bar, in CSS pixels."""
        return dict(
            browser.execute_script(
                "return [...document.querySelectorAll('#stages .stage')].map((li) => "
                "[li.dataset.stage, li.querySelector('.stage-fill').getBoundingClientRect().width])"
            )
        )

    def rng_widest(widths: dict[str, float]) -> dict[str, float] | None:
        others = [width for stage, width in widths.items() if stage != "rng"]
        return widths if widths["rng"] > 1.5 * max(others) else None

    def screenshot(name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / name))

    try:
        stack.start("redis", redis_argv)
        wait_for("redis-server", redis_up, 10)
        stack.start("rng", python_m("rng_svc"), env)
        stack.start("hasher", python_m("hasher_svc"), env)
        stack.start("worker-1", python_m("worker_svc"), env)
        stack.start("webui", python_m("webui"), env)
        wait_for("webui /healthz", lambda: httpx.get(f"{url}/healthz").status_code == 200)

        browser.execute_cdp_cmd(  # record what the Content-Security-Policy blocks, if anything
            "Page.addScriptToEvaluateOnNewDocument",
            {
                "source": "window.blocked = []; document.addEventListener("
                "'securitypolicyviolation', (e) => window.blocked.push(e.violatedDirective));"
            },
        )
        browser.get(url)
        wait_for("the live state", lambda: status() == "live")
        wait_for("chart points and a speed above 0", lambda: int(chart("data-points")) >= 3)
        wait_for("a speed above 0", lambda: speed() > 0)
        assert text("workers") == "1"
        assert text("mode") == "blocking"
        assert int(text("hashes").replace(",", "")) > 0
        one_worker = speed()

        # The second worker runs 4 loops: 5 loops ask rng for more than its 100 reads/s.
        stack.start("worker-2", python_m("worker_svc"), {**env, "DOCKERCOINS_WORKER_LOOPS": "4"})
        wait_for("2 workers", lambda: text("workers") == "2")
        wait_for("a mark at 2 workers", lambda: chart("data-last-mark") == "2")
        assert int(chart("data-marks")) >= 1
        assert text("marks").count("→ 2 workers") == 1  # one scaling step, one mark
        widths: dict[str, float] = {}

        def rng_the_widest() -> bool:
            widths.update(stage_bars())
            return rng_widest(widths) is not None

        wait_for("rng's bar the widest", rng_the_widest, 25)
        assert all(width > 0 for stage, width in widths.items() if stage != "redis"), widths
        assert browser.find_element(By.ID, "stages").get_attribute("data-widest") == "rng"
        assert " ms · " in browser.find_element(By.CSS_SELECTOR, "[data-stage=rng]").text
        wait_for("the chart to move on", lambda: int(chart("data-points")) >= 8)
        # The lesson: a second worker (4 loops) mines faster, up to the rng's 100 reads/s.
        wait_for("the speed to climb with the second worker", lambda: speed() > 1.5 * one_worker)
        screenshot("webui.png")
        assert browser.execute_script("return window.blocked") == []

        stack.stop("redis", signal.SIGKILL)
        wait_for("the Redis-unreachable state", lambda: "redis unreachable" in status())
        assert "stale" in (browser.find_element(By.ID, "speed").get_attribute("class") or "")
        screenshot("webui-redis-down.png")
        stack.start("redis", redis_argv)
        wait_for("redis-server again", redis_up, 10)
        wait_for("recovery after Redis", lambda: status() == "live")
        wait_for("the workers back in Redis", lambda: text("workers") == "2", 15)
        wait_for("speed after Redis came back", lambda: speed() > 0, 25)

        stack.stop("webui")
        wait_for("the disconnected state", lambda: "disconnected" in status())
        points_before = int(chart("data-points"))
        stack.start("webui", python_m("webui"), env)
        wait_for("recovery after the web UI", lambda: status() == "live", 25)
        wait_for(
            "new points from the restarted web UI, after the ones the page kept",
            lambda: int(chart("data-points")) > points_before + 2,
        )

        browser.set_window_size(390, 844)
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth"
        )
        assert overflow <= 0, f"the page scrolls sideways on a phone ({overflow} px)"
        screenshot("webui-phone.png")
        browser.execute_script("document.getElementById('stages').scrollIntoView()")
        clipped = browser.execute_script(
            "return [...document.querySelectorAll('#stages .stage > *')]"
            ".filter((e) => e.getBoundingClientRect().right > window.innerWidth).length"
        )
        assert clipped == 0, "a stage's name, figure or bar runs off a phone's screen"
        screenshot("webui-phone-stages.png")

        # Turbo-sized numbers in the real Redis: a million coins, 20 M hashes, then 1.2 M/s.
        feeder = threading.Thread(target=feed_turbo_numbers, args=(redis_url, feeding), daemon=True)
        feeder.start()
        wait_for("a turbo speed", lambda: speed() > 1e6, 30)
        chrome = browser.execute_script("return window.outerHeight - window.innerHeight")
        off_line: list[str] = []

        def laid_out() -> bool:  # once the chart has redrawn at the new size
            off_line[:] = browser.execute_script(NUMBERS_OFF_LINE)
            return not off_line and not browser.execute_script(AXIS_LABELS_CLIPPED)

        for width, height in ((390, 844), (1280, 720)):  # the viewport: a phone, a laptop
            browser.set_window_size(width, height + chrome)
            wait_for(
                lambda: f"the figures on one line, the axis labels whole: {off_line}", laid_out, 10
            )
        screenshot("webui-turbo.png")
    except AssertionError as exc:
        screenshot("webui-failure.png")
        raise AssertionError(f"{exc}\n{stack.log_tail()}") from None
    finally:
        feeding.set()
        stack.stop_all()


STATUS_LOG = """
window.statusLog = [];
const status = document.getElementById('status');
new MutationObserver(() => window.statusLog.push(status.textContent))
  .observe(status, {childList: true, characterData: true, subtree: true});
"""
"""Record every text the status shows from now on, in window.statusLog."""


def test_page_polls_json_while_its_stream_is_refused_and_renews_streams_unseen(
    browser: Any, tmp_path: Path
) -> None:
    """With the visitor's address at its cap of streams the page falls back to polling /json,
    says so and keeps drawing; once a stream is free it is live again. Streams that end at
    their lifetime are resumed without the page ever saying it was disconnected."""
    from selenium.webdriver.common.by import By

    redis_port, webui_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = service_env(
        redis_url=redis_url,
        webui_port=webui_port,
        webui_max_streams_per_client=1,
        webui_stream_lifetime=3,
    )
    url = f"http://127.0.0.1:{webui_port}"
    stack = ServiceProcesses(tmp_path)
    feeding = threading.Event()

    def text(element_id: str) -> str:
        return str(browser.find_element(By.ID, element_id).text)

    def points() -> int:
        return int(browser.find_element(By.ID, "chart").get_attribute("data-points") or 0)

    def hashes() -> int:
        shown = text("hashes").replace(",", "")
        return int(shown) if shown.isdigit() else 0

    def fallback_shown() -> bool:
        return bool(browser.find_element(By.ID, "fallback").is_displayed())

    def feed() -> None:
        client = redis.Redis.from_url(redis_url)
        while not feeding.wait(0.1):
            client.incrby(HASHES_KEY, 100)

    try:
        stack.start(
            "redis", [*redis_server_argv("127.0.0.1", redis_port, None), "--dir", str(tmp_path)]
        )
        stack.start("webui", python_m("webui"), env)
        wait_for("webui /healthz", lambda: httpx.get(f"{url}/healthz").status_code == 200)
        threading.Thread(target=feed, daemon=True).start()
        with httpx.Client(base_url=url, timeout=10) as held, held.stream("GET", "/events") as taken:
            assert taken.status_code == 200  # this address's one stream, held by another tab
            browser.get(url)
            wait_for(
                "the fallback's note",
                lambda: browser.find_element(By.ID, "fallback").is_displayed(),
            )
            note = text("fallback")
            assert "DOCKERCOINS_WEBUI_MAX_STREAMS_PER_CLIENT" in note and "polls /json" in note
            wait_for("the polling status", lambda: text("status") == "live · polling")
            wait_for("hashes from /json", hashes)
            first = hashes()
            wait_for("hashes growing, polled", lambda: hashes() > first)
            wait_for("chart points from /json", lambda: points() >= 3)
            ARTIFACTS.mkdir(exist_ok=True)
            browser.save_screenshot(str(ARTIFACTS / "webui-polling.png"))
        # The other tab closed: the page takes the stream at its next try (Retry-After: 10 s).
        wait_for("the live stream back", lambda: text("status") == "live", 25)
        assert not fallback_shown()
        browser.execute_script(STATUS_LOG)
        renewed = "dockercoins_webui_streams_renewed_total"

        def renewals() -> float:
            found = re.search(rf"^{renewed} (\S+)$", httpx.get(f"{url}/metrics").text, re.M)
            return float(found[1]) if found else 0.0

        before, drawn = renewals(), points()
        wait_for("two streams renewed at their lifetime", lambda: renewals() >= before + 2, 20)
        wait_for("points after the renewals", lambda: points() > drawn + 3, 10)
        log = browser.execute_script("return window.statusLog")
        assert not any("disconnected" in status for status in log), log
        assert text("status") == "live"
    except AssertionError as exc:
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "webui-fallback-failure.png"))
        raise AssertionError(f"{exc}\n{stack.log_tail()}") from None
    finally:
        feeding.set()
        stack.stop_all()
