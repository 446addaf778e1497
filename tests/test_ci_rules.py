"""The CI rule (tests/ci_rules.py): under CI=true a skip is a failure; locally it stays a skip with its
message. Checked on a throw-away test folder run by a child pytest, and on the browser tests themselves."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def child_pytest(args, cwd, ci: bool, **env):
    env = dict(os.environ, CI="true" if ci else "", **env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def sample_suite(tmp_path):
    (tmp_path / "conftest.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n"
        "from ci_rules import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401\n")
    (tmp_path / "test_inside.py").write_text(
        "import pytest\nfrom ci_rules import skip_or_fail\n\n"
        "def test_skips():\n    pytest.skip('no widget here')\n\n"
        "def test_checks_its_requirement():\n    skip_or_fail('no browser here')\n\n"
        "def test_passes():\n    pass\n")
    (tmp_path / "test_module_level.py").write_text(
        "import pytest\npytest.skip('no gadget here', allow_module_level=True)\n\ndef test_never():\n    pass\n")
    return tmp_path


def test_locally_a_skip_stays_a_skip_with_its_message(sample_suite):
    run = child_pytest([], sample_suite, ci=False)
    assert run.returncode == 0, run.stdout
    assert "1 passed, 3 skipped" in run.stdout, run.stdout
    assert all(r in run.stdout for r in ("no widget here", "no browser here", "no gadget here"))


def test_under_ci_every_skip_fails(sample_suite):
    run = child_pytest(["test_inside.py"], sample_suite, ci=True)
    assert run.returncode != 0 and "2 failed, 1 passed" in run.stdout, run.stdout
    assert "skipped under CI=true, where nothing may skip: no widget here" in run.stdout
    assert "no browser here (CI=true: a missing requirement fails instead of skipping)" in run.stdout
    module_level = child_pytest(["test_module_level.py"], sample_suite, ci=True)
    assert module_level.returncode != 0 and "skipped under CI=true" in module_level.stdout, module_level.stdout


@pytest.mark.parametrize("ci", [False, True])
def test_browser_tests_without_chromium(ci):
    """No browser (LINFUSION_CHROMIUM pointing nowhere): skipped locally with the reason; under CI every browser
    test fails with it, before any server starts, and the module still collects (the rest of a run goes on)."""
    run = child_pytest(["tests/test_browser.py"], REPO, ci=ci, LINFUSION_CHROMIUM="/nonexistent/chromium")
    if ci:
        assert run.returncode != 0 and " error" in run.stdout and "passed" not in run.stdout, run.stdout
        assert "browser tests cannot run: no Chromium at /nonexistent/chromium" in run.stdout
        assert "CI=true" in run.stdout and "Interrupted" not in run.stdout
    else:
        assert run.returncode in (0, 5) and "1 skipped" in run.stdout, run.stdout   # 5: nothing else collected
        assert "browser tests skipped: no Chromium at /nonexistent/chromium" in run.stdout


def test_a_host_difference_the_readme_states_may_skip_under_ci(tmp_path):
    """One test per host may not apply (CI runs both): its skip stands under CI only when it names a difference
    README.md states; any other wording fails like every other skip."""
    (tmp_path / "conftest.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n"
        "from ci_rules import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401\n")
    stated = "on 0.33 a progress bar is redrawn at most every 100 ms"
    assert stated in " ".join((REPO / "README.md").read_text().split())
    (tmp_path / "test_hosts.py").write_text(
        "from ci_rules import skip_for_host_difference\n\n"
        f"def test_stated():\n    skip_for_host_difference({stated!r})\n\n"
        "def test_not_stated():\n    skip_for_host_difference('0.33 has a purple logo')\n")
    run = child_pytest([], tmp_path, ci=True)
    assert run.returncode != 0 and "1 failed, 1 skipped" in run.stdout, run.stdout
    assert "skipped under CI=true, where nothing may skip: not on this ComfyUI, because (README.md): 0.33 has a " \
           "purple logo" in run.stdout
