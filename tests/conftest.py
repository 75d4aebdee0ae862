"""Shared pytest hooks: a summary of each chapter's wall time in the tiny profile (also under pytest-xdist, where the
chapters run in worker processes: the times travel back as the reports' user properties)."""

NOTEBOOK_TIMES: dict[str, float] = {}


def pytest_runtest_logreport(report):
    if report.when == "call":
        for key, value in report.user_properties:
            if key == "chapter_wall_s":
                NOTEBOOK_TIMES[report.nodeid.split("[")[-1].rstrip("]")] = value


def pytest_terminal_summary(terminalreporter):
    if NOTEBOOK_TIMES:
        terminalreporter.section("chapter wall times (tiny profile)")
        for name, seconds in sorted(NOTEBOOK_TIMES.items()):
            terminalreporter.write_line(f"{name:<20} {seconds:6.1f} s")
