"""An artifact that passes its hash check but cannot be loaded stops the server with one
error line (issue 20 row 5, issue 19 item 5): no BentoML restart loop."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from serve.artifact import Manifest, write_manifest
from serve.launcher import ROOT, ServerStartError, free_port, start_server

pytestmark = pytest.mark.integration

# Generous: a worker imports torch and transformers before it fails (seconds when idle).
LIMIT_S = 120


def truncated_weights(tiny, tmp_path: Path) -> Path:
    """Weights cut in half, then the manifest re-hashed: the hash check passes."""
    folder = tmp_path / "truncated"
    shutil.copytree(tiny["bert"], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    write_manifest(folder, Manifest(name="truncated", task="text-classification",
                                    format="torch", precision="fp32"))
    return folder


def unknown_architecture(tiny, tmp_path: Path) -> Path:
    """A decoder whose model_type this transformers does not know."""
    folder = tmp_path / "unknown-arch"
    shutil.copytree(tiny["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="no_such_arch", architectures=["NoSuchArchForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    write_manifest(folder, Manifest(name="unknown-arch", task="text-generation",
                                    format="torch", precision="fp32"))
    return folder


@pytest.mark.parametrize(("make", "expected"), [
    (truncated_weights, "SafetensorError"),
    (unknown_architecture, "no_such_arch"),
])
def test_cli_serve_exits_2_with_one_error_line(make, expected, tiny, tmp_path, bentoml_env):
    artifact = make(tiny, tmp_path)
    cli = subprocess.Popen(
        [sys.executable, "-c", "from compress.cli import main; main()", "serve",
         str(artifact), "--port", str(free_port()), "--no-access-log"],
        cwd=ROOT, env=bentoml_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = cli.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        # The server runs in its own session: stop it, or it restarts its worker forever.
        for child in psutil.Process(cli.pid).children(recursive=True):
            child.kill()
        cli.kill()
        output, _ = cli.communicate()
        pytest.fail(f"modelpress serve still running after {LIMIT_S} s:\n{output[-3000:]}")
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert cli.returncode == 2, output[-3000:]
    assert len(errors) == 1, output[-3000:]
    assert f"cannot load {artifact}" in errors[0] and expected in errors[0], errors
    assert "Initializing service error" in output  # the worker did start and fail


def test_start_server_reports_the_workers_error_line(tiny, tmp_path, bentoml_env):
    artifact = truncated_weights(tiny, tmp_path)
    with pytest.raises(ServerStartError) as info:
        start_server(artifact, env=bentoml_env, ready_timeout=LIMIT_S,
                     log_path=tmp_path / "server.log")
    message = str(info.value)
    assert "server failed to start" in message and "SafetensorError" in message, message
