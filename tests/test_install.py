"""The install: our ``kernels/`` folder never takes the name ``kernels`` from Hugging Face's package.

transformers (>= 5.25) imports Hugging Face's ``kernels`` package as soon as many model modules
load. Whenever the repository root is on ``sys.path`` (``python -m ...`` run there, a shell
opened in the checkout, a worker started there), a plain ``import kernels`` used to find this
repository's ``kernels/__init__.py`` and every model import failed. The folder is now no
regular package (``powerfast/kernels`` links to it). These tests run Python
from the repository root, as a user would, in fresh processes.
"""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_in_root(code: str, *args: str, env_extra: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, *args, "-c", code] if code else [sys.executable, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def inside_repository(path: str) -> bool:
    """Whether ``path`` is the repository's own code (an environment inside the checkout is not)."""
    resolved = Path(path).resolve()
    return resolved.is_relative_to(ROOT) and not resolved.is_relative_to(Path(sys.prefix).resolve())


def test_hugging_face_kernels_is_installed_here():
    # the test extra installs it, so the tests below can never pass by its absence
    version = importlib.metadata.version("kernels")
    assert version, "Hugging Face's 'kernels' package must be installed where the tests run"


@pytest.mark.slow
def test_import_kernels_in_repository_root_gives_hugging_face_package():
    result = run_in_root("import transformers.activations, kernels; print(kernels.__file__)")
    assert result.returncode == 0, result.stderr
    path = result.stdout.strip().splitlines()[-1]
    assert not inside_repository(path), f"'import kernels' in {ROOT} resolved into the repository: {path}"
    expected = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
    assert Path(path).resolve() == Path(expected).resolve()


def test_import_kernels_first_then_ours():
    # the order a user's shell may take: Hugging Face's first, then powerfast's kernels
    code = (
        "import kernels, sys\n"
        "import powerfast.kernels.sampling as ours\n"
        "import powerfast.kernels as pk\n"
        "print(kernels.__file__); print(ours.__file__); print(pk.__name__); print(sys.modules['kernels'] is kernels)\n"
    )
    result = run_in_root(code)
    assert result.returncode == 0, result.stderr
    hf_path, ours_path, name, same = result.stdout.strip().splitlines()[-4:]
    assert not inside_repository(hf_path)
    assert Path(ours_path).resolve() == ROOT / "kernels" / "sampling.py"
    assert name == "powerfast.kernels"
    assert same == "True"


def test_kernels_folder_is_no_regular_package_and_runs_nothing_as_kernels():
    # find_spec from the root sees at most a namespace portion (no file of ours to run), and
    # with only the repository on the path `import kernels` executes none of our code
    result = run_in_root("import importlib.util as u; s = u.find_spec('kernels'); print(s.origin)")
    assert result.returncode == 0, result.stderr
    assert not inside_repository(result.stdout.strip().splitlines()[-1] or "/nowhere")
    assert not (ROOT / "kernels" / "__init__.py").exists()
    code = (
        "import sys\n"
        f"sys.path[:] = [{str(ROOT)!r}] + [p for p in sys.path if 'site-packages' not in p and p not in ('', '.')]\n"
        "import kernels\n"
        "print(kernels.__file__, sorted(m for m in sys.modules if m.startswith('kernels.')))\n"
    )
    result = run_in_root(code, "-S")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None []"


def test_powerfast_kernels_is_the_folder_through_a_relative_link():
    link = ROOT / "powerfast" / "kernels"
    assert link.is_symlink() and not Path(os.readlink(link)).is_absolute()
    assert link.resolve() == (ROOT / "kernels").resolve()


@pytest.mark.slow
def test_cli_module_runs_in_repository_root():
    # `python -m powerfast.cli` puts the root first on sys.path; `fidelity` loads transformers models
    result = run_in_root("", "-m", "powerfast.cli", "fidelity", "--help")
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()
    code = "import transformers, powerfast.runtime.runner, transformers.models.llama.modeling_llama as m; print(m.__name__)"
    result = run_in_root(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("modeling_llama")


@pytest.mark.parametrize("entry", ["tests", "."])
@pytest.mark.slow
def test_pytest_rootdir_entries_do_not_shadow(entry):
    # pytest inserts the test folder (rootdir-relative) and `python -m pytest` the cwd
    code = f"import sys; sys.path.insert(0, {entry!r}); import transformers.activations, kernels; print(kernels.__file__)"
    result = run_in_root(code)
    assert result.returncode == 0, result.stderr
    assert not inside_repository(result.stdout.strip().splitlines()[-1])
