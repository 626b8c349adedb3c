"""Import smoke test of the built wheel, run from outside the repository in a fresh environment that holds only the
wheel and its dependencies: both packages import from that environment with their type marker, report the installed
version, and the trainer's and the judge's imports resolve."""

import importlib.metadata
import pathlib

import papo_kernels
import papo_trl
from papo_trl import PAPOConfig, PAPOTrainer  # noqa: F401
from papo_trl.rewards import RubricJudge  # noqa: F401

metadata = importlib.metadata.metadata("papo-kernels")
for package in (papo_kernels, papo_trl):
    root = pathlib.Path(package.__file__).parent
    assert "site-packages" in root.parts, f"{package.__name__} imported from {root}, not from the installed wheel"
    assert (root / "py.typed").is_file(), f"{package.__name__} has no py.typed"
    assert package.__version__ == metadata["Version"], (package.__name__, package.__version__, metadata["Version"])
assert metadata["License-Expression"] == "Apache-2.0", metadata["License-Expression"]
print(f"papo-kernels {metadata['Version']} ({metadata['License-Expression']}) imports from {root.parent}")
