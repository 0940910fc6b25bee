"""The torch versions this package supports, checked once when it is imported.

The range is pyproject.toml's ``torch`` requirement (a test keeps the two equal) and
README's "Supported torch versions" table, where each version's test results are
recorded. Below the range the package stops at import with an ImportError that names
both versions; above it (untested) it warns and carries on, since a newer torch may
well work, and pip already refuses it unless told not to.
"""

from __future__ import annotations

import re
import warnings

#: The oldest supported torch (major, minor), and the first minor release not tested.
OLDEST = (2, 11)
FIRST_UNTESTED = (2, 14)
#: pyproject.toml's requirement, spelled as pip spells it.
REQUIREMENT = f"torch>={OLDEST[0]}.{OLDEST[1]},<{FIRST_UNTESTED[0]}.{FIRST_UNTESTED[1]}"


def _minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_torch_version(version: str) -> None:
    """Raise ImportError below the supported range; warn above it (nightlies included)."""
    minor = _minor(version)
    if minor is None:
        return  # a source build with an odd version string: nothing to compare
    if minor < OLDEST:
        raise ImportError(
            f"npu_optim_compile needs {REQUIREMENT} (torch {OLDEST[0]}.{OLDEST[1]} to "
            f"{FIRST_UNTESTED[0]}.{FIRST_UNTESTED[1] - 1}), but torch {version} is installed. "
            f'Install a supported torch, e.g. pip install "torch=={FIRST_UNTESTED[0]}.{FIRST_UNTESTED[1] - 1}.*".'
        )
    if minor >= FIRST_UNTESTED:
        warnings.warn(
            f"npu_optim_compile was tested with {REQUIREMENT}; torch {version} is newer and untested.",
            stacklevel=3,
        )
