"""The shipped monitoring configuration is valid for the real tools."""

import shutil
import subprocess
from pathlib import Path

COMPOSE = Path(__file__).resolve().parent.parent / "compose"


def test_alertmanager_config_passes_amtool(tmp_path):
    amtool = shutil.which("amtool")
    assert amtool, "amtool (Debian prometheus-alertmanager) is missing: run bash scripts/services.sh"
    # amtool checks that credentials_file exists; give it one at the configured path's name.
    config = (COMPOSE / "alertmanager.yml").read_text()
    token = tmp_path / "opsfleet-token"
    token.write_text("t\n")
    checked = tmp_path / "alertmanager.yml"
    checked.write_text(config.replace("/etc/alertmanager/opsfleet-token", str(token)))
    done = subprocess.run([amtool, "check-config", str(checked)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
