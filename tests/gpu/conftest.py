import sys


def pytest_terminal_summary(terminalreporter):
    """Print the launch counts and the register budget the tests measured."""
    for module, title in (("tests.gpu.test_launches",
                           "kernel launches per public call"),
                          ("tests.gpu.test_ptx",
                           "ptxas resources per kernel (sm_90)")):
        lines = (sys.modules[module].report_lines()
                 if module in sys.modules else [])
        if lines:
            terminalreporter.section(title)
            for line in lines:
                terminalreporter.write_line(line)
