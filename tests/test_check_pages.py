"""The browser check of the docs site reports console errors and requests to the network."""

from __future__ import annotations

import importlib.util
import pathlib
import shutil

import pytest

pytest.importorskip("selenium")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
  pytest.skip("needs Debian's chromium and chromium-driver", allow_module_level=True)

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "docs" / "check_pages.py"
spec = importlib.util.spec_from_file_location("check_pages", SCRIPT)
check_pages = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_pages)

ICON = '<link rel="icon" href="data:,">'


def test_clean_pages_pass(tmp_path: pathlib.Path) -> None:
  (tmp_path / "index.html").write_text(f"<html><head>{ICON}</head><body>ok</body></html>")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "page.html").write_text(f"<html><head>{ICON}</head><body>ok</body></html>")
  assert check_pages.check(tmp_path) == []


def test_remote_requests_and_console_errors_fail(tmp_path: pathlib.Path) -> None:
  (tmp_path / "index.html").write_text(
    f"<html><head>{ICON}</head><body>"
    '<img src="https://example.invalid/badge.svg">'
    '<script>throw new Error("broken page")</script>'
    "</body></html>"
  )
  problems = check_pages.check(tmp_path)
  assert any("non-local URL: https://example.invalid/badge.svg" in p for p in problems)
  assert any("console error" in p and "broken page" in p for p in problems)


def test_an_empty_site_is_an_error(tmp_path: pathlib.Path) -> None:
  assert check_pages.check(tmp_path) == [f"no HTML pages under {tmp_path}; build the site first"]
