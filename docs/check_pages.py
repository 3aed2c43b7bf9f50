"""Opens every page of the built site in headless Chromium; fails on console errors or network use.

The site is served from ``127.0.0.1``; a page fails the check when the browser logs a
SEVERE console entry (a JavaScript error, a missing file) or requests any URL that is not
on that local server (a remote font, script, badge or image). Needs Debian's ``chromium``
and ``chromium-driver`` and the ``selenium`` package::

  python -m sphinx -W -b html docs docs/_build/html
  python docs/check_pages.py docs/_build/html
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import pathlib
import sys
import tempfile
import threading
from collections.abc import Iterator

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Local to the browser and free of network access.
LOCAL_SCHEMES = ("data:", "blob:", "about:", "chrome:", "chrome-extension:", "devtools:")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, format: str, *args: object) -> None:
    pass


def serve(root: pathlib.Path) -> tuple[http.server.ThreadingHTTPServer, str]:
  """Serves ``root`` on a free local port from a daemon thread; returns the server and URL."""
  handler = functools.partial(_QuietHandler, directory=str(root))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server, f"http://127.0.0.1:{server.server_address[1]}/"


def browser(profile: str) -> webdriver.Chrome:
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    f"--user-data-dir={profile}",
  ):
    options.add_argument(flag)
  options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
  return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def requested_urls(driver: webdriver.Chrome) -> Iterator[str]:
  """URLs the page requested since the last call, from the DevTools performance log."""
  for entry in driver.get_log("performance"):
    message = json.loads(entry["message"])["message"]
    if message["method"] == "Network.requestWillBeSent":
      yield message["params"]["request"]["url"]


def check(site: pathlib.Path) -> list[str]:
  """Problems found on the pages under ``site``, one line each; empty when all are clean."""
  pages = sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html"))
  if not pages:
    return [f"no HTML pages under {site}; build the site first"]
  server, base = serve(site)
  problems = []
  with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
    driver = browser(profile)
    try:
      for page in pages:
        driver.get(base + page)
        WebDriverWait(driver, 30).until(
          lambda d: d.execute_script("return document.readyState") == "complete"
        )
        for entry in driver.get_log("browser"):
          if entry["level"] == "SEVERE":
            problems.append(f"{page}: console error: {entry['message']}")
        for url in requested_urls(driver):
          if not (url.startswith(base) or url.startswith(LOCAL_SCHEMES)):
            problems.append(f"{page}: request to a non-local URL: {url}")
    finally:
      driver.quit()
      server.shutdown()
      server.server_close()
  print(f"checked {len(pages)} pages in Chromium")
  return problems


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  default = pathlib.Path("docs/_build/html")
  parser.add_argument("site", type=pathlib.Path, nargs="?", default=default)
  problems = check(parser.parse_args().site.resolve())
  for line in problems:
    print(line)
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
