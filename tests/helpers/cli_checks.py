"""The CLI's bad-input contract as one test helper: exit code 2 and one ``senseflow: error:`` line."""

from __future__ import annotations

from senseflow.cli import main


def cli_fails(capsys, argv, *needles: str) -> str:
    """Run ``senseflow argv``; assert exit 2, a one-line ``senseflow: error:`` message holding every needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("senseflow: error:") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    return err
