"""A headless Chromium for the chat page's browser test, from Debian's packages (never a downloaded driver).

    python -m tests.browser install    # apt-get chromium + chromium-driver if missing (root), as .ci/run does
    python -m tests.browser check      # print where the browser and its driver are, or why they are not usable

Selenium drives Debian's own chromedriver through an explicit Service path, with SE_OFFLINE=true, so Selenium
Manager never tries to download a browser or a driver (the machines running the tests may be offline).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from tests.apt import apt_get_install

PACKAGES = ("chromium", "chromium-driver")
BROWSERS = ("chromium", "chromium-browser")
DRIVER = "chromedriver"


def browser_path() -> str | None:
    """The Chromium binary, or None."""
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def driver_path() -> str | None:
    """Debian's chromedriver, or None."""
    return shutil.which(DRIVER)


def missing() -> str | None:
    """None when Chromium, its driver and Selenium are all usable, else what is missing."""
    absent = [name for name, path in (("chromium", browser_path()), (DRIVER, driver_path())) if path is None]
    try:
        import selenium  # noqa: F401  (only whether it is installed)
    except ImportError:
        absent.append("the selenium package (`make install` installs the dev extra)")
    return f"missing: {', '.join(absent)}" if absent else None


def install_packages() -> str | None:
    """apt-get Chromium and its driver when missing. Returns None when ready, else why not."""
    if browser_path() and driver_path():
        return missing()
    problem = apt_get_install(PACKAGES, "Chromium or chromedriver")
    if problem:
        return problem
    return missing()


def headless_chromium(width: int = 1200, height: int = 900):
    """A Selenium WebDriver on a fresh headless Chromium; the caller quits it."""
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not download anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser_path()
    # --no-sandbox: CI runs as root, where Chromium refuses its sandbox; the page is our own, on 127.0.0.1.
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--no-first-run", "--disable-extensions", f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver_path()), options=options)


def main(argv: list[str] | None = None) -> int:
    """`install` or `check`; exit code 1 when the browser is not usable afterwards."""
    p = argparse.ArgumentParser(prog="python -m tests.browser", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("install", "check"))
    args = p.parse_args(argv)
    reason = install_packages() if args.action == "install" else missing()
    if reason is not None:
        print(f"browser not usable: {reason}", file=sys.stderr)
        return 1
    print(f"chromium: {browser_path()}\nchromedriver: {driver_path()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
