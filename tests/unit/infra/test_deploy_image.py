"""The image's recipe (infra/Dockerfile), read without a builder: its stages and build arguments parse,
what it copies exists and passes the .dockerignore, and the fixes a real build needs are in it (a C
compiler for torch.compile, PATH through a Debian login shell, the commit for provenance). The build
itself: infra/deploy/image_check.sh."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "infra" / "Dockerfile"
PROFILE = ROOT / "infra" / "deploy" / "image" / "profile.sh"
# Debian bookworm's /etc/profile (base-files 12.4), the part that matters: PATH reset for non-root users,
# then /etc/profile.d/*.sh. `ray up` runs container commands with `bash --login -c -i`.
DEBIAN_PROFILE = """
if [ "$(id -u)" -eq 0 ]; then
  PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
else
  PATH="/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games"
fi
export PATH
if [ -d PROFILE_D ]; then
  for i in PROFILE_D/*.sh; do
    if [ -r $i ]; then
      . $i
    fi
  done
  unset i
fi
"""


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    assert not current, "a continuation line runs past the end"
    return out


@pytest.fixture(scope="module")
def steps():
    return instructions(DOCKERFILE.read_text())


def args_of(steps) -> dict[str, str]:
    return {a.split("=", 1)[0]: (a.split("=", 1) + [""])[1] for k, a in steps if k == "ARG"}


def test_the_dockerfile_parses_into_one_stage_with_a_selectable_base(steps):
    known = {"FROM", "ARG", "RUN", "ENV", "USER", "WORKDIR", "COPY", "LABEL"}
    assert {k for k, _ in steps} <= known, {k for k, _ in steps} - known
    froms = [i for i, (k, _) in enumerate(steps) if k == "FROM"]
    assert len(froms) == 1 and steps[froms[0]][1] == "${BASE}"
    assert steps[0] == ("ARG", "BASE=python:3.11-slim-bookworm")  # declared before FROM: usable there
    assert {"TORCH_SPEC", "TORCH_INDEX_URL", "GIT_COMMIT"} <= set(args_of(steps))


def test_every_variable_the_dockerfile_uses_is_declared(steps):
    declared = set(args_of(steps)) | {"PATH"}
    for k, a in steps:
        if k == "ENV":
            declared |= {m.group(1) for m in re.finditer(r"(\w+)=", a)}
    for k, a in steps:
        if k in {"FROM", "ENV", "LABEL", "RUN", "COPY", "WORKDIR", "USER"}:
            used = {m.group(1) or m.group(2) for m in re.finditer(r"\$\{(\w+)[^}]*\}|\$(\w+)", a)}
            assert used <= declared, (k, a, used - declared)


def test_what_the_image_copies_exists_and_passes_the_dockerignore(steps):
    ignore = (ROOT / "infra" / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for k, a in steps:
        if k != "COPY":
            continue
        words = [w for w in a.split() if not w.startswith("--")]
        for src in words[:-1]:
            assert (ROOT / src).exists(), src
            assert src.split("/")[0] in allowed, f"{src} is left out of the build context by the .dockerignore"


def test_the_image_has_a_c_compiler_for_torch_compile(steps):
    apt = " ".join(a for k, a in steps if k == "RUN" and "apt-get install" in a)
    assert re.search(r"\bgcc\b", apt) and "libc6-dev" in apt  # Triton builds its launcher with cc at run time


def test_the_build_argument_git_commit_reaches_provenance(steps):
    envs = " ".join(a for k, a in steps if k == "ENV")
    assert "DDPM_GIT_COMMIT=${GIT_COMMIT}" in envs
    # ... which is the variable the training run's provenance reads when there is no git (the image).
    assert 'os.environ.get("DDPM_GIT_COMMIT")' in (ROOT / "pipeline" / "train" / "reporting.py").read_text()
    # After the installs: a new commit does not rebuild the torch layer.
    last_run = max(i for i, (k, _) in enumerate(steps) if k == "RUN")
    assert [i for i, (k, a) in enumerate(steps) if k == "ARG" and a.startswith("GIT_COMMIT")][0] > last_run


def test_the_venv_survives_debians_login_shell_for_user_ray(steps, tmp_path):
    copies = [a.split() for k, a in steps if k == "COPY" and "/etc/profile.d/" in a]
    assert copies and copies[0][0] == str(PROFILE.relative_to(ROOT)) and copies[0][1].endswith(".sh")
    bash = shutil.which("bash")
    if bash is None:  # pragma: no cover
        pytest.skip("no bash")
    profile_d = tmp_path / "profile.d"
    profile_d.mkdir()
    shutil.copy(PROFILE, profile_d / "ddpm-venv.sh")
    etc_profile = tmp_path / "profile"
    # As uid 1000 (the image's `ray`): the non-root branch, whatever uid runs this test.
    etc_profile.write_text(DEBIAN_PROFILE.replace("PROFILE_D", str(profile_d)).replace("$(id -u)", "1000"))
    env = {"PATH": "/opt/venv/bin:/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(
        [bash, "-c", f'. {etc_profile}; . {etc_profile}; echo "$PATH"; echo "$VIRTUAL_ENV"'],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    assert out[0].split(":")[0] == "/opt/venv/bin" and out[0].count("/opt/venv/bin") == 1, out
    assert out[1] == "/opt/venv"
    without = subprocess.run(
        [
            bash,
            "-c",
            f'PATH=/usr/bin:/bin; . /dev/null; {DEBIAN_PROFILE.split("fi")[0]}fi; echo "$PATH"'.replace(
                "$(id -u)", "1000"
            ),
        ],
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    assert "/opt/venv/bin" not in without  # the reset this file undoes
