"""The `saelab` subcommands driven by a config, one module each: cache, train, dead, eval, darkmatter, dashboard,
steer, serve, label.

Each module's `run(command, progress=True)` takes the command's config (saelab.config), checks its options, loads
what it needs, runs the engine (saelab.analysis, saelab.dashboard, saelab.steering), writes the command's files and
returns a `CommandResult`. `saelab <name>` prints `"\\n".join(result.lines())`.
"""

from __future__ import annotations

from typing import Protocol


class CommandResult(Protocol):
    """What a command found, with the paths it wrote."""

    def lines(self) -> list[str]:
        """The text `saelab` prints for it, one line per entry."""
        ...
