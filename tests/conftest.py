"""Shared pytest hooks: a summary of each chapter's wall time in the tiny profile."""

NOTEBOOK_TIMES: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter):
    if NOTEBOOK_TIMES:
        terminalreporter.section("chapter wall times (tiny profile)")
        for name, seconds in sorted(NOTEBOOK_TIMES.items()):
            terminalreporter.write_line(f"{name:<20} {seconds:6.1f} s")
